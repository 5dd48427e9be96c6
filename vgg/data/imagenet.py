"""Read the raw ILSVRC-2012 classification data as users download it, without extracting anything to disk.

A RAW directory holds, per part, either the archive or its extracted form (the archive wins when both exist):

- train: `ILSVRC2012_img_train.tar` (one inner tar per class, `n01440764.tar` holding `n01440764_10026.JPEG`…)
  or `train/n01440764/n01440764_10026.JPEG` (the layout torchvision and the usual scripts leave behind);
- val: `ILSVRC2012_img_val.tar` (flat `ILSVRC2012_val_00000001.JPEG`…) or `val/` holding the same flat files
  (labels from the devkit) or one `val/nXXXXXXXX/` folder per class (labels from the folders, as after
  torchvision or valprep.sh);
- devkit: `ILSVRC2012_devkit_t12.tar.gz` or its extracted `ILSVRC2012_devkit_t12/`; read from it are
  `data/meta.mat` (synsets: leaves, num_children == 0, are the 1000 classes) and
  `data/ILSVRC2012_validation_ground_truth.txt` (one ILSVRC2012_ID per val image, in file-name order).

Labels are the position of the WNID in the sorted list of training classes (torchvision and timm agree); the
devkit's ILSVRC2012_IDs are a different order and are only used to map the val ground truth to WNIDs.

Archives are indexed by their tar headers only (the data is skipped by seeking), so every image becomes a
`RawRef`: a byte range of one file under RAW. Reading an image is one `pread`, from any process, in any order:
that is what lets `vgg.data.ingest` ingest in parallel with an output order that does not depend on scheduling.
Nothing is ever extracted by path; a member with an absolute name or a `..` component is refused.
"""

from __future__ import annotations

import errno
import io
import lzma
import os
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Iterator, Literal

import numpy as np
import scipy.io

from vgg.errors import DataError

Split = Literal["train", "val"]
SPLITS: tuple[Split, Split] = ("train", "val")

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
META_MAT = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "num_children")

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")  # real files are all `.JPEG` (one of them is a PNG inside)
WNID = re.compile(r"n\d{8}")
EXPECTED = (
    f"expected {TRAIN_ARCHIVE}, {VAL_ARCHIVE} and {DEVKIT_ARCHIVE} "
    f"(or the extracted train/nXXXXXXXX/*.JPEG, val/*.JPEG and {DEVKIT_DIR}/)"
)


@dataclass(frozen=True)
class RawRef:
    """Where one image's bytes are: `size` bytes at `offset` of `path` (relative to RAW), never extracted."""

    key: str  # file stem: `n01440764_10026`, `ILSVRC2012_val_00000001` (the shards' `__key__`)
    name: str  # file name as in the archive: `n01440764_10026.JPEG`
    label: int  # position of `wnid` in the sorted class list
    wnid: str
    path: str
    offset: int
    size: int


@dataclass(frozen=True)
class RawImage:
    """One raw image: the file's bytes as stored (usually JPEG; not decoded here)."""

    key: str
    name: str
    data: bytes
    label: int
    wnid: str


@dataclass(frozen=True)
class Devkit:
    """What ingestion needs from the devkit: leaf synsets and the val ground truth (as WNIDs)."""

    leaves: dict[str, str]  # WNID → words ("tench, Tinca tinca"), the 1000 classes
    val_wnids: tuple[str, ...]  # one per val image, in file-name order
    source: str  # what was read, for error messages


def open_raw(path: str | os.PathLike[str]) -> RawImageNet:
    """Open a RAW directory (archives or extracted layout, see the module docstring); checks the layout now and
    the contents when they are first needed (`.classes`, `.refs`, `.counts`)."""
    return RawImageNet(Path(path))


