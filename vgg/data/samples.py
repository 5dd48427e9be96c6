"""A split's samples one by one: the record (`Sample`: key, JPEG, label, metadata) and the check of a sample's
members that every reader makes (`jpeg_and_label`). `iter_samples` reads a whole split in index order with
`webdataset`'s tar reader, for evaluation; the batch streams read sample ranges with `vgg.data.tar_reader`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Mapping

from webdataset import tarfile_samples

from vgg.data.shard_format import JPEG, LABEL, META, Shard, check_shards, read_index
from vgg.errors import DataError


@dataclass(frozen=True)
class Sample:
    key: str  # source file stem, e.g. n01440764_10026
    jpeg: bytes  # RGB JPEG
    label: int  # class index (sorted-WNID order)
    meta: dict  # {"wnid", "source", "size": [w, h]} (original size)


def iter_samples(shards_dir: str | Path, split: str) -> Iterator[Sample]:
    """Every sample of `split` in index order (shards in listed order, samples in tar order); every shard's
    sha256 is checked first (`check_shards`)."""
    index = read_index(shards_dir)
    check_shards(index.split(split).shards, index.root)
    for shard in index.split(split).shards:
        for fields in islice(tarfile_samples([{"url": str(shard.path)}]), shard.count):
            key = fields["__key__"]
            jpeg, label = jpeg_and_label(shard, key, fields, len(index.classes))
            try:
                meta = json.loads(fields[META]) if META in fields else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"{shard.path}: sample {key}: corrupt json member; re-run `vgg ingest`") from None
            yield Sample(key=key, jpeg=jpeg, label=label, meta=meta)


def jpeg_and_label(shard: Shard, key: str, fields: Mapping[str, bytes], classes: int) -> tuple[bytes, int]:
    """A sample's JPEG bytes and class index, checked: both members present, the label one of `classes`."""
    if JPEG not in fields or LABEL not in fields:
        raise DataError(f"{shard.path}: sample {key} lacks a jpg or cls member; re-run `vgg ingest`")
    try:
        label = int(fields[LABEL])
    except ValueError:
        label = -1
    if not 0 <= label < classes:
        raise DataError(
            f"{shard.path}: sample {key}: class {fields[LABEL][:20]!r} is not in 0..{classes - 1}; re-run `vgg ingest`"
        )
    return fields[JPEG], label
