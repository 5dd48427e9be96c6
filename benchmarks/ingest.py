"""Ingest throughput against a plain tar copy of the same raw image files, measured in the same run.

    python benchmarks/ingest.py results/bench-ingest.json                       # the generated default (small profile)
    python benchmarks/ingest.py out.json --train-per-class 600 --workers 2      # bigger
    python benchmarks/ingest.py out.json --raw /data/imagenet --max-side 512    # an existing RAW (nothing generated)

Rows: `tar copy` reads every raw image through the same reader (one positioned read each) and writes them into one
uncompressed tar, no decoding: the I/O + tar floor. `ingest` adds what ingestion does per image — decode, convert,
resize, re-encode, colour sums, shard hashing — with 1 and with `--workers` processes. MB/s counts raw image bytes.
Prints a table and writes the numbers as JSON to the path given.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import PIL

from vgg.config import SynthConfig
from vgg.data.imagenet import SPLITS, open_raw, read_range
from vgg.data.ingest import ingest
from vgg.data.synthetic import synthesize


def tar_copy(raw: Path, out: Path) -> tuple[float, int, int]:
    """(seconds, images, bytes): every raw image copied into one plain tar, in reader order."""
    dataset = open_raw(raw)
    refs = [ref for split in SPLITS for ref in dataset.refs(split)]
    started = time.perf_counter()
    files = {}
    total = 0
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for ref in refs:
            if ref.path not in files:
                files[ref.path] = open(raw / ref.path, "rb")
            data = read_range(files[ref.path], ref, root=raw)
            info = tarfile.TarInfo(ref.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            total += len(data)
    for file in files.values():
        file.close()
    with open(out, "rb+") as file:
        os.fsync(file.fileno())
    return time.perf_counter() - started, len(refs), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json_out", type=Path, help="where to write the results (JSON)")
    parser.add_argument("--raw", type=Path, help="an existing RAW directory (default: generate one)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=150)
    parser.add_argument("--val-per-class", type=int, default=25)
    parser.add_argument("--min-side", type=int, default=48, help="generated images: smallest side from (px)")
    parser.add_argument("--gen-max-side", type=int, default=160, help="generated images: smallest side up to (px)")
    parser.add_argument("--max-side", type=int, default=72, help="ingest: resize when the smallest side exceeds (px)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        rows = []
        raw = args.raw
        synth = None
        if raw is None:
            config = SynthConfig(classes=args.classes, train_per_class=args.train_per_class,
                                 val_per_class=args.val_per_class, min_side=args.min_side,
                                 max_side=args.gen_max_side, seed=args.seed)
            started = time.perf_counter()
            report = synthesize(work / "raw", config)
            synth = {"seconds": time.perf_counter() - started, "images": report.train + report.val}
            raw = work / "raw"
        seconds, images, raw_bytes = tar_copy(raw, work / "copy.tar")
        rows.append({"name": "tar copy (1 process)", "seconds": seconds, "images": images})
        for workers in sorted({1, args.workers}):
            out = work / f"shards-{workers}"
            report = ingest(raw, out, max_side=args.max_side, shard_size=args.shard_size, workers=workers)
            rows.append({"name": f"ingest ({workers} worker{'s' if workers > 1 else ''})", "seconds": report.seconds,
                         "images": sum(report.counts.values()) + report.skipped,
                         "converted": report.converted, "resized": report.resized,
                         "shard_bytes": report.bytes_written})
            shutil.rmtree(out)
        for row in rows:
            row["images_per_s"] = row["images"] / row["seconds"]
            row["mb_per_s"] = raw_bytes / 1e6 / row["seconds"]
            row["vs_tar_copy"] = rows[0]["seconds"] / row["seconds"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"raw: {raw if args.raw else 'generated'}; {images} images, {raw_bytes / 1e6:.1f} MB; "
          f"max_side {args.max_side}, shard_size {args.shard_size}, {os.cpu_count()} CPUs")
    if synth:
        print(f"generation: {synth['images']} images in {synth['seconds']:.1f} s ({synth['images'] / synth['seconds']:.0f} images/s)")
    print(f"{'':24} {'seconds':>8} {'images/s':>9} {'MB/s':>7} {'× tar copy':>10}")
    for row in rows:
        print(f"{row['name']:24} {row['seconds']:8.2f} {row['images_per_s']:9.0f} {row['mb_per_s']:7.1f} {row['vs_tar_copy']:10.2f}")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({
        "benchmark": "ingest",
        "raw": str(args.raw) if args.raw else "generated",
        "images": images,
        "raw_bytes": raw_bytes,
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "generation": synth,
        "results": rows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pillow": PIL.__version__,
                    "platform": platform.platform()},
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
