"""`naturelm-edge bench analyze BUNDLE`: does decoding keep up with the model? (issue #7)

The goal: ``analyze`` on a one-hour file runs at >= 80% of the pure model throughput
(decoding is not the bottleneck) with a peak RSS <= 400 MB whatever the file length.

For every length in `minutes` a seeded synthetic recording (chirps and noise, by default
48 kHz stereo FLAC as a field recorder writes) is made in a temporary folder. Then:

- **pure model**: the bundle's model, opened as ``analyze`` opens it (same backend,
  precision, threads and batch size), runs on windows of that recording decoded beforehand
  and held in memory; windows per second, timed just before and just after the analysis
  (pooled, so a change of load on a shared machine shows in both figures alike);
- **decoding alone**: the recording decoded, resampled and cut into windows as ``analyze``'s
  decoder thread does it, with no model (the most that decoding lets through);
- **analyze**: the real command (``naturelm-edge analyze``, through the CLI's own parser)
  in a child process, so the peak RSS is the analysis's own. The only addition is a counter
  around ``runner.infer``, which gives the windows analysed and the time spent in the model
  (``model_busy``: the share of the analysis's wall time the model was working).

Prints a markdown table (per length: windows, analyze, pure model and decoding windows/s,
analyze / pure, times real time, model busy share, peak RSS), whether the goals are met, and a final JSON
line with the context; with ``save`` adds the figures to ``benchmarks/results/<machine>``.

    $ naturelm-edge bench analyze runs/default/bundle --minutes 10 60 --threads 1
    >>> check_minutes([0.5, 60])
    (0.5, 60.0)
    >>> analyze_speed(Path("bundle"), minutes=(1.0,), save=False)  # doctest: +SKIP
    0
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.harness import (
    RESULTS_DIR,
    context,
    json_line,
    markdown_table,
    peak_rss_mb,
    publish,
    time_call,
)
from runtime.errors import InputError

if TYPE_CHECKING:
    from runtime.bundle import Bundle
    from runtime.runners import Runner

GOAL_RATIO = 0.80
GOAL_RSS_MB = 400.0
# The ratio goal is about a one-hour file: shorter files are listed (their fixed start-up
# cost, model load and the first block's decoding, weighs more) but not judged.
GOAL_MINUTES = 60.0
COLUMNS = ("minutes", "windows", "analyze_s", "analyze_windows_per_s", "pure_windows_per_s",
           "decode_windows_per_s", "ratio", "x_real_time", "model_busy", "peak_rss_mb")
CHILD_CODE = ("import sys; from benchmarks.analyze_speed import analyze_child; "
              "sys.exit(analyze_child(sys.argv[1:]))")
CHILD_KEY = "analyze_child"


@dataclass(frozen=True)
class RunSetup:
    """How both the analysis and the pure model run (the same for both)."""

    backend: str = "cpu"
    precision: str | None = None
    threads: int = 1
    batch_size: int = 8
    block_s: float = 10.0

    def __post_init__(self) -> None:
        from runtime.runners import RUNNER_BACKENDS

        if self.backend not in RUNNER_BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of "
                             f"{', '.join(RUNNER_BACKENDS)}")
        if self.threads < 1 or self.batch_size < 1:
            raise ValueError(f"threads and batch_size must be >= 1, got {self.threads} and "
                             f"{self.batch_size}")
        if not self.block_s > 0:
            raise ValueError(f"block_s must be positive, got {self.block_s}")

    def analyze_args(self) -> list[str]:
        """The `naturelm-edge analyze` options that apply this setup."""
        args = ["--backend", self.backend, "--threads", str(self.threads),
                "--batch-size", str(self.batch_size), "--block-s", str(self.block_s)]
        return args + (["--precision", self.precision] if self.precision else [])


def check_minutes(minutes: Sequence[float]) -> tuple[float, ...]:
    """The recording lengths as floats; none, or one not finite and positive, raises."""
    values = tuple(float(m) for m in minutes)
    if not values:
        raise ValueError("minutes: give at least one recording length")
    bad = [m for m in values if not (math.isfinite(m) and m > 0)]
    if bad:
        raise ValueError(f"minutes must be positive and finite, got {bad}")
    return values


# -- the child process: the real command with a counter around the model


class CountingRunner:
    """Wraps a runner: counts windows and calls and sums the seconds spent in `infer`;
    every other attribute (``model``, ``engine_path``) is the wrapped runner's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.windows = 0
        self.calls = 0
        self.infer_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __enter__(self) -> CountingRunner:
        self.inner.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.inner.__exit__(exc_type, exc, tb)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.inner.infer(feeds)
        self.infer_s += time.perf_counter() - start
        self.windows += len(feeds["audio"])
        self.calls += 1
        return dict(out)


