"""TensorRT 10 engines built on the target device from a bundle's ONNX models.

`build_engine` parses the bundle's Conv1d-front-end ONNX (the INT8 QDQ model for ``int8``:
explicit quantization), adds one optimisation profile from the export spec stored in the model
(minimum, optimum and maximum batch), sets the precision flags, a workspace limit and,
optionally, DLA with GPU fallback (Jetson Orin NX / AGX; the Orin Nano has no DLA), reuses and
updates a timing cache kept in the bundle's ``engines/`` folder, and writes the engine with the
sidecar `runtime.trt_runner` checks (TensorRT version, GPU name, compute capability, precision,
profile, the ONNX's sha256).

For ``int8`` the network is weakly typed with Q/DQ nodes (explicit quantization), built with the
INT8 and FP16 flags as TensorRT 10.3 on JetPack 6 expects; layers left unquantized (the front
end) run in FP16 or FP32. ``tensorrt`` is imported only inside `build_engine`; the option, flag and profile logic
(`EngineOptions`, `builder_flags`, `profile_shapes`, `onnx_for`) is plain Python and tested
without TensorRT.

    >>> opts = EngineOptions(precision="int8", dla_core=0)
    >>> builder_flags(opts)
    ['FP16', 'INT8', 'GPU_FALLBACK']
    >>> profile_shapes({"samples": 16000, "min_batch": 1, "opt_batch": 8, "max_batch": 64,
    ...                 "input_name": "audio"}, opts)
    {'audio': ((1, 16000), (8, 16000), (64, 16000))}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.bundle import ENGINE_DIR, Bundle, ModelSpec

if TYPE_CHECKING:
    from runtime.trt_runner import EngineSidecar

ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
TIMING_CACHE = "timing.cache"


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


def profile_shapes(spec: dict[str, Any], options: EngineOptions,
                   ) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """``{input: (min, opt, max)}`` shapes from the export spec, with the options' overrides."""
    low = options.min_batch or int(spec["min_batch"])
    opt = options.opt_batch or int(spec["opt_batch"])
    high = options.max_batch or int(spec["max_batch"])
    if options.max_batch and not options.opt_batch:
        opt = min(opt, high)
    if not 1 <= low <= opt <= high:
        raise ValueError(f"profile batches must satisfy 1 <= min <= opt <= max, got "
                         f"{low}, {opt}, {high}")
    samples = int(spec["samples"])
    return {str(spec.get("input_name", "audio")): ((low, samples), (opt, samples),
                                                    (high, samples))}


def onnx_for(bundle: Bundle, precision: str) -> ModelSpec:
    """The bundle model an engine of ``precision`` is built from: the Conv1d variant suiting
    TensorRT; the INT8 QDQ model for ``int8``, the FP32 model otherwise (TensorRT makes FP16
    itself)."""
    wanted = "int8" if precision == "int8" else "fp32"
    return bundle.model_for("tensorrt", precision=wanted, variant="conv")


def engine_sidecar(device: Any, precision: str, profile: dict[str, int], onnx_file: str,
                   onnx_sha256: str) -> EngineSidecar:
    """The sidecar for an engine built here."""
    from runtime.trt_runner import EngineSidecar

    return EngineSidecar(tensorrt_version=device.tensorrt_version, gpu_name=device.gpu_name,
                         compute_capability=device.compute_capability, precision=precision,
                         profile=profile, onnx_sha256=onnx_sha256, onnx_file=onnx_file)


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> Any:
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT cannot parse the model: {errors}")
    return network, parser


def _configure(trt: Any, builder: Any, options: EngineOptions,
               shapes: dict[str, tuple[tuple[int, int], ...]], cache_path: Path | None) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    for flag in builder_flags(options):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if options.dla_core is not None:
        if builder.num_DLA_cores <= options.dla_core:
            raise RuntimeError(f"DLA core {options.dla_core} requested but this device has "
                               f"{builder.num_DLA_cores} (the Orin Nano has none)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    if options.timing_cache:
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def build_engine(bundle_path: str | os.PathLike[str], options: EngineOptions | None = None,
                 quiet: bool = False) -> Path:
    """Build an engine for this device into ``<bundle>/engines/`` and return its path."""
    import tensorrt as trt

    from export.onnx_export import read_manifest
    from runtime.bundle import load_bundle
    from runtime.files import atomic_write_bytes
    from runtime.trt_runner import current_device, engine_file_name, write_sidecar

    options = options or EngineOptions()
    bundle = load_bundle(bundle_path)
    model = onnx_for(bundle, options.precision)
    onnx_path = bundle.model_path(model)
    spec = read_manifest(onnx_path)["spec"]
    shapes = profile_shapes(spec, options)
    (low, _), (opt, _), (high, _) = next(iter(shapes.values()))
    engine_dir = bundle.root / ENGINE_DIR
    engine_dir.mkdir(parents=True, exist_ok=True)
    cache_path = engine_dir / TIMING_CACHE if options.timing_cache else None

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)
    config = _configure(trt, builder, options, shapes, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build a {options.precision} engine "
                           f"(see the TensorRT log above)")
    sidecar = engine_sidecar(current_device(), options.precision,
                             {"min": low, "opt": opt, "max": high}, model.file,
                             bundle.manifest.files[model.file])
    engine_path = engine_dir / engine_file_name(sidecar)
    atomic_write_bytes(engine_path, bytes(serialized))
    write_sidecar(engine_path, sidecar)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    if not quiet:
        print(f"engine {engine_path} ({options.precision}, batch {low}/{opt}/{high}, TensorRT "
              f"{sidecar.tensorrt_version} on {sidecar.gpu_name})")
    return engine_path
