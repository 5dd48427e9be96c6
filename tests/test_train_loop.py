"""The training loop on CPU with real (tiny) models: it learns, follows the §3.1 schedule, accumulates gradients
exactly, runs under DDP and bf16, and resumes bit-identically — also after a real SIGKILL."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import vgg.models
from pipelines.params import load_profile
from vgg.config import TrainConfig
from vgg.data.preprocessing import Preprocess
from vgg.data.shard_format import ColourStats
from vgg.errors import CheckpointError, DataError, DivergenceError
from vgg.models import checkpoint
from vgg.train import precision
from vgg.train.loop import Hooks, evaluate_errors, fit
from vgg.train.schedule import PlateauSchedule

ROOT = Path(__file__).resolve().parents[1]
PROFILE = load_profile(ROOT / "params.yaml", profile="small")
HEADER = checkpoint.header(config="A", profile=PROFILE, scale=PROFILE.scales.low)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny and the 2 cores are shared: one intra-op thread is ~10x faster than two spinning
    against other processes. Children get OMP_NUM_THREADS=1 so their arithmetic matches this process's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train_config(**changes: Any) -> TrainConfig:
    base = {"precision": "fp32", "channels_last": False, "compile": False, "checkpoint_every": 0, "decay_at": ()}
    return dataclasses.replace(PROFILE.train, **{**base, **changes})


class Scale(nn.Module):
    """Stand-in for vgg.data.preprocessing.Preprocess on the tests' synthetic tensors: uint8 → about [-0.5, 0.5]."""

    def forward(self, images: Tensor, colour: Tensor | None = None) -> Tensor:
        x = images.float() / 255 - 0.5
        return x if colour is None else x + 0.1 * colour[:, :, None, None]