def analyze_child(argv: list[str]) -> int:
    """Run ``naturelm-edge analyze *argv`` in this process with its runners counted; print
    one JSON line (exit code, seconds, windows, calls, seconds in the model, peak RSS)."""
    import runtime.analyze
    from naturelm_edge.cli import main

    opened: list[CountingRunner] = []
    open_runner = runtime.analyze.open_runner

    def counted(*args: Any, **kwargs: Any) -> CountingRunner:
        opened.append(CountingRunner(open_runner(*args, **kwargs)))
        return opened[-1]

    runtime.analyze.open_runner = counted  # this process exists only to run this command
    start = time.perf_counter()
    code = main(["analyze", *argv])
    seconds = time.perf_counter() - start
    json_line({CHILD_KEY: True, "exit_code": code, "analyze_s": seconds,
               "windows": sum(r.windows for r in opened),
               "calls": sum(r.calls for r in opened),
               "infer_s": sum(r.infer_s for r in opened), "peak_rss_mb": peak_rss_mb()})
    return code


def run_analyze(bundle: Path, recording: Path, out: Path, setup: RunSetup) -> dict[str, Any]:
    """`naturelm-edge analyze` on `recording` in a child process; its JSON line plus the
    process's wall time (``process_s``, interpreter start and imports included)."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-c", CHILD_CODE, str(bundle), str(recording), "--out", str(out),
           "--no-progress", "--no-resume", *setup.analyze_args()]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    process_s = time.perf_counter() - start
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    if done.returncode != 0 or not report.get(CHILD_KEY):
        tail = (done.stderr.strip() or done.stdout.strip())[-2000:]
        raise RuntimeError(f"analyze of {recording} exited with {done.returncode}: {tail}")
    return {**report, "process_s": process_s}


# -- the pure model


def leading_windows(recording: Path, rate: int, window_s: float, hop_s: float,
                    count: int) -> np.ndarray:
    """``float32 [n, samples]``: the first `count` windows of `recording` at `rate` (fewer
    when it is shorter), cut as ``analyze`` cuts them."""
    from runtime.audio import stream_audio
    from runtime.windows import WindowSpec, iter_windows

    spec = WindowSpec(window_s, hop_s, last="pad")
    # a second more than the windows need, so the resampler's end of stream lies past them
    blocks = stream_audio(recording, rate, duration_s=window_s + (count - 1) * hop_s + 1.0)
    windows = [w.samples for w in itertools.islice(iter_windows(blocks, rate, spec), count)]
    if not windows:
        raise InputError(recording, "the recording holds no samples")
    return np.stack(windows)


def pure_model(infer: Callable[[Mapping[str, np.ndarray]], Any], windows: np.ndarray,
               batch_size: int, min_time_s: float, warmup: int = 2,
               repeats: int = 5) -> tuple[int, float]:
    """Windows inferred and seconds taken by `infer` on full batches of `windows` (cycled,
    already in memory) for at least `repeats` calls and `min_time_s` seconds, after a
    warm-up."""
    n = len(windows)
    batches = [windows[np.arange(i * batch_size, (i + 1) * batch_size) % n]
               for i in range(-(-n // batch_size))]
    feeds = itertools.cycle(batches)
    timing = time_call(lambda: infer({"audio": next(feeds)}), warmup, repeats,
                       min_time_s=min_time_s)
    return timing.n * batch_size, timing.total_s


def decode_only(recording: Path, rate: int, window_s: float, hop_s: float,
                block_s: float, batch_size: int) -> tuple[int, float]:
    """Windows and seconds to decode, resample, cut and batch the whole of `recording` with
    ``analyze``'s decoder (`runtime.analyze.decode_events`), with no model: the most
    decoding lets through."""
    from runtime.analyze import decode_events
    from runtime.windows import WindowSpec

    spec = WindowSpec(window_s, hop_s, last="pad")
    start = time.perf_counter()
    count = sum(len(payload.owners) for kind, _, payload in decode_events(
        [(0, recording)], rate, spec, None, block_s, batch_size) if kind == "batch")
    return count, time.perf_counter() - start


# -- one length, all lengths


def measure_length(bundle: Path, loaded: Bundle, runner: Runner, minutes: float, setup: RunSetup,
                   folder: Path, sample_rate: int, channels: int, fmt: str, pure_s: float,
                   seed: int) -> dict[str, Any]:
    """The row for one recording length: write the file, time decoding alone and the pure
    model, analyze, time the pure model again, delete the file."""
    from benchmarks.decode_speed import write_long_file

    m = loaded.manifest
    start = time.perf_counter()
    recording = write_long_file(folder / f"long-{minutes:g}min.{fmt}", minutes, sample_rate,
                                channels, fmt, seed=seed)
    write_s = time.perf_counter() - start
    file_mb = recording.stat().st_size / 1e6
    try:
        windows = leading_windows(recording, m.sample_rate, m.window_s, m.hop_s,
                                  4 * setup.batch_size)
        decoded, decode_s = decode_only(recording, m.sample_rate, m.window_s, m.hop_s,
                                        setup.block_s, setup.batch_size)
        before = pure_model(runner.infer, windows, setup.batch_size, pure_s)
        child = run_analyze(bundle, recording, folder / f"out-{minutes:g}", setup)
        after = pure_model(runner.infer, windows, setup.batch_size, pure_s)
    finally:
        recording.unlink(missing_ok=True)
    pure = (before[0] + after[0]) / (before[1] + after[1])
    analyze_rate = child["windows"] / child["analyze_s"]
    return {"minutes": minutes, "audio_s": minutes * 60, "windows": child["windows"],
            "calls": child["calls"], "analyze_s": child["analyze_s"],
            "process_s": child["process_s"], "analyze_windows_per_s": analyze_rate,
            "pure_windows_per_s": pure, "pure_before_windows_per_s": before[0] / before[1],
            "pure_after_windows_per_s": after[0] / after[1],
            "decode_windows": decoded, "decode_windows_per_s": decoded / decode_s,
            "decode_s": decode_s,
            "ratio": analyze_rate / pure,
            "x_real_time": minutes * 60 / child["analyze_s"],
            "model_busy": child["infer_s"] / child["analyze_s"], "infer_s": child["infer_s"],
            "peak_rss_mb": child["peak_rss_mb"], "file_mb": file_mb, "write_s": write_s}


def goals(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Issue #7's goals against the rows: the ratio >= 0.80 on every recording of at least an
    hour (the longest one when none is that long), every peak RSS <= 400 MB, and how much the
    peak RSS grew from the shortest to the longest recording.

    >>> rows = [{"minutes": 10.0, "ratio": 0.5, "peak_rss_mb": 140.0},
    ...         {"minutes": 60.0, "ratio": 0.83, "peak_rss_mb": 150.0}]
    >>> summary = goals(rows)
    >>> summary["judged_minutes"], summary["min_ratio"], summary["ratio_met"]
    ([60.0], 0.83, True)
    """
    by_length = sorted(rows, key=lambda r: r["minutes"])
    judged = [r for r in by_length if r["minutes"] >= GOAL_MINUTES] or by_length[-1:]
    return {"ratio_goal": GOAL_RATIO, "rss_goal_mb": GOAL_RSS_MB,
            "judged_minutes": [r["minutes"] for r in judged],
            "min_ratio": min(r["ratio"] for r in judged),
            "ratio_met": all(r["ratio"] >= GOAL_RATIO for r in judged),
            "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "rss_met": all(r["peak_rss_mb"] <= GOAL_RSS_MB for r in rows),
            "rss_growth_mb": by_length[-1]["peak_rss_mb"] - by_length[0]["peak_rss_mb"]}


