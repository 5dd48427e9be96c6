"""`vgg tune`: a search over the lr (log-uniform), the training scale range [Smin, Smax] and, when given several
candidates, the label smoothing ε of the training loss (Inception-v3's regulariser), in the regime of the stage
it tunes: from scratch (A, `train.lr`), or from that stage's `--init` (fine-tuning the same configuration at the
higher or jittered S, §3.1: `train.fine_tune_lr`; warm-starting B-E from A: `train.lr`).

Each trial is one Ray Train run of the protocol (`pipelines.ray_train`'s worker function, profile overridden with
the trial's lr, S range and ε) whose per-epoch `val/top1_err` reaches Tune through `TuneReportCallback`. As many
trials run at once as the cluster holds (trial slots, each `train.workers` workers); ASHA stops the trials that fall
behind their peers from epoch 1 on. Two searchers: `random`, a plan drawn from the profile's seed before anything
runs (same command, same trials), and `tpe`, Optuna's Tree-structured Parzen Estimator (seeded), whose later
suggestions model the results of the earlier trials. The search space is checked before Ray starts. MLflow gets
one parent run (`tune-<config>`) and one child run per trial, all written by this driver process (a Tune
callback), never by workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipelines.cluster import ClusterError, connect, placeable, user_error
from pipelines.ray_train import TrainJob, check_job, fit_trainer, off_main_thread
from pipelines.tracking import TrackedRun, flatten, git_commit, tracking_uri
from vgg.config import Profile, ScaleRange
from vgg.errors import CheckpointError, ConfigError, DivergenceError
from vgg.files import write_atomic

METRIC = "val/top1_err"  # what ASHA and the best config minimise, % (the paper's Table 3 metric)
EPOCH_METRICS = ("train/loss", "val/top1_err", "val/top5_err", "lr", "train/images_per_s")
DIVERGED = "diverged"  # the key of a diverged trial's last result: the DivergenceError's line
# What a diverged trial reports as its metric (Tune requires one in every result): worse than any error rate, so ASHA
# stops and TPE avoids its neighbourhood; the table shows the trial as diverged, never with this number.
DIVERGED_ERR = 100.0
SEARCHERS = ("random", "tpe", "grid")
# In each trial's directory: its own wall-clock start (time.time(), s), and its end when the trial function returns
# (a trial ASHA stops is ended from outside: its last result's `timestamp` is when it last ran).
INTERVAL_FILE = "interval.json"
# A trial slot: the trial process only waits on its Train run (half a CPU), plus its `train.workers` workers.
# Train V2's controller actor takes no CPU.
TRIAL_RESOURCES = {"CPU": 0.5}
CPU_WORKER_RESOURCES = {"CPU": 0.5}
GPU_WORKER_RESOURCES = {"CPU": 1.0, "GPU": 1.0}
TRIAL_MAX_FAILURES = 1  # worker-group restarts of one trial from its last epoch checkpoint


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A checked search space: lr log-uniform on [lr_min, lr_max), (Smin, Smax) uniform over `scales`, label
    smoothing uniform over `label_smoothing` (one value, by default the profile's: not drawn)."""

    lr_min: float
    lr_max: float
    scales: tuple[tuple[int, int], ...]  # every candidate pair with Smin <= Smax that gives a valid profile
    label_smoothing: tuple[float, ...]  # candidate ε, sorted, each in [0, 1)


@dataclasses.dataclass(frozen=True)
class Regime:
    """How the tuned stage trains, from its `--init` (§3.1): `scratch` (no init), `warm-start` (B-E from a trained
    A: `train.lr`), `fine-tune` (the same configuration at another S: `train.fine_tune_lr`)."""

    kind: str
    init: Path | None

    @property
    def lr_key(self) -> str:
        """The `train` key the searched lr sets."""
        return "fine_tune_lr" if self.kind == "fine-tune" else "lr"


def regime(job: TrainJob) -> Regime:
    if job.init is None:
        return Regime(kind="scratch", init=None)
    return Regime(kind="warm-start" if job.warm_start else "fine-tune", init=job.init)


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """One row of the results table; errors are % at the epoch with the best val top-1 (NaN: no epoch ended).
    `lr` is the tuned learning rate: `train.lr`, or `train.fine_tune_lr` when the search fine-tunes (`Regime`)."""

    trial: str
    lr: float
    s_min: int
    s_max: int
    epochs: int
    top1_err: float
    top5_err: float
    best_epoch: int
    outcome: str  # completed (fit ended: max_epochs or plateau) | stopped (ASHA or time budget) | diverged | failed
    label_smoothing: float = 0.0  # the trial's train.label_smoothing


