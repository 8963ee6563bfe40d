"""The journal of finished recordings: what makes a directory run resumable after a power cut.

One JSON line per finished recording (its detections, or the reason it failed), appended and
fsynced only after that recording's own outputs were written. The first line holds the run's
settings fingerprint, so a rerun with other settings refuses to mix results. A line torn by a
power cut (no newline, or not JSON) can only be the last one; opening the journal cuts it
off, and that recording is simply analysed again.

Memory stays bounded by the number of recordings, not by their detections: opening streams
the file once and keeps, per recording, only its size, modification time, status and the
byte offset of its line (`Done`). Detections are read back from disk (`entry`, `latest`,
`with_output`) only when a combined file is built or rebuilt. An entry may name the combined
files it appended rows to (`Entry.outputs`: path relative to the output folder -> the file's
length after the append, as the `watch` daemon's per-day files do); `Journal.outputs` holds
the last recorded length of each, which is what a restart cuts a longer file back to.

A unit that runs for months keeps appending: a recording analysed again (it changed, or a
rerun reports a missing file once more) leaves its older lines behind. Opening compacts the
journal when it holds more than `COMPACT_RATIO` times the lines worth keeping (and at least
`COMPACT_MIN_LINES`): it is rewritten atomically (temporary file, fsync, rename) with the
header, the latest line of each recording, and every line that names a combined file (those
rows are in the file, and a rebuild replays them). `done`, `entry`, `latest`, `with_output`
and `outputs` answer exactly as before; a kill mid-way leaves the old journal or the new one.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "journal.jsonl"
    >>> with Journal.open(path, fingerprint="abc") as journal:
    ...     journal.append(Entry("/data/a.wav", 123, 456, "ok", duration_s=60.0))
    >>> with Journal.open(path, fingerprint="abc") as journal:
    ...     sorted(journal.finished), journal.entry("/data/a.wav").duration_s
    (['/data/a.wav'], 60.0)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, NamedTuple

from runtime.errors import ManifestError
from runtime.files import atomic_stream, atomic_write_bytes
from runtime.postprocess import Detection

JOURNAL_VERSION = 1
COMPACT_MIN_LINES = 1000
COMPACT_RATIO = 2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One finished recording: ``status`` is ``ok`` or ``error`` (with ``reason``);
    ``outputs`` maps the combined files its rows were appended to onto their new lengths."""

    file: str
    size: int
    mtime_ns: int
    status: str
    duration_s: float = 0.0
    reason: str = ""
    detections: Sequence[Detection] = field(default_factory=tuple)
    outputs: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["detections"] = [asdict(d) for d in self.detections]
        if not self.outputs:
            del data["outputs"]
        else:
            data["outputs"] = dict(self.outputs)
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Entry:
        dets = tuple(Detection(**d) for d in data.get("detections", ()))
        outputs = {str(k): int(v) for k, v in data.get("outputs", {}).items()}
        return cls(str(data["file"]), int(data["size"]), int(data["mtime_ns"]),
                   str(data["status"]), float(data.get("duration_s", 0.0)),
                   str(data.get("reason", "")), dets, outputs)


