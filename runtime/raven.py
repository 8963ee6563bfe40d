"""Raven Pro selection tables: tab-separated, one selection per row.

The standard columns are ``Selection``, ``View``, ``Channel``, ``Begin Time (s)``,
``End Time (s)``, ``Low Freq (Hz)`` and ``High Freq (Hz)``; any further column is an
annotation (for example ``Species``, ``Task``, ``Score``).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "rec.selections.txt"
    >>> write_raven_table(p, [Selection(1.0, 2.5, annotations={"Species": "Kea"})])
    >>> read_raven_table(p)[0].annotations["Species"]
    'Kea'
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import ManifestError
from runtime.files import atomic_write_text

BEGIN, END = "Begin Time (s)", "End Time (s)"
LOW, HIGH = "Low Freq (Hz)", "High Freq (Hz)"
STANDARD = ("Selection", "View", "Channel", BEGIN, END, LOW, HIGH)


@dataclass(frozen=True)
class Selection:
    """One time-frequency box with its annotations."""

    begin_s: float
    end_s: float
    low_hz: float = 0.0
    high_hz: float = 0.0
    channel: int = 1
    annotations: dict[str, str] = field(default_factory=dict)


def format_raven_table(selections: Sequence[Selection],
                       annotation_columns: Sequence[str] | None = None) -> str:
    """The text of a selection table; annotation columns default to those the rows use."""
    columns = list(annotation_columns or _annotation_columns(selections))
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow([*STANDARD, *columns])
    for number, sel in enumerate(selections, start=1):
        writer.writerow([number, "Spectrogram 1", sel.channel, f"{sel.begin_s:.4f}",
                         f"{sel.end_s:.4f}", f"{sel.low_hz:.1f}", f"{sel.high_hz:.1f}",
                         *(sel.annotations.get(c, "") for c in columns)])
    return buffer.getvalue()


def _annotation_columns(selections: Iterable[Selection]) -> list[str]:
    columns: dict[str, None] = {}
    for sel in selections:
        columns.update(dict.fromkeys(sel.annotations))
    return list(columns)


def write_raven_table(path: str | os.PathLike[str], selections: Sequence[Selection],
                      annotation_columns: Sequence[str] | None = None) -> None:
    """Write a selection table atomically."""
    atomic_write_text(path, format_raven_table(selections, annotation_columns))


def read_raven_table(path: str | os.PathLike[str]) -> list[Selection]:
    """Read a selection table; only the spectrogram view's rows are kept (Raven writes a
    waveform row too when both views were open). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "selection table not found")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [c for c in (BEGIN, END) if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(path, f"not a Raven selection table: no column {missing[0]!r}")
        return [sel for number, row in enumerate(reader, start=2)
                if (sel := _row_to_selection(row, f"{path}:{number}")) is not None]


def _row_to_selection(row: dict[str, str], where: str) -> Selection | None:
    if "waveform" in (row.get("View") or "").lower():
        return None
    try:
        begin, end = float(row[BEGIN]), float(row[END])
        low = float(row.get(LOW) or 0.0)
        high = float(row.get(HIGH) or 0.0)
        channel = int(row.get("Channel") or 1)
    except (TypeError, ValueError) as exc:
        raise ManifestError(where, f"bad number in selection row: {exc}") from exc
    if end < begin:
        raise ManifestError(where, f"end time {end} is before begin time {begin}")
    notes = {k: v for k, v in row.items() if k not in STANDARD and k is not None}
    return Selection(begin, end, low, high, channel, notes)
