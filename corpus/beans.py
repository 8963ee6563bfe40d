"""BEANS-Zero parquet files from a local path: read in row batches, and write for export.

A BEANS-Zero row has the columns ``audio`` (a list of floats), ``metadata`` (a JSON string),
``instruction`` (with ``<Audio><AudioHere></Audio>``), ``instruction_text``, ``output``,
``task`` (``classification``, ``detection`` or ``captioning``), ``dataset_name``, ``id`` and
``file_name``. What this module relies on, from the public sources (the dataset card of
EarthSpeciesProject/BEANS-Zero, the NatureLM-audio-training card and the beans-zero code):

- The sample rate of ``audio`` is the ``sample_rate`` key of the metadata JSON (the
  NatureLM-audio-training card shows ``json.loads(x["metadata"])["sample_rate"] == 16000``);
  ``sampling_rate`` and ``sr`` are accepted too, and ``default_rate`` covers files without it.
- A row does not carry its label set. The beans-zero evaluator takes, per ``dataset_name``, the
  set of ``output`` values (detection outputs are comma-separated labels or ``"None"``); the
  reader does the same in a cheap first pass over the ``output`` / ``dataset_name`` / ``task``
  columns. Captioning has no label set (free text).
- BEANS-Zero is a test-only benchmark, so its records get ``split="test"``.

Files written here keep exactly those nine columns; the fields BEANS-Zero lacks (label set,
split, recording, offset, duration) ride in the metadata JSON under ``"naturelm_edge"``, so a
written file reads back into the same records and BEANS-Zero tools still read it.

    >>> import tempfile, pathlib, numpy as np
    >>> from corpus.tasks import instruction_for
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "clips.parquet"
    >>> clip = Record(id="c1", task="species", instruction=instruction_for("species"),
    ...               output="Kea", labels=("Kea", "Tui"), audio=np.zeros(16000, np.float32),
    ...               sample_rate=16000)
    >>> write_beans_parquet([clip], path)
    1
    >>> back = read_beans_parquet(path)
    >>> back == [clip], back[0].audio.shape
    (True, (16000,))
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from corpus.records import SPLITS, Record
from corpus.tasks import AUDIO_PLACEHOLDER, NONE_LABEL
from runtime.audio import audio_info, read_audio
from runtime.errors import AudioError, ManifestError

BEANS_COLUMNS = ("audio", "metadata", "instruction", "instruction_text", "output", "task",
                 "dataset_name", "id", "file_name")
RATE_KEYS = ("sample_rate", "sampling_rate", "sr")
OWN_KEY = "naturelm_edge"
DEFAULT_BATCH_ROWS = 64
FREE_TEXT_TASKS = ("captioning",)


def _open(path: Path) -> Any:
    """A `pyarrow.parquet.ParquetFile` with the BEANS-Zero columns, or a clear error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise ManifestError(path, "parquet file not found")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(path, f"not a readable parquet file ({exc})") from exc
    missing = [c for c in BEANS_COLUMNS if c not in parquet.schema_arrow.names]
    if missing:
        raise ManifestError(path, f"not a BEANS-Zero parquet file: missing column(s) "
                                  f"{', '.join(missing)}")
    return parquet


def beans_label_sets(path: str | os.PathLike[str]) -> dict[str, tuple[str, ...]]:
    """Per ``dataset_name``, the sorted set of answers (detection: its labels plus "None")."""
    parquet = _open(Path(path))
    found: dict[str, set[str]] = {}
    free_text: set[str] = set()
    for batch in parquet.iter_batches(batch_size=4096, columns=["output", "dataset_name",
                                                                "task"]):
        for output, name, task in zip(*(batch.column(i).to_pylist() for i in range(3)),
                                      strict=True):
            labels = found.setdefault(str(name or ""), set())
            if task in FREE_TEXT_TASKS:
                free_text.add(str(name or ""))
            elif task == "detection":
                labels.update(p.strip() for p in str(output or "").split(",") if p.strip())
                labels.add(NONE_LABEL)
            elif output not in (None, ""):
                labels.add(str(output))
    return {name: () if name in free_text else tuple(sorted(labels))
            for name, labels in found.items()}


