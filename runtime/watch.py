"""`naturelm-edge watch BUNDLE INBOX`: the field unit's daemon.

Scans the inbox (recursively) every `poll_s` seconds, waits until a recording has stopped
growing (same size and modification time for `settle_s`), analyses at most `queue_size`
ready recordings per round with the same pipeline as `analyze` (the model stays loaded),
then applies the policy to every recording it finished: ``leave`` it, ``move`` it to
`done_dir` (keeping its path below the inbox) or ``delete`` it. Recordings that failed stay
where they are and are listed in `errors.csv`. The journal in `out` makes restarts safe: a
finished recording is never analysed twice, and one interrupted mid-way is analysed again.
SIGTERM (or SIGINT) stops it cleanly between windows; logs go to a rotating file.
`naturelm-edge-watch.service` beside this module is an example systemd unit for a Jetson.

    $ naturelm-edge watch /opt/naturelm/bundle /data/inbox --out /data/detections \\
          --policy move --done-dir /data/analysed --log-file /var/log/naturelm-edge/watch.log
"""

from __future__ import annotations

import logging
import logging.handlers
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Literal

from runtime.analyze import (
    JOURNAL,
    Analysis,
    is_audio,
    make_settings,
    remove_stale_temporaries,
)
from runtime.bundle import load_bundle
from runtime.errors import InputError
from runtime.journal import Journal
from runtime.runners import open_runner

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
    try:
        if policy == "move" and done_dir is None:
            raise ValueError("--policy move needs --done-dir")
        if queue_size < 1 or settle_s < 0 or poll_s <= 0:
            raise ValueError("queue_size must be >= 1, settle_s >= 0 and poll_s > 0")
        if not inbox.is_dir():
            raise ValueError(f"{inbox}: inbox folder not found")
        loaded = load_bundle(bundle)
        settings = make_settings(loaded.manifest, None, None, tasks, threshold, thresholds_file,
                                 None, include, exclude, True, 0.0, formats, None)
        runner = open_runner(loaded, backend, threads=threads, precision=precision)
        model = Path(str(getattr(runner, "model", getattr(runner, "engine_path", "")))).name
        journal = Journal.open(out / JOURNAL, settings.fingerprint(loaded, model), resume=True)
    except (InputError, ValueError, KeyError) as exc:
        log.error("watch: %s", exc)
        return 2
    stop = _stop_on_signals()
    remove_stale_temporaries(out)
    started = time.monotonic()
    queue = Inbox(inbox, settle_s)
    log.info("watching %s with %s on %s (policy %s)", inbox, model, backend, policy)
    with journal, runner:
        while not stop.is_set():
            ready = _round(queue, journal, policy, inbox, done_dir, queue_size)
            if ready:
                run = Analysis(loaded, settings, out, ready, progress=False, root=inbox)
                run.process(runner, ready, journal, batch_size, 10.0, stop=stop)
                run.write_combined(journal)
                _after(ready, journal, policy, inbox, done_dir)
                log.info("round: %d recording(s), %d ok, %d detection(s)", run.finished,
                         run.ok, run.new_detections)
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
        entry = journal.done(path)
        if entry is None:
            fresh.append(path)
        elif entry.status == "ok":
            apply_policy(path, policy, inbox, done_dir)
    return queue.ready(fresh, time.monotonic())[:queue_size]


def _after(paths: list[Path], journal: Journal, policy: str, inbox: Path,
           done_dir: Path | None) -> None:
    for path in paths:
        entry = journal.done(path)
        if entry is None:
            continue  # interrupted: analysed again next time
        if entry.status == "ok":
            log.info("%s: %d detection(s)", path, len(entry.detections))
            apply_policy(path, policy, inbox, done_dir)
        else:
            log.warning("%s: failed: %s (left in place)", path, entry.reason)


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (handlers only where signals can be installed)."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        def handler(signum: int, _frame: object) -> None:
            log.info("signal %d: stopping after the current window", signum)
            stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    return stop


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
