"""`analyze` end to end: the real recording, a long soundscape, every bad input, options,
kill-and-resume, and a whole analysis in a subprocess that never imports torch."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from naturelm_edge.cli import parser_for
from runtime.analyze import analyze, decode_events
from runtime.audio import read_audio
from runtime.bundle import load_bundle
from runtime.postprocess import Thresholds, activate, select
from runtime.raven import read_raven_table
from runtime.runners import OrtRunner
from runtime.windows import WindowSpec, iter_windows
from tests.runtime.model_fixtures import BAND_HZ, LABELS, RATE, make_bundle, tone

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tones")


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _with_tones(seconds: float, calls: list[tuple[float, float, int]], rate: int = RATE,
                noise: float = 0.01, seed: int = 0) -> np.ndarray:
    audio = np.random.default_rng(seed).normal(0, noise, round(seconds * rate)).astype(np.float32)
    for start, end, band in calls:
        lo, hi = round(start * rate), round(end * rate)
        audio[lo:hi] += tone(BAND_HZ[band], (hi - lo) / rate, rate)
    return audio


def test_real_recording_end_to_end_matches_a_direct_computation(
        bundle_dir: Path, real_recording: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = analyze(bundle_dir, [str(real_recording)], out=out, batch_size=3, merge=False,
                   threshold=0.2, formats=["raven", "csv", "jsonl", "audacity"], progress=False)
    assert code == 0
    rows = _csv_rows(out / "detections.csv")
    # the reference: whole-file decode, windows, one batch, the same postprocessing
    bundle = load_bundle(bundle_dir)
    windows = list(iter_windows([read_audio(real_recording, RATE)], RATE, WindowSpec(1.0, 1.0)))
    assert len(windows) == 11  # 10.13 s
    with OrtRunner(bundle.root / "model.onnx") as runner:
        outputs = runner.infer({"audio": np.stack([w.samples for w in windows])})
    starts = np.array([w.start_s for w in windows])
    ends = np.array([w.end_s for w in windows])
    rules = Thresholds(defaults={"species": 0.5, "detection": 0.5}, global_=0.2)
    expected = []
    for task in bundle.manifest.tasks:
        expected += select(str(real_recording.absolute()), starts, ends, task.name,
                           task.labels, activate(outputs[task.output], task.activation), rules)
    key = sorted((d.file, f"{d.start_s:.3f}", d.task, d.label, f"{d.score:.4f}")
                 for d in expected)
    assert expected and sorted((r["file"], r["start_s"], r["task"], r["label"], r["score"])
                               for r in rows) == key
    table = read_raven_table(out / "birds_10s.wav.selections.txt")
    assert len(table) == len(rows)
    assert (out / "birds_10s.wav.labels.txt").is_file()
    assert len((out / "detections.jsonl").read_text().splitlines()) == len(rows)
    assert _csv_rows(out / "errors.csv") == []


def test_hour_long_soundscape_lines_up_with_ground_truth(bundle_dir: Path,
                                                         tmp_path: Path) -> None:
    """An hour at 16 kHz (115 MB of 16-bit WAV), written in pieces, analysed in a subprocess
    whose peak memory stays far below the 230 MB the decoded hour would take."""
    rng = np.random.default_rng(7)
    truth, t = [], 5.0
    while t < 3590:
        length = float(rng.uniform(1.5, 6.0))
        truth.append((round(t, 2), round(t + length, 2), int(rng.integers(0, len(LABELS)))))
        t += length + float(rng.uniform(8.0, 60.0))
    path = tmp_path / "soundscape.wav"
    with sf.SoundFile(path, "w", RATE, 1, "PCM_16") as handle:
        for minute in range(60):
            calls = [(max(s, minute * 60) - minute * 60, min(e, minute * 60 + 60) - minute * 60, b)
                     for s, e, b in truth if s < minute * 60 + 60 and e > minute * 60]
            handle.write(_with_tones(60.0, calls, seed=minute))
    out = tmp_path / "out"
    report = _run_in_subprocess(bundle_dir, [path], out, "batch_size=32, tasks=['detection']")
    assert report["code"] == 0 and report["torch"] is False
    assert report["peak_rss_mb"] < 200, report
    found = [(float(r["start_s"]), float(r["end_s"]), LABELS.index(r["label"]))
             for r in _csv_rows(out / "detections.csv")]
    assert len(found) == len(truth)
    for (start, end, band), (t_start, t_end, t_band) in zip(found, truth, strict=True):
        assert band == t_band
        assert abs(start - t_start) <= 1.0 and abs(end - t_end) <= 1.0
    print(f"\nhour-long soundscape: {len(truth)} calls, all found within one window; "
          f"{report['wall_s']:.1f} s wall ({3600 / report['wall_s']:.0f}x real time), "
          f"peak RSS {report['peak_rss_mb']:.0f} MB")


def _bad_and_good_inputs(folder: Path) -> tuple[dict[str, str], list[str]]:
    """Files that must fail (name -> expected words in the reason) and files that must be
    analysed (each holds a 2 kHz tone from 0.2 s to 0.8 s)."""
    def call(rate: int, seconds: float = 1.0) -> np.ndarray:
        audio = np.zeros(round(seconds * rate), np.float32)
        audio[round(0.2 * rate):round(0.8 * rate)] = tone(2000.0, 0.6, rate)[:round(0.8 * rate)
                                                                              - round(0.2 * rate)]
        return audio

    good = []
    for subtype in ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"):
        name = f"depth_{subtype}.wav"
        sf.write(folder / name, call(RATE), RATE, subtype)
        good.append(name)
    for channels in range(1, 9):
        name = f"channels_{channels}.wav"
        sf.write(folder / name, np.repeat(call(RATE)[:, None], channels, axis=1), RATE)
        good.append(name)
    for rate in (8000, 22050, 44100, 96000, 192000, 384000):
        name = f"rate_{rate}.flac" if rate <= 96000 else f"rate_{rate}.wav"
        sf.write(folder / name, call(rate), rate)
        good.append(name)
    sf.write(folder / "short 0.9 s.wav", call(RATE, 0.9), RATE)
    (folder / "sous dossier ü").mkdir()
    sf.write(folder / "sous dossier ü" / "kākāpō call.wav", call(RATE), RATE)
    good += ["short 0.9 s.wav", "sous dossier ü/kākāpō call.wav"]

    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("field notes, not audio\n")
    (folder / "corrupt.wav").write_bytes(b"RIFF" + os.urandom(2000))
    sf.write(folder / "whole.wav", call(RATE, 3.0), RATE, "PCM_16")
    data = (folder / "whole.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(data[: len(data) // 2])
    (folder / "whole.wav").unlink()
    for kind, value in (("nan", np.nan), ("inf", np.inf)):
        audio = call(RATE)
        audio[5000] = value
        sf.write(folder / f"{kind}.wav", audio, RATE, "FLOAT")
    bad = {"empty.wav": "empty", "notes.wav": "not a readable audio file",
           "corrupt.wav": "", "truncated.wav": "truncated", "nan.wav": "NaN sample",
           "inf.wav": "Inf sample"}
    return bad, good


def test_decoder_batches_across_recordings_and_takes_back_a_failing_ones_windows(
        bundle_dir: Path, tmp_path: Path) -> None:
    first, bad, last = tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.wav"
    sf.write(first, _with_tones(2.5, [(0.0, 2.5, 1)], seed=1), RATE)
    broken = _with_tones(4.0, [(0.0, 4.0, 1)], seed=2)
    broken[round(2.5 * RATE)] = np.nan  # two windows are cut, then decoding fails
    sf.write(bad, broken, RATE, subtype="FLOAT")
    sf.write(last, _with_tones(1.0, [(0.0, 1.0, 1)], seed=3), RATE)
    spec = WindowSpec(1.0, 1.0, last="pad")
    events = list(decode_events(enumerate([first, bad, last]), RATE, spec, None, 0.3,
                                batch_size=2))
    kinds = [(kind, index) for kind, index, _ in events]
    assert kinds == [("batch", -1), ("end", 0), ("batch", -1), ("error", 1), ("end", 2),
                     ("batch", -1)]
    assert events[1][2] == (2.5, 3) and events[4][2] == (1.0, 1)
    assert "NaN sample at 2.500 s" in events[3][2]
    batches = [payload for kind, _, payload in events if kind == "batch"]
    owners = np.concatenate([b.owners for b in batches]).tolist()
    # b.wav's first window went out with a.wav's last; its second was taken back
    assert owners == [0, 0, 0, 1, 2] and [len(b.owners) for b in batches] == [2, 2, 1]
    for index, path in ((0, first), (2, last)):
        want = [w.samples for w in iter_windows([read_audio(path, RATE)], RATE, spec)]
        got = [b.audio[i] for b in batches for i in np.flatnonzero(b.owners == index)]
        assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(
            got, want, strict=True))
    assert np.concatenate([b.end_s for b in batches]).tolist() == [1.0, 2.0, 2.5, 1.0, 1.0]
    # the model loop discards the failed recording's window that went out in a batch
    out = tmp_path / "out"
    assert analyze(bundle_dir, [str(first), str(bad), str(last)], out=out, batch_size=2,
                   block_s=0.3, tasks=["detection"], merge=False, progress=False) == 1
    found = [(Path(r["file"]).name, r["label"]) for r in _csv_rows(out / "detections.csv")]
    assert found == [("a.wav", "B")] * 3 + [("c.wav", "B")]
    assert [Path(r["file"]).name for r in _csv_rows(out / "errors.csv")] == ["b.wav"]


def test_parallel_decoders_give_the_same_outputs(bundle_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(7):
        calls = [(float(s), float(s) + 1.5, (i + s) % 4) for s in range(0, 9, 3)]
        sf.write(folder / f"rec {i}.wav", _with_tones(9.5 + i, calls, seed=i), RATE)
    broken = _with_tones(6.0, [], seed=9)
    broken[3 * RATE] = np.inf
    sf.write(folder / "rec 3b.wav", broken, RATE, subtype="FLOAT")
    outs = {}
    for decoders in (1, 3):
        outs[decoders] = out = tmp_path / f"out{decoders}"
        assert analyze(bundle_dir, [str(folder)], out=out, batch_size=3, block_s=0.7,
                       decoders=decoders, progress=False) == 1
    for name in ("detections.csv", "detections.jsonl", "errors.csv", "rec 5.wav.selections.txt"):
        assert (outs[3] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert "Inf sample at 3.000 s" in (outs[3] / "errors.csv").read_text()
    assert len(_csv_rows(outs[1] / "detections.csv")) >= 7 * 3
    with pytest.raises(SystemExit):
        parser_for(analyze, "naturelm-edge analyze").parse_args([str(bundle_dir), "x.wav", "--decoders", "two"])
    assert analyze(bundle_dir, [str(folder)], out=tmp_path / "o", decoders=0,
                   progress=False) == 2


def test_a_rerun_with_nothing_left_to_do_loads_no_model(
        bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, _with_tones(2.0, [(0.0, 1.0, 1)]), RATE)
    assert analyze(bundle_dir, [str(path)], out=tmp_path / "out", progress=False) == 0
    assert "model loaded in" in capsys.readouterr().out
    assert analyze(bundle_dir, [str(path)], out=tmp_path / "out", progress=False) == 0
    summary = capsys.readouterr().out
    assert "1 already in the journal" in summary and "model not loaded" in summary


def test_every_bad_input_is_listed_and_the_run_goes_on(bundle_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in put"
    folder.mkdir()
    bad, good = _bad_and_good_inputs(folder)
    out = tmp_path / "out"
    code = analyze(bundle_dir, [str(folder), str(tmp_path / "missing.wav")], out=out,
                   tasks=["detection"], progress=False)
    assert code == 1
    errors = {Path(r["file"]).name: r["reason"] for r in _csv_rows(out / "errors.csv")}
    assert set(errors) == {*bad, "missing.wav"}
    for name, words in bad.items():
        assert words in errors[name], (name, errors[name])
    rows = _csv_rows(out / "detections.csv")
    by_file = {str((folder / name).absolute()): name for name in good}
    hits = {by_file[r["file"]]: r for r in rows}
    assert set(hits) == set(good), set(good) - set(hits)
    for name, row in hits.items():
        assert row["label"] == "B" and float(row["start_s"]) == 0.0, (name, row)
    assert float(hits["short 0.9 s.wav"]["end_s"]) == pytest.approx(0.9)
    assert (out / "sous dossier ü" / "kākāpō call.wav.selections.txt").is_file()
    assert not (out / "nan.wav.selections.txt").exists()


def test_options_thresholds_lists_top_k_and_hop(bundle_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "two.wav"
    sf.write(path, _with_tones(6.0, [(1.0, 3.0, 0), (1.0, 3.0, 1), (4.0, 5.0, 3)]), RATE)
    (tmp_path / "keep.txt").write_text("A\nD  # owl\n")
    (tmp_path / "th.csv").write_text("task,label,threshold\ndetection,D,0.999\n")

    def run(name: str, **options: object) -> list[tuple[str, float, float, str]]:
        assert analyze(bundle_dir, [str(path)], out=tmp_path / name, progress=False,
                       **options) == 0  # type: ignore[arg-type]
        return sorted((r["task"], float(r["start_s"]), float(r["end_s"]), r["label"])
                      for r in _csv_rows(tmp_path / name / "detections.csv"))

    assert run("all", tasks=["detection"]) == [
        ("detection", 1.0, 3.0, "A"), ("detection", 1.0, 3.0, "B"), ("detection", 4.0, 5.0, "D")]
    assert run("unmerged", tasks=["detection"], merge=False)[:2] == [
        ("detection", 1.0, 2.0, "A"), ("detection", 1.0, 2.0, "B")]
    assert [r[3] for r in run("kept", tasks=["detection"], include=[str(tmp_path / "keep.txt")])
            ] == ["A", "D"]
    assert [r[3] for r in run("excl", tasks=["detection"], exclude=["A", "D"])] == ["B"]
    assert [r[3] for r in run("th", tasks=["detection"],
                              thresholds_file=tmp_path / "th.csv")] == ["A", "B"]
    assert len(run("top1", tasks=["species"], top_k=1, merge=False, threshold=0.0)) == 6
    hop = run("hop", tasks=["detection"], merge=False, overlap_s=0.5, include=["D"])
    assert [(s, e) for _, s, e, _ in hop] == [(3.5, 4.5), (4.0, 5.0), (4.5, 5.5)]
    assert analyze(bundle_dir, [str(path)], out=tmp_path / "bad", include=["Kaa"],
                   progress=False) == 2
    # a rerun with other settings into the same folder is refused, not mixed
    assert analyze(bundle_dir, [str(path)], out=tmp_path / "all", progress=False) == 2


def test_cli_parses_the_signature(bundle_dir: Path) -> None:
    args = parser_for(analyze, "naturelm-edge analyze").parse_args(
        [str(bundle_dir), "a.wav", "dir/", "--formats", "csv", "audacity", "--no-merge",
         "--include", "A", "B", "--backend", "cuda", "--threshold", "0.3", "--top-k", "2"])
    assert args.paths == ["a.wav", "dir/"] and args.formats == ["csv", "audacity"]
    assert args.merge is False and args.include == ["A", "B"] and args.threshold == 0.3
    assert args.backend == "cuda" and args.top_k == 2 and args.resume is True


def _analyze_script(bundle_dir: Path, paths: list[Path], out: Path, options: str) -> str:
    return textwrap.dedent(f"""
        import json, sys, time
        t0 = time.perf_counter()
        from runtime.analyze import analyze, decode_events
        import_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        code = analyze({str(bundle_dir)!r}, {[str(p) for p in paths]!r}, out=__import__(
            'pathlib').Path({str(out)!r}), progress=False, {options})
        wall = time.perf_counter() - t1
        bad = sorted(m for m in sys.modules if m.split('.')[0] in (
            'torch', 'lightning', 'transformers', 'peft', 'onnx', 'corpus', 'teacher',
            'distill', 'export', 'benchmarks'))
        # VmHWM is this process's own peak (ru_maxrss keeps the parent's across fork + exec)
        with open('/proc/self/status') as status:
            rss = [int(line.split()[1]) / 1024 for line in status if line.startswith('VmHWM')][0]
        print(json.dumps({{"code": code, "torch": 'torch' in sys.modules, "bad": bad,
                          "import_s": import_s, "wall_s": wall, "peak_rss_mb": rss}}))
    """)


def _run_in_subprocess(bundle_dir: Path, paths: list[Path], out: Path,
                       options: str = "") -> dict:
    script = _analyze_script(bundle_dir, paths, out, options)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["summary"] = done.stdout
    return report


def test_whole_analysis_in_a_subprocess_imports_no_workstation_package(
        bundle_dir: Path, real_recording: Path, tmp_path: Path) -> None:
    report = _run_in_subprocess(bundle_dir, [real_recording], tmp_path / "out", "threads=1")
    assert report["code"] == 0
    assert report["bad"] == [] and report["torch"] is False
    load_ms = report["summary"].split("model loaded in ")[1].split(" ms")[0]
    print(f"\nruntime import {report['import_s'] * 1000:.0f} ms, model load {load_ms} ms, "
          f"10 s recording analysed in {report['wall_s'] * 1000:.0f} ms")


def _kill_midway(bundle_dir: Path, folder: Path, out: Path, after_entries: int) -> bool:
    """Start analyze in a subprocess and SIGKILL it once the journal holds `after_entries`
    recordings; True if it was killed before finishing."""
    script = _analyze_script(bundle_dir, [folder], out, "batch_size=2, threads=1")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "journal.jsonl"
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if journal.exists() and journal.read_bytes().count(b"\n") > after_entries:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.wait(timeout=30)
    return proc.returncode == -signal.SIGKILL


def test_sigkill_midway_then_rerun_gives_no_duplicate_missing_or_torn_output(
        bundle_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "recordings"
    folder.mkdir()
    for i in range(16):
        calls = [(float(s), float(s) + 2.0, (i + s) % 4) for s in range(1, 28, 6)]
        sf.write(folder / f"rec {i:02d}.wav", _with_tones(30.0, calls, seed=i), RATE)
    (folder / "broken.wav").write_bytes(b"RIFF" + bytes(100))
    reference = tmp_path / "reference"
    assert analyze(bundle_dir, [str(folder)], out=reference, progress=False) == 1

    out = tmp_path / "out"
    kills = [_kill_midway(bundle_dir, folder, out, n) for n in (3, 9)]
    assert any(kills), "analyze finished before it could be killed"
    killed_with = (out / "journal.jsonl").read_text().count("\n") - 1
    print(f"\nkilled: {kills}; journal then held {killed_with} of 17 recordings")
    assert analyze(bundle_dir, [str(folder)], out=out, progress=False) == 1

    assert (out / "detections.csv").read_bytes() == (reference / "detections.csv").read_bytes()
    assert (out / "detections.jsonl").read_bytes() == (reference / "detections.jsonl").read_bytes()
    assert (out / "errors.csv").read_bytes() == (reference / "errors.csv").read_bytes()
    tables = sorted(p.name for p in out.glob("*.selections.txt"))
    assert tables == sorted(p.name for p in reference.glob("*.selections.txt"))
    assert len(tables) == 16
    for name in tables:
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    entries = (out / "journal.jsonl").read_text().splitlines()[1:]
    assert len({json.loads(e)["file"] for e in entries}) == 17
    assert not list(out.rglob("*.tmp"))


def test_paths_expand_files_folders_and_globs(tmp_path: Path) -> None:
    from runtime.analyze import expand_paths

    for rel in ("a/x.wav", "a/b/y.FLAC", "a/notes.txt", "c/z.mp3", "c/.hidden.wav"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found, missing = expand_paths([str(tmp_path / "a"), str(tmp_path / "c" / "*.mp3"),
                                   str(tmp_path / "a" / "notes.txt"), str(tmp_path / "a/x.wav"),
                                   str(tmp_path / "*.ogg"), str(tmp_path / "gone.wav")])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a/b/y.FLAC", "a/notes.txt", "a/x.wav", "c/z.mp3"]
    assert [(p.name, why) for p, why in missing] == [
        ("*.ogg", "the pattern matches no file"), ("gone.wav", "no such file or folder")]


def test_archive_bundle_gives_the_same_detections_and_leaves_no_scratch(
        bundle_dir: Path, real_recording: Path, tmp_path: Path) -> None:
    import tempfile

    from runtime.bundle import bundle_tar

    archive = bundle_tar(bundle_dir, tmp_path / "tones.tar.gz")
    before = set(Path(tempfile.gettempdir()).glob("naturelm-bundle-*"))
    for name, source in (("folder", bundle_dir), ("archive", archive)):
        assert analyze(source, [str(real_recording)], out=tmp_path / name, threshold=0.2,
                       progress=False) == 0
    assert (tmp_path / "folder" / "detections.csv").read_bytes() == (
        tmp_path / "archive" / "detections.csv").read_bytes()
    assert set(Path(tempfile.gettempdir()).glob("naturelm-bundle-*")) == before
