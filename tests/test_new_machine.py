"""A new user's machine: the commands start their own Ray with no token in an empty home and write nothing there;
Ctrl-C and SIGTERM end `vgg train`, `vgg tune` and `vgg demo` with one line, status 130 or 143, no Ray process
left and nothing written lost; and a code edit retrains (Ray Train must not hand back the previous code's run).

Every command here starts its own local Ray (RAY_ADDRESS unset), as on a laptop. A run's processes, Ray's daemons
and workers included, all inherit its environment, so a marker variable set for one command finds whatever of it
is still alive afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, make_project
from vgg.models import checkpoint

pytestmark = pytest.mark.slow  # starts Ray, an MLflow server or `vgg` runs: `pytest -m 'not slow'` skips it

RUN_TIMEOUT_S = 420
LONG = ("--set", "train.max_epochs=200", "--set", "train.patience=200")  # runs until it is interrupted


def _fresh_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], str]:
    """A new user's environment: an empty home, no Ray address or token, no tracking URI; plus a marker."""
    home = tmp_path / "home"
    home.mkdir()
    marker = uuid.uuid4().hex
    drop = {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"}
    env = {key: value for key, value in os.environ.items() if key not in drop and not key.startswith("XDG_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               VGG_TEST_MARKER=marker, **extra)
    return env, marker


def _survivors(marker: str) -> list[str]:
    """Live processes that inherited the marker (Ray's daemons and workers do)."""
    needle = f"VGG_TEST_MARKER={marker}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State"))
                if "zombie" not in state:
                    found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120])
        except (OSError, StopIteration):
            continue
    return found