def tune(
    profile: Profile,
    *,
    config: str,
    scale_key: str = "jitter",
    shards: Path,
    lr_range: tuple[float, float] | None = None,
    s_min_range: Sequence[int] | None = None,
    s_max_range: Sequence[int] | None = None,
    trials: int,
    max_epochs: int,
    time_budget_s: float,
    storage: Path,
    out: Path,
    track: bool,
    label_smoothing: Sequence[float] | None = None,
    init: Path | None = None,
    searcher: str = "random",
    trial_slots: int = 0,
    results: Path | None = None,
) -> tuple[TrialResult, ...]:
    """Search lr and the S range of `scales.<scale_key>` for `config`; print and return the results table (best
    first); write the best values to `out` as a params.yaml overlay (and, given `results`, the table and the
    search's provenance as JSON). `init`: the tuned stage's `--init` (its regime: `Regime`); the lr searched is
    then `train.fine_tune_lr` when it fine-tunes. `lr_range` None: a decade either side of the profile's value of
    that key. `s_min_range`/`s_max_range` are the candidate sizes in px (a `range` works; None: the profile's own
    value, not searched); a pair with Smin > Smax, or one the profile rejects, is never drawn. `label_smoothing`:
    candidate ε for `train.label_smoothing`; None keeps the profile's value in every trial (not searched: the plan,
    table and overlay are as without the option). `searcher`: one of `SEARCHERS` (`make_searcher`). `trial_slots`: how
    many trials run at once; 0, as many as the cluster holds."""
    if searcher not in SEARCHERS:
        raise ConfigError(f"--searcher: unknown searcher {searcher!r}; choose one of {', '.join(SEARCHERS)}")
    if trial_slots < 0:
        raise ConfigError(f"--trial-slots: must be >= 0 (0: as many as the cluster holds), got {trial_slots}")
    # Absolute paths: Ray workers do not run in this directory.
    base = TrainJob(profile=profile, config=config, scale=scale_key, init=init.absolute() if init else None,
                    shards=shards.absolute(), out=out.absolute(), storage=storage.absolute(),
                    max_failures=TRIAL_MAX_FAILURES)
    profile.scale(scale_key)  # unknown key: its own one line, before the defaults below read it
    if init is not None and not init.is_file():
        raise CheckpointError(f"--init: no such checkpoint: {init}")
    mode = regime(base)
    default_lr = getattr(profile.train, mode.lr_key)
    own = profile.scale(scale_key)
    space = check_space(profile, scale_key=scale_key,
                        lr_range=(default_lr / 10, default_lr * 10) if lr_range is None else lr_range,
                        s_min_range=(own.s_min,) if s_min_range is None else s_min_range,
                        s_max_range=(own.s_max,) if s_max_range is None else s_max_range,
                        trials=trials, max_epochs=max_epochs, time_budget_s=time_budget_s,
                        label_smoothing=label_smoothing, lr_key=mode.lr_key)
    if searcher == "grid":
        grid_plan(space, trials=trials)  # its one line before Ray
    check_job(base)  # configuration name, shards, class count, init, writable out folder and storage: before Ray
    _existing_overlay(out)  # an --out that is not an overlay: before the search, not after it
    name = _experiment_name(base, space=space, trials=trials, max_epochs=max_epochs, searcher=searcher)
    parent = _parent_run(base, space=space, trials=trials, max_epochs=max_epochs, time_budget_s=time_budget_s,
                         mode=mode, searcher=searcher) if track else None
    with parent if parent is not None else contextlib.nullcontext():  # ends the run by how the search ended
        connect()
        _check_capacity(profile)
        slots = trial_slots_for(profile, requested=trial_slots, trials=trials)
        print(f"tune: {trials} trials ({searcher} searcher), {slots} at a time, regime {mode.kind} "
              f"(searching train.{mode.lr_key})")
        if parent is not None:
            parent.client.set_tag(parent.run_id, "trial_slots", str(slots))
        ledger = TrialLedger(parent=parent, base=base, lr_key=mode.lr_key)
        grid = _search(base, space=space, trials=trials, searcher=searcher, slots=slots, max_epochs=max_epochs,
                       time_budget_s=time_budget_s, name=name, ledger=ledger)
        rows = _table(grid, ledger)
        # ε in the table and the overlay only when a trial can differ from the profile: without the option, both
        # are as they were before it existed.
        smoothing_shown = space.label_smoothing != (profile.train.label_smoothing,)
        print(format_table(rows, label_smoothing=smoothing_shown))
        if len(rows) < trials:
            print(f"{trials - len(rows)} of {trials} planned trials did not start within the time budget "
                  f"({time_budget_s:g} s)")
        best = _best(rows, grid)
        _write_overlay(out, profile=profile, config=config, scale_key=scale_key, best=best, rows=rows,
                       trials=trials, label_smoothing=smoothing_shown, lr_key=mode.lr_key)
        if results is not None:
            provenance = {"experiment": name, "searcher": searcher, "trial_slots": slots, "regime": mode.kind,
                          "init": str(init) if init else None, "lr_key": f"train.{mode.lr_key}",
                          "mlflow_run_id": parent.run_id if parent is not None else None,
                          "space": dataclasses.asdict(space), "trials": trials, "max_epochs": max_epochs,
                          "best": dataclasses.asdict(best), "rows": [dataclasses.asdict(row) for row in rows]}
            write_atomic(results, (json.dumps(provenance, indent=1) + "\n").encode())
        smoothing = f", label smoothing {best.label_smoothing:g}" if smoothing_shown else ""
        print(f"best: lr {best.lr:.4g}, S [{best.s_min}, {best.s_max}]{smoothing} -> {METRIC} {best.top1_err:.2f} %; "
              f"wrote {out}")
        if parent is not None:
            parent.log_metrics({"best/val/top1_err": best.top1_err, "best/val/top5_err": best.top5_err}, step=0)
            parent.client.set_tag(parent.run_id, "best_trial", best.trial)
            parent.log_dict({"rows": [dataclasses.asdict(row) for row in rows]}, "tune_results.json")
            parent.log_artifact(out)
    return rows


