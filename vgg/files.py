"""Atomic file writes: a reader sees the old file or the complete new one, never a partial write."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `data` (bytes, or a function writing to a binary file) to a temporary file beside `path`, fsync it,
    then rename it over `path`. On any failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            if isinstance(data, bytes):
                file.write(data)
            else:
                data(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide outputs from other users of a shared volume
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