class Done(NamedTuple):
    """What the journal keeps in memory per recording: enough to tell whether it is done,
    and where its line is to read the rest back."""

    size: int
    mtime_ns: int
    status: str
    offset: int


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
    """An append-only, fsynced JSONL journal; use `Journal.open`.

    ``finished`` maps each recording's absolute path to its latest `Done`; ``outputs`` maps
    each combined file named by an entry to its last recorded length.
    """

    def __init__(self, path: Path, handle: BinaryIO, finished: dict[str, Done],
                 outputs: dict[str, int], end: int) -> None:
        self.path = path
        self._handle = handle
        self._reader: BinaryIO | None = None
        self._end = end
        self.finished = finished
        self.outputs = outputs

    @classmethod
    def open(cls, path: str | os.PathLike[str], fingerprint: str, resume: bool = True,
             compact: bool = True) -> Journal:
        """Open (or start) the journal at `path`. With `resume` the finished entries are read
        back (a torn last line is cut off, and with `compact` superseded lines are dropped
        once they dominate the file); without it the journal starts afresh.

        Raises:
            ManifestError: the journal was written with other settings, or a line other
                than the last is damaged.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_rewrites(path)
        finished: dict[str, Done] = {}
        outputs: dict[str, int] = {}
        if resume and path.exists() and path.stat().st_size:
            scan = _read(path, fingerprint, finished, outputs)
            if scan.good_bytes < path.stat().st_size:
                os.truncate(path, scan.good_bytes)
            if compact and _worth_compacting(scan, len(finished)):
                _compact(path, scan, finished)
        else:
            _start(path, fingerprint)
        handle = open(path, "ab")  # noqa: SIM115 - closed by close()
        return cls(path, handle, finished, outputs, handle.seek(0, os.SEEK_END))

    def done(self, path: str | os.PathLike[str]) -> Done | None:
        """What the journal knows of `path` if it was finished and has not changed since."""
        name, size, mtime = file_key(path)
        done = self.finished.get(name)
        if done is None or (done.size, done.mtime_ns) != (size, mtime):
            return None
        return done

    def append(self, entry: Entry) -> None:
        """Record a finished recording durably (write, flush, fsync)."""
        line = (entry.to_json() + "\n").encode("utf-8")
        self._handle.write(line)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.finished[entry.file] = Done(entry.size, entry.mtime_ns, entry.status, self._end)
        self.outputs.update(entry.outputs)
        self._end += len(line)

    def entry(self, file: str) -> Entry:
        """The latest entry of `file` (an absolute path in `finished`), read from disk."""
        done = self.finished[file]
        reader = self._open_reader()
        reader.seek(done.offset)
        return Entry.from_dict(json.loads(reader.readline()))

    def latest(self) -> Iterator[Entry]:
        """The latest entry of every recording, sorted by path, read one at a time."""
        for file in sorted(self.finished):
            yield self.entry(file)

    def with_output(self, output: str) -> Iterator[Entry]:
        """Every entry (in journal order) that appended rows to the combined file `output`."""
        reader = self._open_reader()
        reader.seek(0)
        reader.readline()
        position = reader.tell()
        while position < self._end:
            raw = reader.readline()
            position += len(raw)
            if f'"{output}"'.encode() in raw:  # cheap filter before parsing the line
                entry = Entry.from_dict(json.loads(raw))
                if output in entry.outputs:
                    yield entry

    def _open_reader(self) -> BinaryIO:
        if self._reader is None:
            self._reader = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        return self._reader

    def close(self) -> None:
        self._handle.close()
        if self._reader is not None:
            self._reader.close()

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


def _remove_stale_rewrites(path: Path) -> None:
    """Delete temporary journals a kill left mid-rewrite (``.<name>.<random>.tmp``); the
    journal they were meant to replace is intact."""
    for stale in path.parent.iterdir():
        if stale.name.startswith(f".{path.name}.") and stale.name.endswith(".tmp"):
            stale.unlink()


class _Scan(NamedTuple):
    """What reading a journal found: its intact prefix in bytes, its entry lines, and how
    many of those name combined files."""

    good_bytes: int
    lines: int
    output_lines: int


def _read(path: Path, fingerprint: str, finished: dict[str, Done],
          outputs: dict[str, int]) -> _Scan:
    """Fill `finished` and `outputs` streaming the journal line by line; returns what it
    found (`_Scan`)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        first = handle.readline()
        try:
            header = json.loads(first)
        except ValueError as exc:
            raise ManifestError(path, f"not a naturelm-edge journal (bad first line: {exc}); "
                                      "delete it or run without --resume") from exc
        if not isinstance(header, dict) or header.get("fingerprint") != fingerprint:
            raise ManifestError(path, "this output folder holds results of a run with other "
                                      "settings (bundle, thresholds, windows or outputs); use a "
                                      "new --out folder or --no-resume to start over")
        offset, number, with_outputs = len(first), 1, 0
        while True:
            raw = handle.readline()
            number += 1
            if not raw.endswith(b"\n"):
                # empty (the end) or torn by a power cut: cut it off
                return _Scan(offset, number - 2, with_outputs)
            try:
                data = json.loads(raw)
                done = Done(int(data["size"]), int(data["mtime_ns"]), str(data["status"]),
                            offset)
                name = str(data["file"])
                written = {str(k): int(v) for k, v in data.get("outputs", {}).items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                if offset + len(raw) == size:
                    return _Scan(offset, number - 2, with_outputs)  # a torn last line: cut it
                raise ManifestError(f"{path}:{number}", f"damaged journal line: {exc}") from exc
            finished[name] = done
            outputs.update(written)
            with_outputs += bool(written)
            offset += len(raw)


def _worth_compacting(scan: _Scan, recordings: int) -> bool:
    """Whether superseded lines dominate: at most ``recordings + output_lines`` lines are
    kept (an upper bound: a recording's latest line may name outputs too)."""
    return (scan.lines >= COMPACT_MIN_LINES
            and scan.lines > COMPACT_RATIO * (recordings + scan.output_lines))


def _compact(path: Path, scan: _Scan, finished: dict[str, Done]) -> None:
    """Rewrite the journal atomically with its header, the latest line of every recording and
    every line naming combined files, in their order; point `finished` at the new offsets.

    A failed rewrite (a full disk) leaves the journal as it was and is logged: compaction
    saves space, and the run goes on without it.
    """
    moved: dict[str, int] = {}
    try:
        with path.open("rb") as source, atomic_stream(path, binary=True) as target:
            first = source.readline()
            target.write(first)
            old, new, kept = len(first), len(first), 0
            while old < scan.good_bytes:
                raw = source.readline()
                data = json.loads(raw)
                name = str(data["file"])
                latest = finished[name].offset == old
                if latest or data.get("outputs"):
                    target.write(raw)
                    if latest:
                        moved[name] = new
                    new, kept = new + len(raw), kept + 1
                old += len(raw)
    except OSError as exc:
        log.warning("%s: not compacted (%s); it keeps its %d lines", path, exc, scan.lines)
        return
    for name, offset in moved.items():
        finished[name] = finished[name]._replace(offset=offset)
    log.info("%s: compacted from %d to %d lines (%d -> %d bytes)", path, scan.lines, kept,
             scan.good_bytes, new)
