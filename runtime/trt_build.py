"""The one TensorRT 10 engine builder, used on the workstation (`naturelm-edge export engine`)
and on the unit at first start (`runtime.firstboot`).

`build_engine` parses the bundle's Conv1d-front-end ONNX (the INT8 QDQ model for ``int8``:
explicit quantization), adds one optimisation profile (minimum, optimum and maximum batch from
the export spec, with `EngineOptions` overrides), sets the precision flags, a workspace limit
and, optionally, DLA with GPU fallback (Jetson Orin NX / AGX; the Orin Nano has no DLA), reuses
and updates a timing cache kept in the bundle's ``engines/`` folder, and writes the engine with
the sidecar `runtime.trt_runner` checks (TensorRT version, GPU name, compute capability,
precision, profile, the ONNX's sha256).

For ``int8`` the network is weakly typed with Q/DQ nodes (explicit quantization), built with the
INT8 and FP16 flags as TensorRT 10.3 on JetPack 6 expects; layers left unquantized (the front
end) run in FP16 or FP32. ``tensorrt`` is imported only inside `build_engine`; the option, flag,
profile and model-choice logic (`EngineOptions`, `builder_flags`, `profile_shapes`,
`profile_spec`, `engine_model`) is plain Python, and `configure` takes the ``tensorrt`` module
as an argument, so all of it is tested without TensorRT.

    >>> opts = EngineOptions(precision="int8", dla_core=0)
    >>> builder_flags(opts)
    ['FP16', 'INT8', 'GPU_FALLBACK']
    >>> profile_shapes({"samples": 16000, "min_batch": 1, "opt_batch": 8, "max_batch": 64,
    ...                 "input_name": "audio"}, opts)
    {'audio': ((1, 16000), (8, 16000), (64, 16000))}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bundle import Bundle, ModelSpec
from runtime.errors import ManifestError
from runtime.files import atomic_write_bytes
from runtime.trt_runner import (
    DeviceInfo,
    EngineSidecar,
    current_device,
    engine_file_name,
    write_sidecar,
)

log = logging.getLogger(__name__)

ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
TIMING_CACHE = "timing.cache"
EXPORT_REPORT = "export.json"  # the exporter's report, copied into every bundle it writes
# The profile used when a bundle carries no export spec (the export families' default).
DEFAULT_PROFILE = {"min_batch": 1, "opt_batch": 8, "max_batch": 64}

Shapes = dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX model or build an engine from it."""


@dataclass(frozen=True)
class EngineOptions:
    """How to build one engine.

    Args:
        precision: ``fp32``, ``fp16`` (FP16 kernels allowed) or ``int8`` (from the QDQ model,
            with FP16 allowed for the unquantized layers).
        workspace_mb: workspace memory pool limit in MiB.
        min_batch: override the spec's profile minimum batch.
        opt_batch: override the spec's profile optimum batch.
        max_batch: override the spec's profile maximum batch.
        dla_core: run on this DLA core with GPU fallback (None: GPU only).
        timing_cache: keep and reuse the timing cache in the bundle's engines folder.
    """

    precision: str = "fp16"
    workspace_mb: int = 1024
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    dla_core: int | None = None
    timing_cache: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise ValueError(f"unknown engine precision {self.precision!r}; choose one of "
                             f"{', '.join(ENGINE_PRECISIONS)}")
        if self.workspace_mb <= 0:
            raise ValueError(f"workspace_mb must be positive, got {self.workspace_mb}")
        if self.dla_core is not None and self.dla_core < 0:
            raise ValueError(f"dla_core must be >= 0, got {self.dla_core}")
        if self.dla_core is not None and self.precision == "fp32":
            raise ValueError("DLA runs FP16 or INT8 only; choose --precision fp16 or int8")


def builder_flags(options: EngineOptions) -> list[str]:
    """Names of the ``trt.BuilderFlag`` members to set, in order."""
    flags = []
    if options.precision in ("fp16", "int8"):
        flags.append("FP16")
    if options.precision == "int8":
        flags.append("INT8")
    if options.dla_core is not None:
        flags.append("GPU_FALLBACK")
    return flags


def profile_shapes(spec: Mapping[str, Any], options: EngineOptions) -> Shapes:
    """``{input: (min, opt, max)}`` shapes from the export spec, with the options' overrides
    (a smaller ``max_batch`` alone pulls the optimum down to it)."""
    low = options.min_batch or int(spec["min_batch"])
    opt = options.opt_batch or int(spec["opt_batch"])
    high = options.max_batch or int(spec["max_batch"])
    if options.max_batch and not options.opt_batch:
        opt = min(opt, high)
    if options.min_batch and not options.opt_batch:
        opt = max(opt, low)
    if not 1 <= low <= opt <= high:
        raise ValueError(f"profile batches must satisfy 1 <= min <= opt <= max, got "
                         f"{low}, {opt}, {high}")
    samples = int(spec["samples"])
    return {str(spec.get("input_name", "audio")): ((low, samples), (opt, samples),
                                                    (high, samples))}


