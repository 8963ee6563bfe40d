"""`naturelm-edge bench accuracy`: the teacher and every student model on a held-out set.

For each bundle and each of its model files (FP32, FP16, INT8, and the STFT variant where
present) the held-out clips of a manifest split are run through ONNX Runtime and scored
BEANS-Zero style per task with `teacher.eval`'s functions: accuracy for single-label tasks
(the argmax label), macro-F1, exact match and mAP for detection (labels at or above the
bundle's threshold, mAP from the sigmoid scores). Beside them: top-1 agreement with the
teacher (its most likely label in the target store, matched by name, as `export bundle`
measures it) and the expected calibration error. The teacher itself is scored from the same
target store (its generated answers snapped to the labels; mAP and calibration from its label
likelihoods), so no teacher needs to run here. Each model's headline score (the mean over
tasks of accuracy or macro-F1) is plotted against its latency (ms per window, one thread,
batch 1: the figure each bundle recorded, or measured now with ``--measure-latency``), and the
Pareto front (no other model is both faster and better) is marked.

Calibration: for single-label tasks the ECE of the top-1 confidence (the largest softmax
probability) against top-1 correctness; for detection the ECE of every label's presence
probability against the label's presence. Both use equal-width bins over [0, 1].

    $ naturelm-edge bench accuracy runs/default/bundles/s --manifest runs/default/corpus/manifest.jsonl \\
          --targets runs/default/targets --plot pareto.png --no-save
    >>> round(expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1], bins=10), 6)
    0.4
    >>> pareto_front([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.4)])
    [0, 1, 3]
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS_DIR, save_figure
from runtime.errors import InputError, ManifestError

SUMMARY_COLUMNS = ("model", "precision", "score", "agreement", "ece", "latency_ms",
                   "x_real_time", "pareto")
TASK_COLUMNS = ("model", "task", "n", "metric", "score", "agreement", "ece", "accuracy",
                "macro_f1", "mAP", "exact", "majority", "chance_map")


# -- pure metrics -------------------------------------------------------------------------------
def expected_calibration_error(confidence: Sequence[float] | np.ndarray,
                               outcome: Sequence[float] | np.ndarray, bins: int = 15) -> float:
    """ECE: the bin-weighted mean of |mean outcome - mean confidence| over ``bins``
    equal-width bins of [0, 1] (a confidence of exactly 1 falls in the last bin).

    ``outcome`` is 1 where the prediction was right (or the label present), else 0.
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(outcome, dtype=np.float64).ravel()
    if conf.shape != hit.shape:
        raise ValueError(f"{conf.size} confidences for {hit.size} outcomes")
    if conf.size == 0:
        raise ValueError("calibration of zero predictions is undefined")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if np.any((conf < 0) | (conf > 1)) or not np.all(np.isfinite(conf)):
        raise ValueError("confidences must lie in [0, 1]")
    index = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += inside.sum() / conf.size * abs(hit[inside].mean() - conf[inside].mean())
    return float(total)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates, where a point is
    ``(cost, score)``: lower cost and higher score are better. Equal points are all kept."""
    front = []
    for i, (cost, score) in enumerate(points):
        dominated = any(c <= cost and s >= score and (c < cost or s > score)
                        for j, (c, s) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (``-inf`` entries get probability 0)."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(top), top, 0.0))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Elementwise logistic function."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


# -- the held-out set ---------------------------------------------------------------------------
@dataclass
class HeldOut:
    """Distinct clips of one split as windows, and each task's records pointing at them."""

    audio: np.ndarray  # float32 [clips, samples]
    records: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)  # task -> (row, rec)

    def labels(self, task: str) -> tuple[str, ...]:
        return tuple(self.records[task][0][1].labels)


