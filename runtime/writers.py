"""Detection writers: Raven selection tables, CSV, JSONL, Audacity labels, the errors file.

Every `write_*` writer writes its file atomically (temporary file, fsync, rename), so a crash
leaves the old file or the new one, never a torn one. Files of unbounded length are streamed
through `atomic_stream` (the same guarantee, one piece at a time) and the `watch` daemon's
append-only files through `append_text` (write, fsync, new length: the caller records that
length in the journal and a restart cuts anything past it). Columns follow DESIGN.md
contract 8: file, start_s, end_s, task, label, score.

    >>> import tempfile, pathlib
    >>> from runtime.postprocess import Detection
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> rows = [Detection("a.wav", 0.0, 3.0, "species", "Kea", 0.91)]
    >>> write_csv(out / "detections.csv", rows)
    >>> (out / "detections.csv").read_text().splitlines()[1]
    'a.wav,0.000,3.000,species,Kea,0.9100'
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

from runtime.files import atomic_write_text, fsync_dir
from runtime.postprocess import Detection
from runtime.raven import Selection, format_raven_table

FORMATS = ("raven", "csv", "jsonl", "audacity")
CSV_COLUMNS = ("file", "start_s", "end_s", "task", "label", "score")
RAVEN_COLUMNS = ("Task", "Label", "Score", "Begin File")
ERROR_COLUMNS = ("file", "reason")


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """The requested formats in a fixed order; unknown names raise listing the known ones."""
    chosen = tuple(formats)
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown output format(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in chosen)


def _csv_text(rows: Iterable[Sequence[object]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


CSV_HEADER = _csv_text([CSV_COLUMNS])
ERRORS_HEADER = _csv_text([ERROR_COLUMNS])


def format_csv_rows(detections: Iterable[Detection]) -> str:
    """The CSV rows of `detections`, without the header."""
    return _csv_text([d.file, f"{d.start_s:.3f}", f"{d.end_s:.3f}", d.task, d.label,
                      f"{d.score:.4f}"] for d in detections)


def format_csv(detections: Iterable[Detection]) -> str:
    return CSV_HEADER + format_csv_rows(detections)


def write_csv(path: str | os.PathLike[str], detections: Iterable[Detection]) -> None:
    """A CSV with the header file,start_s,end_s,task,label,score."""
    atomic_write_text(path, format_csv(detections))


def format_jsonl(detections: Iterable[Detection]) -> str:
    return "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in detections)


def write_jsonl(path: str | os.PathLike[str], detections: Iterable[Detection]) -> None:
    """One JSON object per detection and line."""
    atomic_write_text(path, format_jsonl(detections))


def format_raven(detections: Sequence[Detection]) -> str:
    selections = [Selection(d.start_s, d.end_s, annotations={
        "Task": d.task, "Label": d.label, "Score": f"{d.score:.4f}",
        "Begin File": os.path.basename(d.file)}) for d in detections]
    return format_raven_table(selections, RAVEN_COLUMNS)


def write_raven(path: str | os.PathLike[str], detections: Sequence[Detection]) -> None:
    """A Raven Pro selection table of one recording (Task, Label, Score annotations)."""
    atomic_write_text(path, format_raven(detections))


def format_audacity(detections: Iterable[Detection]) -> str:
    return "".join(f"{d.start_s:.6f}\t{d.end_s:.6f}\t{d.label} ({d.task} {d.score:.2f})\n"
                   for d in detections)


def write_audacity(path: str | os.PathLike[str], detections: Iterable[Detection]) -> None:
    """An Audacity label track: start, end and text per line, tab-separated."""
    atomic_write_text(path, format_audacity(detections))


def format_errors_rows(errors: Iterable[tuple[str, str]]) -> str:
    """Rows of the errors file (file, reason), without the header."""
    return _csv_text(errors)


def write_errors(path: str | os.PathLike[str], errors: Iterable[tuple[str, str]]) -> None:
    """The errors file: one row per recording that could not be analysed, with the reason."""
    atomic_write_text(path, ERRORS_HEADER + format_errors_rows(errors))


def append_text(path: str | os.PathLike[str], text: str, header: str = "") -> int:
    """Append UTF-8 `text` to `path` durably (write, flush, fsync) and return the file's new
    length in bytes. A file that does not exist yet (or is empty) starts with `header`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    with path.open("ab") as handle:
        if handle.tell() == 0:
            handle.write(header.encode("utf-8"))
        handle.write(text.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
        length = handle.tell()
    if created:
        fsync_dir(path.parent)
    return length