def check_space(
    profile: Profile,
    *,
    scale_key: str,
    lr_range: tuple[float, float],
    s_min_range: Sequence[int],
    s_max_range: Sequence[int],
    trials: int,
    max_epochs: int,
    time_budget_s: float,
    label_smoothing: Sequence[float] | None = None,
    lr_key: str = "lr",
) -> SearchSpace:
    """The search space, or one `ConfigError` line saying what is empty or invalid and how to fix it.
    `label_smoothing` None: the profile's `train.label_smoothing` only. `lr_key`: the `train` key the lr sets."""
    profile.scale(scale_key)  # unknown key: its own one line
    if trials < 1:
        raise ConfigError(f"--trials: must be >= 1, got {trials}")
    if max_epochs < 1:
        raise ConfigError(f"--max-epochs: must be >= 1, got {max_epochs}")
    if not time_budget_s > 0:
        raise ConfigError(f"--time-budget: must be > 0 s, got {time_budget_s:g}")
    lr_min, lr_max = lr_range
    if not (lr_min > 0 and lr_max > 0):
        raise ConfigError(f"--lr-range: learning rates must be > 0 (log-uniform), got {lr_min:g} {lr_max:g}; "
                          "e.g. --lr-range 1e-3 1e-1")
    if lr_min >= lr_max:
        raise ConfigError(f"--lr-range: the low end {lr_min:g} must be below the high end {lr_max:g}; "
                          "e.g. --lr-range 1e-3 1e-1")
    for lr in (lr_min, lr_max):  # the profile's own bounds on an lr, named after this option
        try:
            dataclasses.replace(profile.train, **{lr_key: lr})
        except ConfigError as error:
            raise ConfigError(f"--lr-range: {error}") from None
    smoothing = (profile.train.label_smoothing,) if label_smoothing is None else tuple(label_smoothing)
    if not smoothing:
        raise ConfigError("--label-smoothing: no values given; list candidate ε in [0, 1), e.g. "
                          "--label-smoothing 0,0.1")
    for epsilon in smoothing:
        if not (math.isfinite(epsilon) and 0.0 <= epsilon < 1.0):
            raise ConfigError(f"--label-smoothing: every value must be in [0, 1), got {epsilon:g}; "
                              "e.g. --label-smoothing 0,0.1 (Inception-v3 uses 0.1)")
    crop, max_side = profile.model.crop, profile.data.max_side
    for option, sizes in (("--s-min", s_min_range), ("--s-max", s_max_range)):
        if len(sizes) == 0:
            raise ConfigError(f"{option}: no sizes given; list candidate S values in px, e.g. "
                              f"{option} {crop}:{max_side}:8")
        for size in sizes:
            if size < crop or size > max_side:
                raise ConfigError(
                    f"{option}: S={size} px is outside [{crop}, {max_side}] (model.crop .. data.max_side of profile "
                    f"{profile.name}: the crop must fit and ingest keeps no larger images); pick sizes in that range"
                )
    pairs = sorted({(low, high) for low in s_min_range for high in s_max_range if low <= high})
    if not pairs:
        raise ConfigError(
            f"--s-min/--s-max: every Smin ({min(s_min_range)}..{max(s_min_range)}) is above every Smax "
            f"({min(s_max_range)}..{max(s_max_range)}); give Smin values <= some Smax value"
        )
    valid, reasons = [], []
    for low, high in pairs:
        try:
            trial_profile(profile, scale_key=scale_key, lr=lr_min, s_min=low, s_max=high, max_epochs=max_epochs,
                          lr_key=lr_key)
        except ConfigError as error:
            reasons.append(f"[{low}, {high}]: {error}")
            continue
        valid.append((low, high))
    if not valid:
        raise ConfigError(f"--s-min/--s-max: no candidate S range gives a valid profile (e.g. {reasons[0]}); "
                          "widen the ranges or use a jittered Smin < Smax")
    return SearchSpace(lr_min=float(lr_min), lr_max=float(lr_max), scales=tuple(valid),
                       label_smoothing=tuple(sorted({float(epsilon) for epsilon in smoothing})))


