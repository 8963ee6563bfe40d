"""A native TensorRT 10 engine runner, and the sidecar that ties an engine to its device.

TensorRT engines only run on the TensorRT version and GPU they were built with, so every
engine in a bundle's `engines/` folder has a JSON sidecar (`<engine>.json`) recording the
TensorRT version, GPU name, compute capability, precision, optimisation profile and the
sha256 of the ONNX it was built from. `find_engine` refuses an engine whose sidecar names
another TensorRT version, another GPU or a changed ONNX, and says how to rebuild it.

`TrtRunner` deserialises the engine, keeps pinned host buffers and device buffers sized for
the profile's largest batch, copies asynchronously on its own CUDA stream and can replay one
CUDA graph per batch size. `tensorrt` and cuda-python are imported only when a runner is
entered or the device is queried, so this module imports on any machine.

    >>> sidecar = EngineSidecar("10.3.0", "Orin", "8.7", "fp16", {"min": 1, "opt": 8, "max": 16},
    ...                         "ab" * 32)
    >>> engine_problems(sidecar, DeviceInfo("10.3.0", "Orin", "8.7"), "ab" * 32)
    []
    >>> engine_file_name(sidecar)
    'model.trt10.3.0.Orin.sm87.fp16.engine'
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from runtime.bundle import Bundle
from runtime.errors import ManifestError
from runtime.files import atomic_write_text

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"


class EngineMismatchError(RuntimeError):
    """An engine was built for another TensorRT version, GPU or ONNX model."""


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to on the machine that runs it."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


@dataclass(frozen=True)
class EngineSidecar:
    """The JSON written beside an engine when it is built."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: Mapping[str, int] = field(default_factory=dict)
    onnx_sha256: str = ""
    onnx_file: str = "model.onnx"

    @property
    def device(self) -> DeviceInfo:
        return DeviceInfo(self.tensorrt_version, self.gpu_name, self.compute_capability)


def read_sidecar(engine: str | os.PathLike[str]) -> EngineSidecar:
    """The sidecar of `engine` (``<engine>.json``); raises `ManifestError` naming the file."""
    path = Path(str(engine) + SIDECAR_SUFFIX)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return EngineSidecar(
            tensorrt_version=str(data["tensorrt_version"]), gpu_name=str(data["gpu_name"]),
            compute_capability=str(data["compute_capability"]),
            precision=str(data["precision"]),
            profile={str(k): int(v) for k, v in dict(data.get("profile", {})).items()},
            onnx_sha256=str(data.get("onnx_sha256", "")),
            onnx_file=str(data.get("onnx_file", "model.onnx")))
    except FileNotFoundError as exc:
        raise ManifestError(path, "engine sidecar is missing; rebuild the engine on this device "
                                  "with `naturelm-edge export engine BUNDLE`") from exc
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ManifestError(path, f"malformed engine sidecar: {exc}") from exc


def write_sidecar(engine: str | os.PathLike[str], sidecar: EngineSidecar) -> Path:
    """Write ``<engine>.json`` atomically (used by the engine builder)."""
    path = Path(str(engine) + SIDECAR_SUFFIX)
    atomic_write_text(path, json.dumps(asdict(sidecar), indent=2) + "\n")
    return path