def load_heldout(manifest: Path, split: str, sample_rate: int, window_s: float,
                 tasks: Mapping[str, Sequence[str]], limit: int | None = None) -> HeldOut:
    """Read the clips of ``split`` that carry a task of ``tasks`` (task -> the model's labels),
    resampled to ``sample_rate`` and cut or zero-padded to one window. A record whose label set
    differs from the model's raises `ManifestError` naming the manifest."""
    from corpus.manifest import read_manifest
    from export.onnx_export import fit_window
    from runtime.audio import read_audio

    samples = int(round(window_s * sample_rate))
    rows: dict[tuple[str, float, float | None], int] = {}
    clips: list[np.ndarray] = []
    held: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    for record in read_manifest(manifest):
        if record.split != split or record.task not in tasks or record.file_name is None:
            continue
        if tuple(record.labels) != tuple(tasks[record.task]):
            raise ManifestError(manifest, f"record {record.id!r}: the label set of task "
                                          f"{record.task!r} differs from the model's")
        key = (record.file_name, record.offset_s, record.duration_s)
        if key not in rows:
            if limit is not None and len(clips) >= limit:
                continue
            audio = read_audio(record.file_name, target_rate=sample_rate,
                               offset_s=record.offset_s, duration_s=record.duration_s)
            rows[key] = len(clips)
            clips.append(fit_window(audio, samples, max_windows=1)[0])
        held[record.task].append((rows[key], record))
    if not clips:
        raise ManifestError(manifest, f"no clips with audio in split {split!r} for tasks "
                                      f"{sorted(tasks)}")
    return HeldOut(np.stack(clips), dict(held))


# -- scoring ------------------------------------------------------------------------------------
def _truth_sets(records: Sequence[Any]) -> list[list[str]]:
    from teacher.eval import NONE_LABEL, split_answer

    return [[x for x in split_answer(r.output) if x != NONE_LABEL] for r in records]


def _teacher_top1(store: Any, records: Sequence[Any], task: str) -> list[str | None]:
    if store is None or task not in store.meta.tasks:
        return [None] * len(records)
    labels = store.labels(task)
    out: list[str | None] = []
    for r in records:
        target = store.get(r.id, r.task)
        out.append(None if target is None else labels[target.top1])
    return out


def _agreement(predicted: Sequence[str], teacher: Sequence[str | None]) -> float | None:
    pairs = [(p, t) for p, t in zip(predicted, teacher, strict=True) if t is not None]
    return float(np.mean([p == t for p, t in pairs])) if pairs else None


def _row(model: str, task: str, result: Any, metric: str, agreement: float | None,
         ece: float | None) -> dict[str, Any]:
    return {"model": model, "task": task, "n": result.n, "metric": metric,
            "score": result.metrics[metric], "agreement": agreement, "ece": ece,
            **result.metrics}


def score_task(model: str, task: str, logits: np.ndarray, labels: Sequence[str],
               activation: str, threshold: float, records: Sequence[Any],
               teacher: Sequence[str | None]) -> dict[str, Any]:
    """One row of metrics for a model's logits ``[N, labels]`` on ``records`` of ``task``."""
    from teacher.eval import NONE_LABEL, multi_hot, score_detection, score_single

    labels = list(labels)
    top1 = [labels[int(i)] for i in np.argmax(logits, axis=-1)]
    agreement = _agreement(top1, teacher)
    if activation == "sigmoid":
        probs = sigmoid(logits)
        answers = [", ".join(labels[j] for j in range(len(labels))
                             if labels[j] != NONE_LABEL and p[j] >= threshold) or NONE_LABEL
                   for p in probs]
        truth = _truth_sets(records)
        result = score_detection(task, answers, truth, labels, probs)
        keep = [j for j, label in enumerate(labels) if label != NONE_LABEL]
        present = multi_hot(truth, [labels[j] for j in keep])
        ece = expected_calibration_error(probs[:, keep], present)
        return _row(model, task, result, "macro_f1", agreement, ece)
    probs = softmax(logits)
    truth_labels = [r.output for r in records]
    result = score_single(task, top1, truth_labels, labels)
    ece = expected_calibration_error(probs.max(axis=-1),
                                     [p == t for p, t in zip(top1, truth_labels, strict=True)])
    return _row(model, task, result, "accuracy", agreement, ece)


