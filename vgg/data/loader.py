"""The training and validation batches of a shards directory (`vgg.data.shard_format`), rank- and worker-aware:
`train_batches` and `val_batches` plan which samples each rank and dataloader worker reads, and return `Batches`;
the workers run `vgg.data.streams`, which read the tars with `vgg.data.tar_reader`: it seeks over the data of
members and samples that are not needed, so skipping is cheap and skipped samples are never decoded.

Why not `webdataset`'s own pipeline (its `WebDataset` reads the same tars): it splits a split among ranks and
workers by whole shards, so ranks get unequal sample counts, and it can only resume mid-epoch by reading every
byte up to the resume point. The plan below needs sample-exact ranges and a skip that reads headers only.
`benchmarks/input_pipeline.py` measures the two readers side by side.

Training epoch plan (`train_batches`), computed identically on every rank from (seed, epoch):
1. The split's shards are put in an epoch-seeded order and read as one stream of samples.
2. Rank r takes samples [r·n, (r+1)·n) of that stream, n = total // world_size: disjoint, equal-sized; the
   last total % world_size samples of the stream are dropped (different ones each epoch, as the shard order
   changes).
3. Each rank yields exactly `batches_per_epoch` = n // batch_size batches (drop_last; the rank's last
   n % batch_size samples are dropped), so DDP ranks never wait on one another.
4. Dataloader worker w of W builds batches w, w+W, w+2W, … (torch's DataLoader returns workers' batches
   round-robin); it reads its own contiguous run of the rank's stream — whole shards, except at its ends —
   interleaving up to `streams.OPEN_SHARDS` shards and passing samples through a `streams.SHUFFLE_BUFFER`
   shuffle buffer, both seeded by (seed, epoch, rank, w). The batch order therefore depends on the number of
   workers, but the set of samples of a rank does not.
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

import math
import queue
import random
import threading
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset

from vgg.config import ScaleRange
from vgg.data.batch import Batch, RawBatch
from vgg.data.batch_buffers import PREFETCH, BatchBuffers, Leased
from vgg.data.gpu_decode import DeviceTrainCrop
from vgg.data.shard_format import Shard, ShardIndex, check_shards, read_index
from vgg.data.streams import Run, TrainStream, ValStream
from vgg.data.transforms import CentreCrop, TrainCrop, preload_decoder
from vgg.errors import ConfigError, DataError


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
    tensor of the batch (`BatchBuffers`): copy the images before handing them to another process."""

    def __init__(
        self,
        dataset: IterableDataset,
        *,
        workers: int,
        length: int,
        buffers: BatchBuffers,
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
            prefetch_factor=PREFETCH if workers else None,
            persistent_workers=False,  # each iteration's workers get fresh buffer flags (`BatchBuffers.renew`)
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

    def _handing_back(self, items: Iterator[Batch | Leased], in_use: Tensor | None) -> Iterator[Batch]:
        """The workers' batches; each leased buffer goes back to its worker (`in_use`: their flags) once no tensor
        views it any more (a pinned copy's at once: the copy is complete when it arrives)."""
        held: list[tuple[StorageWeakRef, Leased]] = []
        for item in items:
            for entry in [entry for entry in held if entry[0].expired()]:
                held.remove(entry)
                BatchBuffers.give_back(entry[1], in_use)
            if isinstance(item, Leased):
                if item.batch.images.is_pinned():  # a copy (whatever made torch pin it): the buffer is free already
                    BatchBuffers.give_back(item, in_use)
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

    buffers = BatchBuffers(workers=workers, images=(batch_size, crop, crop, 3))
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
    dataset = TrainStream(
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
    buffers = BatchBuffers(workers=workers, images=(batch_size, crop, crop, 3))
    index = read_index(shards_dir)
    split = index.split("val")
    first, last = rank * split.count // world_size, (rank + 1) * split.count // world_size
    batches = math.ceil((last - first) / batch_size)
    lanes = max(workers, 1)
    bounds = [min(first + lane * batches // lanes * batch_size, last) for lane in range(lanes + 1)]
    segments = [_segments(list(split.shards), start, stop) for start, stop in zip(bounds, bounds[1:])]
    check_shards(dict.fromkeys(shard for runs in segments for shard, _, _ in runs), index.root)  # what this rank reads
    dataset = ValStream(
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