class RawImageNet:
    """The raw ILSVRC-2012 classification data under one directory. Indexes lazily and caches the index."""

    def __init__(self, root: Path) -> None:
        if not root.exists():
            raise DataError(f"raw data directory {root} does not exist; {EXPECTED}")
        if not root.is_dir():
            raise DataError(f"raw data path {root} is not a directory; {EXPECTED}")
        self.root = root
        self._train = _first_existing(root / TRAIN_ARCHIVE, root / "train")
        self._val = _first_existing(root / VAL_ARCHIVE, root / "val")
        self._devkit = _first_existing(root / DEVKIT_ARCHIVE, root / DEVKIT_DIR)
        for part in (self._train, self._val, self._devkit):
            if part is not None:
                _check_part(part)
        missing = [
            name
            for name, found in ((f"{TRAIN_ARCHIVE} (or train/)", self._train), (f"{VAL_ARCHIVE} (or val/)", self._val),
                                (f"{DEVKIT_ARCHIVE} (or {DEVKIT_DIR}/)", self._devkit))
            if found is None
        ]
        if len(missing) == 3:
            raise DataError(f"no ILSVRC-2012 data in {root}; {EXPECTED}")
        if missing:
            raise DataError(f"incomplete ILSVRC-2012 data in {root}: missing {', '.join(missing)}; {EXPECTED}")

    def __repr__(self) -> str:
        return f"RawImageNet({str(self.root)!r}, counts={self.counts})"

    @property
    def layout(self) -> dict[str, str]:
        """Which form each part was read from, relative to RAW (e.g. `{"train": "ILSVRC2012_img_train.tar"}`)."""
        parts = {"train": self._train, "val": self._val, "devkit": self._devkit}
        return {part: path.name + ("/" if path.is_dir() else "") for part, path in parts.items() if path}

    @cached_property
    def devkit(self) -> Devkit:
        assert self._devkit is not None
        return _read_devkit(self._devkit)

    @cached_property
    def _train_index(self) -> tuple[tuple[str, ...], tuple[tuple[str, str, str, int, int], ...]]:
        """(sorted class WNIDs, (wnid, name, path, offset, size) sorted by WNID then name)."""
        assert self._train is not None
        leaves = self.devkit.leaves
        if self._train.is_dir():
            entries = _list_train_dir(self._train, self.root, leaves)
        else:
            entries = _list_train_tar(self._train, self.root, leaves)
        classes = tuple(sorted({wnid for wnid, *_ in entries}))
        return classes, tuple(sorted(entries))

    @property
    def classes(self) -> tuple[str, ...]:
        """Sorted WNIDs of the training classes; a label is an index into this."""
        return self._train_index[0]

    @property
    def names(self) -> tuple[str, ...]:
        """The devkit's words for each class, e.g. `tench, Tinca tinca`."""
        return tuple(self.devkit.leaves[wnid] for wnid in self.classes)

    @cached_property
    def _refs(self) -> dict[str, tuple[RawRef, ...]]:
        label = {wnid: index for index, wnid in enumerate(self.classes)}
        train = tuple(
            RawRef(key=_stem(name), name=name, label=label[wnid], wnid=wnid, path=path, offset=offset, size=size)
            for wnid, name, path, offset, size in self._train_index[1]
        )
        val = tuple(
            RawRef(key=_stem(name), name=name, label=label[wnid], wnid=wnid, path=path, offset=offset, size=size)
            for wnid, name, path, offset, size in self._val_entries(label)
        )
        keys: dict[str, RawRef] = {}
        for ref in train + val:
            other = keys.setdefault(ref.key, ref)
            if other is not ref:
                raise DataError(
                    f"two images share the key {ref.key!r} ({other.path}:{other.name} and {ref.path}:{ref.name}); "
                    "file stems must be unique across train and val"
                )
        return {"train": train, "val": val}

    def _val_entries(self, label: dict[str, int]) -> list[tuple[str, str, str, int, int]]:
        assert self._val is not None
        where = self._val.name
        if self._val.is_dir():
            files, folders = _list_val_dir(self._val, self.root)
        else:
            files, folders = _list_flat_tar(self._val, self.root), {}
        if folders:  # val/nXXXXXXXX/ folders: the folder is the label, the devkit ground truth is not needed
            entries = [(wnid, *entry) for wnid, group in folders.items() for entry in group]
        else:
            truth = self.devkit.val_wnids
            if len(truth) != len(files):
                raise DataError(
                    f"devkit ground truth ({self.devkit.source}) lists {len(truth)} val labels but {where} holds "
                    f"{len(files)} images; use the devkit that belongs to these images"
                )
            entries = [(wnid, *entry) for wnid, entry in zip(truth, files)]
        for wnid, name, *_ in entries:
            if wnid not in label:
                raise DataError(
                    f"val image {name} in {where} is of class {wnid}, which has no training images; "
                    "train and val must cover the same classes"
                )
        return sorted(entries, key=lambda entry: entry[1])

    def refs(self, split: Split) -> tuple[RawRef, ...]:
        """Every image of `split` in a deterministic order: train by (WNID, file name), val by file name."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose train or val")
        return self._refs[split]

    @property
    def counts(self) -> dict[str, int]:
        return {split: len(self.refs(split)) for split in SPLITS}

    def read(self, ref: RawRef) -> bytes:
        """The bytes of one image (one positioned read; opens and closes the file)."""
        with open_regular(self.root / ref.path) as file:
            return read_range(file, ref, root=self.root)

    def iter_split(self, split: Split) -> Iterator[RawImage]:
        """Images of `split` with their bytes, in `refs(split)` order; each file is opened once."""
        files: dict[str, BinaryIO] = {}
        try:
            for ref in self.refs(split):
                if ref.path not in files:
                    files[ref.path] = open_regular(self.root / ref.path)
                data = read_range(files[ref.path], ref, root=self.root)
                yield RawImage(key=ref.key, name=ref.name, data=data, label=ref.label, wnid=ref.wnid)
        finally:
            for file in files.values():
                file.close()


def read_range(file: BinaryIO, ref: RawRef, *, root: Path) -> bytes:
    """`ref.size` bytes at `ref.offset` of an open file; a short read means the file changed or was truncated."""
    data = os.pread(file.fileno(), ref.size, ref.offset)
    if len(data) != ref.size:
        raise DataError(
            f"{root / ref.path} ended while reading {ref.name} ({len(data)} of {ref.size} bytes); "
            "the file is truncated or changed since it was indexed — re-download or re-copy it"
        )
    return data


def _check_part(path: Path) -> None:
    """An archive or folder directly under RAW may be a symbolic link (to a shared copy, say) but must resolve to a
    regular file or a directory: opening a FIFO would block forever, a device would be read as data."""
    if not path.exists():
        raise DataError(f"{path} is a symbolic link to {os.readlink(path)!r}, which does not exist; fix the link or copy the data there")
    if not (path.is_dir() or path.is_file()):
        raise DataError(f"{path} is not a regular file or a directory ({_kind(path.stat().st_mode)}); {EXPECTED}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file, else OSError. Non-blocking open, so that a FIFO put in
    place of a listed file makes an error instead of a wait for a writer that never comes."""
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(handle).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{_kind(mode)}, not a regular file", str(path))
        return os.fdopen(handle, "rb")
    except BaseException:
        os.close(handle)
        raise


