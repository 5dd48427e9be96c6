"""One training run of the protocol on Ray Train (V2): a `TorchTrainer` whose workers call `vgg.train.fit`.

Only the worker function knows about Ray. Rank 0 attaches checkpoints; every rank reports (a barrier). The run
name is a fingerprint of everything that determines the result, so re-running the same command after a crash —
of a worker (`FailureConfig`) or of this whole process — resumes from the last checkpoint, while a changed
input starts afresh. The final model file is written by this driver, atomically, where the caller says.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import (Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig,
                       UserCallback)
from ray.train.torch import TorchTrainer
from torch.nn.parallel import DistributedDataParallel

from pipelines.cluster import ClusterError, check_storage, connect, placeable, user_error
from pipelines.provenance import code_digest, file_sha256, protocol_key
from pipelines.tracking import (MetricsRelay, TrackedRun, TrackingError, check_reachable, end_status, flatten,
                                git_commit, protocol_name, source_tags, tracking_uri, unrecorded)
from vgg.config import Profile, ScaleKind, ScaleRange, TrainConfig, from_mapping
from vgg.data.loader import batches_per_epoch, train_batches, val_batches
from vgg.data.preprocessing import Preprocess
from vgg.data.shard_format import STATS_FILE, read_index, read_stats
from vgg.errors import CheckpointError, ConfigError, DivergenceError, ModelError, VGGError
from vgg.files import write_atomic
from vgg.models import CONFIGS, checkpoint, from_config, warm_start
from vgg.models.io import load_model
from vgg.train import precision
from vgg.train.loop import Hooks, evaluate_errors, fit

CHECKPOINT_FILE = "checkpoint.pt"
T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """Everything one `vgg train` needs; plain data so it travels to Ray workers.

    Resolved once, when the job is made (and again by `dataclasses.replace`, so a Tune trial's profile gives its
    own S): `scale_range`, the S of the kind `scale` in the profile, and `init_config`, the configuration the
    `init` checkpoint holds (read from its header)."""

    profile: Profile
    config: str  # Table 1 name, A..E
    scale: ScaleKind  # the training scale's kind: low | high | jitter (params.yaml `scales`)
    init: Path | None  # checkpoint to start from: an A for B..E (warm start), the same config for fine-tuning
    shards: Path
    out: Path  # where the final model is written
    storage: Path  # Ray Train storage (checkpoints, run state); shared by all nodes on a cluster
    max_failures: int  # worker-group restarts from the last checkpoint before giving up
    storage_shared: bool = False  # the user says every node mounts `storage` (pipelines.cluster.check_storage)
    scale_range: ScaleRange = dataclasses.field(init=False, repr=False, compare=False)
    init_config: str | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_range", self.profile.scale(self.scale))
        object.__setattr__(self, "init_config",
                           None if self.init is None else str(checkpoint.read_header(self.init)["config"]))

    def fingerprint(self) -> str:
        """Hash of what determines the result: resolved profile, config, scale, init weights, data index, and the
        code that trains (Ray Train adopts the stored state of a run with the same name, a finished one too: without
        the code, a library edit would hand back the previous code's weights)."""
        digest = hashlib.sha256(code_digest().encode())
        digest.update(json.dumps(self.profile.to_dict(), sort_keys=True).encode())
        digest.update(f"{self.config}|{self.scale}".encode())
        for path in (self.init, self.shards / "index.json"):
            if path is not None:
                digest.update(file_sha256(path).encode())
        return digest.hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for Ray (a worker's or a Tune trial's config)."""
        return {
            "profile": self.profile.to_dict(), "config": self.config, "scale": self.scale,
            "init": str(self.init) if self.init else None, "shards": str(self.shards), "out": str(self.out),
            "storage": str(self.storage), "max_failures": self.max_failures, "storage_shared": self.storage_shared,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJob:
        return cls(
            profile=from_mapping(Profile, data["profile"]), config=data["config"], scale=data["scale"],
            init=Path(data["init"]) if data["init"] else None, shards=Path(data["shards"]), out=Path(data["out"]),
            storage=Path(data["storage"]), max_failures=data["max_failures"],
            storage_shared=data["storage_shared"],
        )

    @functools.cached_property  # hashes the init checkpoint (up to ~1 GB at paper size): once per job
    def run_name(self) -> str:
        return f"{self.profile.name}-{self.config}-{self.scale_range.label()}-{self.fingerprint()}"

    @property
    def lr(self) -> float:
        """§3.1: fine-tuning from the same configuration (the higher S, jittered S) uses the lower lr."""
        return self.profile.train.fine_tune_lr if self.init_config == self.config else self.profile.train.lr

    @property
    def train_config(self) -> TrainConfig:
        """The profile's recipe, capped at `fine_tune_epochs` when this run fine-tunes its own configuration."""
        train = self.profile.train
        return train.fine_tuning() if self.init is not None and not self.warm_start else train

    @property
    def warm_start(self) -> bool:
        """§3.1: B–E start from a trained A (its first four convs and FC layers; the rest freshly initialised)."""
        return self.init_config is not None and self.init_config != self.config


def check_job(job: TrainJob) -> None:
    """Every user-fixable problem, found before Ray starts: one line each."""
    if job.config not in CONFIGS:
        raise ModelError(f"--config: unknown configuration {job.config!r}; choose one of {', '.join(CONFIGS)}")
    index = read_index(job.shards)
    if len(index.classes) != job.profile.model.num_classes:
        raise ConfigError(
            f"model.num_classes: the profile says {job.profile.model.num_classes} but {job.shards} has "
            f"{len(index.classes)} classes; use the matching profile or re-ingest"
        )
    # Found here rather than in the workers, where Ray would retry the error max_failures times before giving up.
    train = job.profile.train
    steps = batches_per_epoch(index, batch_size=train.micro_batch, world_size=train.workers)
    if steps < train.accumulation:
        raise ConfigError(
            f"train.batch_size: one optimizer step needs {train.accumulation} micro-batches per worker but "
            f"{job.shards} gives each of the {train.workers} workers only {steps} per epoch; lower batch_size or use "
            "a larger training set"
        )
    if job.init_config is not None:
        source = job.init_config
        if source != job.config and not (source in ("A", "A-LRN") and job.config in ("B", "C", "D", "E")):
            raise CheckpointError(
                f"--init {job.init}: holds configuration {source}; {job.config} starts from a trained A "
                "(warm start, B-E) or from a model of its own configuration (fine-tuning)"
            )
    _check_writable(job.out.parent, "--out")
    _check_writable(job.storage, "--storage")


def run(job: TrainJob, *, epoch_log: Path | None = None, progress: bool = True) -> dict[str, float]:
    """Train on Ray (local, or the cluster in RAY_ADDRESS); write the final model to `job.out`; return the last
    epoch's metrics. `epoch_log`: a file on this node that receives rank 0's per-epoch metrics as they come
    (`EpochLog`; `vgg train` relays it to MLflow)."""
    check_job(job)
    connect()
    check_storage(job.storage, shared=job.storage_shared)
    train = job.profile.train
    with _one_at_a_time(job):
        result = fit_trainer(job, name=job.run_name, checkpoints=2, progress=progress,
                             resources=_worker_resources(workers=train.workers, use_gpu=train.use_gpu),
                             callbacks=[EpochLog(str(epoch_log))] if epoch_log is not None else [])
    if result.checkpoint is None:
        raise ClusterError(f"training run {job.run_name} ended without a checkpoint; see the Ray logs above")
    with result.checkpoint.as_directory() as directory:
        payload = checkpoint.load(Path(directory) / CHECKPOINT_FILE, expect_config=job.config)
    checkpoint.save(job.out, checkpoint.final(payload))
    history = payload["train"]["history"]
    write_atomic(curve_path(job.out), _curve_csv(history).encode())
    return dict(history[-1]) if history else {}


@contextlib.contextmanager
def _one_at_a_time(job: TrainJob) -> Iterator[None]:
    """One process at a time trains a given Ray run (the same command started twice, say): two would write one run
    directory together. The second waits (flock on a file beside the run in `job.storage`), then finds the run
    finished and adopts it, so both write the same model. Across nodes this holds where the storage's file system
    honours flock (local disks, NFSv4)."""
    job.storage.mkdir(parents=True, exist_ok=True)
    with open(job.storage / f".{job.run_name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process training run {job.run_name} in {job.storage} (the same command?)",
                  file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


CURVE_COLUMNS = ("epoch", "train/loss", "val/top1_err", "val/top5_err", "lr")


def curve_path(model: Path) -> Path:
    """The per-epoch metrics of the run that wrote `model`, as CSV beside it (`A-low.pt` → `A-low.epochs.csv`):
    what `dvc plots show` draws."""
    return model.with_suffix(".epochs.csv")


def _curve_csv(history: list[dict[str, Any]]) -> str:
    header = ",".join(column.replace("/", "_") for column in CURVE_COLUMNS)
    rows = [",".join(f"{epoch.get(column, float('nan')):.6g}" for column in CURVE_COLUMNS) for epoch in history]
    return "\n".join([header, *rows]) + "\n"


def fit_trainer(
    job: TrainJob, *, name: str, checkpoints: int, progress: bool, resources: dict[str, float], callbacks: list
) -> ray.train.Result:
    """Run one Ray Train run of `job` named `name` under `job.storage` (`run`'s, and each Tune trial's): its
    workers call `_train_worker`; a failed worker group restarts from the last of `checkpoints` kept checkpoints,
    up to `job.max_failures` times. A user error raised on a worker comes back as its own one line; a divergence
    is not retried (`_train_worker`)."""
    train = job.profile.train
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"job": job.to_dict(), "name": name, "progress": progress},
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(job.storage.resolve()),
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints),
            callbacks=callbacks,
            # Ray Train's per-report INFO lines drown the progress bars; its log files under the session keep them.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = off_main_thread(trainer.fit)
    except Exception as error:  # Ray wraps worker errors
        raise user_error(error) or error
    if isinstance(result.return_value, DivergenceError):
        raise DivergenceError(f"{result.return_value} ({_lr_option(job)})")
    return result


