"""Where dataloader workers build their batches' images: a pool of shared-memory buffers per worker, leased for a
batch and given back by the consuming process once nothing views the batch (see `BatchBuffers`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from vgg.data.batch import Batch

PREFETCH = 2  # batches each dataloader worker prepares ahead (torch's default)
# Image buffers a worker reuses: one in each prefetch place, one the consumer is using, one it has not yet dropped
# while it asks for the next (`for batch in batches` keeps the last one until rebound). A consumer that holds more
# (gradient accumulation without pinned memory) makes workers take one-off buffers for the rest: slower, as safe.
POOL = PREFETCH + 2


class Leased(NamedTuple):
    """A batch whose images lie in a worker's pooled buffer, and where to give that buffer back."""

    batch: Batch | None
    worker: int
    slot: int


class BatchBuffers:
    """Where the loader builds its batches' images: in this process, a fresh tensor per batch; in a dataloader
    worker, shared memory, as torch's own collate does, so that a batch goes to the consuming process as a handle
    rather than copied into shared memory when pickled.

    A fresh shared segment per batch costs its page faults and zeroing on first write (~150 µs per 224² image
    here, 15% of a decode), so each worker reuses up to `POOL` segments: it leases a free slot for a batch
    (`take`), and the consuming process gives the slot back (`give_back`, from `Batches`) once no tensor views the
    batch any more, by a flag in shared memory made before the workers start (`renew`, anew for each iteration's
    workers: two iterations of one loader never share flags). When every slot is still held (a consumer that keeps
    its batches), the worker takes a one-off segment: a buffer is never refilled while anything can still read
    it. Shared memory in use: up to `POOL` batches' images per worker for the epoch (4 × 32 × 224² × 3 B ≈ 19 MB
    at batch 32), up to about twice what fresh segments held at a time: size /dev/shm for it in containers."""

    def __init__(self, *, workers: int, images: tuple[int, ...]) -> None:
        self.images = images  # a full batch's images: (N, crop, crop, 3)
        self._workers = workers
        self._in_use: Tensor | None = None  # [worker, slot] lease flags of the latest iteration's workers
        self._pool: list[torch.UntypedStorage] = []  # this worker's segments, by slot

    def renew(self) -> Tensor | None:
        """Fresh flags for the workers about to start (forked or pickled after this call); None without workers."""
        self._in_use = torch.zeros((self._workers, POOL), dtype=torch.uint8).share_memory_() if self._workers else None
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
        if slot is None and len(self._pool) < POOL:
            slot = len(self._pool)
            self._pool.append(torch.UntypedStorage._new_shared(math.prod(self.images)))
        if slot is None:
            storage = torch.UntypedStorage._new_shared(math.prod(shape))
        else:
            storage, in_use[slot] = self._pool[slot], 1
        return torch.empty(0, dtype=torch.uint8).set_(storage)[: math.prod(shape)].view(shape), slot

    def ship(self, batch: Batch, slot: int | None) -> Batch | Leased:
        """What a worker yields for `batch`, built in `take`'s buffer of `slot`."""
        return batch if slot is None else Leased(batch, get_worker_info().id, slot)

    @staticmethod
    def give_back(leased: Leased, in_use: Tensor) -> None:
        """Return a leased slot to its worker, by the flags (`renew`) of the workers that leased it."""
        in_use[leased.worker, leased.slot] = 0
