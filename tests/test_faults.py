"""Faults around a training run, through the `vgg` binary: the same `vgg train` started twice at once, MLflow dying
or restarting while a training runs, outputs that cannot be written. Each ends in one line, and nothing written is
lost."""

from __future__ import annotations

import pytest
import os
import subprocess
import time
from pathlib import Path

import torch

from tests.conftest import BIN, stop_group
from pipelines.cluster import free_port
from vgg.models import checkpoint

pytestmark = pytest.mark.slow  # starts Ray, an MLflow server or `vgg` runs: `pytest -m 'not slow'` skips it

RUN_TIMEOUT_S = 420


def _env(ray_cluster: dict, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return {**env, "RAY_ADDRESS": ray_cluster["address"], "PYTHONUNBUFFERED": "1", **extra}


def _train(params: Path, shards: Path, out: Path, storage: Path, *extra: str) -> list[str]:
    return [str(BIN / "vgg"), "train", "--params", str(params), "--config", "A", "--scale", "low", "--shards",
            str(shards), "--out", str(out), "--storage", str(storage), *extra]


def test_the_same_training_started_twice_runs_once_and_both_write_the_same_model(ray_cluster, tiny_params,
                                                                                  tiny_shards, tmp_path):
    storage = tmp_path / "ray_results"
    commands = [_train(tiny_params, tiny_shards, tmp_path / f"{name}.pt", storage, "--no-track") for name in "ab"]
    runs = [subprocess.Popen(command, cwd=tmp_path, env=_env(ray_cluster), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for command in commands]
    outputs = [run.communicate(timeout=2 * RUN_TIMEOUT_S) for run in runs]
    for run, (_, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-3000:]
    assert sum("waiting for another process training run" in stderr for _, stderr in outputs) == 1
    a, b = (checkpoint.load(tmp_path / f"{name}.pt")["model"] for name in "ab")
    assert all(torch.equal(a[key], b[key]) for key in a)


def _mlflow_server(tmp_path: Path, port: int) -> subprocess.Popen:
    """An MLflow server on 127.0.0.1:`port` over the store in `tmp_path`, once it answers /health."""
    with open(tmp_path / "server.log", "a") as log:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri",
             f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/health"], capture_output=True).returncode:
        if server.poll() is not None or time.monotonic() > deadline:
            stop_group(server)
            pytest.fail((tmp_path / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    return server


def _train_until_checkpointed(command: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """`command` started, once its first checkpoint is in Ray's storage: the training is under way, and tracked."""
    training = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not list((tmp_path / "ray_results").glob("**/checkpoint_*")):
        if training.poll() is not None or time.monotonic() > deadline:
            training.kill()
            pytest.fail(training.communicate()[1][-3000:])
        time.sleep(0.2)
    return training


def test_mlflow_dying_during_a_training_keeps_the_model_and_says_so(ray_cluster, tiny_params, tiny_shards, tmp_path):
    port = free_port()
    server = _mlflow_server(tmp_path, port)
    out = tmp_path / "a.pt"
    command = _train(tiny_params, tiny_shards, out, tmp_path / "ray_results", "--set", "train.max_epochs=6",
                     "--set", "train.patience=20")
    # MLflow's client retries a failed request for ~4 min by default (docs/errors.md); here it gives up at once
    env = _env(ray_cluster, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    try:
        training = _train_until_checkpointed(command, tmp_path, env)
        stop_group(server)
        _, stderr = training.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        stop_group(server)
    assert training.returncode == 3, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    last = lines[-1]
    assert last.startswith(f"error: training finished and {out} is written, but MLflow failed to record it"), last
    assert last.endswith("the model is kept")
    # said when recording stopped, not only once the (possibly days-long) training has ended
    assert any(line.startswith("warning: MLflow stopped recording this training (") for line in lines[:-1]), stderr
    assert checkpoint.load(out, expect_config="A")["config"] == "A"


def test_an_mlflow_server_back_within_the_retries_loses_no_epoch(ray_cluster, tiny_params, tiny_shards, tmp_path):
    """MLflow's own retries (default: 7, each wait twice the last) carry a training over a server restart: the
    run ends FINISHED with every epoch's metrics."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    server = _mlflow_server(tmp_path, port)
    epochs = 6
    command = _train(tiny_params, tiny_shards, tmp_path / "a.pt", tmp_path / "ray_results", "--set",
                     f"train.max_epochs={epochs}", "--set", "train.patience=20")
    env = _env(ray_cluster, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    try:
        training = _train_until_checkpointed(command, tmp_path, env)
        stop_group(server)
        time.sleep(3)
        server = _mlflow_server(tmp_path, port)  # the same store, the same address
        _, stderr = training.communicate(timeout=RUN_TIMEOUT_S)
        assert training.returncode == 0, stderr[-3000:]
        assert "warning: MLflow" not in stderr, stderr[-3000:]
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    filter_string="tags.stage = 'train'")
        steps = {metric.step for metric in client.get_metric_history(run.info.run_id, "train/loss")}
    finally:
        stop_group(server)
    assert run.info.status == "FINISHED"
    assert steps == set(range(1, epochs + 1)), steps


def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tiny_params, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    cases = {
        "evaluate": [str(BIN / "vgg"), "evaluate", str(tmp_path / "missing.pt"), "--params", str(tiny_params),
                     "--shards", str(tmp_path), "--out", str(blocked / "out.npz")],
        "fuse": [str(BIN / "vgg"), "fuse", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out",
                 str(blocked / "out.npz")],
    }
    for name, command in cases.items():
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr == f"error: --out {blocked} exists and is not a directory; choose a directory\n", name
    assert blocked.read_text() == "not a directory"

