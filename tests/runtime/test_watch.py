"""The watch daemon: files arriving while it runs, a file still being written, the move
policy, a bad file, SIGTERM, and a restart that repeats nothing."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from runtime.analyze import JOURNAL, make_settings
from runtime.bundle import bundle_tar, load_bundle
from runtime.journal import Entry, Journal
from runtime.runners import open_runner
from runtime.watch import Inbox, Watcher, apply_policy, recording_day
from runtime.writers import CSV_HEADER
from tests.runtime.model_fixtures import BAND_HZ, RATE, make_bundle, tone

REPO = Path(__file__).resolve().parents[2]


def _start(bundle: Path, inbox: Path, out: Path, done: Path, extra: str = "",
           env: dict[str, str] | None = None) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from runtime.watch import watch
        def run(policy_="move", settle_s=0.6, **extra):
            return watch(Path({str(bundle)!r}), Path({str(inbox)!r}), out=Path({str(out)!r}),
                         policy=policy_, done_dir=Path({str(done)!r}), settle_s=settle_s,
                         poll_s=0.05, tasks=["detection"], threads=1,
                         log_file=Path({str(out / "watch.log")!r}), **extra)
        sys.exit(run({extra}))
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE,
                            text=True, env=env)


def _journal(out: Path) -> dict[str, dict]:
    path = out / "journal.jsonl"
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")[1:-1]
    return {Path(e["file"]).name: e for e in map(json.loads, lines)}


def _wait_for(out: Path, names: set[str], proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not names <= set(_journal(out)):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"watch did not finish {names - set(_journal(out))}"
        time.sleep(0.05)


def test_daemon_analyses_arrivals_waits_for_growing_files_and_stops_on_sigterm(
        tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    inbox, out, done = tmp_path / "inbox", tmp_path / "out", tmp_path / "analysed"
    (inbox / "site 2").mkdir(parents=True)
    sf.write(inbox / "early.wav", tone(1000.0, 2.0), RATE)
    proc = _start(bundle, inbox, out, done)
    try:
        _wait_for(out, {"early.wav"}, proc)
        # a recorder writing a file in pieces, pausing for less than settle_s between them
        with sf.SoundFile(inbox / "site 2" / "growing.wav", "w", RATE, 1, "FLOAT") as handle:
            for _ in range(4):
                handle.write(tone(3000.0, 1.0))
                handle.flush()
                time.sleep(0.25)
        (inbox / "broken.wav").write_bytes(b"RIFF" + bytes(64))
        _wait_for(out, {"growing.wav", "broken.wav"}, proc)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    entries = _journal(out)
    assert entries["growing.wav"]["duration_s"] == 4.0  # analysed only once complete
    assert [d["label"] for d in entries["growing.wav"]["detections"]] == ["C"]
    assert [d["label"] for d in entries["early.wav"]["detections"]] == ["A"]
    assert entries["broken.wav"]["status"] == "error"
    assert (done / "early.wav").is_file() and (done / "site 2" / "growing.wav").is_file()
    assert not (inbox / "early.wav").exists() and (inbox / "broken.wav").exists()
    assert (out / "site 2" / "growing.wav.selections.txt").is_file()
    assert "broken.wav" in (out / "errors.csv").read_text()
    day = dt.datetime.now(dt.timezone.utc).date().isoformat()  # no stamp in these names
    assert (out / "errors.csv").resolve() == out / "errors" / f"{day}.csv"
    rows = (out / "detections.csv").read_text().splitlines()
    assert rows[0] == "file,start_s,end_s,task,label,score" and len(rows) == 3
    assert "stopped" in (out / "watch.log").read_text()

    lines_before = (out / "journal.jsonl").read_text().count("\n")
    again = _start(bundle, inbox, out, done, "stop_after_s=1.0")
    assert again.wait(timeout=30) == 0
    assert (out / "journal.jsonl").read_text().count("\n") == lines_before


def test_an_archive_bundle_is_unpacked_for_the_daemon_and_removed_when_it_stops(
        tmp_path: Path) -> None:
    archive = bundle_tar(make_bundle(tmp_path / "bundle"))
    inbox, out, scratch = tmp_path / "inbox", tmp_path / "out", tmp_path / "tmp"
    inbox.mkdir()
    scratch.mkdir()
    sf.write(inbox / "a.wav", tone(1000.0, 2.0), RATE)
    proc = _start(archive, inbox, out, tmp_path / "done", "settle_s=0.0, stop_after_s=1.0",
                  env={**os.environ, "TMPDIR": str(scratch)})
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    assert _journal(out)["a.wav"]["status"] == "ok"
    # months of restarts must not fill /tmp with unpacked bundles
    assert list(scratch.glob("naturelm-bundle-*")) == []


def test_inbox_waits_for_settled_files_and_policies(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path, settle_s=5.0)
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(100, np.float32), RATE)
    assert inbox.scan() == [path.absolute()]
    assert inbox.ready([path], now=100.0) == []
    assert inbox.ready([path], now=104.0) == []
    assert inbox.ready([path], now=105.0) == [path]
    sf.write(path, np.zeros(200, np.float32), RATE)  # it grew: wait again
    assert inbox.ready([path], now=106.0) == []
    assert inbox.ready([path], now=111.0) == [path]
    apply_policy(path, "move", tmp_path, tmp_path / "done")
    assert (tmp_path / "done" / "a.wav").is_file() and not path.exists()
    apply_policy(tmp_path / "done" / "a.wav", "delete", tmp_path, None)
    assert not (tmp_path / "done" / "a.wav").exists()


# -- months unattended: per-day files, bounded rounds, crash repair


def test_recording_day_from_recorder_stamps_else_the_utc_analysis_day() -> None:
    noon = dt.datetime(2024, 7, 9, 12, 0, tzinfo=dt.timezone.utc)
    for name, day in (("20240501_053000.WAV", "2024-05-01"),
                      ("SMA01234_20231231_235959.wav", "2023-12-31"),
                      ("site 3 2024-02-29T05-30-00.flac", "2024-02-29"),
                      ("2024-03-01 05:30:00.wav", "2024-03-01"),
                      ("dawn chorus.wav", "2024-07-09"),
                      ("serial_20241399_123456.wav", "2024-07-09"),  # month 13: no date
                      ("x120240501_053000.wav", "2024-07-09")):  # digits run on: no stamp
        assert recording_day(Path("/in") / name, lambda: noon) == day, name


def _watcher(bundle: Path, inbox: Path, out: Path, **options: object) -> Watcher:
    loaded = load_bundle(bundle)
    settings = make_settings(loaded.manifest, None, None, ["detection"], None, None, None,
                             None, None, True, 0.0, None, None)
    runner = open_runner(loaded, "cpu", threads=1).__enter__()
    journal = Journal.open(out / JOURNAL, settings.fingerprint(loaded, "model.onnx"))
    daemon = Watcher(loaded, settings, runner, journal, inbox, out, settle_s=0.0,
                     **options)  # type: ignore[arg-type]
    daemon.start()
    return daemon


def _record(inbox: Path, name: str, band: int) -> None:
    sf.write(inbox / name, np.concatenate([tone(BAND_HZ[band], 1.0), np.zeros(RATE // 2)]),
             RATE, subtype="PCM_16")


def _day_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for folder in ("detections", "errors") if (out / folder).is_dir()
            for p in sorted((out / folder).iterdir())}


def _prefill(out: Path, fingerprint_from: Path, entries: int, days: int) -> None:
    """A journal of `entries` recordings (no detections) spread over `days` earlier days,
    with the day files they name, as a unit that ran for months would have."""
    header = (out / JOURNAL).read_bytes() if (out / JOURNAL).exists() else \
        fingerprint_from.read_bytes()
    per_day = entries // days
    lines = []
    for i in range(entries):
        day = f"2023-{1 + i // per_day // 28 % 12:02d}-{1 + i // per_day % 28:02d}"
        lines.append(Entry(f"/gone/{day}/rec_{i:06d}.wav", 1000, i, "ok", 60.0, outputs={
            f"detections/{day}.csv": len(CSV_HEADER), f"detections/{day}.jsonl": 0}).to_json())
        if i % per_day == 0:
            (out / "detections").mkdir(parents=True, exist_ok=True)
            (out / "detections" / f"{day}.csv").write_text(CSV_HEADER)
            (out / "detections" / f"{day}.jsonl").write_text("")
    (out / JOURNAL).write_bytes(header + ("\n".join(lines) + "\n").encode())


def test_a_long_deployment_keeps_each_round_to_its_own_rows(tmp_path: Path) -> None:
    """100k recordings already in the journal (100 earlier days): a round appends exactly the
    new rows, rewrites no earlier file, and memory holds keys, not history."""
    bundle = make_bundle(tmp_path / "bundle")
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    _watcher(bundle, inbox, out).journal.close()  # writes the journal header
    _prefill(out, out / JOURNAL, 100_000, 100)
    old = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (out / "detections").iterdir()}
    daemon = _watcher(bundle, inbox, out)
    assert len(daemon.journal.finished) == 100_000 and len(old) == 200
    assert daemon.files.bytes_written == 0  # nothing to repair
    for round_ in range(3):
        for i in range(4):
            _record(inbox, f"2024050{1 + round_}_0{i}0000.WAV", i)
        before = _day_files(out)
        stats = daemon.round()
        after = _day_files(out)
        grown = {rel: after[rel][len(before.get(rel, b"")):] for rel in after
                 if after[rel] != before.get(rel)}
        assert set(grown) == {f"detections/2024-05-0{1 + round_}.{k}" for k in ("csv", "jsonl")}
        for rel, data in before.items():
            assert after[rel].startswith(data), rel  # appended to, never rewritten
        new_rows = sum(len(tail) for tail in grown.values()) - len(CSV_HEADER.encode())
        assert (stats.recordings, stats.ok, stats.detections) == (4, 4, 4)
        assert stats.bytes_written == new_rows + len(CSV_HEADER.encode())
        assert len(grown[f"detections/2024-05-0{1 + round_}.jsonl"].splitlines()) == 4
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in old} == old
    assert len(daemon.journal.finished) == 100_012
    assert (out / "detections.csv").resolve() == (out / "detections" / "2024-05-03.csv")
    rows = (out / "detections.csv").read_text().splitlines()
    assert [r.split(",")[4] for r in rows[1:]] == ["A", "B", "C", "D"]
    daemon.journal.close()


def test_restart_cuts_removes_and_rebuilds_day_files_to_match_the_journal(
        tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    inbox, out, reference = tmp_path / "inbox", tmp_path / "out", tmp_path / "reference"
    inbox.mkdir()
    for i, name in enumerate(("20240501_010000.wav", "20240501_020000.wav",
                              "20240502_010000.wav", "undated.wav")):
        _record(inbox, name, i)
    (inbox / "20240502_020000.wav").write_bytes(b"RIFF" + bytes(64))
    noon = lambda: dt.datetime(2024, 6, 1, 12, tzinfo=dt.timezone.utc)  # noqa: E731
    clean = _watcher(bundle, inbox, reference, now=noon)
    assert clean.round().recordings == 5
    clean.journal.close()
    want = _day_files(reference)
    assert set(want) == {"detections/2024-05-01.csv", "detections/2024-05-01.jsonl",
                         "detections/2024-05-02.csv", "detections/2024-05-02.jsonl",
                         "detections/2024-06-01.csv", "detections/2024-06-01.jsonl",
                         "errors/2024-05-02.csv"}
    assert "20240502_020000.wav" in (reference / "errors.csv").read_text()

    # a unit killed in the middle of its round: two recordings journalled, the third's rows
    # appended to its day file (and a row torn) but no journal line, a day file of a
    # recording not yet begun, and a day file the card lost
    daemon = _watcher(bundle, inbox, out, queue_size=2, now=noon)
    daemon.round()
    daemon.journal.close()
    csv1 = out / "detections" / "2024-05-01.csv"
    csv1.write_bytes(csv1.read_bytes() * 2 + b"/in/20240502_0")
    (out / "detections" / "2024-05-02.csv").write_bytes(want["detections/2024-05-02.csv"])
    (out / "detections" / "2024-05-01.jsonl").unlink()
    with (out / JOURNAL).open("ab") as handle:
        handle.write(b'{"file":"/in/2024')  # torn journal line
    restarted = _watcher(bundle, inbox, out, now=noon)
    assert restarted.files.bytes_written == len(want["detections/2024-05-01.jsonl"])
    assert restarted.round().recordings == 3
    restarted.journal.close()
    assert _day_files(out) == want
    entries = (out / JOURNAL).read_text().splitlines()[1:]
    assert len({json.loads(e)["file"] for e in entries}) == len(entries) == 5


def test_sigkill_mid_round_then_restart_gives_the_clean_day_files(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(24):
        _record(inbox, f"202405{1 + i // 8:02d}_{i % 8:02d}0000.wav", i % 4)
    reference, out = tmp_path / "reference", tmp_path / "out"
    daemon = _watcher(bundle, inbox, reference)
    assert daemon.round().recordings == 24
    daemon.journal.close()
    proc = _start(bundle, inbox, out, tmp_path / "done", "queue_size=64, policy_='leave'")
    try:
        _wait_for(out, {"20240501_030000.wav"}, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=20)
    done_then = len(_journal(out))
    again = _start(bundle, inbox, out, tmp_path / "done", "stop_after_s=1.0, policy_='leave'")
    assert again.wait(timeout=60) == 0
    print(f"\nkilled with {done_then} of 24 recordings in the journal")
    assert _day_files(out) == _day_files(reference)
    assert len(_journal(out)) == 24 and not list(out.rglob("*.tmp"))
