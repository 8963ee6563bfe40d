"""`naturelm-edge analyze BUNDLE PATH...`: detections for recordings of any length.

Files, folders (searched recursively for audio) and globs are decoded in blocks by a
producer thread (memory stays flat whatever the length), resampled to the bundle's rate, cut
into windows and stacked into batches across recordings; the main thread only runs the model
and turns the scores into detections. Each finished recording gets its outputs written
atomically and then a line in the journal (`journal.jsonl`), so a run killed at any point
resumes with no duplicate, missing or torn output. Bad recordings go to `errors.csv` with
the reason and the run goes on; the exit code is 1 if any recording failed.

Outputs in ``--out``: ``<recording>.selections.txt`` (Raven Pro, one per recording, named
after its path relative to the inputs' common folder), ``detections.csv`` and
``detections.jsonl`` (every recording), ``<recording>.labels.txt`` (Audacity, on request),
``errors.csv``, ``journal.jsonl``. A .tar.gz bundle is extracted into a scratch folder for
the run; the ``engine`` backend needs the bundle folder, where engines are built on the device.

    $ naturelm-edge analyze bundle/ recordings/ "more/*.flac" --out results --backend cpu
    >>> analyze(Path("bundle"), ["site1/"], out=Path("results"))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from runtime.bundle import Bundle, BundleManifest, load_bundle
from runtime.errors import InputError
from runtime.files import atomic_stream
from runtime.journal import Entry, Journal, file_key
from runtime.postprocess import (
    Detection,
    Thresholds,
    activate,
    check_labels,
    load_label_list,
    load_thresholds,
    merge_consecutive,
    select,
    sort_detections,
)
from runtime.runners import Runner, open_runner
from runtime.windows import Window, WindowSpec, iter_windows
from runtime.writers import (
    CSV_HEADER,
    ERRORS_HEADER,
    check_formats,
    format_csv_rows,
    format_errors_rows,
    format_jsonl,
    write_audacity,
    write_raven,
)

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = frozenset({".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif",
                            ".aiff", ".aifc", ".w64", ".rf64", ".caf", ".au", ".snd"})
DEFAULT_FORMATS = ("raven", "csv", "jsonl")
JOURNAL, ERRORS = "journal.jsonl", "errors.csv"
# Windows the decoder may run ahead of the model: 41 MB of 10 s windows at 16 kHz.
QUEUE_WINDOWS = 64
BLOCK_S = 10.0
"""Seconds of audio decoded at a time by default (memory stays flat whatever the length)."""


@dataclass(frozen=True)
class Settings:
    """Everything that decides a recording's detections (fingerprinted into the journal)."""

    spec: WindowSpec
    tasks: tuple[str, ...]
    thresholds: Thresholds
    top_k: int | None
    include: frozenset[str] | None
    exclude: frozenset[str]
    merge: bool
    merge_gap_s: float
    channel: int | None
    formats: tuple[str, ...]

    def fingerprint(self, bundle: Bundle, model: str) -> str:
        data = {
            "bundle": sorted(bundle.manifest.files.items()), "model": model,
            "window": [self.spec.window_s, self.spec.hop_s, self.spec.last],
            "tasks": self.tasks, "top_k": self.top_k, "merge": [self.merge, self.merge_gap_s],
            "include": sorted(self.include) if self.include is not None else None,
            "exclude": sorted(self.exclude), "channel": self.channel, "formats": self.formats,
            "thresholds": [sorted(self.thresholds.defaults.items()), self.thresholds.global_,
                           sorted(self.thresholds.per_task.items()),
                           sorted((f"{t}/{lb}", v)
                                  for (t, lb), v in self.thresholds.per_label.items())],
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def analyze(
    bundle: Path,
    paths: list[str],
    out: Path = Path("detections"),
    backend: Literal["cpu", "cuda", "tensorrt", "engine"] = "cpu",
    precision: str | None = None,
    batch_size: int = 8,
    threads: int | None = None,
    hop_s: float | None = None,
    overlap_s: float | None = None,
    tasks: list[str] | None = None,
    threshold: float | None = None,
    thresholds_file: Path | None = None,
    top_k: int | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    merge: bool = True,
    merge_gap_s: float = 0.0,
    formats: list[str] | None = None,
    channel: int | None = None,
    block_s: float = BLOCK_S,
    decoders: int = 1,
    resume: bool = True,
    progress: bool = True,
) -> int:
    """Analyse recordings with a bundle; writes detections, errors and a journal to --out.

    Args:
        bundle: the bundle folder or .tar.gz.
        paths: audio files, folders (searched recursively) and glob patterns.
        out: output folder (created).
        backend: cpu, cuda or tensorrt (ONNX Runtime, with logged fallback) or engine (native TensorRT).
        precision: pick the bundle's model of this precision (fp32, fp16, int8).
        batch_size: windows per model call, across recordings.
        threads: ONNX Runtime intra-op threads (default: one per core).
        hop_s: hop between windows in seconds (default: the bundle's).
        overlap_s: overlap between windows in seconds (instead of hop_s).
        tasks: only these of the bundle's tasks (default: all).
        threshold: one threshold for every task and label (overrides the bundle's defaults).
        thresholds_file: CSV task,label,threshold with per-task / per-label thresholds.
        top_k: keep at most this many labels per window and task.
        include: labels to keep (label names, or files listing one label per line).
        exclude: labels to drop (label names, or files listing one label per line).
        merge: merge consecutive windows with the same label into one detection.
        merge_gap_s: merge detections at most this far apart.
        formats: outputs among raven, csv, jsonl, audacity (default: raven csv jsonl).
        channel: analyse this 0-based channel (default: the mean of all channels).
        block_s: seconds decoded at a time (memory stays flat whatever the length).
        decoders: recordings decoded at once, one thread each (for many files on a machine
            with cores to spare: a GPU backend, or more cores than --threads uses).
        resume: skip recordings the journal in --out lists as finished.
        progress: show a progress line with ETA and times-real-time on stderr.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="naturelm-edge: %(message)s")
    # a .tar.gz bundle is extracted into a scratch folder that goes when the run ends
    with tempfile.TemporaryDirectory(prefix="naturelm-bundle-") as scratch:
        try:
            loaded = load_bundle(bundle, extract_to=scratch)
            settings = make_settings(loaded.manifest, hop_s, overlap_s, tasks, threshold,
                                     thresholds_file, top_k, include, exclude, merge, merge_gap_s,
                                     formats, channel)
            if batch_size < 1 or decoders < 1 or block_s <= 0:
                raise ValueError("batch_size and decoders must be >= 1 and block_s positive")
            runner = open_runner(loaded, backend, threads=threads, precision=precision)
            model = str(getattr(runner, "model", getattr(runner, "engine_path", "")))
            journal = Journal.open(out / JOURNAL, settings.fingerprint(loaded, Path(model).name),
                                   resume)
        except (InputError, ValueError, KeyError) as exc:
            print(f"naturelm-edge analyze: {exc}", file=sys.stderr)
            return 2
        recordings, missing = expand_paths(paths)
        remove_stale_temporaries(out)
        run = Analysis(loaded, settings, out, recordings, progress)
        with journal:
            for path, reason in missing:
                run.record_error(journal, path, reason)
            todo = [r for r in recordings if journal.done(r) is None]
            run.resumed = len(recordings) - len(todo)
            run.process(runner, todo, journal, batch_size, block_s, enter=True,
                        decoders=decoders)
            run.write_combined(journal)
            failed = run.failed(journal, [*recordings, *(p for p, _ in missing)])
        run.summary(backend, model, failed)
        return 1 if failed else 0


class Sink(Protocol):
    """Where a finished recording's rows go as soon as it is finished (the `watch` daemon's
    per-day files); returns the combined files appended to and their new lengths, which
    the journal entry records."""

    def detections(self, path: Path, detections: Sequence[Detection]) -> Mapping[str, int]:
        ...

    def error(self, path: Path, reason: str) -> Mapping[str, int]:
        ...


def make_settings(manifest: BundleManifest, hop_s: float | None, overlap_s: float | None,
                  tasks: Sequence[str] | None, threshold: float | None,
                  thresholds_file: Path | None, top_k: int | None,
                  include: Sequence[str] | None, exclude: Sequence[str] | None, merge: bool,
                  merge_gap_s: float, formats: Sequence[str] | None, channel: int | None,
                  ) -> Settings:
    """The checked settings of a run from the command-line options (see `analyze`)."""
    if hop_s is not None and overlap_s is not None:
        raise ValueError("give --hop-s or --overlap-s, not both")
    hop = manifest.hop_s if hop_s is None else hop_s
    if overlap_s is not None:
        if not 0 <= overlap_s < manifest.window_s:
            raise ValueError(f"overlap_s must be in [0, {manifest.window_s}), got {overlap_s}")
        hop = manifest.window_s - overlap_s
    chosen = tuple(tasks) if tasks else tuple(t.name for t in manifest.tasks)
    for name in chosen:
        manifest.task(name)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    rules = Thresholds(defaults={t.name: t.threshold for t in manifest.tasks}, global_=threshold)
    if thresholds_file is not None:
        rules = load_thresholds(thresholds_file, rules)
    known = {label for t in manifest.tasks for label in t.labels}
    wanted = _labels(include, known, "--include") if include else None
    unwanted = _labels(exclude, known, "--exclude") if exclude else frozenset()
    return Settings(WindowSpec(manifest.window_s, hop, last="pad"), chosen, rules, top_k,
                    wanted, unwanted, merge, merge_gap_s, channel,
                    check_formats(formats or DEFAULT_FORMATS))


def _labels(items: Sequence[str], known: set[str], option: str) -> frozenset[str]:
    labels: set[str] = set()
    for item in items:
        labels |= load_label_list(item) if Path(item).is_file() else {item}
    check_labels(labels, known, option)
    return frozenset(labels)


def expand_paths(paths: Sequence[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Recordings named by files, folders (recursive, audio suffixes only) and globs, sorted
    and without duplicates; and the arguments that name nothing, with the reason."""
    found: dict[str, Path] = {}
    missing: list[tuple[Path, str]] = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            hits = [p for p in path.rglob("*") if p.is_file() and is_audio(p)]
        elif path.exists():
            hits = [path]
        elif glob.has_magic(arg):
            matched = [Path(p) for p in glob.glob(arg, recursive=True)]
            hits = [p for m in matched for p in ([m] if m.is_file() else m.rglob("*"))
                    if p.is_file() and is_audio(p)]
            if not hits:
                missing.append((path, "the pattern matches no file"))
        else:
            missing.append((path, "no such file or folder"))
            continue
        for hit in hits:
            found.setdefault(str(hit.absolute()), hit.absolute())
    return [found[k] for k in sorted(found)], missing


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporary files that atomic writes killed mid-way left in `out`
    (``.<name>.<random>.tmp``); the files they were meant to replace are intact."""
    stale = [p for p in out.rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink()
    return stale


def is_audio(path: Path) -> bool:
    """Whether `path` has an audio suffix and is not a hidden file."""
    return path.suffix.lower() in AUDIO_SUFFIXES and not path.name.startswith(".")


@dataclass
class _Recording:
    """Bookkeeping for one recording while its windows are in flight."""

    path: Path
    windows_done: int = 0
    windows_total: int | None = None  # known once the decoder reached the end
    duration_s: float = 0.0
    reached_s: float = 0.0
    detections: list[Detection] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.windows_done == self.windows_total


@dataclass(frozen=True)
class WindowBatch:
    """Windows of one or more recordings stacked for a model call: ``audio`` is float32
    [n, samples]; per row the recording's index in the run and the window's times."""

    audio: np.ndarray
    owners: np.ndarray
    start_s: np.ndarray
    end_s: np.ndarray


class _BatchBuilder:
    """Copies windows straight into a batch array as they are cut (the only copy after
    the cut); full batches are handed out, a recording that fails has its rows taken back."""

    def __init__(self, batch_size: int, samples: int) -> None:
        self.batch_size, self.samples = batch_size, samples
        self._new()

    def _new(self) -> None:
        self.audio = np.empty((self.batch_size, self.samples), dtype=np.float32)
        self.rows: list[tuple[int, float, float]] = []

    def add(self, owner: int, window: Window) -> WindowBatch | None:
        self.audio[len(self.rows)] = window.samples
        self.rows.append((owner, window.start_s, window.end_s))
        return self.take() if len(self.rows) == self.batch_size else None

    def drop(self, owner: int) -> None:
        keep = [i for i, row in enumerate(self.rows) if row[0] != owner]
        self.audio[: len(keep)] = self.audio[keep]
        self.rows = [self.rows[i] for i in keep]

    def take(self) -> WindowBatch | None:
        if not self.rows:
            return None
        owners, starts, ends = (np.array(column) for column in zip(*self.rows, strict=True))
        batch = WindowBatch(self.audio[: len(self.rows)], owners, starts, ends)
        self._new()
        return batch


Event = tuple[str, int, Any]


def decode_events(recordings: Iterable[tuple[int, Path]], rate: int, spec: WindowSpec,
                  channel: int | None, block_s: float, batch_size: int) -> Iterator[Event]:
    """What one decoder hands the model loop, in order, for the numbered recordings it takes
    from `recordings`: ``("batch", -1, WindowBatch)`` (full ones, windows of consecutive
    recordings mixed), ``("end", index, (seconds, windows))`` once a recording is decoded,
    ``("error", index, reason)`` for a recording that cannot be used (its windows not yet
    handed out are taken back; it comes after every batch holding the others), and a last
    partial batch."""
    from runtime.audio import stream_audio

    size, _ = spec.frames(rate)
    builder = _BatchBuilder(batch_size, size)
    for index, path in recordings:
        windows = 0
        try:
            blocks = _Counted(stream_audio(path, rate, block_s=block_s, channel=channel))
            for window in iter_windows(blocks, rate, spec):
                windows += 1
                batch = builder.add(index, window)
                if batch is not None:
                    yield "batch", -1, batch
        except (InputError, OSError) as exc:
            builder.drop(index)
            yield "error", index, exc.reason if isinstance(exc, InputError) else str(exc)
            continue
        yield "end", index, (blocks.samples / rate, windows)
    last = builder.take()
    if last is not None:
        yield "batch", -1, last


class _Counted:
    """Blocks passed through, counting their samples (the recording's decoded length)."""

    def __init__(self, blocks: Iterator[np.ndarray]) -> None:
        self.blocks, self.samples = blocks, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for block in self.blocks:
            self.samples += len(block)
            yield block


class _Shared:
    """The numbered recordings, handed out one at a time to whichever decoder asks next."""

    def __init__(self, recordings: Sequence[Path]) -> None:
        self._next = iter(enumerate(recordings))
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[tuple[int, Path]]:
        while True:
            with self._lock:
                item = next(self._next, None)
            if item is None:
                return
            yield item


class _Producer:
    """`decoders` threads, each running `decode_events` on the next recording not yet taken,
    put their events on one bounded queue; ``("done", -1, None)`` follows the last one
    (``("fatal", -1, exc)`` if decoding itself breaks, re-raised by the model loop). Decoding
    releases the GIL (libsndfile, soxr, numpy), so decoders run on separate cores."""

    def __init__(self, recordings: Sequence[Path], events: Callable[[Iterable[tuple[int, Path]]],
                 Iterator[Event]], decoders: int, depth: int) -> None:
        shared = _Shared(recordings)
        self.items: queue.Queue[Event] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self._left = min(decoders, len(recordings))
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(events(shared),), daemon=True,
                                          name=f"naturelm-edge-decoder-{i}")
                         for i in range(self._left)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _put(self, item: Event) -> None:
        while not self.stop.is_set():
            try:
                self.items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self, events: Iterator[Event]) -> None:
        try:
            for event in events:
                if self.stop.is_set():
                    return
                self._put(event)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, re-raised
            self._put(("fatal", -1, exc))
            return
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._put(("done", -1, None))


