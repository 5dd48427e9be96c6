"""Writing outputs safely: a reader sees the old file or the complete new one, never a partial write; a location
that cannot be written is one line before any work; a write the OS refuses (disk full, quota, read-only) is one
line naming the file, and leaves no temporary file behind, so the same command succeeds once space is freed."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from vgg.errors import OutputError

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # EFBIG: a file-size limit (ulimit -f) reads the same
PROBE_BYTES = 4096  # one block: an empty probe file needs no data block, so it would pass on a full disk


def write_error(path: Path, error: OSError, *, option: str | None = None) -> OutputError:
    """The one line for a write to `path` that the OS refused; `option` names where the user chose it."""
    where = f"{option} {path}" if option else str(path)
    reason = error.strerror or type(error).__name__
    if error.errno in NO_SPACE:
        fix = "free space there (or choose another location) and run again"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a location you can write to"
    else:
        fix = "check the location and run again"
    return OutputError(f"cannot write {where}: {reason}; {fix}", error.errno, reason)


def check_writable(directory: str | os.PathLike[str], option: str) -> Path:
    """Create `directory` (and its parents) and prove a file can be written in it — a block written, fsynced and
    removed — before a command works for minutes. `option` is how the user named it (`OUT`, `--out`)."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} exists and is not a directory; choose a directory", errno.ENOTDIR)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".vgg-probe-", suffix=".tmp")
    except OSError as error:
        raise write_error(path, error, option=option) from None
    try:
        os.write(handle, bytes(PROBE_BYTES))
        os.fsync(handle)
    except OSError as error:
        raise write_error(path, error, option=option) from None
    finally:
        os.close(handle)
        os.unlink(probe)
    return path


def write_atomic(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `data` (bytes, or a function writing to a binary file) to a temporary file beside `path`, fsync it,
    then rename it over `path`. On any failure the temporary file is removed and `path` is left as it was; a
    write the OS refuses raises `OutputError` (a DataError and an OSError with the errno)."""
    with AtomicFiles() as files:
        file = files.open(path)
        if isinstance(data, bytes):
            file.write(data)
        else:
            data(file)
        files.commit()
    return Path(path)


class AtomicFiles:
    """Files published together: `open(path)` gives a temporary file beside `path`; `commit()` fsyncs them all and
    renames each into place (after every write succeeded, so a failure leaves all the old files). Leaving the
    block without `commit()`, or on any error, removes every temporary file; an OSError leaves as OutputError."""

    def __init__(self) -> None:
        self._pending: list[tuple[BinaryIO, Path, Path]] = []  # (file, temporary, destination)
        self._current: Path | None = None  # the file being written, for the error line

    def open(self, path: str | os.PathLike[str]) -> BinaryIO:
        path = Path(path)
        self._current = path
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        file = os.fdopen(handle, "wb")
        self._pending.append((file, Path(temporary), path))
        return file

    def commit(self) -> list[Path]:
        for file, _, path in self._pending:
            self._current = path
            file.flush()
            os.fsync(file.fileno())
            file.close()
        for _, temporary, path in self._pending:
            self._current = path
            os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide outputs from other users of a shared volume
            os.replace(temporary, path)
        done = [path for _, _, path in self._pending]
        self._pending = []
        return done

    def _abort(self) -> None:
        for file, temporary, _ in self._pending:
            try:
                file.close()  # flushes what is buffered: may fail again on a full disk
            except OSError:
                pass
            temporary.unlink(missing_ok=True)
        self._pending = []

    def __enter__(self) -> AtomicFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._abort()  # after commit(): nothing is pending
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise write_error(self._current or Path("."), error) from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
