"""`naturelm-edge export engine BUNDLE`: a TensorRT 10 engine built on the target device.

The builder itself is `runtime.trt_build` (the unit's first start uses the same one); this
module re-exports its option, flag and profile logic and adds what the workstation side knows:
the export spec stored in the ONNX model's ``metadata_props`` sets the optimisation profile
(minimum, optimum and maximum batch), overridden by `EngineOptions`. ``int8`` engines are built
from the bundle's INT8 QDQ model (explicit quantization, INT8 and FP16 flags); ``tensorrt`` is
imported only inside the build.

    >>> opts = EngineOptions(precision="int8", dla_core=0)
    >>> builder_flags(opts)
    ['FP16', 'INT8', 'GPU_FALLBACK']
    >>> profile_shapes({"samples": 16000, "min_batch": 1, "opt_batch": 8, "max_batch": 64,
    ...                 "input_name": "audio"}, opts)
    {'audio': ((1, 16000), (8, 16000), (64, 16000))}
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.bundle import Bundle, ModelSpec
from runtime.trt_build import (
    ENGINE_PRECISIONS,
    TIMING_CACHE,
    EngineBuildError,
    EngineOptions,
    builder_flags,
    engine_model,
    engine_sidecar,
    profile_shapes,
)

__all__ = ["ENGINE_PRECISIONS", "TIMING_CACHE", "EngineBuildError", "EngineOptions",
           "build_engine", "builder_flags", "engine_sidecar", "onnx_for", "profile_shapes"]


def onnx_for(bundle: Bundle, precision: str) -> ModelSpec:
    """The bundle model an engine of ``precision`` is built from (`runtime.trt_build`)."""
    return engine_model(bundle, precision)


def build_engine(bundle_path: str | os.PathLike[str], options: EngineOptions | None = None,
                 quiet: bool = False) -> Path:
    """Build an engine for this device into ``<bundle>/engines/`` and return its path; the
    profile comes from the export spec in the ONNX model the engine is built from."""
    from export.onnx_export import read_manifest
    from runtime import trt_build
    from runtime.bundle import load_bundle
    from runtime.trt_runner import read_sidecar

    options = options or EngineOptions()
    bundle = load_bundle(bundle_path)
    spec = read_manifest(bundle.model_path(engine_model(bundle, options.precision)))["spec"]
    engine = trt_build.build_engine(bundle, options, spec=spec)
    if not quiet:
        sidecar = read_sidecar(engine)
        profile = sidecar.profile
        print(f"engine {engine} ({options.precision}, batch {profile['min']}/{profile['opt']}/"
              f"{profile['max']}, TensorRT {sidecar.tensorrt_version} on {sidecar.gpu_name})")
    return engine
