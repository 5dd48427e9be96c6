"""Ingest raw ILSVRC-2012 (archives or extracted, `vgg.data.imagenet`) into WebDataset shards, an index and the
training set's colour statistics — the on-disk contract the loader reads (brief: "Shards on disk").

OUT/ after `ingest(RAW, OUT, ...)`:
- `train-000000.tar`…, `val-000000.tar`…: WebDataset samples `<key>.cls` (ASCII class index, sorted-WNID order),
  `<key>.jpg` (RGB JPEG), `<key>.json` (`{"wnid", "source": file name, "size": [w, h] of the original}`), with
  `key` the source file's stem. The original JPEG bytes are kept unless the file is not an RGB JPEG (PNG, CMYK,
  grayscale, … → converted to RGB, listed in index.json "converted") or its smallest side exceeds `max_side`
  (resized once so the smallest side is `max_side`, Lanczos after JPEG DCT-domain reduction to ≥ 2× the target,
  the same reduce-then-filter scheme as PIL's thumbnail). Re-encoding is JPEG quality 95 with 4:4:4 chroma. A file that cannot be
  decoded is left out and listed in "skipped" with the reason — never silently.
- `index.json` (written last: its presence means the output is complete), `stats.json` (see `colour_stats`).

Order and sharding: val keeps file-name order (evaluation reads it in index order); train is shuffled once with a
fixed seed so every shard mixes classes (the loader shuffles shards and uses a small buffer). A split of N images
becomes ⌈N / shard_size⌉ shards whose sizes differ by at most one. Each shard is one task for a process pool;
results are consumed in task order and the statistics are exact integer sums, so the output does not depend on
scheduling or on the number of workers: the same input gives byte-identical shards (fixed tar header fields).

Shard size arithmetic (`data.shard_size` in params.yaml). Paper profile: 1,281,167 train images; 64 GPUs × 8
loader workers = 512 readers, each of which should get several shards per epoch; shard_size 500 gives 2,563 train
shards (5 per reader, ≈ 55 MB each at ~110 KB per image) and 100 val shards. Small profile: 3,000 train images at
shard_size 64 → 47 shards, several per reader at 2 ranks × 2 workers.

Safety: shards are written into a private staging folder inside OUT and renamed into place only when every shard,
stats.json and the index are ready; on any failure (disk full included) the staging folder is removed and an
existing complete output stays untouched (a killed run's staging folder is removed by the next run). Re-running with the same input (same images, max_side, shard_size) is a
no-op; OUT holding the output of a different input is refused unless `overwrite=True`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import tarfile
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np
from PIL import Image
from tqdm import tqdm

from vgg.data.imagenet import SPLITS, RawImageNet, RawRef, open_raw, read_range
from vgg.files import write_atomic
from vgg.errors import ConfigError, DataError

FORMAT = 1  # index.json "format"
INGEST_VERSION = 1  # bump when the bytes ingestion writes change; part of the source fingerprint
JPEG_QUALITY = 95  # re-encoding (conversions, resizes), with 4:4:4 chroma
SHUFFLE_SEED = 0  # the one fixed permutation of the training images before sharding
STATS_STRIDE = 4  # colour statistics use every 4th pixel in each direction (1/16 of the pixels)
MTIME = 1_335_830_400  # fixed tar header mtime (2012-05-01 UTC): byte-identical shards
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # EFBIG: a file-size limit (ulimit -f) reads the same to us
OUR_FILES = re.compile(r"(index\.json|stats\.json|(train|val)-\d{6}\.tar|\.ingest-.*|\.index\.json\..*\.tmp)")


@dataclass(frozen=True)
class IngestReport:
    """What an ingest did (or found already done: `up_to_date`)."""

    out: Path
    up_to_date: bool
    counts: dict[str, int]  # images written per split
    shards: dict[str, int]  # shard files per split
    converted: int  # re-encoded to RGB JPEG (PNG, CMYK, grayscale, …)
    resized: int  # smallest side > max_side, resized once
    skipped: int  # undecodable, left out (listed in index.json)
    bytes_read: int  # raw image bytes
    bytes_written: int  # shard bytes
    seconds: float

    @property
    def images_per_s(self) -> float:
        return sum(self.counts.values()) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        images = " + ".join(f"{self.counts[split]} {split}" for split in SPLITS)
        shards = " + ".join(str(self.shards[split]) for split in SPLITS)
        if self.up_to_date:
            return f"up to date: {self.out} already holds {images} images in {shards} shards from this input"
        return (
            f"ingested {images} images into {shards} shards in {self.out} ({self.converted} converted, "
            f"{self.resized} resized, {self.skipped} skipped) in {self.seconds:.1f} s ({self.images_per_s:.0f} images/s)"
        )


@dataclass(frozen=True)
class ColourStats:
    """RGB statistics of the training set on the 0–255 scale: the mean (§2.1) and the covariance's
    eigen-decomposition for AlexNet's PCA colour augmentation (§3.1)."""

    count: int  # training images
    mean_rgb: tuple[float, float, float]
    eigval: tuple[float, float, float]  # descending
    eigvec: tuple[tuple[float, ...], ...]  # 3×3, column j belongs to eigval[j]

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "mean_rgb": list(self.mean_rgb), "eigval": list(self.eigval),
                "eigvec": [list(row) for row in self.eigvec]}


