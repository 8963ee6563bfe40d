"""BEANS-Zero-style scoring of free-text answers: snap, then accuracy, macro-F1 and mAP.

Every function here is pure (lists in, numbers out), so the evaluator, the distillation
benchmarks and the tests share one definition of each metric. A generated answer is snapped to
the nearest label by Levenshtein distance (case-insensitive, whitespace stripped; ties go to the
label listed first). Detection answers name several labels joined by ", " (or "None"); each
part is snapped on its own, and "None" means the empty set.

    >>> levenshtein("kitten", "sitting")
    3
    >>> snap("Kee", ["Kea", "Tui"])
    'Kea'
    >>> snap_multi("tui, kaa", ["Kea", "Tui", "None"])
    ['Kea', 'Tui']
    >>> accuracy(["Kea", "Tui"], ["Kea", "Kea"])
    0.5
    >>> round(macro_f1([["Kea"], []], [["Kea"], ["Tui"]], ["Kea", "Tui"]), 3)
    0.5
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

NONE_LABEL = "None"


def levenshtein(a: str, b: str) -> int:
    """Edit distance between ``a`` and ``b`` (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def snap(answer: str, labels: Sequence[str]) -> str:
    """The label nearest to ``answer`` by Levenshtein distance (case-insensitive)."""
    if not labels:
        raise ValueError("cannot snap an answer to an empty label set")
    text = answer.strip().lower()
    distances = [levenshtein(text, label.strip().lower()) for label in labels]
    return labels[int(np.argmin(distances))]


def split_answer(answer: str) -> list[str]:
    """The parts of a multi-label answer (split on commas, empty parts dropped)."""
    return [part.strip() for part in answer.split(",") if part.strip()]


def snap_multi(answer: str, labels: Sequence[str], none_label: str = NONE_LABEL) -> list[str]:
    """The sorted set of labels a detection answer names; "None" (or nothing) is the empty set."""
    parts = split_answer(answer)
    snapped = {snap(part, labels) for part in parts}
    snapped.discard(none_label)
    return sorted(snapped)


def accuracy(predicted: Sequence[str], truth: Sequence[str]) -> float:
    """Fraction of exact matches between snapped predictions and true labels."""
    _check_lengths(predicted, truth)
    if not truth:
        raise ValueError("accuracy of zero examples is undefined")
    return float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))


def majority_rate(truth: Sequence[str]) -> float:
    """Accuracy of always answering the most frequent true label (the chance bar)."""
    if not truth:
        raise ValueError("majority rate of zero examples is undefined")
    return Counter(truth).most_common(1)[0][1] / len(truth)


def multi_hot(sets: Sequence[Sequence[str]], labels: Sequence[str]) -> np.ndarray:
    """A ``[N, L]`` 0/1 matrix: row ``n`` marks the labels in ``sets[n]``; unknown labels raise."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(sets), len(labels)), dtype=np.float64)
    for n, items in enumerate(sets):
        for item in items:
            if item not in index:
                raise ValueError(f"label {item!r} is not in the label set {list(labels)}")
            out[n, index[item]] = 1.0
    return out


def macro_f1(predicted: Sequence[Sequence[str]], truth: Sequence[Sequence[str]],
             labels: Sequence[str]) -> float:
    """Mean over ``labels`` of the per-label F1 (a label never predicted nor present scores 1)."""
    _check_lengths(predicted, truth)
    pred = multi_hot(predicted, labels)
    true = multi_hot(truth, labels)
    tp = (pred * true).sum(axis=0)
    fp = (pred * (1 - true)).sum(axis=0)
    fn = ((1 - pred) * true).sum(axis=0)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 1.0)
    return float(f1.mean())


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Average precision of one label: mean precision at the rank of each positive.

    Ties in ``scores`` are broken pessimistically (negatives ranked first), so constant scores
    give the prevalence, not a lucky ordering.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must be 1-D alike")
    n_pos = int(positives.sum())
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive")
    order = np.lexsort((positives, -scores))
    hits = positives[order]
    precision_at_hit = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hit.mean())


def mean_average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mean AP over the labels (columns) that have at least one positive in ``truth``."""
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if scores.shape != truth.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and truth {truth.shape} must be [N, L] alike")
    columns = [j for j in range(truth.shape[1]) if truth[:, j].any()]
    if not columns:
        raise ValueError("mAP needs at least one label with a positive example")
    return float(np.mean([average_precision(scores[:, j], truth[:, j] > 0) for j in columns]))


@dataclass
class TaskResult:
    """Scores of one task. ``metrics`` maps a metric name to its value (fractions, 0..1)."""

    task: str
    n: int
    metrics: dict[str, float] = field(default_factory=dict)


def score_single(task: str, answers: Sequence[str], truth: Sequence[str],
                 labels: Sequence[str]) -> TaskResult:
    """Accuracy of snapped answers for a single-label task, beside the majority-class rate."""
    predicted = [snap(a, labels) for a in answers]
    return TaskResult(task, len(truth), {"accuracy": accuracy(predicted, truth),
                                         "majority": majority_rate(truth)})


def score_detection(task: str, answers: Sequence[str], truth: Sequence[Sequence[str]],
                    labels: Sequence[str], scores: np.ndarray | None = None) -> TaskResult:
    """Macro-F1 of snapped label sets and mAP (from ``scores`` [N, L] when given, else binary).

    ``labels`` may hold "None"; it is dropped from the metric's label set. "chance_map" is the
    mAP of constant scores (the mean prevalence of the labels that occur).
    """
    keep = [i for i, label in enumerate(labels) if label != NONE_LABEL]
    names = [labels[i] for i in keep]
    predicted = [snap_multi(a, labels) for a in answers]
    true = multi_hot(truth, names)
    ranking = multi_hot(predicted, names) if scores is None else np.asarray(scores)[:, keep]
    metrics = {"macro_f1": macro_f1(predicted, truth, names),
               "exact": float(np.mean([sorted(p) == sorted(t)
                                       for p, t in zip(predicted, truth, strict=True)]))}
    if true.any():
        metrics["mAP"] = mean_average_precision(ranking, true)
        metrics["chance_map"] = mean_average_precision(np.zeros_like(true), true)
    return TaskResult(task, len(answers), metrics)


def format_table(results: Sequence[TaskResult]) -> str:
    """A plain-text table: one row per task, one column per metric (percentages)."""
    columns: list[str] = []
    for result in results:
        columns.extend(m for m in result.metrics if m not in columns)
    header = ["task", "n", *columns]
    rows = [[r.task, str(r.n), *[f"{100 * r.metrics[c]:.1f}" if c in r.metrics else "-"
                                  for c in columns]] for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_to_json(results: Sequence[TaskResult]) -> dict[str, Mapping[str, float]]:
    """``{task: {"n": n, metric: value, ...}}`` for the evaluator's JSON output."""
    return {r.task: {"n": r.n, **r.metrics} for r in results}


def _check_lengths(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} true values")