def _goal_lines(summary: Mapping[str, Any]) -> str:
    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    judged = ", ".join(f"{m:g}" for m in summary["judged_minutes"])
    return (f"analyze / pure model >= {summary['ratio_goal']:.2f} on the {judged}-minute file(s): "
            f"{verdict(summary['ratio_met'])} (lowest {summary['min_ratio']:.3f}); "
            f"peak RSS <= {summary['rss_goal_mb']:.0f} MB: {verdict(summary['rss_met'])} "
            f"(highest {summary['max_peak_rss_mb']:.0f} MB, "
            f"{summary['rss_growth_mb']:+.1f} MB from shortest to longest)")


def run_analyze_speed(bundle: Path, minutes: Sequence[float] = (10.0, 60.0),
                      setup: RunSetup | None = None, sample_rate: int = 48000,
                      channels: int = 2, fmt: str = "flac", pure_s: float = 5.0,
                      seed: int = 0, workdir: Path | None = None,
                      results_dir: Path | None = None) -> dict[str, Any]:
    """Measure every length, print the table, the goals and the JSON line; returns the
    JSON-able result (see `analyze_speed` for the arguments)."""
    from runtime.bundle import load_bundle
    from runtime.runners import open_runner

    lengths = check_minutes(minutes)
    setup = setup or RunSetup()
    if sample_rate < 1 or channels < 1 or pure_s < 0:
        raise ValueError(f"need sample_rate >= 1, channels >= 1 and pure_s >= 0, got "
                         f"{sample_rate}, {channels} and {pure_s}")
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="naturelm-analyze-speed-", dir=workdir) as tmp:
        folder = Path(tmp)
        loaded = load_bundle(bundle, extract_to=folder / "bundle")
        runner = open_runner(loaded, setup.backend, threads=setup.threads,
                             precision=setup.precision)
        model = Path(str(getattr(runner, "model", getattr(runner, "engine_path", "")))).name
        with runner:
            rows = [measure_length(bundle, loaded, runner, length, setup, folder, sample_rate,
                                   channels, fmt, pure_s, seed + i)
                    for i, length in enumerate(lengths)]
    m = loaded.manifest
    ctx = context(setup.threads, extra={
        "bundle": m.name, "bundle_version": m.version, "model": model,
        "backend": setup.backend, "precision": setup.precision, "batch_size": setup.batch_size,
        "block_s": setup.block_s, "window_s": m.window_s, "hop_s": m.hop_s,
        "model_rate": m.sample_rate, "input": {"format": fmt, "rate": sample_rate,
                                               "channels": channels, "seed": seed},
        "pure_s": pure_s})
    summary = goals(rows)
    markdown = markdown_table(rows, COLUMNS) + "\n\n" + _goal_lines(summary)
    result: dict[str, Any] = {"benchmark": "analyze", "context": ctx, "rows": rows,
                              "goals": summary}
    return publish(section_name(m.name, fmt, sample_rate, channels), result, markdown,
                   results_dir)


