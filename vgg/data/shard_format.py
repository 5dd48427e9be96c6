"""The shard format: what `vgg ingest` writes (`vgg.data.ingest`) and every reader reads, in one place.

A shards directory holds
- WebDataset tars `train-000000.tar`…, `val-000000.tar`… (`shard_file`), whose samples are consecutive members
  `KEY.cls` (ASCII class index, sorted-WNID order), `KEY.jpg` (RGB JPEG) and `KEY.json` (metadata: `{"wnid",
  "source": file name, "size": [w, h] of the original}`), KEY being the source file's stem;
- `index.json` (`ShardIndex`: classes, every split's shards with their sample counts, sizes and sha256, and what
  ingest converted or skipped), written last: its presence means the output is complete;
- `stats.json` (`ColourStats`): the training set's RGB mean and covariance eigen-decomposition.

The writer encodes with `encode_index` and `encode_stats`, readers parse with `read_index` and `read_stats`; both
sides name the files and members by the constants here. This module loads no torch: ingest workers import it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from vgg.data.tar_reader import read_tar
from vgg.errors import DataError
from vgg.files import file_sha256

INDEX_FILE = "index.json"
STATS_FILE = "stats.json"
INDEX_FORMAT = 1  # index.json "format"
SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")  # the names `shard_file` gives
# A sample's members, by extension (WebDataset: KEY.EXT): the RGB JPEG, the class index, the metadata.
JPEG, LABEL, META = "jpg", "cls", "json"


def shard_file(split: str, number: int) -> str:
    """The file name of shard `number` (from 0) of `split`."""
    return f"{split}-{number:06d}.tar"


def json_bytes(value: Any) -> bytes:
    """Compact JSON with sorted keys: a sample's metadata member and stats.json."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------------- index


@dataclass(frozen=True)
class Shard:
    """One tar of a split, as listed in `index.json`."""

    file: str  # name inside the shards directory, e.g. train-000000.tar
    path: Path
    count: int  # samples
    sha256: str  # hex digest of the whole file
    bytes: int | None = None  # file size (indexes written before it was recorded have none)

    def to_json(self) -> dict[str, Any]:
        """Its entry in index.json."""
        entry: dict[str, Any] = {"file": self.file, "count": self.count, "sha256": self.sha256}
        if self.bytes is not None:
            entry["bytes"] = self.bytes
        return entry


@dataclass(frozen=True)
class Split:
    count: int  # samples, = sum of the shards' counts
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class ShardIndex:
    """A shards directory's `index.json`: what `read_index` parses and validates, and `encode_index` writes."""

    root: Path
    classes: tuple[str, ...]  # WNIDs in sorted order; a label is a position in this tuple
    names: tuple[str, ...]  # human-readable class names, same order
    max_side: int  # px, the largest smallest-side kept at ingest
    splits: Mapping[str, Split]  # "train", "val"
    source: Mapping[str, Any]  # fingerprint of the raw input
    converted: tuple[Mapping[str, str], ...]  # {"name", "reason"} of images re-encoded at ingest
    skipped: tuple[Mapping[str, str], ...]  # {"name", "reason"} of images left out at ingest

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(
                f"{self.root / INDEX_FILE}: no split {name!r} (has {', '.join(sorted(self.splits)) or 'none'}); "
                f"re-run `vgg ingest`"
            )
        return self.splits[name]


