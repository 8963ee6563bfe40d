"""FP16 and INT8 variants of an exported student, each measured against FP32 on held-out clips.

- FP16 (`to_fp16`): ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``,
  shipped in the onnxruntime wheel) with float32 inputs and outputs kept, the whole front end
  (Conv1d DFT, power, mel MatMul, log) and every ``Log`` / ``Softmax`` left in FP32.
- INT8 (`to_int8`): static quantization with ``onnxruntime.quantization`` in the QDQ form that
  TensorRT's explicit quantization reads: symmetric int8 activations and per-channel symmetric
  int8 weights, calibrated on real corpus audio through `ClipReader` (a ``CalibrationDataReader``
  over manifest clips); the front end is excluded (``nodes_to_exclude``), since quantizing the
  mel front end wrecks agreement.

`agreement` is top-1 agreement per task between two sets of outputs; `check_variant` runs a
variant and FP32 on held-out clips and raises `PrecisionError` below the bar (FP16 99.5 %,
INT8 99 %).

    >>> ref = {"species_logits": np.array([[2.0, 1.0], [0.0, 3.0]])}
    >>> got = {"species_logits": np.array([[1.5, 1.4], [1.0, 0.5]])}
    >>> agreement(ref, got, ["species_logits"])
    {'species_logits': 0.5}
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

    from export.spec import ExportSpec

BARS = {"fp16": 0.995, "int8": 0.99}
FP32_OPS = ("Log", "Softmax")


class PrecisionError(RuntimeError):
    """A reduced-precision model disagrees with FP32 more than its bar allows."""


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (block and exclude lists work by name)."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def frontend_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the front-end nodes: the first ``Log`` and every node it depends on."""
    producers = {out: node for node in model.graph.node for out in node.output}
    first_log = next((n for n in model.graph.node if n.op_type == "Log"), None)
    if first_log is None:
        raise ValueError("no Log node in the graph: cannot find the log-mel front end")
    found: dict[str, Any] = {}
    stack = [first_log]
    while stack:
        node = stack.pop()
        if node.name in found:
            continue
        found[node.name] = node
        stack.extend(producers[name] for name in node.input if name in producers)
    return [n.name for n in model.graph.node if n.name in found]


def _load(path: str | os.PathLike[str]) -> onnx.ModelProto:
    import onnx

    model = onnx.load(str(path))
    _name_nodes(model)
    return model


def _save(model: onnx.ModelProto, out: str | os.PathLike[str], precision: str) -> Path:
    import onnx

    from export.onnx_export import read_manifest, set_manifest

    manifest = read_manifest(model)
    set_manifest(model, {**manifest, "precision": precision})
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path


def to_fp16(model_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the FP16 variant (float32 I/O; front end, Log and Softmax in FP32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = _load(model_path)
    blocked = frontend_nodes(model)
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False,
                                    op_block_list=list(FP32_OPS), node_block_list=blocked)
    return _save(half, out, "fp16")


class ClipReader:
    """A ``CalibrationDataReader`` yielding ``{"audio": [batch, samples]}`` from clip windows."""

    def __init__(self, clips: np.ndarray, batch: int = 8, input_name: str = "audio") -> None:
        if clips.ndim != 2 or not len(clips):
            raise ValueError(f"calibration clips must be a non-empty [clips, samples] array, got "
                             f"shape {clips.shape}")
        self.clips, self.batch, self.input_name = clips.astype(np.float32), batch, input_name
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.clips):
            return None
        piece = self.clips[self._next : self._next + self.batch]
        self._next += self.batch
        return {self.input_name: piece}

    def rewind(self) -> None:
        self._next = 0


def to_int8(model_path: str | os.PathLike[str], out: str | os.PathLike[str],
            calibration: np.ndarray, batch: int = 8) -> Path:
    """Write the static INT8 QDQ variant calibrated on ``calibration`` clips ``[N, samples]``."""
    import tempfile

    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    model = _load(model_path)
    excluded = frontend_nodes(model)
    path = Path(out)
    with tempfile.TemporaryDirectory(prefix="naturelm-int8-") as tmp:
        named, prepped, quant = (Path(tmp) / f for f in ("named.onnx", "prep.onnx", "q.onnx"))
        _save(model, named, "fp32")
        # Shape inference only: keep node names so the front-end exclusion still matches.
        quant_pre_process(str(named), str(prepped), skip_optimization=True,
                          skip_symbolic_shape=True)
        quantize_static(str(prepped), str(quant), ClipReader(calibration, batch),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        return _save(_load(quant), path, "int8")


def agreement(reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray],
              outputs: Iterable[str]) -> dict[str, float]:
    """Fraction of rows whose argmax agrees, per output."""
    out = {}
    for name in outputs:
        ref, got = np.asarray(reference[name]), np.asarray(other[name])
        if ref.shape != got.shape:
            raise ValueError(f"{name}: shapes differ: {ref.shape} vs {got.shape}")
        out[name] = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    return out


def task_outputs(spec: ExportSpec) -> list[str]:
    """The spec's ``<task>_logits`` outputs (everything but the embedding)."""
    return [n for n in spec.output_names if n.endswith("_logits")]


def check_variant(fp32_path: str | os.PathLike[str], variant_path: str | os.PathLike[str],
                  precision: str, clips: np.ndarray, spec: ExportSpec, quiet: bool = False,
                  ) -> dict[str, float]:
    """Top-1 agreement of ``variant_path`` with FP32 per task on ``clips``; raises
    `PrecisionError` when a task falls below the precision's bar."""
    from export.onnx_export import run_onnx

    if precision not in BARS:
        raise ValueError(f"unknown precision {precision!r}; known: {sorted(BARS)}")
    reference, other = run_onnx(fp32_path, clips), run_onnx(variant_path, clips)
    scores = agreement(reference, other, task_outputs(spec))
    if not quiet:
        for name, value in scores.items():
            print(f"{precision} vs fp32 {name}: top-1 agreement {value:.2%} on {len(clips)} "
                  f"clips (bar {BARS[precision]:.1%})")
    low = {n: v for n, v in scores.items() if v < BARS[precision]}
    if low:
        raise PrecisionError(f"{variant_path}: top-1 agreement with FP32 below "
                             f"{BARS[precision]:.1%}: "
                             + ", ".join(f"{n} {v:.2%}" for n, v in low.items()))
    return scores


def manifest_clips(manifest: str | os.PathLike[str], spec: ExportSpec,
                   splits: Sequence[str] = ("test", "valid"), limit: int | None = 256,
                   ) -> np.ndarray:
    """Windows ``[N, samples]`` of the distinct clips in ``manifest`` of the given splits, read
    and resampled with `runtime.audio`, padded or cut to the spec's window. Raises
    `ManifestError` when none is left."""
    from corpus.manifest import read_manifest as read_records
    from export.onnx_export import fit_window
    from runtime.audio import read_audio
    from runtime.errors import ManifestError

    seen: set[tuple[str, float, float | None]] = set()
    clips = []
    for record in read_records(manifest):
        if record.split not in splits or record.file_name is None:
            continue
        key = (record.file_name, record.offset_s, record.duration_s)
        if key in seen:
            continue
        seen.add(key)
        audio = read_audio(record.file_name, target_rate=spec.sample_rate,
                           offset_s=record.offset_s, duration_s=record.duration_s)
        clips.append(fit_window(audio, spec.samples, max_windows=1)[0])
        if limit is not None and len(clips) >= limit:
            break
    if not clips:
        raise ManifestError(manifest, f"no clips with audio files in splits {list(splits)}")
    return np.stack(clips)