def profile_spec(bundle: Bundle) -> dict[str, Any]:
    """The export spec's profile fields for `bundle`: from the exporter's report in the bundle
    where there is one, else `DEFAULT_PROFILE` with the manifest's window."""
    samples = round(bundle.manifest.window_s * bundle.manifest.sample_rate)
    spec: dict[str, Any] = {**DEFAULT_PROFILE, "samples": samples, "input_name": "audio"}
    report = bundle.root / EXPORT_REPORT
    if not report.is_file():
        return spec
    try:
        exported = json.loads(report.read_text(encoding="utf-8")).get("spec", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ManifestError(report, f"unreadable export report: {exc}") from exc
    spec.update({k: exported[k] for k in (*DEFAULT_PROFILE, "input_name") if k in exported})
    if int(exported.get("samples", samples)) != samples:
        raise ManifestError(report, f"the export spec's window ({exported['samples']} samples) "
                                    f"differs from bundle.json's ({samples})")
    return spec


def engine_model(bundle: Bundle, precision: str) -> ModelSpec:
    """The bundle model an engine of `precision` is built from: a Conv1d-front-end model that
    suits TensorRT; the INT8 QDQ model for ``int8``, otherwise the FP32 model (TensorRT makes
    FP16 itself) or, in a bundle without one, the FP16 model."""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"unknown engine precision {precision!r}; choose one of "
                         f"{', '.join(ENGINE_PRECISIONS)}")
    if precision == "int8":
        return bundle.model_for("tensorrt", precision="int8", variant="conv")
    try:
        return bundle.model_for("tensorrt", precision="fp32", variant="conv")
    except ManifestError:
        return bundle.model_for("tensorrt", precision="fp16", variant="conv")


def engine_sidecar(device: DeviceInfo, precision: str, profile: Mapping[str, int],
                   onnx_file: str, onnx_sha256: str) -> EngineSidecar:
    """The sidecar for an engine built on `device`."""
    return EngineSidecar(tensorrt_version=device.tensorrt_version, gpu_name=device.gpu_name,
                         compute_capability=device.compute_capability, precision=precision,
                         profile=dict(profile), onnx_sha256=onnx_sha256, onnx_file=onnx_file)


def parse_onnx(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """A TensorRT network (explicit batch, weakly typed) parsed from `onnx_path`; the parser
    is returned too, since the network's weights live as long as it does."""
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT cannot parse the model: {errors}")
    return network, parser


def check_inputs(network: Any, shapes: Shapes, onnx_path: Path) -> None:
    """Refuse a network whose inputs are not exactly the profile's."""
    names = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if names != sorted(shapes):
        raise EngineBuildError(f"{onnx_path}: the network's inputs {names} are not the export "
                               f"spec's {sorted(shapes)}")


def configure(trt: Any, builder: Any, options: EngineOptions, shapes: Shapes,
              cache_bytes: bytes | None) -> Any:
    """The builder config: workspace limit, precision flags, DLA with GPU fallback, the
    optimisation profile and (when `cache_bytes` is not None) the timing cache seeded with them.
    A cache from another TensorRT version or GPU is dropped with a logged warning."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    for flag in builder_flags(options):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if options.dla_core is not None:
        if builder.num_DLA_cores <= options.dla_core:
            raise EngineBuildError(f"DLA core {options.dla_core} requested but this device has "
                                   f"{builder.num_DLA_cores} (the Orin Nano has none)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    if cache_bytes is not None:
        cache = config.create_timing_cache(cache_bytes)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("the timing cache was written by another TensorRT or GPU; starting a "
                        "new one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return config


def build_engine(bundle: Bundle, options: EngineOptions | None = None,
                 device: DeviceInfo | None = None, spec: Mapping[str, Any] | None = None,
                 ) -> Path:
    """Build an engine for this GPU from the bundle's ONNX model into ``<bundle>/engines/``
    with its sidecar (written first: an engine without one is never used); returns its path.

    Args:
        bundle: the loaded bundle (an unpacked folder).
        options: precision, workspace, profile overrides, DLA, timing cache.
        device: this machine's TensorRT version and GPU (default: queried).
        spec: the export spec's profile fields (default: `profile_spec` of the bundle).

    Raises:
        ImportError: tensorrt is not installed.
        EngineBuildError: the parser or the builder failed (the message says why).
    """
    import tensorrt as trt

    options = options or EngineOptions()
    device = device if device is not None else current_device()
    model = engine_model(bundle, options.precision)
    onnx_path = bundle.model_path(model)
    shapes = profile_shapes(spec if spec is not None else profile_spec(bundle), options)
    (low, _), (opt, _), (high, _) = next(iter(shapes.values()))
    bundle.engine_dir.mkdir(parents=True, exist_ok=True)
    cache_path = bundle.engine_dir / TIMING_CACHE
    cache_bytes = None
    if options.timing_cache:
        cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = parse_onnx(trt, builder, logger, onnx_path)
    check_inputs(network, shapes, onnx_path)
    config = configure(trt, builder, options, shapes, cache_bytes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT {device.tensorrt_version} could not build "
                               f"a {options.precision} engine on {device.gpu_name} (see the "
                               f"TensorRT log above)")
    sidecar = engine_sidecar(device, options.precision, {"min": low, "opt": opt, "max": high},
                             model.file, bundle.manifest.files.get(model.file, ""))
    engine = bundle.engine_dir / engine_file_name(sidecar)
    write_sidecar(engine, sidecar)
    atomic_write_bytes(engine, bytes(serialized))
    if options.timing_cache:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    log.info("built %s (%s, batch %d/%d/%d, TensorRT %s on %s)", engine.name,
             options.precision, low, opt, high, device.tensorrt_version, device.gpu_name)
    return engine
