"""FP16 and INT8 variants of an exported student, each measured against FP32 on held-out clips.

- FP16 (`to_fp16`): ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``,
  shipped in the onnxruntime wheel) with float32 inputs and outputs kept, the whole front end
  (Conv1d DFT, power, mel MatMul, log) and every ``Log`` / ``Softmax`` left in FP32, then
  `keep_fp32_paths`: the tensors and weights between those FP32 nodes stay FP32 (the
  converter alone sends them through FP16).
- INT8 (`to_int8`): static quantization with ``onnxruntime.quantization`` in the QDQ form that
  TensorRT's explicit quantization reads: symmetric int8 activations and per-channel symmetric
  int8 weights, calibrated on real corpus audio through `ClipReader` (a ``CalibrationDataReader``
  over manifest clips); the front end is excluded (``nodes_to_exclude``), since quantizing the
  mel front end wrecks agreement. This is the model TensorRT (and CUDA) builds from.
- CPU INT8 (`to_int8_cpu`): the form ONNX Runtime's CPU kernels favour: the QOperator format
  (``QLinearConv`` / ``QGemm``), unsigned asymmetric activations with per-channel signed
  weights (U8S8, the kernels ORT's MLAS favours on x86), and only the ops INT8 speeds up: the
  pointwise (1x1) convolutions of at least ``min_channels`` in and out, and Gemm / MatMul.
  Depthwise convolutions, the stem, squeeze-excitation and hard-swish stay in float, as
  does the front end. Listed for the ``cpu`` backend only; `maybe_int8_cpu` keeps it only
  where it beats FP32 on this CPU (on an AVX-512 Xeon it does not for the ``s`` CNN: see
  ``benchmarks/int8_cpu.py``).

`conv_kinds` names the role of every Conv (stem, depthwise, pointwise, squeeze, dense).
`agreement` is top-1 agreement per task between two sets of outputs; `check_variant` runs a
variant and FP32 on held-out clips and raises `PrecisionError` below the bar (FP16 99.5 %,
INT8 99 %).

    >>> ref = {"species_logits": np.array([[2.0, 1.0], [0.0, 3.0]])}
    >>> got = {"species_logits": np.array([[1.5, 1.4], [1.0, 0.5]])}
    >>> agreement(ref, got, ["species_logits"])
    {'species_logits': 0.5}
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

    from export.spec import ExportSpec

BARS = {"fp16": 0.995, "int8": 0.99}
# Pointwise convs narrower than this stay in float in the CPU INT8 variant: each quantized one
# pays a quantize, a dequantize and two layout changes around it, which only a wide enough
# GEMM earns back. Measured on an AVX-512 VNNI Xeon, ORT 1.32, one thread, 10 s window, body
# only: the `m` CNN 1.04-1.14x faster than FP32 at 64, 0.92-1.06x at 32, 0.76x at 0 (every
# pointwise conv); the `s` CNN has no pointwise conv this wide (benchmarks/int8_cpu.py).
CPU_INT8_MIN_CHANNELS = 64
FP32_OPS = ("Log", "Softmax")


class PrecisionError(RuntimeError):
    """A reduced-precision model disagrees with FP32 more than its bar allows; ``scores`` holds
    the agreement per output that was measured (empty where no measurement was made)."""

    def __init__(self, message: str, scores: Mapping[str, float] | None = None) -> None:
        super().__init__(message)
        self.scores = dict(scores or {})


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


def load_named(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """An ONNX model with every node named (`_name_nodes`), as node lists refer to them."""
    import onnx

    model = onnx.load(str(path))
    _name_nodes(model)
    return model


def _save(model: onnx.ModelProto, out: str | os.PathLike[str], precision: str,
          **fields: Any) -> Path:
    import onnx

    from export.onnx_export import read_manifest, set_manifest

    manifest = read_manifest(model)
    set_manifest(model, {**manifest, "precision": precision, **fields})
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path


def to_fp16(model_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the FP16 variant (float32 I/O; front end, Log and Softmax in FP32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_named(model_path)
    source = copy.deepcopy(model)  # the converter rewrites its argument in place
    blocked = frontend_nodes(model)
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False,
                                    op_block_list=list(FP32_OPS), node_block_list=blocked)
    fp32_nodes = set(blocked) | {n.name for n in half.graph.node if n.op_type in FP32_OPS}
    keep_fp32_paths(half, source, fp32_nodes)
    return _save(half, out, "fp16")


def _cast_to(node: onnx.NodeProto) -> int | None:
    """The target type of a ``Cast`` node, None for any other node."""
    if node.op_type != "Cast":
        return None
    return next(a.i for a in node.attribute if a.name == "to")


def keep_fp32_paths(half: onnx.ModelProto, source: onnx.ModelProto,
                    fp32_nodes: set[str]) -> None:
    """Take the FP16 round trips out of the paths into FP32 nodes, in place.

    The float16 converter runs blocked nodes in FP32 but sends every tensor between them
    through FP16 (a Cast down after each node, a Cast up before the next), so the "FP32" front
    end had 11-bit intermediates, with power and mel values nearer FP16's 65504 ceiling than a
    loud recording allows. Here a Cast up reads the FP32 tensor itself where its input is a
    Cast down of an FP32 node's output or of the graph input; where it is a weight, the weight
    in FP32 (the source model's, if the converter stored it in FP16). Casts nobody reads any
    more are dropped. ONNX Runtime before 1.32 made one Cast per consumer under one name (two
    nodes named ``conv1d_cast_to_fp32_node``: a model ORT refuses to load); exact duplicates
    are dropped and any other clash raises `PrecisionError`.
    """
    from onnx import TensorProto, numpy_helper

    graph = half.graph
    producers = {out: node for node in graph.node for out in node.output}
    inputs = {v.name for v in graph.input}
    outputs = {v.name for v in graph.output}
    originals = {i.name: i for i in source.graph.initializer}
    weights = {i.name: i for i in graph.initializer}
    rename: dict[str, str] = {}
    for node in graph.node:
        if _cast_to(node) != TensorProto.FLOAT or node.output[0] in outputs:
            continue
        src = node.input[0]
        down = producers.get(src)
        if down is not None and _cast_to(down) == TensorProto.FLOAT16:
            origin = down.input[0]
            made_by = producers.get(origin)
            if origin in inputs or (made_by is not None and made_by.name in fp32_nodes):
                rename[node.output[0]] = origin
        elif src in weights and weights[src].data_type == TensorProto.FLOAT:
            rename[node.output[0]] = src  # a Cast of an FP32 weight to FP32
        elif (src in weights and weights[src].data_type == TensorProto.FLOAT16
              and src in originals and originals[src].data_type == TensorProto.FLOAT):
            restored = f"{src}_fp32"
            if restored not in weights:
                tensor = numpy_helper.from_array(numpy_helper.to_array(originals[src]), restored)
                graph.initializer.append(tensor)
                weights[restored] = tensor
            rename[node.output[0]] = restored
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    _drop_dead_casts(half)
    _drop_duplicate_nodes(half)


def _drop_dead_casts(model: onnx.ModelProto) -> None:
    """Remove Casts whose outputs nothing reads, then initializers and value infos left over."""
    graph = model.graph
    outputs = {v.name for v in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not set(n.output) & read]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | outputs
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)
    made = {out for node in graph.node for out in node.output}
    seen: set[str] = set()
    for info in list(graph.value_info):
        if info.name not in made or info.name in seen:
            graph.value_info.remove(info)
        seen.add(info.name)


def _drop_duplicate_nodes(model: onnx.ModelProto) -> None:
    """Drop exact duplicates of a node; refuse two different nodes under one name or output."""
    graph = model.graph
    kept: dict[str, bytes] = {}
    made: dict[str, str] = {}
    for node in list(graph.node):
        body = node.SerializeToString(deterministic=True)
        if kept.get(node.name) == body:
            graph.node.remove(node)
            continue
        if node.name in kept:
            raise PrecisionError(f"the float16 converter made two different nodes named "
                                 f"{node.name!r}; this onnxruntime cannot make the FP16 variant")
        for out in node.output:
            if out in made:
                raise PrecisionError(f"the float16 converter made two nodes writing {out!r} "
                                     f"({made[out]!r} and {node.name!r})")
            made[out] = node.name
        kept[node.name] = body


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
            calibration: np.ndarray, batch: int = 8, nodes: Sequence[str] | None = None) -> Path:
    """Write the static INT8 QDQ variant calibrated on ``calibration`` clips ``[N, samples]``;
    ``nodes`` (names after `_name_nodes`) limits quantization to those nodes (default: every
    node outside the front end)."""
    import tempfile

    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if nodes is not None and not nodes:
        raise ValueError("no nodes to quantize (onnxruntime would read an empty list as all)")
    model = load_named(model_path)
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
                        nodes_to_quantize=None if nodes is None else list(nodes),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        return _save(load_named(quant), path, "int8")


CONV_KINDS = ("stem", "depthwise", "pointwise", "squeeze", "dense")


def conv_kinds(model: onnx.ModelProto) -> dict[str, str]:
    """The role of every 2-D ``Conv`` node by name: ``stem`` (one input channel, k > 1),
    ``depthwise`` (grouped), ``squeeze`` (1x1 on a 1x1 map: squeeze-excitation), ``pointwise``
    (other 1x1) or ``dense`` (other k x k). Needs static spatial shapes (a fixed window)."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input]}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    kinds = {}
    for node in model.graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "Conv" else None
        if weight is None or len(weight) != 4:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        spatial = shapes.get(node.input[0], [])[2:]
        if group > 1:
            kinds[node.name] = "depthwise"
        elif weight[2:] != [1, 1]:
            kinds[node.name] = "stem" if weight[1] == 1 else "dense"
        else:
            kinds[node.name] = "squeeze" if spatial == [1, 1] else "pointwise"
    return kinds


def to_int8_cpu(model_path: str | os.PathLike[str], out: str | os.PathLike[str],
                calibration: np.ndarray, kinds: Sequence[str] = ("pointwise",),
                min_channels: int = CPU_INT8_MIN_CHANNELS, batch: int = 8,
                ops: Sequence[str] = ("Conv", "Gemm", "MatMul")) -> Path:
    """Write the CPU INT8 variant: QOperator U8S8 with per-channel weights, quantizing only the
    Conv nodes of ``kinds`` (see `conv_kinds`) whose weight has at least ``min_channels`` input
    and output channels, and Gemm / MatMul; the front end stays in float."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    unknown = sorted(set(kinds) - set(CONV_KINDS))
    if unknown:
        raise ValueError(f"unknown conv kinds {unknown}; known: {list(CONV_KINDS)}")
    model = load_named(model_path)
    with tempfile.TemporaryDirectory(prefix="naturelm-int8cpu-") as tmp:
        named, prepped, quant = (Path(tmp) / f for f in ("named.onnx", "prep.onnx", "q.onnx"))
        _save(model, named, "fp32")
        quant_pre_process(str(named), str(prepped), skip_optimization=True,
                          skip_symbolic_shape=True)
        prep = onnx.load(str(prepped))
        weights = {i.name: list(i.dims) for i in prep.graph.initializer}
        nodes = {n.name: n for n in prep.graph.node}
        chosen = {name for name, kind in conv_kinds(prep).items() if kind in kinds
                  and min(weights[nodes[name].input[1]][:2]) >= min_channels}
        excluded = set(frontend_nodes(prep)) | {
            n.name for n in prep.graph.node if n.op_type == "Conv" and n.name not in chosen}
        quantize_static(str(prepped), str(quant), ClipReader(calibration, batch),
                        quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=list(ops),
                        nodes_to_exclude=sorted(excluded),
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        form = {"format": "qoperator", "activations": "uint8", "weights": "int8 per-channel",
                "conv_kinds": list(kinds), "min_channels": min_channels,
                "quantized_convs": len(chosen)}
        return _save(load_named(quant), out, "int8", quantization=form)


@dataclass(frozen=True)
class CpuInt8Decision:
    """The CPU INT8 variant's agreement with FP32, whether it was kept, and (in ``auto`` mode)
    the whole-model CPU latencies per window behind that."""

    agreement: Mapping[str, float]
    kept: bool = True
    fp32_ms: float | None = None
    int8_cpu_ms: float | None = None
    threads: int = 1

    @property
    def speedup(self) -> float | None:
        if self.fp32_ms is None or self.int8_cpu_ms is None:
            return None
        return self.fp32_ms / self.int8_cpu_ms

    def line(self) -> str:
        if self.speedup is None:
            return "CPU INT8 variant: kept without timing (mode always)"
        return (f"CPU INT8 variant: {self.int8_cpu_ms:.3f} ms vs FP32 {self.fp32_ms:.3f} ms per "
                f"window ({self.speedup:.2f}x, {self.threads} thread(s)): "
                + ("kept for the cpu backend" if self.kept else "not kept (FP32 is faster)"))


def paired_cpu_latency_ms(paths: Sequence[str | os.PathLike[str]], audio: np.ndarray,
                          threads: int = 1, repeats: int = 30) -> list[float]:
    """Median milliseconds of one ``infer`` of ``audio`` for each model on ONNX Runtime's CPU
    provider, the models taking turns run by run (so load on a shared machine hits all)."""
    import time

    from runtime.runners import OrtRunner

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runners = [OrtRunner(p, backend="cpu", threads=threads).__enter__() for p in paths]
    times: list[list[float]] = [[] for _ in runners]
    try:
        for runner in runners:
            runner.infer({"audio": audio})
        for _ in range(repeats):
            for runner, spent in zip(runners, times, strict=True):
                start = time.perf_counter()
                runner.infer({"audio": audio})
                spent.append((time.perf_counter() - start) * 1e3)
    finally:
        for runner in runners:
            runner.__exit__(None, None, None)
    return [float(np.median(t)) for t in times]


def maybe_int8_cpu(fp32_path: str | os.PathLike[str], out: str | os.PathLike[str],
                   calibration: np.ndarray, heldout: np.ndarray, spec: ExportSpec,
                   mode: str = "auto", threads: int = 1, repeats: int = 30,
                   min_channels: int = CPU_INT8_MIN_CHANNELS, quiet: bool = False,
                   ) -> tuple[Path | None, CpuInt8Decision | None]:
    """Write the CPU INT8 variant to ``out`` when ``mode`` is ``always``, or ``auto`` and it
    beats FP32 here (median of ``repeats`` single-window runs each, taking turns, on
    ``threads`` CPU threads); ``never`` writes nothing. Its agreement with FP32 on ``heldout``
    must reach the INT8 bar (`PrecisionError` otherwise); ``min_channels`` is
    `to_int8_cpu`'s. Returns the path (None when not
    kept: the file is deleted) and the decision (None for ``never``)."""
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"unknown CPU INT8 mode {mode!r}; choose auto, always or never")
    if mode == "never":
        return None, None
    path = to_int8_cpu(fp32_path, out, calibration, min_channels=min_channels)
    scores = check_variant(fp32_path, path, "int8", heldout, spec, quiet=quiet)
    if mode == "always":
        return path, CpuInt8Decision(scores)
    fp32_ms, int8_ms = paired_cpu_latency_ms([fp32_path, path], heldout[:1], threads, repeats)
    decision = CpuInt8Decision(scores, int8_ms < fp32_ms, fp32_ms, int8_ms, threads)
    if not quiet:
        print(decision.line())
    if not decision.kept:
        path.unlink()
        return None, decision
    return path, decision


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
                             + ", ".join(f"{n} {v:.2%}" for n, v in low.items()), scores)
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
