"""First start of a unit: config round trip, engine build once and cached, ORT fallback with a
logged warning, the recorded failure, and `start` end to end on the tone bundle."""

from __future__ import annotations

import csv
import importlib.util
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from runtime.bundle import load_bundle
from runtime.errors import ManifestError
from runtime.firstboot import (
    FAILED_MARKER,
    EngineBuildError,
    UnitConfig,
    build_engine,
    config_text,
    prepare_backend,
    read_config,
    start,
)
from runtime.trt_runner import (
    DeviceInfo,
    EngineSidecar,
    engine_file_name,
    find_engine,
    write_sidecar,
)
from tests.runtime.model_fixtures import RATE, make_bundle, tone

ORIN = DeviceInfo("10.3.0", "Orin", "8.7")


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "tones")


def engine_config(bundle: Path, tmp_path: Path, **kw: object) -> UnitConfig:
    return UnitConfig(bundle=bundle, inbox=tmp_path / "in", outbox=tmp_path / "out",
                      backend="engine", fallback_backend="cpu", **kw)  # type: ignore[arg-type]


class FakeBuilder:
    """Stands in for TensorRT: writes what `build_engine` writes (sidecar, then engine) and
    counts its calls, or raises like a failed build."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, bundle, precision: str, max_batch: int, device: DeviceInfo,
                 **options: object) -> Path:
        self.calls += 1
        if self.fail:
            raise EngineBuildError("model.onnx: TensorRT cannot parse the model: unsupported op")
        sidecar = EngineSidecar(device.tensorrt_version, device.gpu_name,
                                device.compute_capability, precision,
                                {"min": 1, "opt": 4, "max": max_batch},
                                bundle.manifest.files["model.onnx"], "model.onnx")
        engine = bundle.engine_dir / engine_file_name(sidecar)
        write_sidecar(engine, sidecar)
        engine.write_bytes(b"serialized engine")
        return engine


def test_config_round_trips_and_names_the_file_on_bad_input(tmp_path: Path) -> None:
    config = UnitConfig(bundle=tmp_path / "b", inbox=tmp_path / "in box", outbox=tmp_path / "o",
                        backend="engine", threshold=0.35, policy="move",
                        done_dir=tmp_path / "done", log_file=None, rate=96000, channels=2,
                        bits=24, built_at="2025-05-01T10:00:00+00:00")
    path = tmp_path / "naturelm-edge.conf"
    path.write_text(config_text(config))
    assert read_config(path) == config
    assert read_config(_write(tmp_path, "[naturelm-edge]\n")) == UnitConfig()

    for text, words in [("[other]\nx = 1\n", "no [naturelm-edge] section"),
                        ("[naturelm-edge]\ninbux = /data\n", "unknown key 'inbux'"),
                        ("[naturelm-edge]\nbackend = gpu\n", "backend 'gpu'"),
                        ("[naturelm-edge]\nrate = fast\n", "rate:"),
                        ("[naturelm-edge]\npolicy = move\n", "needs done_dir")]:
        bad = _write(tmp_path, text)
        with pytest.raises(ManifestError, match=re.escape(words)) as info:
            read_config(bad)
        assert str(bad) in str(info.value)


def _write(folder: Path, text: str) -> Path:
    path = folder / "unit.conf"
    path.write_text(text)
    return path


def test_onnx_backends_need_no_engine(bundle: Path, tmp_path: Path) -> None:
    for backend in ("cpu", "cuda", "tensorrt"):
        config = UnitConfig(bundle=bundle, backend=backend)
        assert prepare_backend(config, device=_no_device, builder=_never) == backend


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="this checks the fallback where TensorRT is absent")
def test_without_tensorrt_the_unit_falls_back_with_a_warning(
        bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="runtime.firstboot"):
        backend = prepare_backend(engine_config(bundle, tmp_path))  # real device query
    assert backend == "cpu"
    assert "falling back to ONNX Runtime backend cpu" in caplog.text
    with pytest.raises(ImportError):
        build_engine(load_bundle(bundle), device=ORIN)


def test_engine_is_built_once_then_reused(bundle: Path, tmp_path: Path) -> None:
    builder = FakeBuilder()
    config = engine_config(bundle, tmp_path)
    assert prepare_backend(config, device=lambda: ORIN, builder=builder) == "engine"
    engine = find_engine(load_bundle(bundle), "fp16", ORIN)
    assert engine.parent == bundle / "engines"
    assert prepare_backend(config, device=lambda: ORIN, builder=builder) == "engine"
    assert builder.calls == 1
    # Another TensorRT release on the unit refuses the cached engine and builds a new one.
    newer = DeviceInfo("10.7.0", "Orin", "8.7")
    assert prepare_backend(config, device=lambda: newer, builder=builder) == "engine"
    assert builder.calls == 2
    assert len(list((bundle / "engines").glob("*.engine"))) == 2


def test_failed_build_falls_back_and_is_not_retried_for_the_same_device(
        bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    failing = FakeBuilder(fail=True)
    config = engine_config(bundle, tmp_path)
    with caplog.at_level(logging.WARNING, logger="runtime.firstboot"):
        assert prepare_backend(config, device=lambda: ORIN, builder=failing) == "cpu"
    assert "engine build failed (EngineBuildError" in caplog.text
    marker = bundle / "engines" / FAILED_MARKER
    assert "unsupported op" in marker.read_text()

    assert prepare_backend(config, device=lambda: ORIN, builder=failing) == "cpu"
    assert failing.calls == 1, "a build that failed on this device is not retried each start"
    working = FakeBuilder()
    assert prepare_backend(config, device=lambda: ORIN, builder=working, retry=True) == "engine"
    assert working.calls == 1 and not marker.exists()


def test_a_bundle_archive_cannot_cache_an_engine(bundle: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from runtime.bundle import bundle_tar

    config = engine_config(bundle_tar(bundle), tmp_path)
    with caplog.at_level(logging.WARNING, logger="runtime.firstboot"):
        assert prepare_backend(config, device=lambda: ORIN, builder=_never) == "cpu"
    assert "needs an unpacked bundle folder" in caplog.text


def test_start_falls_back_and_watches_the_inbox(bundle: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    sf.write(inbox / "dawn chorus.wav", np.concatenate([tone(3000.0, 2.0), np.zeros(RATE)]),
             RATE, subtype="PCM_16")
    config = UnitConfig(bundle=bundle, inbox=inbox, outbox=tmp_path / "out",
                        backend="engine" if importlib.util.find_spec("tensorrt") is None
                        else "cpu",
                        settle_s=0.0, poll_s=0.2, log_file=tmp_path / "log" / "watch.log")
    path = tmp_path / "unit.conf"
    path.write_text(config_text(config))
    assert start(path, stop_after_s=1.0) == 0
    with open(tmp_path / "out" / "detections.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["task"], r["label"]) for r in rows} == {("species", "C"), ("detection", "C")}
    log_text = (tmp_path / "log" / "watch.log").read_text()
    if config.backend == "engine":
        assert "falling back to ONNX Runtime backend cpu" in log_text
    assert "stopped" in log_text


def test_start_reports_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert start(_write(tmp_path, "[naturelm-edge]\nbackend = warp\n")) == 2
    assert "backend 'warp'" in capsys.readouterr().err


@pytest.mark.tensorrt
def test_engine_built_on_this_gpu_matches_onnx_runtime(bundle: Path) -> None:
    from runtime.runners import OrtRunner
    from runtime.trt_runner import TrtRunner

    loaded = load_bundle(bundle)
    engine = build_engine(loaded, precision="fp32", max_batch=4)
    assert find_engine(loaded, "fp32") == engine
    audio = np.stack([tone(f, 1.0) for f in (1000.0, 2000.0, 3000.0)])
    with OrtRunner(bundle / "model.onnx") as ort, TrtRunner(engine) as trt:
        want, got = ort.infer({"audio": audio}), trt.infer({"audio": audio})
    for name, value in want.items():
        diff = float(np.max(np.abs(value - got[name])))
        print(f"{name}: max |TensorRT - ONNX Runtime| = {diff:.2e}")
        assert diff < 1e-3


def _no_device() -> DeviceInfo:
    raise AssertionError("an ONNX Runtime backend must not query the GPU")


def _never(*args: object, **kwargs: object) -> Path:
    raise AssertionError("the builder must not be called here")


def test_unit_builds_with_the_shared_builder_and_its_dla_and_workspace(
        bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from tests.runtime.test_trt_build import fake_tensorrt

    config = engine_config(bundle, tmp_path, precision="fp16", max_batch=4, dla_core=0,
                           workspace_mb=512)
    path = tmp_path / "unit.conf"
    path.write_text(config_text(config))
    assert read_config(path) == config
    with pytest.raises(ValueError, match="DLA has no FP32"):
        engine_config(bundle, tmp_path, precision="fp32", dla_core=0)
    log: list[tuple] = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log))
    assert prepare_backend(config, device=lambda: ORIN) == "engine"
    assert ("workspace", "MemoryPoolType.WORKSPACE", 512 << 20) in log
    assert ("set", "DLA_core", 0) in log and ("flag", "BuilderFlag.GPU_FALLBACK") in log
    assert ("profile", "audio", (1, RATE), (4, RATE), (4, RATE)) in log
    assert find_engine(load_bundle(bundle), "fp16", ORIN).name.endswith(".sm87.fp16.engine")
