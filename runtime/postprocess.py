"""From logits to detections: activations, thresholds, top-k, label lists, merging.

A detection (DESIGN.md contract 8) is one window, task and label whose score is at or above
its threshold. Thresholds resolve most specific first: per label of a task, per label in any
task, per task, the global override, then the bundle's default for the task. A thresholds
file is a CSV with the header ``task,label,threshold``; an empty or ``*`` task means every
task, an empty or ``*`` label means every label of the task. Label lists hold one label per
line (``#`` starts a comment).

    >>> import numpy as np
    >>> scores = activate(np.array([[2.0, -2.0]]), "sigmoid")
    >>> rules = Thresholds(defaults={"detection": 0.5})
    >>> [d.label for d in select("rec.wav", np.array([0.0]), np.array([10.0]), "detection",
    ...                          ("Kea", "Tui"), scores, rules)]
    ['Kea']
"""

from __future__ import annotations

import csv
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from runtime.errors import ManifestError

ANY = "*"


@dataclass(frozen=True)
class Detection:
    """One row of output: a label of a task scored at or above threshold in one window."""

    file: str
    start_s: float
    end_s: float
    task: str
    label: str
    score: float


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """Scores in [0, 1] from logits [batch, labels]: ``softmax`` over labels or ``sigmoid``."""
    x = np.asarray(logits, dtype=np.float64)
    if activation == "sigmoid":
        return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)
    if activation == "softmax":
        shifted = np.exp(x - x.max(axis=-1, keepdims=True))
        return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
    raise ValueError(f"unknown activation {activation!r}; choose softmax or sigmoid")


@dataclass(frozen=True)
class Thresholds:
    """Threshold rules; `threshold(task, label)` picks the most specific one that applies."""

    defaults: Mapping[str, float] = field(default_factory=dict)
    global_: float | None = None
    per_task: Mapping[str, float] = field(default_factory=dict)
    per_label: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def threshold(self, task: str, label: str) -> float:
        for key in ((task, label), (ANY, label)):
            if key in self.per_label:
                return self.per_label[key]
        if task in self.per_task:
            return self.per_task[task]
        if self.global_ is not None:
            return self.global_
        if task in self.defaults:
            return self.defaults[task]
        raise KeyError(f"no threshold for task {task!r}: it is not one of the bundle's tasks "
                       f"({', '.join(self.defaults)})")

    def vector(self, task: str, labels: Sequence[str]) -> np.ndarray:
        """The threshold of each label of `task`, as a float32 vector."""
        return np.array([self.threshold(task, label) for label in labels], dtype=np.float32)


def load_thresholds(path: str | os.PathLike[str], base: Thresholds) -> Thresholds:
    """`base` with the rules of a ``task,label,threshold`` CSV added on top.

    Raises:
        ManifestError: missing file, wrong header, or a bad row (names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "thresholds file not found")
    per_task, per_label = dict(base.per_task), dict(base.per_label)
    global_ = base.global_
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if [c.strip() for c in reader.fieldnames or []] != ["task", "label", "threshold"]:
            raise ManifestError(path, "header must be 'task,label,threshold'")
        for line, row in enumerate(reader, start=2):
            task = (row["task"] or "").strip() or ANY
            label = (row["label"] or "").strip() or ANY
            value = _threshold_value(row["threshold"], f"{path}:{line}")
            if label != ANY:
                per_label[(task, label)] = value
            elif task != ANY:
                per_task[task] = value
            else:
                global_ = value
    return Thresholds(base.defaults, global_, per_task, per_label)


def _threshold_value(text: str | None, where: str) -> float:
    try:
        value = float((text or "").strip())
    except ValueError as exc:
        raise ManifestError(where, f"threshold {text!r} is not a number") from exc
    if not 0.0 <= value <= 1.0:
        raise ManifestError(where, f"threshold {value} is not in [0, 1]")
    return value


def load_label_list(path: str | os.PathLike[str]) -> frozenset[str]:
    """Labels from a text file, one per line; blank lines and ``#`` comments are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "label list not found")
    labels = {line.split("#", 1)[0].strip()
              for line in path.read_text(encoding="utf-8-sig").splitlines()}
    labels.discard("")
    if not labels:
        raise ManifestError(path, "label list is empty")
    return frozenset(labels)


def check_labels(names: Iterable[str], known: Collection[str], where: str) -> None:
    """Raise naming `where` if a listed label is not one the bundle knows (a typo filters
    nothing and would silently change the output)."""
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ManifestError(where, f"unknown label(s) {', '.join(map(repr, unknown))}; "
                                   f"the bundle's labels are {', '.join(sorted(known))}")


def select(file: str, start_s: np.ndarray, end_s: np.ndarray, task: str,
           labels: Sequence[str], scores: np.ndarray, thresholds: Thresholds,
           top_k: int | None = None, include: Collection[str] | None = None,
           exclude: Collection[str] = ()) -> list[Detection]:
    """The detections of one task in a batch of windows of one file.

    `scores` is [windows, labels]. Labels outside `include` (when given) or inside
    `exclude` are dropped; of the rest, at most `top_k` per window are kept (best first);
    then each must reach its threshold. Rows come out by window, then by falling score.
    """
    if scores.shape != (len(start_s), len(labels)):
        raise ValueError(f"scores of shape {scores.shape} do not match {len(start_s)} windows "
                         f"and {len(labels)} labels of task {task!r}")
    allowed = np.array([(include is None or lb in include) and lb not in exclude
                        for lb in labels])
    masked = np.where(allowed[None, :], scores, -np.inf)
    keep = masked >= thresholds.vector(task, labels)[None, :]
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        order = np.argsort(-masked, axis=1, kind="stable")[:, :top_k]
        in_top = np.zeros_like(keep)
        np.put_along_axis(in_top, order, True, axis=1)
        keep &= in_top
    out = []
    for row in range(scores.shape[0]):
        for col in sorted(np.flatnonzero(keep[row]), key=lambda c, r=row: -scores[r, c]):
            out.append(Detection(file, float(start_s[row]), float(end_s[row]), task,
                                 labels[col], float(scores[row, col])))
    return out


def merge_consecutive(detections: Iterable[Detection], gap_s: float = 0.0) -> list[Detection]:
    """Merge detections of the same file, task and label whose windows touch or overlap (or
    are at most `gap_s` apart) into one spanning them, with the best score. Sorted by file,
    start, task, label."""
    groups: dict[tuple[str, str, str], list[Detection]] = {}
    for det in detections:
        groups.setdefault((det.file, det.task, det.label), []).append(det)
    merged = []
    for group in groups.values():
        group.sort(key=lambda d: d.start_s)
        current = group[0]
        for det in group[1:]:
            if det.start_s <= current.end_s + gap_s + 1e-9:
                current = replace(current, end_s=max(current.end_s, det.end_s),
                                  score=max(current.score, det.score))
            else:
                merged.append(current)
                current = det
        merged.append(current)
    return sort_detections(merged)


def sort_detections(detections: Iterable[Detection]) -> list[Detection]:
    """Detections in output order: file, start, task, falling score, label."""
    return sorted(detections, key=lambda d: (d.file, d.start_s, d.task, -d.score, d.label))