@dataclass(frozen=True)
class _Task:
    """One shard to write: the pool's unit of work (picklable)."""

    root: str
    staging: str
    file: str
    refs: tuple[RawRef, ...]
    max_side: int
    stats: bool  # accumulate colour sums (train only)


@dataclass
class _Result:
    file: str
    count: int = 0
    sha256: str = ""
    converted: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    resized: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    pixels: int = 0  # colour sums over the subsampled pixels, exact in int64
    pixel_sum: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))
    pixel_outer: np.ndarray = field(default_factory=lambda: np.zeros((3, 3), np.int64))


def ingest(
    raw: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_side: int,
    shard_size: int,
    workers: int,
    overwrite: bool = False,
    progress: bool = False,
) -> IngestReport:
    """Turn RAW into WebDataset shards + index.json + stats.json in OUT (see the module docstring).

    `workers` processes decode and write shards (1 = in this process). Raises `DataError` for bad raw input, an
    OUT that holds another input's output (unless `overwrite`) or files that are not ingest output, and a full disk.
    """
    for name, value, least in (("max_side", max_side, 1), ("shard_size", shard_size, 1), ("workers", workers, 1)):
        if value < least:
            raise ConfigError(f"{name}: must be >= {least}, got {value}")
    started = time.perf_counter()
    dataset = open_raw(raw)
    refs = {split: dataset.refs(split) for split in SPLITS}
    source = _fingerprint(dataset, refs, max_side=max_side, shard_size=shard_size)
    out = Path(out)
    previous = _previous_index(out)
    if previous is not None and previous.get("source") == source and _complete(out, previous):
        return _report_from_index(out, previous, seconds=time.perf_counter() - started)
    _check_out(out, previous, source, overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".ingest-*"):  # the staging folder of a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".ingest-", dir=out))
    except OSError as error:
        raise DataError(f"cannot write to {out}: {error.strerror}; choose a writable OUT") from None
    try:
        tasks = [task for split in SPLITS for task in _plan(dataset, split, refs[split], staging, max_side, shard_size)]
        results = _run(tasks, workers=workers, progress=progress, total=sum(len(r) for r in refs.values()))
        by_split = {split: [r for t, r in zip(tasks, results) if t.file.startswith(f"{split}-") and r.count] for split in SPLITS}
        if not by_split["train"] or not by_split["val"]:
            raise DataError(f"no decodable images left in {'train' if not by_split['train'] else 'val'} of {raw}; see the skipped list")
        stats = colour_stats(by_split["train"])
        index = {
            "format": FORMAT,
            "classes": list(dataset.classes),
            "names": list(dataset.names),
            "max_side": max_side,
            "source": source,
            "splits": {
                split: {
                    "count": sum(r.count for r in by_split[split]),
                    "shards": [{"file": r.file, "count": r.count, "sha256": r.sha256} for r in by_split[split]],
                }
                for split in SPLITS
            },
            "converted": [{"name": n, "reason": why} for n, why in sorted(c for r in results for c in r.converted)],
            "skipped": [{"name": n, "reason": why} for n, why in sorted(s for r in results for s in r.skipped)],
        }
        write_atomic(staging / "stats.json", _json_bytes(stats.to_json()))
        _publish(out, staging, [r.file for split in SPLITS for r in by_split[split]], index)
    except BrokenProcessPool:
        raise DataError(f"an ingest worker process died (out of memory?) while writing {out}; retry with fewer workers") from None
    except OSError as error:
        if error.errno in NO_SPACE:
            raise DataError(
                f"no space left while writing {out} ({error.strerror}); free space or choose another OUT — "
                "nothing was published"
            ) from None
        raise DataError(f"ingest into {out} failed: {error}; nothing was published") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return IngestReport(
        out=out,
        up_to_date=False,
        counts={split: index["splits"][split]["count"] for split in SPLITS},
        shards={split: len(by_split[split]) for split in SPLITS},
        converted=len(index["converted"]),
        resized=sum(r.resized for r in results),
        skipped=len(index["skipped"]),
        bytes_read=sum(r.bytes_read for r in results),
        bytes_written=sum(r.bytes_written for r in results),
        seconds=time.perf_counter() - started,
    )