class Analysis:
    """One run over a list of recordings: the consumer loop, per-recording outputs,
    progress and summary (used by `analyze` and by each round of `watch`)."""

    def __init__(self, bundle: Bundle, settings: Settings, out: Path,
                 recordings: Sequence[Path], progress: bool, root: Path | None = None,
                 sink: Sink | None = None) -> None:
        self.bundle, self.settings, self.out = bundle, settings, out
        self.sink = sink
        self.found: dict[Path, int] = {}  # detections per recording finished by this run
        self.root = root.absolute() if root is not None else _common_root(recordings)
        self.progress = progress
        self.resumed = 0
        self.load_s = 0.0
        self.started = time.perf_counter()
        self.total_s = 0.0
        self.done_s = 0.0
        self.finished = 0
        self.ok = 0
        self.todo = 0
        self.analysed_s = 0.0
        self.new_detections = 0
        self._last_progress = 0.0

    # -- the consumer loop

    def process(self, runner: Runner, todo: Sequence[Path], journal: Journal,
                batch_size: int, block_s: float, stop: threading.Event | None = None,
                enter: bool = False, decoders: int = 1) -> None:
        """Analyse `todo`; a set `stop` ends the loop early, leaving the recordings not yet
        finished out of the journal (they are analysed next time). With `enter` the runner is
        entered (its model loaded) here, once the decoder has started, so that the load and
        the first blocks' decoding overlap; nothing is loaded when `todo` is empty. Up to
        `decoders` recordings are decoded at once (one thread each)."""
        if not todo:
            return
        self.todo = len(todo)
        self.total_s = _total_duration(todo)
        recs = [_Recording(p) for p in todo]

        def events(recordings: Iterable[tuple[int, Path]]) -> Iterator[Event]:
            return decode_events(recordings, self.bundle.manifest.sample_rate,
                                 self.settings.spec, self.settings.channel, block_s, batch_size)

        # at least QUEUE_WINDOWS windows decoded ahead (what the model load can overlap)
        producer = _Producer(todo, events, decoders,
                             depth=max(4, decoders, -(-QUEUE_WINDOWS // batch_size)))
        producer.start()
        try:
            with ExitStack() as model:
                if enter:
                    load_start = time.perf_counter()
                    model.enter_context(runner)
                    self.load_s = time.perf_counter() - load_start
                self._consume(producer, runner, recs, journal, stop)
        finally:
            producer.stop.set()
            self._end_progress()

    def _consume(self, producer: _Producer, runner: Runner, recs: list[_Recording],
                 journal: Journal, stop: threading.Event | None) -> None:
        while stop is None or not stop.is_set():
            try:
                kind, index, payload = producer.items.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "batch":
                self._run_batch(runner, recs, payload, journal)
            elif kind == "end":
                rec = recs[index]
                rec.duration_s, rec.windows_total = payload
                if rec.complete:
                    self._finish(rec, journal)
            elif kind == "error":  # its windows already run are forgotten
                self._fail(recs[index], payload, journal)
            elif kind == "fatal":
                raise payload
            else:
                return

    def _run_batch(self, runner: Runner, recs: list[_Recording], batch: WindowBatch,
                   journal: Journal) -> None:
        outputs = runner.infer({"audio": batch.audio})
        owners = [(index, batch.owners == index) for index in np.unique(batch.owners)]
        for name in self.settings.tasks:
            task = self.bundle.manifest.task(name)
            scores = activate(outputs[task.output], task.activation)
            for index, rows in owners:
                recs[index].detections += select(
                    str(recs[index].path), batch.start_s[rows], batch.end_s[rows], task.name,
                    task.labels, scores[rows], self.settings.thresholds, self.settings.top_k,
                    self.settings.include, self.settings.exclude)
        for index, rows in owners:
            rec = recs[index]
            rec.windows_done += int(rows.sum())
            self._advance(rec, float(batch.end_s[rows].max()))
            if rec.complete:
                self._finish(rec, journal)
        self._show_progress()

    def _advance(self, rec: _Recording, reached_s: float) -> None:
        if reached_s > rec.reached_s:
            self.done_s += reached_s - rec.reached_s
            rec.reached_s = reached_s

    def _finish(self, rec: _Recording, journal: Journal) -> None:
        dets = (merge_consecutive(rec.detections, self.settings.merge_gap_s)
                if self.settings.merge else sort_detections(rec.detections))
        stem = self._stem(rec.path)
        if "raven" in self.settings.formats:
            write_raven(stem.with_name(stem.name + ".selections.txt"), dets)
        if "audacity" in self.settings.formats:
            write_audacity(stem.with_name(stem.name + ".labels.txt"), dets)
        outputs = self.sink.detections(rec.path, dets) if self.sink is not None else {}
        name, size, mtime = file_key(rec.path)
        journal.append(Entry(name, size, mtime, "ok", rec.duration_s, detections=tuple(dets),
                             outputs=outputs))
        self.found[rec.path] = len(dets)
        self._advance(rec, rec.duration_s)
        self.analysed_s += rec.duration_s
        self.new_detections += len(dets)
        self.finished += 1
        self.ok += 1
        rec.detections = []

    def _fail(self, rec: _Recording, reason: str, journal: Journal) -> None:
        self.record_error(journal, rec.path, reason)
        self.finished += 1
        rec.detections = []

    def record_error(self, journal: Journal, path: Path, reason: str) -> None:
        stem = self._stem(path)
        for suffix in (".selections.txt", ".labels.txt"):
            stem.with_name(stem.name + suffix).unlink(missing_ok=True)
        outputs = self.sink.error(path, reason) if self.sink is not None else {}
        name, size, mtime = file_key(path)
        journal.append(Entry(name, size, mtime, "error", reason=reason, outputs=outputs))
        if self._last_progress:
            print(file=sys.stderr)  # end the progress line before the message
        log.warning("%s: %s", path, reason)

    def _stem(self, path: Path) -> Path:
        absolute = path.absolute()
        try:
            rel = absolute.relative_to(self.root)
        except ValueError:
            rel = Path(absolute.name)
        return self.out / rel

    # -- combined outputs, progress, summary

    def write_combined(self, journal: Journal) -> None:
        """Rebuild ``detections.csv``, ``detections.jsonl`` and ``errors.csv`` from the latest
        journal entry of every recording, sorted by path. Entries are read back from disk one
        at a time and the files streamed atomically, so memory does not grow with history."""
        with ExitStack() as stack:
            csv_out = jsonl_out = None
            if "csv" in self.settings.formats:
                csv_out = stack.enter_context(atomic_stream(self.out / "detections.csv"))
                csv_out.write(CSV_HEADER)
            if "jsonl" in self.settings.formats:
                jsonl_out = stack.enter_context(atomic_stream(self.out / "detections.jsonl"))
            errors_out = stack.enter_context(atomic_stream(self.out / ERRORS))
            errors_out.write(ERRORS_HEADER)
            for entry in journal.latest():
                if entry.status != "ok":
                    errors_out.write(format_errors_rows([(entry.file, entry.reason)]))
                    continue
                if csv_out is not None:
                    csv_out.write(format_csv_rows(entry.detections))
                if jsonl_out is not None:
                    jsonl_out.write(format_jsonl(entry.detections))

    def failed(self, journal: Journal, paths: Sequence[Path]) -> list[str]:
        """Those of `paths` whose latest journal entry is an error."""
        found = [(str(p.absolute()), journal.finished.get(str(p.absolute()))) for p in paths]
        return [name for name, done in found if done is not None and done.status == "error"]

    def _show_progress(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.progress or (not force and now - self._last_progress < 0.5):
            return
        self._last_progress = now
        wall = max(now - self.started, 1e-9)
        speed = self.done_s / wall
        left = max(self.total_s - self.done_s, 0.0)
        eta = _clock(left / speed) if speed > 0 else "?"
        print(f"\ranalyze: {self.finished}/{self.todo} recordings, {_clock(self.done_s)} of "
              f"{_clock(self.total_s)} audio, {speed:.1f}x real time, ETA {eta}   ",
              end="", file=sys.stderr, flush=True)

    def _end_progress(self) -> None:
        if self.progress and self._last_progress:
            self._show_progress(force=True)
            print(file=sys.stderr)

    def summary(self, backend: str, model: str, failed: Sequence[str]) -> None:
        wall = time.perf_counter() - self.started
        speed = self.analysed_s / wall if wall > 0 else 0.0
        lines = [
            f"analysed {self.finished} recording(s) ({self.ok} ok), "
            f"{self.resumed} already in the journal; {_clock(self.analysed_s)} of audio in "
            f"{_clock(wall)} ({speed:.1f}x real time) on {backend} with {Path(model).name}, "
            + (f"model loaded in {self.load_s * 1000:.0f} ms" if self.todo else
               "model not loaded (nothing to analyse)"),
            f"{self.new_detections} new detection(s); outputs in {self.out}",
        ]
        if failed:
            lines.append(f"{len(failed)} recording(s) failed: see {self.out / ERRORS}")
        print("\n".join(lines))



def _total_duration(paths: Sequence[Path]) -> float:
    from runtime.audio import audio_info

    total = 0.0
    for path in paths:
        try:
            total += audio_info(path).duration_s
        except InputError:
            continue  # the decoder reports it with the reason when it gets there
    return total


def _common_root(paths: Sequence[Path]) -> Path:
    if not paths:
        return Path.cwd()
    return Path(os.path.commonpath([str(p.absolute().parent) for p in paths]))


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
