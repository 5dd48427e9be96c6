"""`vgg train` on Ray Train V2, end to end, on the shared real two-node Ray cluster and a real MLflow server.

The expensive things are shared: one tracked 2-worker A run (`trained_a`) is the subject of the tracking checks,
the source of the warm-start chain and the reference weights for the fault-tolerance run (whose training is the
same: only `checkpoint_every`, which does not touch the weights, differs). Bad-input runs are started together.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors, list_jobs

from pipelines import cli
from pipelines.cluster import STORAGE_SHARED_ENV, start, stop
from pipelines.params import load_profile
from pipelines.provenance import file_sha256
from pipelines.ray_train import TrainJob, _initialise_from, _lr_option, check_job, run
from pipelines.tracking import RESUME_TAG, flatten
from tests.conftest import TOKEN, free_port
from vgg.config import Profile
from vgg.data.loader import batches_per_epoch, train_batches
from vgg.data.preprocessing import Preprocess
from vgg.data.shard_format import read_index, read_stats
from vgg.errors import ConfigError
from vgg.evaluate.results import Posteriors
from vgg.models import checkpoint, from_config
from vgg.models.io import load_model
from vgg.train.loop import fit

pytestmark = pytest.mark.slow  # starts Ray, an MLflow server or `vgg` runs: `pytest -m 'not slow'` skips it

VGG = Path(sys.executable).parent / "vgg"  # the real console script of this venv
RUN_TIMEOUT_S = 420  # one `vgg train` of the tiny profile; generous: the 2 cores are shared
RESUMED = re.compile(r"resuming from its checkpoint after optimizer step (\d+)")
WARM_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")  # §3.1: A's layers reused by B-E
TAG_KEYS = {"stage", "config", "scale", "scale_kind", "profile", "git_commit", "init_source"}


@pytest.fixture
def ray_driver():
    """For in-process runs: the driver's `ray.init` (joined to the shared cluster) ends with the test."""
    yield
    ray.shutdown()


def _env(ray_cluster: dict, **extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "RAY_USAGE_STATS_ENABLED": "0",
            "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736",
            "PYTHONUNBUFFERED": "1", **extra}


def _train_command(params: Path, shards: Path, *, config: str, scale: str, out: str, extra: tuple[str, ...] = ()
                   ) -> list[str]:
    return [str(VGG), "train", "--params", str(params), "--config", config, "--scale", scale, "--shards", str(shards),
            "--out", out, *extra]


