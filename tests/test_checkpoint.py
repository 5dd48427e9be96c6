"""Checkpoint files: atomic writes that survive a full disk, weights_only reads, clear errors for anything not ours."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.params import load_profile
from vgg.errors import CheckpointError
from vgg.models import checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROFILE = load_profile(ROOT / "params.yaml", profile="small")


def _payload(size: int = 16) -> dict:
    return {
        **checkpoint.header(config="A", profile=PROFILE, scale=PROFILE.scales.low),
        "model": {"features.0.weight": torch.arange(size, dtype=torch.float32), "features.0.bias": torch.zeros(2)},
        "train": {"epoch": 3, "step_in_epoch": 1, "schedule": {"best": float("inf")}, "history": [{"lr": 0.01}]},
    }


def _only(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    payload = _payload()
    checkpoint.save(path, payload)
    loaded = checkpoint.load(path, expect_config="A")
    assert torch.equal(loaded["model"]["features.0.weight"], payload["model"]["features.0.weight"])
    assert loaded["train"] == payload["train"]
    assert loaded["scale"] == {"s_min": 40, "s_max": 40}
    assert loaded["model_config"]["crop"] == 32 and loaded["profile"]["name"] == "small"
    assert _only(tmp_path) == ["a.pt"]
    # The file itself is loadable by anyone with weights_only=True (evaluation, pipelines).
    assert torch.load(path, weights_only=True)["format"] == checkpoint.FORMAT
    assert "train" not in checkpoint.final(loaded) and "model" in checkpoint.final(loaded)


def test_read_header_is_the_header_and_maps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    payload = _payload(size=1 << 20)
    checkpoint.save(path, payload)
    expected = checkpoint.header(config="A", profile=PROFILE, scale=PROFILE.scales.low)
    assert checkpoint.read_header(path) == expected
    # The weights it does not return are not read: memory-mapped (Linux lists the mapping), the file's bytes on
    # demand.
    mapped = checkpoint.load(path, mmap=True)["model"]["features.0.weight"]
    assert str(path) in Path("/proc/self/maps").read_text()
    assert torch.equal(mapped, payload["model"]["features.0.weight"])
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.read_header(tmp_path / "nope.pt")


def test_the_kind_of_the_training_scale_is_recorded_and_derived_only_for_files_from_before(tmp_path: Path) -> None:
    """A run records which of its profile's scales it trained at; a file written before the kind was recorded loads
    with the kind its profile gives S (the first match), and one whose S is none of them is one clear error."""
    # A profile whose high S equals its low S: only the recorded kind tells a `high` run from a `low` one.
    same = PROFILE.scales.low
    profile = load_profile(ROOT / "params.yaml", profile="small",
                           overrides=[f"scales.high={{s_min: {same.s_min}, s_max: {same.s_max}}}"])
    header = checkpoint.header(config="C", profile=profile, scale=same, kind="high")
    assert header["scale_kind"] == "high"
    recorded = tmp_path / "recorded.pt"
    checkpoint.save(recorded, {**header, "model": {}})
    assert checkpoint.read_header(recorded)["scale_kind"] == "high"
    assert checkpoint.header(config="C", profile=PROFILE, scale=PROFILE.scales.jitter)["scale_kind"] == "jitter"

    before = {key: value for key, value in _payload().items() if key != "scale_kind"}
    old = tmp_path / "old.pt"
    checkpoint.save(old, {**before, "scale": {"s_min": 56, "s_max": 56}})
    assert checkpoint.load(old)["scale_kind"] == "high" and checkpoint.read_header(old)["scale_kind"] == "high"
    odd = tmp_path / "odd.pt"
    checkpoint.save(odd, {**before, "scale": {"s_min": 48, "s_max": 48}})
    with pytest.raises(CheckpointError) as raised:
        checkpoint.read_header(odd)
    assert str(raised.value) == (f"{odd} records no training scale kind and its S {{'s_min': 48, 's_max': 48}} is "
                                 "none of its profile's scales; re-create it with `vgg train`")
    with pytest.raises(CheckpointError, match="scale kind 'wide': expected one of low, high, jitter"):
        checkpoint.header(config="C", profile=PROFILE, scale=same, kind="wide")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at .*nope.pt"):
        checkpoint.load(tmp_path / "nope.pt")


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_damaged_files(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "a.pt"
    checkpoint.save(path, _payload(size=4096))
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="a.pt is not a readable checkpoint"):
        checkpoint.load(path)


class _Foreign:
    pass


def test_foreign_files(tmp_path: Path) -> None:
    plain = tmp_path / "torchvision.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, plain)
    with pytest.raises(CheckpointError, match="torchvision.pth is not a VGG checkpoint"):
        checkpoint.load(plain)
    other_format = tmp_path / "other.pt"
    torch.save({"format": "vgg-checkpoint/0"}, other_format)
    with pytest.raises(CheckpointError, match="other.pt is not a VGG checkpoint .*'vgg-checkpoint/0'"):
        checkpoint.load(other_format)
    # A pickled object: weights_only refuses to run its code; we say so as a checkpoint error.
    pickled = tmp_path / "object.pt"
    torch.save({"format": checkpoint.FORMAT, "obj": _Foreign()}, pickled)
    with pytest.raises(CheckpointError, match="object.pt is not a readable checkpoint"):
        checkpoint.load(pickled)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(CheckpointError, match="tensor.pt is not a VGG checkpoint .*'Tensor'"):
        checkpoint.load(tensor)


def test_wrong_configuration(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    checkpoint.save(path, _payload())
    with pytest.raises(CheckpointError, match="holds configuration 'A', expected 'D'"):
        checkpoint.load(path, expect_config="D")


def test_refuses_payloads_load_could_not_read(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    checkpoint.save(path, _payload())
    before = path.read_bytes()
    bad = _payload()
    bad["train"]["rng"] = np.zeros(3)
    with pytest.raises(CheckpointError, match=r"payload\.train\.rng is a numpy.ndarray"):
        checkpoint.save(path, bad)
    with pytest.raises(CheckpointError, match="has format None"):
        checkpoint.save(path, {"model": {}})
    assert path.read_bytes() == before and _only(tmp_path) == ["a.pt"]


def test_full_disk_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """A real ENOSPC: a 64 KiB tmpfs (needs root; the file-size-limit test below covers the same path without)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        path = disk / "a.pt"
        checkpoint.save(path, _payload(size=1024))  # 4 KiB of weights: fits
        before = path.read_bytes()
        with pytest.raises(CheckpointError, match="could not write checkpoint .*a.pt: No space left on device; the "
                                                  "previous checkpoint is kept — free disk space"):
            checkpoint.save(path, _payload(size=64 * 1024))  # 256 KiB: does not
        assert path.read_bytes() == before
        assert _only(disk) == ["a.pt"]
        assert torch.equal(checkpoint.load(path)["model"]["features.0.weight"], torch.arange(1024.0))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


_CHILD = """
import resource, signal, sys, torch
from vgg.errors import CheckpointError
from vgg.models import checkpoint
payload = torch.load(sys.argv[2], weights_only=True)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    checkpoint.save(sys.argv[1], payload)
except CheckpointError as error:
    print(error)
    sys.exit(3)
"""


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """A write that fails half-way (file-size limit → EFBIG, in a child process) leaves the old file and no temp."""
    path = tmp_path / "a.pt"
    checkpoint.save(path, _payload())
    before = path.read_bytes()
    big = tmp_path.parent / f"{tmp_path.name}-big.pt"
    torch.save(_payload(size=256 * 1024), big)  # 1 MiB: passes the limit half-way through the write
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(big)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )
    big.unlink()
    assert result.returncode == 3, result.stderr
    assert "could not write checkpoint" in result.stdout and "previous checkpoint is kept" in result.stdout
    assert path.read_bytes() == before
    assert _only(tmp_path) == ["a.pt"]


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="directory .*nowhere does not exist"):
        checkpoint.save(tmp_path / "nowhere" / "a.pt", _payload())
