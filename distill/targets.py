"""The teacher-target store (DESIGN contract 3): what the teacher said about every clip and task.

A store is a folder that can be copied to another machine and used without the teacher::

    out/targets.json                   format, teacher config and its hash, tasks with label sets,
                                       sample rate and clip length, the detection scheme
    out/shards/part-r0000-000000.jsonl one file per prediction batch and rank, written atomically
    out/index.json                     every shard with its rows and sha256 (written at the end)

Each shard row is ``{"id", "task", "scores", "answer"}`` (plus ``"probs"`` for multi-label
tasks and ``"cut_s"`` when a clip was longer than the teacher's clip): ``scores[i]`` is the
teacher's log-likelihood of answering exactly ``labels[i]`` (`teacher.model.NatureLM.score_labels`
with ``normalize="sum"`` and the end token), so ``softmax(scores)`` is the teacher's distribution
over the task's labels; ``answer`` is its greedy generated answer.

Detection probabilities (``"probs"``, scheme ``"neighbourhood-marginal"``): the teacher answers a
detection question with the set of labels present (sorted, joined by ", ", or ``"None"``). We
score candidate answer *sets* around its greedy answer ``G``: ``G`` itself, ``G`` plus each
absent label, ``G`` minus each present label, every single label and the empty set ("None").
A softmax over those candidates' whole-answer log-likelihoods is the teacher's distribution over
the neighbourhood, and ``probs[i]`` is the probability mass of the candidates that contain
``labels[i]`` (for the "None" label: the mass of the empty set). The single-label candidates
are exactly the task's labels, so ``scores`` comes from the same forward passes.

Cost: for a "None" answer the neighbourhood is the single labels themselves; an answer naming
species adds about one candidate per label (``G``, its additions and removals), each a few
tokens longer than a single label. They run in the same batched forwards as every other task's
labels, shortest first (`teacher.model.NatureLM.score_from`). Measured on the tiny teacher
with answers naming 1-2 species, 8 clips of 5 tasks: 384 instead of 200 detection candidates,
357 instead of 186 ms for scoring all of their tasks, against about 250 ms to encode the
8 clips (`benchmarks.label_speed` measures the whole step).

Writing is resumable: shards are renamed into place only when complete, so after a kill every
shard on disk is whole, `done_keys` lists what is already there, and a restart labels the rest
without duplicates.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> meta = TargetMeta(teacher_hash="0123456789abcdef", teacher_config={},
    ...                   tasks={"species": TaskLabels(("Kea", "Tui"))}, sample_rate=16000,
    ...                   clip_s=10.0)
    >>> write_meta(out, meta)
    >>> _ = write_part(out, rank=0, seq=0, rows=[
    ...     {"id": "c1.species", "task": "species", "scores": [-0.1, -2.5], "answer": "Kea"}])
    >>> _ = write_index(out)
    >>> store = TargetStore(out)
    >>> store.get("c1.species", "species").answer, store.get("c1.species", "species").top1
    ('Kea', 0)
    >>> store.get("c2.species", "species") is None
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.files import atomic_write_text

FORMAT_VERSION = 1
META_NAME = "targets.json"
INDEX_NAME = "index.json"
SHARD_DIR = "shards"
DETECTION_SCHEME = "neighbourhood-marginal"
_PART = re.compile(r"^part-r(\d{4,})-(\d{6,})\.jsonl$")


class TargetMismatchError(InputError):
    """Targets that do not belong to this teacher or student (config hash or label sets)."""


@dataclass(frozen=True)
class TaskLabels:
    """One task's label set in score order, and whether it is multi-label (detection)."""

    labels: tuple[str, ...]
    multi_label: bool = False


