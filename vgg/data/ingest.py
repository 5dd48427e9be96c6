"""Ingest raw ILSVRC-2012 (archives or extracted, `vgg.data.imagenet`) into WebDataset shards, an index and the
training set's colour statistics: the shard format of `vgg.data.shard_format`, which the loaders read (brief:
"Shards on disk").

OUT/ after `ingest(RAW, OUT, ...)`:
- `train-000000.tar`…, `val-000000.tar`…: WebDataset samples `<key>.cls` (ASCII class index, sorted-WNID order),
  `<key>.jpg` (RGB JPEG), `<key>.json` (`{"wnid", "source": file name, "size": [w, h] of the original}`), with
  `key` the source file's stem. The original JPEG bytes are kept unless the file is not an RGB JPEG (PNG, CMYK,
  grayscale, … → converted to RGB, listed in index.json "converted") or its smallest side exceeds `max_side`
  (resized once so the smallest side is `max_side`, Lanczos after JPEG DCT-domain reduction to ≥ 2× the target,
  the same reduce-then-filter scheme as PIL's thumbnail). Re-encoding is JPEG quality 95 with 4:4:4 chroma. A file that cannot be
  decoded is left out and listed in "skipped" with the reason — never silently.
- `index.json` (written last: its presence means the output is complete), `stats.json` (see `colour_stats`);
  `.ingest.lock` (empty between runs; see "Safety").

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
existing complete output stays untouched. Re-running with the same input (same images, max_side, shard_size) is a
no-op once every listed shard still has its recorded size and sha256; a damaged or missing shard makes the run
rewrite the output. OUT holding the output of a different input is refused unless `overwrite=True`.
One ingest at a time per OUT: `OUT/.ingest.lock` is held (flock) for the whole run, and a second one is refused in
one line. Only files the project wrote are ever replaced or deleted: those the previous index.json lists and those
the lock file records as being written by a run that was killed; any other file in the way is named, not touched.

Bad input files: only Pillow's JPEG and PNG decoders run (never EPS through Ghostscript or any other plugin); a
file over MAX_FILE_BYTES or MAX_PIXELS, one no decoder accepts, one whose decoder fails in any way, one too large
to re-encode, or one that cannot be read is skipped: left out, listed in index.json "skipped" with the reason,
and named in the summary line. The ingest goes on.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import secrets
import shutil
import tarfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vgg.data.imagenet import SPLITS, RawImageNet, RawRef, open_raw, open_regular, read_range
from vgg.data.shard_format import (INDEX_FILE, JPEG, LABEL, META, SHARD_NAME, STATS_FILE, ColourStats, Shard,
                                   ShardIndex, Split, encode_index, encode_stats, json_bytes, shard_file)
from vgg.errors import ConfigError, DataError
from vgg.files import NO_SPACE, file_sha256, write_atomic, write_error

INGEST_VERSION = 2  # bump when the bytes ingestion writes change; part of the source fingerprint (2: only JPEG/PNG
# decoded, pixel and byte caps, shard sizes in index.json)
JPEG_QUALITY = 95  # re-encoding (conversions, resizes), with 4:4:4 chroma
SHUFFLE_SEED = 0  # the one fixed permutation of the training images before sharding
STATS_STRIDE = 4  # colour statistics use every 4th pixel in each direction (1/16 of the pixels)
MTIME = 1_335_830_400  # fixed tar header mtime (2012-05-01 UTC): byte-identical shards
DECODERS = ("JPEG", "PNG")  # the only Pillow plugins ever run on raw files (the real ones are all JPEG, one PNG)
# Pixel cap, checked on the header before decoding. A PNG cannot be decoded at a reduced scale, so one image costs
# 4 B per pixel (RGBA) and again 3 B after conversion: 64 Mi pixels (8192 x 8192, 67.1 M) bound that to ~470 MB
# per worker, and admit any camera photograph (a 50 MP sensor is 8688 x 5792 = 50.3 M). Pillow's own
# decompression-bomb check (89.5 M pixels) stays on too, as an error for the file rather than a warning.
MAX_PIXELS = 64 * 2**20
# Byte cap per raw file, checked before reading it: a file's bytes are held in memory while it is decoded. A JPEG
# under MAX_PIXELS is at most a few tens of MB even at quality 100.
MAX_FILE_BYTES = 128 * 2**20
JPEG_MAX_SIDE = 65_500  # libjpeg cannot encode a larger side; the check avoids its message on stderr
LOCK_FILE = ".ingest.lock"
SUMMARY_NAMES = 5  # skipped files named in the summary line; index.json lists them all


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
    skipped_names: tuple[str, ...] = ()  # file names of the skipped images (reasons in index.json "skipped")
    repaired: tuple[str, ...] = ()  # why an output of the same input was rewritten (a damaged or missing file)

    @property
    def images_per_s(self) -> float:
        return sum(self.counts.values()) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        images = " + ".join(f"{self.counts[split]} {split}" for split in SPLITS)
        shards = " + ".join(str(self.shards[split]) for split in SPLITS)
        skipped = f"{self.skipped} skipped"
        if self.skipped:
            names = ", ".join(self.skipped_names[:SUMMARY_NAMES])
            more = f" and {self.skipped - SUMMARY_NAMES} more" if self.skipped > SUMMARY_NAMES else ""
            skipped += f": {names}{more}, reasons in {self.out / INDEX_FILE} \"skipped\""
        if self.up_to_date:
            return f"up to date: {self.out} already holds {images} images in {shards} shards from this input ({skipped})"
        repaired = f"; rewritten because {self.repaired[0]}" if self.repaired else ""
        return (
            f"ingested {images} images into {shards} shards in {self.out} ({self.converted} converted, "
            f"{self.resized} resized, {skipped}) in {self.seconds:.1f} s ({self.images_per_s:.0f} images/s){repaired}"
        )


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
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT {out} exists and is not a directory; choose a directory for the shards")
    if out.is_dir():  # refuse a foreign OUT before creating anything in it (not even the lock file)
        _check_out(out, _previous_index(out), _Lock.peek(out), source, overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(out, error, option="OUT") from None
    with _Lock(out) as lock:
        record, previous = lock.record, _previous_index(out)  # again: another run may have written meanwhile
        _remove_staging(out, record)
        repaired: list[str] = []
        if previous is not None and previous.get("source") == source:
            repaired = _damaged(out, previous)
            if not repaired:
                lock.keep = False  # whatever a killed run recorded is listed in this index or was removed
                return _report_from_index(out, previous, seconds=time.perf_counter() - started)
        _check_out(out, previous, record, source, overwrite=overwrite)
        owned = _owned(previous, record)
        staging = out / f".ingest-{os.getpid()}-{secrets.token_hex(4)}"
        lock.write({"pid": os.getpid(), "staging": staging.name, "files": record.get("files", [])})
        try:
            staging.mkdir()
        except OSError as error:
            raise write_error(out, error, option="OUT") from None
        try:
            tasks = [task for split in SPLITS for task in _plan(dataset, split, refs[split], staging, max_side, shard_size)]
            _check_in_the_way(out, [task.file for task in tasks], owned, previous, overwrite=overwrite)
            results = _run(tasks, workers=workers, progress=progress, total=sum(len(r) for r in refs.values()))
            by_split = {split: [r for t, r in zip(tasks, results) if t.file.startswith(f"{split}-") and r.count] for split in SPLITS}
            skipped = sorted(s for r in results for s in r.skipped)
            for split in SPLITS:
                if not by_split[split]:
                    example = next((f"{name} ({why})" for t, r in zip(tasks, results) if t.file.startswith(f"{split}-")
                                    for name, why in r.skipped), "")
                    raise DataError(
                        f"no images left in {split} of {raw}: all {len(refs[split])} were skipped, e.g. {example}; "
                        "fix or replace those files"
                    )
            stats = colour_stats(by_split["train"])
            index = ShardIndex(
                root=out,
                classes=tuple(dataset.classes),
                names=tuple(dataset.names),
                max_side=max_side,
                splits={
                    split: Split(
                        count=sum(r.count for r in by_split[split]),
                        shards=tuple(Shard(file=r.file, path=out / r.file, count=r.count, sha256=r.sha256,
                                           bytes=r.bytes_written) for r in by_split[split]),
                    )
                    for split in SPLITS
                },
                source=source,
                converted=tuple({"name": n, "reason": why} for n, why in sorted(c for r in results for c in r.converted)),
                skipped=tuple({"name": n, "reason": why} for n, why in skipped),
            )
            write_atomic(staging / STATS_FILE, encode_stats(stats))
            _publish(out, staging, [r.file for split in SPLITS for r in by_split[split]], index, owned=owned, lock=lock)
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
        counts={split: index.splits[split].count for split in SPLITS},
        shards={split: len(by_split[split]) for split in SPLITS},
        converted=len(index.converted),
        resized=sum(r.resized for r in results),
        skipped=len(index.skipped),
        bytes_read=sum(r.bytes_read for r in results),
        bytes_written=sum(r.bytes_written for r in results),
        seconds=time.perf_counter() - started,
        skipped_names=tuple(name for name, _ in skipped),
        repaired=tuple(repaired),
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
        index = json.loads((out / INDEX_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _listed(index: dict[str, Any] | None) -> list[str]:
    """Shard file names an index lists ([] for an unreadable one)."""
    try:
        return [str(shard["file"]) for split in SPLITS for shard in index["splits"][split]["shards"]]  # type: ignore[index]
    except (KeyError, TypeError):
        return []


def _damaged(out: Path, index: dict[str, Any]) -> list[str]:
    """What is wrong with a complete-looking output of this input: missing files, or shards whose size or sha256
    is not the recorded one (truncated, overwritten, bit rot). [] when every byte is as ingest wrote it: reads
    every shard (about 1.3 GB/s here; 22 MB for the small profile)."""
    files = _listed(index)
    if not files:
        return ["index.json lists no shards"]
    if not (out / STATS_FILE).is_file():
        return ["stats.json is missing"]
    entries = {str(shard["file"]): shard for split in SPLITS for shard in index["splits"][split]["shards"]}
    for name in files:
        path, entry = out / name, entries[name]
        if not path.is_file():
            return [f"{name} is missing"]
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            return [f"{name} has {path.stat().st_size} bytes, not the {entry['bytes']} recorded (truncated or damaged)"]
        if file_sha256(path) != entry.get("sha256"):
            return [f"{name} does not match its sha256 in index.json (damaged)"]
    return []


def _owned(previous: dict[str, Any] | None, record: dict[str, Any]) -> set[str]:
    """Names in OUT that the project wrote: what the previous index lists (with index.json and stats.json) and what
    the lock file records a killed run was publishing."""
    owned = {name for name in record.get("files", []) if isinstance(name, str) and SHARD_NAME.fullmatch(name)}
    if record.get("files"):
        owned |= {INDEX_FILE, STATS_FILE}
    listed = _listed(previous)
    if listed:
        owned |= {name for name in listed if SHARD_NAME.fullmatch(name)} | {INDEX_FILE, STATS_FILE}
    return owned


def _check_out(
    out: Path, previous: dict[str, Any] | None, record: dict[str, Any], source: dict[str, Any], *, overwrite: bool
) -> None:
    if overwrite:
        return
    if previous is not None:
        old = previous.get("source")
        if old == source:  # same input, but files are missing or damaged: re-ingesting is safe
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
    ours = _owned(previous, record) | {LOCK_FILE, str(record.get("staging"))}
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in ours)
    if foreign:
        raise DataError(
            f"{out} is not empty and not an ingest output (e.g. {foreign[0]!r}); choose an empty or new OUT, "
            "or pass overwrite (--overwrite) to write the shards beside those files"
        )


def _check_in_the_way(
    out: Path, shards: list[str], owned: set[str], previous: dict[str, Any] | None, *, overwrite: bool
) -> None:
    """Refuse to replace a file the project did not write: a shard name, stats.json or index.json that no index or
    lock record lists. (An unreadable index.json is replaced only with overwrite, which `_check_out` asked for.)"""
    mine = owned | ({INDEX_FILE} if previous is not None and overwrite else set())
    blocking = [name for name in [*shards, STATS_FILE, INDEX_FILE] if name not in mine and os.path.lexists(out / name)]
    if blocking:
        more = f" and {len(blocking) - 1} more" if len(blocking) > 1 else ""
        raise DataError(
            f"{out / blocking[0]}{more} would be replaced, but no index.json or ingest record of {out} lists them "
            "(not written by `vgg ingest` there), so they are not touched; move them away or choose another OUT"
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
        skipped_names=tuple(str(item.get("name")) for item in index.get("skipped", [])),
    )


class _Lock:
    """`OUT/.ingest.lock`, flock-ed for a whole ingest: a second ingest into the same OUT is refused in one line
    (waiting silently behind a multi-hour ImageNet ingest would look like a hang). The file also records, as JSON,
    what its holder is writing — `pid`, its `staging` folder and the shard `files` it may publish — so that after a
    run is killed the next one knows those files are the project's own (and nothing else). flock, not fcntl
    record locks: closing another descriptor of the file in this process does not drop it."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self.record: dict[str, Any] = {}
        self.keep = False  # the record names files in OUT that no index.json lists yet: keep it if the run fails
        self._handle = -1

    @staticmethod
    def peek(out: Path) -> dict[str, Any]:
        """The record in OUT's lock file, {} if none or unreadable (read without the lock: checks only)."""
        try:
            value = json.loads((out / LOCK_FILE).read_bytes() or b"{}")
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def __enter__(self) -> _Lock:
        try:
            self._handle = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise write_error(self.path.parent, error, option="OUT") from None
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._handle)
            holder = self.peek(self.path.parent).get("pid")
            raise DataError(
                f"another `vgg ingest`{f' (pid {holder})' if holder else ''} is using {self.path.parent}; wait for it "
                "to finish, or choose another OUT"
            ) from None
        self.record = self.peek(self.path.parent)
        self.keep = bool(self.record.get("files"))  # a run killed while publishing
        return self

    def write(self, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True).encode()
        os.ftruncate(self._handle, 0)
        os.pwrite(self._handle, data, 0)
        os.fsync(self._handle)

    def __exit__(self, *exc: object) -> None:
        try:
            # A run that ended, or failed before publishing (its staging folder is gone), leaves nothing to recover:
            # the file goes back to empty, so OUT's bytes stay a function of the input (no pid, no random name).
            if not self.keep and os.fstat(self._handle).st_size:
                os.ftruncate(self._handle, 0)
        finally:
            os.close(self._handle)  # releases the flock


