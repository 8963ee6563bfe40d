"""The watch daemon: files arriving while it runs, a file still being written, the move
policy, a bad file, SIGTERM, and a restart that repeats nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from runtime.watch import Inbox, apply_policy
from tests.runtime.model_fixtures import RATE, make_bundle, tone

REPO = Path(__file__).resolve().parents[2]


def _start(bundle: Path, inbox: Path, out: Path, done: Path, extra: str = "") -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from runtime.watch import watch
        sys.exit(watch(Path({str(bundle)!r}), Path({str(inbox)!r}), out=Path({str(out)!r}),
                       policy="move", done_dir=Path({str(done)!r}), settle_s=0.6, poll_s=0.05,
                       tasks=["detection"], log_file=Path({str(out / "watch.log")!r}), {extra}))
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)


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
    assert "stopped" in (out / "watch.log").read_text()

    lines_before = (out / "journal.jsonl").read_text().count("\n")
    again = _start(bundle, inbox, out, done, "stop_after_s=1.0")
    assert again.wait(timeout=30) == 0
    assert (out / "journal.jsonl").read_text().count("\n") == lines_before


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
