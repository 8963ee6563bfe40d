"""The journal: entries survive reopening, torn last lines are cut, settings are pinned,
detections stay on disk (memory holds only what resuming needs)."""

from __future__ import annotations

import os
import tracemalloc
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
        done = journal.done(rec)
        assert done is not None and (done.size, done.status) == (1, "ok")
        assert journal.entry(str(rec.absolute())) == _entry(rec)
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
        assert set(journal.finished) == {str(a.absolute())}
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
        assert journal.finished == {}
    assert len(path.read_text().splitlines()) == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_latest_and_outputs_follow_the_last_entry_of_each_file(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    first = Entry("/r/b.wav", 1, 1, "ok", detections=(Detection("/r/b.wav", 0, 1, "t", "x", 1),),
                  outputs={"detections/2024-05-01.csv": 80})
    with Journal.open(path, "fp") as journal:
        journal.append(first)
        journal.append(Entry("/r/a.wav", 1, 1, "error", reason="empty",
                             outputs={"errors/2024-05-01.csv": 30}))
        journal.append(Entry("/r/b.wav", 2, 2, "ok", outputs={"detections/2024-05-01.csv": 95,
                                                             "detections/2024-05-02.csv": 40}))
    with Journal.open(path, "fp") as journal:
        assert [(e.file, e.size) for e in journal.latest()] == [("/r/a.wav", 1), ("/r/b.wav", 2)]
        assert journal.outputs == {"detections/2024-05-01.csv": 95,
                                   "errors/2024-05-01.csv": 30, "detections/2024-05-02.csv": 40}
        assert [e.size for e in journal.with_output("detections/2024-05-01.csv")] == [1, 2]
        assert [e.file for e in journal.with_output("errors/2024-05-01.csv")] == ["/r/a.wav"]


def _fill(path: Path, entries: int, detections: int) -> None:
    """A journal of `entries` recordings with `detections` each, written in one go."""
    dets = tuple(Detection("/x", float(i), i + 1.0, "species", "Kea", 0.5)
                 for i in range(detections))
    template = Entry("/field/unit/2024/rec_{:06d}.wav", 1000, 7, "ok", 60.0,
                     detections=dets).to_json().replace("{", "{{").replace("}", "}}")
    template = template.replace("rec_{{:06d}}", "rec_{:06d}")
    lines = [template.format(i) for i in range(entries)]
    path.write_text(Journal.open(path, "fp").path.read_text() + "\n".join(lines) + "\n")


def test_memory_holds_keys_not_detections(tmp_path: Path) -> None:
    """5k recordings: what the open journal keeps does not grow with their detections."""
    held = {}
    for detections in (1, 40):
        path = tmp_path / f"j{detections}.jsonl"
        _fill(path, 5_000, detections)
        tracemalloc.start()
        journal = Journal.open(path, "fp")
        held[detections] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(journal.finished) == 5_000
        assert len(journal.entry("/field/unit/2024/rec_004999.wav").detections) == detections
        journal.close()
    per_entry = held[40] / 5_000
    print(f"\njournal in memory: {per_entry:.0f} bytes per recording "
          f"({held[1] / 5_000:.0f} with 1 detection each)")
    assert per_entry < 400
    assert held[40] < 1.1 * held[1]
