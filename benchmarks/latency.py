"""`naturelm-edge bench latency BUNDLE`: backends x precisions x batch sizes, and the teacher.

For every backend asked for, every model file of the bundle that suits it (one per precision
and front-end variant) and every batch size: the model-load time (which includes the engine
build on the TensorRT provider), then after a warm-up the p50 / p90 / p99 and mean latency
per batch, windows per second, times real time (audio seconds per wall second), peak RSS
and, on a GPU, the GPU memory. Each ONNX model is also split at its front end (everything up
to the first ``Log``: the log-mel, as `export.precision` defines it) into a front model and a
body model, timed apart, so the INT8 body can be compared with the FP32 body on its own. With
a teacher checkpoint the teacher's latency (scoring every task's labels for a clip, as
teacher labelling does) is measured in the same run, so speed-ups are ratios from one run.

Prints a markdown table and a final JSON line; writes a PNG plot; with ``save`` adds the
figures to ``benchmarks/results/<machine-id>.json|md``.

    $ naturelm-edge bench latency runs/default/bundle --batch-sizes 1 8 32 --threads 1 \\
        --teacher runs/default/teacher/last.ckpt
    >>> run_latency(Path("bundle"), batch_sizes=(1, 8), repeats=10)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    context,
    gpu_memory_mb,
    markdown_table,
    peak_rss_mb,
    publish,
    save_figure,
    time_call,
)
from runtime.bundle import Bundle, ModelSpec, TaskSpec, load_bundle
from runtime.runners import RUNNER_BACKENDS, OrtRunner, Runner, open_runner

log = logging.getLogger(__name__)

COLUMNS = ("part", "backend", "precision", "variant", "batch", "load_s", "mean_ms", "p50_ms",
           "p90_ms", "p99_ms", "windows_per_s", "x_real_time", "x_real_time_p50", "peak_rss_mb",
           "gpu_mb")


@dataclass(frozen=True)
class Settings:
    """How each configuration is timed."""

    threads: int | None = 1
    warmup: int = 3
    repeats: int = 20
    min_time_s: float = 0.0

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got {self.warmup}, "
                             f"{self.repeats}")


def audio_batch(batch: int, samples: int, rate: int, recording: Path | None = None,
                seed: int = 0) -> np.ndarray:
    """``float32 [batch, samples]``: consecutive windows of `recording` (decoded at `rate`,
    repeated as needed) or, without one, seeded noise at a field recording's level."""
    if batch < 1 or samples < 1:
        raise ValueError(f"batch and samples must be >= 1, got {batch} and {samples}")
    if recording is None:
        rng = np.random.default_rng(seed)
        return (0.05 * rng.standard_normal((batch, samples))).astype(np.float32)
    from runtime.audio import read_audio
    from runtime.errors import AudioError

    audio = read_audio(recording, rate)
    if audio.size == 0:
        raise AudioError(recording, "the recording holds no samples")
    reps = -(-batch * samples // audio.size)
    return np.tile(audio, reps)[: batch * samples].reshape(batch, samples).copy()


def _row(part: str, backend: str, spec: ModelSpec | None, batch: int, window_s: float,
         timing: Any, load_s: float | None) -> dict[str, Any]:
    per_s = batch / (timing.mean_ms / 1000.0)
    return {"part": part, "backend": backend,
            "precision": spec.precision if spec else None,
            "variant": spec.variant if spec else None,
            "file": spec.file if spec else None, "batch": batch, "load_s": load_s,
            **{k: v for k, v in timing.to_dict().items() if k.endswith("_ms") or k == "n"},
            "windows_per_s": per_s, "x_real_time": per_s * window_s,
            "x_real_time_p50": batch * window_s / (timing.p50_ms / 1000.0),
            "peak_rss_mb": peak_rss_mb(), "gpu_mb": gpu_memory_mb()}


def _time_runner(runner: Runner, feeds: Callable[[int], Mapping[str, np.ndarray]],
                 batch_sizes: Sequence[int], settings: Settings) -> list[Any]:
    timings = []
    for batch in batch_sizes:
        feed = dict(feeds(batch))
        timings.append(time_call(lambda feed=feed: runner.infer(feed), settings.warmup,
                                 settings.repeats, min_time_s=settings.min_time_s))
    return timings


def split_at_frontend(model: Path, folder: Path) -> tuple[Path, Path, str] | None:
    """Write ``front.onnx`` (audio -> log-mel) and ``body.onnx`` (log-mel -> outputs) of
    `model` into `folder`; returns their paths and the log-mel tensor's name, or None when
    the graph has no ``Log`` node to split at."""
    import onnx
    from onnx.utils import Extractor

    proto = onnx.load(str(model))
    first_log = next((n for n in proto.graph.node if n.op_type == "Log"), None)
    if first_log is None:
        return None
    feature = first_log.output[0]
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    extractor = Extractor(proto)
    folder.mkdir(parents=True, exist_ok=True)
    front, body = folder / f"{model.stem}.front.onnx", folder / f"{model.stem}.body.onnx"
    onnx.save(extractor.extract_model(inputs, [feature]), str(front))
    onnx.save(extractor.extract_model([feature], outputs), str(body))
    return front, body, feature


def _entered(runner: Runner) -> tuple[Runner, float]:
    start = time.perf_counter()
    runner.__enter__()
    return runner, time.perf_counter() - start


def measure_model(bundle: Bundle, spec: ModelSpec, backend: str, batch_sizes: Sequence[int],
                  settings: Settings, recording: Path | None, split: bool,
                  scratch: Path) -> list[dict[str, Any]]:
    """Rows for one model file on one ONNX Runtime backend: the whole model, and its front
    end and body apart when `split` and the graph allows it."""
    m = bundle.manifest
    samples = round(m.window_s * m.sample_rate)
    cache = {}

    def audio(batch: int) -> dict[str, np.ndarray]:
        if batch not in cache:
            cache[batch] = audio_batch(batch, samples, m.sample_rate, recording)
        return {"audio": cache[batch]}

    model_path = bundle.model_path(spec)
    runner, load_s = _entered(OrtRunner(model_path, backend, settings.threads,
                                        cache_dir=bundle.engine_dir / "ort-trt-cache"))
    try:
        timings = _time_runner(runner, audio, batch_sizes, settings)
    finally:
        runner.__exit__(None, None, None)
    rows = [_row("model", backend, spec, b, m.window_s, t, load_s if i == 0 else None)
            for i, (b, t) in enumerate(zip(batch_sizes, timings, strict=True))]
    parts = split_at_frontend(model_path, scratch / f"{backend}-{Path(spec.file).stem}") \
        if split else None
    if parts is None:
        return rows
    front_path, body_path, feature = parts
    features: dict[int, np.ndarray] = {}
    front, front_load = _entered(OrtRunner(front_path, backend, settings.threads,
                                           cache_dir=scratch / "trt-cache"))
    try:
        for batch in batch_sizes:
            features[batch] = front.infer(audio(batch))[feature]
        front_timings = _time_runner(front, audio, batch_sizes, settings)
    finally:
        front.__exit__(None, None, None)
    body, body_load = _entered(OrtRunner(body_path, backend, settings.threads,
                                         cache_dir=scratch / "trt-cache"))
    try:
        body_timings = _time_runner(body, lambda b: {feature: features[b]}, batch_sizes,
                                    settings)
    finally:
        body.__exit__(None, None, None)
    for part, load, part_timings in (("front", front_load, front_timings),
                                     ("body", body_load, body_timings)):
        rows += [_row(part, backend, spec, b, m.window_s, t, load if i == 0 else None)
                 for i, (b, t) in enumerate(zip(batch_sizes, part_timings, strict=True))]
    return rows


def measure_engine(bundle: Bundle, precision: str, batch_sizes: Sequence[int],
                   settings: Settings, recording: Path | None) -> list[dict[str, Any]]:
    """Rows for the native TensorRT engine of `precision` built on this device."""
    m = bundle.manifest
    samples = round(m.window_s * m.sample_rate)
    runner, load_s = _entered(open_runner(bundle, "engine", precision=precision))
    try:
        timings = _time_runner(
            runner, lambda b: {"audio": audio_batch(b, samples, m.sample_rate, recording)},
            batch_sizes, settings)
    finally:
        runner.__exit__(None, None, None)
    spec = ModelSpec(f"engine ({precision})", precision, "conv", ("tensorrt",))
    return [_row("model", "engine", spec, b, m.window_s, t, load_s if i == 0 else None)
            for i, (b, t) in enumerate(zip(batch_sizes, timings, strict=True))]


def measure_teacher(checkpoint: Path, tasks: Sequence[TaskSpec], batch_sizes: Sequence[int],
                    settings: Settings, recording: Path | None = None,
                    device: str = "cpu") -> list[dict[str, Any]]:
    """Rows for the teacher at `checkpoint`: one call scores every task's labels for a batch
    of clips (`NatureLM.score_labels`, what teacher labelling runs per clip and task)."""
    import torch

    from corpus.tasks import instruction_for
    from teacher.checkpoint import load_teacher

    if settings.threads is not None and device == "cpu":
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    model = load_teacher(checkpoint, map_location=device)
    load_s = time.perf_counter() - start
    cfg = model.cfg
    prompts = {t.name: instruction_for(t.name) for t in tasks}
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    rows = []
    for i, batch in enumerate(batch_sizes):
        clips = torch.from_numpy(audio_batch(batch, cfg.clip_samples, cfg.sample_rate,
                                             recording)).to(device)

        def score(clips: torch.Tensor = clips, batch: int = batch) -> None:
            with torch.inference_mode():
                for task in tasks:
                    model.score_labels(clips, [prompts[task.name]] * batch, list(task.labels))

        timing = time_call(score, settings.warmup, settings.repeats, sync=sync,
                           min_time_s=settings.min_time_s)
        spec = ModelSpec(checkpoint.name, "fp32", "conv", ("cpu",))
        row = _row("teacher", device, spec, batch, cfg.clip_s, timing, load_s if i == 0 else None)
        if device.startswith("cuda"):
            row["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append(row)
    return rows


def speedups(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Ratios measured in this run: the INT8 (and FP16) body against the FP32 body of the same
    variant, and every student model against the teacher, in times real time, per backend
    and batch (keys ``<backend>/<precision>/<variant>/b<batch>``)."""
    def key(r: Mapping[str, Any]) -> tuple[Any, ...]:
        return r["backend"], r["variant"], r["batch"]

    body32 = {key(r): r for r in rows if r["part"] == "body" and r["precision"] == "fp32"}
    teacher = {r["batch"]: r for r in rows if r["part"] == "teacher"}
    out: dict[str, dict[str, float]] = {"body_vs_fp32": {}, "vs_teacher": {}}
    for r in rows:
        name = f"{r['backend']}/{r['precision']}/{r['variant']}/b{r['batch']}"
        if r["part"] == "body" and r["precision"] != "fp32" and key(r) in body32:
            out["body_vs_fp32"][name] = body32[key(r)]["mean_ms"] / r["mean_ms"]
        if r["part"] == "model" and teacher:
            ref = teacher.get(r["batch"]) or teacher[min(teacher)]
            out["vs_teacher"][name] = r["x_real_time"] / ref["x_real_time"]
    return out


def plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """A PNG of times real time against batch size, one line per part, backend, precision
    and variant (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        label = f"{r['part']} {r['backend']} {r['precision']} {r['variant']}"
        series.setdefault(label, []).append((r["batch"], r["x_real_time"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in series.items():
        points.sort()
        style = "--" if label.startswith("teacher") else "-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (windows per call)")
    ax.set_ylabel("times real time")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _models_for(bundle: Bundle, backend: str, precisions: Sequence[str] | None,
                ) -> list[ModelSpec]:
    """The bundle's model files for `backend` (of the given precisions); a precision the
    bundle lacks for the backend raises `ManifestError` listing what it has."""
    suits = [s for s in bundle.manifest.models if backend in s.backends]
    if not precisions:
        return suits or [bundle.model_for(backend)]
    found = []
    for precision in precisions:
        found += [s for s in suits if s.precision == precision] or [
            bundle.model_for(backend, precision=precision)]
    return found


def run_latency(bundle: Path, backends: Sequence[str] = ("cpu",),
                precisions: Sequence[str] | None = None,
                batch_sizes: Sequence[int] = (1, 8, 32), settings: Settings | None = None,
                recording: Path | None = None, split: bool = True,
                teacher: Path | None = None, teacher_batch_sizes: Sequence[int] = (1,),
                teacher_device: str = "cpu", plot_path: Path | None = None,
                results_dir: Path | None = None) -> dict[str, Any]:
    """Measure, print the table and the JSON line, plot; returns the JSON-able result."""
    settings = settings or Settings()
    unknown = [b for b in backends if b not in RUNNER_BACKENDS]
    if unknown or not backends:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {', '.join(RUNNER_BACKENDS)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    with tempfile.TemporaryDirectory(prefix="naturelm-latency-") as tmp:
        loaded = load_bundle(bundle, extract_to=Path(tmp) / "bundle")
        rows: list[dict[str, Any]] = []
        for backend in backends:
            if backend == "engine":
                for precision in precisions or ("fp16",):
                    rows += measure_engine(loaded, precision, batch_sizes, settings, recording)
                continue
            for spec in _models_for(loaded, backend, precisions):
                rows += measure_model(loaded, spec, backend, batch_sizes, settings, recording,
                                      split, Path(tmp))
        if teacher is not None:
            rows += measure_teacher(teacher, loaded.manifest.tasks, teacher_batch_sizes,
                                    settings, recording, teacher_device)
    ctx = context(settings.threads, extra={
        "bundle": loaded.manifest.name, "bundle_version": loaded.manifest.version,
        "window_s": loaded.manifest.window_s, "sample_rate": loaded.manifest.sample_rate,
        "warmup": settings.warmup, "repeats": settings.repeats,
        "input": str(recording) if recording else "noise"})
    ratios = speedups(rows)
    table = markdown_table(rows, COLUMNS)
    ratio_rows = [{"ratio": kind, "config": name, "value": value}
                  for kind, items in ratios.items() for name, value in items.items()]
    markdown = table + ("\n\n" + markdown_table(ratio_rows) if ratio_rows else "")
    result: dict[str, Any] = {"benchmark": "latency", "context": ctx, "rows": rows,
                              "speedups": ratios}
    if plot_path is None and results_dir is not None:
        plot_path = Path(results_dir) / f"{ctx['machine_id']}-latency.png"
    if plot_path is not None:
        result["plot"] = str(plot(rows, plot_path, f"{loaded.manifest.name}: {ctx['cpu']}, "
                                                    f"{settings.threads} thread(s)"))
    return publish("latency", result, markdown, results_dir)