def trial_profile(profile: Profile, *, scale_key: str, lr: float, s_min: int, s_max: int, max_epochs: int,
                  label_smoothing: float | None = None, lr_key: str = "lr") -> Profile:
    """The profile one trial trains with (validated again by the dataclasses). Trials checkpoint at epoch ends
    only: every report then carries the epoch's `val/top1_err`, which ASHA needs. `label_smoothing` None keeps the
    profile's; `lr_key`: the `train` key `lr` sets (`Regime.lr_key`)."""
    smoothing = profile.train.label_smoothing if label_smoothing is None else label_smoothing
    return dataclasses.replace(
        profile,
        train=dataclasses.replace(profile.train, max_epochs=max_epochs, checkpoint_every=0,
                                  label_smoothing=smoothing, **{lr_key: lr}),
        scales=dataclasses.replace(profile.scales, **{scale_key: ScaleRange(s_min=s_min, s_max=s_max)}),
    )


def plan_trials(space: SearchSpace, *, trials: int, seed: int) -> list[dict[str, Any]]:
    """The trials' configurations, drawn before anything runs so the same seed gives the same search. A single
    label-smoothing candidate is not drawn, so such a plan's lr and S values are those drawn without the option."""
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(trials):
        lr = float(math.exp(rng.uniform(math.log(space.lr_min), math.log(space.lr_max))))
        s_min, s_max = space.scales[int(rng.integers(len(space.scales)))]
        smoothing = int(rng.integers(len(space.label_smoothing))) if len(space.label_smoothing) > 1 else 0
        plan.append({"lr": lr, "s_min": s_min, "s_max": s_max, "label_smoothing": space.label_smoothing[smoothing]})
    return plan


def parse_sizes(text: str, *, option: str) -> tuple[int, ...]:
    """CLI size lists in px: `40,48,56`, an inclusive range `40:72`, or a stepped one `40:72:8` (mixable)."""
    sizes: list[int] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            bounds = [int(value) for value in item.split(":")]
        except ValueError:
            bounds = []
        if len(bounds) == 1:
            sizes.append(bounds[0])
        elif len(bounds) in (2, 3) and bounds[0] <= bounds[1] and (len(bounds) == 2 or bounds[2] > 0):
            sizes.extend(range(bounds[0], bounds[1] + 1, bounds[2] if len(bounds) == 3 else 1))
        else:
            raise ConfigError(f"{option}: cannot read {item!r}; give px sizes like 40,48 or a range 40:72 or 40:72:8")
    return tuple(sorted(set(sizes)))


def parse_fractions(text: str, *, option: str) -> tuple[float, ...]:
    """CLI lists of numbers in [0, 1), e.g. label-smoothing candidates `0,0.05,0.1` (checked by `check_space`)."""
    values: list[float] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            values.append(float(item))
        except ValueError:
            raise ConfigError(f"{option}: cannot read {item!r}; give numbers in [0, 1) like 0,0.1") from None
    return tuple(sorted(set(values)))


def format_table(rows: Sequence[TrialResult], *, label_smoothing: bool = False) -> str:
    """The results table; `label_smoothing`: with each trial's ε."""
    smoothing = f" {'smooth':>6}" if label_smoothing else ""
    lines = [f"{'trial':<16} {'lr':>10} {'Smin':>5} {'Smax':>5}{smoothing} {'epochs':>6} {'top-1 err %':>11} "
             f"{'top-5 err %':>11}  outcome"]
    for row in rows:
        smoothing = f" {row.label_smoothing:>6.3g}" if label_smoothing else ""
        lines.append(f"{row.trial:<16} {row.lr:>10.4g} {row.s_min:>5} {row.s_max:>5}{smoothing} {row.epochs:>6} "
                     f"{row.top1_err:>11.2f} {row.top5_err:>11.2f}  {row.outcome}")
    return "\n".join(lines)


def grid_plan(space: SearchSpace, *, trials: int) -> list[dict[str, Any]]:
    """`trials` lr values evenly spaced in log lr over [lr_min, lr_max] (both ends included), at the one S range and
    ε of the space: the dense baseline a search is measured against (`benchmarks/tune.py`)."""
    if len(space.scales) > 1 or len(space.label_smoothing) > 1:
        raise ConfigError("--searcher grid: spans the lr only; give one Smin, one Smax and at most one ε")
    (s_min, s_max), smoothing = space.scales[0], space.label_smoothing[0]
    if trials == 1:
        lrs = [math.sqrt(space.lr_min * space.lr_max)]
    else:  # the ends exactly: exp(log(x)) may round above lr_max, outside the space
        lrs = [space.lr_min, *np.exp(np.linspace(math.log(space.lr_min), math.log(space.lr_max), trials)[1:-1]),
               space.lr_max]
    return [{"lr": float(lr), "s_min": s_min, "s_max": s_max, "label_smoothing": smoothing} for lr in lrs]