def iter_beans_parquet(path: str | os.PathLike[str], batch_rows: int = DEFAULT_BATCH_ROWS,
                       default_rate: int | None = None) -> Iterator[Record]:
    """Yield the records of a BEANS-Zero parquet file, decoding `batch_rows` rows at a time.

    Args:
        path: a local ``.parquet`` file.
        batch_rows: rows held in memory at once.
        default_rate: the audio rate for rows whose metadata names none (else an error).
    """
    path = Path(path)
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    label_sets = beans_label_sets(path)
    parquet = _open(path)
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(BEANS_COLUMNS)):
        audio = _audio_arrays(batch.column(0), path, row)
        text = {name: batch.column(i).to_pylist() for i, name in enumerate(BEANS_COLUMNS)
                if name != "audio"}
        for k in range(batch.num_rows):
            fields = {name: values[k] for name, values in text.items()}
            yield _row_record(fields, audio[k], label_sets, f"{path}: row {row + k}",
                              default_rate)
        row += batch.num_rows


def read_beans_parquet(path: str | os.PathLike[str], batch_rows: int = DEFAULT_BATCH_ROWS,
                       default_rate: int | None = None) -> list[Record]:
    """All records of a BEANS-Zero parquet file (see `iter_beans_parquet`)."""
    records = list(iter_beans_parquet(path, batch_rows, default_rate))
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ManifestError(path, f"duplicate id {record.id!r}")
        seen.add(record.id)
    return records


def _audio_arrays(column: Any, path: Path, first_row: int) -> list[np.ndarray]:
    """Slice a list<float> column into float32 arrays without going through Python floats."""
    import pyarrow as pa

    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise ManifestError(path, f"column 'audio' must be a list of floats, got {column.type}")
    if column.null_count:
        nulls = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
        raise AudioError(f"{path}: row {first_row + int(nulls[0])}", "audio is missing (null)")
    offsets = column.offsets.to_numpy()
    values = column.values
    if not pa.types.is_floating(values.type) and not pa.types.is_integer(values.type):
        raise ManifestError(path, f"column 'audio' must hold numbers, got {values.type}")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return [flat[offsets[k]:offsets[k + 1]] for k in range(len(offsets) - 1)]


def _row_record(fields: dict[str, Any], audio: np.ndarray,
                label_sets: dict[str, tuple[str, ...]], where: str,
                default_rate: int | None) -> Record:
    meta = _metadata(fields["metadata"], where)
    own = meta.pop(OWN_KEY, None)
    rate = _rate(meta, where, default_rate)
    if audio.size == 0:
        raise AudioError(where, "audio is empty")
    if not np.isfinite(audio).all():
        raise AudioError(where, f"audio holds NaN or Inf at sample "
                                f"{int(np.flatnonzero(~np.isfinite(audio))[0])}")
    for name in ("id", "output", "task"):
        if fields[name] in (None, ""):
            raise ManifestError(where, f"missing {name}")
    instruction = str(fields["instruction"] or fields["instruction_text"] or "")
    if AUDIO_PLACEHOLDER not in instruction:
        instruction = f"{AUDIO_PLACEHOLDER} {instruction}".strip()
    dataset_name = str(fields["dataset_name"] or "")
    own = own if isinstance(own, dict) else {}
    split = own.get("split", "test")
    if split not in SPLITS:
        raise ManifestError(where, f"split {split!r} is not one of {', '.join(SPLITS)}")
    labels = own.get("labels") or None  # an empty set falls back to the inferred one
    return Record(
        id=str(fields["id"]), task=str(fields["task"]), instruction=instruction,
        output=str(fields["output"]), dataset_name=dataset_name, split=split,
        labels=tuple(labels) if labels is not None else label_sets.get(dataset_name, ()),
        offset_s=float(own.get("offset_s", 0.0)),
        duration_s=None if own.get("duration_s") is None else float(own["duration_s"]),
        audio=np.ascontiguousarray(audio), sample_rate=rate,
        recording=own["recording"] if "recording" in own else (fields["file_name"] or None),
        metadata=meta,
    )