def off_main_thread(call: Callable[[], T]) -> T:
    """`call()` (a Ray Train or Tune `fit`) in a daemon thread while the main thread waits, so that Ctrl-C and
    SIGTERM reach the caller as exceptions and its clean-up runs. Called in the main thread, Ray Train's `fit`
    installs a SIGINT handler of its own that aborts the run and then returns its last checkpoint as if the run had
    finished (which `run` would write as the final model), and Tune's ends the search as if it had completed.

    On an interrupt this driver leaves Ray first: its job ends, and with it the run's controller and workers (a
    local Ray stops), before the caller's clean-up removes what they write to; the checkpoints stay in storage for
    the same command to resume from."""
    if threading.current_thread() is not threading.main_thread():
        return call()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the main thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
    except BaseException:  # Interrupted, KeyboardInterrupt
        ray.shutdown()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _lr_option(job: TrainJob) -> str:
    """Which option sets the lr of `job`, for a run that diverged (§3.1: fine-tuning uses the lower lr; deep nets
    start from a trained A)."""
    if job.init is not None and not job.warm_start:
        return "train.fine_tune_lr: this run fine-tunes its own configuration"
    if job.init is None and job.config in ("B", "C", "D", "E"):
        return "train.lr, or warm-start from a trained A: --init, §3.1"
    return "train.lr"