def read_index(shards_dir: str | Path, *, verify: bool = False) -> ShardIndex:
    """Parse and validate `shards_dir/index.json`; every listed shard must exist and have its recorded size (a
    stat: a truncated shard is one line here, before any batch). With `verify`, also check each shard's sha256
    and sample count against the index (reads every byte)."""
    root = Path(shards_dir)
    path = root / INDEX_FILE
    raw = _read_json(path, root)
    fix = f"re-run `vgg ingest RAW {root}`"
    try:
        if raw.get("format") != INDEX_FORMAT:
            raise DataError(f"{path}: unsupported format {raw.get('format')!r} (expected {INDEX_FORMAT}); {fix}")
        classes = tuple(_typed(raw, "classes", list, path, fix))
        names = tuple(_typed(raw, "names", list, path, fix))
        if not classes or len(names) != len(classes) or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{path}: 'classes' must be a non-empty list of WNIDs with one name each; {fix}")
        splits = {}
        for split_name, entry in _typed(raw, "splits", dict, path, fix).items():
            shards = []
            for item in entry["shards"]:
                file, count, digest, size = item["file"], item["count"], item["sha256"], item.get("bytes")
                if not (isinstance(file, str) and "/" not in file and isinstance(count, int) and count >= 0
                        and isinstance(digest, str) and (size is None or isinstance(size, int))):
                    raise DataError(f"{path}: bad shard entry {item!r} in split {split_name!r}; {fix}")
                shards.append(Shard(file=file, path=root / file, count=count, sha256=digest, bytes=size))
            count = entry["count"]
            if count != sum(shard.count for shard in shards):
                raise DataError(
                    f"{path}: split {split_name!r} count {count} != sum of its shard counts "
                    f"{sum(s.count for s in shards)}; {fix}"
                )
            splits[split_name] = Split(count=count, shards=tuple(shards))
        index = ShardIndex(
            root=root,
            classes=classes,
            names=tuple(str(name) for name in names),
            max_side=int(_typed(raw, "max_side", int, path, fix)),
            splits=splits,
            source=dict(raw.get("source", {})),
            converted=tuple(raw.get("converted", ())),
            skipped=tuple(raw.get("skipped", ())),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DataError(f"{path}: missing or malformed entry ({type(error).__name__}: {error}); {fix}") from None
    for split in index.splits.values():
        for shard in split.shards:
            if not shard.path.is_file():
                raise DataError(f"{shard.path}: shard listed in {path} is missing; {fix}")
            if shard.bytes is not None and shard.path.stat().st_size != shard.bytes:
                raise DataError(
                    f"{shard.path}: damaged shard: {shard.path.stat().st_size} bytes, index.json says {shard.bytes} "
                    f"(truncated or overwritten); {fix} (it rewrites damaged shards)"
                )
            if verify:
                _verify_shard(shard, fix)
    return index


def encode_index(index: ShardIndex) -> bytes:
    """index.json's bytes for `index` (what `read_index` parses back)."""
    raw = {
        "format": INDEX_FORMAT,
        "classes": list(index.classes),
        "names": list(index.names),
        "max_side": index.max_side,
        "source": dict(index.source),
        "splits": {
            name: {"count": split.count, "shards": [shard.to_json() for shard in split.shards]}
            for name, split in index.splits.items()
        },
        "converted": [dict(item) for item in index.converted],
        "skipped": [dict(item) for item in index.skipped],
    }
    return json.dumps(raw, indent=1).encode() + b"\n"


def _read_json(path: Path, root: Path) -> Any:
    if not root.is_dir():
        raise DataError(f"shards directory {root} does not exist; run `vgg ingest RAW {root}` first")
    if not path.is_file():
        raise DataError(f"{path} is missing: {root} is not a complete shards directory; run `vgg ingest RAW {root}`")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: corrupt JSON ({error}); re-run `vgg ingest RAW {root}`") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}; re-run `vgg ingest RAW {root}`")
    return value


def _typed(raw: Mapping[str, Any], key: str, kind: type, path: Path, fix: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}: key {key!r} must be a {kind.__name__}, got {type(value).__name__}; {fix}")
    return value


