"""Which layers INT8 can take: each layer quantized alone, measured against FP32, as
``polygraphy debug precision`` is used to find the layers to keep in float.

`int8_sensitivity` quantizes one node at a time (the same QDQ form and calibration as
`export.precision.to_int8`) and runs it and FP32 on held-out clips: per node, the top-1
agreement per task and the relative error of the task logits (RMS error over the logits'
standard deviation, the worst task). `largest_passing_set` then takes the nodes from the least
to the most sensitive and finds, by bisection, the longest such run whose joint INT8 model
still reaches the INT8 bar, and the share of the multiply-accumulates it covers.

On the default demo's 60-epoch student `s` (68 Conv / Gemm nodes, 512 held-out clips): one
node alone already moves the logits by 0.1-7 % and 12 nodes alone fall below 99 % on count
(its classes are close: 10 % of clips have a top-2 margin under 0.14), and the longest passing
run is 25 nodes, 13 % of the MACs. Independent noise of 1 % of the logits' spread costs 1 % of
count's top-1 answers; INT8 adds about 15 %.

    >>> rows = [NodeSensitivity("a", "Conv", "pointwise", 30, {"x": 1.0}, 0.01),
    ...         NodeSensitivity("b", "Conv", "depthwise", 10, {"x": 0.9}, 0.2)]
    >>> [r.node for r in by_sensitivity(rows)]
    ['a', 'b']
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

    from export.spec import ExportSpec

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class NodeSensitivity:
    """One node quantized alone: its MACs per clip, top-1 agreement with FP32 per task and
    the worst task's relative logit error."""

    node: str
    op: str
    kind: str
    macs: int
    agreement: Mapping[str, float]
    rel_error: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agreement": dict(self.agreement)}


@dataclass(frozen=True)
class PassingSet:
    """The least sensitive nodes that hold the INT8 bar together."""

    nodes: tuple[str, ...]
    mac_share: float
    agreement: Mapping[str, float] | None

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": list(self.nodes), "mac_share": self.mac_share,
                "agreement": None if self.agreement is None else dict(self.agreement)}