def _first_existing(*paths: Path) -> Path | None:
    """The first path present, a dangling link included (so that a broken link to an archive is reported, not
    silently passed over for the extracted folder)."""
    return next((path for path in paths if os.path.lexists(path)), None)


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and "/" not in name


# ---- tar archives ---------------------------------------------------------------------------------------------


def _safe_name(member: tarfile.TarInfo, archive: str) -> str:
    """The member's name without a leading `./`; absolute names and `..` components are refused (never extracted
    by path anyway, but such an archive is not an ILSVRC-2012 download and may be hostile)."""
    name = member.name
    if name.startswith("/") or ".." in name.split("/"):
        raise DataError(f"refusing member {name!r} of {archive}: absolute path or '..'; this is not an ILSVRC-2012 archive")
    while name.startswith("./"):
        name = name[2:]
    return name


def _members(tar: tarfile.TarFile, archive: str, end: int) -> list[tuple[str, tarfile.TarInfo]]:
    """All regular members (name, info) of an open tar whose data ends within `end` bytes; directories are
    skipped, links and devices refused. A missing end-of-archive block means the archive was cut short."""
    found = []
    try:
        for member in tar:
            name = _safe_name(member, archive)
            if member.isdir():
                continue
            if not member.isreg():
                raise DataError(f"refusing member {name!r} of {archive}: not a regular file (link or device)")
            if member.offset_data + member.size > end:
                raise DataError(f"{archive} is truncated (member {name} runs past the end); re-download it")
            found.append((name, member))
        # tarfile stops silently at a truncated or garbled header after the first; a complete archive ends
        # with a zero block where the next header would be.
        tar.fileobj.seek(tar.offset)
        if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
            raise DataError(f"{archive} is truncated or corrupt after {len(found)} members (no end-of-archive block); re-download it")
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise DataError(f"{archive} is truncated or corrupt ({error}); re-download it") from None
    return found


