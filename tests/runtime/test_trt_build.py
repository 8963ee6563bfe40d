"""The shared TensorRT builder without TensorRT: options, flags, profiles from the export spec,
the model each precision is built from, and a whole build against a recording stand-in for the
``tensorrt`` module (workspace, flags, DLA with GPU fallback, profile, timing cache, sidecar)."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from runtime.bundle import ModelSpec, load_bundle
from runtime.errors import ManifestError
from runtime.trt_build import (
    DEFAULT_PROFILE,
    TIMING_CACHE,
    EngineBuildError,
    EngineOptions,
    build_engine,
    builder_flags,
    engine_model,
    profile_shapes,
    profile_spec,
)
from runtime.trt_runner import DeviceInfo, find_engine, read_sidecar
from tests.runtime.model_fixtures import RATE, make_bundle

ORIN = DeviceInfo("10.3.0", "Orin", "8.7")
SPEC = {"samples": 16000, "min_batch": 1, "opt_batch": 8, "max_batch": 64, "input_name": "audio"}


def test_flags_follow_precision_and_dla() -> None:
    assert builder_flags(EngineOptions("fp32")) == []
    assert builder_flags(EngineOptions("fp16")) == ["FP16"]
    assert builder_flags(EngineOptions("int8")) == ["FP16", "INT8"]
    assert builder_flags(EngineOptions("int8", dla_core=1)) == ["FP16", "INT8", "GPU_FALLBACK"]
    for bad, match in (({"precision": "fp8"}, "unknown engine precision 'fp8'"),
                       ({"precision": "fp32", "dla_core": 0}, "DLA runs FP16 or INT8 only"),
                       ({"dla_core": -1}, "dla_core must be >= 0"),
                       ({"workspace_mb": 0}, "workspace_mb must be positive")):
        with pytest.raises(ValueError, match=match):
            EngineOptions(**bad)  # type: ignore[arg-type]


def test_profile_from_the_spec_with_overrides() -> None:
    assert profile_shapes(SPEC, EngineOptions()) == {
        "audio": ((1, 16000), (8, 16000), (64, 16000))}
    assert profile_shapes(SPEC, EngineOptions(max_batch=4))["audio"] == (
        (1, 16000), (4, 16000), (4, 16000))
    assert profile_shapes(SPEC, EngineOptions(min_batch=16))["audio"][:2] == (
        (16, 16000), (16, 16000))
    assert profile_shapes({**SPEC, "input_name": "wave"}, EngineOptions())["wave"][2] == (
        64, 16000)
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        profile_shapes(SPEC, EngineOptions(min_batch=16, opt_batch=8))


def test_profile_spec_reads_the_export_report_in_the_bundle(tmp_path: Path) -> None:
    folder = make_bundle(tmp_path / "b")
    bundle = load_bundle(folder)
    assert profile_spec(bundle) == {**DEFAULT_PROFILE, "samples": RATE, "input_name": "audio"}
    report = folder / "export.json"
    report.write_text(json.dumps({"spec": {"samples": RATE, "min_batch": 2, "opt_batch": 16,
                                           "max_batch": 256, "input_name": "audio"}}))
    assert profile_spec(bundle)["opt_batch"] == 16
    report.write_text(json.dumps({"spec": {"samples": 2 * RATE}}))
    with pytest.raises(ManifestError, match="differs from bundle.json"):
        profile_spec(bundle)
    report.write_text("{not json")
    with pytest.raises(ManifestError, match="export.json: unreadable export report"):
        profile_spec(bundle)


def test_engine_model_prefers_conv_fp32_and_int8_qdq(tmp_path: Path) -> None:
    bundle = load_bundle(make_bundle(tmp_path / "b", with_stft_variant=True))
    assert engine_model(bundle, "fp16") == engine_model(bundle, "fp32")
    assert engine_model(bundle, "fp16").variant == "conv"
    with pytest.raises(ManifestError, match="no model for backend 'tensorrt' at precision 'int8'"):
        engine_model(bundle, "int8")
    models = (ModelSpec("model.stft.onnx", "fp32", "stft", ("cpu",)),
              ModelSpec("model.fp16.onnx", "fp16", "conv"),
              ModelSpec("model.int8cpu.onnx", "int8", "conv", ("cpu",)),
              ModelSpec("model.int8.onnx", "int8", "conv", ("cuda", "tensorrt")))
    other = replace(bundle, manifest=replace(bundle.manifest, models=models))
    assert engine_model(other, "fp32").file == "model.fp16.onnx"
    assert engine_model(other, "int8").file == "model.int8.onnx"
    with pytest.raises(ValueError, match="unknown engine precision"):
        engine_model(other, "fp8")


class _Recorder:
    """Any attribute is a callable or value that records what was done with it."""

    def __init__(self, log: list[tuple[Any, ...]], name: str) -> None:
        self._log, self._name = log, name

    def __getattr__(self, attr: str) -> Any:
        return f"{self._name}.{attr}"


def fake_tensorrt(log: list[tuple[Any, ...]], inputs: tuple[str, ...] = ("audio",),
                  dla_cores: int = 2, parses: bool = True, builds: bool = True,
                  cache_matches: bool = True) -> types.ModuleType:
    """A stand-in for the ``tensorrt`` module that records every builder call."""
    trt = types.ModuleType("tensorrt")

    class Tensor:
        def __init__(self, name: str) -> None:
            self.name = name

    class Network:
        num_inputs = len(inputs)

        def get_input(self, i: int) -> Tensor:
            return Tensor(inputs[i])

    class Parser:
        num_errors = 1

        def __init__(self, network: Network, logger: object) -> None:
            pass

        def parse(self, data: bytes, path: str) -> bool:
            log.append(("parse", Path(path).name, len(data)))
            return parses

        def get_error(self, i: int) -> str:
            return "In node 3 (Conv): unsupported"

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return b"cache:" + self.data

    class Profile:
        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            log.append(("profile", name, low, opt, high))

    class Config:
        def __init__(self) -> None:
            self.cache: Cache | None = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            log.append(("workspace", pool, size))

        def set_flag(self, flag: str) -> None:
            log.append(("flag", flag))

        def __setattr__(self, name: str, value: object) -> None:
            if name != "cache":
                log.append(("set", name, value))
            object.__setattr__(self, name, value)

        def add_optimization_profile(self, profile: Profile) -> None:
            log.append(("add_profile",))

        def create_timing_cache(self, data: bytes) -> Cache:
            return Cache(data)

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
            ok = cache_matches or not cache.data
            log.append(("timing_cache", cache.data, ok))
            if ok:
                self.cache = cache
            return ok

        def get_timing_cache(self) -> Cache:
            assert self.cache is not None
            return self.cache

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger: object) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            log.append(("network", flags))
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            log.append(("build",))
            return b"serialized engine" if builds else None

    class Logger:
        WARNING = "warning"

        def __init__(self, level: str) -> None:
            pass

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser  # type: ignore[attr-defined]
    trt.BuilderFlag = _Recorder(log, "BuilderFlag")  # type: ignore[attr-defined]
    trt.MemoryPoolType = _Recorder(log, "MemoryPoolType")  # type: ignore[attr-defined]
    trt.DeviceType = _Recorder(log, "DeviceType")  # type: ignore[attr-defined]
    return trt


def _with_trt(monkeypatch: pytest.MonkeyPatch, **kw: Any) -> list[tuple[Any, ...]]:
    log: list[tuple[Any, ...]] = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log, **kw))
    return log


def test_build_sets_workspace_flags_dla_profile_and_cache(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    folder = make_bundle(tmp_path / "b")
    bundle = load_bundle(folder)
    log = _with_trt(monkeypatch)
    options = EngineOptions("fp16", workspace_mb=256, max_batch=4, dla_core=1)
    engine = build_engine(bundle, options, device=ORIN)
    size = (folder / "model.onnx").stat().st_size
    assert log[0] == ("network", 0)
    steps = [entry for entry in log if entry[0] != "network"]
    assert steps == [("parse", "model.onnx", size),
                     ("workspace", "MemoryPoolType.WORKSPACE", 256 << 20),
                     ("flag", "BuilderFlag.FP16"), ("flag", "BuilderFlag.GPU_FALLBACK"),
                     ("set", "default_device_type", "DeviceType.DLA"), ("set", "DLA_core", 1),
                     ("profile", "audio", (1, RATE), (4, RATE), (4, RATE)), ("add_profile",),
                     ("timing_cache", b"", True), ("build",)]
    assert engine.read_bytes() == b"serialized engine"
    sidecar = read_sidecar(engine)
    assert (sidecar.precision, sidecar.onnx_file, dict(sidecar.profile)) == (
        "fp16", "model.onnx", {"min": 1, "opt": 4, "max": 4})
    assert sidecar.onnx_sha256 == bundle.manifest.files["model.onnx"]
    assert find_engine(bundle, "fp16", ORIN) == engine
    cache = folder / "engines" / TIMING_CACHE
    assert cache.read_bytes() == b"cache:"
    # The second build reuses the cache; one from another TensorRT is replaced by a new one.
    log.clear()
    build_engine(bundle, EngineOptions("fp32"), device=ORIN)
    assert ("timing_cache", b"cache:", True) in log and ("flag", "BuilderFlag.FP16") not in log
    assert ("profile", "audio", (1, RATE), (8, RATE), (64, RATE)) in log
    log = _with_trt(monkeypatch, cache_matches=False)
    build_engine(bundle, EngineOptions("fp32", timing_cache=False), device=ORIN)
    assert not [e for e in log if e[0] == "timing_cache"]
    build_engine(bundle, EngineOptions("fp32"), device=ORIN)
    assert [e for e in log if e[0] == "timing_cache"] == [("timing_cache", b"cache:cache:", False),
                                                          ("timing_cache", b"", True)]


def test_build_uses_a_given_spec_and_refuses_what_cannot_be_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    log = _with_trt(monkeypatch)
    build_engine(bundle, EngineOptions("fp32"), device=ORIN,
                 spec={**SPEC, "samples": RATE, "opt_batch": 32, "max_batch": 128})
    assert ("profile", "audio", (1, RATE), (32, RATE), (128, RATE)) in log
    cases = (({"dla_cores": 0}, EngineOptions("int8"), "no model for backend 'tensorrt'"),
             ({"dla_cores": 0}, EngineOptions("fp16", dla_core=0), "DLA core 0 requested but "
                                                                   "this device has 0"),
             ({"parses": False}, EngineOptions(), "cannot parse the model: In node 3"),
             ({"builds": False}, EngineOptions(), "could not build a fp16 engine on Orin"),
             ({"inputs": ("audio", "extra")}, EngineOptions(), "inputs \\['audio', 'extra'\\] "
                                                               "are not the export spec's"))
    for fake, options, match in cases:
        _with_trt(monkeypatch, **fake)
        error = ManifestError if "no model" in match else EngineBuildError
        with pytest.raises(error, match=match):
            build_engine(bundle, options, device=ORIN)
    assert not list(bundle.engine_dir.glob("*.fp16.engine"))