@dataclasses.dataclass(frozen=True)
class TpeSpace:
    """The search space as Optuna's define-by-run function (a class, not a closure: Tune pickles its searcher into
    the experiment's state). The draws through the trial object are what TPE models; the returned constants complete
    the trial's configuration."""

    space: SearchSpace

    def __call__(self, trial: Any) -> dict[str, Any]:
        space = self.space
        trial.suggest_float("lr", space.lr_min, space.lr_max, log=True)
        pairs = [f"{low}-{high}" for low, high in space.scales]
        low, high = (trial.suggest_categorical("scales", pairs) if len(pairs) > 1 else pairs[0]).split("-")
        constants: dict[str, Any] = {"s_min": int(low), "s_max": int(high)}
        if len(space.label_smoothing) > 1:
            trial.suggest_categorical("label_smoothing", list(space.label_smoothing))
        else:
            constants["label_smoothing"] = space.label_smoothing[0]
        return constants


def make_searcher(space: SearchSpace, *, searcher: str, trials: int, seed: int,
                  slots: int = 0) -> Searcher | BasicVariantGenerator:
    """The searcher Tune asks for each next trial's configuration (keys `lr`, `s_min`, `s_max`, `label_smoothing`),
    with at most `slots` trials running at once (0: no limit).
    `random`: the seeded plan (`plan_trials`), all drawn before anything runs. `grid`: `grid_plan` (every point
    runs all its epochs: no early stopping). `tpe`: Optuna's TPE, seeded, whose
    first third of the trials (at least 2) are its own random start-up draws and the rest model the results so far;
    a candidate list of one value is not drawn. With several trial slots TPE sees results in the order trials end,
    so only a one-slot search repeats exactly; running trials count as poor results meanwhile (constant liar), so
    concurrent suggestions spread out."""
    if searcher in ("random", "grid"):
        plan = plan_trials(space, trials=trials, seed=seed) if searcher == "random" else grid_plan(space, trials=trials)
        # Tune's max_concurrent_trials does not reach a BasicVariantGenerator: its own limit does.
        return BasicVariantGenerator(points_to_evaluate=plan, max_concurrent=slots)
    import optuna  # only `--searcher tpe` needs it
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per trial otherwise
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, trials // 3), multivariate=True,
                                         constant_liar=True)
    search = OptunaSearch(space=TpeSpace(space), metric=METRIC, mode="min", sampler=sampler)
    return ConcurrencyLimiter(search, max_concurrent=slots) if slots else search


def trial_slots_for(profile: Profile, *, requested: int, trials: int) -> int:
    """How many trials run at once: `requested`, or (0) as many as the cluster's resources hold, each a trial
    process and `train.workers` workers; never more than `trials`. One line when `requested` cannot run at once."""
    train = profile.train
    worker = GPU_WORKER_RESOURCES if train.use_gpu else CPU_WORKER_RESOURCES
    available = ray.cluster_resources()
    need = {resource: TRIAL_RESOURCES.get(resource, 0.0) + train.workers * worker.get(resource, 0.0)
            for resource in {*TRIAL_RESOURCES, *worker}}
    holds = min(int(available.get(resource, 0.0) // amount) for resource, amount in need.items() if amount > 0)
    if requested > holds:
        raise ClusterError(f"--trial-slots: {requested} trials at once need {requested}x the resources of one trial "
                           f"but the Ray cluster holds {holds}; lower it, or pass 0 for as many as it holds")
    return max(1, min(requested or holds, trials))


def _search(
    base: TrainJob,
    *,
    space: SearchSpace,
    trials: int,
    searcher: str,
    slots: int,
    max_epochs: int,
    time_budget_s: float,
    name: str,
    ledger: TrialLedger,
) -> ray.tune.ResultGrid:
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_trial, base=base.to_dict(), max_epochs=max_epochs, lr_key=ledger.lr_key),
        TRIAL_RESOURCES,
    )
    tuner = ray.tune.Tuner(
        trainable,
        # TPE holds its own space (`make_searcher`). The random plan's points are all its samples; the distributions
        # record the space in Tune's state: lr, the candidate Smin and Smax values (only pairs from `space.scales`
        # are planned) and ε.
        param_space=None if searcher == "tpe" else {
            "lr": ray.tune.loguniform(space.lr_min, space.lr_max),
            "s_min": ray.tune.choice(sorted({low for low, _ in space.scales})),
            "s_max": ray.tune.choice(sorted({high for _, high in space.scales})),
            "label_smoothing": ray.tune.choice(list(space.label_smoothing))},
        tune_config=ray.tune.TuneConfig(
            metric=METRIC,
            mode="min",
            # Stops a trial whose val/top1_err is behind its peers' at epoch 1, 4, 16...; at max_epochs `fit` ends
            # it itself.
            scheduler=None if searcher == "grid" else ASHAScheduler(time_attr="epoch", grace_period=1,
                                                                     max_t=max_epochs, stop_last_trials=False),
            search_alg=make_searcher(space, searcher=searcher, trials=trials, seed=base.profile.train.seed,
                                     slots=slots),
            num_samples=trials,
            time_budget_s=time_budget_s,
        ),
        # A failed trial is not retried by Tune: its Train run already restarts its worker group (max_failures).
        run_config=ray.tune.RunConfig(name=name, storage_path=str(base.storage), callbacks=[ledger],
                                      failure_config=ray.tune.FailureConfig(max_failures=0), verbose=1),
    )
    return off_main_thread(tuner.fit)  # Tune's own SIGINT handler would end the search as if it had completed