def check_shards(shards: Iterable[Shard], root: Path) -> None:
    """Check the sha256 of each shard against index.json before anything reads it: a damaged shard is one line
    naming it, never samples trained on or a failure mid-epoch. Each file is hashed once per process (a file
    replaced since has another inode, size or mtime and is hashed again): ~17 ms for the small profile's 22 MB of
    shards at ~1.3 GB/s; the training loaders check only their rank's share (see `train_batches`)."""
    for shard in shards:
        info = shard.path.stat()
        key = (str(shard.path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        if _CHECKED.get(key) == shard.sha256:
            continue
        digest = file_sha256(shard.path)
        if digest != shard.sha256:
            raise DataError(
                f"{shard.path}: damaged shard: its sha256 {digest[:12]}… does not match index.json "
                f"({shard.sha256[:12]}…); re-run `vgg ingest RAW {root}` (it rewrites damaged shards)"
            )
        _CHECKED[key] = digest


_CHECKED: dict[tuple[str, int, int, int, int], str] = {}  # shards hashed in this process: file identity → sha256


def _verify_shard(shard: Shard, fix: str) -> None:
    digest = file_sha256(shard.path)
    if digest != shard.sha256:
        raise DataError(
            f"{shard.path}: sha256 {digest[:12]}… does not match the index ({shard.sha256[:12]}…); {fix}"
        )
    count = sum(1 for _ in read_tar(shard.path, start=0, stop=None, wanted=frozenset()))
    if count != shard.count:
        raise DataError(f"{shard.path}: holds {count} samples, the index says {shard.count}; {fix}")


# ---------------------------------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class ColourStats:
    """Training-set RGB statistics on the 0–255 scale: the mean (subtracted, §2.1) and the eigen-decomposition
    of the RGB covariance used by the PCA colour shift (AlexNet lighting, §3.1). Read from stats.json they are
    tuples of floats (float64, as ingest computed them); `Preprocess` takes any array-like of those shapes."""

    mean_rgb: Sequence[float]  # [3]
    eigval: Sequence[float]  # [3], descending
    eigvec: Sequence[Sequence[float]]  # [3, 3], column j is the eigenvector of eigval[j]
    count: int | None = None  # training images they were computed over (stats.json "count")

    def to_json(self) -> dict[str, Any]:
        """stats.json's object (`encode_stats` writes it)."""
        raw: dict[str, Any] = {} if self.count is None else {"count": self.count}
        return {**raw, "mean_rgb": [float(v) for v in self.mean_rgb], "eigval": [float(v) for v in self.eigval],
                "eigvec": [[float(v) for v in row] for row in self.eigvec]}


def encode_stats(stats: ColourStats) -> bytes:
    """stats.json's bytes for `stats` (what `read_stats` parses back)."""
    return json_bytes(stats.to_json())


def read_stats(shards_dir: str | Path) -> ColourStats:
    """Parse and validate `shards_dir/stats.json`."""
    root = Path(shards_dir)
    path = root / STATS_FILE
    raw = _read_json(path, root)
    shapes = {"mean_rgb": (3,), "eigval": (3,), "eigvec": (3, 3)}
    values = {}
    for key, shape in shapes.items():
        try:
            value = np.array(_numbers(raw[key]), dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            value = None
        if value is None or value.shape != shape or not np.isfinite(value).all():
            raise DataError(
                f"{path}: {key!r} must be {'x'.join(map(str, shape))} finite numbers; re-run `vgg ingest RAW {root}`"
            )
        values[key] = value
    if (values["eigval"] < 0).any():
        raise DataError(f"{path}: 'eigval' must be >= 0 (a covariance's eigenvalues); re-run `vgg ingest RAW {root}`")
    count = raw.get("count")
    return ColourStats(
        mean_rgb=tuple(values["mean_rgb"].tolist()),
        eigval=tuple(values["eigval"].tolist()),
        eigvec=tuple(tuple(row) for row in values["eigvec"].tolist()),
        count=count if isinstance(count, int) and not isinstance(count, bool) else None,
    )


def _numbers(value: Any) -> Any:
    """`value` if it is a number or (nested) lists of numbers; TypeError for anything else (a string of digits
    too, which NumPy would parse)."""
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    if isinstance(value, (int, float)):
        return value
    raise TypeError(type(value).__name__)