@dataclass(frozen=True)
class TargetMeta:
    """What a store is about: the teacher (config and hash), the tasks, the audio it heard."""

    teacher_hash: str
    teacher_config: dict[str, Any]
    tasks: dict[str, TaskLabels]
    sample_rate: int
    clip_s: float
    detection_scheme: str = DETECTION_SCHEME
    format: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``targets.json``."""
        return {"format": self.format, "teacher_hash": self.teacher_hash,
                "teacher_config": self.teacher_config, "sample_rate": self.sample_rate,
                "clip_s": self.clip_s, "detection_scheme": self.detection_scheme,
                "tasks": {name: {"labels": list(t.labels), "multi_label": t.multi_label}
                          for name, t in self.tasks.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | os.PathLike[str]) -> TargetMeta:
        """Parse ``targets.json``; a missing field or another format version raises."""
        try:
            if int(data["format"]) != FORMAT_VERSION:
                raise InputError(where, f"target store format {data['format']} is not "
                                        f"{FORMAT_VERSION} (written by another version)")
            tasks = {name: TaskLabels(tuple(str(x) for x in t["labels"]), bool(t["multi_label"]))
                     for name, t in data["tasks"].items()}
            return cls(teacher_hash=str(data["teacher_hash"]),
                       teacher_config=dict(data["teacher_config"]), tasks=tasks,
                       sample_rate=int(data["sample_rate"]), clip_s=float(data["clip_s"]),
                       detection_scheme=str(data["detection_scheme"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(where, f"malformed target store metadata ({exc!r})") from exc


@dataclass(frozen=True)
class Target:
    """The teacher's output for one clip and task."""

    scores: np.ndarray  # [labels] log-likelihood of each label as the whole answer
    answer: str
    probs: np.ndarray | None = None  # [labels] presence probability (multi-label tasks)
    cut_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def logprobs(self) -> np.ndarray:
        """``log_softmax(scores)``: the teacher's distribution over the labels."""
        finite = self.scores[np.isfinite(self.scores)]
        top = float(finite.max()) if finite.size else 0.0
        return self.scores - (top + math.log(float(np.exp(self.scores - top).sum())))

    @property
    def top1(self) -> int:
        """Index of the teacher's most likely label."""
        return int(np.argmax(self.scores))


# -- detection candidates ---------------------------------------------------------------------
def answer_text(present: Iterable[str], none_label: str = "None") -> str:
    """A detection answer for a label set: sorted, joined by ", ", or ``none_label`` if empty."""
    items = sorted(set(present) - {none_label})
    return ", ".join(items) if items else none_label


def detection_candidates(labels: Sequence[str], greedy: Iterable[str],
                         none_label: str = "None") -> list[frozenset[str]]:
    """The candidate answer sets scored for a detection clip (see the module docstring).

    The first ``len(labels)`` candidates are the single labels in order (the empty set for
    ``none_label``), so their scores are the task's label scores.
    """
    species = [x for x in labels if x != none_label]
    base = frozenset(x for x in greedy if x in species)
    ordered: list[frozenset[str]] = [frozenset() if x == none_label else frozenset([x])
                                     for x in labels]
    seen = set(ordered)
    extra = [base] + [base | {x} for x in species if x not in base] \
        + [base - {x} for x in sorted(base)]
    for cand in extra:
        if cand not in seen:
            seen.add(cand)
            ordered.append(cand)
    return ordered


