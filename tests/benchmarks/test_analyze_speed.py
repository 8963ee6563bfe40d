"""`bench analyze` on the tiny tone bundle through the CLI's parser: a row per length with the
windows the real `analyze` ran, ratios computed from those rows, goals judged from them, the
figures saved; bad input exits 2 naming the problem; the counter and the pure-model parts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.analyze_speed import (
    COLUMNS,
    CountingRunner,
    analyze_speed,
    goals,
    leading_windows,
    pure_model,
)
from benchmarks.decode_speed import write_long_file
from naturelm_edge.cli import parser_for
from runtime.audio import read_audio
from runtime.runners import OrtRunner
from runtime.windows import WindowSpec, iter_windows
from tests.runtime.model_fixtures import make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "tones")


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parsed = parser_for(analyze_speed, "naturelm-edge bench analyze").parse_args(args)
    code = analyze_speed(**vars(parsed))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_speed_through_the_cli(bundle: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run([str(bundle), "--minutes", "0.2", "0.5", "--batch-size", "5",
                           "--pure-s", "0.1", "--channels", "1", "--workdir",
                           str(tmp_path / "work"), "--results-dir", str(tmp_path / "res")],
                          capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert "| " + " | ".join(COLUMNS) + " |" in out
    rows = result["rows"]
    assert [r["minutes"] for r in rows] == [0.2, 0.5]
    for r in rows:
        # the tone bundle's windows are 1 s with a 1 s hop: one window per second of audio
        assert r["windows"] == math.ceil(r["minutes"] * 60 / 1.0)
        assert r["calls"] == math.ceil(r["windows"] / 5)  # the batch size reached analyze
        assert r["decode_windows"] == r["windows"]
        assert r["decode_windows_per_s"] == pytest.approx(r["windows"] / r["decode_s"])
        assert r["analyze_windows_per_s"] == pytest.approx(r["windows"] / r["analyze_s"])
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert r["ratio"] == pytest.approx(r["analyze_windows_per_s"]
                                           / r["pure_windows_per_s"])
        assert r["x_real_time"] == pytest.approx(r["audio_s"] / r["analyze_s"])
        assert 0 < r["model_busy"] < 1
        assert r["process_s"] > r["analyze_s"] > 0
        assert 10 < r["peak_rss_mb"] < 2000
    assert result["goals"] == goals(rows)
    ctx = result["context"]
    assert (ctx["threads"], ctx["batch_size"], ctx["model"]) == (1, 5, "model.onnx")
    assert ctx["input"] == {"format": "flac", "rate": 48000, "channels": 1, "seed": 0}
    stored = json.loads((tmp_path / "res" / f"{ctx['machine_id']}.json").read_text())
    assert stored["benchmarks"][f"analyze_{ctx['bundle']}_flac_48k_1ch"]["result"]["rows"] == rows
    assert list((tmp_path / "work").iterdir()) == []  # recordings and outputs removed


@pytest.mark.parametrize("args, named", [
    (["--minutes", "0"], "minutes"),
    (["--minutes", "1", "nan"], "minutes"),
    (["--minutes", "0.05", "--backend", "gpu"], "gpu"),
    (["--minutes", "0.05", "--precision", "fp16"], "fp16"),
    (["--minutes", "0.05", "--fmt", "aiff"], "aiff"),
])
def test_bad_options_exit_2_naming_the_problem(bundle: Path, args: list[str], named: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run([str(bundle), *args, "--pure-s", "0", "--no-save"], capsys)
    assert code == 2
    assert err.startswith("naturelm-edge bench analyze:") and named in err
    assert len(err.strip().splitlines()) == 1


def test_a_missing_bundle_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run([str(tmp_path / "nope"), "--minutes", "0.1", "--no-save"], capsys)
    assert code == 2 and "nope" in err and out == ""


def test_leading_windows_are_the_windows_analyze_cuts(tmp_path: Path) -> None:
    path = write_long_file(tmp_path / "a.flac", 0.1, 48000, 2, "flac", seed=3)
    got = leading_windows(path, 16000, 1.0, 0.5, 5)
    spec = WindowSpec(1.0, 0.5, "pad")
    want = [w.samples for w in iter_windows([read_audio(path, 16000)], 16000, spec)][:5]
    np.testing.assert_array_equal(got, np.stack(want))
    assert len(leading_windows(path, 16000, 1.0, 1.0, 100)) == 6  # all there are


def test_counting_runner_counts_and_forwards(bundle: Path) -> None:
    audio = np.random.default_rng(0).standard_normal((3, 16000)).astype(np.float32)
    with OrtRunner(bundle / "model.onnx", threads=1) as plain:
        want = plain.infer({"audio": audio})
    counted = CountingRunner(OrtRunner(bundle / "model.onnx", threads=1))
    with counted as runner:
        out = runner.infer({"audio": audio})
        runner.infer({"audio": audio[:2]})
    assert counted.model == bundle / "model.onnx"
    assert (counted.windows, counted.calls) == (5, 2) and counted.infer_s > 0
    for name, value in want.items():
        np.testing.assert_array_equal(out[name], value)


def test_pure_model_runs_full_batches_of_the_windows() -> None:
    seen: list[np.ndarray] = []

    def infer(feeds: dict[str, np.ndarray]) -> None:
        seen.append(feeds["audio"])

    windows = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    count, seconds = pure_model(infer, windows, batch_size=3, min_time_s=0.0, warmup=1,
                                repeats=4)
    assert (count, len(seen)) == (12, 5) and seconds >= 0
    assert all(b.shape == (3, 4) for b in seen)
    assert sorted({float(v) for b in seen for v in b[:, 0]}) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_the_ratio_goal_is_judged_on_the_hour_long_files() -> None:
    def row(minutes: float, ratio: float) -> dict[str, float]:
        return {"minutes": minutes, "ratio": ratio, "peak_rss_mb": 150.0}

    hour = goals([row(10, 0.5), row(60, 0.85), row(120, 0.79)])
    assert hour["judged_minutes"] == [60, 120] and hour["min_ratio"] == 0.79
    assert not hour["ratio_met"]
    assert goals([row(10, 0.5), row(60, 0.85)])["ratio_met"]
    short = goals([row(5, 0.9), row(1, 0.2)])  # no hour-long file: the longest is judged
    assert short["judged_minutes"] == [5] and short["ratio_met"]
