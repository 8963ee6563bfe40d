"""Runners: ONNX Runtime providers and fallback, model choice per backend, and the TensorRT
engine sidecar refusals (checked without TensorRT; the engine itself needs a GPU)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle import load_bundle
from runtime.errors import ManifestError
from runtime.runners import OrtRunner, Runner, RunnerError, open_runner, providers_for
from runtime.trt_runner import (
    DeviceInfo,
    EngineMismatchError,
    EngineSidecar,
    check_engine,
    engine_file_name,
    find_engine,
    read_sidecar,
    write_sidecar,
)
from tests.runtime.model_fixtures import BAND_HZ, LABELS, make_bundle, tone


@pytest.fixture()
def bundle_dir(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "tones", with_stft_variant=True)


def test_fallback_order_is_explicit_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("cpu", cpu_only) == ["CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger="runtime.runners"):
        assert providers_for("tensorrt", cpu_only) == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider is not available; falling back to CPUExecutionProvider" \
        in caplog.text
    assert "CUDAExecutionProvider is not available" in caplog.text
    full = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert providers_for("tensorrt", full) == full
    assert providers_for("cuda", full) == full[1:]
    with pytest.raises(RunnerError, match="needs CUDAExecutionProvider.*onnxruntime-gpu"):
        providers_for("cuda", cpu_only, strict=True)
    with pytest.raises(ValueError, match="unknown ONNX Runtime backend"):
        providers_for("metal", cpu_only)


def test_ort_runner_honours_the_contract(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    runner = open_runner(bundle, "cpu", threads=1)
    assert isinstance(runner, Runner) and isinstance(runner, OrtRunner)
    assert runner.model.name == "model.stft.onnx"  # the CPU variant the bundle prefers
    batch = np.stack([tone(f, 1.0) for f in BAND_HZ] + [np.zeros(16000, np.float32)])
    with runner:
        out = runner.infer({"audio": batch})
        assert runner.providers == ["CPUExecutionProvider"]
        with pytest.raises(RunnerError, match="takes inputs"):
            runner.infer({"wave": batch})
    assert set(out) == {"species_logits", "detection_logits", "embedding"}
    assert out["species_logits"].shape == (5, len(LABELS))
    assert out["species_logits"][:4].argmax(axis=1).tolist() == [0, 1, 2, 3]
    assert (out["detection_logits"][4] < 0).all()
    with pytest.raises(RunnerError, match="outside its `with` block"):
        runner.infer({"audio": batch})


def test_cuda_backend_falls_back_to_cpu_here(bundle_dir: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    runner = open_runner(load_bundle(bundle_dir), "tensorrt")
    assert runner.model.name == "model.onnx"  # type: ignore[attr-defined]
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the TensorRT provider")
    with caplog.at_level(logging.WARNING), runner:
        out = runner.infer({"audio": np.zeros((1, 16000), np.float32)})
    assert out["embedding"].shape == (1, len(BAND_HZ))
    assert "falling back" in caplog.text


def test_broken_model_is_reported_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(RunnerError, match=r"bad\.onnx: ONNX Runtime cannot load"):
        OrtRunner(bad).__enter__()


ORIN = DeviceInfo("10.3.0", "Orin", "8.7")


def _engine(bundle_dir: Path, sidecar: EngineSidecar) -> Path:
    engine = bundle_dir / "engines" / engine_file_name(sidecar)
    engine.parent.mkdir(exist_ok=True)
    engine.write_bytes(b"serialized engine")
    write_sidecar(engine, sidecar)
    return engine


def test_engine_for_this_device_is_found(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    sidecar = EngineSidecar("10.3.0", "Orin", "8.7", "fp16", {"min": 1, "opt": 8, "max": 16},
                            bundle.manifest.files["model.onnx"])
    engine = _engine(bundle_dir, sidecar)
    assert engine.name == "model.trt10.3.0.Orin.sm87.fp16.engine"
    assert read_sidecar(engine) == sidecar
    assert find_engine(bundle, "fp16", ORIN) == engine
    assert check_engine(engine, ORIN, sidecar.onnx_sha256) == sidecar


@pytest.mark.parametrize("device, message", [
    (DeviceInfo("10.7.0", "Orin", "8.7"), "built with TensorRT 10.3.0, this device has "
                                          "TensorRT 10.7.0"),
    (DeviceInfo("10.3.0", "NVIDIA H100 80GB HBM3", "9.0"), "built for Orin"),
])
def test_mismatched_engine_is_refused_with_rebuild_hint(bundle_dir: Path, device: DeviceInfo,
                                                        message: str) -> None:
    bundle = load_bundle(bundle_dir)
    _engine(bundle_dir, EngineSidecar("10.3.0", "Orin", "8.7", "fp16", {},
                                      bundle.manifest.files["model.onnx"]))
    with pytest.raises(EngineMismatchError, match=message) as info:
        find_engine(bundle, "fp16", device)
    assert f"naturelm-edge export engine {bundle_dir} --precision fp16" in str(info.value)


def test_engine_from_another_onnx_or_without_sidecar_is_refused(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    engine = _engine(bundle_dir, EngineSidecar("10.3.0", "Orin", "8.7", "fp16", {}, "0" * 64))
    with pytest.raises(EngineMismatchError, match="built from another model.onnx"):
        find_engine(bundle, "fp16", ORIN)
    with pytest.raises(EngineMismatchError, match="no int8 engine"):
        find_engine(bundle, "int8", ORIN)
    Path(str(engine) + ".json").unlink()
    with pytest.raises(ManifestError, match="sidecar is missing"):
        find_engine(bundle, "fp16", ORIN)


def _build_engine(bundle_dir: Path, precision: str = "fp32") -> Path:
    """Build a TensorRT engine of the tone model here, with its sidecar, as the exporter does."""
    import tensorrt as trt

    from runtime.trt_runner import current_device

    bundle = load_bundle(bundle_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((bundle_dir / "model.onnx").read_bytes()), parser.get_error(0)
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("audio", (1, 16000), (4, 16000), (8, 16000))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    device = current_device()
    sidecar = EngineSidecar(device.tensorrt_version, device.gpu_name, device.compute_capability,
                            precision, {"min": 1, "opt": 4, "max": 8},
                            bundle.manifest.files["model.onnx"])
    engine = bundle_dir / "engines" / engine_file_name(sidecar)
    engine.parent.mkdir(exist_ok=True)
    engine.write_bytes(bytes(serialized))
    write_sidecar(engine, sidecar)
    return engine


@pytest.mark.tensorrt
def test_native_engine_matches_onnx_runtime(bundle_dir: Path) -> None:
    from runtime.trt_runner import TrtRunner

    engine = _build_engine(bundle_dir)
    bundle = load_bundle(bundle_dir)
    assert open_runner(bundle, "engine", precision="fp32").engine_path == engine  # type: ignore[attr-defined]
    batch = np.stack([tone(f, 1.0) for f in BAND_HZ] * 3)  # 12 rows: more than the max batch
    with OrtRunner(bundle.root / "model.onnx") as ort_runner:
        ref = ort_runner.infer({"audio": batch})
    for graph in (False, True):
        with TrtRunner(engine, use_cuda_graph=graph) as runner:
            out = runner.infer({"audio": batch})
            again = runner.infer({"audio": batch})
        for name, value in ref.items():
            np.testing.assert_allclose(out[name], value, rtol=1e-3, atol=1e-2)
            np.testing.assert_array_equal(again[name], out[name])