def marginal_probs(candidates: Sequence[frozenset[str]], scores: Sequence[float],
                   labels: Sequence[str], none_label: str = "None") -> np.ndarray:
    """Per-label presence probability: softmax over the candidates, mass of those holding it."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(candidates),):
        raise ValueError(f"{len(candidates)} candidates but {s.shape} scores")
    p = np.exp(s - s.max())
    p /= p.sum()
    out = np.zeros(len(labels), dtype=np.float64)
    for i, label in enumerate(labels):
        holds = [len(c) == 0 if label == none_label else label in c for c in candidates]
        out[i] = p[np.asarray(holds, dtype=bool)].sum()
    return np.clip(out, 0.0, 1.0)


# -- writing ----------------------------------------------------------------------------------
def shard_dir(out: str | os.PathLike[str]) -> Path:
    """The folder holding the shards of the store at ``out``."""
    return Path(out) / SHARD_DIR


def read_meta(out: str | os.PathLike[str]) -> TargetMeta:
    """The metadata of the store at ``out``; a missing or unreadable file raises `InputError`."""
    path = Path(out) / META_NAME
    if not path.is_file():
        raise InputError(path, "no teacher-target store here (targets.json is missing; "
                               "write one with `naturelm-edge distill label`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable target store metadata ({exc})") from exc
    return TargetMeta.from_dict(data, path)


def write_meta(out: str | os.PathLike[str], meta: TargetMeta) -> None:
    """Write ``targets.json``, or extend an existing store with new tasks.

    An existing store of another teacher, or with another label set for a task, is refused
    with `TargetMismatchError` (a store never mixes teachers).
    """
    path = Path(out) / META_NAME
    if path.exists():
        old = read_meta(out)
        check_teacher(old, meta.teacher_hash, path)
        check_label_sets(old, {n: t.labels for n, t in meta.tasks.items()}, path,
                         require_all=False)
        if old.sample_rate != meta.sample_rate or abs(old.clip_s - meta.clip_s) > 1e-9:
            raise TargetMismatchError(path, f"the store holds {old.clip_s} s clips at "
                                            f"{old.sample_rate} Hz, this run {meta.clip_s} s at "
                                            f"{meta.sample_rate} Hz")
        meta = TargetMeta(old.teacher_hash, old.teacher_config, {**old.tasks, **meta.tasks},
                          old.sample_rate, old.clip_s, old.detection_scheme)
    atomic_write_text(path, json.dumps(meta.to_dict(), indent=1, sort_keys=True))


def _parts(out: str | os.PathLike[str]) -> list[tuple[Path, int, int]]:
    folder = shard_dir(out)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        match = _PART.match(path.name)
        if match:
            found.append((path, int(match.group(1)), int(match.group(2))))
    return found


def next_seq(out: str | os.PathLike[str], rank: int) -> int:
    """The first free shard number of ``rank`` (a resumed run never overwrites a shard)."""
    seqs = [seq for _, r, seq in _parts(out) if r == rank]
    return max(seqs) + 1 if seqs else 0


def write_part(out: str | os.PathLike[str], rank: int, seq: int,
               rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write one shard atomically; an existing shard of that name raises."""
    path = shard_dir(out) / f"part-r{rank:04d}-{seq:06d}.jsonl"
    if path.exists():
        raise FileExistsError(f"{path}: shard already exists (two writers share a rank?)")
    text = "".join(json.dumps(dict(row), sort_keys=True) + "\n" for row in rows)
    atomic_write_text(path, text)
    return path


def _iter_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except ValueError as exc:
                raise InputError(path, f"line {number}: not JSON ({exc})") from exc


