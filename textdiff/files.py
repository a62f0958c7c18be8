"""Writing files so that readers never see half of one, and a power cut leaves the old file or the new one.

Every file textdiff writes (checkpoints, exports, shards, manifests, records, images) goes the same way: the
bytes into a temporary name beside the target, an fsync of the file, a rename onto the target, an fsync of
the folder (a rename survives a power cut only once its folder is synced). :func:`atomic_write` is that way
for a writer function, :func:`atomic_write_bytes` and :func:`atomic_write_json` for data in memory, and
:func:`publish` for a file a library wrote under a temporary name itself (tar shards).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so the renames and new names in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(written: str | Path, path: str | Path) -> None:
    """Make the finished file ``written`` the file ``path``: fsync it, rename it, fsync the folder."""
    with open(written, "rb") as f:
        os.fsync(f.fileno())
    os.replace(written, path)
    fsync_dir(Path(path).parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then :func:`publish` it as ``path``; on any
    error the temporary file is removed and ``path`` is untouched.

    The file gets the usual permissions (umask), unlike ``tempfile.mkstemp``'s owner-only 0600.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes({path}) takes bytes, not {type(data).__name__}")
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: object, indent: int = 2) -> None:
    """Write ``obj`` as UTF-8 JSON (non-ASCII kept as is, a final newline) to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))
