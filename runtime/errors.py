"""Typed errors: callers catch `InputError` to skip one bad file, report it, and go on.

    >>> try:
    ...     raise AudioError("clip.wav", "file is empty")
    ... except InputError as exc:
    ...     print(exc)
    clip.wav: file is empty
"""

from __future__ import annotations

import os


class NatureLMEdgeError(Exception):
    """Base of every error this project raises on purpose."""


class InputError(NatureLMEdgeError):
    """A user-supplied file cannot be used. Carries the path and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class AudioError(InputError):
    """An audio file is corrupt, truncated, empty, not audio, or holds NaN / Inf samples."""


class ManifestError(InputError):
    """A manifest, table or dataset file is malformed (names the file, row and field)."""
