"""The journal: entries survive reopening, torn last lines are cut, settings are pinned,
detections stay on disk (memory holds only what resuming needs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import soundfile as sf

from runtime.errors import ManifestError
from runtime.journal import COMPACT_MIN_LINES, Entry, Journal, file_key
from runtime.postprocess import Detection

REPO = Path(__file__).resolve().parents[2]


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


# -- compaction: superseded lines go, every answer stays


def _answers(journal: Journal, recordings: list[Path]) -> dict[str, object]:
    """Everything a caller can ask the journal (`Done.offset` is where a line sits in the file,
    not an answer: it moves when the file is compacted)."""
    done = [journal.done(p) for p in recordings]
    return {"done": [d[:3] if d is not None else None for d in done],
            "finished": {name: d[:3] for name, d in journal.finished.items()},
            "entries": {name: journal.entry(name) for name in journal.finished},
            "latest": list(journal.latest()),
            "outputs": dict(journal.outputs),
            "with_output": {rel: list(journal.with_output(rel)) for rel in journal.outputs}}


def _write(path: Path, entries: list[Entry]) -> None:
    """A journal holding `entries`, written in one go (appending fsyncs every line)."""
    Journal.open(path, "fp").close()
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(entry.to_json() + "\n" for entry in entries))


def _superseded_journal(tmp_path: Path) -> tuple[Path, list[Path]]:
    """300 recordings analysed 5 times each (the last time as they are now, some failing),
    and 20 whose two analyses both appended rows to a day file (those rows are in the file)."""
    recordings, entries = [], []
    for i in range(300):
        rec = tmp_path / "in" / f"rec_{i:03d}.wav"
        rec.parent.mkdir(exist_ok=True)
        rec.write_bytes(bytes(i % 7 + 1))
        recordings.append(rec)
    for round_ in range(5):
        for i, rec in enumerate(recordings):
            entry = _entry(rec, "error" if round_ == 4 and i % 10 == 0 else "ok")
            stale = {"mtime_ns": entry.mtime_ns - 4 + round_} if round_ < 4 else {}
            entries.append(Entry(**{**entry.__dict__, **stale, "duration_s": round_}))
    length = 0
    for round_ in range(2):
        for i in range(20):
            length += 50
            entries.append(Entry(f"/w/2024050{1 + i % 2}_{i:02d}0000.WAV", 10, round_, "ok",
                                 outputs={f"detections/2024-05-0{1 + i % 2}.csv": length}))
    path = tmp_path / "j.jsonl"
    _write(path, entries)
    return path, recordings


def _kept_lines(raw: bytes) -> bytes:
    """The reference compaction: the header, each recording's last line, every line naming
    day files, in their order."""
    header, *lines = raw.splitlines(keepends=True)
    last = {json.loads(line)["file"]: n for n, line in enumerate(lines)}
    return header + b"".join(line for n, line in enumerate(lines)
                             if last[json.loads(line)["file"]] == n
                             or json.loads(line).get("outputs"))


def test_superseded_lines_are_compacted_and_every_answer_stays(tmp_path: Path) -> None:
    path, recordings = _superseded_journal(tmp_path)
    raw = path.read_bytes()
    assert raw.count(b"\n") == 1 + 1500 + 40
    with Journal.open(path, "fp", compact=False) as journal:
        before = _answers(journal, recordings)
    assert path.read_bytes() == raw
    with Journal.open(path, "fp") as journal:
        assert _answers(journal, recordings) == before
        extra = tmp_path / "in" / "new.wav"
        extra.write_bytes(b"new")
        journal.append(_entry(extra))
    compacted = path.read_bytes()
    assert compacted.startswith(_kept_lines(raw))
    assert compacted.count(b"\n") == 1 + 300 + 40 + 1
    assert compacted.splitlines()[0] == raw.splitlines()[0]  # the fingerprint stays
    with Journal.open(path, "fp") as journal:  # too few lines now: left as it is
        assert _answers(journal, recordings) == before | {
            "finished": before["finished"] | {str(extra): journal.finished[str(extra)][:3]},
            "entries": before["entries"] | {str(extra): _entry(extra)},
            "latest": sorted([*before["latest"], _entry(extra)], key=lambda e: e.file)}
    assert path.read_bytes() == compacted
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_journal_of_needed_lines_is_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    # each line appended rows to a day file: all are needed
    _write(path, [Entry("/w/a.wav", 1, i, "ok", outputs={"detections/d.csv": i})
                  for i in range(1200)])
    raw = path.read_bytes()
    with Journal.open(path, "fp") as journal:
        assert len(list(journal.with_output("detections/d.csv"))) == 1200
    assert path.read_bytes() == raw
    few = tmp_path / "few.jsonl"
    _write(few, [Entry("/w/b.wav", 1, i, "ok") for i in range(COMPACT_MIN_LINES - 1)])
    raw = few.read_bytes()
    Journal.open(few, "fp").close()
    assert few.read_bytes() == raw


def test_a_full_disk_leaves_the_journal_uncompacted_and_usable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import errno
    from contextlib import contextmanager

    import runtime.journal

    path, recordings = _superseded_journal(tmp_path)
    raw = path.read_bytes()
    with Journal.open(path, "fp", compact=False) as journal:
        before = _answers(journal, recordings)
    real = runtime.journal.atomic_stream

    @contextmanager
    def full(*args: object, **kwargs: object) -> Iterator[IO[Any]]:
        with real(*args, **kwargs) as handle:  # type: ignore[arg-type]
            handle.write(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
            yield handle

    monkeypatch.setattr(runtime.journal, "atomic_stream", full)
    with Journal.open(path, "fp") as journal:
        assert _answers(journal, recordings) == before
    assert path.read_bytes() == raw
    assert "j.jsonl: not compacted ([Errno 28] No space left on device)" in caplog.text
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


_KILL = {
    # SIGKILL-like exits (no cleanup) at three points of the rewrite
    "mid-write": "import json\nreal = json.loads\ncalls = [0]\n"
                 "def loads(raw, *a, **k):\n    calls[0] += 1\n"
                 "    if calls[0] > 1541 + 700:\n        os._exit(9)\n"
                 "    return real(raw, *a, **k)\njson.loads = loads\n",
    "before-rename": "os.replace = lambda *a: os._exit(9)\n",
    "after-rename": "real = os.replace\n"
                    "def replace(*a):\n    real(*a)\n    os._exit(9)\nos.replace = replace\n",
}


@pytest.mark.parametrize("point", list(_KILL))
def test_a_kill_during_compaction_leaves_the_old_or_the_new_journal(
        tmp_path: Path, point: str) -> None:
    path, recordings = _superseded_journal(tmp_path)
    raw = path.read_bytes()
    with Journal.open(path, "fp", compact=False) as journal:
        before = _answers(journal, recordings)
    code = ("import os, sys\n" + _KILL[point]
            + "from runtime.journal import Journal\nJournal.open(sys.argv[1], 'fp')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, check=False)
    assert proc.returncode == 9
    left = path.read_bytes()
    assert left == (_kept_lines(raw) if point == "after-rename" else raw)
    stale = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert bool(stale) == (point != "after-rename")  # the rewrite a kill left behind
    with Journal.open(path, "fp") as journal:
        assert _answers(journal, recordings) == before
    assert path.read_bytes() == _kept_lines(raw)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_analyze_rerun_over_a_compacted_journal_skips_finished_recordings(
        tmp_path: Path) -> None:
    from benchmarks.fixtures import BAND_HZ, RATE, make_bundle, tone
    from runtime.analyze import analyze

    bundle = make_bundle(tmp_path / "bundle")
    folder, out = tmp_path / "recordings", tmp_path / "out"
    folder.mkdir()
    for i in range(3):
        sf.write(folder / f"rec{i}.wav", tone(BAND_HZ[i], 2.0), RATE)
    assert analyze(bundle, [str(folder)], out=out, tasks=["species"], progress=False) == 0
    combined = {name: (out / name).read_bytes()
                for name in ("detections.csv", "detections.jsonl", "errors.csv")}
    header, *lines = (out / "journal.jsonl").read_bytes().splitlines(keepends=True)
    older = [json.dumps({**json.loads(line), "mtime_ns": 1, "detections": []}).encode() + b"\n"
             for line in lines]
    # each recording analysed 400 times before, when it was an older file
    (out / "journal.jsonl").write_bytes(header + b"".join(older) * 400 + b"".join(lines))
    assert analyze(bundle, [str(folder)], out=out, tasks=["species"], progress=False) == 0
    assert (out / "journal.jsonl").read_bytes() == header + b"".join(lines)  # nothing redone
    assert {name: (out / name).read_bytes() for name in combined} == combined


def test_watch_restart_over_a_compacted_journal_repairs_nothing_and_skips_finished(
        tmp_path: Path) -> None:
    from benchmarks.fixtures import BAND_HZ, RATE, make_bundle, tone
    from runtime.analyze import JOURNAL, make_settings
    from runtime.bundle import load_bundle
    from runtime.runners import open_runner
    from runtime.watch import Watcher

    bundle = load_bundle(make_bundle(tmp_path / "bundle"))
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(3):
        sf.write(inbox / f"2024050{1 + i}_000000.WAV", tone(BAND_HZ[i], 1.5), RATE)
    settings = make_settings(bundle.manifest, None, None, ["detection"], None, None, None,
                             None, None, True, 0.0, None, None)

    def start() -> Watcher:
        runner = open_runner(bundle, "cpu", threads=1).__enter__()
        journal = Journal.open(out / JOURNAL, settings.fingerprint(bundle, "model.onnx"))
        daemon = Watcher(bundle, settings, runner, journal, inbox, out, settle_s=0.0)
        daemon.start()
        return daemon

    first = start()
    assert first.round().recordings == 3
    first.journal.close()
    day_files = {p: p.read_bytes() for p in sorted((out / "detections").iterdir())}
    header, *lines = (out / JOURNAL).read_bytes().splitlines(keepends=True)
    # earlier analyses of the same names that appended nothing (say a run without day files)
    older = [json.dumps({k: v for k, v in json.loads(line).items() if k != "outputs"}
                        | {"mtime_ns": 1}).encode() + b"\n" for line in lines]
    (out / JOURNAL).write_bytes(header + b"".join(older) * 400 + b"".join(lines))
    again = start()  # compacts, then repairs the day files against the journal
    assert (out / JOURNAL).read_bytes() == header + b"".join(lines)
    assert again.files.bytes_written == 0
    assert again.round().recordings == 0  # the inbox's recordings are finished
    again.journal.close()
    assert {p: p.read_bytes() for p in day_files} == day_files