def _vgg(command: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _job(profile: Profile, shards: Path, *, config: str, scale: str, init: Path | None, tmp: Path) -> TrainJob:
    return TrainJob(profile=profile, config=config, scale=scale, init=init, shards=shards.absolute(),
                    out=tmp / f"{config}-{scale}.pt", storage=tmp / "ray_results", max_failures=0,
                    storage_shared=True)  # the shared cluster's nodes are on this machine


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def _assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    differ = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not differ, f"weights differ from the uninterrupted run in {differ}"


def _train_workers(ray_cluster: dict, *, driver_pid: int, alive: bool = False) -> list:
    """The Ray Train worker actors of the `vgg train` process `driver_pid` (its Ray job) on the shared cluster;
    workers of an earlier run can still be listed alive while they shut down."""
    jobs = [job.job_id for job in list_jobs(address=ray_cluster["dashboard"])
            if job.driver_info and job.driver_info.pid == str(driver_pid)]
    if not jobs:
        return []
    filters = [("job_id", "=", jobs[0]), ("class_name", "=", "RayTrainWorker")] + ([("state", "=", "ALIVE")] if alive
                                                                                   else [])
    return list_actors(address=ray_cluster["dashboard"], filters=filters, detail=True)


def _wait(condition: Callable[[], object], what: str, *, process: subprocess.Popen, log: Path,
          timeout_s: float = RUN_TIMEOUT_S) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"`vgg train` exited ({process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


@dataclasses.dataclass(frozen=True)
class TrainedA:
    out: Path
    process: subprocess.CompletedProcess
    pid: int
    job: TrainJob
    runs_before: int  # MLflow runs in the profile's experiment before the run


@pytest.fixture(scope="module")
def trained_a(ray_cluster, mlflow_server, tiny_params, tiny_shards, tmp_path_factory) -> TrainedA:
    """`vgg train` of A at scale low with 2 Ray workers, tracked to the MLflow server (the real console script)."""
    tmp = tmp_path_factory.mktemp("train-a")
    client = MlflowClient(mlflow_server)
    profile = load_profile(tiny_params, overrides=["train.workers=2"])
    experiment = client.get_experiment_by_name(f"vgg-{profile.name}")
    before = len(_stage_runs(client, experiment.experiment_id)) if experiment else 0
    command = _train_command(tiny_params, tiny_shards, config="A", scale="low", out="a.pt", extra=("--workers", "2"))
    process = subprocess.Popen(command, cwd=tmp, env=_env(ray_cluster, MLFLOW_TRACKING_URI=mlflow_server),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert done.returncode == 0, stderr[-3000:]
    job = TrainJob(profile=profile, config="A", scale="low", init=None, shards=tiny_shards.absolute(),
                   out=tmp / "a.pt", storage=tmp / "ray_results", max_failures=2)
    return TrainedA(out=tmp / "a.pt", process=done, pid=process.pid, job=job, runs_before=before)


# 1. `vgg train` through the real console script, tracked -------------------------------------------------------


def test_vgg_train_writes_a_final_model(trained_a):
    payload = checkpoint.load(trained_a.out)
    assert "train" not in payload  # a final model file, no resume state
    assert payload["config"] == "A"
    assert payload["scale"] == {"s_min": 40, "s_max": 40} and payload["scale_kind"] == "low"
    model = load_model(trained_a.out)
    assert model.name == "A" and model.num_classes == 4
    assert trained_a.process.stdout.strip().splitlines()[-1].startswith(f"wrote a.pt: epoch {_epochs(trained_a)},")


def test_vgg_evaluate_runs_as_one_ray_task_where_the_profile_says(trained_a, ray_cluster, tiny_params, tiny_shards,
                                                                   tmp_path):
    """eval.device=ray (the paper profile's: the head that runs dvc has no GPU) computes the same posteriors as this
    machine, in a task on the cluster; on a GPU profile, a cluster without GPUs is one line and writes nothing."""
    base = [str(VGG), "evaluate", str(trained_a.out), "--params", str(tiny_params), "--shards", str(tiny_shards),
            "--mode", "dense", "--scales", "multi"]
    here = _vgg(base + ["--out", "here.npz", "--single-out", "here-1.npz", "--device", "cpu"], cwd=tmp_path,
                env=_env(ray_cluster))
    assert here.returncode == 0, here.stderr[-3000:]
    remote = _vgg(base + ["--out", "ray.npz", "--single-out", "ray-1.npz", "--set", "eval.device=ray"], cwd=tmp_path,
                  env=_env(ray_cluster))
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "(posteriors pid=" in remote.stdout + remote.stderr  # the task's progress, relayed by Ray
    for suffix in ("", "-1"):
        expected, actual = (Posteriors.load(tmp_path / f"{name}{suffix}.npz") for name in ("here", "ray"))
        assert actual.keys == expected.keys and actual.meta == expected.meta
        np.testing.assert_allclose(actual.probs, expected.probs, atol=1e-6)  # threads differ: sums in another order
    gpu = _vgg(base + ["--out", "gpu.npz", "--set", "eval.device=ray", "--set", "train.use_gpu=true"], cwd=tmp_path,
               env=_env(ray_cluster))
    assert gpu.returncode == 2 and gpu.stderr.strip().splitlines()[-1] == (
        "error: eval.device=ray on a GPU profile needs a GPU but the Ray cluster has none; add a GPU node, or "
        "evaluate on this machine with --device auto")
    assert not (tmp_path / "gpu.npz").exists()


def test_a_gpu_no_node_can_host_is_one_line_not_a_wait(trained_a, ray_cluster, tiny_params, tiny_shards, tmp_path):
    """Ray places a task, worker or trial's worker on one node: a GPU whose node has no CPU to spare can host none,
    and asking for it would wait forever. Joined for this test only: a node with one (logical) GPU and no CPU."""
    node = start(["--address", ray_cluster["address"], "--node-ip-address", "127.0.0.1", "--num-cpus", "0",
                  "--num-gpus", "1"], tmp_path / "gpu-node.log", token=TOKEN)
    runs: dict[str, subprocess.Popen] = {}
    try:
        gpu = ("--set", "train.use_gpu=true")
        commands = {
            "evaluate": [str(VGG), "evaluate", str(trained_a.out), "--params", str(tiny_params), "--shards",
                         str(tiny_shards), "--mode", "dense", "--scales", "single", "--out", "gpu.npz", "--set",
                         "eval.device=ray", *gpu],
            "train": _train_command(tiny_params, tiny_shards, config="A", scale="low", out="gpu.pt", extra=gpu),
            "tune": [str(VGG), "tune", "--params", str(tiny_params), "--config", "A", "--shards", str(tiny_shards),
                     "--trials", "1", "--max-epochs", "1", "--storage", "ray", "--out", "best.yaml", *gpu],
        }
        runs = {name: subprocess.Popen(command, cwd=tmp_path, env=_env(ray_cluster), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True) for name, command in commands.items()}
        lines = {}
        for name, process in runs.items():
            _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
            assert process.returncode == 2, stderr[-3000:]
            lines[name] = stderr.strip().splitlines()[-1]
    finally:
        for process in runs.values():  # a command that failed the test above may still be running (or waiting)
            if process.poll() is None:
                process.kill()
                process.wait()
        stop(node)
    assert lines == {
        "evaluate": "error: eval.device=ray on a GPU profile needs a node with a GPU and 1 CPUs (its decode threads: "
                    "data.loader_workers) but no GPU node of the Ray cluster has 1 CPUs; lower data.loader_workers, "
                    "or evaluate on this machine with --device auto",
        "train": "error: train.workers=1 with use_gpu needs 1 GPUs, each with a CPU on its node, but the Ray cluster "
                 "can place 0 (it has 1 GPUs); lower --workers or add GPU nodes",
        "tune": "error: one trial with train.workers=1 needs 1 workers, each with 1 CPU and 1 GPU on one node, but the "
                "nodes of the Ray cluster can place 0; lower train.workers or add nodes",
    }
    assert not any((tmp_path / name).exists() for name in ("gpu.npz", "gpu.pt", "best.yaml"))


def _epochs(trained_a: TrainedA) -> int:
    return int(re.search(r"wrote a\.pt: epoch (\d+),", trained_a.process.stdout).group(1))


def _stage_runs(client: MlflowClient, experiment_id: str) -> list:
    """The experiment's runs but the protocol parents (which only group a protocol execution's stage runs)."""
    return [run for run in client.search_runs([experiment_id]) if run.data.tags.get("stage") != "protocol"]


def test_vgg_train_is_one_mlflow_run_with_params_curves_artifacts_and_a_registered_model(trained_a, mlflow_server):
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("vgg-tiny")
    runs = _stage_runs(client, experiment.experiment_id)
    assert len(runs) == trained_a.runs_before + 1, "a 2-worker run must be exactly one MLflow run"
    (logged,) = [r for r in runs if r.data.tags.get(RESUME_TAG) == trained_a.job.run_name]
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "train-A-40"

    profile = trained_a.job.profile
    assert logged.data.params == {**flatten(profile.to_dict()), "job.config": "A", "job.scale": "low",
                                  "job.lr": str(profile.train.lr), "job.init": ""}

    epochs = _epochs(trained_a)
    assert 1 <= epochs <= profile.train.max_epochs
    for key in ("train/loss", "val/top1_err", "val/top5_err", "lr", "train/images_per_s"):
        history = client.get_metric_history(logged.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key  # one value per epoch, rank 0's
    first_lr = [m.value for m in client.get_metric_history(logged.info.run_id, "lr") if m.step == 1]
    assert first_lr == [profile.train.lr]

    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"profile.json", "curves.png"} <= artifacts

    (version,) = [v for v in client.search_model_versions("name='vgg-A'") if v.run_id == logged.info.run_id]
    assert version.tags.keys() == TAG_KEYS
    assert version.tags == {key: logged.data.tags[key] for key in TAG_KEYS}
    assert version.tags["config"] == "A" and version.tags["scale"] == "40" and version.tags["stage"] == "train"

    # What the runs table shows: its source (the command, the commit), its dataset, its parent protocol run, and
    # the model it wrote, which loads in one line and gives the written model's posteriors.
    tags = logged.data.tags
    assert tags["mlflow.source.name"] == "vgg train" and tags["mlflow.source.git.commit"]
    assert tags["vgg.model_sha256"] == file_sha256(trained_a.out)
    parent = client.get_run(tags["mlflow.parentRunId"])
    assert parent.data.tags["stage"] == "protocol" and parent.info.run_name == "protocol-tiny"
    (dataset,) = logged.inputs.dataset_inputs
    assert dataset.dataset.name == "shards-tiny" and dataset.dataset.digest == file_sha256(
        trained_a.job.shards / "index.json")[:12]
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    loaded = mlflow.pyfunc.load_model(f"models:/vgg-A/{version.version}")
    images = np.random.default_rng(0).uniform(0, 255, (2, 3, 32, 32)).astype(np.float32)
    model = load_model(trained_a.out)
    stats = read_stats(trained_a.job.shards)
    with torch.no_grad():
        expected = torch.softmax(model(Preprocess(stats)(torch.from_numpy(images))), dim=1).numpy()
    np.testing.assert_allclose(loaded.predict(images), expected, rtol=1e-5, atol=1e-6)
    # And its per-epoch curve beside the model, for `dvc plots show`.
    curve = trained_a.out.with_suffix(".epochs.csv").read_text().splitlines()
    assert curve[0] == "epoch,train_loss,val_top1_err,val_top5_err,lr" and len(curve) == 1 + _epochs(trained_a)


def test_the_two_workers_ran_one_per_node(trained_a, ray_cluster):
    """Each worker asks for as many whole CPUs as still lets every worker fit on a node: 2 on these 2-CPU nodes."""
    workers = _train_workers(ray_cluster, driver_pid=trained_a.pid)
    assert len(workers) == 2
    assert len({w.node_id for w in workers}) == 2


# 2. The warm-start chain A -> D (low) -> D (high) -> D (jitter), §3.1 -------------------------------------------


def test_warm_start_chain_copies_the_right_layers_and_fine_tunes_with_the_lower_lr(trained_a, tiny_params,
                                                                                 tiny_shards, tmp_path):
    profile = load_profile(tiny_params)
    seed = profile.train.seed
    a = load_model(trained_a.out)

    def fresh_d(warm: bool = False) -> torch.nn.Module:  # what `_train_worker` builds before initialising
        return from_config("D", profile.model, warm=warm, generator=torch.Generator().manual_seed(seed))

    # D at the low scale starts from the trained A: its first four convs and fc6-8, the rest as initialised.
    d_low_job = _job(profile, tiny_shards, config="D", scale="low", init=trained_a.out, tmp=tmp_path)
    check_job(d_low_job)
    assert d_low_job.lr == profile.train.lr and d_low_job.warm_start  # a warm start is not fine-tuning
    d_low, untouched = fresh_d(warm=True), fresh_d(warm=True)  # its own layers: model.warm_init (§3.1)
    assert profile.model.warm_init != profile.model.init
    assert not torch.equal(untouched.named_layers()["conv4_1"].weight, fresh_d().named_layers()["conv4_1"].weight)
    _initialise_from(d_low, d_low_job)
    layers, a_layers, fresh_layers = d_low.named_layers(), a.named_layers(), untouched.named_layers()
    for name, layer in layers.items():
        source = a_layers[name] if name in WARM_LAYERS else fresh_layers[name]
        for key, value in layer.state_dict().items():
            assert torch.equal(value, source.state_dict()[key]), f"{name}.{key}"
    assert not torch.equal(a_layers["conv1_1"].weight, fresh_layers["conv1_1"].weight)  # the check can fail

    # D-high and D-jitter start from D (the same configuration): every weight, and the lower lr.
    previous = d_low
    for scale, init_scale in (("high", "low"), ("jitter", "high")):
        with torch.no_grad():  # stands in for training at the previous scale: every tensor differs from its init
            for parameter in previous.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.01)
        init = tmp_path / f"D-{init_scale}-trained.pt"
        header = checkpoint.header(config="D", profile=profile, scale=profile.scale(init_scale))
        checkpoint.save(init, checkpoint.final({**header, "model": previous.state_dict()}))
        job = _job(profile, tiny_shards, config="D", scale=scale, init=init, tmp=tmp_path)
        check_job(job)
        assert job.lr == profile.train.fine_tune_lr != profile.train.lr and not job.warm_start
        # Fine-tuning is capped at train.fine_tune_epochs; a warm start is not.
        capped = dataclasses.replace(profile, train=dataclasses.replace(profile.train, max_epochs=5, fine_tune_epochs=1))
        assert _job(capped, tiny_shards, config="D", scale=scale, init=init, tmp=tmp_path).train_config == \
            dataclasses.replace(capped.train, max_epochs=1)
        assert _job(capped, tiny_shards, config="D", scale="low", init=trained_a.out,
                    tmp=tmp_path).train_config == capped.train
        model = fresh_d()
        _initialise_from(model, job)
        _assert_same_weights(model.state_dict(), previous.state_dict())
        assert job.run_name != d_low_job.run_name
        previous = model


# 3. DDP through Ray: 2 workers x micro-batch b == 1 process x 2b -------------------------------------------------


def _one_process_update(profile: Profile, shards: Path, *, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Weights after the epoch of `profile` in this process (no Ray, no DDP), reading rank `rank` of `world_size`."""
    train, scale = profile.train, profile.scale("low")
    model = from_config("A", profile.model, generator=torch.Generator().manual_seed(train.seed))
    index = read_index(shards)

    def batches(epoch: int, start: int):
        return train_batches(shards, scale=scale, crop=profile.model.crop, batch_size=train.micro_batch, rank=rank,
                             world_size=world_size, workers=0, epoch=epoch, seed=train.seed, start_batch=start)

    fit(model=model, config=train, lr=train.lr, batches=batches,
        steps_per_epoch=batches_per_epoch(index, batch_size=train.micro_batch, world_size=world_size),
        validate=lambda core: (100.0, 100.0), preprocess=Preprocess(read_stats(shards)), device=torch.device("cpu"),
        header=checkpoint.header(config="A", profile=profile, scale=scale))
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _image_digests(shards: Path, profile: Profile, *, rank: int, world_size: int, batch_size: int) -> list[bytes]:
    return [image.numpy().tobytes() for batch in train_batches(
        shards, scale=profile.scale("low"), crop=profile.model.crop, batch_size=batch_size, rank=rank,
        world_size=world_size, workers=0, epoch=0, seed=profile.train.seed) for image in batch.images]


def test_two_ray_workers_take_the_same_step_as_one_process_with_twice_the_batch(ray_cluster, ray_driver, tiny_params,
                                                                               tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster["address"])
    train_count = read_index(tiny_shards).split("train").count
    # One epoch = one optimizer step over the whole train split; no dropout and fp32, so the update is deterministic.
    same = ["train.max_epochs=1", "model.dropout=0", "train.precision=fp32"]
    ddp_profile = load_profile(tiny_params, overrides=[*same, f"train.batch_size={train_count}",
                                                       f"train.micro_batch={train_count // 2}", "train.workers=2"])
    job = _job(ddp_profile, tiny_shards, config="A", scale="low", init=None, tmp=tmp_path)
    run(job, progress=False)
    ddp = _weights(job.out)

    initial = from_config("A", ddp_profile.model,
                          generator=torch.Generator().manual_seed(ddp_profile.train.seed)).state_dict()
    whole = _one_process_update(load_profile(tiny_params, overrides=[
        *same, f"train.batch_size={train_count}", f"train.micro_batch={train_count}"]), tiny_shards, rank=0,
        world_size=1)
    for key in initial:
        expected = whole[key] - initial[key]
        assert expected.abs().max() > 0, key
        torch.testing.assert_close(ddp[key] - initial[key], expected, rtol=1e-3,
                                   atol=1e-3 * float(expected.abs().max()), msg=key)

    # The check can fail: rank 0's half alone gives a clearly different update.
    half = _one_process_update(load_profile(tiny_params, overrides=[
        *same, f"train.batch_size={train_count // 2}", f"train.micro_batch={train_count // 2}"]), tiny_shards,
        rank=0, world_size=2)
    difference = torch.cat([(half[k] - whole[k]).flatten() for k in initial])
    step = torch.cat([(whole[k] - initial[k]).flatten() for k in initial])
    assert difference.norm() > 0.05 * step.norm()

    # Each rank's micro-batch is a disjoint half of the same augmented images the single process sees.
    ranks = [_image_digests(tiny_shards, ddp_profile, rank=r, world_size=2, batch_size=train_count // 2)
             for r in (0, 1)]
    single = _image_digests(tiny_shards, ddp_profile, rank=0, world_size=1, batch_size=train_count)
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(single)


# 4. Fault tolerance on the real cluster --------------------------------------------------------------------------


def test_a_killed_worker_and_a_killed_driver_resume_from_the_last_checkpoint(ray_cluster, mlflow_server, trained_a,
                                                                             tiny_params, tiny_shards, tmp_path):
    """SIGKILL one Ray Train worker once a checkpoint is committed (Ray restarts the group from it, FailureConfig),
    later SIGKILL the whole `vgg train`; the same command then resumes, and the weights are those of the
    uninterrupted `trained_a` run (the same training; only checkpoint_every differs, which no weight depends on)."""
    extra = ("--workers", "2", "--set", "train.checkpoint_every=1")
    command = _train_command(tiny_params, tiny_shards, config="A", scale="low", out="a.pt", extra=extra)
    env = _env(ray_cluster, MLFLOW_TRACKING_URI=mlflow_server)
    profile = load_profile(tiny_params, overrides=["train.checkpoint_every=1", "train.workers=2"])
    run_name = dataclasses.replace(trained_a.job, profile=profile).run_name
    snapshot = tmp_path / "ray_results" / run_name / "checkpoint_manager_snapshot.json"
    total_steps = int(re.search(r"step (\d+),", trained_a.process.stdout).group(1))

    def committed() -> tuple[str, int] | None:
        """Ray Train's latest committed checkpoint (name, optimizer step): a checkpoint directory appears as soon as
        rank 0 uploads it, but only one every rank has reported (the barrier) is restored after a failure."""
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError):  # not written yet, or caught mid-write
            return None
        return (latest["checkpoint_dir_name"], int(latest["metrics"]["step"])) if latest else None

    def both_workers() -> list | None:
        alive = _train_workers(ray_cluster, driver_pid=first.pid, alive=True)
        return alive if len(alive) == 2 else None

    log = tmp_path / "first.log"
    with open(log, "w") as sink:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        workers = _wait(both_workers, "both Ray Train workers to start", process=first, log=log)
        _, first_step = _wait(committed, "the first committed checkpoint", process=first, log=log)
        victim = workers[-1]
        assert "RayTrainWorker" in Path(f"/proc/{victim.pid}/cmdline").read_text()  # ours: listed by our cluster
        os.kill(victim.pid, signal.SIGKILL)
        restarted = int(_wait(lambda: RESUMED.search(log.read_text()), "the worker group to restart from a "
                              "checkpoint", process=first, log=log).group(1))
        _, later_step = _wait(lambda: (c := committed()) and c[1] > restarted and c, "a checkpoint after the restart",
                              process=first, log=log)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{log.read_text()[-2000:]}"
    assert first_step <= restarted < later_step < total_steps
    assert not (tmp_path / "a.pt").exists()

    again = _vgg(command, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = RESUMED.search(again.stdout + again.stderr)
    assert resumed, "the re-run did not resume from the checkpoint"
    assert later_step <= int(resumed.group(1)) < total_steps
    _assert_same_weights(_weights(tmp_path / "a.pt"), _weights(trained_a.out))

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("vgg-tiny")
    (logged,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RESUME_TAG}` = '{run_name}'")
    assert logged.info.status == "FINISHED"  # the killed attempt's run, continued and finished
    steps = [m.step for m in client.get_metric_history(logged.info.run_id, "val/top1_err")]
    assert len(steps) == len(set(steps)) and max(steps) == _epochs(trained_a)  # no epoch trained (logged) twice


# 5. Bad input: one line `error: ...` on stderr, exit status 2, nothing written -----------------------------------


ERROR_CASES = {
    # name: (expected fragment of the message, how to run it). Each process pays ~10 s of CPU importing torch and
    # Ray, so problems `check_job` finds before Ray starts run through the console script's entry point in this
    # process; one of them, and every case that reaches Ray, MLflow or the profile loader, runs as `vgg train`.
    "init_missing": ("no checkpoint at", {"config": "D", "init": "missing", "in_process": True}),
    "init_truncated": ("is not a readable checkpoint", {"config": "D", "init": "truncated", "in_process": True}),
    "out_not_writable": ("--out: cannot write to /proc/x", {"out": "/proc/x/model.pt", "in_process": True}),
    "batch_beyond_an_epoch": ("one optimizer step needs 32 micro-batches per worker but",  # 128 images, 8 per pass
                              {"set": "train.batch_size=256", "in_process": True}),
    "init_wrong_config": ("holds configuration B; D starts from a trained A", {"config": "D", "init": "b"}),
    "lr_not_positive": ("train.lr: must be > 0", {"set": "train.lr=0"}),
    "batch_does_not_divide": ("batch_size: 16 is not divisible by micro_batch × workers = 8 × 3", {"workers": "3"}),
    "more_workers_than_cpus": ("train.workers=5 needs 5 CPUs but the Ray cluster has 4",
                               {"workers": "5", "set": "train.batch_size=40"}),
    "mlflow_down": ("is not reachable", {"track": True}),
    "diverges": ("training diverged in epoch 1 by optimizer step 8 (lr 10): ",  # the largest lr a profile takes
                 {"set": "train.lr=10", "trains": True}),
    "ray_down": ("cannot connect to RAY_ADDRESS=", {"ray": "closed"}),
    "storage_uri": ("--storage s3://bucket/runs: Ray storage must be a directory path; on a cluster use a file system "
                    "every node mounts", {"storage": "s3://bucket/runs", "in_process": True}),
    # Ray's storage not declared shared on the two-node cluster: refused once connected, before any worker starts.
    "storage_node_local": ("the Ray cluster has 2 nodes and each writes checkpoints there, but the path is not "
                           "declared shared; set VGG_RAY_STORAGE (or --storage) to a directory every node mounts and "
                           "VGG_RAY_STORAGE_SHARED=1 (or --storage-shared)", {"storage": "ray_results",
                                                                              "shared": False}),
}


def _vgg_in_process(argv: list[str], *, cwd: Path) -> tuple[int, str, str]:
    """`vgg ARGV` through the console script's command runner (`pipelines.cli.run_command`, what `main` exits
    with) in this process."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(stdout), redirect_stderr(stderr):
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["vgg", *argv])
        code = cli.run_command()  # anything escaping it is a traceback: the test errors
    return code, stdout.getvalue(), stderr.getvalue()


