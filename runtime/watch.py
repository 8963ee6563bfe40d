"""`naturelm-edge watch BUNDLE INBOX`: the field unit's daemon.

Scans the inbox (recursively) every `poll_s` seconds, waits until a recording has stopped
growing (same size and modification time for `settle_s`), analyses at most `queue_size`
ready recordings per round with the same pipeline as `analyze` (the model stays loaded),
then applies the policy to every recording it finished: ``leave`` it, ``move`` it to
`done_dir` (keeping its path below the inbox) or ``delete`` it. Recordings that failed stay
where they are and are listed in the errors files. SIGTERM (or SIGINT) stops it cleanly
between windows; logs go to a rotating file. `naturelm-edge-watch.service` beside this
module is an example systemd unit for a Jetson.

Built to run for months: each round costs time, memory and flash writes in proportion to
the recordings of that round, not to the history. Combined outputs are rotated per day,
``detections/YYYY-MM-DD.csv|jsonl`` and ``errors/YYYY-MM-DD.csv``, the day being the
recording's own start (a ``YYYYMMDD_HHMMSS`` or ``YYYY-MM-DD[T ]HH-MM-SS`` stamp in its file
name, as AudioMoth, Song Meter and most recorders write) or, for names without one, the UTC
day it was analysed. A finished recording's rows are appended to its day's files (write,
fsync) before its journal line, which records each file's new length; on start, every day
file is cut back to the length its last journal line recorded (rows of a recording killed
before its journal line go, and it is analysed again), a day file no journal line names is
removed, and one shorter than recorded is rebuilt from the journal. So a kill at any point
leaves no duplicate, missing or torn row. ``detections.csv``, ``detections.jsonl`` and
``errors.csv`` in `out` are symbolic links to the latest day's files (skipped on file
systems without links). Each recording keeps its Raven table as with `analyze`. The journal
(``journal.jsonl``) is not rotated: a restart streams it once and keeps in memory only each
recording's path, size, modification time, status and line offset (about 200 bytes), never
its detections.

    $ naturelm-edge watch /opt/naturelm/bundle /data/inbox --out /data/detections \\
          --policy move --done-dir /data/analysed --log-file /var/log/naturelm-edge/watch.log
"""

from __future__ import annotations

import datetime as dt
import logging
import logging.handlers
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from runtime.analyze import (
    JOURNAL,
    Analysis,
    Settings,
    is_audio,
    make_settings,
    remove_stale_temporaries,
)
from runtime.bundle import Bundle, load_bundle
from runtime.errors import InputError, ManifestError
from runtime.files import atomic_stream, fsync_dir
from runtime.journal import Entry, Journal
from runtime.postprocess import Detection
from runtime.runners import Runner, open_runner
from runtime.writers import (
    CSV_HEADER,
    ERRORS_HEADER,
    append_text,
    format_csv_rows,
    format_errors_rows,
    format_jsonl,
)

log = logging.getLogger(__name__)

POLICIES = ("leave", "move", "delete")


class Inbox:
    """Finds recordings in a folder and tells which have stopped growing."""

    def __init__(self, folder: Path, settle_s: float) -> None:
        self.folder = folder
        self.settle_s = settle_s
        self._seen: dict[Path, tuple[int, int, float]] = {}

    def scan(self) -> list[Path]:
        """Audio files now in the inbox, sorted."""
        return sorted(p.absolute() for p in self.folder.rglob("*")
                      if p.is_file() and is_audio(p))

    def ready(self, paths: list[Path], now: float) -> list[Path]:
        """Those of `paths` whose size and modification time have not changed for
        `settle_s`; forgets files that are gone."""
        ready, seen = [], {}
        for path in paths:
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            key = (stat.st_size, stat.st_mtime_ns)
            size, mtime, since = self._seen.get(path, (*key, now))
            if (size, mtime) != key:
                since = now
            seen[path] = (*key, since)
            if now - since >= self.settle_s:
                ready.append(path)
        self._seen = seen
        return ready


def apply_policy(path: Path, policy: str, inbox: Path, done_dir: Path | None) -> None:
    """Leave, move (below `done_dir`, keeping the path below `inbox`) or delete `path`."""
    if policy == "leave" or not path.exists():
        return
    if policy == "delete":
        path.unlink()
    elif policy == "move":
        if done_dir is None:
            raise ValueError("policy 'move' needs --done-dir")
        target = done_dir / path.absolute().relative_to(inbox.absolute())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
    else:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    log.info("%s: %s", path, "deleted" if policy == "delete" else f"moved to {done_dir}")


