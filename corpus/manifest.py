"""JSONL and CSV manifests of records.

Audio paths are stored relative to the manifest's folder when they lie under it, and come back
absolute, so a corpus folder can be moved or copied whole. In CSV, ``labels`` are joined by
``|`` and ``metadata`` is a JSON object.

    >>> import tempfile, pathlib
    >>> from corpus.tasks import instruction_for
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> r = Record(id="c1", task="species", instruction=instruction_for("species"),
    ...            output="Kea", labels=("Kea", "Tui"), file_name=str(d / "c1.flac"))
    >>> write_manifest([r], d / "manifest.jsonl")
    >>> read_manifest(d / "manifest.jsonl")[0] == r
    True
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from corpus.records import SPLITS, Record
from runtime.errors import ManifestError
from runtime.files import atomic_write_text

REQUIRED = ("id", "task", "instruction", "output")
FIELDS = ("id", "task", "instruction", "output", "labels", "dataset_name", "split",
          "file_name", "offset_s", "duration_s", "sample_rate", "recording", "metadata")


def record_to_row(record: Record, root: Path | None = None) -> dict[str, Any]:
    """A JSON-ready dict of ``record``; ``file_name`` made relative to ``root`` if under it."""
    if record.audio is not None and record.file_name is None:
        raise ValueError(f"record {record.id!r} holds in-memory audio; write it to a file first")
    row = {name: getattr(record, name) for name in FIELDS}
    row["labels"] = list(record.labels)
    if record.file_name and root is not None:
        path = Path(record.file_name)
        if path.is_absolute() and path.is_relative_to(root.resolve()):
            row["file_name"] = path.relative_to(root.resolve()).as_posix()
    return row


def row_to_record(row: dict[str, Any], root: Path | None, where: str) -> Record:
    """A record from a manifest row; ``where`` (file and line) names the row in errors."""
    missing = [name for name in REQUIRED if row.get(name) in (None, "")]
    if missing:
        raise ManifestError(where, f"missing field(s) {', '.join(missing)}")
    split = row.get("split") or "train"
    if split not in SPLITS:
        raise ManifestError(where, f"split {split!r} is not one of {', '.join(SPLITS)}")
    file_name = row.get("file_name") or None
    if file_name and root is not None and not Path(file_name).is_absolute():
        file_name = str((root / file_name).resolve())
    try:
        return Record(
            id=str(row["id"]), task=str(row["task"]), instruction=str(row["instruction"]),
            output=str(row["output"]), labels=tuple(str(x) for x in row.get("labels") or ()),
            dataset_name=str(row.get("dataset_name") or ""), split=split, file_name=file_name,
            offset_s=float(row.get("offset_s") or 0.0),
            duration_s=_optional_float(row.get("duration_s")),
            sample_rate=int(row["sample_rate"]) if row.get("sample_rate") else None,
            recording=row.get("recording") or None, metadata=dict(row.get("metadata") or {}),
        )
    except (TypeError, ValueError) as exc:
        raise ManifestError(where, f"bad value: {exc}") from exc


def _optional_float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def write_manifest(records: Iterable[Record], path: str | os.PathLike[str]) -> None:
    """Write records to ``path`` (``.jsonl`` or ``.csv``), atomically."""
    path = Path(path)
    root = path.parent
    rows = [record_to_row(r, root) for r in records]
    if path.suffix == ".jsonl":
        atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    elif path.suffix == ".csv":
        atomic_write_text(path, _csv_text(rows))
    else:
        raise ManifestError(path, "manifest must end in .jsonl or .csv")


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    for row in rows:
        flat = dict(row, labels="|".join(row["labels"]),
                    metadata=json.dumps(row["metadata"], ensure_ascii=False))
        writer.writerow({k: "" if v is None else v for k, v in flat.items()})
    return buffer.getvalue()


def read_manifest(path: str | os.PathLike[str]) -> list[Record]:
    """Read a ``.jsonl`` or ``.csv`` manifest; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, "manifest not found")
    if path.suffix == ".jsonl":
        records = list(_read_jsonl(path))
    elif path.suffix == ".csv":
        records = list(_read_csv(path))
    else:
        raise ManifestError(path, "manifest must end in .jsonl or .csv")
    _check_unique(records, path)
    return records


def _read_jsonl(path: Path) -> Iterator[Record]:
    root = path.parent
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(where, f"not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ManifestError(where, "each line must be a JSON object")
            yield row_to_record(row, root, where)


def _read_csv(path: Path) -> Iterator[Record]:
    root = path.parent
    with path.open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            where = f"{path}:{number}"
            parsed: dict[str, Any] = dict(row)
            parsed["labels"] = [x for x in (row.get("labels") or "").split("|") if x]
            try:
                parsed["metadata"] = json.loads(row["metadata"]) if row.get("metadata") else {}
            except json.JSONDecodeError as exc:
                raise ManifestError(where, f"metadata is not a JSON object ({exc.msg})") from exc
            yield row_to_record(parsed, root, where)


def _check_unique(records: list[Record], path: Path) -> None:
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ManifestError(path, f"duplicate id {record.id!r}")
        seen.add(record.id)