def _open_tar(file: BinaryIO, archive: str) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=file, mode="r:")
    except tarfile.ReadError as error:
        reason = "is empty" if "empty" in str(error) else "is not a tar archive"
        raise DataError(f"{archive} {reason}; re-download it") from None


def _list_train_tar(archive: Path, root: Path, leaves: dict[str, str]) -> list[tuple[str, str, str, int, int]]:
    """(wnid, name, path, offset, size) of every image in the train archive; offsets are absolute in the outer
    file (inner tars are uncompressed, so an image's bytes are one contiguous range of the outer tar)."""
    entries = []
    relative = str(archive.relative_to(root))
    with open(archive, "rb") as file, _open_tar(file, archive.name) as outer:
        for inner_name, inner in _members(outer, archive.name, os.fstat(file.fileno()).st_size):
            wnid = _class_wnid(inner_name, archive.name, leaves, suffix=".tar")
            where = f"{archive.name}:{inner_name}"
            inner_file = outer.extractfile(inner)
            assert inner_file is not None
            with _open_tar(inner_file, where) as tar:  # type: ignore[arg-type]
                members = _members(tar, where, inner.size)
            if not members:
                raise DataError(f"{where} holds no images; re-download {archive.name}")
            for name, member in members:
                if not _is_image_name(name):
                    raise DataError(f"unexpected member {name!r} in {where}; expected image files like {wnid}_1.JPEG")
                entries.append((wnid, name, relative, inner.offset_data + member.offset_data, member.size))
    return entries


def _list_flat_tar(archive: Path, root: Path) -> list[tuple[str, str, int, int]]:
    """(name, path, offset, size) of every image of a flat tar (the val archive), sorted by name."""
    entries = []
    relative = str(archive.relative_to(root))
    with open(archive, "rb") as file, _open_tar(file, archive.name) as tar:
        for name, member in _members(tar, archive.name, os.fstat(file.fileno()).st_size):
            if not _is_image_name(name):
                raise DataError(f"unexpected member {name!r} in {archive.name}; expected ILSVRC2012_val_XXXXXXXX.JPEG")
            entries.append((name, relative, member.offset_data, member.size))
    if not entries:
        raise DataError(f"{archive.name} holds no images; re-download it")
    return sorted(entries)