class ErrorRun(NamedTuple):
    cwd: Path
    returncode: int
    stdout: str
    stderr: str
    pid: int | None  # of the `vgg train` process; None: run in this process


@pytest.fixture(scope="module")
def error_runs(ray_cluster, tiny_params, tiny_shards, tmp_path_factory) -> dict[str, ErrorRun]:
    """Every bad-input `vgg train`: the processes start at once, the in-process cases run while they import."""
    tmp = tmp_path_factory.mktemp("errors")
    profile = load_profile(tiny_params)
    b = tmp / "b.pt"
    model = from_config("B", profile.model, generator=torch.Generator().manual_seed(0))
    header = checkpoint.header(config="B", profile=profile, scale=profile.scale("low"))
    checkpoint.save(b, checkpoint.final({**header, "model": model.state_dict()}))
    truncated = tmp / "truncated.pt"
    truncated.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
    inits = {"missing": tmp / "missing.pt", "b": b, "truncated": truncated}
    started, in_process, results = {}, {}, {}
    for name, (_, case) in ERROR_CASES.items():
        cwd = tmp / name
        cwd.mkdir()
        extra = ["--no-track"] if not case.get("track") else []
        if "init" in case:
            extra += ["--init", str(inits[case["init"]])]
        if "workers" in case:
            extra += ["--workers", case["workers"]]
        if "set" in case:
            extra += ["--set", case["set"]]
        if "storage" in case:
            extra += ["--storage", case["storage"]]
        command = _train_command(tiny_params, tiny_shards, config=case.get("config", "A"), scale="low",
                                 out=case.get("out", "model.pt"), extra=tuple(extra))
        if case.get("in_process"):
            in_process[name] = (cwd, command)
            continue
        env = _env(ray_cluster, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")  # closed; only where tracked
        if case.get("ray") == "closed":
            env["RAY_ADDRESS"] = f"127.0.0.1:{free_port()}"
        if case.get("shared") is False:
            env.pop(STORAGE_SHARED_ENV)
        started[name] = (cwd, subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True))
    for name, (cwd, command) in in_process.items():
        results[name] = ErrorRun(cwd, *_vgg_in_process(command[1:], cwd=cwd), pid=None)
    for name, (cwd, process) in started.items():
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
        results[name] = ErrorRun(cwd, process.returncode, stdout, stderr, process.pid)
    return results