def engine_file_name(sidecar: EngineSidecar) -> str:
    """``<onnx stem>.trt<version>.<gpu>.sm<cc>.<precision>.engine`` with a file-safe GPU name."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", sidecar.gpu_name).strip("-") or "gpu"
    stem = Path(sidecar.onnx_file).stem
    sm = sidecar.compute_capability.replace(".", "")
    return f"{stem}.trt{sidecar.tensorrt_version}.{gpu}.sm{sm}.{sidecar.precision}.engine"


def engine_problems(sidecar: EngineSidecar, device: DeviceInfo,
                    onnx_sha256: str | None = None) -> list[str]:
    """Why an engine cannot run here (empty when it can)."""
    problems = []
    if sidecar.tensorrt_version != device.tensorrt_version:
        problems.append(f"built with TensorRT {sidecar.tensorrt_version}, this device has "
                        f"TensorRT {device.tensorrt_version}")
    if (sidecar.gpu_name != device.gpu_name
            or sidecar.compute_capability != device.compute_capability):
        problems.append(f"built for {sidecar.gpu_name} (compute {sidecar.compute_capability}), "
                        f"this device is {device.gpu_name} (compute {device.compute_capability})")
    if onnx_sha256 is not None and sidecar.onnx_sha256 != onnx_sha256:
        problems.append(f"built from another {sidecar.onnx_file} (sha256 "
                        f"{sidecar.onnx_sha256[:12]}..., the bundle's is {onnx_sha256[:12]}...)")
    return problems


def rebuild_hint(bundle_root: str | os.PathLike[str], precision: str) -> str:
    return (f"rebuild it on this device: naturelm-edge export engine {bundle_root} "
            f"--precision {precision}")


def check_engine(engine: str | os.PathLike[str], device: DeviceInfo,
                 onnx_sha256: str | None = None, bundle_root: str | os.PathLike[str] = "BUNDLE",
                 ) -> EngineSidecar:
    """The engine's sidecar if it suits `device`; otherwise `EngineMismatchError` saying why
    and how to rebuild."""
    sidecar = read_sidecar(engine)
    problems = engine_problems(sidecar, device, onnx_sha256)
    if problems:
        raise EngineMismatchError(f"{engine}: refused: {'; '.join(problems)}; "
                                  f"{rebuild_hint(bundle_root, sidecar.precision)}")
    return sidecar


def find_engine(bundle: Bundle, precision: str = "fp16", device: DeviceInfo | None = None,
                ) -> Path:
    """The engine in the bundle's `engines/` folder built for this device at `precision`.

    Raises:
        EngineMismatchError: no engine at all, or only engines for another TensorRT, GPU or
            ONNX; the message says why and how to rebuild.
    """
    device = device if device is not None else current_device()
    candidates = sorted(bundle.engine_dir.glob(f"*.{precision}.engine"))
    refusals = []
    for engine in candidates:
        sidecar = read_sidecar(engine)
        onnx_hash = bundle.manifest.files.get(sidecar.onnx_file)
        problems = engine_problems(sidecar, device, onnx_hash)
        if not problems:
            return engine
        refusals.append(f"{engine.name}: {'; '.join(problems)}")
    found = f" (refused: {' | '.join(refusals)})" if refusals else ""
    raise EngineMismatchError(f"{bundle.engine_dir}: no {precision} engine for TensorRT "
                              f"{device.tensorrt_version} on {device.gpu_name}{found}; "
                              f"{rebuild_hint(bundle.root, precision)}")


def _cudart() -> Any:
    """cuda-python's runtime bindings (new and old module layouts)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6
    return cudart


