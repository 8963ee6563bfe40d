"""`naturelm-edge corpus convert`: any corpus source -> our JSONL manifest (+ audio files).

Reads a manifest, a BEANS-Zero parquet, a folder of class folders or a Raven table with its
audio (`corpus.sources`), writes the manifest, and for parquet sources writes each row's
inline audio to ``audio/<id>.wav`` (float, exact) or ``.flac`` (24-bit) beside the manifest,
streaming the parquet in row batches. Splits are assigned by recording
(`corpus.splits.assign_splits`) when the source has none: under ``--splits auto`` that is
when all its records share one split (class folders and Raven tables carry none; BEANS-Zero
is all "test"); ``assign`` always re-assigns, ``keep`` never does.

    $ naturelm-edge corpus convert recordings/ runs/birds --fractions 0.8 0.1 0.1
    $ naturelm-edge corpus convert beans_zero/shard-0.parquet runs/beans --splits keep
    $ naturelm-edge corpus convert site3.Table.1.selections.txt runs/site3 --clip-s 5

    >>> import tempfile, pathlib, numpy as np, soundfile as sf
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for label in ("Kea", "Tui"):
    ...     for i in range(5):
    ...         (d / "src" / label).mkdir(parents=True, exist_ok=True)
    ...         sf.write(d / "src" / label / f"{i}.wav", np.zeros(800, np.float32), 8000)
    >>> convert(d / "src", d / "out")  # doctest: +ELLIPSIS
    wrote 10 records to .../out/manifest.jsonl (train 8, valid 1, test 1; species 10)
    0
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from corpus.records import SPLITS, Record
from corpus.splits import DEFAULT_FRACTIONS, assign_splits
from runtime.errors import AudioError, InputError, ManifestError

SplitPolicy = Literal["auto", "assign", "keep"]
AudioFormat = Literal["wav", "flac"]
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def convert(
    source: Path,
    out: Path,
    splits: SplitPolicy = "auto",
    fractions: list[float] | None = None,
    seed: int = 0,
    dataset_name: str | None = None,
    task: str | None = None,
    audio: Path | None = None,
    clip_s: float | None = None,
    hop_s: float | None = None,
    min_overlap_s: float | None = None,
    label_column: str | None = None,
    default_rate: int | None = None,
    audio_format: AudioFormat = "wav",
) -> int:
    """Convert a corpus source into a JSONL manifest with train / valid / test splits.

    Args:
        source: a .jsonl/.csv manifest, a BEANS-Zero .parquet, a folder of class folders, or a
            Raven selection table.
        out: the manifest to write (.jsonl or .csv), or a folder to hold manifest.jsonl.
        splits: "auto" assigns splits by recording when the source has none, "assign" always
            re-assigns them, "keep" keeps the source's.
        fractions: train, valid and test shares of the records (default 0.8 0.1 0.1).
        seed: seeds the split assignment.
        dataset_name: replaces the dataset_name of every record.
        task: class folders: the task their names answer (default species).
        audio: Raven table: its recording (default: found beside the table).
        clip_s: Raven table: clip window length in seconds (default 10).
        hop_s: Raven table: hop between windows in seconds (default clip_s).
        min_overlap_s: Raven table: overlap a selection needs to count (default 0.1).
        label_column: Raven table: the annotation column with labels.
        default_rate: BEANS-Zero: audio rate for rows whose metadata names none.
        audio_format: BEANS-Zero: how inline audio is written, wav (float32) or flac (24-bit).
    """
    manifest = _manifest_path(out)
    try:
        records = _read(source, manifest.parent / "audio", audio_format, {
            "task": task, "audio": audio, "clip_s": clip_s, "hop_s": hop_s,
            "min_overlap_s": min_overlap_s, "label_column": label_column,
            "default_rate": default_rate})
        records = finish_records(records, source, splits, fractions, seed, dataset_name)
        from corpus.manifest import write_manifest

        write_manifest(records, manifest)
    except (InputError, ValueError, KeyError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"naturelm-edge corpus convert: {reason}", file=sys.stderr)
        return 2
    print(f"wrote {len(records)} records to {manifest} ({_summary(records)})")
    return 0


def _manifest_path(out: Path) -> Path:
    out = Path(out)
    return out if out.suffix in (".jsonl", ".csv") else out / "manifest.jsonl"


def _read(source: Path, audio_dir: Path, audio_format: AudioFormat,
          options: dict[str, Any]) -> list[Record]:
    """Records of `source`; parquet rows stream to audio files as they are read."""
    from corpus.sources import read_records, reader_options, source_kind

    kind = source_kind(source)
    given = {k: v for k, v in options.items() if v is not None}
    unused = sorted(set(given) - set(reader_options(kind)))
    if unused:
        raise ValueError(f"{source} is a {kind} source; the option(s) "
                         f"{', '.join(unused)} do not apply to it")
    if kind != "beans":
        return read_records(source, **given)
    from corpus.beans import iter_beans_parquet

    return list(extract_audio(iter_beans_parquet(source, **given), audio_dir, audio_format))


def extract_audio(records: Iterable[Record], audio_dir: Path,
                  audio_format: AudioFormat = "wav") -> Iterator[Record]:
    """Write each record's in-memory audio to ``audio_dir/<id>.<format>``; yield file records."""
    import soundfile as sf

    if audio_format not in ("wav", "flac"):
        raise ValueError(f"audio_format must be wav or flac, got {audio_format!r}")
    audio_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for record in records:
        if record.audio is None:
            yield record
            continue
        name = file_stem(record.id)
        if name in used:
            raise ManifestError(audio_dir, f"two records map to the audio file {name!r}")
        used.add(name)
        path = audio_dir / f"{name}.{audio_format}"
        samples = np.asarray(record.audio, dtype=np.float32)
        if audio_format == "flac" and np.abs(samples).max(initial=0.0) > 1.0:
            raise AudioError(path, f"record {record.id!r} exceeds full scale "
                                   f"(peak {np.abs(samples).max():.3f}); use --audio-format wav")
        subtype = "FLOAT" if audio_format == "wav" else "PCM_24"
        sf.write(path, samples, int(record.sample_rate or 0), subtype=subtype)
        yield dataclasses.replace(record, audio=None, file_name=str(path.resolve()),
                                  offset_s=0.0, duration_s=None)