def _class_wnid(name: str, where: str, leaves: dict[str, str], *, suffix: str) -> str:
    wnid = name.removesuffix(suffix)
    if not WNID.fullmatch(wnid) or not name.endswith(suffix):
        raise DataError(f"{name!r} in {where} is not named after a WNID (nXXXXXXXX{suffix}); is this an ILSVRC-2012 train set?")
    if wnid not in leaves:
        raise DataError(f"{name!r} in {where}: WNID {wnid} is not a leaf class of the devkit's meta.mat; use the matching devkit")
    return wnid


# ---- extracted directories ------------------------------------------------------------------------------------


def _visible(folder: Path, where: str) -> list[os.DirEntry[str]]:
    """Entries of a folder without hidden files (`.DS_Store` and the like), sorted by name. Below train/ and val/
    only real folders and regular files are accepted: a symbolic link could point anywhere (outside RAW, at a FIFO
    that blocks the read forever), and a device or FIFO is not data. Refused, not skipped: found before any work,
    and the fix is one command."""
    with os.scandir(folder) as scan:
        entries = sorted((entry for entry in scan if not entry.name.startswith(".")), key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_symlink():
            raise DataError(
                f"{where}{entry.name} is a symbolic link; links inside train/ and val/ are not followed: replace them "
                f"by the files they point to (cp -rL), or link train/ or val/ itself"
            )
        if not (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False)):
            kind = _kind(entry.stat(follow_symlinks=False).st_mode)
            raise DataError(f"{where}{entry.name} is {kind}, not a regular file or folder; remove it")
    return entries


def _image_files(folder: Path, root: Path, where: str) -> list[tuple[str, str, int, int]]:
    found = []
    for entry in _visible(folder, where):
        if not (entry.is_file(follow_symlinks=False) and _is_image_name(entry.name)):
            raise DataError(f"unexpected {entry.name!r} in {where}; expected only image files (*.JPEG)")
        found.append((entry.name, str(Path(entry.path).relative_to(root)), 0, entry.stat(follow_symlinks=False).st_size))
    return found


def _list_train_dir(folder: Path, root: Path, leaves: dict[str, str]) -> list[tuple[str, str, str, int, int]]:
    entries = []
    classes = _visible(folder, f"{folder.name}/")
    if not classes:
        raise DataError(f"{folder} is empty; {EXPECTED}")
    for entry in classes:
        if not entry.is_dir(follow_symlinks=False):
            raise DataError(f"unexpected file {entry.name!r} in {folder}; expected one nXXXXXXXX/ folder per class")
        wnid = _class_wnid(entry.name, str(folder), leaves, suffix="")
        images = _image_files(Path(entry.path), root, f"{folder.name}/{entry.name}/")
        if not images:
            raise DataError(f"{entry.path} holds no images")
        entries += [(wnid, *image) for image in images]
    return entries


def _list_val_dir(folder: Path, root: Path) -> tuple[list[tuple[str, str, int, int]], dict[str, list]]:
    """Flat val/ (files) or val/nXXXXXXXX/ (folders → {wnid: files}); a mix of both is refused."""
    entries = _visible(folder, f"{folder.name}/")
    folders = [entry for entry in entries if entry.is_dir(follow_symlinks=False)]
    if not entries:
        raise DataError(f"{folder} is empty; {EXPECTED}")
    if not folders:
        return _image_files(folder, root, "val/"), {}
    if len(folders) != len(entries):
        raise DataError(f"{folder} mixes image files and class folders; use one flat val/ or one folder per class")
    by_class = {}
    for entry in folders:
        if not WNID.fullmatch(entry.name):
            raise DataError(f"folder {entry.name!r} in {folder} is not named after a WNID (nXXXXXXXX)")
        by_class[entry.name] = _image_files(Path(entry.path), root, f"val/{entry.name}/")
    return [], by_class


# ---- devkit ---------------------------------------------------------------------------------------------------