def _check(result: Any) -> Any:
    """Unpack a cuda-python ``(error, value...)`` tuple, raising on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def current_device(device_index: int = 0) -> DeviceInfo:
    """TensorRT version, GPU name and compute capability here (imports tensorrt, cuda)."""
    import tensorrt as trt

    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(device_index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(trt.__version__, name.strip("\x00 "), f"{props.major}.{props.minor}")


@dataclass
class _Binding:
    name: str
    is_input: bool
    dtype: np.dtype
    max_shape: tuple[int, ...]
    host: np.ndarray
    host_ptr: int
    device_ptr: int


class TrtRunner:
    """A serialized TensorRT engine (checked against this device by `find_engine` or
    `check_engine`), run with pinned buffers, async copies and optional CUDA graphs."""

    def __init__(self, engine: str | os.PathLike[str], use_cuda_graph: bool = False,
                 profile_index: int = 0) -> None:
        self.engine_path = Path(engine)
        self.use_cuda_graph = use_cuda_graph
        self.profile_index = profile_index
        self._cudart: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._bindings: dict[str, _Binding] = {}
        self._graphs: dict[tuple[int, ...], Any] = {}

    def __enter__(self) -> TrtRunner:
        import tensorrt as trt

        check_engine(self.engine_path, current_device())
        self._cudart = _cudart()
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        self._engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise EngineMismatchError(f"{self.engine_path}: TensorRT could not deserialise the "
                                      f"engine; rebuild it with `naturelm-edge export engine`")
        self._context = self._engine.create_execution_context()
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._context.set_optimization_profile_async(self.profile_index, self._stream)
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            self._bindings[name] = self._allocate(trt, name)
        return self

    def _allocate(self, trt: Any, name: str) -> _Binding:
        engine = self._engine
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        if is_input:
            shape = tuple(engine.get_tensor_profile_shape(name, self.profile_index)[2])
            self._context.set_input_shape(name, shape)
        else:
            shape = tuple(self._context.get_tensor_shape(name))
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        host_ptr = _check(self._cudart.cudaMallocHost(nbytes))
        device_ptr = _check(self._cudart.cudaMalloc(nbytes))
        raw = (ctypes.c_byte * nbytes).from_address(int(host_ptr))
        host = np.frombuffer(raw, dtype=dtype)
        self._context.set_tensor_address(name, int(device_ptr))
        return _Binding(name, is_input, dtype, shape, host, int(host_ptr), int(device_ptr))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        cudart = self._cudart
        if cudart is None:
            return
        for graph in self._graphs.values():
            cudart.cudaGraphExecDestroy(graph)
        for binding in self._bindings.values():
            cudart.cudaFreeHost(binding.host_ptr)
            cudart.cudaFree(binding.device_ptr)
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
        self._graphs, self._bindings = {}, {}
        self._context = self._engine = self._stream = None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch (split into pieces no larger than the profile's maximum batch)."""
        if self._context is None:
            raise RuntimeError("TrtRunner used outside its `with` block")
        inputs = {b.name: b for b in self._bindings.values() if b.is_input}
        if set(feeds) != set(inputs):
            raise ValueError(f"{self.engine_path.name} takes inputs {sorted(inputs)}, "
                             f"got {sorted(feeds)}")
        first = next(iter(inputs.values()))
        total = int(np.asarray(feeds[first.name]).shape[0])
        step = first.max_shape[0]
        pieces = [self._run({k: np.asarray(v)[i:i + step] for k, v in feeds.items()})
                  for i in range(0, total, step)]
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, kind = self._cudart, self._cudart.cudaMemcpyKind
        for name, value in feeds.items():
            binding = self._bindings[name]
            array = np.ascontiguousarray(value, dtype=binding.dtype)
            self._context.set_input_shape(name, array.shape)
            binding.host[: array.size] = array.ravel()
            _check(cudart.cudaMemcpyAsync(binding.device_ptr, binding.host_ptr, array.nbytes,
                                          kind.cudaMemcpyHostToDevice, self._stream))
        key = tuple(np.shape(v)[0] for v in feeds.values())
        self._execute(key)
        outputs = {}
        for binding in (b for b in self._bindings.values() if not b.is_input):
            shape = tuple(self._context.get_tensor_shape(binding.name))
            nbytes = int(np.prod(shape)) * binding.dtype.itemsize
            _check(cudart.cudaMemcpyAsync(binding.host_ptr, binding.device_ptr, nbytes,
                                          kind.cudaMemcpyDeviceToHost, self._stream))
            outputs[binding.name] = (binding, shape)
        _check(cudart.cudaStreamSynchronize(self._stream))
        return {name: b.host[: int(np.prod(s))].reshape(s).copy()
                for name, (b, s) in outputs.items()}

    def _execute(self, key: tuple[int, ...]) -> None:
        cudart = self._cudart
        if not self.use_cuda_graph:
            if not self._context.execute_async_v3(self._stream):
                raise RuntimeError(f"{self.engine_path.name}: TensorRT execution failed")
            return
        if key not in self._graphs:
            # One plain run first flushes TensorRT's deferred work, then capture this shape.
            if not self._context.execute_async_v3(self._stream):
                raise RuntimeError(f"{self.engine_path.name}: TensorRT execution failed")
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _check(cudart.cudaStreamBeginCapture(self._stream, mode))
            self._context.execute_async_v3(self._stream)
            graph = _check(cudart.cudaStreamEndCapture(self._stream))
            self._graphs[key] = _check(cudart.cudaGraphInstantiate(graph, 0))
            _check(cudart.cudaGraphDestroy(graph))
            return
        _check(cudart.cudaGraphLaunch(self._graphs[key], self._stream))