def _trial(trial_config: dict[str, Any], *, base: dict[str, Any], max_epochs: int, lr_key: str = "lr") -> None:
    """One Tune trial: one Ray Train run of the protocol with this trial's lr, S range and label smoothing. Writes
    its own wall-clock start and end (`INTERVAL_FILE`) to its trial directory, so that concurrency can be read back."""
    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    interval = {"trial": trial_id, "start": time.time()}
    record = Path(context.get_trial_dir()) / INTERVAL_FILE
    write_atomic(record, json.dumps(interval).encode())
    job = TrainJob.from_dict(base)
    run_name = f"train-{trial_id}"  # stable per trial: a restarted trial resumes its own Train run
    job = dataclasses.replace(
        job,
        profile=trial_profile(job.profile, scale_key=job.scale, lr=trial_config["lr"], s_min=trial_config["s_min"],
                              s_max=trial_config["s_max"], max_epochs=max_epochs,
                              label_smoothing=trial_config.get("label_smoothing"), lr_key=lr_key),
        out=job.storage / run_name / "model.pt",  # not written: a trial's model stays in its Ray checkpoints
    )
    # Rank 0's per-epoch metrics become this trial's Tune results; a worker's user error, the trial's error.
    try:
        fit_trainer(job, name=run_name, checkpoints=1, progress=False, callbacks=[TuneReportCallback()],
                    resources=GPU_WORKER_RESOURCES if job.profile.train.use_gpu else CPU_WORKER_RESOURCES)
    except DivergenceError as error:
        # A finding of the search (this lr is too high for the init), not a failure to log with a traceback: the
        # trial's last result says so, with the worst error as its metric.
        ray.tune.report({METRIC: DIVERGED_ERR, DIVERGED: str(error)})
    finally:
        write_atomic(record, json.dumps({**interval, "end": time.time()}).encode())


def _check_capacity(profile: Profile) -> None:
    """One clear line instead of trials that wait forever for resources the cluster does not have."""
    train = profile.train
    worker = GPU_WORKER_RESOURCES if train.use_gpu else CPU_WORKER_RESOURCES
    available = ray.cluster_resources()
    for resource in ("CPU", "GPU"):
        need = TRIAL_RESOURCES.get(resource, 0.0) + train.workers * worker.get(resource, 0.0)
        if available.get(resource, 0.0) < need:
            raise ClusterError(
                f"one trial with train.workers={train.workers} needs {need:g} {resource} but the Ray cluster has "
                f"{available.get(resource, 0.0):g}; lower train.workers or add nodes"
            )
    fits = placeable(worker)
    if fits < train.workers:
        raise ClusterError(
            f"one trial with train.workers={train.workers} needs {train.workers} workers, each with "
            f"{' and '.join(f'{amount:g} {name}' for name, amount in worker.items())} on one node, but the nodes of "
            f"the Ray cluster can place {fits}; lower train.workers or add nodes"
        )


