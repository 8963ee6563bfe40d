"""Raven selection tables round-trip and bad tables name the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ManifestError
from runtime.raven import Selection, read_raven_table, write_raven_table


def test_round_trip_keeps_times_bands_and_annotations(tmp_path: Path) -> None:
    rows = [Selection(0.5, 1.25, 1000.0, 4000.0, annotations={"Species": "Kea", "Score": "0.9"}),
            Selection(3.0, 4.0, annotations={"Species": "Tui ü"})]
    path = tmp_path / "a b.selections.txt"
    write_raven_table(path, rows)
    back = read_raven_table(path)
    assert [(s.begin_s, s.end_s, s.low_hz, s.high_hz) for s in back] == [
        (0.5, 1.25, 1000.0, 4000.0), (3.0, 4.0, 0.0, 0.0)]
    assert back[0].annotations == {"Species": "Kea", "Score": "0.9"}
    assert back[1].annotations == {"Species": "Tui ü", "Score": ""}
    assert path.read_text(encoding="utf-8").splitlines()[0].startswith("Selection\tView\tChannel")


def test_waveform_rows_written_by_raven_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tSpecies\n"
                    "1\tWaveform 1\t1\t0.0\t1.0\tKea\n1\tSpectrogram 1\t1\t0.0\t1.0\tKea\n",
                    encoding="utf-8")
    assert len(read_raven_table(path)) == 1


@pytest.mark.parametrize("body, message", [
    ("Selection\tStart\n1\t0\n", "no column 'Begin Time"),
    ("Begin Time (s)\tEnd Time (s)\n0.0\tx\n", r"t\.txt:2: bad number"),
    ("Begin Time (s)\tEnd Time (s)\n2.0\t1.0\n", "before begin"),
])
def test_bad_tables_are_refused(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "t.txt"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ManifestError, match=message):
        read_raven_table(path)
