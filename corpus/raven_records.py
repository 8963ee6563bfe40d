"""Raven selection tables plus their audio, turned into detection (and species) records.

The recording is cut into clip windows (length `clip_s`, hop `hop_s`, tail policy `last` as in
`runtime.windows`: "pad", "drop" or "shift"; the windows are exactly those `iter_windows`
cuts). A label is present in a window when one of its selections overlaps the window by at
least ``min(min_overlap_s, selection length)``, so a call shorter than the minimum still counts
when it lies wholly inside. Each window gives

- a ``detection`` record: the labels present, joined by ", ", or ``"None"``; its label set is
  every label of the table plus ``"None"``;
- a ``species`` record when one label dominates the window: it holds at least `dominance` of
  the labelled time there (a window with one label always qualifies).

The label is read from `label_column`, by default the first of "Species", "Annotation",
"Label", "Class" that the table has. The audio is `audio`, else the file beside the table whose
name is a dot-prefix of the table's (``rec.Table.1.selections.txt`` -> ``rec.wav``), else the one
file named in a ``Begin Path`` column.

    >>> import tempfile, pathlib, numpy as np, soundfile as sf
    >>> from runtime.raven import Selection, write_raven_table
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> sf.write(d / "rec.wav", np.zeros(16000 * 30, dtype=np.float32), 16000)
    >>> write_raven_table(d / "rec.Table.1.selections.txt",
    ...                   [Selection(2.0, 3.0, annotations={"Species": "Kea"}),
    ...                    Selection(12.0, 14.0, annotations={"Species": "Tui"}),
    ...                    Selection(15.0, 15.5, annotations={"Species": "Kea"})])
    >>> records = read_raven_records(d / "rec.Table.1.selections.txt", clip_s=10.0)
    >>> [(r.task, r.offset_s, r.output) for r in records]  # doctest: +NORMALIZE_WHITESPACE
    [('detection', 0.0, 'Kea'), ('species', 0.0, 'Kea'), ('detection', 10.0, 'Kea, Tui'),
     ('species', 10.0, 'Tui'), ('detection', 20.0, 'None')]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from corpus.records import Record
from corpus.tasks import NONE_LABEL, TASKS, instruction_for
from runtime.audio import AudioInfo, audio_info
from runtime.errors import AudioError, ManifestError
from runtime.raven import Selection, read_raven_table
from runtime.windows import LastPolicy, WindowSpec

LABEL_COLUMNS = ("Species", "Annotation", "Label", "Class")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
RAVEN_TASKS = ("detection", "species")
PATH_COLUMN = "Begin Path"


@dataclass(frozen=True)
class Labelled:
    """One selection reduced to what windows need: its span and label."""

    begin_s: float
    end_s: float
    label: str


def window_spans(frames: int, rate: int, spec: WindowSpec) -> list[tuple[int, int]]:
    """(first sample, end sample) of each window `runtime.windows.iter_windows` would cut.

    The end is where real audio stops (a padded last window ends at the recording's end).
    """
    size, hop = spec.frames(rate)
    spans = []
    start = 0
    last_end = 0
    while start + size <= frames:
        spans.append((start, start + size))
        last_end = start + size
        start += hop
    if spec.last == "drop" or frames == 0 or last_end >= frames or start >= frames:
        return spans
    if spec.last == "shift" and frames >= size:
        start = frames - size
    spans.append((start, frames))
    return spans


def pick_label_column(selections: Sequence[Selection], table: str | os.PathLike[str],
                      label_column: str | None = None) -> str:
    """`label_column` if the table has it, else the first of `LABEL_COLUMNS` it has."""
    columns: dict[str, None] = {}
    for sel in selections:
        columns.update(dict.fromkeys(sel.annotations))
    if label_column is not None:
        if label_column not in columns:
            raise ManifestError(table, f"no label column {label_column!r}; annotation columns: "
                                       f"{', '.join(columns) or '(none)'}")
        return label_column
    for name in LABEL_COLUMNS:
        if name in columns:
            return name
    raise ManifestError(table, f"no label column: expected one of {', '.join(LABEL_COLUMNS)} "
                               f"(or pass label_column); annotation columns: "
                               f"{', '.join(columns) or '(none)'}")


def find_table_audio(table: str | os.PathLike[str],
                     selections: Sequence[Selection] = ()) -> Path:
    """The audio file of a selection table: beside it by name, else its ``Begin Path``."""
    table = Path(table)
    parts = table.name.split(".")
    stems = [".".join(parts[:cut]) for cut in range(len(parts) - 1, 0, -1)]
    for stem in stems:
        for ext in AUDIO_EXTENSIONS:
            for suffix in (ext, ext.upper()):
                candidate = table.with_name(stem + suffix)
                if candidate.is_file():
                    return candidate
    named = {sel.annotations.get(PATH_COLUMN, "").strip() for sel in selections} - {""}
    if len(named) == 1:
        path = Path(named.pop())
        path = path if path.is_absolute() else table.parent / path
        if not path.is_file():
            raise AudioError(path, f"audio not found (named in the {PATH_COLUMN!r} column of "
                                   f"{table})")
        return path
    if len(named) > 1:
        raise ManifestError(table, f"the {PATH_COLUMN!r} column names {len(named)} files; "
                                   "give one table per recording or pass the audio")
    raise ManifestError(table, f"no audio found for this table (looked beside it for "
                               f"{', '.join(stems)} + {'/'.join(AUDIO_EXTENSIONS)}); "
                               "pass the audio path")


def read_raven_records(
    table: str | os.PathLike[str],
    audio: str | os.PathLike[str] | None = None,
    clip_s: float = 10.0,
    hop_s: float | None = None,
    last: LastPolicy = "pad",
    min_overlap_s: float = 0.1,
    dominance: float = 0.8,
    label_column: str | None = None,
    tasks: Sequence[str] = RAVEN_TASKS,
    dataset_name: str | None = None,
) -> list[Record]:
    """Detection and species records for the clip windows of one annotated recording.

    Args:
        table: the Raven selection table (tab-separated).
        audio: its recording; default found beside the table (see the module docstring).
        clip_s: window length in seconds.
        hop_s: hop between window starts; default `clip_s` (no overlap).
        last: the tail after the last full window: "pad", "drop" or "shift".
        min_overlap_s: seconds a selection must overlap a window for its label to count.
        dominance: share of a window's labelled time one label needs for a species record.
        label_column: the annotation column with the labels.
        tasks: which records to make, out of "detection" and "species".
        dataset_name: stored on every record; default the table's folder name.
    """
    spec = WindowSpec(window_s=clip_s, hop_s=clip_s if hop_s is None else hop_s, last=last)
    _check_options(min_overlap_s, dominance, tasks)
    table = Path(table)
    selections = read_raven_table(table)
    column = pick_label_column(selections, table, label_column) if selections else ""
    audio_path = Path(audio) if audio is not None else find_table_audio(table, selections)
    info = audio_info(audio_path)
    labelled = _labelled(selections, column, table, info)
    label_set = tuple(sorted({item.label for item in labelled}))
    records = []
    for start, end in window_spans(info.frames, info.sample_rate, spec):
        overlaps = _overlaps(labelled, start / info.sample_rate, end / info.sample_rate,
                             min_overlap_s)
        records.extend(_window_records(
            overlaps, label_set, tasks, dominance, audio_path, info, start, spec.window_s,
            dataset_name or table.resolve().parent.name, table))
    return records


def _check_options(min_overlap_s: float, dominance: float, tasks: Sequence[str]) -> None:
    if min_overlap_s < 0:
        raise ValueError(f"min_overlap_s must be >= 0, got {min_overlap_s}")
    if not 0.5 < dominance <= 1.0:
        raise ValueError(f"dominance must be in (0.5, 1], got {dominance}")
    unknown = [t for t in tasks if t not in RAVEN_TASKS]
    if unknown or not tasks:
        raise ValueError(f"Raven tables give the tasks {', '.join(RAVEN_TASKS)}; got "
                         f"{list(tasks)}")


def _labelled(selections: Sequence[Selection], column: str, table: Path,
              info: AudioInfo) -> list[Labelled]:
    items = []
    for number, sel in enumerate(selections, start=1):
        label = (sel.annotations.get(column) or "").strip()
        where = f"{table}: selection row {number}"
        if not label:
            raise ManifestError(where, f"empty label in column {column!r}")
        if label == NONE_LABEL:
            raise ManifestError(where, f"{NONE_LABEL!r} is reserved for windows with no label")
        if sel.begin_s >= info.duration_s:
            raise ManifestError(where, f"selection begins at {sel.begin_s} s, after the end of "
                                       f"{info.path} ({info.duration_s:.3f} s); wrong audio?")
        items.append(Labelled(sel.begin_s, sel.end_s, label))
    return items


def _overlaps(labelled: Sequence[Labelled], begin_s: float, end_s: float,
              min_overlap_s: float) -> dict[str, float]:
    """Seconds of overlap per label present in [begin_s, end_s)."""
    found: dict[str, float] = {}
    for item in labelled:
        overlap = min(item.end_s, end_s) - max(item.begin_s, begin_s)
        needed = min(min_overlap_s, item.end_s - item.begin_s)
        if overlap > 0 and overlap >= needed:
            found[item.label] = found.get(item.label, 0.0) + overlap
    return found


def _window_records(overlaps: dict[str, float], label_set: tuple[str, ...],
                    tasks: Sequence[str], dominance: float, audio: Path, info: AudioInfo,
                    start: int, clip_s: float, dataset_name: str, table: Path) -> list[Record]:
    offset_s = start / info.sample_rate
    base = f"{audio.stem}_{round(offset_s * 1000):09d}ms"
    common = dict(dataset_name=dataset_name, file_name=str(audio.resolve()), offset_s=offset_s,
                  duration_s=clip_s, recording=str(audio.resolve()))
    metadata = {"table": str(table.resolve()),
                "overlap_s": {k: round(v, 4) for k, v in sorted(overlaps.items())}}
    records = []
    if "detection" in tasks:
        records.append(Record(
            id=f"{base}_detection", task="detection", instruction=instruction_for("detection"),
            output=TASKS["detection"].answer(overlaps), labels=(*label_set, NONE_LABEL),
            metadata=metadata, **common))
    total = sum(overlaps.values())
    top = max(overlaps, key=lambda k: (overlaps[k], k), default=None)
    if "species" in tasks and top is not None and overlaps[top] >= dominance * total:
        records.append(Record(
            id=f"{base}_species", task="species", instruction=instruction_for("species"),
            output=top, labels=label_set, metadata=dict(metadata), **common))
    return records

