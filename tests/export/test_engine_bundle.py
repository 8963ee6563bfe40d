"""Engine options, flags and profile (no TensorRT needed), bundles, compare, and a real
TensorRT build where TensorRT and a GPU exist."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from export.bundle import read_report, write_bundle
from export.cli import INT8_CPU, bundle, compare
from export.engine import EngineOptions, builder_flags, engine_sidecar, onnx_for, profile_shapes
from runtime.bundle import load_bundle, verify_bundle
from runtime.errors import InputError
from runtime.trt_runner import DeviceInfo, engine_file_name, engine_problems
from tests.export.conftest import SPECIES

SPEC = {"samples": 16000, "min_batch": 1, "opt_batch": 8, "max_batch": 64, "input_name": "audio"}


def cpu_int8_kept(export_dir: Path) -> bool:
    """Whether the fixture's `export quantize` kept the CPU INT8 variant (in mode auto that
    depends on this CPU's speed, so tests expect either)."""
    decision = read_report(export_dir)["int8_cpu"]
    assert (export_dir / INT8_CPU).is_file() == decision["kept"]
    return bool(decision["kept"])


def test_builder_flags_follow_precision_and_dla() -> None:
    assert builder_flags(EngineOptions("fp32")) == []
    assert builder_flags(EngineOptions("fp16")) == ["FP16"]
    assert builder_flags(EngineOptions("int8")) == ["FP16", "INT8"]
    assert builder_flags(EngineOptions("fp16", dla_core=1)) == ["FP16", "GPU_FALLBACK"]
    with pytest.raises(ValueError, match="unknown engine precision 'fp8'"):
        EngineOptions("fp8")
    with pytest.raises(ValueError, match="DLA runs FP16 or INT8 only"):
        EngineOptions("fp32", dla_core=0)
    with pytest.raises(ValueError, match="workspace_mb must be positive"):
        EngineOptions(workspace_mb=0)


def test_profile_comes_from_the_spec_with_overrides() -> None:
    assert profile_shapes(SPEC, EngineOptions()) == {
        "audio": ((1, 16000), (8, 16000), (64, 16000))}
    assert profile_shapes(SPEC, EngineOptions(max_batch=4))["audio"] == (
        (1, 16000), (4, 16000), (4, 16000))
    assert profile_shapes(SPEC, EngineOptions(min_batch=2, opt_batch=32, max_batch=1024))[
        "audio"] == ((2, 16000), (32, 16000), (1024, 16000))
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        profile_shapes(SPEC, EngineOptions(min_batch=16, opt_batch=8))