def section_name(bundle: str, fmt: str, sample_rate: int, channels: int) -> str:
    """The results section of one bundle on one input kind, so that runs of other bundles and
    formats sit beside it.

    >>> section_name("student-s", "flac", 48000, 2)
    'analyze_student-s_flac_48k_2ch'
    >>> section_name("m", "wav", 22050, 1)
    'analyze_m_wav_22.05k_1ch'
    """
    return f"analyze_{bundle}_{fmt}_{sample_rate / 1000:g}k_{channels}ch"


def analyze_speed(
    bundle: Path,
    minutes: tuple[float, ...] = (10.0, 60.0),
    threads: int = 1,
    batch_size: int = 8,
    backend: str = "cpu",
    precision: str | None = None,
    block_s: float = 10.0,
    sample_rate: int = 48000,
    channels: int = 2,
    fmt: str = "flac",
    pure_s: float = 5.0,
    seed: int = 0,
    workdir: Path | None = None,
    save: bool = True,
    results_dir: Path = RESULTS_DIR,
) -> int:
    """Throughput of `analyze` on long recordings against the pure model, and its peak RSS.

    Returns 0 when measured, 2 on bad input (a missing or malformed bundle, bad lengths,
    an unknown backend, precision or format) with one line on stderr naming the problem.

    Args:
        bundle: the bundle folder or .tar.gz.
        minutes: lengths of the synthetic recordings to analyse, one file each.
        threads: ONNX Runtime intra-op threads, for analyze and the pure model alike.
        batch_size: windows per model call, for analyze and the pure model alike.
        backend: cpu, cuda or tensorrt (ONNX Runtime) or engine (native TensorRT).
        precision: the bundle's model of this precision (default: the first for the backend).
        block_s: seconds analyze decodes at a time.
        sample_rate: the recordings' sample rate in Hz.
        channels: the recordings' channel count (analyze mixes them to mono).
        fmt: the recordings' format: flac, wav, ogg or mp3.
        pure_s: seconds the pure model is timed before and after each analysis.
        seed: seed of the first recording's noise (the next ones count up from it).
        workdir: folder for the temporary recordings (default: the system's temp folder).
        save: add the figures to benchmarks/results/<machine-id>.json and .md.
        results_dir: where --save writes.
    """
    try:
        setup = RunSetup(backend, precision, threads, batch_size, block_s)
        run_analyze_speed(bundle, minutes, setup, sample_rate, channels, fmt, pure_s, seed,
                          workdir, results_dir if save else None)
    except (InputError, ValueError, KeyError) as exc:
        print(f"naturelm-edge bench analyze: {exc}", file=sys.stderr)
        return 2
    return 0