def file_stem(record_id: str) -> str:
    """A file-system-safe name for a record id (a short hash is added when it had to change)."""
    safe = _UNSAFE.sub("_", record_id).strip("._") or "clip"
    if safe == record_id:
        return safe
    return f"{safe[:80]}-{hashlib.sha1(record_id.encode('utf-8')).hexdigest()[:8]}"


def finish_records(records: list[Record], source: Path, splits: SplitPolicy,
                   fractions: Iterable[float] | None, seed: int,
                   dataset_name: str | None) -> list[Record]:
    """Check ids, rename the dataset if asked, and assign splits under the policy."""
    if splits not in ("auto", "assign", "keep"):
        raise ValueError(f"splits must be auto, assign or keep, got {splits!r}")
    if not records:
        raise ManifestError(source, "the source holds no records")
    counts = Counter(r.id for r in records)
    duplicate = next((i for i, n in counts.items() if n > 1), None)
    if duplicate is not None:
        raise ManifestError(source, f"duplicate id {duplicate!r}")
    if dataset_name:
        records = [dataclasses.replace(r, dataset_name=dataset_name) for r in records]
    single_split = len({r.split for r in records}) == 1
    if splits == "assign" or (splits == "auto" and single_split):
        records = assign_splits(records, tuple(fractions or DEFAULT_FRACTIONS), seed)
    return records


def _summary(records: list[Record]) -> str:
    by_split = Counter(r.split for r in records)
    by_task = Counter(r.task for r in records)
    splits = ", ".join(f"{s} {by_split[s]}" for s in SPLITS if by_split[s])
    tasks = ", ".join(f"{t} {n}" for t, n in sorted(by_task.items()))
    return f"{splits}; {tasks}"