def test_export_engine_builds_with_the_shared_builder_and_the_onnx_spec(
        tmp_path: Path, export_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from export.engine import build_engine
    from runtime.trt_runner import read_sidecar
    from tests.runtime.test_trt_build import ORIN, fake_tensorrt

    folder, _ = write_bundle(export_dir, tmp_path / "b")
    samples = read_report(export_dir)["spec"]["samples"]
    log: list[tuple] = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log))
    monkeypatch.setattr("runtime.trt_build.current_device", lambda: ORIN)
    path = build_engine(folder, EngineOptions("int8", max_batch=16))
    assert ("parse", "model.int8.onnx", (folder / "model.int8.onnx").stat().st_size) in log
    assert ("profile", "audio", (1, samples), (8, samples), (16, samples)) in log
    assert [e[1] for e in log if e[0] == "flag"] == ["BuilderFlag.FP16", "BuilderFlag.INT8"]
    assert read_sidecar(path).onnx_file == "model.int8.onnx"
    assert "(int8, batch 1/8/16, TensorRT 10.3.0 on Orin)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory, export_dir: Path, clips: np.ndarray,
            ) -> tuple[Path, float]:
    """A teacher-target store agreeing with the FP32 student on the first half of the
    held-out clips and disagreeing on the rest; returns it and the expected agreement."""
    from distill.targets import TargetMeta, TaskLabels, write_index, write_meta, write_part
    from export.onnx_export import run_onnx

    out = tmp_path_factory.mktemp("targets")
    held = list(range(0, len(clips), 3))
    top1 = run_onnx(export_dir / "model.onnx", clips[held])["species_logits"].argmax(1)
    rows = []
    for n, (i, label) in enumerate(zip(held, top1, strict=True)):
        teacher = int(label) if n < len(held) // 2 else (int(label) + 1) % len(SPECIES)
        scores = [0.0 if k == teacher else -5.0 for k in range(len(SPECIES))]
        rows.append({"id": f"birds-{i:02d}", "task": "species", "scores": scores,
                     "answer": SPECIES[teacher]})
    meta = TargetMeta(teacher_hash="0123456789abcdef", teacher_config={},
                      tasks={"species": TaskLabels(SPECIES)}, sample_rate=16000, clip_s=1.0)
    write_meta(out, meta)
    write_part(out, rank=0, seq=0, rows=rows[:-1])  # one held-out clip has no target
    write_index(out)
    expected = sum(1 for n in range(len(held) - 1) if n < len(held) // 2) / (len(held) - 1)
    return out, expected


def test_bundle_records_models_labels_hashes_and_teacher_agreement(
        tmp_path: Path, export_dir: Path, manifest: Path, targets: tuple[Path, float],
        capsys: pytest.CaptureFixture[str]) -> None:
    store, expected = targets
    out = tmp_path / "birds"
    assert bundle(export_dir, out, version="2", targets=store, manifest=manifest,
                  threshold=0.3) == 0
    assert "(1 clips without a target)" in capsys.readouterr().out
    assert verify_bundle(out) == [] and verify_bundle(tmp_path / "birds.tar.gz") == []
    loaded = load_bundle(tmp_path / "birds.tar.gz", extract_to=tmp_path / "unpacked")
    m = loaded.manifest
    assert (m.name, m.version, m.sample_rate, m.window_s, m.teacher_id) == (
        "birds", "2", 16000, 1.0, "0123456789abcdef")
    assert [(t.name, t.activation, t.threshold) for t in m.tasks] == [
        ("species", "softmax", 0.3), ("detection", "sigmoid", 0.3)]
    assert m.tasks[0].labels == SPECIES
    kept = cpu_int8_kept(export_dir)
    cpu_int8 = [(INT8_CPU, "int8")] if kept else []
    assert [(s.file, s.precision) for s in m.models] == [
        ("model.onnx", "fp32"), ("model.fp16.onnx", "fp16"), ("model.int8.onnx", "int8"),
        *cpu_int8]
    assert set(m.files) == {"model.onnx", "model.fp16.onnx", "model.int8.onnx", "labels.json",
                            "export.json", *(f for f, _ in cpu_int8)}
    assert json.loads((out / "labels.json").read_text())["species"] == list(SPECIES)
    # keyed by file stem: the two INT8 models (QDQ for TensorRT, QOperator for the CPU) apart
    assert m.agreement["model.species"] == pytest.approx(expected)
    stems = ["model", "model.fp16", "model.int8"] + (["model.int8cpu"] if kept else [])
    assert set(m.agreement) == {f"{stem}.species" for stem in stems}
    assert {"onnx", "onnxruntime", "torch"} <= set(m.tools)
    cpu_stems = ["model", "model.fp16", "model.int8cpu" if kept else "model.int8"]
    assert set(m.latency_ms) == {f"{stem}.cpu.b1.t1" for stem in cpu_stems}
    assert all(v > 0 for v in m.latency_ms.values())
    assert onnx_for(loaded, "int8").file == "model.int8.onnx"
    assert onnx_for(loaded, "fp16").file == "model.onnx"
    (out / "model.int8.onnx").write_bytes(b"tampered")
    assert any("model.int8.onnx: sha256 mismatch" in p for p in verify_bundle(out))
    with pytest.raises(InputError, match="already exists"):
        write_bundle(export_dir, out)


def test_model_order_puts_the_cpu_stft_variant_first_and_keeps_tensorrt_on_conv(
        tmp_path: Path, export_dir: Path) -> None:
    from export.bundle import bundle_manifest, model_entry, update_report
    from runtime.bundle import Bundle

    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copyfile(export_dir / "export.json", folder / "export.json")
    update_report(folder, models=[model_entry("model.stft.onnx", "fp32", "stft")])
    kept = cpu_int8_kept(export_dir)
    files = [m["file"] for m in read_report(folder)["models"]]
    assert files == ["model.stft.onnx", "model.onnx", "model.fp16.onnx", "model.int8.onnx",
                     *([INT8_CPU] if kept else [])]
    assert read_report(folder)["models"][0]["backends"] == ["cpu"]
    manifest = bundle_manifest(read_report(folder), "b", "1")
    loaded = Bundle(root=folder, manifest=manifest)
    assert loaded.model_for("cpu").file == "model.stft.onnx"
    assert loaded.model_for("tensorrt").file == "model.onnx"
    assert loaded.model_for("cpu", precision="int8").file == (
        INT8_CPU if kept else "model.int8.onnx")
    assert loaded.model_for("tensorrt", precision="int8").file == "model.int8.onnx"
    with pytest.raises(ValueError, match="thresholds for unknown tasks"):
        bundle_manifest(read_report(folder), "b", "1", thresholds={"sounds": 0.5})


def test_bundle_refuses_a_folder_that_is_not_an_export(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not an export folder"):
        write_bundle(tmp_path, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_sidecar_names_and_checks_the_engine(tmp_path: Path, export_dir: Path) -> None:
    device = DeviceInfo("10.3.0", "Orin (nvgpu)", "8.7")
    sidecar = engine_sidecar(device, "int8", {"min": 1, "opt": 8, "max": 64},
                             "model.int8.onnx", "ab" * 32)
    assert engine_file_name(sidecar) == "model.int8.trt10.3.0.Orin-nvgpu.sm87.int8.engine"
    assert engine_problems(sidecar, device, "ab" * 32) == []
    assert engine_problems(sidecar, DeviceInfo("10.7.0", "Orin (nvgpu)", "8.7"), "ab" * 32)


def test_compare_prints_every_model_against_torch(tmp_path: Path, export_dir: Path,
                                                  checkpoint: Path, real_recording: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.json"
    assert compare(export_dir, checkpoint=checkpoint, recording=real_recording,
                   json_out=out) == 0
    printed = capsys.readouterr().out
    assert "reference: torch; 8 windows of 1 s" in printed
    rows = json.loads(out.read_text())
    models = {r["model"] for r in rows}
    assert models == {"ort-model", "ort-model.fp16", "ort-model.int8",
                      *(["ort-model.int8cpu"] if cpu_int8_kept(export_dir) else [])}
    fp32 = {r["output"]: r for r in rows if r["model"] == "ort-model"}
    assert fp32["species_logits"]["max_abs"] < read_report(export_dir)["spec"]["atol"]
    assert fp32["species_logits"]["top1"] == 1.0 and fp32["embedding"]["top1"] is None


@pytest.mark.tensorrt
def test_engine_builds_and_runs_like_onnx_runtime(tmp_path: Path, export_dir: Path,
                                                  clips: np.ndarray) -> None:
    from export.engine import EngineOptions, build_engine
    from export.onnx_export import run_onnx
    from runtime.trt_runner import TrtRunner, find_engine

    folder, _ = write_bundle(export_dir, tmp_path / "b")
    for precision in ("fp16", "int8"):
        path = build_engine(folder, EngineOptions(precision, max_batch=16))
        assert find_engine(load_bundle(folder), precision) == path
        assert (folder / "engines" / "timing.cache").is_file()
        with TrtRunner(path) as runner:
            got = runner.infer({"audio": clips[:12]})
        want = run_onnx(export_dir / "model.onnx", clips[:12])
        agree = np.mean(got["species_logits"].argmax(1) == want["species_logits"].argmax(1))
        assert agree >= 0.99
    shutil.rmtree(folder)
