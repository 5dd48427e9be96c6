"""WebDataset tars read in place by a small streaming header parser (no extraction to disk): it seeks over the data
of members and samples that are not needed, so skipping is cheap and a skipped sample is never read. The batch
streams read sample ranges [start, stop) of a shard with it (`vgg.data.streams`), and `read_index(verify=True)`
counts a shard's samples with it without reading their data.

`webdataset`'s own reader (`vgg.data.samples.iter_samples` uses it) reads every byte of every member to reach a
sample; this one reads the 512-byte headers and only the members asked for."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator

from vgg.errors import DataError

_BLOCK = 512  # tar block size, bytes
_END_BLOCK = bytes(_BLOCK)


def read_tar(
    path: Path, *, start: int, stop: int | None, wanted: frozenset[str] | None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples [start, stop) of a WebDataset tar as (key, {extension: bytes}), reading only the members whose
    extension is in `wanted` (None: all). Members of one sample are consecutive and share the key: the name up
    to the first dot of its last path component (WebDataset's rule). Handles ustar, GNU long names and pax."""
    with open(path, "rb") as file:
        index, key, fields = -1, None, {}
        offset, long_name = 0, None
        while True:
            file.seek(offset)
            header = file.read(_BLOCK)
            if len(header) < _BLOCK or header == _END_BLOCK:
                break
            if header[257:262] != b"ustar":
                raise DataError(f"{path}: not a tar archive (bad header at byte {offset}); re-run `vgg ingest`")
            size = _header_size(header, path)
            kind = header[156]
            data = offset + _BLOCK
            offset = data + -(-size // _BLOCK) * _BLOCK
            if kind in (ord("L"), ord("x")):  # GNU long name / pax extended header of the next member
                long_name = _long_name(kind, _read_exact(file, data, size, path)) or long_name
                continue
            if kind not in (ord("0"), 0):  # directories, links, global pax headers: not sample members
                long_name = None
                continue
            name = long_name or _ustar_name(header)
            long_name = None
            dot = name.find(".", name.rfind("/") + 1)
            if dot < 0:
                continue
            member_key = name[:dot]
            if member_key != key:
                if start <= index:
                    yield key, fields
                index, key, fields = index + 1, member_key, {}
                if stop is not None and index >= stop:
                    return
            if index >= start:
                extension = name[dot + 1 :].lower()
                if wanted is None or extension in wanted:
                    fields[extension] = _read_exact(file, data, size, path)
        if key is not None and start <= index:
            yield key, fields


def _header_size(header: bytes, path: Path) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes ≥ 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        raise DataError(f"{path}: corrupt tar header (size field {field!r}); re-run `vgg ingest`") from None


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")


def _long_name(kind: int, payload: bytes) -> str | None:
    if kind == ord("L"):
        return payload.rstrip(b"\0").decode("utf-8", "replace")
    for record in payload.split(b"\n"):  # pax records: "LEN key=value"
        _, _, item = record.partition(b" ")
        name, _, value = item.partition(b"=")
        if name == b"path":
            return value.decode("utf-8", "replace")
    return None


def _read_exact(file: BinaryIO, offset: int, size: int, path: Path) -> bytes:
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise DataError(f"{path}: truncated tar (member at byte {offset} is cut short); re-run `vgg ingest`")
    return data