def colour_stats(results: Iterable[_Result]) -> ColourStats:
    """Mean and covariance eigen-decomposition of RGB (0–255) over the stored training images: every
    STATS_STRIDE-th pixel in each direction of each image as stored (decoded from the shard's JPEG bytes, after
    conversion and resizing), so every image counts by its area, as "over all pixels" would. Exact integer sums; eigenvector signs fixed (largest
    component positive) so the file does not depend on the LAPACK build."""
    results = list(results)
    pixels = sum(r.pixels for r in results)
    total = np.sum([r.pixel_sum for r in results], axis=0)
    outer = np.sum([r.pixel_outer for r in results], axis=0)
    mean = total / pixels
    covariance = outer / pixels - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(covariance)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    eigvec = eigvec * np.where(eigvec[np.abs(eigvec).argmax(0), range(3)] < 0, -1.0, 1.0)
    return ColourStats(
        count=sum(r.count for r in results),
        mean_rgb=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        eigval=tuple(float(v) for v in eigval),  # type: ignore[arg-type]
        eigvec=tuple(tuple(float(v) for v in row) for row in eigvec),
    )


# ---- what the output is of: fingerprint, previous output ------------------------------------------------------


def _fingerprint(dataset: RawImageNet, refs: dict[str, tuple[RawRef, ...]], *, max_side: int, shard_size: int) -> dict[str, Any]:
    """Identifies the input by content, not by paths or mtimes: every image's (split, key, label, byte size), the
    classes and names, and the ingest parameters. Copying or re-extracting RAW keeps it; a different dataset, devkit
    or parameter changes it. (Two inputs that differ only inside an image of equal byte size are not told apart.)"""
    digest = hashlib.sha256()
    digest.update(json.dumps([list(dataset.classes), list(dataset.names)]).encode())
    for split in SPLITS:
        for ref in refs[split]:
            digest.update(f"{split}\t{ref.key}\t{ref.label}\t{ref.size}\n".encode())
    return {
        "ingest_version": INGEST_VERSION,
        "images": {split: len(refs[split]) for split in SPLITS},
        "bytes": {split: sum(ref.size for ref in refs[split]) for split in SPLITS},
        "sha256": digest.hexdigest(),
        "max_side": max_side,
        "shard_size": shard_size,
        "shuffle_seed": SHUFFLE_SEED,
        "stats_stride": STATS_STRIDE,
    }