def _metadata(text: Any, where: str) -> dict[str, Any]:
    if text in (None, ""):
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        meta = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ManifestError(where, f"metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ManifestError(where, "metadata must be a JSON object")
    return meta


def _rate(meta: dict[str, Any], where: str, default_rate: int | None) -> int:
    for key in RATE_KEYS:
        if meta.get(key) not in (None, ""):
            try:
                rate = int(float(meta[key]))
            except (TypeError, ValueError) as exc:
                raise ManifestError(where, f"metadata {key} {meta[key]!r} is not a number") \
                    from exc
            if rate <= 0:
                raise ManifestError(where, f"metadata {key} must be positive, got {rate}")
            return rate
    if default_rate is None:
        raise ManifestError(where, f"metadata names no sample rate (expected one of "
                                   f"{', '.join(RATE_KEYS)}; keys: {', '.join(meta) or 'none'})")
    return default_rate


def write_beans_parquet(records: Iterable[Record], path: str | os.PathLike[str],
                        target_rate: int | None = None,
                        batch_rows: int = DEFAULT_BATCH_ROWS) -> int:
    """Write records as a BEANS-Zero parquet file, atomically; returns the rows written.

    Records holding audio arrays are written as they are; records pointing at files are
    read (their offset and duration) at `target_rate`, or the file's own rate when None.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    schema = pa.schema([("audio", pa.list_(pa.float32())),
                        *((name, pa.string()) for name in BEANS_COLUMNS[1:])])
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            batch: list[dict[str, Any]] = []
            for record in records:
                batch.append(_record_row(record, target_rate))
                if len(batch) == batch_rows:
                    writer.write_table(_table(batch, schema))
                    rows += len(batch)
                    batch = []
            if batch or rows == 0:
                writer.write_table(_table(batch, schema))
                rows += len(batch)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows


def _table(rows: list[dict[str, Any]], schema: Any) -> Any:
    """A pyarrow table of `rows`; the audio column is built from one flat float32 buffer."""
    import pyarrow as pa

    lengths = [len(row["audio"]) for row in rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([row["audio"] for row in rows]) if rows else np.zeros(0, np.float32)
    columns = [pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()))]
    columns += [pa.array([row[name] for row in rows], type=pa.string())
                for name in BEANS_COLUMNS[1:]]
    return pa.Table.from_arrays(columns, schema=schema)


def _record_row(record: Record, target_rate: int | None) -> dict[str, Any]:
    audio, rate = _record_audio(record, target_rate)
    own = {"labels": list(record.labels), "split": record.split, "recording": record.recording,
           "offset_s": record.offset_s if record.audio is not None else 0.0,
           "duration_s": record.duration_s if record.audio is not None else None}
    meta = {**record.metadata, "sample_rate": rate, OWN_KEY: own}
    return {"audio": audio, "metadata": json.dumps(meta, ensure_ascii=False),
            "instruction": record.instruction, "instruction_text": record.instruction_text,
            "output": record.output, "task": record.task, "dataset_name": record.dataset_name,
            "id": record.id, "file_name": record.recording or record.file_name or ""}


def _record_audio(record: Record, target_rate: int | None) -> tuple[np.ndarray, int]:
    if record.audio is not None:
        if record.sample_rate is None:
            raise ValueError(f"record {record.id!r} holds audio without a sample_rate")
        return np.asarray(record.audio, dtype=np.float32), int(record.sample_rate)
    if record.file_name is None:
        raise ValueError(f"record {record.id!r} has neither audio nor a file_name")
    audio = read_audio(record.file_name, target_rate, offset_s=record.offset_s,
                       duration_s=record.duration_s)
    return audio, target_rate or audio_info(record.file_name).sample_rate
