"""Crash-safe file writing: a temporary file beside the target, fsync, then an atomic rename.

A power cut leaves either the old file or the new one, never a torn one.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "out.csv"
    >>> atomic_write_text(p, "a,b\\n")
    >>> p.read_text()
    'a,b\\n'
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_stream(path: str | os.PathLike[str], binary: bool = False) -> Iterator[IO[Any]]:
    """Write a file of any length piece by piece, atomically: the pieces go to a temporary file
    beside `path` (mode 0644), which replaces `path` after fsync only if the block ends without
    an exception; otherwise the temporary file is removed and `path` is untouched. Text is UTF-8
    with no newline translation."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600 files; outputs must stay readable by other users of the unit.
        os.chmod(tmp, 0o644)
        handle = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8",
                                                              newline="")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (same folder temp file, fsync, rename)."""
    with atomic_stream(path, binary=True) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(folder: Path) -> None:
    """Persist a file's creation, rename or removal in `folder` (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
