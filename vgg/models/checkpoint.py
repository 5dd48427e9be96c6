"""Checkpoint files: atomic writes, `weights_only` reads, and the one format every stage shares (BRIEF).

A checkpoint is a `torch.save`d dict of tensors and primitives only:
`{"format": "vgg-checkpoint/1", "config": "D", "model_config": {...}, "model": state_dict,
"scale": {"s_min", "s_max"}, "scale_kind": "low" | "high" | "jitter", "train": {...resume state...} (absent in a
final model file), "profile": {...}}`. `scale_kind` is the profile's name for the training S (§3.1): what the
report lines a result up with the paper's by. Files written before it was recorded load with it derived from their
profile, once, here (`load`): they cost days of GPU time each at paper size, too much to refuse.
`save` refuses anything `load` could not read back with `weights_only=True`, so a bad payload fails at
write time, not at resume time.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vgg.config import SCALE_KINDS, Profile, ScaleKind, ScaleRange
from vgg.errors import CheckpointError

FORMAT = "vgg-checkpoint/1"

# What `torch.load(weights_only=True)` accepts besides containers: tensors and primitives.
_LEAVES = (torch.Tensor, torch.Size, torch.dtype, torch.device, str, bytes, int, float, bool, type(None))


def header(*, config: str, profile: Profile, scale: ScaleRange, kind: ScaleKind | None = None) -> dict[str, Any]:
    """The fields every checkpoint of a run carries besides the weights: format, Table-1 name, shapes, S, its kind,
    profile. `kind`: which of the profile's `scales` S is (a training run knows it); None: the first whose range is
    `scale`, and none where no range is (a benchmark's S outside its profile: such a file does not `load`)."""
    fields = {"s_min": scale.s_min, "s_max": scale.s_max}
    if kind is None:
        kind = _kind_of(fields, profile.to_dict()["scales"])
    elif kind not in SCALE_KINDS:
        raise CheckpointError(f"scale kind {kind!r}: expected one of {', '.join(SCALE_KINDS)}")
    return {
        "format": FORMAT,
        "config": config,
        "model_config": dataclasses.asdict(profile.model),
        "scale": fields,
        **({"scale_kind": kind} if kind is not None else {}),
        "profile": profile.to_dict(),
    }


def _kind_of(scale: Mapping[str, Any], scales: Mapping[str, Any]) -> ScaleKind | None:
    """The first of `scales` (a profile's `scales` section, as data) whose range is `scale`."""
    return next((kind for kind in SCALE_KINDS if kind in scales and dict(scales[kind]) == dict(scale)), None)


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's `header` fields, checked as `load` checks the file, without reading its weights (a VGG-16
    checkpoint is 0.5–1 GB; the header a few KB): for the callers that need only its configuration or S."""
    payload = load(path, mmap=True)
    return {key: payload[key] for key in _HEADER_KEYS if key in payload}


_HEADER_KEYS = ("format", "config", "model_config", "scale", "scale_kind", "profile")  # what `header` writes


def final(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A final model file: the payload without its resume state ("train")."""
    return {key: value for key, value in payload.items() if key != "train"}


def save(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Write `payload` to `path` atomically: a temp file in the same directory, fsync, rename.

    A failed write (disk full, quota, I/O error) removes the temp file, keeps any previous checkpoint at `path`
    untouched, and raises `CheckpointError`.
    """
    path = Path(path)
    if payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint payload for {path} has format {payload.get('format')!r}, expected {FORMAT!r}; "
            "build it with vgg.models.checkpoint.header"
        )
    _check_plain(payload, "payload")
    if not path.parent.is_dir():
        raise CheckpointError(
            f"cannot write checkpoint {path}: directory {path.parent} does not exist; create it first"
        )
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise CheckpointError(
            f"cannot write checkpoint {path}: {error.strerror}; check the directory's permissions"
        ) from error
    stream = os.fdopen(fd, "wb")
    sink = _Sink(stream)
    try:
        with stream:
            torch.save(dict(payload), sink)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        cause = error if isinstance(error, OSError) else sink.error
        if cause is None:
            raise
        hint = "free disk space" if cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "check the path"
        raise CheckpointError(
            f"could not write checkpoint {path}: {cause.strerror or cause}; the previous checkpoint is kept — "
            f"{hint} and rerun"
        ) from error
    _fsync_directory(path.parent)


def load(
    path: str | os.PathLike[str],
    *,
    expect_config: str | None = None,
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` and check it is ours (and of `expect_config`, when given).
    `mmap`: map the file instead of reading it; a tensor's bytes are read when it is used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; check the path or train one first (`vgg train ... --out {path}`)"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as error:
        # torch's own messages run to a page; the user needs the file and what to do.
        if "Unsupported global" in str(error):
            reason = "it holds Python objects, which weights_only=True refuses to run; only tensors and primitives load"
        else:
            reason = "truncated, corrupt or not a torch file"
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({reason}); delete it and re-create it with `vgg train`"
        ) from error
    found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if found != FORMAT:
        raise CheckpointError(
            f"{path} is not a VGG checkpoint (format {found!r}, expected {FORMAT!r}); "
            "import torchvision weights through vgg.models.from_torchvision instead"
        )
    if expect_config is not None and payload.get("config") != expect_config:
        raise CheckpointError(
            f"{path} holds configuration {payload.get('config')!r}, expected {expect_config!r}; "
            "pass the checkpoint trained for that configuration"
        )
    if "scale_kind" not in payload:  # written before the kind was recorded (see the module's docstring)
        kind = _kind_of(payload.get("scale", {}), payload.get("profile", {}).get("scales", {}))
        if kind is None:
            raise CheckpointError(
                f"{path} records no training scale kind and its S {payload.get('scale')} is none of its profile's "
                "scales; re-create it with `vgg train`"
            )
        payload["scale_kind"] = kind
    return payload


class _Sink:
    """The file object torch.save writes through; keeps the OSError its C++ writer would hide.

    torch.save turns a failed write (ENOSPC) into an opaque `RuntimeError: unexpected pos ...`.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.stream.flush()


def _check_plain(value: Any, where: str) -> None:
    """Raise if `value` holds anything `torch.load(weights_only=True)` would refuse."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"checkpoint {where} has a key of type {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _LEAVES):
        raise CheckpointError(
            f"checkpoint {where} is a {type(value).__module__}.{type(value).__name__}; only tensors and primitives "
            "load with weights_only=True — convert it (e.g. torch.as_tensor, dataclasses.asdict)"
        )


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the directory's data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
