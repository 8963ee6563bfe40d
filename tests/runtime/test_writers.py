"""Detection writers: each format reads back to the same rows; writes are atomic."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from runtime.postprocess import Detection
from runtime.raven import read_raven_table
from runtime.writers import (
    check_formats,
    write_audacity,
    write_csv,
    write_errors,
    write_jsonl,
    write_raven,
)

ROWS = [Detection("/data/site 1/ü.wav", 0.0, 3.0, "species", "Kea", 0.91234),
        Detection("/data/site 1/ü.wav", 3.0, 6.5, "detection", "Tui, the bird", 0.5)]


def test_csv_and_jsonl_read_back(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", ROWS)
    with (tmp_path / "d.csv").open(newline="", encoding="utf-8") as handle:
        back = list(csv.DictReader(handle))
    assert [(r["file"], float(r["start_s"]), float(r["end_s"]), r["task"], r["label"],
             float(r["score"])) for r in back] == [
        (d.file, d.start_s, d.end_s, d.task, d.label, round(d.score, 4)) for d in ROWS]
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    lines = (tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()
    assert [Detection(**json.loads(line)) for line in lines] == ROWS


def test_raven_table_reads_back_with_runtime_reader(tmp_path: Path) -> None:
    path = tmp_path / "ü.wav.selections.txt"
    write_raven(path, ROWS)
    back = read_raven_table(path)
    assert [(s.begin_s, s.end_s, s.annotations["Label"], s.annotations["Task"]) for s in back] == [
        (0.0, 3.0, "Kea", "species"), (3.0, 6.5, "Tui, the bird", "detection")]
    assert back[0].annotations["Begin File"] == "ü.wav"
    write_raven(path, [])
    assert read_raven_table(path) == []


def test_audacity_labels_and_errors(tmp_path: Path) -> None:
    write_audacity(tmp_path / "a.txt", ROWS)
    first = (tmp_path / "a.txt").read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert first == ["0.000000", "3.000000", "Kea (species 0.91)"]
    write_errors(tmp_path / "errors.csv", [("x, y.wav", "file is empty (0 bytes)")])
    with (tmp_path / "errors.csv").open(newline="") as handle:
        assert list(csv.reader(handle)) == [["file", "reason"],
                                            ["x, y.wav", "file is empty (0 bytes)"]]


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    for _ in range(2):
        write_csv(tmp_path / "d.csv", ROWS)
    assert [p.name for p in tmp_path.iterdir()] == ["d.csv"]


def test_formats_are_checked() -> None:
    assert check_formats(["jsonl", "raven"]) == ("raven", "jsonl")
    with pytest.raises(ValueError, match="unknown output format.*parquet"):
        check_formats(["parquet"])
