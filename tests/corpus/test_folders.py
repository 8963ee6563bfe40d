"""One folder per class -> species records; bad folders and bad audio raise naming the path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from corpus.folders import read_class_folders
from corpus.tasks import TASKS, instruction_for
from runtime.audio import read_audio
from runtime.errors import AudioError, ManifestError


def _tone(path: Path, rate: int = 16000, seconds: float = 0.5, freq: float = 440.0) -> None:
    t = np.arange(int(rate * seconds)) / rate
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)


def test_class_folders_become_species_records(tmp_path: Path, real_recording: Path) -> None:
    root = tmp_path / "birds"
    _tone(root / "Kea" / "k1.wav")
    _tone(root / "Kea" / "night" / "k2.flac", rate=22050)
    _tone(root / "Tui" / "t1.ogg", rate=32000)
    shutil.copy(real_recording, root / "Tui" / "real.WAV")
    (root / "Tui" / "notes.txt").write_text("not audio, ignored")
    (root / ".cache").mkdir()

    records = read_class_folders(root)

    assert [r.id for r in records] == ["Kea/k1", "Kea/night/k2", "Tui/real", "Tui/t1"]
    assert [r.output for r in records] == ["Kea", "Kea", "Tui", "Tui"]
    assert {r.labels for r in records} == {("Kea", "Tui")}
    assert {r.task for r in records} == {"species"}
    assert {r.dataset_name for r in records} == {"birds"}
    assert all(r.instruction == instruction_for("species") for r in records)
    assert all(TASKS["species"].parse(r.output, r.labels) == [r.output] for r in records)
    # Paths resolve to the real files, which decode.
    real = next(r for r in records if r.id == "Tui/real")
    assert real.file_name == str((root / "Tui" / "real.WAV").resolve())
    assert read_audio(real.file_name, 16000).shape[0] == pytest.approx(10.13 * 16000, abs=200)


def test_task_and_dataset_name_options(tmp_path: Path) -> None:
    _tone(tmp_path / "adult" / "a.wav")
    _tone(tmp_path / "juvenile" / "j.wav")
    records = read_class_folders(tmp_path, task="lifestage", dataset_name="stages")
    assert {(r.task, r.dataset_name) for r in records} == {("lifestage", "stages")}
    assert records[0].instruction == instruction_for("lifestage")
    with pytest.raises(ValueError, match="multi-label"):
        read_class_folders(tmp_path, task="detection")
    with pytest.raises(KeyError, match="unknown task"):
        read_class_folders(tmp_path, task="colour")


def test_bad_folders_raise_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a folder"):
        read_class_folders(tmp_path / "missing")
    with pytest.raises(ManifestError, match="no class folders"):
        read_class_folders(tmp_path)
    _tone(tmp_path / "Kea" / "k.wav")
    (tmp_path / "Tui").mkdir()
    with pytest.raises(ManifestError, match="Tui: class folder holds no audio"):
        read_class_folders(tmp_path)
    _tone(tmp_path / "Tui" / "t.wav")
    _tone(tmp_path / "loose.wav")
    with pytest.raises(ManifestError, match="directly in the root.*loose.wav"):
        read_class_folders(tmp_path)
    (tmp_path / "loose.wav").unlink()
    _tone(tmp_path / "Tui" / "t.flac")
    with pytest.raises(ManifestError, match="same id 'Tui/t'"):
        read_class_folders(tmp_path)


def test_unreadable_audio_is_named(tmp_path: Path) -> None:
    _tone(tmp_path / "Kea" / "k.wav")
    bad = tmp_path / "Tui" / "broken.wav"
    bad.parent.mkdir()
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioError, match="broken.wav"):
        read_class_folders(tmp_path)
    # Without the header check the record is still listed (errors surface when it is read).
    assert [r.id for r in read_class_folders(tmp_path, check_audio=False)] == ["Kea/k",
                                                                               "Tui/broken"]
