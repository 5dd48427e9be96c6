"""Shared, real test infrastructure: servers and clusters are started once per session, on loopback, and stopped
by their own process handles (never `ray stop`/`pkill`, which would hit processes the tests did not start)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipelines.cluster import free_port, token_env, write_token

# A new user's machine: the session and every process it starts see an empty home and XDG directories, so nothing
# the developer's home holds (a Ray token, DVC, MLflow or pip configuration, caches) can make a test pass.
# This module runs twice per session (as pytest's conftest and as `tests.conftest`, which tests import from): the
# second run must find the first one's home and token, or the shared cluster and its clients would hold two tokens.
if "VGG_TEST_HOME" not in os.environ:
    _home = Path(tempfile.mkdtemp(prefix="vgg-test-home-"))
    os.environ.update(VGG_TEST_HOME=str(_home), HOME=str(_home),
                      **{f"XDG_{kind}_HOME": str(_home / f".{kind.lower()}") for kind in ("CONFIG", "CACHE", "DATA",
                                                                                          "STATE")},
                      DVC_SITE_CACHE_DIR=str(_home / "dvc-site-cache"))  # not /var/tmp/dvc, which earlier runs filled
    # The shared cluster's token, set before anything imports Ray (Ray reads RAY_AUTH_MODE once, at import): every
    # in-process driver and every subprocess of the session is a client of that cluster.
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(token_env(write_token(Path(tempfile.mkdtemp(prefix="vgg-test-token-")))))
HOME = Path(os.environ["VGG_TEST_HOME"])
TOKEN = Path(os.environ["RAY_AUTH_TOKEN_PATH"])


def pytest_unconfigure(config) -> None:
    shutil.rmtree(HOME, ignore_errors=True)
    shutil.rmtree(TOKEN.parent, ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node local Ray cluster on 127.0.0.1 (head + one joined node), shared by every Ray test.

    Yields {"address": GCS address for RAY_ADDRESS, "dashboard": job server URL, "temp": session dir}. Each node
    has 2 logical CPUs, so two single-CPU workers can be placed one per node (STRICT_SPREAD) or both on one.
    """
    from pipelines.cluster import STORAGE_SHARED_ENV, local_cluster

    # Both nodes run on this machine, so every path is storage each node sees: the tests (and the jobs submitted to
    # the cluster, which inherit its environment) say so, as a user does for an NFS mount.
    os.environ[STORAGE_SHARED_ENV] = "1"
    try:
        with local_cluster(nodes=2, cpus_per_node=2, token=TOKEN) as cluster:
            yield {"address": cluster.address, "dashboard": cluster.dashboard, "temp": cluster.temp}
    finally:
        os.environ.pop(STORAGE_SHARED_ENV, None)


# A tiny profile of the same protocol for tests: 4 classes, a few dozen images, 2 epochs. Same keys as params.yaml.
TINY_OVERRIDES = {
    "synth": {"classes": 4, "train_per_class": 32, "val_per_class": 8, "min_side": 48, "max_side": 96, "seed": 0},
    "data": {"shard_size": 16, "loader_workers": 0},
    "model": {"num_classes": 4, "fc_width": 32},
    "train": {"batch_size": 16, "micro_batch": 8, "max_epochs": 2, "patience": 1},
    "eval": {"batch_size": 64},
}


def make_project(root: Path, tiny_params: Path, env: dict[str, str], **train: Any) -> Path:
    """A git repository at `root` holding this project's tracked files, with the tiny profile active and its
    `train:` section updated by `train` (committed: DVC experiments need a commit)."""
    import yaml

    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    params = yaml.safe_load(tiny_params.read_text())
    params["profiles"]["tiny"]["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(command, cwd=root, env=env, check=True)
    return root


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
    from vgg.data.ingest import ingest
    from vgg.data.synthetic import synthesize

    profile = load_profile(tiny_params)
    root = tmp_path_factory.mktemp("tiny-data")
    synthesize(root / "raw", profile.synth, workers=1)
    ingest(root / "raw", root / "shards", max_side=profile.data.max_side, shard_size=profile.data.shard_size, workers=1)
    return root / "shards"