def _assert_nothing_left(marker: str) -> None:
    deadline = time.monotonic() + 30  # killed processes take a moment to go
    while (left := _survivors(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"


def _interrupt_once(process: subprocess.Popen, sig: int, ready, log: Path) -> tuple[int, str]:
    """Wait until `ready()` (the run has written something worth keeping), send `sig`, wait for the end."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"ended ({process.returncode}) before it could be interrupted:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"never got ready to interrupt:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    process.send_signal(sig)
    try:
        process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running 180 s after {signal.Signals(sig).name}:\n{log.read_text()[-3000:]}")
    return process.returncode, log.read_text()


def _checkpoints(storage: Path) -> list[Path]:
    return sorted(storage.glob("**/checkpoint_*/checkpoint.pt"))


def _assert_one_line(output: str, sig: int) -> None:
    assert "Traceback" not in output, output[-3000:]
    assert output.strip().splitlines()[-1].startswith(f"error: interrupted ({signal.Signals(sig).name})"), (
        output[-3000:])


def _train(params: Path, shards: Path, *extra: str) -> list[str]:
    return [str(BIN / "vgg"), "train", "--params", str(params), "--config", "A", "--scale", "low", "--shards",
            str(shards), "--out", "a.pt", "--storage", "ray_results", *extra]


def test_vgg_train_on_a_machine_without_a_ray_token_writes_nothing_to_home(tiny_params, tiny_shards, tmp_path):
    env, marker = _fresh_env(tmp_path)
    result = subprocess.run(_train(tiny_params, tiny_shards), cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint.load(tmp_path / "a.pt", expect_config="A")["config"] == "A"
    home = tmp_path / "home"
    written = [str(path.relative_to(home)) for path in home.rglob("*") if not path.is_dir()]
    # No ~/.ray/auth_token, no telemetry ids (MLflow's, DVC's): only caches (matplotlib's font list).
    assert all(name.startswith(".cache/") for name in written), written
    _assert_nothing_left(marker)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_vgg_train_stops_cleanly_keeps_its_checkpoint_and_resumes(sig, tiny_params, tiny_shards,
                                                                                   tmp_path):
    env, marker = _fresh_env(tmp_path)
    log = tmp_path / "train.log"
    with open(log, "w") as output:
        process = subprocess.Popen(_train(tiny_params, tiny_shards, *LONG), cwd=tmp_path, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
    code, text = _interrupt_once(process, sig, lambda: _checkpoints(tmp_path / "ray_results"), log)
    assert code == 128 + sig, text[-3000:]
    _assert_one_line(text, sig)
    _assert_nothing_left(marker)
    assert not (tmp_path / "a.pt").exists()  # an interrupted run is never written as the final model
    kept = _checkpoints(tmp_path / "ray_results")
    assert kept
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vgg-tiny").experiment_id], "tags.stage = 'train'")
    assert [run.info.status for run in runs] == ["KILLED"]
    if sig == signal.SIGTERM:
        return  # one resume is enough: it is the same state either way
    # The same command picks up where the interrupted one was (a shorter run, so that it ends).
    short = ("--set", "train.max_epochs=2", "--set", "train.patience=200", "--no-track")
    resumed = subprocess.run(_train(tiny_params, tiny_shards, *short), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_an_interrupted_vgg_tune_stops_cleanly(sig, tiny_params, tiny_shards, tmp_path):
    env, marker = _fresh_env(tmp_path)
    log = tmp_path / "tune.log"
    command = [str(BIN / "vgg"), "tune", "--params", str(tiny_params), "--config", "A", "--shards", str(tiny_shards),
               "--trials", "2", "--max-epochs", "200", "--storage", "ray_results", "--out", "best.yaml", *LONG]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
    code, text = _interrupt_once(process, sig, lambda: _checkpoints(tmp_path / "ray_results"), log)
    assert code == 128 + sig, text[-3000:]
    _assert_one_line(text, sig)
    _assert_nothing_left(marker)
    assert not (tmp_path / "best.yaml").exists()  # an interrupted search names no winner
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents = client.search_runs([client.get_experiment_by_name("vgg-tiny").experiment_id],
                                 "tags.mlflow.runName LIKE 'tune-%'")
    assert [run.info.status for run in parents] == ["KILLED"]


def _project(tmp_path: Path, tiny_params: Path, env: dict[str, str], *, max_epochs: int) -> Path:
    return make_project(tmp_path / "project", tiny_params, env, max_epochs=max_epochs, patience=200)


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def test_an_interrupted_demo_stops_its_cluster_and_keeps_the_finished_stages(tiny_params, tmp_path):
    env, marker = _fresh_env(tmp_path, **GIT_IDENTITY)
    project = _project(tmp_path, tiny_params, env, max_epochs=200)
    log = tmp_path / "demo.log"
    with open(log, "w") as output:
        process = subprocess.Popen([str(BIN / "vgg"), "demo"], cwd=project, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
    code, text = _interrupt_once(process, signal.SIGTERM, lambda: _checkpoints(project / "ray_results"), log)
    assert code == 128 + signal.SIGTERM, text[-3000:]
    _assert_one_line(text, signal.SIGTERM)
    _assert_nothing_left(marker)
    # The stages that finished before the interrupt are recorded and kept: dvc has nothing to redo for them.
    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=project, env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    pending = {stage.split("@")[0] for stage in json.loads(status.stdout)}
    assert "train-scratch" in pending and not pending & {"synth", "ingest"}
    assert (project / "data/tiny/shards/index.json").is_file()
    assert _checkpoints(project / "ray_results")


def test_a_code_edit_that_changes_the_weights_retrains(tiny_params, tmp_path):
    """Ray Train resumes (or adopts, once finished) the stored run of the same name: the name must change with the
    code, or `dvc repro` after an edit would write the previous code's weights."""
    env, _ = _fresh_env(tmp_path, **GIT_IDENTITY)
    project = _project(tmp_path, tiny_params, env, max_epochs=1)
    env["PYTHONPATH"] = str(project)  # the stages (and their Ray workers) import this copy's code
    model = project / "runs/tiny/A-low.pt"

    def repro() -> dict[str, torch.Tensor]:
        result = subprocess.run([str(BIN / "dvc"), "repro", "train-scratch@A"], cwd=project, env=env,
                                capture_output=True, text=True, timeout=2 * RUN_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return checkpoint.load(model)["model"]

    before = repro()
    loop = project / "vgg/train/loop.py"
    code = loop.read_text()
    edited = code.replace("weight_decay=config.weight_decay", "weight_decay=10 * config.weight_decay")
    assert edited != code, "the edit this test makes no longer applies: pick another line of the training code"
    loop.write_text(edited)
    after = repro()
    assert any(not torch.equal(before[name], after[name]) for name in before), "dvc repro wrote the old weights"