class Quadrants:
    """Noise images with a bright square in the quadrant named by the label (4 classes); deterministic batches.

    `batches(epoch, start)` follows the loader's contract: the order depends only on (seed, epoch), and starting
    at micro-batch `start` yields exactly what an uninterrupted epoch yields from there.
    """

    def __init__(self, *, count: int, size: int, micro_batch: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(4, (count,), generator=generator)
        self.images = torch.randint(64, 160, (count, 3, size, size), dtype=torch.uint8, generator=generator)
        side = size // 4
        for image, label in zip(self.images, self.labels.tolist()):
            top, left = divmod(label, 2)
            y, x = (torch.randint(size // 2 - side + 1, (2,), generator=generator)).tolist()
            image[:, top * size // 2 + y:][:, :side, left * size // 2 + x:][:, :, :side] = 255
        self.micro_batch = micro_batch
        self.seed = seed
        self.steps = count // micro_batch

    def batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        for index in range(start, self.steps):
            chosen = order[index * self.micro_batch:(index + 1) * self.micro_batch]
            colour = torch.randn(len(chosen), 3, generator=torch.Generator().manual_seed(epoch * 10_000 + index))
            yield self.images[chosen], self.labels[chosen], colour


class Tiny(nn.Module):
    def __init__(self, *, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Dropout(dropout),
                                        nn.Linear(32, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def paper_preprocess() -> Preprocess:
    """The real input transform on the 0–255 scale: mean RGB off, AlexNet's PCA colour shift from `colour`."""
    return Preprocess(ColourStats(
        mean_rgb=torch.tensor([112.0, 112.0, 112.0]),
        eigval=torch.tensor([55.5, 4.8, 1.1]),  # AlexNet's lighting eigenvalues × 255
        eigvec=torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]),
    ))


def small_vgg() -> nn.Module:
    """Table-1 configuration A at the small profile's scale (dropout 0.5 on FC6/FC7 active in training)."""
    torch.manual_seed(0)
    return vgg.models.build("A", num_classes=4, width=0.125, fc_width=64, crop=32)


def run(model: nn.Module, data: Quadrants, config: TrainConfig, *, val: Quadrants | None = None,
        hooks: Hooks | None = None, resume: dict | None = None, validate=None, lr: float | None = None):
    """fit() on `data`; the Table-1 VGG gets the real Preprocess, the tiny test nets the [-0.5, 0.5] stand-in."""
    preprocess = paper_preprocess() if isinstance(model, vgg.models.VGG) else Scale()
    if validate is None:
        def validate(m: nn.Module) -> tuple[float, float]:
            source = val or data
            return evaluate_errors(model=m, batches=source.batches(0, 0), preprocess=preprocess, device=CPU)
    return fit(model=model, config=config, lr=lr or config.lr, batches=data.batches, steps_per_epoch=data.steps,
               validate=validate, preprocess=preprocess, device=CPU, header=HEADER, hooks=hooks, resume=resume)


def without_speed(history) -> list[dict]:
    return [{k: v for k, v in metrics.items() if k != "train/images_per_s"} for metrics in history]


# --- learning -------------------------------------------------------------------------------------------------

def test_learns_a_trivial_task() -> None:
    torch.manual_seed(0)
    data = Quadrants(count=128, size=16, micro_batch=16, seed=1)
    val = Quadrants(count=128, size=16, micro_batch=64, seed=2)
    config = train_config(batch_size=16, micro_batch=16, lr=0.05, max_epochs=5, patience=10)
    seen: list[dict] = []

    class Record(Hooks):
        def on_epoch_end(self, metrics, checkpoint):
            seen.append(metrics)
            assert checkpoint()["train"]["epoch"] == len(seen)  # the payload resumes at the next epoch

    result = run(Tiny(dropout=0.5), data, config, val=val, hooks=Record())
    assert result.stop_reason == "max_epochs" and result.steps == 5 * 8 and len(result.history) == 5
    assert seen == list(result.history)
    first, last = result.history[0], result.history[-1]
    assert set(last) == {"epoch", "step", "train/loss", "val/top1_err", "val/top5_err", "lr", "train/images_per_s"}
    assert last["epoch"] == 5 and last["step"] == 40 and last["lr"] == 0.05 and last["train/images_per_s"] > 0
    assert last["val/top1_err"] < 20.0  # chance is 75 %
    assert last["val/top5_err"] == 0.0  # 4 classes: the top 5 always hold the label
    assert last["train/loss"] < 0.5 * first["train/loss"]


# --- the plateau schedule (§3.1) ------------------------------------------------------------------------------

def _schedule(**changes: Any) -> PlateauSchedule:
    return PlateauSchedule(**{"lr": 0.01, "decay": 0.1, "patience": 2, "max_decays": 3, "max_epochs": 74, **changes})


def test_schedule_decays_three_times_then_stops_on_the_fourth_plateau() -> None:
    schedule = _schedule()
    curve = [50, 40, 30, 30, 31,  # 2 bad epochs → decay 1 after epoch 5
             25, 26, 27,          # decay 2 after epoch 8
             20, 20, 20,          # equal is not better: decay 3 after epoch 11
             19, 19.5, 19.5]      # final lr plateau: stop after epoch 14
    lrs, reasons = [], []
    for err in curve:
        lrs.append(schedule.lr)
        schedule.step(err)
        reasons.append(schedule.stop_reason)
    assert lrs == pytest.approx([1e-2] * 5 + [1e-3] * 3 + [1e-4] * 3 + [1e-5] * 3, rel=1e-12)
    assert reasons == [None] * 13 + ["plateau"]
    assert schedule.decays == 3 and schedule.best == 19
    assert schedule.lr == 0.01 * 0.1**3  # computed from the initial lr, not by repeated products


def test_schedule_stops_at_max_epochs_and_counts_nan_as_bad() -> None:
    schedule = _schedule(max_epochs=5, patience=1)
    for err in [50, 40, math.nan, 30, 20]:
        schedule.step(err)
    assert schedule.stop_reason == "max_epochs" and schedule.decays == 1
    schedule.max_epochs = 6  # a larger cap continues the run
    assert schedule.stop_reason is None


def test_schedule_patience_zero_acts_as_one_and_state_round_trips() -> None:
    zero, one = _schedule(patience=0), _schedule(patience=1)
    for err in [50, 40, 45, 39]:
        zero.step(err)
        one.step(err)
    assert zero.state_dict() == one.state_dict() and zero.decays == 1
    resumed = _schedule(patience=0)
    resumed.load_state_dict(torch.load(_save_state(zero.state_dict()), weights_only=True))
    for schedule in (zero, resumed):
        schedule.step(39)
    assert resumed.state_dict() == zero.state_dict() and resumed.lr == zero.lr


def test_fixed_decays_ignore_the_validation_curve_and_end_at_the_cap() -> None:
    """decay_at (0.6, 0.9) of 10 epochs: 6 at lr, 3 at lr/10, 1 at lr/100, whatever the validation errors do."""
    for curve in ([50, 40, 30, 20, 10, 9, 8, 7, 6, 5], [50, 60, 70, math.nan, 90, 90, 90, 90, 90, 90]):
        schedule = _schedule(max_epochs=10, patience=1, max_decays=1, decay_at=(0.6, 0.9))
        lrs = []
        for err in curve:
            lrs.append(schedule.lr)
            schedule.step(err)
        assert lrs == pytest.approx([1e-2] * 6 + [1e-3] * 3 + [1e-4], rel=1e-12)
        assert schedule.stop_reason == "max_epochs"
    fine_tune = _schedule(lr=1e-3, max_epochs=4, decay_at=(0.6, 0.9))  # ceil(2.4) = 3, ceil(3.6) = 4
    lrs = []
    for err in [30, 30, 30, 30]:
        lrs.append(fine_tune.lr)
        fine_tune.step(err)
    assert lrs == pytest.approx([1e-3] * 3 + [1e-4], rel=1e-12)
    resumed = _schedule(max_epochs=10, decay_at=(0.6, 0.9))
    resumed.load_state_dict(torch.load(_save_state(schedule.state_dict()), weights_only=True))
    assert resumed.state_dict() == schedule.state_dict() and resumed.lr == schedule.lr
    stretched = _schedule(max_epochs=10, decay_at=(0.6, 0.9))  # stopped after epoch 6, resumed with a cap of 20
    for err in [50] * 6:
        stretched.step(err)
    assert stretched.lr == pytest.approx(1e-3)
    stretched.max_epochs = 20
    assert stretched.lr == pytest.approx(1e-2) and stretched.stop_reason is None  # next step after epoch 12


def _save_state(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_fit_follows_the_schedule() -> None:
    """Scripted validation errors drive fit's lr and stop: the optimizer really trains at the lr reported."""
    data = Quadrants(count=32, size=16, micro_batch=16, seed=1)
    curve = iter([60.0, 50.0, 50.0, 49.0, 49.0, 49.0, 49.0, 49.0, 49.0, 49.0])
    lrs_used: list[float] = []

    class Watch(Hooks):
        def on_epoch_end(self, metrics, checkpoint):
            lrs_used.append(checkpoint()["train"]["optimizer"]["param_groups"][0]["lr"])

    config = train_config(batch_size=16, micro_batch=16, lr=0.1, patience=1, max_decays=2, max_epochs=50)
    result = run(Tiny(dropout=0.0), data, config, hooks=Watch(), validate=lambda m: (next(curve), 0.0))
    # 60 50 50(bad → ÷10) 49 49(bad → ÷10, 2nd and last decay) 49(bad at the final lr → stop)
    assert [m["lr"] for m in result.history] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001])
    assert lrs_used == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001])
    assert result.stop_reason == "plateau" and len(result.history) == 6


def test_fit_with_fixed_decays_trains_at_the_stepped_lr() -> None:
    data = Quadrants(count=32, size=16, micro_batch=16, seed=1)
    lrs_used: list[float] = []

    class Watch(Hooks):
        def on_epoch_end(self, metrics, checkpoint):
            lrs_used.append(checkpoint()["train"]["optimizer"]["param_groups"][0]["lr"])

    config = train_config(batch_size=16, micro_batch=16, lr=0.1, patience=1, max_epochs=4, decay_at=(0.5,))
    result = run(Tiny(dropout=0.0), data, config, hooks=Watch(), validate=lambda m: (50.0, 0.0))  # a flat curve
    assert lrs_used == pytest.approx([0.1, 0.1, 0.01, 0.01])  # no plateau stop: the run reaches its cap
    assert result.stop_reason == "max_epochs" and len(result.history) == 4


# --- gradient accumulation ------------------------------------------------------------------------------------

def test_accumulation_gives_the_full_batch_update() -> None:
    """2 micro-batches of 8 per step == 1 batch of 16 (same images), with momentum and weight decay, 2 steps."""
    torch.manual_seed(0)
    reference = Tiny(dropout=0.0)
    micro = Quadrants(count=32, size=16, micro_batch=8, seed=3)
    full = Quadrants(count=32, size=16, micro_batch=16, seed=3)

    def concatenated(epoch: int, start: int):
        parts = list(micro.batches(epoch, 2 * start))
        for first, second in zip(parts[::2], parts[1::2]):
            yield tuple(torch.cat([a, b]) for a, b in zip(first, second))

    results = {}
    for name, config, batches in [
        ("accumulated", train_config(batch_size=16, micro_batch=8, max_epochs=1), micro.batches),
        ("full", train_config(batch_size=16, micro_batch=16, max_epochs=1), concatenated),
    ]:
        model = Tiny(dropout=0.0)
        model.load_state_dict(reference.state_dict())
        steps = micro.steps if name == "accumulated" else full.steps
        result = fit(model=model, config=config, lr=0.05, batches=batches, steps_per_epoch=steps,
                     validate=lambda m: (50.0, 0.0), preprocess=Scale(), device=CPU, header=HEADER)
        assert result.steps == 2
        results[name] = (model.state_dict(), result.history[0]["train/loss"])
    (accumulated, loss_a), (full_batch, loss_f) = results["accumulated"], results["full"]
    assert loss_a == pytest.approx(loss_f, rel=1e-6)
    for key, value in full_batch.items():
        assert not torch.equal(value, reference.state_dict()[key])  # the step did move every parameter
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-7)


