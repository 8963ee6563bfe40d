"""The journal: entries survive reopening, torn last lines are cut, settings are pinned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.errors import ManifestError
from runtime.journal import Entry, Journal, file_key
from runtime.postprocess import Detection


def _entry(path: Path, status: str = "ok") -> Entry:
    name, size, mtime = file_key(path)
    dets = (Detection(name, 0.0, 1.0, "species", "Kea", 0.75),)
    return Entry(name, size, mtime, status, 1.0, "" if status == "ok" else "bad",
                 dets if status == "ok" else ())


def test_entries_round_trip_and_changed_files_are_redone(tmp_path: Path) -> None:
    rec = tmp_path / "a b.wav"
    rec.write_bytes(b"x")
    with Journal.open(tmp_path / "j.jsonl", "fp") as journal:
        journal.append(_entry(rec))
    with Journal.open(tmp_path / "j.jsonl", "fp") as journal:
        assert journal.done(rec) == _entry(rec)
        assert journal.done(tmp_path / "other.wav") is None
    rec.write_bytes(b"xy")  # the recording changed: analyse it again
    with Journal.open(tmp_path / "j.jsonl", "fp") as journal:
        assert journal.done(rec) is None


def test_torn_last_line_is_cut_and_appending_goes_on(tmp_path: Path) -> None:
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    path = tmp_path / "j.jsonl"
    with Journal.open(path, "fp") as journal:
        journal.append(_entry(a))
    intact = path.stat().st_size
    with path.open("ab") as handle:
        handle.write(_entry(b).to_json().encode()[:40])  # power cut mid-line
    with Journal.open(path, "fp") as journal:
        assert path.stat().st_size == intact
        assert set(journal.entries) == {str(a.absolute())}
        journal.append(_entry(b, "error"))
    with Journal.open(path, "fp") as journal:
        assert journal.done(b).status == "error"  # type: ignore[union-attr]
        assert len(path.read_text().splitlines()) == 3


def test_damage_before_the_last_line_and_other_settings_are_refused(tmp_path: Path) -> None:
    a = tmp_path / "a.wav"
    a.write_bytes(b"a")
    path = tmp_path / "j.jsonl"
    with Journal.open(path, "fp") as journal:
        journal.append(_entry(a))
        journal.append(_entry(a))
    with pytest.raises(ManifestError, match="other settings"):
        Journal.open(path, "another")
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"{garbage"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ManifestError, match=r"j\.jsonl:2: damaged journal line"):
        Journal.open(path, "fp")
    with Journal.open(path, "another", resume=False) as journal:
        assert journal.entries == {}
    assert len(path.read_text().splitlines()) == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
