"""`bench latency` on a tiny real bundle (the tone model, FP32 and a dynamically quantized INT8
copy) through the CLI's parser: rows for every part, precision and batch, ratios computed from
those rows, the front/body split reproducing the whole model, bad input, and the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import cli
from benchmarks.latency import Settings, audio_batch, run_latency, speedups, split_at_frontend
from naturelm_edge.cli import parser_for
from runtime.bundle import ModelSpec, load_bundle, write_bundle_manifest
from tests.runtime.model_fixtures import make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tone bundle with a real INT8 variant (onnxruntime dynamic quantization)."""
    import dataclasses

    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = make_bundle(tmp_path_factory.mktemp("b") / "tones")
    quantize_dynamic(str(folder / "model.onnx"), str(folder / "model.int8.onnx"),
                     weight_type=QuantType.QInt8)
    manifest = load_bundle(folder).manifest
    models = (*manifest.models, ModelSpec("model.int8.onnx", "int8", "conv", ("cpu",)))
    write_bundle_manifest(folder, dataclasses.replace(manifest, models=models))
    return folder


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    parsed = parser_for(cli.latency, "naturelm-edge bench latency").parse_args(args)
    code = cli.latency(**vars(parsed))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else {}), captured.err


def test_latency_through_the_cli(bundle: Path, tmp_path: Path, real_recording: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, result, _ = _run([str(bundle), "--batch-sizes", "1", "3", "--repeats", "3",
                            "--warmup", "1", "--recording", str(real_recording),
                            "--results-dir", str(tmp_path)], capsys)
    assert code == 0
    rows = result["rows"]
    got = {(r["part"], r["precision"], r["batch"]) for r in rows}
    assert got == {(p, q, b) for p in ("model", "front", "body") for q in ("fp32", "int8")
                   for b in (1, 3)}
    for r in rows:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["n"] == 3
        assert r["windows_per_s"] == pytest.approx(r["batch"] * 1000 / r["mean_ms"])
        assert r["x_real_time"] == pytest.approx(r["windows_per_s"] * 1.0)  # 1 s windows
        assert r["x_real_time_p50"] == pytest.approx(r["batch"] * 1000 / r["p50_ms"])
        assert (r["load_s"] is not None) == (r["batch"] == 1)
        assert r["peak_rss_mb"] > 10
    body = {(r["precision"], r["batch"]): r["mean_ms"] for r in rows if r["part"] == "body"}
    ratios = result["speedups"]["body_vs_fp32"]
    assert ratios["cpu/int8/conv/b3"] == pytest.approx(body[("fp32", 3)] / body[("int8", 3)])
    ctx = result["context"]
    assert ctx["threads"] == 1 and ctx["input"] == str(real_recording)
    stored = json.loads((tmp_path / f"{ctx['machine_id']}.json").read_text())
    assert stored["benchmarks"]["latency"]["result"]["rows"] == rows
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_front_and_body_reproduce_the_model(bundle: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    parts = split_at_frontend(bundle / "model.onnx", tmp_path)
    assert parts is not None
    front_path, body_path, feature = parts
    audio = audio_batch(4, 16000, 16000, seed=1)
    full = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"audio": audio})
    front = ort.InferenceSession(str(front_path)).run([feature], {"audio": audio})[0]
    body = ort.InferenceSession(str(body_path))
    assert [i.name for i in body.get_inputs()] == [feature]
    np.testing.assert_allclose(body.run(None, {feature: front}), full, rtol=1e-6, atol=1e-6)


def test_a_precision_the_bundle_lacks_is_named(bundle: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run([str(bundle), "--precisions", "fp16", "--batch-sizes", "1",
                         "--no-save"], capsys)
    assert code == 2 and "fp16" in err and "model.int8.onnx" in err


def test_a_missing_bundle_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run([str(tmp_path / "nope"), "--no-save"], capsys)
    assert code == 2 and "nope" in err
    code, _, err = _run([str(tmp_path / "nope"), "--backends", "gpu", "--no-save"], capsys)
    assert code == 2


def test_audio_batch_tiles_the_recording(real_recording: Path) -> None:
    from runtime.audio import read_audio

    audio = read_audio(real_recording, 16000)
    batch = audio_batch(3, audio.size // 2 + 1, 16000, real_recording)
    flat = batch.reshape(-1)
    np.testing.assert_array_equal(flat[: audio.size], audio)
    np.testing.assert_array_equal(flat[audio.size:], audio[: flat.size - audio.size])


def test_speedups_pair_rows_of_the_same_backend_variant_and_batch() -> None:
    def row(part: str, precision: str, batch: int, ms: float, xrt: float) -> dict:
        return {"part": part, "backend": "cpu", "precision": precision, "variant": "conv",
                "batch": batch, "mean_ms": ms, "x_real_time": xrt}

    rows = [row("body", "fp32", 1, 2.0, 0), row("body", "int8", 1, 1.0, 0),
            row("body", "int8", 8, 1.0, 0), row("model", "fp32", 1, 1.0, 500.0),
            row("teacher", "fp32", 1, 100.0, 5.0)]
    out = speedups(rows)
    assert out["body_vs_fp32"] == {"cpu/int8/conv/b1": 2.0}
    assert out["vs_teacher"] == {"cpu/fp32/conv/b1": 100.0}


@pytest.mark.slow
def test_teacher_in_the_same_report(bundle: Path, tmp_path: Path) -> None:
    import torch

    from teacher.lightning import TOKENIZER_KEY
    from teacher.tokenizer import tokenizer_to_json
    from tests.teacher.helpers import tiny_model, tiny_tokenizer

    model = tiny_model()
    ckpt = tmp_path / "teacher.ckpt"
    torch.save({"hyper_parameters": {"config": model.cfg.to_dict()},
                TOKENIZER_KEY: tokenizer_to_json(tiny_tokenizer()),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    result = run_latency(bundle, precisions=("fp32",), batch_sizes=(1,), split=False,
                         settings=Settings(threads=1, warmup=1, repeats=2), teacher=ckpt)
    teacher = [r for r in result["rows"] if r["part"] == "teacher"]
    student = [r for r in result["rows"] if r["part"] == "model"]
    assert len(teacher) == 1 and teacher[0]["load_s"] > 0
    assert teacher[0]["x_real_time"] == pytest.approx(model.cfg.clip_s * 1000
                                                      / teacher[0]["mean_ms"])
    assert result["speedups"]["vs_teacher"]["cpu/fp32/conv/b1"] == pytest.approx(
        student[0]["x_real_time"] / teacher[0]["x_real_time"])