def test_short_epochs_are_a_clear_error() -> None:
    data = Quadrants(count=32, size=16, micro_batch=8, seed=3)
    config = train_config(batch_size=16, micro_batch=8, max_epochs=1)
    with pytest.raises(DataError, match="ran out before the 8 micro-batches"):
        fit(model=Tiny(dropout=0.0), config=config, lr=0.01, batches=data.batches, steps_per_epoch=8,
            validate=lambda m: (0.0, 0.0), preprocess=Scale(), device=CPU, header=HEADER)


class KeepCheckpoints(Hooks):
    """Every payload fit hands over, mid-epoch and at epoch ends, copied as a checkpoint write would."""

    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] = []

    def on_checkpoint(self, payload):
        self.saved.append(torch.load(io.BytesIO(_serialised(payload)), weights_only=True))

    def on_epoch_end(self, metrics, make):
        self.on_checkpoint(make())


def _serialised(payload: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def test_a_diverging_run_stops_with_one_line_before_checkpointing_it() -> None:
    """lr 100 (above what a profile accepts; `fit` takes any lr) makes the loss NaN within epoch 1: fit stops at
    the first checkpoint after that with a clear error, and every checkpoint it handed over before holds finite
    weights."""
    data = Quadrants(count=32, size=16, micro_batch=4, seed=1)
    hooks = KeepCheckpoints()
    config = train_config(batch_size=4, micro_batch=4, lr=0.01, max_epochs=3, checkpoint_every=1)
    torch.manual_seed(0)
    with pytest.raises(DivergenceError, match=r"^training diverged in epoch 1 by optimizer step \d+ \(lr 100\): "
                                              r"the training loss is nan; no checkpoint was written from these "
                                              r"weights\. Lower the learning rate$"):
        run(Tiny(dropout=0.0), data, config, hooks=hooks, lr=100.0)
    assert 0 < len(hooks.saved) < data.steps
    assert all(value.isfinite().all() for saved in hooks.saved for value in saved["model"].values())


def test_non_finite_weights_stop_the_run_even_when_the_loss_is_finite() -> None:
    """A weight that became NaN where the loss cannot show it (here: a parameter the forward pass never uses)."""

    class WithSpare(Tiny):
        def __init__(self) -> None:
            super().__init__(dropout=0.0)
            self.spare = nn.Parameter(torch.zeros(3))

    class PoisonAfterFirst(KeepCheckpoints):
        def on_checkpoint(self, payload):
            super().on_checkpoint(payload)
            model.spare.data[1] = math.nan

    data = Quadrants(count=32, size=16, micro_batch=4, seed=1)
    hooks, model = PoisonAfterFirst(), WithSpare()
    config = train_config(batch_size=4, micro_batch=4, lr=0.01, max_epochs=1, checkpoint_every=1)
    with pytest.raises(DivergenceError, match=r"by optimizer step 2 .*: some weights are not finite; no checkpoint"):
        run(model, data, config, hooks=hooks)
    assert len(hooks.saved) == 1 and hooks.saved[0]["model"]["spare"].isfinite().all()


# --- exact resume ---------------------------------------------------------------------------------------------

class _Killed(Exception):
    pass


class SaveThenDie(Hooks):
    """Saves the checkpoint at `at` (a global optimizer step, or 'epoch 1') and then dies as a crash would."""

    def __init__(self, path: Path, *, at: str) -> None:
        self.path, self.at = path, at

    def on_checkpoint(self, payload):
        if self.at == f"step {payload['train']['global_step']}":
            checkpoint.save(self.path, payload)
            raise _Killed

    def on_epoch_end(self, metrics, make):
        if self.at == f"epoch {int(metrics['epoch'])}":
            checkpoint.save(self.path, make())
            raise _Killed


RESUME_CONFIG = dict(batch_size=8, micro_batch=4, lr=0.02, max_epochs=3, patience=1, checkpoint_every=1)


@pytest.mark.parametrize("at", ["step 4", "epoch 1"])
def test_resume_is_bit_identical(tmp_path: Path, at: str) -> None:
    """Interrupted after a mid-epoch (or epoch-end) checkpoint and resumed == uninterrupted: weights, optimizer
    state and every metric except speed, with dropout active and accumulation 2."""
    data = Quadrants(count=24, size=32, micro_batch=4, seed=5)  # 6 micro-batches = 3 optimizer steps per epoch
    config = train_config(**RESUME_CONFIG)
    straight = small_vgg()
    expected = run(straight, data, config)
    assert expected.steps == 9

    path = tmp_path / "a.pt"
    with pytest.raises(_Killed):
        run(small_vgg(), data, config, hooks=SaveThenDie(path, at=at))
    payload = checkpoint.load(path, expect_config="A")
    assert payload["train"]["global_step"] in (3, 4) and payload["train"]["step_in_epoch"] in (0, 1)
    resumed_model = vgg.models.build("A", num_classes=4, width=0.125, fc_width=64, crop=32)  # other random init
    resumed = run(resumed_model, data, config, resume=payload)
    assert resumed.steps == 9 and resumed.stop_reason == expected.stop_reason
    assert without_speed(resumed.history) == without_speed(expected.history)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


def test_dropout_changes_the_run() -> None:
    """The resume test above can fail: with other dropout masks (another seed) the weights differ."""
    data = Quadrants(count=24, size=32, micro_batch=4, seed=5)
    first, second = small_vgg(), small_vgg()
    run(first, data, train_config(**{**RESUME_CONFIG, "max_epochs": 1}))
    run(second, data, train_config(**{**RESUME_CONFIG, "max_epochs": 1, "seed": 1}))
    assert not torch.equal(first.classifier[0].weight, second.classifier[0].weight)


def test_resume_refuses_another_layout(tmp_path: Path) -> None:
    data = Quadrants(count=24, size=32, micro_batch=4, seed=5)
    path = tmp_path / "a.pt"
    with pytest.raises(_Killed):
        run(small_vgg(), data, train_config(**RESUME_CONFIG), hooks=SaveThenDie(path, at="step 1"))
    payload = checkpoint.load(path)
    other = train_config(**{**RESUME_CONFIG, "micro_batch": 2})
    with pytest.raises(CheckpointError, match="written with accumulation=2, this run has 4"):
        run(small_vgg(), Quadrants(count=24, size=32, micro_batch=2, seed=5), other, resume=payload)
    other_scale = {**payload, "scale": {"s_min": 56, "s_max": 56}}
    with pytest.raises(CheckpointError, match="the checkpoint's scale is .*56.*, this run's is .*40"):
        run(small_vgg(), data, train_config(**RESUME_CONFIG), resume=other_scale)
    with pytest.raises(CheckpointError, match="final model file without resume state"):
        run(small_vgg(), data, train_config(**RESUME_CONFIG), resume=checkpoint.final(payload))


_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import test_train_loop as t
from vgg.models import checkpoint

class SaveSlowly(t.Hooks):
    def on_checkpoint(self, payload):
        checkpoint.save({path!r}, payload)
        time.sleep(0.5)  # time for the parent's SIGKILL to land mid-run

    def on_epoch_end(self, metrics, make):
        self.on_checkpoint(make())

t.run(t.small_vgg(), t.Quadrants(count=24, size=32, micro_batch=4, seed=5), t.train_config(**t.RESUME_CONFIG),
      hooks=SaveSlowly())
"""


def test_resume_after_sigkill(tmp_path: Path) -> None:
    """A real crash: a training process killed with SIGKILL after its second checkpoint; resuming from what is on
    disk ends bit-identical to an uninterrupted run."""
    path = tmp_path / "a.pt"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(tests=str(ROOT / "tests"), path=str(path))],
        cwd=ROOT, env=CHILD_ENV, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and checkpoint.load(path)["train"]["global_step"] >= 2):
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child wrote no checkpoint"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    payload = checkpoint.load(path)
    assert 2 <= payload["train"]["global_step"] < 9  # killed mid-run, not after it finished

    data = Quadrants(count=24, size=32, micro_batch=4, seed=5)
    config = train_config(**RESUME_CONFIG)
    straight = small_vgg()
    expected = run(straight, data, config)
    resumed_model = small_vgg()
    resumed = run(resumed_model, data, config, resume=payload)
    assert without_speed(resumed.history) == without_speed(expected.history)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


# --- DDP (2 ranks, gloo) --------------------------------------------------------------------------------------

_RANK = """
import sys
sys.path.insert(0, {tests!r})
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import test_train_loop as t
from vgg.train.loop import evaluate_errors, fit

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=2)
torch.manual_seed(0)
model = t.Tiny(dropout=0.0)
data = t.Quadrants(count=32, size=16, micro_batch=4, seed=3)

