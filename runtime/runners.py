"""Runners: `with runner: out = runner.infer({"audio": batch})` for every backend.

`OrtRunner` runs an ONNX model on ONNX Runtime. The backend option picks the execution
providers with an explicit fallback order, and every fallback is logged:

- ``cpu``: CPUExecutionProvider
- ``cuda``: CUDAExecutionProvider -> CPUExecutionProvider
- ``tensorrt``: TensorrtExecutionProvider -> CUDAExecutionProvider -> CPUExecutionProvider

With ``strict=True`` a missing first choice raises instead. `open_runner` picks the model
file that suits the backend from the bundle (for example the STFT-op variant on the CPU
where the exporter shipped one, the Conv1d variant for TensorRT) or, for the ``engine``
backend, the native TensorRT engine built on this device (`runtime.trt_runner`).

    >>> import numpy as np
    >>> from runtime.bundle import load_bundle
    >>> bundle = load_bundle("bundle/")  # doctest: +SKIP
    >>> with open_runner(bundle, "cpu", threads=1) as runner:  # doctest: +SKIP
    ...     out = runner.infer({"audio": np.zeros((2, 16000), np.float32)})
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from runtime.bundle import Bundle

log = logging.getLogger(__name__)

ORT_BACKENDS = ("cpu", "cuda", "tensorrt")
RUNNER_BACKENDS = (*ORT_BACKENDS, "engine")
PROVIDER_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


@runtime_checkable
class Runner(Protocol):
    """What every backend honours (DESIGN.md contract 7)."""

    def __enter__(self) -> Runner: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class RunnerError(RuntimeError):
    """A runner cannot be built or used (missing provider, engine mismatch, wrong inputs)."""


def providers_for(backend: str, available: Sequence[str], strict: bool = False,
                  ) -> list[str]:
    """The ONNX Runtime providers to ask for, in order, for `backend` given the `available`
    ones; each skipped provider is logged. `strict` raises when the first choice is missing."""
    if backend not in PROVIDER_ORDER:
        raise ValueError(f"unknown ONNX Runtime backend {backend!r}; choose one of "
                         f"{', '.join(PROVIDER_ORDER)}")
    order = PROVIDER_ORDER[backend]
    chosen = [p for p in order if p in available]
    missing = [p for p in order if p not in available]
    if missing and strict and order[0] in missing:
        raise RunnerError(f"backend {backend!r} needs {order[0]}, which this onnxruntime build "
                          f"lacks (it has {', '.join(available)}); install onnxruntime-gpu "
                          f"(pip install 'naturelm-edge[gpu]') or choose --backend cpu")
    for name in missing:
        log.warning("backend %s: %s is not available; falling back to %s", backend, name,
                    " -> ".join(chosen))
    if not chosen:
        raise RunnerError(f"no provider for backend {backend!r} among {', '.join(available)}")
    return chosen


class OrtRunner:
    """An ONNX model on ONNX Runtime; the session is built on `__enter__`.

    Args:
        model: path of the .onnx file.
        backend: cpu, cuda or tensorrt (see the module docstring for the fallback order).
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
        strict: raise instead of falling back when the backend's provider is missing.
        cache_dir: where the TensorRT provider keeps its engine and timing caches.
    """

    def __init__(self, model: str | os.PathLike[str], backend: str = "cpu",
                 threads: int | None = None, strict: bool = False,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.model = Path(model)
        self.backend = backend
        self.threads = threads
        self.strict = strict
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._session: Any = None
        self.providers: list[str] = []

    def __enter__(self) -> OrtRunner:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        wanted = providers_for(self.backend, ort.get_available_providers(), self.strict)
        try:
            self._session = ort.InferenceSession(str(self.model), sess_options=options,
                                                 providers=self._with_options(wanted))
        except Exception as exc:  # noqa: BLE001 - re-raised with the model named
            raise RunnerError(f"{self.model}: ONNX Runtime cannot load the model: {exc}") from exc
        self.providers = list(self._session.get_providers())
        if self.providers[0] != wanted[0]:
            log.warning("backend %s: ONNX Runtime could not start %s; running on %s",
                        self.backend, wanted[0], " -> ".join(self.providers))
        log.info("%s on %s", self.model.name, " -> ".join(self.providers))
        return self

    def _with_options(self, providers: list[str]) -> list[Any]:
        out: list[Any] = []
        for name in providers:
            if name == "TensorrtExecutionProvider" and self.cache_dir is not None:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                out.append((name, {"trt_engine_cache_enable": True,
                                   "trt_engine_cache_path": str(self.cache_dir),
                                   "trt_timing_cache_enable": True,
                                   "trt_fp16_enable": True}))
            else:
                out.append(name)
        return out

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._session = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._live().get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._live().get_outputs()]

    def _live(self) -> Any:
        if self._session is None:
            raise RunnerError("runner used outside its `with` block")
        return self._session

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every model output by name."""
        session = self._live()
        expected = set(self.input_names)
        if set(feeds) != expected:
            raise RunnerError(f"{self.model.name} takes inputs {sorted(expected)}, "
                              f"got {sorted(feeds)}")
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        values = session.run(None, arrays)
        return dict(zip(self.output_names, values, strict=True))


def open_runner(bundle: Bundle, backend: str = "cpu", threads: int | None = None,
                precision: str | None = None, strict: bool = False,
                use_cuda_graph: bool = False) -> Runner:
    """The runner for `bundle` on `backend` (cpu, cuda, tensorrt or engine), built but not
    entered. ORT backends get the first model in the bundle that suits them (optionally of
    one precision); ``engine`` loads the TensorRT engine built for this device."""
    if backend not in RUNNER_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(RUNNER_BACKENDS)}")
    if backend == "engine":
        from runtime.trt_runner import TrtRunner, find_engine

        return TrtRunner(find_engine(bundle, precision or "fp16"), use_cuda_graph=use_cuda_graph)
    spec = bundle.model_for(backend, precision=precision)
    log.info("backend %s: model %s (%s, %s front end)", backend, spec.file, spec.precision,
             spec.variant)
    return OrtRunner(bundle.model_path(spec), backend=backend, threads=threads, strict=strict,
                     cache_dir=bundle.engine_dir / "ort-trt-cache")
