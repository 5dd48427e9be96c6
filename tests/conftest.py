"""Shared, real test infrastructure: servers and clusters are started once per session, on loopback, and stopped
by their own process handles (never `ray stop`/`pkill`, which would hit processes the tests did not start)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(process: subprocess.Popen) -> None:
    """Stop a server started with start_new_session=True: its whole process group (MLflow spawns workers)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend; yields its URI."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(home / "server.log", "w")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        stop_group(process)
        log.close()


def _ray_start(args: list[str], log_path: Path) -> subprocess.Popen:
    """`ray start` daemonises into the process group of the Popen below; that group is what we stop later."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(BIN / "ray"), "start", *args, "--disable-usage-stats"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if process.wait(timeout=120) != 0:
            stop_ray_group(process.pid)
            raise RuntimeError(f"ray start failed: {log_path.read_text()[-2000:]}")
    return process


def stop_ray_group(pgid: int) -> None:
    """Stop the Ray daemons of one `ray start` by their process group: TERM, then KILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.3)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real two-node local Ray cluster on 127.0.0.1 (head + one joined node), shared by every Ray test.

    Yields the GCS address (`127.0.0.1:PORT`); tests pass it as RAY_ADDRESS. Each node has 2 logical CPUs so
    two single-CPU workers can be placed one per node (STRICT_SPREAD) or both on one.
    """
    temp = Path(tempfile.mkdtemp(prefix="vgg-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
    head = _ray_start(
        ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--num-cpus", "2", "--temp-dir", str(temp)],
        temp / "head.log",
    )
    groups = [head.pid]
    try:
        node = _ray_start(
            ["--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", "--num-cpus", "2"],
            temp / "node.log",
        )
        groups.append(node.pid)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "temp": temp}
    finally:
        for pgid in reversed(groups):
            stop_ray_group(pgid)
        shutil.rmtree(temp, ignore_errors=True)


# A tiny profile of the same protocol for tests: 4 classes, a few dozen images, 2 epochs. Same keys as params.yaml.
TINY_OVERRIDES = {
    "synth": {"classes": 4, "train_per_class": 32, "val_per_class": 8, "min_side": 48, "max_side": 96, "seed": 0},
    "data": {"shard_size": 16, "loader_workers": 0},
    "model": {"num_classes": 4, "fc_width": 32},
    "train": {"batch_size": 16, "micro_batch": 8, "max_epochs": 2, "patience": 1},
    "eval": {"batch_size": 64},
}


@pytest.fixture(scope="session")
def tiny_params(tmp_path_factory) -> Path:
    """A params.yaml whose active profile `tiny` is the small profile shrunk to seconds (TINY_OVERRIDES)."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tiny = params["profiles"]["small"]
    for section, values in TINY_OVERRIDES.items():
        tiny[section].update(values)
    params["profiles"]["tiny"] = tiny
    params["profile"] = "tiny"
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_params) -> Path:
    """Real `vgg synth` + `vgg ingest` output of the tiny profile, made once per session (read-only for tests)."""
    from pipelines.params import load_profile
    from vgg.data.shards import ingest
    from vgg.data.synthetic import synthesize

    profile = load_profile(tiny_params)
    root = tmp_path_factory.mktemp("tiny-data")
    synthesize(root / "raw", profile.synth, workers=1)
    ingest(root / "raw", root / "shards", max_side=profile.data.max_side, shard_size=profile.data.shard_size, workers=1)
    return root / "shards"