def _read_devkit(path: Path) -> Devkit:
    if path.is_dir():
        files = {}
        for member in (META_MAT, GROUND_TRUTH):
            if not (path / member).is_file():
                raise DataError(f"devkit {path} lacks {member}; re-extract {DEVKIT_ARCHIVE}")
            files[member] = (path / member).read_bytes()
    else:
        files = _read_devkit_archive(path)
    where = path.name
    leaves, ids = _parse_meta(files[META_MAT], f"{where}:{META_MAT}")
    truth = _parse_truth(files[GROUND_TRUTH], f"{where}:{GROUND_TRUTH}", ids)
    return Devkit(leaves=leaves, val_wnids=truth, source=where)


def _read_devkit_archive(path: Path) -> dict[str, bytes]:
    wanted = {f"{DEVKIT_DIR}/{member}": member for member in (META_MAT, GROUND_TRUTH)}
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                name = _safe_name(member, path.name)
                if name in wanted and member.isreg():
                    data = tar.extractfile(member)
                    assert data is not None
                    files[wanted[name]] = data.read()
    except DataError:
        raise
    except tarfile.ReadError as error:
        reason = "is empty" if "empty" in str(error) else "is not a (gzipped) tar archive"
        raise DataError(f"{path.name} {reason} ({error}); re-download it") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as error:
        raise DataError(f"{path.name} is truncated or corrupt ({error}); re-download it") from None
    lacking = [name for name in wanted if wanted[name] not in files]
    if lacking:
        raise DataError(f"{path.name} lacks {', '.join(lacking)}; is this the ILSVRC-2012 devkit (t12)?")
    return files


def _parse_meta(data: bytes, where: str) -> tuple[dict[str, str], dict[int, str]]:
    """Leaf synsets (num_children == 0) as (WNID → words, ILSVRC2012_ID → WNID); checks the real file's fields."""
    expected = "expected the ILSVRC-2012 devkit's meta.mat (a MAT v5 file with a 'synsets' struct array); re-download the devkit"
    try:
        synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
    except NotImplementedError:  # scipy reads MAT v4-v7; v7.3 files are HDF5
        raise DataError(f"{where} is a MAT v7.3 (HDF5) file, which is not read; {expected}") from None
    except KeyError:
        raise DataError(f"{where} holds no 'synsets' variable; {expected}") from None
    except Exception as error:  # scipy raises many types for a truncated or foreign file
        raise DataError(f"{where} is not a readable MAT file ({type(error).__name__}: {_first_line(error)}); {expected}") from None
    fields = getattr(synsets, "dtype", np.dtype(int)).names or ()
    lacking = [field for field in META_FIELDS if field not in fields]
    if lacking:
        raise DataError(f"{where} lacks synset fields {', '.join(lacking)}; {expected}")
    try:
        leaves = [synset for synset in np.atleast_1d(synsets) if int(synset["num_children"]) == 0]
        words = {str(synset["WNID"]): str(synset["words"]) for synset in leaves}
        ids = {int(synset["ILSVRC2012_ID"]): str(synset["WNID"]) for synset in leaves}
    except (TypeError, ValueError, IndexError) as error:
        raise DataError(f"{where}: a synset field has the wrong type ({_first_line(error)}); {expected}") from None
    if not leaves or len(words) != len(leaves) or len(ids) != len(leaves):
        raise DataError(f"{where}: no leaf synsets, or duplicate WNIDs/ILSVRC2012_IDs among them; re-download the devkit")
    return words, ids


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _parse_truth(data: bytes, where: str, ids: dict[int, str]) -> tuple[str, ...]:
    wnids = []
    for number, line in enumerate(data.decode("ascii", errors="replace").splitlines(), start=1):
        try:
            wnids.append(ids[int(line)])
        except ValueError:
            raise DataError(f"{where}:{number}: expected an ILSVRC2012_ID, got {line!r}") from None
        except KeyError:
            raise DataError(f"{where}:{number}: ILSVRC2012_ID {line.strip()} is not a leaf synset of meta.mat") from None
    return tuple(wnids)
