"""Raven tables + audio -> detection / species records: round trip, windows, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from corpus.raven_records import find_table_audio, read_raven_records, window_spans
from corpus.tasks import TASKS
from runtime.errors import AudioError, ManifestError
from runtime.raven import Selection, write_raven_table
from runtime.windows import WindowSpec, iter_windows


def _silence(path: Path, seconds: float, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * rate), dtype=np.float32), rate)
    return path


def _sel(begin: float, end: float, label: str, column: str = "Species") -> Selection:
    return Selection(begin, end, 500.0, 4000.0, annotations={column: label})


def test_round_trip_on_the_real_recording(tmp_path: Path, real_recording: Path) -> None:
    audio = tmp_path / "birds_10s.wav"
    shutil.copy(real_recording, audio)
    table = tmp_path / "birds_10s.Table.1.selections.txt"
    write_raven_table(table, [_sel(0.2, 1.1, "Song Sparrow"), _sel(2.4, 2.9, "Blue Jay"),
                              _sel(2.6, 3.4, "Song Sparrow"), _sel(8.05, 8.12, "Blue Jay")])

    records = read_raven_records(table, clip_s=2.0, hop_s=2.0, min_overlap_s=0.25)

    detection = [r for r in records if r.task == "detection"]
    species = {r.offset_s: r.output for r in records if r.task == "species"}
    # 10.13 s at 32 kHz in 2 s windows: five full ones and a padded tail from 10.0 s.
    assert [r.offset_s for r in detection] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert [r.output for r in detection] == ["Song Sparrow", "Blue Jay, Song Sparrow", "None",
                                             "None", "Blue Jay", "None"]
    # 2-4 s: Song Sparrow 0.8 s vs Blue Jay 0.5 s is no 80 % majority -> no species record.
    assert species == {0.0: "Song Sparrow", 8.0: "Blue Jay"}
    assert {r.labels for r in detection} == {("Blue Jay", "Song Sparrow", "None")}
    assert all(r.file_name == str(audio.resolve()) and r.group == str(audio.resolve())
               for r in records)
    assert all(r.duration_s == 2.0 for r in records)
    assert len({r.id for r in records}) == len(records)
    # Answers parse back to the labels whose selections overlap each window.
    for record in detection:
        parsed = TASKS["detection"].parse(record.output, record.labels)
        assert parsed == sorted(record.metadata["overlap_s"])


def test_min_overlap_and_short_calls(tmp_path: Path) -> None:
    audio = _silence(tmp_path / "rec.flac", 20.0)
    table = tmp_path / "rec.selections.txt"
    # 0.3 s of overlap into the second window; a 0.05 s call wholly inside the first.
    write_raven_table(table, [_sel(9.0, 10.3, "Kea"), _sel(4.0, 4.05, "Tui")])
    strict = read_raven_records(table, audio, clip_s=10.0, min_overlap_s=0.5,
                                tasks=["detection"])
    loose = read_raven_records(table, audio, clip_s=10.0, min_overlap_s=0.2,
                               tasks=["detection"])
    assert [r.output for r in strict] == ["Kea, Tui", "None"]
    assert [r.output for r in loose] == ["Kea, Tui", "Kea"]


def test_window_spans_match_runtime_windows() -> None:
    rate = 100
    for frames in (0, 50, 999, 1000, 1001, 2550):
        for spec in (WindowSpec(10.0, 10.0, "pad"), WindowSpec(10.0, 5.0, "shift"),
                     WindowSpec(10.0, 4.0, "drop"), WindowSpec(3.0, 7.0, "pad")):
            expected = [(round(w.start_s * rate), round(w.end_s * rate))
                        for w in iter_windows([np.zeros(frames, np.float32)], rate, spec)]
            assert window_spans(frames, rate, spec) == expected, (frames, spec)


def test_label_column_default_and_override(tmp_path: Path) -> None:
    audio = _silence(tmp_path / "rec.wav", 10.0)
    table = tmp_path / "rec.selections.txt"
    write_raven_table(table, [Selection(1.0, 2.0, annotations={"Annotation": "Kea",
                                                               "Call": "alarm"})])
    assert read_raven_records(table, clip_s=10.0)[0].output == "Kea"
    assert read_raven_records(table, audio, clip_s=10.0, label_column="Call")[0].output == "alarm"
    with pytest.raises(ManifestError, match="no label column 'Sound'.*Annotation, Call"):
        read_raven_records(table, audio, label_column="Sound")
    bare = tmp_path / "bare.selections.txt"
    write_raven_table(bare, [Selection(1.0, 2.0, annotations={"Notes": "x"})])
    with pytest.raises(ManifestError, match="no label column: expected one of Species"):
        read_raven_records(bare, audio)


def test_audio_found_by_begin_path_and_missing_audio_named(tmp_path: Path) -> None:
    _silence(tmp_path / "audio" / "site3.wav", 10.0)
    table = tmp_path / "tables" / "night.txt"
    table.parent.mkdir()
    write_raven_table(table, [Selection(1.0, 2.0, annotations={
        "Species": "Kea", "Begin Path": str(tmp_path / "audio" / "site3.wav")})])
    assert find_table_audio(table, [Selection(0, 1, annotations={
        "Begin Path": "../audio/site3.wav"})]) == table.parent / "../audio/site3.wav"
    assert read_raven_records(table, clip_s=5.0)[0].output == "Kea"

    gone = tmp_path / "tables" / "gone.txt"
    write_raven_table(gone, [Selection(1.0, 2.0, annotations={
        "Species": "Kea", "Begin Path": "/nowhere/site9.wav"})])
    with pytest.raises(AudioError, match="site9.wav.*named in the 'Begin Path' column"):
        read_raven_records(gone)
    lonely = tmp_path / "lonely.Table.1.selections.txt"
    write_raven_table(lonely, [_sel(1.0, 2.0, "Kea")])
    with pytest.raises(ManifestError, match=r"no audio found.*, lonely \+ .wav/.flac"):
        read_raven_records(lonely)
    with pytest.raises(AudioError, match="missing.wav: file does not exist"):
        read_raven_records(lonely, tmp_path / "missing.wav")


def test_bad_rows_are_named(tmp_path: Path) -> None:
    audio = _silence(tmp_path / "rec.wav", 5.0)
    table = tmp_path / "rec.selections.txt"
    write_raven_table(table, [_sel(1.0, 2.0, "Kea"), _sel(1.0, 2.0, "")])
    with pytest.raises(ManifestError, match="selection row 2: empty label"):
        read_raven_records(table, audio)
    write_raven_table(table, [_sel(1.0, 2.0, "Kea"), _sel(7.0, 8.0, "Tui")])
    with pytest.raises(ManifestError, match="selection row 2: selection begins at 7.0 s"):
        read_raven_records(table, audio)
    write_raven_table(table, [_sel(1.0, 2.0, "None")])
    with pytest.raises(ManifestError, match="reserved"):
        read_raven_records(table, audio)
    with pytest.raises(ValueError, match="tasks"):
        read_raven_records(table, audio, tasks=["count"])
    with pytest.raises(ValueError, match="dominance"):
        read_raven_records(table, audio, dominance=0.3)
