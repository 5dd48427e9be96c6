"""Where a result comes from: the code that made it, the files it read, and the protocol execution it belongs to.

- `code_digest`: the sources of `vgg/` and `pipelines/` and the versions of torch, torchvision and Ray. Part of a
  training run's Ray name (an edit retrains instead of resuming or adopting the old run) and of the protocol key.
- `protocol_key`: one execution of the protocol (`dvc repro`, `vgg demo`, one `dvc exp run`): the code, the params
  file and the DVC experiment. Every stage of that execution computes the same key, so its MLflow runs nest under
  one parent run; two `dvc exp run -S ...` get two parents and compare as groups.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
from pathlib import Path

import vgg

PACKAGES = (Path(vgg.__file__).parent, Path(__file__).parent)  # the code that determines a result
VERSIONED = ("torch", "torchvision", "ray")  # and the libraries whose version does


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def code_digest() -> str:
    """Hash of the sources of `vgg` and `pipelines` and of the versions of torch, torchvision and Ray."""
    digest = hashlib.sha256(" ".join(f"{name} {importlib.metadata.version(name)}" for name in VERSIONED).encode())
    for package in PACKAGES:
        for source in sorted(package.rglob("*.py")):
            digest.update(f"{source.relative_to(package.parent)}\0".encode())
            digest.update(hashlib.sha256(source.read_bytes()).digest())
    return digest.hexdigest()


def dvc_experiment() -> str | None:
    """The DVC experiment this process runs in (`dvc exp run` sets it for its stages), if any."""
    return os.environ.get("DVC_EXP_NAME") or None


def protocol_key(params: Path) -> str:
    """The key of the protocol execution a stage belongs to: code, params file, DVC experiment."""
    digest = hashlib.sha256(code_digest().encode())
    digest.update(file_sha256(params).encode() if params.is_file() else b"no params")
    digest.update((dvc_experiment() or "").encode())
    return digest.hexdigest()[:16]