def done_keys(out: str | os.PathLike[str]) -> set[tuple[str, str]]:
    """``(id, task)`` of every target already written (what a resumed run skips)."""
    return {(str(row["id"]), str(row["task"]))
            for path, _, _ in _parts(out) for _, row in _iter_rows(path)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_index(out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``index.json``: every shard with its row count and sha256, and the total."""
    shards = {}
    for path, _, _ in _parts(out):
        shards[path.name] = {"rows": sum(1 for _ in _iter_rows(path)), "sha256": _sha256(path)}
    index = {"format": FORMAT_VERSION, "rows": sum(s["rows"] for s in shards.values()),
             "shards": shards}
    atomic_write_text(Path(out) / INDEX_NAME, json.dumps(index, indent=1, sort_keys=True))
    return index


# -- checks -----------------------------------------------------------------------------------
def check_teacher(meta: TargetMeta, teacher_hash: str | None,
                  where: str | os.PathLike[str]) -> None:
    """Refuse targets written by a teacher whose config hash is not ``teacher_hash``."""
    if teacher_hash is not None and meta.teacher_hash != teacher_hash:
        raise TargetMismatchError(
            where, f"targets come from teacher {meta.teacher_hash}, not {teacher_hash} "
                   "(a different teacher config): label the corpus with this teacher into a "
                   "new folder, or use the targets its student was trained on")


def check_label_sets(meta: TargetMeta, label_sets: Mapping[str, Sequence[str]],
                     where: str | os.PathLike[str], require_all: bool = True) -> None:
    """Refuse when a task's labels (names or order) differ from the store's.

    With ``require_all`` every task of ``label_sets`` must be in the store.
    """
    for task, labels in label_sets.items():
        if task not in meta.tasks:
            if require_all:
                raise TargetMismatchError(where, f"the targets have no task {task!r} (they "
                                                 f"hold {', '.join(meta.tasks) or 'none'})")
            continue
        theirs = meta.tasks[task].labels
        if tuple(labels) != tuple(theirs):
            only_here = sorted(set(labels) - set(theirs))
            only_there = sorted(set(theirs) - set(labels))
            detail = (f"labels only in the student: {only_here}; only in the targets: "
                      f"{only_there}") if only_here or only_there else "same labels, other order"
            raise TargetMismatchError(where, f"task {task!r}: the label set differs from the "
                                             f"targets' ({detail})")


# -- reading ----------------------------------------------------------------------------------
class TargetStore:
    """Read a target store written by `naturelm-edge distill label` (no teacher needed).

    Args:
        path: the store folder (holding ``targets.json`` and ``shards/``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self._rows: dict[tuple[str, str], Target] = {}
        self.duplicates = 0
        for part, _, _ in _parts(self.path):
            for number, row in _iter_rows(part):
                self._add(row, f"{part}:{number}")

    def _add(self, row: Mapping[str, Any], where: str) -> None:
        try:
            key = (str(row["id"]), str(row["task"]))
            task = self.meta.tasks[key[1]]
            scores = np.asarray(row["scores"], dtype=np.float64)
            probs = np.asarray(row["probs"], dtype=np.float64) if "probs" in row else None
            target = Target(scores, str(row["answer"]), probs, float(row.get("cut_s", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(where, f"malformed target row ({exc!r})") from exc
        if scores.shape != (len(task.labels),) or (probs is not None
                                                    and probs.shape != scores.shape):
            raise InputError(where, f"{len(scores)} scores for the {len(task.labels)} labels of "
                                    f"task {key[1]!r}")
        if task.multi_label and probs is None:
            raise InputError(where, f"multi-label task {key[1]!r} row without probs")
        if key in self._rows:
            self.duplicates += 1
            return
        self._rows[key] = target

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def keys(self) -> list[tuple[str, str]]:
        """Every ``(clip id, task)`` held, sorted."""
        return sorted(self._rows)

    @property
    def teacher_hash(self) -> str:
        """The config hash of the teacher that wrote these targets."""
        return self.meta.teacher_hash

    def labels(self, task: str) -> tuple[str, ...]:
        """The label set of ``task`` in score order."""
        return self.meta.tasks[task].labels

    def get(self, clip_id: str, task: str) -> Target | None:
        """The target of ``clip_id`` for ``task``, or None when the store has none."""
        return self._rows.get((clip_id, task))

    def check(self, teacher_hash: str | None = None,
              label_sets: Mapping[str, Sequence[str]] | None = None) -> None:
        """Refuse (`TargetMismatchError`) another teacher's targets or other label sets."""
        check_teacher(self.meta, teacher_hash, self.path)
        if label_sets is not None:
            check_label_sets(self.meta, label_sets, self.path)

    def verify(self) -> int:
        """Check every shard against ``index.json`` (rows and sha256); returns the row count.

        Use it after copying a store to another machine: a missing, extra or changed shard
        raises naming it.
        """
        path = self.path / INDEX_NAME
        if not path.is_file():
            raise InputError(path, "no index: the labelling run did not finish (resume it)")
        index = json.loads(path.read_text(encoding="utf-8"))
        on_disk = {p.name: p for p, _, _ in _parts(self.path)}
        missing = sorted(set(index["shards"]) - set(on_disk))
        extra = sorted(set(on_disk) - set(index["shards"]))
        if missing or extra:
            raise InputError(self.path, f"shards missing: {missing}; not in the index: {extra}")
        for name, entry in index["shards"].items():
            if _sha256(on_disk[name]) != entry["sha256"]:
                raise InputError(on_disk[name], "sha256 differs from index.json (changed or "
                                                "damaged in transit)")
        return int(index["rows"])