def train(
    *,
    profile: Profile,
    config: str,
    scale: str,
    shards: Path,
    out: Path,
    init: Path | None,
    storage: Path,
    max_failures: int,
    stage: str,
    track: bool,
    params_file: Path = Path("params.yaml"),
    storage_shared: bool = False,
) -> dict[str, float]:
    """`vgg train`: one run of the protocol, tracked as one MLflow run whose final model is registered. `params_file`:
    the params file the profile came from (with the code, it names the protocol execution the run belongs to)."""
    # Absolute paths: Ray workers do not run in this directory (on a cluster they must be on shared storage).
    job = TrainJob(profile=profile, config=config, scale=scale, init=init.absolute() if init else None,
                   shards=shards.absolute(), out=out.absolute(), storage=storage.absolute(), max_failures=max_failures,
                   storage_shared=storage_shared)
    check_job(job)
    if not track:
        return run(job)
    root = Path.cwd()
    scale_label = job.scale_range.label()
    tags = {"stage": stage, "config": config, "scale": scale_label, "scale_kind": scale, "profile": profile.name,
            "git_commit": git_commit(root), "init_source": str(init) if init else f"random ({profile.model.init})",
            **source_tags(root, command="train")}
    params = {**flatten(profile.to_dict()), "job.config": config, "job.scale": scale, "job.lr": str(job.lr),
              "job.init": str(init) if init else ""}
    uri = tracking_uri(root)
    check_reachable(uri)  # a tracking server that is down fails now, not after the training
    protocol = (protocol_key(params_file), protocol_name(profile.name))

    def open_run() -> TrackedRun:
        tracked = TrackedRun(uri=uri, experiment=f"vgg-{profile.name}", run_name=f"{stage}-{config}-{scale_label}",
                             tags=tags, params=params, resume_key=job.run_name, protocol=protocol)
        tracked.log_dataset(job.shards / "index.json", name=f"shards-{profile.name}", context="training")
        return tracked

    with tempfile.TemporaryDirectory(prefix="vgg-epochs-") as directory:
        # Opened by the relay's thread while Ray Train starts (see MetricsRelay).
        relay = MetricsRelay(open_run, Path(directory) / "epochs.jsonl").start()
        try:
            metrics = run(job, epoch_log=relay.path)
        except BaseException as error:
            try:
                relay.stop().finish(end_status(error))
            except TrackingError:
                pass  # the training's own error is the one to report
            raise
        try:
            tracked = relay.stop()  # the model is at job.out already, whatever MLflow says
        except TrackingError as error:
            raise unrecorded(job.out, str(error)) from None
    try:
        with tracked:  # ends the run FINISHED, or FAILED/KILLED by what ended the block
            tracked.log_dict(profile.to_dict(), "profile.json")
            tracked.log_curves()
            tracked.register_model(job.out, stats=job.shards / STATS_FILE, crop=profile.model.crop,
                                   name=f"vgg-{config}",
                                   tags={key: value for key, value in tags.items() if not key.startswith("mlflow.")})
    except VGGError:
        raise
    except Exception as error:  # MLflow failed after the training: the model is kept, and the line says so
        raise unrecorded(job.out, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}") from None
    return metrics