class TrialLedger(ray.tune.Callback):
    """Runs in the Tune driver: each trial's configuration and outcome as seen live (a trial stopped before its
    first report has no config in its Result, and the stored results do not say whether `fit` ended by itself),
    and, when tracking, one MLflow child run per trial under the tune run, with its per-epoch metrics."""

    def __init__(self, *, parent: TrackedRun | None, base: TrainJob, lr_key: str = "lr") -> None:
        self.parent, self.base, self.lr_key = parent, base, lr_key
        self.configs: dict[str, dict[str, Any]] = {}
        self.outcomes: dict[str, str] = {}
        self.runs: dict[str, TrackedRun] = {}
        self.stopped: set[str] = set()  # by ASHA, at one of its results
        self.diverged: dict[str, str] = {}  # trial → the DivergenceError's line

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.configs:  # a restarted trial keeps its record and run
            return
        self.configs[trial.trial_id] = dict(trial.config)
        if self.parent is None:
            return
        lr, s_min, s_max = trial.config["lr"], trial.config["s_min"], trial.config["s_max"]
        profile, key = self.base.profile, self.base.scale
        smoothing = float(trial.config.get("label_smoothing", profile.train.label_smoothing))
        tags = {"stage": "tune-trial", "config": self.base.config, "profile": profile.name, "trial_id": trial.trial_id,
                "lr": f"{lr:.6g}", "s_min": str(s_min), "s_max": str(s_max), "label_smoothing": f"{smoothing:g}"}
        params = {f"train.{self.lr_key}": repr(lr), f"scales.{key}.s_min": str(s_min),
                  f"scales.{key}.s_max": str(s_max),
                  "train.label_smoothing": repr(smoothing)}
        self.runs[trial.trial_id] = TrackedRun(
            uri=self.parent.uri, experiment=f"vgg-{profile.name}", run_name=f"trial-{trial.trial_id}", tags=tags,
            params=params, parent_run_id=self.parent.run_id,
        )

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        # Tune marks a result `done` before callbacks see it when its scheduler (ASHA) stops the trial there; the
        # last result, which Tune marks `done` when the trial function returns, does not come through here again.
        if result.get("done"):
            self.stopped.add(trial.trial_id)
        if DIVERGED in result:
            self.diverged[trial.trial_id] = result[DIVERGED]
        if trial.trial_id in self.runs and "epoch" in result:
            metrics = {key: result[key] for key in EPOCH_METRICS if key in result}
            self.runs[trial.trial_id].log_metrics(metrics, step=int(result["epoch"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial_id = trial.trial_id
        if trial_id in self.diverged:
            outcome = "diverged"
        elif (trial.last_result or {}).get("done") and trial_id not in self.stopped:
            outcome = "completed"  # the trial function returned: `fit` ended the run itself
        else:
            outcome = "stopped"  # by ASHA, or by the time budget (which marks no result `done`)
        self._finish(trial_id, outcome)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial.trial_id, "failed")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial_id in self.configs.keys() - self.outcomes.keys():  # still running when the time budget ran out
            self._finish(trial_id, "stopped")

    def _finish(self, trial_id: str, outcome: str) -> None:
        self.outcomes[trial_id] = outcome
        run = self.runs.pop(trial_id, None)
        if run is not None:
            run.client.set_tag(run.run_id, "outcome", outcome)
            if trial_id in self.diverged:
                run.client.set_tag(run.run_id, DIVERGED, self.diverged[trial_id])
            run.finish("FAILED" if outcome in ("diverged", "failed") else "FINISHED")


def _parent_run(base: TrainJob, *, space: SearchSpace, trials: int, max_epochs: int, time_budget_s: float,
                mode: Regime, searcher: str) -> TrackedRun:
    profile = base.profile
    root = Path.cwd()
    tags = {"stage": "tune", "config": base.config, "profile": profile.name, "scale_kind": base.scale,
            "git_commit": git_commit(root), "regime": mode.kind, "searcher": searcher,
            "init_source": str(mode.init) if mode.init else f"random ({profile.model.init})"}
    params = {**flatten(profile.to_dict()), "tune.lr_key": f"train.{mode.lr_key}", "tune.searcher": searcher,
              "tune.lr_min": repr(space.lr_min), "tune.lr_max": repr(space.lr_max),
              "tune.scales": json.dumps(space.scales), "tune.label_smoothing": json.dumps(space.label_smoothing),
              "tune.trials": str(trials), "tune.max_epochs": str(max_epochs),
              "tune.time_budget_s": f"{time_budget_s:g}", "tune.metric": METRIC}
    return TrackedRun(uri=tracking_uri(root), experiment=f"vgg-{profile.name}", run_name=f"tune-{base.config}",
                      tags=tags, params=params)


def _table(grid: ray.tune.ResultGrid, ledger: TrialLedger) -> tuple[TrialResult, ...]:
    """The trials that started, best first (`ranked`)."""
    rows = []
    for result in grid:
        trial_id = result.metrics["trial_id"]
        if trial_id not in ledger.configs:  # created, but the time budget ran out before it started
            continue
        config = ledger.configs[trial_id]
        frame = result.metrics_dataframe
        if frame is not None and DIVERGED in frame:  # its metric is DIVERGED_ERR, not an epoch's error
            frame = frame[frame[DIVERGED].isna()]
        epochs = frame.dropna(subset=[METRIC]) if frame is not None and METRIC in frame else None
        if epochs is not None and len(epochs):
            best = epochs.loc[epochs[METRIC].idxmin()]
            top1, top5, best_epoch = float(best[METRIC]), float(best["val/top5_err"]), int(best["epoch"])
        else:
            top1, top5, best_epoch = math.nan, math.nan, 0
        outcome = "failed" if result.error is not None else ledger.outcomes.get(trial_id, "stopped")
        smoothing = float(config.get("label_smoothing", ledger.base.profile.train.label_smoothing))
        rows.append(TrialResult(trial=trial_id, lr=float(config["lr"]), s_min=int(config["s_min"]),
                                s_max=int(config["s_max"]), epochs=0 if epochs is None else len(epochs),
                                top1_err=top1, top5_err=top5, best_epoch=best_epoch, outcome=outcome,
                                label_smoothing=smoothing))
    return ranked(rows)


def ranked(rows: Sequence[TrialResult]) -> tuple[TrialResult, ...]:
    """Best first: lowest top-1, then top-5 error; last, trials without an epoch and trials that diverged (even after
    good epochs: their lr is no candidate)."""

    def key(row: TrialResult) -> tuple[bool, float, float]:
        unusable = math.isnan(row.top1_err) or row.outcome == "diverged"
        return unusable, *(math.inf if math.isnan(error) else error for error in (row.top1_err, row.top5_err))

    return tuple(sorted(rows, key=key))


def _best(rows: tuple[TrialResult, ...], grid: ray.tune.ResultGrid) -> TrialResult:
    """The best trial with at least one validated epoch that did not diverge; otherwise the reason none is, as one
    line."""
    if rows and not math.isnan(rows[0].top1_err) and rows[0].outcome != "diverged":
        return rows[0]
    errors = [result.error for result in grid if result.error is not None]
    for error in errors:
        cause = user_error(error)
        if cause is not None:
            raise cause
    diverged = [row.lr for row in rows if row.outcome == "diverged"]
    if errors:
        last_line = (str(errors[0]).strip().splitlines() or [type(errors[0]).__name__])[-1][:300]
        also = f", {len(diverged)} diverged" if diverged else ""
        raise ClusterError(f"no trial has a usable epoch: {len(errors)} of {len(rows)} failed{also} (first failure: "
                           f"{last_line}); see the Ray logs above")
    if diverged and len(diverged) == len(rows):
        raise ConfigError(f"--lr-range: every trial diverged, the lowest at lr {min(diverged):.4g}; lower the range")
    if diverged:
        raise ConfigError(f"--lr-range, --time-budget: {len(diverged)} of {len(rows)} trials diverged (the lowest at "
                          f"lr {min(diverged):.4g}) and the others finished no epoch in time; lower the range or "
                          "raise the budget")
    raise ConfigError(f"--time-budget: no trial finished an epoch in time ({len(rows)} started); raise it")


def _write_overlay(out: Path, *, profile: Profile, config: str, scale_key: str, best: TrialResult,
                   rows: tuple[TrialResult, ...], trials: int, label_smoothing: bool = False,
                   lr_key: str = "lr") -> None:
    """The best values as a params.yaml overlay (same nesting), written atomically, with how it was found;
    `label_smoothing`: with the best trial's ε (it was searched, or set apart from the profile's); `lr_key`: the
    `train` key the searched lr sets."""
    train: dict[str, float] = {lr_key: best.lr}
    smoothing_option = ""
    if label_smoothing:
        train["label_smoothing"] = best.label_smoothing
        smoothing_option = f" --set train.label_smoothing={best.label_smoothing!r}"
    # Other profiles' tuned values in an existing overlay stay (one file per tuned stage serves every profile).
    profiles = {name: values for name, values in _existing_overlay(out).items() if name != profile.name}
    profiles[profile.name] = {"train": train, "scales": {scale_key: {"s_min": best.s_min, "s_max": best.s_max}}}
    overlay = {"profiles": profiles}
    header = (
        f"# vgg tune: best of {len(rows)} trials ({trials} planned) for configuration {config}, profile "
        f"{profile.name}, scales.{scale_key}\n"
        f"# {METRIC} {best.top1_err:.2f} % (val/top5_err {best.top5_err:.2f} %) at epoch {best.best_epoch} of "
        f"{best.epochs}, trial {best.trial}, outcome {best.outcome}\n"
        f"# Merge into params.yaml, or pass as --set train.{lr_key}={best.lr!r}{smoothing_option} "
        f"--set 'scales.{scale_key}={{s_min: {best.s_min}, s_max: {best.s_max}}}'\n"
    )
    text = header + yaml.safe_dump(overlay, sort_keys=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, text.encode())


def _existing_overlay(out: Path) -> dict[str, Any]:
    """The profiles an overlay file at `out` holds (none when there is no file)."""
    if not out.is_file():
        return {}
    try:
        data = yaml.safe_load(out.read_text())
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or "profiles" not in data or not isinstance(data["profiles"] or {}, dict):
        raise ConfigError(f"--out {out}: exists but is not a params overlay (a 'profiles:' mapping); remove it or "
                          "choose another path")
    return dict(data.get("profiles") or {})


def _experiment_name(base: TrainJob, *, space: SearchSpace, trials: int, max_epochs: int, searcher: str) -> str:
    """Deterministic (no timestamps): the same search over the same data, init and profile gets the same name."""
    digest = hashlib.sha256()
    digest.update(base.fingerprint().encode())
    digest.update(json.dumps([dataclasses.asdict(space), trials, max_epochs, searcher]).encode())
    return f"tune-{base.profile.name}-{base.config}-{base.scale}-{digest.hexdigest()[:12]}"