def model_rows(model: str, outputs: Mapping[str, np.ndarray], heldout: HeldOut,
               tasks: Sequence[Any], store: Any) -> list[dict[str, Any]]:
    """Rows per task for one model's outputs (``<task>_logits`` over the held-out clips);
    ``tasks`` are the bundle's `runtime.bundle.TaskSpec`s."""
    rows = []
    for spec in tasks:
        if spec.name not in heldout.records:
            continue
        pairs = heldout.records[spec.name]
        logits = np.asarray(outputs[spec.output])[[i for i, _ in pairs]]
        records = [r for _, r in pairs]
        rows.append(score_task(model, spec.name, logits, spec.labels, spec.activation,
                               spec.threshold, records, _teacher_top1(store, records, spec.name)))
    return rows


def teacher_rows(heldout: HeldOut, store: Any, tasks: Sequence[Any],
                 name: str = "teacher") -> list[dict[str, Any]]:
    """Rows per task for the teacher, from its targets: generated answers snapped to the
    labels (BEANS-Zero), mAP and calibration from its label likelihoods (detection: the
    per-label presence probabilities). Records without a target are left out."""
    from teacher.eval import NONE_LABEL, multi_hot, score_detection, score_single

    rows = []
    for spec in tasks:
        if spec.name not in heldout.records or spec.name not in store.meta.tasks:
            continue
        labels = list(store.labels(spec.name))
        found = [(r, store.get(r.id, r.task)) for _, r in heldout.records[spec.name]]
        found = [(r, t) for r, t in found if t is not None]
        if not found:
            continue
        records = [r for r, _ in found]
        answers = [t.answer for _, t in found]
        if spec.activation == "sigmoid" and all(t.probs is not None for _, t in found):
            probs = np.stack([np.asarray(t.probs, dtype=np.float64) for _, t in found])
            truth = _truth_sets(records)
            result = score_detection(spec.name, answers, truth, labels, probs)
            keep = [j for j, label in enumerate(labels) if label != NONE_LABEL]
            ece = expected_calibration_error(probs[:, keep],
                                             multi_hot(truth, [labels[j] for j in keep]))
            rows.append(_row(name, spec.name, result, "macro_f1", 1.0, ece))
            continue
        probs = np.stack([np.exp(t.logprobs) for _, t in found])
        truth_labels = [r.output for r in records]
        result = score_single(spec.name, answers, truth_labels, labels)
        best = [labels[int(i)] for i in probs.argmax(axis=-1)]
        result.metrics["scored_accuracy"] = float(np.mean(
            [b == t for b, t in zip(best, truth_labels, strict=True)]))
        ece = expected_calibration_error(probs.max(axis=-1),
                                         [b == t for b, t in zip(best, truth_labels, strict=True)])
        rows.append(_row(name, spec.name, result, "accuracy", 1.0, ece))
    return rows