_STAMP = re.compile(r"(?<!\d)((?:19|20)\d\d)(-?)(\d\d)\2(\d\d)[_T -]?(\d\d)[-:]?(\d\d)[-:]?(\d\d)"
                    r"(?!\d)")
_DAY_FILE = re.compile(r"\d{4}-\d{2}-\d{2}\.(csv|jsonl)")
LINKS = {"csv": "detections.csv", "jsonl": "detections.jsonl", "errors": "errors.csv"}


def recording_day(path: Path, now: Callable[[], dt.datetime] | None = None) -> str:
    """The day (``YYYY-MM-DD``) a recording belongs to: the date of the start stamp in its
    file name (``20240501_053000``, ``SITE_20240501_053000``, ``2024-05-01T05-30-00``,
    ``2024-05-01 05:30:00``), else the UTC day of `now` (default: the current time)."""
    for match in _STAMP.finditer(path.name):
        year, _, month, day, hour, minute, second = match.groups()
        try:
            stamp = dt.datetime(int(year), int(month), int(day), int(hour), int(minute),
                                int(second))
        except ValueError:
            continue  # digits that are no date (a serial number, say)
        return stamp.date().isoformat()
    moment = now() if now is not None else dt.datetime.now(dt.timezone.utc)
    return moment.date().isoformat()


class DailyFiles:
    """The daemon's combined outputs: append-only files per day (see the module docstring).

    `detections` and `error` append a finished recording's rows and return the files'
    new lengths for its journal entry; `repair` brings the files in line with the journal
    on start. ``bytes_written`` counts every byte this object wrote (appends and rebuilds).
    """

    def __init__(self, out: Path, formats: Sequence[str],
                 now: Callable[[], dt.datetime] | None = None) -> None:
        self.out = out
        self.formats = tuple(f for f in ("csv", "jsonl") if f in formats)
        self.now = now
        self.bytes_written = 0
        self._links = True

    def detections(self, path: Path, detections: Sequence[Detection]) -> Mapping[str, int]:
        day = recording_day(path, self.now)
        lengths: dict[str, int] = {}
        for kind in self.formats:
            rel = f"detections/{day}.{kind}"
            lengths[rel] = self._append(rel, *_render(kind, detections))
            self._link(LINKS[kind], rel)
        return lengths

    def error(self, path: Path, reason: str) -> Mapping[str, int]:
        rel = f"errors/{recording_day(path, self.now)}.csv"
        text = format_errors_rows([(str(path.absolute()), reason)])
        length = self._append(rel, text, ERRORS_HEADER)
        self._link(LINKS["errors"], rel)
        return {rel: length}

    def repair(self, journal: Journal) -> list[str]:
        """Cut every day file back to the length the journal last recorded for it, remove
        day files no journal line names, rebuild from the journal those that are shorter
        or missing; point the links at the files of the journal's last lines. Returns what
        was done, one line per file touched."""
        on_disk = {p.relative_to(self.out).as_posix()
                   for folder in ("detections", "errors") if (self.out / folder).is_dir()
                   for p in (self.out / folder).iterdir()
                   if p.is_file() and _DAY_FILE.fullmatch(p.name)}
        done = []
        for rel in sorted(on_disk | set(journal.outputs)):
            path, want = self.out / rel, journal.outputs.get(rel)
            have = path.stat().st_size if path.exists() else -1
            if want is None:
                path.unlink()
                fsync_dir(path.parent)
                done.append(f"{rel}: removed (rows of no finished recording)")
            elif have > want:
                with path.open("r+b") as handle:
                    handle.truncate(want)
                    os.fsync(handle.fileno())
                done.append(f"{rel}: cut from {have} to {want} bytes (rows of a recording "
                            "not finished)")
            elif have < want:
                self._rebuild(rel, want, journal)
                done.append(f"{rel}: rebuilt from the journal ({'missing' if have < 0 else have}"
                            f" -> {want} bytes)")
        for rel in journal.outputs:
            self._link(LINKS["errors" if rel.startswith("errors/") else Path(rel).suffix[1:]],
                       rel)
        return done

    def _append(self, rel: str, text: str, header: str) -> int:
        path = self.out / rel
        before = path.stat().st_size if path.exists() else 0
        length = append_text(path, text, header)
        self.bytes_written += length - before
        return length

    def _rebuild(self, rel: str, want: int, journal: Journal) -> None:
        kind = "errors" if rel.startswith("errors/") else Path(rel).suffix[1:]
        path = self.out / rel
        with atomic_stream(path) as handle:
            handle.write(ERRORS_HEADER if kind == "errors" else _render(kind, ())[1])
            for entry in journal.with_output(rel):
                handle.write(_rows(kind, entry))
        self.bytes_written += path.stat().st_size
        if path.stat().st_size != want:
            raise ManifestError(path, f"rebuilt from the journal it has {path.stat().st_size} "
                                      f"bytes, not the {want} the journal recorded; move it "
                                      "away and start again")

    def _link(self, name: str, rel: str) -> None:
        """Point ``out/name`` at ``out/rel`` unless it points at a later day's file already
        (atomically; never over a regular file)."""
        link = self.out / name
        if not self._links or (link.is_symlink() and os.readlink(link) >= rel
                               and (self.out / os.readlink(link)).exists()):
            return
        if link.exists() and not link.is_symlink():
            log.warning("%s is a file from an earlier run, left as it is; the daemon's rows "
                        "are in %s", link, (self.out / rel).parent)
            self._links = False
            return
        tmp = self.out / f".{name}.{os.getpid()}.tmp"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(rel, tmp)
            os.replace(tmp, link)
        except OSError as exc:
            log.warning("%s: no link to the latest day file (%s)", link, exc)
            self._links = False