def _remove_staging(out: Path, record: dict[str, Any]) -> None:
    """The staging folder a killed run recorded in the lock file (only that one: a name is not proof of ownership)."""
    name = record.get("staging")
    if isinstance(name, str) and re.fullmatch(r"\.ingest-\d+-[0-9a-f]{8}", name) and (out / name).is_dir():
        shutil.rmtree(out / name, ignore_errors=True)


# ---- planning and running -------------------------------------------------------------------------------------


def _plan(
    dataset: RawImageNet, split: str, refs: tuple[RawRef, ...], staging: Path, max_side: int, shard_size: int
) -> list[_Task]:
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(refs)) if split == "train" else np.arange(len(refs))
    chunks = np.array_split(order, math.ceil(len(refs) / shard_size))
    return [
        _Task(root=str(dataset.root), staging=str(staging), file=shard_file(split, number),
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
                if ref.size > MAX_FILE_BYTES:
                    result.skipped.append((ref.name, f"{ref.size} bytes, over the per-file cap of {MAX_FILE_BYTES} (MAX_FILE_BYTES)"))
                    continue
                try:
                    if ref.path not in files:
                        files[ref.path] = open_regular(root / ref.path)
                    data = read_range(files[ref.path], ref, root=root)
                except OSError as error:  # one unreadable file (permissions, I/O error) is skipped like an undecodable one
                    result.skipped.append((ref.name, f"cannot read {ref.path}: {error.strerror or error}"))
                    continue
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
                for extension, payload in ((LABEL, str(ref.label).encode()), (JPEG, jpeg), (META, json_bytes(meta))):
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
    """(JPEG bytes to store, the RGB image they decode to, original (w, h), why converted or "", resized?).
    Any failure of the decoders or the encoder is `_Undecodable`: the file is skipped, the ingest goes on."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's cap: an error for this file
            image = Image.open(io.BytesIO(data), formats=DECODERS)
            size = image.size
            if size[0] * size[1] > MAX_PIXELS:
                raise _Undecodable(f"{size[0]}x{size[1]} px, over the cap of {MAX_PIXELS} pixels (MAX_PIXELS)")
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
            resized = min(size) > max_side
            target = _target_size(size, max_side) if resized else size
            if (converted or resized) and max(target) > JPEG_MAX_SIDE:
                raise _Undecodable(f"too large to re-encode as JPEG: {target[0]}x{target[1]} px, a side over {JPEG_MAX_SIDE}")
            if resized:
                image.draft(image.mode, (2 * target[0], 2 * target[1]))  # JPEG DCT scaling; a no-op for others
            image.load()
            rgb = image.convert("RGB")
            if resized:
                rgb = rgb.resize(target, Image.LANCZOS)
            if not converted and not resized:
                return data, rgb, size, "", False
            encoded = io.BytesIO()
            rgb.save(encoded, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: colour detail at small sides
            stored = Image.open(encoded, formats=["JPEG"])  # the statistics are of what the loader will decode
            stored.load()
            return encoded.getvalue(), stored, size, converted, resized
    except _Undecodable:
        raise
    except UnidentifiedImageError:
        raise _Undecodable(f"not a JPEG or PNG file (it begins {data[:8]!r}); only those formats are decoded") from None
    except Exception as error:  # decoders raise many types (OSError, SyntaxError, struct.error, MemoryError, ...)
        text = str(error).strip()
        raise _Undecodable(f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__) from None


def _target_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(w, h) with the smallest side exactly `max_side`, the other scaled isotropically (rounded)."""
    width, height = size
    if width <= height:
        return max_side, max(max_side, round(height * max_side / width))
    return max(max_side, round(width * max_side / height)), max_side


# ---- writing --------------------------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member with fixed header fields (byte-identical shards). `webdataset.TarWriter(user="", group="",
    mode=0o644, mtime=MTIME, encoder=False)` writes the same bytes, but importing webdataset imports torch, which
    every spawned ingest worker would then load for nothing: ingest otherwise never imports torch."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _publish(
    out: Path, staging: Path, files: list[str], index: ShardIndex, *, owned: set[str], lock: _Lock
) -> None:
    """Move a finished output into OUT: record in the lock file what is about to land (a kill from here on leaves
    only recorded files), invalidate the old index, rename shards and stats.json into place, drop the project's
    own shards that the new output lacks, and put index.json last (its presence = complete)."""
    write_atomic(staging / INDEX_FILE, encode_index(index))  # the last write that can fail
    lock.keep = True
    lock.write({"pid": os.getpid(), "staging": staging.name, "files": sorted(name for name in owned | set(files) if SHARD_NAME.fullmatch(name))})
    (out / INDEX_FILE).unlink(missing_ok=True)
    for name in [*files, STATS_FILE]:
        os.replace(staging / name, out / name)
    for name in sorted(owned - set(files)):
        if SHARD_NAME.fullmatch(name):
            (out / name).unlink(missing_ok=True)
    os.replace(staging / INDEX_FILE, out / INDEX_FILE)
    directory = os.open(out, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    lock.keep = False