def summarize_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: the mean over tasks of the headline score, the agreement and the ECE."""
    by_model: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_model[row["model"]].append(row)

    def mean(values: list[Any]) -> float | None:
        kept = [v for v in values if v is not None and not math.isnan(v)]
        return float(np.mean(kept)) if kept else None

    return {model: {"score": mean([r["score"] for r in items]),
                    "agreement": mean([r["agreement"] for r in items]),
                    "ece": mean([r["ece"] for r in items]),
                    "tasks": len(items)}
            for model, items in by_model.items()}


# -- running models -----------------------------------------------------------------------------
def run_model(path: Path, audio: np.ndarray, threads: int = 1, batch: int = 32,
              backend: str = "cpu") -> dict[str, np.ndarray]:
    """An ONNX model's outputs on ``audio`` in batches (runtime's `OrtRunner`)."""
    from runtime.runners import OrtRunner

    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    with OrtRunner(path, backend=backend, threads=threads) as runner:
        for start in range(0, len(audio), batch):
            for name, value in runner.infer({"audio": audio[start:start + batch]}).items():
                parts[name].append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}


def model_name(bundle_name: str, precision: str, variant: str) -> str:
    """``<bundle> <precision>`` (with ``-stft`` for the STFT front-end variant)."""
    return f"{bundle_name} {precision}" + ("" if variant == "conv" else f"-{variant}")


def plot_pareto(points: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """A PNG of score against latency (log scale), the Pareto front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [p for p in points if p.get("latency_ms") and p.get("score") is not None]
    if not usable:
        raise ValueError("no model has both a latency and a score to plot")
    front = sorted((usable[i] for i in pareto_front([(p["latency_ms"], p["score"])
                                                      for p in usable])),
                   key=lambda p: p["latency_ms"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, p in enumerate(usable):
        marker = "s" if p["model"].startswith("teacher") else "o"
        ax.scatter(p["latency_ms"], 100 * p["score"], marker=marker, s=40)
        ax.annotate(p["model"], (p["latency_ms"], 100 * p["score"]), fontsize=7,
                    xytext=(5, 4 - 10 * (i % 3)), textcoords="offset points")
    ax.plot([p["latency_ms"] for p in front], [100 * p["score"] for p in front], "--",
            color="grey", marker="o", markersize=12, markerfacecolor="none",
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("latency per window (ms, 1 thread, batch 1)")
    ax.set_ylabel("score (mean of accuracy / macro-F1, %)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


@dataclass(frozen=True)
class LatencyOptions:
    """Where latencies come from: the bundles' recorded figures, or measured now."""

    measure: bool = False
    threads: int = 1
    warmup: int = 3
    repeats: int = 20


def _recorded_latency(bundle: Any, spec: Any, threads: int) -> float | None:
    from export.bundle import latency_key

    value = bundle.manifest.latency_ms.get(latency_key(spec.file, threads=threads))
    return float(value) if value is not None else None


def _measured_latency(bundle: Any, spec: Any, options: LatencyOptions, scratch: Path) -> float:
    from benchmarks.latency import Settings, measure_model

    settings = Settings(options.threads, options.warmup, options.repeats)
    row = measure_model(bundle, spec, "cpu", (1,), settings, None, False, scratch)[0]
    return float(row["mean_ms"])


def teacher_latency_ms(checkpoint: Path, tasks: Sequence[Any], options: LatencyOptions,
                       device: str = "cpu") -> float:
    """The teacher's mean ms to score every task's labels for one clip (`measure_teacher`)."""
    from benchmarks.latency import Settings, measure_teacher

    settings = Settings(options.threads, options.warmup, options.repeats)
    return float(measure_teacher(checkpoint, tasks, (1,), settings, None, device)[0]["mean_ms"])


def run_accuracy(bundles: Sequence[Path], manifest: Path, targets: Path | None = None,
                 teacher: Path | None = None, split: str = "test", limit: int | None = None,
                 latency: LatencyOptions | None = None, teacher_device: str = "cpu",
                 bins: int = 15, plot_path: Path | None = None,
                 results_dir: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Score every model of ``bundles`` (and the teacher from ``targets``); print the tables
    and the final JSON line unless ``quiet``; returns the JSON-able result."""
    from benchmarks.harness import context, markdown_table, publish
    from distill.targets import TargetStore
    from runtime.bundle import load_bundle, task_labels

    if not bundles:
        raise ValueError("give at least one bundle")
    latency = latency or LatencyOptions()
    store = TargetStore(targets) if targets is not None else None
    rows: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []
    window_s = None
    first_tasks: Sequence[Any] = ()
    with tempfile.TemporaryDirectory(prefix="naturelm-accuracy-") as tmp:
        for number, path in enumerate(bundles):
            loaded = load_bundle(path, extract_to=Path(tmp) / f"bundle{number}")
            m = loaded.manifest
            window_s = window_s or m.window_s
            first_tasks = first_tasks or m.tasks
            if store is not None:
                store.check(label_sets={t: labels for t, labels in task_labels(m).items()
                                        if t in store.meta.tasks})
            heldout = load_heldout(manifest, split, m.sample_rate, m.window_s,
                                   task_labels(m), limit)
            for spec in m.models:
                if "cpu" not in spec.backends:
                    continue
                name = model_name(m.name, spec.precision, spec.variant)
                outputs = run_model(loaded.model_path(spec), heldout.audio, latency.threads)
                rows += model_rows(name, outputs, heldout, m.tasks, store)
                ms = (_measured_latency(loaded, spec, latency, Path(tmp)) if latency.measure
                      else _recorded_latency(loaded, spec, latency.threads))
                points.append({"model": name, "precision": spec.precision, "latency_ms": ms,
                               "x_real_time": m.window_s / (ms / 1000) if ms else None})
    if store is not None:
        rows = teacher_rows(heldout, store, first_tasks) + rows
        ms = teacher_latency_ms(teacher, first_tasks, latency, teacher_device) \
            if teacher is not None else None
        points.insert(0, {"model": "teacher", "precision": "fp32", "latency_ms": ms,
                          "x_real_time": window_s / (ms / 1000) if ms else None})
    summary = summarize_rows(rows)
    for p in points:
        p.update({k: v for k, v in summary.get(p["model"], {}).items() if k != "tasks"})
    timed = [i for i, p in enumerate(points) if p["latency_ms"] and p.get("score") is not None]
    front = {timed[i] for i in pareto_front([(points[j]["latency_ms"], points[j]["score"])
                                             for j in timed])}
    for i, p in enumerate(points):
        p["pareto"] = "yes" if i in front else ("no" if i in timed else "-")
    markdown = (markdown_table(points, SUMMARY_COLUMNS) + "\n\n"
                + markdown_table(rows, TASK_COLUMNS))
    ctx = context(latency.threads, probe_gpu=False, extra={
        "manifest": str(manifest), "split": split, "clips": int(len(heldout.audio)),
        "targets": str(targets) if targets else None, "bins": bins,
        "latency": "measured" if latency.measure else "recorded in the bundle"})
    result: dict[str, Any] = {"benchmark": "accuracy", "context": ctx, "models": points,
                              "rows": rows}
    if plot_path is None and results_dir is not None:
        plot_path = Path(results_dir) / f"{ctx['machine_id']}-accuracy.png"
    if plot_path is not None and timed:
        result["plot"] = str(plot_pareto(points, plot_path, f"accuracy against latency ({split})"))
    return publish("accuracy", result, markdown, results_dir, quiet)


def accuracy(
    bundles: list[Path],
    *,
    manifest: Path,
    targets: Path | None = None,
    teacher: Path | None = None,
    split: str = "test",
    limit: int | None = None,
    measure_latency: bool = False,
    threads: int = 1,
    teacher_device: str = "cpu",
    bins: int = 15,
    plot: Path | None = None,
    save: bool = True,
    results_dir: Path = RESULTS_DIR,
) -> int:
    """Accuracy per task, agreement with the teacher, calibration and the Pareto front of
    accuracy against latency for every model of the bundles (and the teacher).

    Args:
        bundles: bundle folders or .tar.gz (every model file in each is scored).
        manifest: JSONL / CSV manifest with the held-out clips and their true answers.
        targets: the teacher's target store (`distill label`): agreement and the teacher's row.
        teacher: the teacher checkpoint, to time it for the plot (needs targets).
        split: the held-out split.
        limit: at most this many clips.
        measure_latency: time every model now (1 thread, batch 1) instead of using the
            latency each bundle recorded.
        threads: ONNX Runtime (and teacher) threads.
        teacher_device: cpu or cuda for timing the teacher.
        bins: calibration bins.
        plot: PNG to write (default with --save: benchmarks/results/<machine>-accuracy.png).
        save: add the figures to benchmarks/results/<machine-id>.json and .md.
        results_dir: where --save writes.
    """
    if teacher is not None and targets is None:
        print("naturelm-edge bench accuracy: --teacher needs --targets (the teacher is scored "
              "from its targets)", file=sys.stderr)
        return 2
    try:
        run_accuracy(bundles, manifest, targets, teacher, split, limit,
                     LatencyOptions(measure=measure_latency or teacher is not None,
                                    threads=threads),
                     teacher_device, bins, plot, results_dir if save else None)
    except (InputError, ValueError, KeyError) as exc:
        print(f"naturelm-edge bench accuracy: {exc}", file=sys.stderr)
        return 2
    return 0