def _render(kind: str, detections: Sequence[Detection]) -> tuple[str, str]:
    """Rows and header of a detections file of `kind` (csv or jsonl)."""
    if kind == "csv":
        return format_csv_rows(detections), CSV_HEADER
    return format_jsonl(detections), ""


def _rows(kind: str, entry: Entry) -> str:
    if kind == "errors":
        return format_errors_rows([(entry.file, entry.reason)])
    return _render(kind, entry.detections)[0]


@dataclass
class RoundStats:
    """What one round did: recordings finished (ok), detections, bytes written to the
    combined files."""

    recordings: int = 0
    ok: int = 0
    detections: int = 0
    bytes_written: int = 0


class Watcher:
    """The daemon's state between rounds: the loaded model, the journal and the day files.
    `round` analyses what is ready in the inbox; `watch` calls it until stopped."""

    def __init__(self, bundle: Bundle, settings: Settings, runner: Runner, journal: Journal,
                 inbox: Path, out: Path, policy: str = "leave", done_dir: Path | None = None,
                 settle_s: float = 10.0, queue_size: int = 32, batch_size: int = 8,
                 now: Callable[[], dt.datetime] | None = None, decoders: int = 1) -> None:
        self.bundle, self.settings, self.runner, self.journal = bundle, settings, runner, journal
        self.inbox, self.out, self.policy, self.done_dir = inbox, out, policy, done_dir
        self.queue, self.queue_size, self.batch_size = Inbox(inbox, settle_s), queue_size, batch_size
        self.files = DailyFiles(out, settings.formats, now)
        self.decoders = decoders

    def start(self) -> None:
        """Clear what a kill left behind: temporary files, and day-file rows the journal
        does not vouch for."""
        remove_stale_temporaries(self.out)
        for line in self.files.repair(self.journal):
            log.info("restart: %s", line)

    def round(self, stop: threading.Event | None = None) -> RoundStats:
        """Apply the policy to finished recordings still in the inbox, analyse up to
        `queue_size` complete new ones, append their rows, apply the policy to them."""
        ready = _round(self.queue, self.journal, self.policy, self.inbox, self.done_dir,
                       self.queue_size)
        if not ready:
            return RoundStats()
        before = self.files.bytes_written
        run = Analysis(self.bundle, self.settings, self.out, ready, progress=False,
                       root=self.inbox, sink=self.files)
        run.process(self.runner, ready, self.journal, self.batch_size, 10.0, stop=stop,
                    decoders=self.decoders)
        _after(ready, self.journal, run.found, self.policy, self.inbox, self.done_dir)
        stats = RoundStats(run.finished, run.ok, run.new_detections,
                           self.files.bytes_written - before)
        log.info("round: %d recording(s), %d ok, %d detection(s), %d bytes appended",
                 stats.recordings, stats.ok, stats.detections, stats.bytes_written)
        return stats


