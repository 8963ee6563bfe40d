"""Compare torch, ONNX Runtime FP32 / FP16 / INT8 and TensorRT on the same inputs.

Torch (the student itself) is the reference. For every other model and every output this
prints the largest and mean absolute difference and, for task outputs, the top-1 agreement
with the reference (Polygraphy's comparator, per task). TensorRT engines join when TensorRT
and a GPU are present; `runtime.runners` and `runtime.trt_runner` run them, so the comparison
is backend-blind.

    >>> ref = {"species_logits": np.array([[1.0, 0.0], [0.0, 1.0]]), "embedding": np.ones((2, 3))}
    >>> got = {"species_logits": np.array([[0.9, 0.1], [0.6, 0.4]]), "embedding": np.ones((2, 3))}
    >>> rows = compare_outputs("int8", ref, got)
    >>> print(format_table(rows))
    | model | output | max abs | mean abs | top-1 agreement |
    | --- | --- | --- | --- | --- |
    | int8 | species_logits | 0.6 | 0.35 | 50.00% |
    | int8 | embedding | 0 | 0 | - |
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class CompareRow:
    """One model's difference from the reference on one output."""

    model: str
    output: str
    max_abs: float
    mean_abs: float
    top1: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_outputs(label: str, reference: Mapping[str, np.ndarray],
                    other: Mapping[str, np.ndarray]) -> list[CompareRow]:
    """Rows for every output of ``reference`` (top-1 agreement for ``*_logits`` only)."""
    rows = []
    for name, ref in reference.items():
        if name not in other:
            raise KeyError(f"model {label!r} has no output {name!r}")
        want, got = np.asarray(ref, np.float64), np.asarray(other[name], np.float64)
        if want.shape != got.shape:
            raise ValueError(f"model {label!r}, output {name!r}: shape {got.shape}, expected "
                             f"{want.shape}")
        diff = np.abs(got - want)
        top1 = (float(np.mean(want.argmax(-1) == got.argmax(-1)))
                if name.endswith("_logits") else None)
        rows.append(CompareRow(label, name, float(diff.max()), float(diff.mean()), top1))
    return rows


def format_table(rows: list[CompareRow]) -> str:
    """A markdown table of the rows."""
    lines = ["| model | output | max abs | mean abs | top-1 agreement |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        top1 = "-" if r.top1 is None else f"{r.top1:.2%}"
        lines.append(f"| {r.model} | {r.output} | {r.max_abs:.3g} | {r.mean_abs:.3g} | {top1} |")
    return "\n".join(lines)


def tensorrt_available() -> bool:
    """TensorRT and cuda-python importable (a GPU is checked when an engine is opened)."""
    return all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "cuda"))


def _run_engine(path: Path, audio: np.ndarray) -> Outputs:
    from runtime.trt_runner import TrtRunner

    with TrtRunner(path) as runner:
        return runner.infer({"audio": audio})


def cpu_latency_ms(path: str | os.PathLike[str], audio: np.ndarray, threads: int = 1,
                   repeats: int = 20) -> float:
    """Median milliseconds of one ``infer`` of ``audio`` on ONNX Runtime's CPU provider, after
    one warm-up run (a quick figure for bundles; `benchmarks` measures latency in full)."""
    import time

    from runtime.runners import OrtRunner

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with OrtRunner(path, backend="cpu", threads=threads) as runner:
        runner.infer({"audio": audio})
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.infer({"audio": audio})
            times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def compare_models(student: nn.Module | None, models: Mapping[str, str | os.PathLike[str]],
                   audio: np.ndarray, engines: Mapping[str, str | os.PathLike[str]] | None = None,
                   reference: str = "torch", threads: int = 1) -> list[CompareRow]:
    """Run every model on ``audio`` and compare each with the reference.

    Args:
        student: the torch student (the reference when ``reference == "torch"``), or None.
        models: ``{label: onnx path}`` run on ONNX Runtime's CPU provider.
        audio: ``[clips, samples]`` float32 windows.
        engines: ``{label: engine path}`` run on native TensorRT.
        reference: ``"torch"`` or one label of ``models`` to compare against.
        threads: ONNX Runtime intra-op threads.
    """
    from export.onnx_export import run_onnx, run_torch

    runs: dict[str, Callable[[], Outputs]] = {}
    if student is not None:
        runs["torch"] = lambda: run_torch(student, audio)
    for label, path in models.items():
        runs[label] = lambda p=path: run_onnx(p, audio, threads=threads)
    for label, path in (engines or {}).items():
        runs[label] = lambda p=Path(path): _run_engine(p, audio)
    if reference not in runs:
        raise ValueError(f"reference {reference!r} is not among the models: {sorted(runs)}")
    want = runs[reference]()
    rows: list[CompareRow] = []
    for label, run in runs.items():
        if label != reference:
            rows += compare_outputs(label, want, run())
    return rows