def _worker_resources(*, workers: int, use_gpu: bool) -> dict[str, float]:
    """Per-worker resources, after checking the cluster can place them (otherwise Ray would wait forever).

    On CPUs each worker gets the most whole CPUs that still lets every worker fit on some node (torch runs as many
    threads as its worker has CPUs): 2 workers on one 2-core machine get 1 each; on two 2-CPU nodes, 2 each, one
    worker per node.
    """
    if use_gpu:
        worker = {"CPU": 1.0, "GPU": 1.0}
        fits = placeable(worker)
        if fits < workers:
            gpus = ray.cluster_resources().get("GPU", 0.0)
            raise ClusterError(
                f"train.workers={workers} with use_gpu needs {workers} GPUs, each with a CPU on its node, but the Ray "
                f"cluster can place {fits} (it has {gpus:g} GPUs); lower --workers or add GPU nodes"
            )
        return worker
    node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
    if sum(node_cpus) < workers:
        raise ClusterError(
            f"train.workers={workers} needs {workers} CPUs but the Ray cluster has {sum(node_cpus)}; lower --workers "
            "or add nodes"
        )
    per_worker = max(c for c in range(1, max(node_cpus) + 1) if sum(n // c for n in node_cpus) >= workers)
    return {"CPU": float(per_worker)}


def _train_worker(loop_config: dict[str, Any]) -> DivergenceError | None:
    """Runs on every Ray Train worker: build loaders for this rank, the model, its initialisation; call `fit`.
    Returns (rank 0's return value is the run's `Result.return_value`) the DivergenceError that stopped `fit`."""
    # Ray Train logs every report (metrics, checkpoint path) at INFO once per rank, through `ray.train` and through
    # the root logger (a logger named by its file path), which LoggingConfig does not reach: workers say only what
    # needs attention.
    for name in ("", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    job = TrainJob.from_dict(loop_config["job"])
    profile, train = job.profile, job.train_config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Ray gives torch one thread per CPU of this worker, but the loader's worker processes decode on the same
        # CPUs: an oversubscribed thread pool makes every op wait on a preempted thread (1.6x slower per epoch on
        # 2 cores with 1 loader worker). Leave them their cores.
        torch.set_num_threads(max(1, torch.get_num_threads() - profile.data.loader_workers))
    scale = job.scale_range
    header = checkpoint.header(config=job.config, profile=profile, scale=scale, kind=job.scale)

    model = from_config(job.config, profile.model, warm=job.warm_start,
                        generator=torch.Generator().manual_seed(train.seed))
    resume = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            resume = checkpoint.load(Path(directory) / CHECKPOINT_FILE, expect_config=job.config)
        if rank == 0:  # after a worker or driver crash: say where the run picks up
            state = resume["train"]
            logger.warning(f"{loop_config['name']}: resuming from its checkpoint after optimizer step "
                           f"{state['global_step']} (epoch {state['epoch'] + 1}, {state['step_in_epoch']} steps into it)")
    elif job.init is not None:
        _initialise_from(model, job)
    precision.place(model, config=train, device=device)
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    index = read_index(job.shards)
    preprocess = Preprocess(read_stats(job.shards))
    dtype = precision.resolve(train.precision, device)
    channels_last = precision.channels_last(train.channels_last, device=device, dtype=dtype)
    workers = profile.data.loader_workers
    decode_device = device if profile.data.decode == "device" else None

    def batches(epoch: int, start: int):
        return train_batches(job.shards, scale=scale, crop=profile.model.crop, batch_size=train.micro_batch,
                             rank=rank, world_size=world, workers=workers, epoch=epoch, seed=train.seed,
                             start_batch=start, decode_device=decode_device)

    def validate(core: torch.nn.Module) -> tuple[float, float]:
        val = val_batches(job.shards, q=scale.single_q, crop=profile.model.crop, batch_size=train.micro_batch,
                          rank=rank, world_size=world, workers=workers)
        return evaluate_errors(model=core, batches=val, preprocess=preprocess, device=device, dtype=dtype,
                               channels_last=channels_last)

    class RayHooks(Hooks):
        """Every rank reports (Ray's report is a barrier); only rank 0 writes and attaches the checkpoint."""

        def on_epoch_end(self, metrics, checkpoint_fn):
            self._report(metrics, checkpoint_fn() if rank == 0 else None)

        def on_checkpoint(self, payload):
            self._report({"step": float(payload["train"]["global_step"])}, payload if rank == 0 else None)

        @staticmethod
        def _report(metrics, payload):
            if payload is None:
                ray.train.report(metrics)
                return
            with tempfile.TemporaryDirectory() as directory:
                checkpoint.save(Path(directory) / CHECKPOINT_FILE, payload)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))

    try:
        fit(model=model, config=train, lr=job.lr, batches=batches,
            steps_per_epoch=batches_per_epoch(index, batch_size=train.micro_batch, world_size=world),
            validate=validate, preprocess=preprocess, device=device, header=header, hooks=RayHooks(),
            resume=resume, progress=loop_config["progress"] and rank == 0)
    except DivergenceError as error:
        # Every rank raises it at the same step (`fit` checks the summed loss and the shared weights), and a retry
        # from the last checkpoint would diverge again there. Raised, Ray would retry it max_failures times first;
        # returned, it ends the run, and `fit_trainer` raises it.
        return error
    return None


def _initialise_from(model: Any, job: TrainJob) -> None:
    """§3.1: B..E start from a trained A (warm start); a higher or jittered S starts from the same configuration."""
    source = load_model(job.init, model_config=job.profile.model)
    if source.name == job.config:
        model.load_state_dict(source.state_dict())
    else:
        warm_start(model, source)


class EpochLog(UserCallback):
    """Runs in Ray Train's controller (one process, whatever the number of workers, on the driver's node): appends
    rank 0's per-epoch metrics to a JSON-lines file, which the driver relays to its one MLflow run
    (`pipelines.tracking.MetricsRelay`)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        epoch_metrics = metrics[0]
        if "epoch" in epoch_metrics:  # not a mid-epoch checkpoint report
            with open(self.path, "a") as file:
                file.write(json.dumps({"step": int(epoch_metrics["epoch"]), "metrics": epoch_metrics}) + "\n")


def _check_writable(directory: Path, option: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ConfigError(f"{option}: cannot write to {directory} ({error.strerror}); pick a writable path") from None