@pytest.mark.parametrize("name", ERROR_CASES)
def test_bad_input_is_one_clear_line(error_runs, name):
    cwd, returncode, stdout, stderr, _ = error_runs[name]
    expected = ERROR_CASES[name][0]
    lines = [line for line in stderr.splitlines() if line.strip()]
    if ERROR_CASES[name][1].get("trains"):  # Ray's log lines and the progress bars come first
        lines = lines[-1:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert returncode == 2, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert not (cwd / "model.pt").exists()


def test_node_local_storage_on_two_nodes_stops_before_training(error_runs, ray_cluster):
    """Refused once connected to the cluster, before Ray Train starts: no run directory, no lock, no worker."""
    run = error_runs["storage_node_local"]
    assert f"error: --storage {run.cwd / 'ray_results'}: the Ray cluster has 2 nodes" in run.stderr
    assert list((run.cwd / "ray_results").iterdir()) == []
    assert _train_workers(ray_cluster, driver_pid=run.pid) == []


def test_vgg_tune_refuses_node_local_storage_on_two_nodes_too(ray_cluster, tiny_params, tiny_shards, tmp_path):
    env = {key: value for key, value in _env(ray_cluster).items() if key != STORAGE_SHARED_ENV}
    command = [str(VGG), "tune", "--params", str(tiny_params), "--config", "A", "--shards", str(tiny_shards),
               "--trials", "1", "--max-epochs", "1", "--out", "best.yaml", "--no-track"]
    done = _vgg(command, cwd=tmp_path, env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: --storage {tmp_path / 'ray_results'}: the Ray cluster has 2 nodes and each writes checkpoints there, but the path "
        "is not declared shared; set VGG_RAY_STORAGE (or --storage) to a directory every node mounts and "
        "VGG_RAY_STORAGE_SHARED=1 (or --storage-shared)"]
    assert not (tmp_path / "best.yaml").exists() and not (tmp_path / "ray_results").exists()


def test_a_diverging_run_is_not_retried(error_runs, ray_cluster, tiny_params):
    """It would diverge again at the same step: one worker group, not 1 + --max-failures (default 2) of them."""
    workers = _train_workers(ray_cluster, driver_pid=error_runs["diverges"].pid)
    assert len(workers) == load_profile(tiny_params).train.workers, [worker.state for worker in workers]
    assert error_runs["diverges"].stderr.rstrip().endswith("was written from these weights. Lower the learning "
                                                           "rate (train.lr)")


def test_a_job_resolves_its_scale_and_its_init_once(tiny_params, tiny_shards, tmp_path):
    """The scale's kind gives its S once, when the job is made (again for a Tune trial's profile); the init
    checkpoint's configuration is read then too, not at each `lr` or `warm_start`."""
    profile = load_profile(tiny_params)
    init = tmp_path / "A.pt"
    header = checkpoint.header(config="A", profile=profile, scale=profile.scale("low"))
    checkpoint.save(init, checkpoint.final({**header, "model": from_config("A", profile.model).state_dict()}))
    job = _job(profile, tiny_shards, config="D", scale="high", init=init, tmp=tmp_path)
    assert job.scale_range == profile.scales.high and job.init_config == "A"
    init.unlink()
    assert job.warm_start and job.lr == profile.train.lr  # no file read: it is gone
    wider = load_profile(tiny_params, overrides=["scales.high={s_min: 64, s_max: 64}"])
    trial = dataclasses.replace(_job(profile, tiny_shards, config="A", scale="high", init=None, tmp=tmp_path),
                                profile=wider)
    assert trial.scale_range.s_min == 64 and trial.run_name.split("-")[2] == "64"
    with pytest.raises(ConfigError, match="scale: unknown training scale 'huge'; choose one of low, high, jitter"):
        _job(profile, tiny_shards, config="A", scale="huge", init=None, tmp=tmp_path)


def test_a_divergence_names_the_option_that_set_the_lr(tiny_params, tiny_shards, tmp_path):
    profile = load_profile(tiny_params)
    inits = {}
    for config in ("A", "D"):
        inits[config] = tmp_path / f"{config}.pt"
        header = checkpoint.header(config=config, profile=profile, scale=profile.scale("low"))
        model = from_config(config, profile.model, generator=torch.Generator().manual_seed(0))
        checkpoint.save(inits[config], checkpoint.final({**header, "model": model.state_dict()}))
    cases = {("A", None): "train.lr", ("D", None): "train.lr, or warm-start from a trained A: --init, §3.1",
             ("D", "A"): "train.lr", ("D", "D"): "train.fine_tune_lr: this run fine-tunes its own configuration"}
    for (config, init), option in cases.items():
        job = _job(profile, tiny_shards, config=config, scale="high", init=inits.get(init), tmp=tmp_path)
        assert _lr_option(job) == option, (config, init)
