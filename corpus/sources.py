"""One entry point for every corpus source: the reader is picked by what the path is.

| path | kind | reader |
| --- | --- | --- |
| ``*.jsonl`` / ``*.csv`` | our manifest | `corpus.manifest.read_manifest` (+ audio files checked) |
| ``*.parquet`` | BEANS-Zero | `corpus.beans.read_beans_parquet` |
| a folder | one folder per class | `corpus.folders.read_class_folders` |
| a tab-separated file with ``Begin Time (s)`` | Raven table + its audio | `corpus.raven_records.read_raven_records` |

Options go to the chosen reader; an option it does not take raises and lists those it does.

    >>> import tempfile, pathlib, numpy as np, soundfile as sf
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "Kea").mkdir()
    >>> sf.write(root / "Kea" / "a.wav", np.zeros(1600, dtype=np.float32), 16000)
    >>> source_kind(root), [r.output for r in read_records(root, task="species")]
    ('folders', ['Kea'])
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corpus.records import Record
from runtime.errors import AudioError, ManifestError
from runtime.raven import BEGIN

MANIFEST_SUFFIXES = (".jsonl", ".csv")
TABLE_SUFFIXES = (".txt", ".tsv")


def source_kind(path: str | os.PathLike[str]) -> str:
    """"manifest", "beans", "folders" or "raven" for `path`; anything else raises."""
    path = Path(path)
    if path.is_dir():
        return "folders"
    if not path.exists():
        raise ManifestError(path, "source not found")
    suffix = path.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return "manifest"
    if suffix == ".parquet":
        return "beans"
    if suffix in TABLE_SUFFIXES and _is_raven_table(path):
        return "raven"
    raise ManifestError(path, "unknown source: expected a .jsonl/.csv manifest, a BEANS-Zero "
                              ".parquet, a folder of class folders or a Raven selection table")


def _is_raven_table(path: Path) -> bool:
    with path.open(encoding="utf-8-sig", errors="replace") as handle:
        header = handle.readline()
    return BEGIN in header.split("\t")


def read_manifest_checked(path: str | os.PathLike[str], check_audio: bool = True) -> list[Record]:
    """`read_manifest`, then every referenced audio file must exist (the error names both)."""
    from corpus.manifest import read_manifest

    records = read_manifest(path)
    if check_audio:
        for record in records:
            if record.file_name and not Path(record.file_name).is_file():
                raise AudioError(record.file_name, f"audio not found (referenced by {path}, "
                                                   f"record {record.id!r})")
    return records


def reader_for(kind: str) -> Callable[..., list[Record]]:
    """The reader function of a source kind."""
    if kind == "manifest":
        return read_manifest_checked
    if kind == "beans":
        from corpus.beans import read_beans_parquet

        return read_beans_parquet
    if kind == "folders":
        from corpus.folders import read_class_folders

        return read_class_folders
    if kind == "raven":
        from corpus.raven_records import read_raven_records

        return read_raven_records
    raise ValueError(f"unknown source kind {kind!r}; known: manifest, beans, folders, raven")


def reader_options(kind: str) -> tuple[str, ...]:
    """The options the reader of `kind` takes (besides the path)."""
    parameters = list(inspect.signature(reader_for(kind)).parameters)
    return tuple(parameters[1:])


def read_records(path: str | os.PathLike[str], **options: Any) -> list[Record]:
    """Read any supported source into records (see the table in the module docstring)."""
    kind = source_kind(path)
    allowed = reader_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{path} is a {kind} source; its reader does not take "
                         f"{', '.join(unknown)} (it takes: {', '.join(allowed)})")
    return reader_for(kind)(path, **options)