def watch(
    bundle: Path,
    inbox: Path,
    out: Path = Path("detections"),
    backend: Literal["cpu", "cuda", "tensorrt", "engine"] = "cpu",
    precision: str | None = None,
    policy: Literal["leave", "move", "delete"] = "leave",
    done_dir: Path | None = None,
    settle_s: float = 10.0,
    poll_s: float = 5.0,
    queue_size: int = 32,
    batch_size: int = 8,
    decoders: int = 1,
    threads: int | None = None,
    tasks: list[str] | None = None,
    threshold: float | None = None,
    thresholds_file: Path | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    formats: list[str] | None = None,
    log_file: Path | None = None,
    log_max_mb: float = 10.0,
    stop_after_s: float | None = None,
) -> int:
    """Analyse recordings as they arrive in INBOX until SIGTERM; results go to --out.

    Args:
        bundle: the bundle folder or .tar.gz.
        inbox: the folder recordings arrive in (searched recursively).
        out: output folder (detections, errors, journal).
        backend: cpu, cuda, tensorrt (ONNX Runtime) or engine (native TensorRT).
        precision: pick the bundle's model of this precision.
        policy: what to do with a recording once analysed: leave, move or delete.
        done_dir: where `move` puts analysed recordings.
        settle_s: a file counts as complete once unchanged for this long.
        poll_s: seconds between inbox scans.
        queue_size: at most this many recordings per round (the rest wait in the inbox).
        batch_size: windows per model call.
        decoders: recordings decoded at once, one thread each (a backlog clears faster).
        threads: ONNX Runtime intra-op threads.
        tasks: only these of the bundle's tasks.
        threshold: one threshold for every task and label.
        thresholds_file: CSV task,label,threshold.
        include: labels to keep (names or files of names).
        exclude: labels to drop (names or files of names).
        formats: outputs among raven, csv, jsonl, audacity.
        log_file: rotating log file (default: stderr).
        log_max_mb: rotate the log at this size (5 old logs are kept).
        stop_after_s: stop by itself after this many seconds (default: run until SIGTERM).
    """
    _setup_logging(log_file, log_max_mb)
    # a .tar.gz bundle is extracted into a scratch folder that goes when the daemon stops
    with tempfile.TemporaryDirectory(prefix="naturelm-bundle-") as scratch:
        try:
            if policy == "move" and done_dir is None:
                raise ValueError("--policy move needs --done-dir")
            if queue_size < 1 or decoders < 1 or settle_s < 0 or poll_s <= 0:
                raise ValueError("queue_size and decoders must be >= 1, settle_s >= 0 and "
                                 "poll_s > 0")
            if not inbox.is_dir():
                raise ValueError(f"{inbox}: inbox folder not found")
            loaded = load_bundle(bundle, extract_to=scratch)
            settings = make_settings(loaded.manifest, None, None, tasks, threshold, thresholds_file,
                                     None, include, exclude, True, 0.0, formats, None)
            runner = open_runner(loaded, backend, threads=threads, precision=precision)
            model = Path(str(getattr(runner, "model", getattr(runner, "engine_path", "")))).name
            journal = Journal.open(out / JOURNAL, settings.fingerprint(loaded, model), resume=True)
            daemon = Watcher(loaded, settings, runner, journal, inbox, out, policy, done_dir,
                             settle_s, queue_size, batch_size, decoders=decoders)
            daemon.start()
        except (InputError, ValueError, KeyError) as exc:
            log.error("watch: %s", exc)
            return 2
        started = time.monotonic()
        log.info("watching %s with %s on %s (policy %s)", inbox, model, backend, policy)
        with _stop_on_signals() as stop, journal, runner:
            while not stop.is_set():
                daemon.round(stop)
                if stop_after_s is not None and time.monotonic() - started >= stop_after_s:
                    break
                stop.wait(poll_s)
        log.info("stopped")
    return 0


def _round(queue: Inbox, journal: Journal, policy: str, inbox: Path, done_dir: Path | None,
           queue_size: int) -> list[Path]:
    """Apply the policy to finished recordings still in the inbox (a restart after a crash
    between journal and move) and return up to `queue_size` complete new ones."""
    fresh = []
    for path in queue.scan():
        done = journal.done(path)
        if done is None:
            fresh.append(path)
        elif done.status == "ok":
            apply_policy(path, policy, inbox, done_dir)
    return queue.ready(fresh, time.monotonic())[:queue_size]


def _after(paths: list[Path], journal: Journal, found: Mapping[Path, int], policy: str,
           inbox: Path, done_dir: Path | None) -> None:
    for path in paths:
        done = journal.done(path)
        if done is None:
            continue  # interrupted: analysed again next time
        if done.status == "ok":
            log.info("%s: %d detection(s)", path, found.get(path, 0))
            apply_policy(path, policy, inbox, done_dir)
        else:
            log.warning("%s: failed: %s (left in place)", path,
                        journal.entry(str(path.absolute())).reason)


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT (handlers only where signals can be installed; the
    previous handlers come back when the block ends)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the current window", signum)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _setup_logging(log_file: Path | None, max_mb: float) -> None:
    """Log the runtime's messages to a rotating file, or to stderr."""
    logger = logging.getLogger("runtime")
    logger.setLevel(logging.INFO)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=int(max_mb * 1024 * 1024), backupCount=5, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.handlers = [handler]
    logger.propagate = False
