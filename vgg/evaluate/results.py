"""Per-image posteriors as saved, and their fusion: the `.npz` team contract that `vgg evaluate` writes and
`vgg fuse` and `vgg report` read — `keys` (str [N]), `labels` (int64 [N]), `probs` (float32 [N, C]) and `meta` (a
JSON string: how they were made). NumPy only, so the commands that only read and average posteriors start
without importing torch (~2.5 s each on 2 cores).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vgg.errors import ConfigError, DataError
from vgg.files import write_atomic


@dataclass(frozen=True)
class Posteriors:
    """Per-image class posteriors of one evaluation (or a fusion), in the split's index order."""

    keys: list[str]
    labels: np.ndarray  # int64 [N], class index in sorted-WNID order
    probs: np.ndarray  # float32 [N, C], rows sum to 1
    meta: dict[str, Any]  # JSON-serialisable description: config, train_scale, mode, scales, models, ...
    source: str = field(default="", compare=False)  # the file it was loaded from, for error messages
    # Q → float32 [N, C]: single test scales' own posteriors, kept from a multi-scale pass (`keep_scales`); not saved.
    by_scale: Mapping[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", [str(key) for key in self.keys])
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64))
        object.__setattr__(self, "probs", np.asarray(self.probs, dtype=np.float32))
        where = self.source or "posteriors"
        if self.probs.ndim != 2 or self.labels.shape != (len(self.keys),) or self.probs.shape[0] != len(self.keys):
            raise DataError(
                f"{where}: inconsistent shapes: {len(self.keys)} keys, labels {self.labels.shape}, "
                f"probs {self.probs.shape} (expected [N], [N], [N, C])"
            )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the `.npz` atomically (temporary file in the same directory, fsync, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"keys": np.asarray(self.keys, dtype=str), "labels": self.labels, "probs": self.probs,
                  "meta": np.asarray(json.dumps(self.meta, sort_keys=True))}
        return write_atomic(path, lambda file: np.savez(file, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Posteriors:
        """Read a file written by `save`; `DataError` naming the file if it is missing or corrupt."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: posteriors file not found; create it with `vgg evaluate ... --out {path}`")
        try:
            with np.load(path, allow_pickle=False) as data:
                keys, labels, probs = data["keys"].tolist(), data["labels"], data["probs"]
                meta = json.loads(str(data["meta"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise DataError(
                f"{path}: not a readable posteriors file ({type(error).__name__}: {error}); "
                "re-create it with `vgg evaluate`"
            ) from None
        if not isinstance(meta, dict):
            raise DataError(f"{path}: its meta is not a JSON object; re-create it with `vgg evaluate`")
        return cls(keys=keys, labels=labels, probs=probs, meta=meta, source=str(path))

    def at_scale(self, q: int) -> Posteriors:
        """The posteriors of test scale `q` alone, kept from a multi-scale evaluation (`keep_scales=[q]`): what a
        single-scale evaluation at Q = `q` gives, without a second pass over the split."""
        if q not in self.by_scale:
            kept = ", ".join(map(str, self.by_scale)) or "none"
            raise ConfigError(
                f"Q={q} px: no single-scale posteriors kept for it (kept: {kept}); pass keep_scales=[{q}]"
            )
        return Posteriors(keys=self.keys, labels=self.labels, probs=self.by_scale[q], meta={**self.meta, "scales": [q]})


def fuse(posteriors: Sequence[Posteriors]) -> Posteriors:
    """Multiple-model fusion (§4.4): the mean of the models' posteriors over the same images.

    Keys, labels and shapes must be identical (same split, same order); else `DataError` naming the inputs
    and the first mismatch. Meta: `models` lists the contributing configurations, `config` joins them with
    "+" (e.g. "D+E"); `mode`, `scales`, `train_scale`, ... are kept where all inputs agree.
    """
    if not posteriors:
        raise DataError("fuse: no posteriors given; pass two or more files")
    first = posteriors[0]
    names = [p.source or f"input #{i + 1}" for i, p in enumerate(posteriors)]
    for name, other in zip(names[1:], posteriors[1:]):
        if other.keys != first.keys:
            if len(other.keys) != len(first.keys):
                detail = f"{len(first.keys)} vs {len(other.keys)} images"
            else:
                at = next(i for i, (a, b) in enumerate(zip(first.keys, other.keys)) if a != b)
                detail = f"first mismatch at #{at}: {first.keys[at]!r} vs {other.keys[at]!r}"
            raise DataError(
                f"fuse: {names[0]} and {name} are not over the same images ({detail}); evaluate both on the same split"
            )
        if other.probs.shape != first.probs.shape:
            raise DataError(f"fuse: {names[0]} has probs {first.probs.shape} but {name} has {other.probs.shape}")
        if not np.array_equal(other.labels, first.labels):
            at = int(np.flatnonzero(other.labels != first.labels)[0])
            raise DataError(
                f"fuse: {names[0]} and {name} disagree on the label of {first.keys[at]!r}; use the same shards"
            )
    probs = np.mean(np.stack([p.probs.astype(np.float64) for p in posteriors]), axis=0)
    models = [model for p in posteriors for model in p.meta.get("models", [p.meta.get("config", "?")])]
    meta: dict[str, Any] = {"config": "+".join(models), "models": models, "fused": [p.meta for p in posteriors]}
    modes = sorted({p.meta.get("mode") for p in posteriors})
    if len(set(models)) == 1 and modes == ["dense", "multicrop"]:
        # One model's dense and multi-crop posteriors: the paper's "dense + multi-crop" (§4.3, Table 5).
        meta.update(config=models[0], models=models[:1], mode="dense+multicrop")
    for key in ("mode", "scales", "train_scale", "crop", "grid", "split", "num_classes", "model_sha256"):
        values = [p.meta.get(key) for p in posteriors]
        if values[0] is not None and all(value == values[0] for value in values):
            meta[key] = values[0]
    return Posteriors(keys=first.keys, labels=first.labels, probs=probs, meta=meta)