def by_sensitivity(rows: Sequence[NodeSensitivity]) -> list[NodeSensitivity]:
    """Least sensitive first: by relative logit error, then by the lowest agreement."""
    return sorted(rows, key=lambda r: (r.rel_error, -min(r.agreement.values(), default=1.0)))


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates per clip of every Conv / Gemm / MatMul node outside the front end
    (output elements per clip times the reduction length). Needs static shapes past the
    batch dimension."""
    from onnx import numpy_helper, shape_inference

    from export.precision import frontend_nodes

    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input,
                        *inferred.graph.output]}
    weights = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    front = set(frontend_nodes(model))
    macs = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS or node.name in front:
            continue
        out = shapes.get(node.output[0], [])
        if node.op_type == "Conv":
            reduction = int(np.prod(weights[node.input[1]][1:]))
        else:
            a = shapes.get(node.input[0], [])
            transposed = any(x.name == "transA" and x.i for x in node.attribute)
            reduction = a[-2] if transposed else a[-1] if a else 0
        if len(out) < 2 or not all(out[1:]) or not reduction:
            raise ValueError(f"node {node.name!r}: no static shape past the batch dimension")
        macs[node.name] = int(np.prod(out[1:])) * int(reduction)
    return macs


def _relative_errors(reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray],
                     outputs: Sequence[str]) -> float:
    worst = 0.0
    for name in outputs:
        ref, got = np.asarray(reference[name], np.float64), np.asarray(other[name], np.float64)
        spread = float(ref.std()) or 1.0
        worst = max(worst, float(np.sqrt(np.mean((got - ref) ** 2))) / spread)
    return worst


def _measure(fp32: Path, nodes: Sequence[str], calibration: np.ndarray, heldout: np.ndarray,
             reference: Mapping[str, np.ndarray], outputs: Sequence[str], folder: Path,
             ) -> tuple[dict[str, float], float]:
    from export.onnx_export import run_onnx
    from export.precision import agreement, to_int8

    path = to_int8(fp32, folder / "int8.onnx", calibration, nodes=nodes)
    got = run_onnx(path, heldout)
    return agreement(reference, got, outputs), _relative_errors(reference, got, outputs)


def int8_sensitivity(fp32_path: str | os.PathLike[str], calibration: np.ndarray,
                     heldout: np.ndarray, spec: ExportSpec, progress: bool = False,
                     ) -> list[NodeSensitivity]:
    """Every Conv / Gemm / MatMul outside the front end quantized alone, in graph order."""
    from export.onnx_export import run_onnx
    from export.precision import conv_kinds, load_named, task_outputs

    fp32 = Path(fp32_path)
    model = load_named(fp32)
    macs, kinds = node_macs(model), conv_kinds(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    outputs = task_outputs(spec)
    reference = run_onnx(fp32, heldout)
    rows = []
    with tempfile.TemporaryDirectory(prefix="naturelm-sensitivity-") as tmp:
        for i, name in enumerate(macs):
            agree, error = _measure(fp32, [name], calibration, heldout, reference, outputs,
                                    Path(tmp))
            rows.append(NodeSensitivity(name, ops[name], kinds.get(name, ops[name].lower()),
                                        macs[name], agree, error))
            if progress:
                print(f"[{i + 1}/{len(macs)}] {name}: worst agreement "
                      f"{min(agree.values()):.2%}, logit error {error:.2%}", flush=True)
    return rows


def largest_passing_set(fp32_path: str | os.PathLike[str], rows: Sequence[NodeSensitivity],
                        calibration: np.ndarray, heldout: np.ndarray, spec: ExportSpec,
                        bar: float | None = None) -> PassingSet:
    """The longest run of the least sensitive nodes whose joint INT8 model reaches ``bar``
    (default the INT8 bar) on every task, by bisection over the run's length (so it assumes
    that a longer run agrees less, which holds up to the noise of the held-out set)."""
    from export.onnx_export import run_onnx
    from export.precision import BARS, task_outputs

    bar = BARS["int8"] if bar is None else bar
    fp32 = Path(fp32_path)
    order = [r.node for r in by_sensitivity(rows)]
    total = sum(r.macs for r in rows) or 1
    macs = {r.node: r.macs for r in rows}
    outputs = task_outputs(spec)
    reference = run_onnx(fp32, heldout)
    best: tuple[int, dict[str, float] | None] = (0, None)
    low, high = 0, len(order)
    with tempfile.TemporaryDirectory(prefix="naturelm-sensitivity-") as tmp:
        while low < high:
            mid = (low + high + 1) // 2
            agree, _ = _measure(fp32, order[:mid], calibration, heldout, reference, outputs,
                                Path(tmp))
            if min(agree.values()) >= bar:
                low, best = mid, (mid, agree)
            else:
                high = mid - 1
    chosen = tuple(order[:best[0]])
    return PassingSet(chosen, sum(macs[n] for n in chosen) / total, best[1])


def format_sensitivity(rows: Sequence[NodeSensitivity], passing: PassingSet,
                       bar: float) -> str:
    """A table, most sensitive node first, and a line on the passing set."""
    total = sum(r.macs for r in rows) or 1
    tasks = list(rows[0].agreement) if rows else []
    head = ["node", "kind", "MACs %", "logit err %", *(t.removesuffix("_logits") for t in tasks)]
    lines = [head]
    for r in reversed(by_sensitivity(rows)):
        lines.append([r.node, r.kind, f"{100 * r.macs / total:.1f}", f"{100 * r.rel_error:.2f}",
                      *(f"{100 * r.agreement[t]:.1f}" for t in tasks)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            for row in lines]
    below = sum(1 for r in rows if min(r.agreement.values(), default=1.0) < bar)
    text.append(f"{below} of {len(rows)} nodes alone fall below the {bar:.1%} bar; the "
                f"{len(passing.nodes)} least sensitive hold it together "
                f"({passing.mac_share:.1%} of the MACs)")
    return "\n".join(text)
