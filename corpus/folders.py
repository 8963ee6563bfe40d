"""One folder per class: ``root/<label>/*.wav|flac|ogg|mp3`` becomes species records.

The label set is the set of class-folder names (sorted). Each audio file is one record of the
whole file; its id is the path below ``root`` without the suffix (``Kea/kea_001``). Hidden
files and folders (starting with ``.``) are skipped; audio lying directly in ``root`` (no class),
an empty class folder or an unreadable audio file raise an error naming the path.

    >>> import tempfile, pathlib, numpy as np, soundfile as sf
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for label in ("Kea", "Tui"):
    ...     (root / label).mkdir()
    ...     sf.write(root / label / "a.wav", np.zeros(1600, dtype=np.float32), 16000)
    >>> records = read_class_folders(root)
    >>> [(r.id, r.output, r.labels) for r in records]
    [('Kea/a', 'Kea', ('Kea', 'Tui')), ('Tui/a', 'Tui', ('Kea', 'Tui'))]
"""

from __future__ import annotations

import os
from pathlib import Path

from corpus.records import Record
from corpus.tasks import get_task, instruction_for
from runtime.audio import audio_info
from runtime.errors import ManifestError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


def is_audio_file(path: Path) -> bool:
    """True for a visible file whose suffix (any case) is one of `AUDIO_EXTENSIONS`."""
    return path.is_file() and not path.name.startswith(".") and (
        path.suffix.lower() in AUDIO_EXTENSIONS)


def read_class_folders(root: str | os.PathLike[str], task: str = "species",
                       dataset_name: str | None = None, check_audio: bool = True) -> list[Record]:
    """Records for every audio file in the class folders of `root` (sorted by id).

    Args:
        root: folder holding one sub-folder per class.
        task: the single-label task the folder names answer (default "species").
        dataset_name: stored on every record; default the folder's name.
        check_audio: read each file's header and raise `AudioError` for unusable files.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(root, "not a folder of class folders")
    if get_task(task).multi_label:
        raise ValueError(f"class folders give one label per file; task {task!r} is multi-label")
    stray = sorted(p.name for p in root.iterdir() if is_audio_file(p))
    if stray:
        raise ManifestError(root, f"audio files directly in the root have no class folder: "
                                  f"{', '.join(stray[:5])}")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ManifestError(root, "no class folders found (expected root/<label>/*.wav)")
    labels = tuple(p.name for p in classes)
    records: list[Record] = []
    for folder in classes:
        records.extend(_class_records(root, folder, labels, task,
                                      dataset_name or root.name, check_audio))
    records.sort(key=lambda r: r.id)
    for before, after in zip(records, records[1:], strict=False):
        if before.id == after.id:
            raise ManifestError(root, f"two files give the same id {after.id!r}: "
                                      f"{before.file_name} and {after.file_name}")
    return records


def _class_records(root: Path, folder: Path, labels: tuple[str, ...], task: str,
                   dataset_name: str, check_audio: bool) -> list[Record]:
    files = sorted(p for p in folder.rglob("*") if is_audio_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ManifestError(folder, f"class folder holds no audio files "
                                    f"({', '.join(AUDIO_EXTENSIONS)})")
    records = []
    for path in files:
        if check_audio:
            audio_info(path)
        records.append(Record(
            id=path.relative_to(root).with_suffix("").as_posix(), task=task,
            instruction=instruction_for(task), output=folder.name, labels=labels,
            dataset_name=dataset_name, file_name=str(path.resolve()),
            recording=str(path.resolve()),
        ))
    return records
