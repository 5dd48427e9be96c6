"""The batch builders that dataloader workers run (the plan they follow: `vgg.data.loader`): `TrainStream` reads
its worker's runs of shards interleaved through a shuffle buffer, skipping without decoding up to the first batch
to yield (exact resume), and augments each sample from its own generator (`SampleRandom`); `ValStream` reads its
runs in order. Both build images in the worker's pooled buffers (`vgg.data.batch_buffers`)."""

from __future__ import annotations

import hashlib
import random
from collections import deque
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vgg.data.batch import Batch, RawBatch
from vgg.data.batch_buffers import BatchBuffers, Leased
from vgg.data.preprocessing import ALPHA_STD
from vgg.data.samples import jpeg_and_label
from vgg.data.shard_format import JPEG, LABEL, Shard
from vgg.data.tar_reader import read_tar
from vgg.data.transforms import CentreCrop, TrainCrop
from vgg.errors import DataError

SHUFFLE_BUFFER = 1000  # samples per worker (~100 MB of ImageNet JPEGs at max_side 512)
OPEN_SHARDS = 4  # shards a worker reads interleaved, so its stream mixes more than one shard at a time
_TRAIN_FIELDS = frozenset([JPEG, LABEL])  # tar members the batch streams read; others are seeked over

Run = tuple[Shard, int, int]  # samples [first, end) of one shard
Item = tuple[Shard, str, dict[str, bytes]]  # a sample read for a batch: its shard, key and members


def _read_runs(runs: Iterable[Run], wanted: frozenset[str]) -> Iterator[Item]:
    """The samples of one run after another, failing when a shard holds fewer samples than its index entry."""
    for shard, lo, hi in runs:
        seen = lo
        for key, fields in read_tar(shard.path, start=lo, stop=hi, wanted=wanted):
            seen += 1
            yield shard, key, fields
        if seen != hi:
            raise DataError(
                f"{shard.path}: holds fewer samples than index.json says ({shard.count}); re-run `vgg ingest`"
            )


def _interleaved(runs: Sequence[Run], rng: random.Random) -> Iterator[Item]:
    """Samples of `runs`, drawn at random from up to `OPEN_SHARDS` runs read at once."""
    pending, open_runs = deque(runs), []
    while pending or open_runs:
        while pending and len(open_runs) < OPEN_SHARDS:
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


class SampleRandom:
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


class TrainStream(IterableDataset):
    """One rank's training batches of an epoch, worker by worker (the plan: `vgg.data.loader.train_batches`)."""

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
        buffers: BatchBuffers,
    ) -> None:
        self.segments, self.counts, self.transform = segments, counts, transform
        self.batch_size, self.classes, self.seed, self.epoch, self.rank = batch_size, classes, seed, epoch, rank
        self.start_batch, self.decode, self.buffers = start_batch, decode, buffers

    def __len__(self) -> int:
        return sum(self.counts) - self.start_batch

    def __iter__(self) -> Iterator[Batch | Leased | RawBatch]:
        info = get_worker_info()
        lanes = len(self.counts)
        # Rotate so that this epoch's batch `start_batch` comes from the worker torch asks first.
        lane = (self.start_batch + (info.id if info else 0)) % lanes
        skip = max(0, -(-(self.start_batch - lane) // lanes))  # this lane's batches before start_batch
        if info is None and lanes != 1 or info is not None and info.num_workers != lanes:
            raise RuntimeError("a TrainStream must run with the number of workers it was planned for")
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{lane}")
        samples = _shuffled(_interleaved(self.segments[lane], rng), rng, SHUFFLE_BUFFER)
        sample_random = SampleRandom(seed=self.seed, epoch=self.epoch)
        for number in range(self.counts[lane]):
            chunk = [next(samples) for _ in range(self.batch_size)]
            if number >= skip:
                yield self._batch(chunk, sample_random) if self.decode else self._raw_batch(chunk, sample_random)

    def _raw_batch(self, chunk: list[Item], sample_random: SampleRandom) -> RawBatch:
        jpegs, labels = [], []
        draws = np.empty((len(chunk), 4), dtype=np.float64)
        colour = np.empty((len(chunk), 3), dtype=np.float32)
        for i, (shard, key, fields) in enumerate(chunk):
            jpeg, label = jpeg_and_label(shard, key, fields, self.classes)
            rng = sample_random(key)
            draws[i] = rng.random(4)  # TrainCrop's one draw, then the alpha: the same values as the CPU path
            colour[i] = rng.normal(0.0, ALPHA_STD, 3)
            jpegs.append(jpeg)
            labels.append(label)
        return RawBatch(jpegs, torch.from_numpy(draws), torch.tensor(labels, dtype=torch.int64),
                        torch.from_numpy(colour))

    def _batch(self, chunk: list[Item], sample_random: SampleRandom) -> Batch | Leased:
        images, slot = self.buffers.take(len(chunk))
        colour = np.empty((len(chunk), 3), dtype=np.float32)
        labels = []
        for i, (shard, key, fields) in enumerate(chunk):
            jpeg, label = jpeg_and_label(shard, key, fields, self.classes)
            rng = sample_random(key)
            try:
                images[i] = self.transform(jpeg, rng).permute(1, 2, 0)
            except DataError as error:
                raise DataError(f"{shard.path}: sample {key}: {error}") from None
            colour[i] = rng.normal(0.0, ALPHA_STD, 3)
            labels.append(label)
        batch = Batch(images.permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64), torch.from_numpy(colour))
        return self.buffers.ship(batch, slot)


class ValStream(IterableDataset):
    """One rank's validation batches, each worker its planned runs in order (`vgg.data.loader.val_batches`)."""

    def __init__(
        self, *, segments: list[list[Run]], transform: CentreCrop, batch_size: int, classes: int, buffers: BatchBuffers
    ) -> None:
        self.segments, self.transform, self.batch_size, self.classes = segments, transform, batch_size, classes
        self.buffers = buffers

    def __iter__(self) -> Iterator[Batch | Leased]:
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

    def _batch(self, chunk: list[Item]) -> Batch | Leased:
        images, slot = self.buffers.take(len(chunk))
        labels = []
        for i, (shard, key, fields) in enumerate(chunk):
            jpeg, label = jpeg_and_label(shard, key, fields, self.classes)
            try:
                images[i] = self.transform(jpeg).permute(1, 2, 0)
            except DataError as error:
                raise DataError(f"{shard.path}: sample {key}: {error}") from None
            labels.append(label)
        colour = torch.zeros((len(chunk), 3), dtype=torch.float32)
        batch = Batch(images.permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64), colour)
        return self.buffers.ship(batch, slot)
