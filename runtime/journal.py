"""The journal of finished recordings: what makes a directory run resumable after a power cut.

One JSON line per finished recording (its detections, or the reason it failed), appended and
fsynced only after that recording's own outputs were written atomically. The first line
holds the run's settings fingerprint, so a rerun with other settings refuses to mix results.
A line torn by a power cut (no newline, or not JSON) can only be the last one; opening the
journal cuts it off, and that recording is simply analysed again.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "journal.jsonl"
    >>> with Journal.open(path, fingerprint="abc") as journal:
    ...     journal.append(Entry("/data/a.wav", 123, 456, "ok", duration_s=60.0))
    >>> sorted(Journal.open(path, fingerprint="abc").entries)
    ['/data/a.wav']
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from runtime.errors import ManifestError
from runtime.files import atomic_write_bytes
from runtime.postprocess import Detection

JOURNAL_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """One finished recording: ``status`` is ``ok`` or ``error`` (with ``reason``)."""

    file: str
    size: int
    mtime_ns: int
    status: str
    duration_s: float = 0.0
    reason: str = ""
    detections: Sequence[Detection] = field(default_factory=tuple)

    def to_json(self) -> str:
        data = asdict(self)
        data["detections"] = [asdict(d) for d in self.detections]
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Entry:
        dets = tuple(Detection(**d) for d in data.get("detections", ()))
        return cls(str(data["file"]), int(data["size"]), int(data["mtime_ns"]),
                   str(data["status"]), float(data.get("duration_s", 0.0)),
                   str(data.get("reason", "")), dets)


def file_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """The journal's identity of a recording: absolute path, size and modification time
    (a file that changed since it was analysed is analysed again)."""
    resolved = Path(path).absolute()
    try:
        stat = resolved.stat()
    except OSError:
        return str(resolved), -1, -1
    return str(resolved), stat.st_size, stat.st_mtime_ns


class Journal:
    """An append-only, fsynced JSONL journal; use `Journal.open`."""

    def __init__(self, path: Path, handle: Any, entries: dict[str, Entry]) -> None:
        self.path = path
        self._handle = handle
        self.entries = entries

    @classmethod
    def open(cls, path: str | os.PathLike[str], fingerprint: str, resume: bool = True,
             ) -> Journal:
        """Open (or start) the journal at `path`. With `resume` the finished entries are read
        back (a torn last line is cut off); without it the journal starts afresh.

        Raises:
            ManifestError: the journal was written with other settings, or a line other
                than the last is damaged.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        entries: dict[str, Entry] = {}
        if resume and path.exists() and path.stat().st_size:
            entries, good_bytes = _read(path, fingerprint)
            if good_bytes < path.stat().st_size:
                os.truncate(path, good_bytes)
        else:
            _start(path, fingerprint)
        handle = open(path, "ab")  # noqa: SIM115 - closed by close()
        return cls(path, handle, entries)

    def done(self, path: str | os.PathLike[str]) -> Entry | None:
        """The entry of `path` if it was finished and has not changed since."""
        name, size, mtime = file_key(path)
        entry = self.entries.get(name)
        if entry is None or (entry.size, entry.mtime_ns) != (size, mtime):
            return None
        return entry

    def append(self, entry: Entry) -> None:
        """Record a finished recording durably (write, flush, fsync)."""
        self._handle.write((entry.to_json() + "\n").encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.entries[entry.file] = entry

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _header(fingerprint: str) -> bytes:
    line = json.dumps({"journal": JOURNAL_VERSION, "fingerprint": fingerprint})
    return (line + "\n").encode("utf-8")


def _start(path: Path, fingerprint: str) -> None:
    atomic_write_bytes(path, _header(fingerprint))


def _read(path: Path, fingerprint: str) -> tuple[dict[str, Entry], int]:
    """Entries and the byte length of the intact prefix of the journal."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    try:
        header = json.loads(lines[0])
    except ValueError as exc:
        raise ManifestError(path, f"not a naturelm-edge journal (bad first line: {exc}); "
                                  "delete it or run without --resume") from exc
    if header.get("fingerprint") != fingerprint:
        raise ManifestError(path, "this output folder holds results of a run with other "
                                  "settings (bundle, thresholds, windows or outputs); use a new "
                                  "--out folder or --no-resume to start over")
    entries: dict[str, Entry] = {}
    offset = len(lines[0]) + 1
    complete = lines[1:-1]  # the part after the last newline is torn or empty
    for number, raw in enumerate(complete, start=2):
        try:
            entry = Entry.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(complete) + 1:
                return entries, offset  # a torn last line: cut it off
            raise ManifestError(f"{path}:{number}", f"damaged journal line: {exc}") from exc
        entries[entry.file] = entry
        offset += len(raw) + 1
    return entries, offset