def batches(epoch, start):  # this rank's half of every global step: micro-batches 4k+2r, 4k+2r+1
    for index, batch in enumerate(data.batches(epoch, 0)):
        if index // 2 % 2 == rank and index // 4 >= start // 2:
            yield batch

def validate(m):
    val = t.Quadrants(count=24, size=16, micro_batch=4, seed=4)
    return evaluate_errors(model=m, batches=[b for i, b in enumerate(val.batches(0, 0)) if i % 2 == rank],
                           preprocess=t.Scale(), device=t.CPU)

config = t.train_config(batch_size=16, micro_batch=4, workers=2, max_epochs=2, lr=0.05)
result = fit(model=DistributedDataParallel(model), config=config, lr=0.05, batches=batches, steps_per_epoch=4,
             validate=validate, preprocess=t.Scale(), device=t.CPU, header=t.HEADER)
if rank == 0:
    torch.save({{"model": model.state_dict(), "history": list(result.history)}}, {out!r})
dist.destroy_process_group()
"""


def test_ddp_with_accumulation_matches_one_process(tmp_path: Path) -> None:
    """2 gloo ranks × 2 micro-batches of 4 (no_sync on the first) == one process with batches of 16; the
    validation errors are all-reduced so each rank reports the global ones."""
    out = tmp_path / "ddp.pt"
    script = _RANK.format(tests=str(ROOT / "tests"), store=str(tmp_path / "store"), out=str(out))
    ranks = [
        subprocess.Popen([sys.executable, "-c", script, str(rank)], cwd=ROOT, env=CHILD_ENV, stderr=subprocess.PIPE)
        for rank in (0, 1)
    ]
    for process in ranks:
        _, err = process.communicate(timeout=240)
        assert process.returncode == 0, err.decode()[-3000:]
    ddp = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    model = Tiny(dropout=0.0)
    micro = Quadrants(count=32, size=16, micro_batch=4, seed=3)

    def concatenated(epoch: int, start: int):
        parts = list(micro.batches(epoch, 0))
        for index in range(start, 2):
            yield tuple(torch.cat(tensors) for tensors in zip(*parts[4 * index:4 * index + 4]))

    val = Quadrants(count=24, size=16, micro_batch=4, seed=4)
    result = fit(model=model, config=train_config(batch_size=16, micro_batch=16, max_epochs=2, lr=0.05), lr=0.05,
                 batches=concatenated, steps_per_epoch=2, preprocess=Scale(), device=CPU, header=HEADER,
                 validate=lambda m: evaluate_errors(model=m, batches=val.batches(0, 0), preprocess=Scale(),
                                                    device=CPU))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-7)
    for got, want in zip(ddp["history"], result.history):
        assert got["val/top1_err"] == pytest.approx(want["val/top1_err"])
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-5)


# --- precision ------------------------------------------------------------------------------------------------

def test_bf16_autocast_runs_on_cpu_close_to_fp32() -> None:
    data = Quadrants(count=64, size=32, micro_batch=16, seed=1)
    losses, dtypes = {}, {}
    for setting in ("fp32", "bf16"):
        model = small_vgg()
        seen: list[torch.dtype] = []
        model.features[0].register_forward_hook(lambda module, args, output: seen.append(output.dtype))
        config = train_config(batch_size=16, micro_batch=16, max_epochs=1, precision=setting, channels_last=True)
        result = run(model, data, config, validate=lambda m: (50.0, 0.0))
        losses[setting], dtypes[setting] = result.history[0]["train/loss"], set(seen)
        assert model.features[0].weight.dtype == torch.float32  # master weights stay fp32
        nhwc = model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert nhwc == (setting == "bf16")  # the layout policy: NHWC for oneDNN's bf16 path only
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_precision_policy() -> None:
    cuda = torch.device("cuda")
    assert precision.resolve("auto", cuda) == torch.bfloat16
    assert precision.resolve("fp32", cuda) == torch.float32
    assert precision.resolve("bf16", CPU) == torch.bfloat16
    assert precision.resolve("auto", CPU) == (torch.bfloat16 if precision.cpu_bf16_isas() else torch.float32)
    # Channels-last only where its kernels are faster: cuDNN, and oneDNN's bf16 path; never when not asked for.
    assert precision.channels_last(True, device=cuda, dtype=torch.float32)
    assert precision.channels_last(True, device=CPU, dtype=torch.bfloat16)
    assert not precision.channels_last(True, device=CPU, dtype=torch.float32)
    assert not precision.channels_last(False, device=cuda, dtype=torch.bfloat16)


# --- evaluation helper ----------------------------------------------------------------------------------------

class Fixed(nn.Module):
    """Returns preset logits, one row per image (the image's first pixel holds its row index)."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: Tensor) -> Tensor:
        return self.logits[x[:, 0, 0, 0].round().long()]


def test_evaluate_errors_counts_top1_and_top5() -> None:
    # 7 classes; labels' ranks in their rows: 1st, 2nd, 5th, 6th → top-1 1/4 right, top-5 3/4 right.
    logits = torch.tensor([[9, 8, 7, 6, 5, 4, 3.0]] * 4)
    labels = torch.tensor([0, 1, 4, 5])
    images = torch.arange(4, dtype=torch.uint8)[:, None, None, None].expand(4, 3, 2, 2)
    batches = [(images[:2], labels[:2], torch.zeros(2, 3)), (images[2:], labels[2:], torch.zeros(2, 3))]
    model = Fixed(logits).train()
    top1, top5 = evaluate_errors(model=model, batches=batches, preprocess=_Identity(), device=CPU)
    assert (top1, top5) == (75.0, 25.0)
    assert model.training  # the mode is restored
    with pytest.raises(DataError, match="validation saw no images"):
        evaluate_errors(model=model, batches=[], preprocess=_Identity(), device=CPU)


class _Identity(nn.Module):
    def forward(self, images: Tensor, colour: Tensor | None = None) -> Tensor:
        return images.float()
