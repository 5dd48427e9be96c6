"""The training loop of §3.1: SGD with momentum, plateau lr schedule, dropout, exact resume.

`fit()` is pure PyTorch and rank-agnostic: the caller (a Ray Train worker, or a plain process) builds and places
the model, wraps it in DistributedDataParallel when there are several ranks, and owns every side effect through
`Hooks` (logging, which rank writes checkpoints). One optimizer step sees `config.batch_size` images in total:
`micro_batch` images per forward pass × `accumulation` passes per rank × `workers` ranks.

Determinism: the data for (seed, epoch, start_batch) is fixed by the loader; the only other randomness, dropout,
draws from torch's global generator, which `fit` reseeds from (seed, rank, optimizer step) before every step.
So a run resumed from any checkpoint continues bit-identically on CPU, on every rank, although only one rank
writes the checkpoint and no RNG state needs to be saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vgg.config import TrainConfig
from vgg.errors import CheckpointError, ConfigError, DataError, DivergenceError
from vgg.train import precision
from vgg.train.schedule import PlateauSchedule, StopReason

# A training batch: vgg.data.batch.Batch(images uint8 [N,3,H,W], labels int64 [N], colour float32 [N,3]).
BatchLike = Sequence[Tensor]


class Hooks:
    """The caller's side effects. Subclass and override; the defaults do nothing.

    Both methods are called on every rank (Ray's `report` is a barrier every rank must reach); the caller decides
    which rank logs and writes. A payload references the live parameters: save it before returning.
    """

    def on_epoch_end(self, metrics: dict[str, float], checkpoint: Callable[[], dict[str, Any]]) -> None:
        """After validation and the schedule update. `checkpoint()` builds the epoch-end payload (no collectives,
        so calling it on one rank only is safe); resuming from it starts the next epoch."""

    def on_checkpoint(self, payload: dict[str, Any]) -> None:
        """Mid-epoch, after every `config.checkpoint_every`-th optimizer step (not on an epoch's last step)."""


@dataclasses.dataclass(frozen=True)
class FitResult:
    history: tuple[dict[str, float], ...]  # per-epoch metrics, including epochs run before a resume
    stop_reason: StopReason
    steps: int  # optimizer steps in total


@dataclasses.dataclass
class _Progress:
    """Where the run is; everything here goes into the resume payload."""

    epoch: int  # 0-based epoch in progress (the next one after an epoch-end checkpoint)
    step_in_epoch: int  # optimizer steps done in this epoch
    global_step: int  # optimizer steps done in the run
    loss_sum: Tensor  # sum of per-image training losses this epoch on this rank, on the device (no host sync)
    images: int  # training images this epoch on this rank
    history: list[dict[str, float]]


def make_optimizer(model: nn.Module, *, config: TrainConfig, lr: float) -> torch.optim.SGD:
    """SGD with momentum 0.9 and weight decay 5e-4 on every parameter (§3.1), one group, fused kernel (CPU, CUDA)."""
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay, fused=True
    )


def fit(
    *,
    model: nn.Module,
    config: TrainConfig,
    lr: float,
    batches: Callable[[int, int], Iterable[BatchLike]],
    steps_per_epoch: int,
    validate: Callable[[nn.Module], tuple[float, float]],
    preprocess: nn.Module,
    device: torch.device,
    header: Mapping[str, Any],
    hooks: Hooks | None = None,
    resume: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> FitResult:
    """Train `model` until the plateau schedule stops it or `config.max_epochs` epochs are done.

    model: on `device` already and, with several ranks, wrapped in DDP after `precision.place` (see there).
    lr: the initial lr — `config.lr` from scratch or warm-started, `config.fine_tune_lr` when fine-tuning (§3.1).
    batches(epoch, start_batch): this rank's micro-batches of 0-based `epoch` from micro-batch `start_batch` on.
    steps_per_epoch: micro-batches per epoch per rank; `steps_per_epoch // accumulation` optimizer steps are
        taken (a trailing incomplete group is not drawn, like drop_last).
    validate(model): (top-1 error %, top-5 error %) of the unwrapped model, called in eval mode after each epoch;
        see `evaluate_errors`.
    preprocess: uint8 → float module, `preprocess(images, colour)` (vgg.data.preprocessing.Preprocess).
    header: the checkpoint fields besides weights and resume state (`vgg.models.checkpoint.header`).
    resume: a payload from `vgg.models.checkpoint.load` of an interrupted run with the same config; every rank
        must pass it.
    """
    hooks = hooks or Hooks()
    accumulation = config.accumulation
    if steps_per_epoch < accumulation:
        raise ConfigError(
            f"train.batch_size: one optimizer step needs {accumulation} micro-batches per worker but an epoch has "
            f"only {steps_per_epoch}; lower batch_size or use a larger training set"
        )
    optimizer_steps = steps_per_epoch // accumulation
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    ddp = isinstance(model, DistributedDataParallel)
    core = model.module if ddp else model
    dtype = precision.resolve(config.precision, device)
    channels_last = precision.channels_last(config.channels_last, device=device, dtype=dtype)
    precision.place(core, config=config, device=device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # training shapes are fixed (crop × micro_batch): autotune once
    preprocess.to(device)
    optimizer = make_optimizer(core, config=config, lr=lr)
    schedule = PlateauSchedule.from_config(config, lr=lr)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    state = _Progress(epoch=0, step_in_epoch=0, global_step=0, loss_sum=zero.clone(), images=0, history=[])
    # What must match for a resume to continue the same run exactly.
    identity = {
        "lr": lr,
        "seed": config.seed,
        "accumulation": accumulation,
        "world_size": world,
        "steps_per_epoch": steps_per_epoch,
        "label_smoothing": config.label_smoothing,
    }
    if resume is not None:
        _restore(resume, identity=identity, header=header, rank=rank, core=core, optimizer=optimizer,
                 schedule=schedule, state=state)
    step_model = torch.compile(model) if config.compile else model

    def payload(loss_sum: float, images: int) -> dict[str, Any]:
        train = {
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "data_position": state.step_in_epoch * accumulation,  # micro-batches of this epoch already consumed
            "epoch_loss_sum": loss_sum,  # over all ranks
            "epoch_images": images,
            "history": [dict(metrics) for metrics in state.history],
            **identity,
        }
        return {**header, "model": core.state_dict(), "train": train}

    while schedule.stop_reason is None:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr
        model.train()
        first = state.step_in_epoch
        micro = iter(batches(state.epoch, first * accumulation))
        started, timed_images = time.perf_counter(), 0
        bar = tqdm(total=optimizer_steps, initial=first, desc=f"epoch {state.epoch + 1}", disable=not progress)
        for _ in range(first, optimizer_steps):
            group_batches = _take(micro, accumulation, epoch=state.epoch, expected=steps_per_epoch)
            torch.manual_seed(_step_seed(config.seed, rank, state.global_step))  # dropout masks of this step
            state.loss_sum += _step(
                step_model, model if ddp else None, group_batches,
                optimizer=optimizer, preprocess=preprocess, device=device, dtype=dtype, channels_last=channels_last,
                label_smoothing=config.label_smoothing,
            )
            images = sum(int(batch[1].shape[0]) for batch in group_batches)
            state.images += images
            timed_images += images
            state.step_in_epoch += 1
            state.global_step += 1
            bar.update()
            if (
                config.checkpoint_every
                and state.global_step % config.checkpoint_every == 0
                and state.step_in_epoch < optimizer_steps
            ):
                loss_sum, images = _sum_over_ranks(state.loss_sum, state.images)
                _check_finite(core, loss_sum, epoch=state.epoch, step=state.global_step, lr=schedule.lr)
                hooks.on_checkpoint(payload(loss_sum, images))
        bar.close()
        loss_sum, images = _sum_over_ranks(state.loss_sum, state.images)  # the epoch's one host sync
        _check_finite(core, loss_sum, epoch=state.epoch, step=state.global_step, lr=schedule.lr)
        # All ranks' images over this rank's wall time, data loading and mid-epoch checkpoints included.
        images_per_s = timed_images * world / (time.perf_counter() - started)
        model.eval()
        top1_err, top5_err = validate(core)
        epoch_lr = schedule.lr
        schedule.step(top1_err)
        state.history.append(
            {
                "epoch": float(state.epoch + 1),
                "step": float(state.global_step),
                "train/loss": loss_sum / images,
                "val/top1_err": float(top1_err),
                "val/top5_err": float(top5_err),
                "lr": epoch_lr,
                "train/images_per_s": images_per_s,
            }
        )
        state.epoch += 1
        state.step_in_epoch = 0
        state.loss_sum = zero.clone()
        state.images = 0
        hooks.on_epoch_end(dict(state.history[-1]), lambda: payload(0.0, 0))
    assert schedule.stop_reason is not None  # the loop condition; narrows the type
    return FitResult(history=tuple(state.history), stop_reason=schedule.stop_reason, steps=state.global_step)


def evaluate_errors(
    *,
    model: nn.Module,
    batches: Iterable[BatchLike],
    preprocess: nn.Module,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> tuple[float, float]:
    """Top-1 and top-5 error (%) of `model` on single centre crops; with torch.distributed initialised, every rank
    passes its own disjoint batches and gets the global errors (correct counts and totals are summed)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.int64, device=device)  # top-1, top-5; summed on device, no host sync
    images = 0
    with torch.inference_mode():
        for batch_images, labels, *_ in batches:
            x = preprocess(batch_images.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision.autocast(device, dtype):
                logits = model(x)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels.to(device, non_blocking=True)[:, None]
            correct += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
            images += len(labels)
    model.train(was_training)
    counts = torch.cat([correct, torch.tensor([images], device=device)])
    if dist.is_initialized():
        dist.all_reduce(counts)
    top1, top5, total = counts.tolist()
    if total == 0:
        raise DataError("validation saw no images; check the validation split of the shards (`vgg ingest`)")
    return 100.0 * (1 - top1 / total), 100.0 * (1 - top5 / total)


def _step(
    step_model: nn.Module,
    ddp_model: nn.Module | None,
    group: list[BatchLike],
    *,
    optimizer: torch.optim.Optimizer,
    preprocess: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    label_smoothing: float,
) -> Tensor:
    """One optimizer step over `group` micro-batches; returns the summed per-image loss (on device, detached).

    Each micro-batch's summed loss is divided by the group's image count, so the accumulated gradient is the mean
    over the whole group — the same update as one pass over the concatenated batch. DDP then averages over ranks;
    its all-reduce runs only on the group's last backward (no_sync before).
    """
    total = sum(int(batch[1].shape[0]) for batch in group)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for index, (images, labels, colour) in enumerate(group):
        x = preprocess(images.to(device, non_blocking=True), colour.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        last = index == len(group) - 1
        sync = ddp_model.no_sync() if ddp_model is not None and not last else contextlib.nullcontext()
        with sync:
            with precision.autocast(device, dtype):
                logits = step_model(x)
            loss = F.cross_entropy(logits.float(), labels.to(device, non_blocking=True), reduction="sum",
                                   label_smoothing=label_smoothing)
            (loss / total).backward()
        loss_sum += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def _take(micro: Iterator[BatchLike], count: int, *, epoch: int, expected: int) -> list[BatchLike]:
    group = list(zip(range(count), micro))
    if len(group) < count:
        raise DataError(
            f"epoch {epoch}: the training batches ran out before the {expected} micro-batches per epoch that "
            "steps_per_epoch promised; compute it with vgg.data.loader.batches_per_epoch for this rank layout"
        )
    return [batch for _, batch in group]


def _check_finite(core: nn.Module, loss_sum: float, *, epoch: int, step: int, lr: float) -> None:
    """Stop a diverged run before it checkpoints: NaN weights saved over a good checkpoint would lose the run.
    Called where the loss is on the host anyway; every rank sees the same summed loss and the same weights, so
    all ranks stop together (none is left waiting in a collective)."""
    weights_finite = bool(torch.stack([parameter.detach().isfinite().all() for parameter in core.parameters()]).all())
    if math.isfinite(loss_sum) and weights_finite:
        return
    problem = f"the training loss is {loss_sum:g}" if not math.isfinite(loss_sum) else "some weights are not finite"
    raise DivergenceError(
        f"training diverged in epoch {epoch + 1} by optimizer step {step} (lr {lr:g}): {problem}; no checkpoint "
        "was written from these weights. Lower the learning rate"
    )


def _step_seed(seed: int, rank: int, step: int) -> int:
    """A 64-bit seed for the dropout masks of optimizer step `step` on `rank`, independent across the three."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0])


def _sum_over_ranks(loss_sum: Tensor, images: int) -> tuple[float, int]:
    """(summed loss, images) over all ranks, as host numbers."""
    totals = torch.stack([loss_sum, torch.tensor(float(images), dtype=torch.float64, device=loss_sum.device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, count = totals.tolist()
    return loss, int(count)


def _restore(
    resume: Mapping[str, Any],
    *,
    identity: dict[str, float],
    header: Mapping[str, Any],
    rank: int,
    core: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: PlateauSchedule,
    state: _Progress,
) -> None:
    for key in ("config", "model_config", "scale"):
        if resume.get(key) != header.get(key):
            raise CheckpointError(
                f"cannot resume: the checkpoint's {key} is {resume.get(key)!r}, this run's is {header.get(key)!r}; "
                "resume the checkpoint of this stage, or start a new run from it (--init)"
            )
    train = resume.get("train")
    if not isinstance(train, Mapping):
        raise CheckpointError(
            "the checkpoint to resume is a final model file without resume state; start a new run from it "
            "(--init) instead of resuming"
        )
    for key, value in identity.items():
        # Checkpoints written before train.label_smoothing existed trained without it.
        saved = train.get(key, 0.0) if key == "label_smoothing" else train[key]
        if saved != value:
            raise CheckpointError(
                f"cannot resume exactly: the checkpoint was written with {key}={saved}, this run has {value}; "
                "resume with the same lr, seed, batch_size, micro_batch, workers, label_smoothing and training set"
            )
    core.load_state_dict(resume["model"])
    optimizer.load_state_dict(train["optimizer"])
    schedule.load_state_dict(train["schedule"])
    state.epoch = int(train["epoch"])
    state.step_in_epoch = int(train["step_in_epoch"])
    state.global_step = int(train["global_step"])
    # The epoch's loss so far was summed over ranks when saved; rank 0 carries it so the epoch-end sum is right.
    if rank == 0:
        state.loss_sum += float(train["epoch_loss_sum"])
        state.images = int(train["epoch_images"])
    state.history = [dict(metrics) for metrics in train["history"]]