def _previous_index(out: Path) -> dict[str, Any] | None:
    """OUT/index.json parsed, `{}` when present but unreadable, None when absent."""
    try:
        index = json.loads((out / "index.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _complete(out: Path, index: dict[str, Any]) -> bool:
    try:
        files = [shard["file"] for split in SPLITS for shard in index["splits"][split]["shards"]]
    except (KeyError, TypeError):
        return False
    return (out / "stats.json").is_file() and all((out / name).is_file() for name in files)


def _check_out(out: Path, previous: dict[str, Any] | None, source: dict[str, Any], *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT {out} exists and is not a directory; choose a directory for the shards")
    if overwrite or not out.exists():
        return
    if previous is not None:
        old = previous.get("source")
        if old == source:  # same input, but files are missing: re-ingesting is safe
            return
        if not isinstance(old, dict):
            what = "an unreadable index.json"
        elif old.get("sha256") != source["sha256"]:
            what = "shards of different raw images"
        else:
            what = "shards made with " + ", ".join(
                f"{key} {old.get(key)} (now {source[key]})" for key in source if old.get(key) != source[key]
            )
        raise DataError(f"{out} already holds {what}; pass overwrite (--overwrite) to replace them, or choose another OUT")
    foreign = sorted(entry.name for entry in out.iterdir() if not OUR_FILES.fullmatch(entry.name))
    if foreign:
        raise DataError(
            f"{out} is not empty and not an ingest output (e.g. {foreign[0]!r}); choose an empty or new OUT, "
            "or pass overwrite (--overwrite) to write the shards beside those files"
        )


def _report_from_index(out: Path, index: dict[str, Any], *, seconds: float) -> IngestReport:
    return IngestReport(
        out=out,
        up_to_date=True,
        counts={split: int(index["splits"][split]["count"]) for split in SPLITS},
        shards={split: len(index["splits"][split]["shards"]) for split in SPLITS},
        converted=len(index.get("converted", [])),
        resized=0,
        skipped=len(index.get("skipped", [])),
        bytes_read=0,
        bytes_written=0,
        seconds=seconds,
    )


# ---- planning and running -------------------------------------------------------------------------------------


def _plan(
    dataset: RawImageNet, split: str, refs: tuple[RawRef, ...], staging: Path, max_side: int, shard_size: int
) -> list[_Task]:
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(refs)) if split == "train" else np.arange(len(refs))
    chunks = np.array_split(order, math.ceil(len(refs) / shard_size))
    return [
        _Task(root=str(dataset.root), staging=str(staging), file=f"{split}-{number:06d}.tar",
              refs=tuple(refs[i] for i in chunk), max_side=max_side, stats=split == "train")
        for number, chunk in enumerate(chunks)
    ]


def _run(tasks: list[_Task], *, workers: int, progress: bool, total: int) -> list[_Result]:
    """Write every shard; results in task order whatever the scheduling (`map` yields in task order)."""
    results: list[_Result] = []
    bar = tqdm(total=total, unit="img", desc="ingest", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    # spawn, not fork: no inherited threads or locks; a worker that dies breaks the pool (BrokenProcessPool) instead
    # of being replaced forever as in multiprocessing.Pool.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        for result in pool.map(_write_shard, tasks) if pool else map(_write_shard, tasks):
            results.append(result)
            bar.update(result.count + len(result.skipped))
            bar.set_postfix_str(f"{sum(r.bytes_read for r in results) / 1e6 / (time.perf_counter() - started):.1f} MB/s read")
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    return results


def _write_shard(task: _Task) -> _Result:
    """Read, check/convert, and tar one shard's images into the staging folder (runs in a pool worker)."""
    result = _Result(file=task.file)
    buffer = io.BytesIO()
    files: dict[str, BinaryIO] = {}
    root = Path(task.root)
    try:
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for ref in task.refs:
                if ref.path not in files:
                    files[ref.path] = open(root / ref.path, "rb")
                data = read_range(files[ref.path], ref, root=root)
                result.bytes_read += len(data)
                try:
                    jpeg, rgb, size, converted, resized = _prepare(data, max_side=task.max_side)
                except _Undecodable as error:
                    result.skipped.append((ref.name, f"cannot decode: {error}"))
                    continue
                if converted:
                    result.converted.append((ref.name, converted))
                result.resized += resized
                meta = {"wnid": ref.wnid, "source": ref.name, "size": list(size)}
                for extension, payload in (("cls", str(ref.label).encode()), ("jpg", jpeg), ("json", _json_bytes(meta))):
                    _add(tar, f"{ref.key}.{extension}", payload)
                result.count += 1
                if task.stats:
                    pixels = np.asarray(rgb)[::STATS_STRIDE, ::STATS_STRIDE].reshape(-1, 3).astype(np.int64)
                    result.pixels += len(pixels)
                    result.pixel_sum += pixels.sum(0)
                    result.pixel_outer += pixels.T @ pixels
    finally:
        for file in files.values():
            file.close()
    data = buffer.getvalue()
    result.sha256 = hashlib.sha256(data).hexdigest()
    result.bytes_written = len(data)
    if result.count:
        write_atomic(Path(task.staging) / task.file, data)
    return result


class _Undecodable(Exception):
    pass


def _prepare(data: bytes, *, max_side: int) -> tuple[bytes, Image.Image, tuple[int, int], str, bool]:
    """(JPEG bytes to store, the RGB image they decode to, original (w, h), why converted or "", resized?)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            size = image.size
            if image.format != "JPEG":
                converted = f"{image.format or 'unknown'} file, not a JPEG: re-encoded as RGB JPEG"
            elif image.mode == "CMYK":
                converted = "CMYK JPEG: converted to RGB"
            elif image.mode == "L":
                converted = "grayscale JPEG: converted to RGB"
            elif image.mode != "RGB":
                converted = f"{image.mode} JPEG: converted to RGB"
            else:
                converted = ""
            short = min(size)
            resized = short > max_side
            if resized:
                target = _target_size(size, max_side)
                image.draft(image.mode, (2 * target[0], 2 * target[1]))  # JPEG DCT scaling; a no-op for others
            image.load()
            rgb = image.convert("RGB")
            if resized:
                rgb = rgb.resize(target, Image.LANCZOS)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise _Undecodable(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    if not converted and not resized:
        return data, rgb, size, "", False
    encoded = io.BytesIO()
    rgb.save(encoded, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: keep colour detail at small sides
    stored = Image.open(encoded)  # the statistics are of what the loader will decode
    stored.load()
    return encoded.getvalue(), stored, size, converted, resized


def _target_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(w, h) with the smallest side exactly `max_side`, the other scaled isotropically (rounded)."""
    width, height = size
    if width <= height:
        return max_side, max(max_side, round(height * max_side / width))
    return max(max_side, round(width * max_side / height)), max_side


# ---- writing --------------------------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _publish(out: Path, staging: Path, files: list[str], index: dict[str, Any]) -> None:
    """Move a finished output into OUT: invalidate the old index, rename shards and stats.json into place, drop
    shards of the old output that the new one lacks, and write index.json last (its presence = complete)."""
    (out / "index.json").unlink(missing_ok=True)
    for name in [*files, "stats.json"]:
        os.replace(staging / name, out / name)
    keep = set(files)
    for entry in out.iterdir():
        if re.fullmatch(r"(train|val)-\d{6}\.tar", entry.name) and entry.name not in keep:
            entry.unlink()
    write_atomic(out / "index.json", json.dumps(index, indent=1).encode() + b"\n")
    directory = os.open(out, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
