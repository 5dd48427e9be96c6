"""The reading side of the shard contract: index and statistics, sample iteration, and the training and
validation batch streams (rank- and worker-aware), plus the on-device `Preprocess`.

On disk (written by `vgg ingest`, `vgg.data.shards`): `index.json`, `stats.json` and WebDataset tars whose
samples are consecutive members `KEY.jpg`, `KEY.cls` (ASCII class index), `KEY.json` (metadata). Tars are
read with a small streaming header parser (no extraction to disk): it seeks over the data of members and
samples that are not needed, so skipping is cheap and skipped samples are never decoded.

Training epoch plan (`train_batches`), computed identically on every rank from (seed, epoch):
1. The split's shards are put in an epoch-seeded order and read as one stream of samples.
2. Rank r takes samples [r·n, (r+1)·n) of that stream, n = total // world_size: disjoint, equal-sized; the
   last total % world_size samples of the stream are dropped (different ones each epoch, as the shard order
   changes).
3. Each rank yields exactly `batches_per_epoch` = n // batch_size batches (drop_last; the rank's last
   n % batch_size samples are dropped), so DDP ranks never wait on one another.
4. Dataloader worker w of W builds batches w, w+W, w+2W, … (torch's DataLoader returns workers' batches
   round-robin); it reads its own contiguous run of the rank's stream — whole shards, except at its ends —
   interleaving up to `_OPEN_SHARDS` shards and passing samples through a `_SHUFFLE_BUFFER` shuffle buffer,
   both seeded by (seed, epoch, rank, w). The batch order therefore depends on the number of workers, but the
   set of samples of a rank does not.
5. Each sample's augmentation (S, crop position, flip, PCA alpha) comes from a generator seeded by
   (seed, epoch, key): it does not depend on the rank or worker layout.
6. Decode: in the dataloader workers (CPU, `TrainCrop`), or — `decode_device` given — on the training device in
   the consuming process (`DeviceTrainCrop`; nvJPEG on CUDA): workers then only read JPEG bytes and draw each
   sample's uniforms from the same per-sample generator, so both paths make the same S, window, flip and alpha.
7. `start_batch` resumes mid-epoch exactly: workers replay their stream up to the first batch to yield,
   reading but not decoding the skipped samples, and rotate so batch `start_batch` comes first.

Mixing within an epoch relies on the writer having shuffled samples across shards (a shard holding one class
would give batches of few classes); `vgg ingest` writes shards in a seeded random order.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import random
import threading
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vgg.config import ScaleRange
from vgg.data.gpu_decode import DeviceTrainCrop
from vgg.data.transforms import CentreCrop, TrainCrop, preload_decoder
from vgg.errors import ConfigError, DataError
from vgg.files import file_sha256

INDEX_FILE = "index.json"
STATS_FILE = "stats.json"
INDEX_FORMAT = 1
ALPHA_STD = 0.1  # std of the PCA lighting coefficients (AlexNet, cited in §3.1)
_SHUFFLE_BUFFER = 1000  # samples per worker (~100 MB of ImageNet JPEGs at max_side 512)
_OPEN_SHARDS = 4  # shards a worker reads interleaved, so its stream mixes more than one shard at a time
_BLOCK = 512  # tar block size, bytes
_END_BLOCK = bytes(_BLOCK)


# ---------------------------------------------------------------------------------------------------- index


@dataclass(frozen=True)
class Shard:
    """One tar of a split, as listed in `index.json`."""

    file: str  # name inside the shards directory, e.g. train-000000.tar
    path: Path
    count: int  # samples
    sha256: str  # hex digest of the whole file
    bytes: int | None = None  # file size (indexes written before it was recorded have none)


@dataclass(frozen=True)
class Split:
    count: int  # samples, = sum of the shards' counts
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class ShardIndex:
    """The parsed, validated `index.json` of a shards directory."""

    root: Path
    classes: tuple[str, ...]  # WNIDs in sorted order; a label is a position in this tuple
    names: tuple[str, ...]  # human-readable class names, same order
    max_side: int  # px, the largest smallest-side kept at ingest
    splits: Mapping[str, Split]  # "train", "val"
    source: Mapping[str, Any]  # fingerprint of the raw input
    converted: tuple[Mapping[str, str], ...]  # {"name", "reason"} of images re-encoded at ingest
    skipped: tuple[Mapping[str, str], ...]  # {"name", "reason"} of images left out at ingest

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(
                f"{self.root / INDEX_FILE}: no split {name!r} (has {', '.join(sorted(self.splits)) or 'none'}); "
                f"re-run `vgg ingest`"
            )
        return self.splits[name]


def read_index(shards_dir: str | Path, *, verify: bool = False) -> ShardIndex:
    """Parse and validate `shards_dir/index.json`; every listed shard must exist and have its recorded size (a
    stat: a truncated shard is one line here, before any batch). With `verify`, also check each shard's sha256
    and sample count against the index (reads every byte)."""
    root = Path(shards_dir)
    path = root / INDEX_FILE
    raw = _read_json(path, root)
    fix = f"re-run `vgg ingest RAW {root}`"
    try:
        if raw.get("format") != INDEX_FORMAT:
            raise DataError(f"{path}: unsupported format {raw.get('format')!r} (expected {INDEX_FORMAT}); {fix}")
        classes = tuple(_typed(raw, "classes", list, path, fix))
        names = tuple(_typed(raw, "names", list, path, fix))
        if not classes or len(names) != len(classes) or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{path}: 'classes' must be a non-empty list of WNIDs with one name each; {fix}")
        splits = {}
        for split_name, entry in _typed(raw, "splits", dict, path, fix).items():
            shards = []
            for item in entry["shards"]:
                file, count, digest, size = item["file"], item["count"], item["sha256"], item.get("bytes")
                if not (isinstance(file, str) and "/" not in file and isinstance(count, int) and count >= 0
                        and isinstance(digest, str) and (size is None or isinstance(size, int))):
                    raise DataError(f"{path}: bad shard entry {item!r} in split {split_name!r}; {fix}")
                shards.append(Shard(file=file, path=root / file, count=count, sha256=digest, bytes=size))
            count = entry["count"]
            if count != sum(shard.count for shard in shards):
                raise DataError(
                    f"{path}: split {split_name!r} count {count} != sum of its shard counts "
                    f"{sum(s.count for s in shards)}; {fix}"
                )
            splits[split_name] = Split(count=count, shards=tuple(shards))
        index = ShardIndex(
            root=root,
            classes=classes,
            names=tuple(str(name) for name in names),
            max_side=int(_typed(raw, "max_side", int, path, fix)),
            splits=splits,
            source=dict(raw.get("source", {})),
            converted=tuple(raw.get("converted", ())),
            skipped=tuple(raw.get("skipped", ())),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DataError(f"{path}: missing or malformed entry ({type(error).__name__}: {error}); {fix}") from None
    for split in index.splits.values():
        for shard in split.shards:
            if not shard.path.is_file():
                raise DataError(f"{shard.path}: shard listed in {path} is missing; {fix}")
            if shard.bytes is not None and shard.path.stat().st_size != shard.bytes:
                raise DataError(
                    f"{shard.path}: damaged shard: {shard.path.stat().st_size} bytes, index.json says {shard.bytes} "
                    f"(truncated or overwritten); {fix} (it rewrites damaged shards)"
                )
            if verify:
                _verify_shard(shard, fix)
    return index


def _read_json(path: Path, root: Path) -> Any:
    if not root.is_dir():
        raise DataError(f"shards directory {root} does not exist; run `vgg ingest RAW {root}` first")
    if not path.is_file():
        raise DataError(f"{path} is missing: {root} is not a complete shards directory; run `vgg ingest RAW {root}`")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: corrupt JSON ({error}); re-run `vgg ingest RAW {root}`") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}; re-run `vgg ingest RAW {root}`")
    return value


def _typed(raw: Mapping[str, Any], key: str, kind: type, path: Path, fix: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}: key {key!r} must be a {kind.__name__}, got {type(value).__name__}; {fix}")
    return value


def check_shards(shards: Iterable[Shard], root: Path) -> None:
    """Check the sha256 of each shard against index.json before anything reads it: a damaged shard is one line
    naming it, never samples trained on or a failure mid-epoch. Each file is hashed once per process (a file
    replaced since has another inode, size or mtime and is hashed again): ~17 ms for the small profile's 22 MB of
    shards at ~1.3 GB/s; the training loaders check only their rank's share (see `train_batches`)."""
    for shard in shards:
        info = shard.path.stat()
        key = (str(shard.path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if _CHECKED.get(key) == shard.sha256:
            continue
        digest = file_sha256(shard.path)
        if digest != shard.sha256:
            raise DataError(
                f"{shard.path}: damaged shard: its sha256 {digest[:12]}… does not match index.json "
                f"({shard.sha256[:12]}…); re-run `vgg ingest RAW {root}` (it rewrites damaged shards)"
            )
        _CHECKED[key] = digest


_CHECKED: dict[tuple[str, int, int, int, int], str] = {}  # shards hashed in this process: file identity → sha256


def _verify_shard(shard: Shard, fix: str) -> None:
    digest = file_sha256(shard.path)
    if digest != shard.sha256:
        raise DataError(
            f"{shard.path}: sha256 {digest[:12]}… does not match the index ({shard.sha256[:12]}…); {fix}"
        )
    count = sum(1 for _ in _read_tar(shard.path, start=0, stop=None, wanted=frozenset()))
    if count != shard.count:
        raise DataError(f"{shard.path}: holds {count} samples, the index says {shard.count}; {fix}")


# ---------------------------------------------------------------------------------------------------- stats


@dataclass(frozen=True, eq=False)
class ColourStats:
    """Training-set RGB statistics on the 0–255 scale: the mean (subtracted, §2.1) and the eigen-decomposition
    of the RGB covariance used by the PCA colour shift (AlexNet lighting, §3.1)."""

    mean_rgb: Tensor  # float32 [3]
    eigval: Tensor  # float32 [3], descending
    eigvec: Tensor  # float32 [3, 3], column j is the eigenvector of eigval[j]


def read_stats(shards_dir: str | Path) -> ColourStats:
    """Parse and validate `shards_dir/stats.json`."""
    root = Path(shards_dir)
    path = root / STATS_FILE
    raw = _read_json(path, root)
    shapes = {"mean_rgb": (3,), "eigval": (3,), "eigvec": (3, 3)}
    values = {}
    for key, shape in shapes.items():
        try:
            value = torch.tensor(raw[key], dtype=torch.float64)
        except (KeyError, TypeError, ValueError):
            value = None
        if value is None or value.shape != shape or not torch.isfinite(value).all():
            raise DataError(
                f"{path}: {key!r} must be {'x'.join(map(str, shape))} finite numbers; re-run `vgg ingest RAW {root}`"
            )
        values[key] = value.float()
    if (values["eigval"] < 0).any():
        raise DataError(f"{path}: 'eigval' must be >= 0 (a covariance's eigenvalues); re-run `vgg ingest RAW {root}`")
    return ColourStats(**values)


# ---------------------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    key: str  # source file stem, e.g. n01440764_10026
    jpeg: bytes  # RGB JPEG
    label: int  # class index (sorted-WNID order)
    meta: dict  # {"wnid", "source", "size": [w, h]} (original size)


def iter_samples(shards_dir: str | Path, split: str) -> Iterator[Sample]:
    """Every sample of `split` in index order (shards in listed order, samples in tar order); every shard's
    sha256 is checked first (`check_shards`)."""
    index = read_index(shards_dir)
    check_shards(index.split(split).shards, index.root)
    for shard in index.split(split).shards:
        for key, fields in _read_tar(shard.path, start=0, stop=shard.count, wanted=None):
            jpeg, label = _jpeg_label(shard, key, fields, len(index.classes))
            try:
                meta = json.loads(fields["json"]) if "json" in fields else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"{shard.path}: sample {key}: corrupt json member; re-run `vgg ingest`") from None
            yield Sample(key=key, jpeg=jpeg, label=label, meta=meta)


def _jpeg_label(shard: Shard, key: str, fields: Mapping[str, bytes], classes: int) -> tuple[bytes, int]:
    if "jpg" not in fields or "cls" not in fields:
        raise DataError(f"{shard.path}: sample {key} lacks a jpg or cls member; re-run `vgg ingest`")
    try:
        label = int(fields["cls"])
    except ValueError:
        label = -1
    if not 0 <= label < classes:
        raise DataError(
            f"{shard.path}: sample {key}: class {fields['cls'][:20]!r} is not in 0..{classes - 1}; re-run `vgg ingest`"
        )
    return fields["jpg"], label


def _read_tar(
    path: Path, *, start: int, stop: int | None, wanted: frozenset[str] | None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples [start, stop) of a WebDataset tar as (key, {extension: bytes}), reading only the members whose
    extension is in `wanted` (None: all). Members of one sample are consecutive and share the key: the name up
    to the first dot of its last path component (WebDataset's rule). Handles ustar, GNU long names and pax."""
    with open(path, "rb") as file:
        index, key, fields = -1, None, {}
        offset, long_name = 0, None
        while True:
            file.seek(offset)
            header = file.read(_BLOCK)
            if len(header) < _BLOCK or header == _END_BLOCK:
                break
            if header[257:262] != b"ustar":
                raise DataError(f"{path}: not a tar archive (bad header at byte {offset}); re-run `vgg ingest`")
            size = _header_size(header, path)
            kind = header[156]
            data = offset + _BLOCK
            offset = data + -(-size // _BLOCK) * _BLOCK
            if kind in (ord("L"), ord("x")):  # GNU long name / pax extended header of the next member
                long_name = _long_name(kind, _read_exact(file, data, size, path)) or long_name
                continue
            if kind not in (ord("0"), 0):  # directories, links, global pax headers: not sample members
                long_name = None
                continue
            name = long_name or _ustar_name(header)
            long_name = None
            dot = name.find(".", name.rfind("/") + 1)
            if dot < 0:
                continue
            member_key = name[:dot]
            if member_key != key:
                if start <= index:
                    yield key, fields
                index, key, fields = index + 1, member_key, {}
                if stop is not None and index >= stop:
                    return
            if index >= start:
                extension = name[dot + 1 :].lower()
                if wanted is None or extension in wanted:
                    fields[extension] = _read_exact(file, data, size, path)
        if key is not None and start <= index:
            yield key, fields


def _header_size(header: bytes, path: Path) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes ≥ 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        raise DataError(f"{path}: corrupt tar header (size field {field!r}); re-run `vgg ingest`") from None


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")


def _long_name(kind: int, payload: bytes) -> str | None:
    if kind == ord("L"):
        return payload.rstrip(b"\0").decode("utf-8", "replace")
    for record in payload.split(b"\n"):  # pax records: "LEN key=value"
        _, _, item = record.partition(b" ")
        name, _, value = item.partition(b"=")
        if name == b"path":
            return value.decode("utf-8", "replace")
    return None


def _read_exact(file: BinaryIO, offset: int, size: int, path: Path) -> bytes:
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise DataError(f"{path}: truncated tar (member at byte {offset} is cut short); re-run `vgg ingest`")
    return data


# ---------------------------------------------------------------------------------------------------- batches


Run = tuple[Shard, int, int]  # samples [first, end) of one shard
Item = tuple[Shard, str, dict[str, bytes]]  # a sample read for a batch: its shard, key and members


class Batch(NamedTuple):
    """A batch as the loaders yield it. `images` is channels_last in memory (NHWC strides): the layout the
    decoder and the resampler produce (a transposing copy costs ~0.1 ms per 224² image) and the GPU step uses;
    `.contiguous()` gives NCHW."""

    images: Tensor  # uint8 [N, 3, crop, crop], RGB 0–255
    labels: Tensor  # int64 [N]
    colour: Tensor  # float32 [N, 3], PCA lighting alpha ~ N(0, 0.1) (zeros for validation)


class RawBatch(NamedTuple):
    """A training batch before decoding, as workers yield it when the decode runs on the device."""

    jpegs: list[bytes]
    draws: Tensor  # float64 [N, 4]: the uniforms TrainCrop draws per sample (S, left, top, flip)
    labels: Tensor  # int64 [N]
    colour: Tensor  # float32 [N, 3], PCA lighting alpha ~ N(0, 0.1)


def batches_per_epoch(index: ShardIndex, *, batch_size: int, world_size: int) -> int:
    """Batches every rank yields per training epoch: (train count // world_size) // batch_size."""
    count = index.split("train").count
    batches = count // world_size // batch_size
    if batches < 1:
        raise DataError(
            f"{index.root}: the train split has {count} samples, fewer than batch_size × world_size = "
            f"{batch_size} × {world_size}; lower the batch size or ingest more images"
        )
    return batches


class Batches:
    """One epoch's batches for this rank: `len()` is known up front; iterate once per epoch. Errors raised in a
    dataloader worker come back as one-line `DataError`s (torch wraps them in a traceback).

    With workers, a batch's images lie in a shared-memory buffer that a worker refills once this process holds no
    tensor of the batch (`_BatchBuffers`): copy the images before handing them to another process."""

    def __init__(
        self,
        dataset: IterableDataset,
        *,
        workers: int,
        length: int,
        buffers: _BatchBuffers,
        finish: Callable[[RawBatch], Batch] | None = None,
    ) -> None:
        self._buffers = buffers  # where the workers build batches' images; slots are given back here
        self._finish = finish  # turns what the workers yield into a Batch in this process (the device decode)
        if workers > 0 and finish is None:
            preload_decoder()  # loaded once here, inherited by every epoch's forked workers
        self._loader = DataLoader(
            dataset,
            batch_size=None,  # workers build whole batches
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=_PREFETCH if workers else None,
            persistent_workers=False,  # each iteration's workers get fresh buffer flags (`_BatchBuffers.renew`)
        )
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Batch]:
        in_use = self._buffers.renew()  # this iteration's workers, started next, get flags of their own
        batches = iter(self._loader)
        try:
            if self._finish is None:
                yield from self._handing_back(batches, in_use)
            else:
                yield from _ahead(map(self._finish, batches), depth=2)
            return
        except DataError as error:  # from a worker: "Caught DataError in ...\n<traceback>\nvgg.errors.DataError: msg"
            message = str(error).strip().splitlines()[-1].removeprefix(f"{DataError.__module__}.DataError: ")
            error.__traceback__ = None  # torch's re-raise leaves a reference cycle through it; break it
        del batches  # stop the workers now, not when a garbage collection finds the cycle
        raise DataError(message)

    def _handing_back(self, items: Iterator[Batch | _Leased], in_use: Tensor | None) -> Iterator[Batch]:
        """The workers' batches; each leased buffer goes back to its worker (`in_use`: their flags) once no tensor
        views it any more (a pinned copy's at once: the copy is complete when it arrives)."""
        held: list[tuple[StorageWeakRef, _Leased]] = []
        for item in items:
            for entry in [entry for entry in held if entry[0].expired()]:
                held.remove(entry)
                _BatchBuffers.give_back(entry[1], in_use)
            if isinstance(item, _Leased):
                if item.batch.images.is_pinned():  # a copy (whatever made torch pin it): the buffer is free already
                    _BatchBuffers.give_back(item, in_use)
                else:
                    held.append((StorageWeakRef(item.batch.images.untyped_storage()), item._replace(batch=None)))
                item = item.batch
            yield item


def _ahead(items: Iterator[Any], *, depth: int) -> Iterator[Any]:
    """`items` produced by a thread up to `depth` ahead of the consumer, so that the device decode of the next
    batches is queued while the current one trains. An error of the producer is raised here, in order."""
    ready: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as error:  # handed to the consumer, which raises it
            put((False, error))

    thread = threading.Thread(target=produce, name="device-decode", daemon=True)
    thread.start()
    try:
        while True:
            more, item = ready.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:  # the consumer stopped early or the producer failed: let the producer finish its item and exit
        stop.set()
        thread.join()


def train_batches(
    shards_dir: str | Path,
    *,
    scale: ScaleRange,
    crop: int,
    batch_size: int,
    rank: int,
    world_size: int,
    workers: int,
    epoch: int,
    seed: int,
    start_batch: int = 0,
    decode_device: torch.device | None = None,
) -> Batches:
    """This rank's training batches of `epoch` (see the module doc for the plan), from batch `start_batch` on.

    scale: S range (§3.1); crop: px; batch_size: images per batch on this rank; workers: dataloader worker
    processes (0 = in this process); decode_device: None decodes in the workers, else batches are decoded and
    cropped on this device as they are consumed, and their images are already there.
    """
    _check_layout(batch_size=batch_size, rank=rank, world_size=world_size, workers=workers)
    transform = TrainCrop(scale=scale, crop=crop)
    finish = None
    if decode_device is not None:
        finish = partial(_decode_on, transform=DeviceTrainCrop(scale=scale, crop=crop), device=decode_device)

    buffers = _BatchBuffers(workers=workers, images=(batch_size, crop, crop, 3))
    index = read_index(shards_dir)
    batches = batches_per_epoch(index, batch_size=batch_size, world_size=world_size)
    if not 0 <= start_batch <= batches:
        raise ConfigError(f"start_batch: must be in 0..{batches} (batches per epoch), got {start_batch}")
    shards = list(index.split("train").shards)
    # Every rank reads every shard over the epochs; the ranks share the hashing instead (rank r checks shards
    # r, r + world_size, …, once per process, before its first batch): a damaged shard stops the run at its start.
    check_shards(shards[rank::world_size], index.root)
    random.Random(f"{seed}:{epoch}:shards").shuffle(shards)
    per_rank = index.split("train").count // world_size
    lanes = max(workers, 1)
    counts = [len(range(lane, batches, lanes)) for lane in range(lanes)]  # batches of each worker lane
    starts = [rank * per_rank + sum(counts[:lane]) * batch_size for lane in range(lanes)]  # lanes' first samples
    dataset = _TrainStream(
        segments=[_segments(shards, start, start + count * batch_size) for start, count in zip(starts, counts)],
        counts=counts,
        transform=transform,
        batch_size=batch_size,
        classes=len(index.classes),
        seed=seed,
        epoch=epoch,
        rank=rank,
        start_batch=start_batch,
        decode=decode_device is None,
        buffers=buffers,
    )
    return Batches(dataset, workers=workers, length=batches - start_batch, buffers=buffers, finish=finish)


def val_batches(
    shards_dir: str | Path,
    *,
    q: int,
    crop: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
) -> Batches:
    """Validation during training (§3.2 single scale): rescale to Q, centre crop, no flip, colour zeros.

    Rank r takes samples [r·N // world_size, (r+1)·N // world_size) of the val split in index order, so every
    sample is seen exactly once overall; ranks may hold one sample more than others and so yield different
    batch counts (the last batch is partial): all-reduce the sums after the loop, never per batch. Within a
    rank, workers take contiguous runs of whole batches; the batch order is round-robin over workers.
    """
    _check_layout(batch_size=batch_size, rank=rank, world_size=world_size, workers=workers)
    transform = CentreCrop(q=q, crop=crop)
    buffers = _BatchBuffers(workers=workers, images=(batch_size, crop, crop, 3))
    index = read_index(shards_dir)
    split = index.split("val")
    first, last = rank * split.count // world_size, (rank + 1) * split.count // world_size
    batches = math.ceil((last - first) / batch_size)
    lanes = max(workers, 1)
    bounds = [min(first + lane * batches // lanes * batch_size, last) for lane in range(lanes + 1)]
    segments = [_segments(list(split.shards), start, stop) for start, stop in zip(bounds, bounds[1:])]
    check_shards(dict.fromkeys(shard for runs in segments for shard, _, _ in runs), index.root)  # what this rank reads
    dataset = _ValStream(
        segments=segments,
        transform=transform,
        batch_size=batch_size,
        classes=len(index.classes),
        buffers=buffers,
    )
    return Batches(dataset, workers=workers, length=batches, buffers=buffers)


def _decode_on(raw: RawBatch, *, transform: DeviceTrainCrop, device: torch.device) -> Batch:
    return Batch(transform(raw.jpegs, raw.draws.tolist(), device=device), raw.labels, raw.colour)


def _check_layout(*, batch_size: int, rank: int, world_size: int, workers: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank: must be in 0..world_size-1 with world_size >= 1, got rank {rank} of {world_size}")
    if workers < 0:
        raise ConfigError(f"workers: must be >= 0 (0 = in-process), got {workers}")


def _segments(shards: Sequence[Shard], start: int, stop: int) -> list[Run]:
    """Samples [start, stop) of the stream that concatenates `shards`, as (shard, first, end) runs."""
    runs, offset = [], 0
    for shard in shards:
        lo, hi = max(start - offset, 0), min(stop - offset, shard.count)
        if lo < hi:
            runs.append((shard, lo, hi))
        offset += shard.count
    return runs


def _read_runs(runs: Iterable[Run], wanted: frozenset[str]) -> Iterator[Item]:
    """The samples of one run after another, failing when a shard holds fewer samples than its index entry."""
    for shard, lo, hi in runs:
        seen = lo
        for key, fields in _read_tar(shard.path, start=lo, stop=hi, wanted=wanted):
            seen += 1
            yield shard, key, fields
        if seen != hi:
            raise DataError(
                f"{shard.path}: holds fewer samples than index.json says ({shard.count}); re-run `vgg ingest`"
            )


def _interleaved(runs: Sequence[Run], rng: random.Random) -> Iterator[Item]:
    """Samples of `runs`, drawn at random from up to `_OPEN_SHARDS` runs read at once."""
    pending, open_runs = deque(runs), []
    while pending or open_runs:
        while pending and len(open_runs) < _OPEN_SHARDS:
            open_runs.append(_read_runs([pending.popleft()], _TRAIN_FIELDS))
        pick = rng.randrange(len(open_runs))
        item = next(open_runs[pick], None)
        if item is None:
            del open_runs[pick]
        else:
            yield item


def _shuffled(items: Iterable[Any], rng: random.Random, size: int) -> Iterator[Any]:
    """A shuffle buffer of `size` items: each output is drawn uniformly from the buffer, then refilled."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        pick = rng.randrange(size)
        yield buffer[pick]
        buffer[pick] = item
    rng.shuffle(buffer)
    yield from buffer


_TRAIN_FIELDS = frozenset(["jpg", "cls"])  # tar members the batch streams read; others are seeked over
_PREFETCH = 2  # batches each dataloader worker prepares ahead (torch's default)
# Image buffers a worker reuses: one in each prefetch place, one the consumer is using, one it has not yet dropped
# while it asks for the next (`for batch in batches` keeps the last one until rebound). A consumer that holds more
# (gradient accumulation without pinned memory) makes workers take one-off buffers for the rest: slower, as safe.
_POOL = _PREFETCH + 2


class _SampleRandom:
    """Per-sample generators seeded by (seed, epoch, key): one PCG64 reseeded in place (~4 µs; building a new
    seeded Generator costs ~40 µs, a fifth of a small image's decode). The returned generator is valid until the
    next call."""

    def __init__(self, *, seed: int, epoch: int) -> None:
        self._prefix = f"{seed}:{epoch}:".encode()
        self._bits = np.random.PCG64(0)
        self._generator = np.random.Generator(self._bits)

    def __call__(self, key: str) -> np.random.Generator:
        digest = hashlib.blake2b(self._prefix + key.encode(), digest_size=32).digest()
        self._bits.state = {
            "bit_generator": "PCG64",
            "state": {"state": int.from_bytes(digest[:16], "little"), "inc": int.from_bytes(digest[16:], "little") | 1},
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._generator


class _TrainStream(IterableDataset):
    def __init__(
        self,
        *,
        segments: list[list[Run]],
        counts: list[int],
        transform: TrainCrop,
        batch_size: int,
        classes: int,
        seed: int,
        epoch: int,
        rank: int,
        start_batch: int,
        decode: bool,
        buffers: _BatchBuffers,
    ) -> None:
        self.segments, self.counts, self.transform = segments, counts, transform
        self.batch_size, self.classes, self.seed, self.epoch, self.rank = batch_size, classes, seed, epoch, rank
        self.start_batch, self.decode, self.buffers = start_batch, decode, buffers

    def __len__(self) -> int:
        return sum(self.counts) - self.start_batch

    def __iter__(self) -> Iterator[Batch | _Leased | RawBatch]:
        info = get_worker_info()
        lanes = len(self.counts)
        # Rotate so that this epoch's batch `start_batch` comes from the worker torch asks first.
        lane = (self.start_batch + (info.id if info else 0)) % lanes
        skip = max(0, -(-(self.start_batch - lane) // lanes))  # this lane's batches before start_batch
        if info is None and lanes != 1 or info is not None and info.num_workers != lanes:
            raise RuntimeError("a _TrainStream must run with the number of workers it was planned for")
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{lane}")
        samples = _shuffled(_interleaved(self.segments[lane], rng), rng, _SHUFFLE_BUFFER)
        sample_random = _SampleRandom(seed=self.seed, epoch=self.epoch)
        for number in range(self.counts[lane]):
            chunk = [next(samples) for _ in range(self.batch_size)]
            if number >= skip:
                yield self._batch(chunk, sample_random) if self.decode else self._raw_batch(chunk, sample_random)

    def _raw_batch(self, chunk: list[Item], sample_random: _SampleRandom) -> RawBatch:
        jpegs, labels = [], []
        draws = np.empty((len(chunk), 4), dtype=np.float64)
        colour = np.empty((len(chunk), 3), dtype=np.float32)
        for i, (shard, key, fields) in enumerate(chunk):
            jpeg, label = _jpeg_label(shard, key, fields, self.classes)
            rng = sample_random(key)
            draws[i] = rng.random(4)  # TrainCrop's one draw, then the alpha: the same values as the CPU path
            colour[i] = rng.normal(0.0, ALPHA_STD, 3)
            jpegs.append(jpeg)
            labels.append(label)
        return RawBatch(jpegs, torch.from_numpy(draws), torch.tensor(labels, dtype=torch.int64),
                        torch.from_numpy(colour))

    def _batch(self, chunk: list[Item], sample_random: _SampleRandom) -> Batch | _Leased:
        images, slot = self.buffers.take(len(chunk))
        colour = np.empty((len(chunk), 3), dtype=np.float32)
        labels = []
        for i, (shard, key, fields) in enumerate(chunk):
            jpeg, label = _jpeg_label(shard, key, fields, self.classes)
            rng = sample_random(key)
            try:
                images[i] = self.transform(jpeg, rng).permute(1, 2, 0)
            except DataError as error:
                raise DataError(f"{shard.path}: sample {key}: {error}") from None
            colour[i] = rng.normal(0.0, ALPHA_STD, 3)
            labels.append(label)
        batch = Batch(images.permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64), torch.from_numpy(colour))
        return self.buffers.ship(batch, slot)


class _Leased(NamedTuple):
    """A batch whose images lie in a worker's pooled buffer, and where to give that buffer back."""

    batch: Batch | None
    worker: int
    slot: int


class _BatchBuffers:
    """Where the loader builds its batches' images: in this process, a fresh tensor per batch; in a dataloader
    worker, shared memory, as torch's own collate does, so that a batch goes to the consuming process as a handle
    rather than copied into shared memory when pickled.

    A fresh shared segment per batch costs its page faults and zeroing on first write (~150 µs per 224² image
    here, 15% of a decode), so each worker reuses up to `_POOL` segments: it leases a free slot for a batch
    (`take`), and the consuming process gives the slot back (`give_back`, from `Batches`) once no tensor views the
    batch any more, by a flag in shared memory made before the workers start (`renew`, anew for each iteration's
    workers: two iterations of one loader never share flags). When every slot is still held (a consumer that keeps
    its batches), the worker takes a one-off segment: a buffer is never refilled while anything can still read
    it. Shared memory in use: up to `_POOL` batches' images per worker for the epoch (4 × 32 × 224² × 3 B ≈ 19 MB
    at batch 32), up to about twice what fresh segments held at a time: size /dev/shm for it in containers."""

    def __init__(self, *, workers: int, images: tuple[int, ...]) -> None:
        self.images = images  # a full batch's images: (N, crop, crop, 3)
        self._workers = workers
        self._in_use: Tensor | None = None  # [worker, slot] lease flags of the latest iteration's workers
        self._pool: list[torch.UntypedStorage] = []  # this worker's segments, by slot

    def renew(self) -> Tensor | None:
        """Fresh flags for the workers about to start (forked or pickled after this call); None without workers."""
        self._in_use = torch.zeros((self._workers, _POOL), dtype=torch.uint8).share_memory_() if self._workers else None
        return self._in_use

    def take(self, count: int) -> tuple[Tensor, int | None]:
        """An uninitialised uint8 tensor for the images of a batch of `count` ≤ N images, and its slot (None when it
        is not a pooled segment)."""
        shape = (count, *self.images[1:])
        info = get_worker_info()
        if info is None:
            return torch.empty(shape, dtype=torch.uint8), None
        if self._in_use is None:
            raise RuntimeError("a batch stream's workers must be started by iterating its Batches (flags: renew)")
        in_use = self._in_use[info.id].numpy()  # a view of the shared flags
        slot = next((slot for slot in range(len(self._pool)) if not in_use[slot]), None)
        if slot is None and len(self._pool) < _POOL:
            slot = len(self._pool)
            self._pool.append(torch.UntypedStorage._new_shared(math.prod(self.images)))
        if slot is None:
            storage = torch.UntypedStorage._new_shared(math.prod(shape))
        else:
            storage, in_use[slot] = self._pool[slot], 1
        return torch.empty(0, dtype=torch.uint8).set_(storage)[: math.prod(shape)].view(shape), slot

    def ship(self, batch: Batch, slot: int | None) -> Batch | _Leased:
        """What a worker yields for `batch`, built in `take`'s buffer of `slot`."""
        return batch if slot is None else _Leased(batch, get_worker_info().id, slot)

    @staticmethod
    def give_back(leased: _Leased, in_use: Tensor) -> None:
        """Return a leased slot to its worker, by the flags (`renew`) of the workers that leased it."""
        in_use[leased.worker, leased.slot] = 0


class _ValStream(IterableDataset):
    def __init__(
        self, *, segments: list[list[Run]], transform: CentreCrop, batch_size: int, classes: int, buffers: _BatchBuffers
    ) -> None:
        self.segments, self.transform, self.batch_size, self.classes = segments, transform, batch_size, classes
        self.buffers = buffers

    def __iter__(self) -> Iterator[Batch | _Leased]:
        info = get_worker_info()
        runs = self.segments[info.id if info else 0]
        chunk: list[Item] = []
        for item in _read_runs(runs, _TRAIN_FIELDS):
            chunk.append(item)
            if len(chunk) == self.batch_size:
                yield self._batch(chunk)
                chunk = []
        if chunk:
            yield self._batch(chunk)

    def _batch(self, chunk: list[Item]) -> Batch | _Leased:
        images, slot = self.buffers.take(len(chunk))
        labels = []
        for i, (shard, key, fields) in enumerate(chunk):
            jpeg, label = _jpeg_label(shard, key, fields, self.classes)
            try:
                images[i] = self.transform(jpeg).permute(1, 2, 0)
            except DataError as error:
                raise DataError(f"{shard.path}: sample {key}: {error}") from None
            labels.append(label)
        colour = torch.zeros((len(chunk), 3), dtype=torch.float32)
        batch = Batch(images.permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64), colour)
        return self.buffers.ship(batch, slot)


# ---------------------------------------------------------------------------------------------------- device


# AlexNet's lighting noise is defined on pixels scaled to [0, 1]: offset = eigvec @ (alpha · λ) with λ the eigenvalues
# of the [0, 1]-scale RGB covariance (0.2175, 0.0188, 0.0045 for ImageNet, i.e. offsets of ~0.02 ≈ 5/255). Our
# stats are on the 0–255 scale, where λ₂₅₅ = 255² · λ₀₁; the same offset in 0–255 units is 255 · eigvec @ (alpha ·
# λ₀₁) = eigvec @ (alpha · λ₂₅₅ / 255). (Using λ₂₅₅ directly would add offsets of ~±270 levels and drown the image.)
LIGHTING_SCALE = 1.0 / 255.0


class Preprocess(nn.Module):
    """uint8 images → float32 network input on the training device, 0–255 scale (as the paper/Caffe; no division
    by a std): + the PCA colour shift eigvec @ (alpha · eigval / 255) per image when `colour` (alpha) is given
    (AlexNet lighting, §3.1; see LIGHTING_SCALE), − the training-set mean RGB (§2.1, the only pre-processing).
    Keeps the input's memory format (channels_last stays channels_last). Move it to the device with the model;
    copy batches with `.to(device, non_blocking=True)` before calling it."""

    def __init__(self, stats: ColourStats) -> None:
        super().__init__()
        self.register_buffer("mean_rgb", stats.mean_rgb.detach().clone().float())
        self.register_buffer("eigval", stats.eigval.detach().clone().float() * LIGHTING_SCALE)
        self.register_buffer("eigvec", stats.eigvec.detach().clone().float())

    def forward(self, images: Tensor, colour: Tensor | None = None) -> Tensor:
        shift = -self.mean_rgb.expand(images.shape[0], 3)
        if colour is not None:
            shift = shift + (colour.float() * self.eigval) @ self.eigvec.T  # row i: eigvec @ (alpha_i * eigval)
        return images.to(torch.float32, copy=True).add_(shift[:, :, None, None])
