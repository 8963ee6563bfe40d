"""FP16 and INT8 variants: float32 I/O, front end kept out, agreement with FP32, refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from export.bundle import read_report
from export.compare import compare_models
from export.onnx_export import export_student, read_manifest
from export.precision import (
    ClipReader,
    PrecisionError,
    check_variant,
    frontend_nodes,
    manifest_clips,
)
from export.spec import ExportSpec


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def test_fp16_keeps_float32_io_and_an_fp32_front_end(export_dir: Path) -> None:
    fp32 = onnx.load(str(export_dir / "model.onnx"))
    half = onnx.load(str(export_dir / "model.fp16.onnx"))
    assert read_manifest(half)["precision"] == "fp16"
    for value in [*half.graph.input, *half.graph.output]:
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT, value.name
    initial = {i.name: i.data_type for i in half.graph.initializer}
    assert TensorProto.FLOAT16 in initial.values()  # the network body is in FP16
    front = set(frontend_nodes(fp32))
    assert {"Conv", "MatMul", "Log"} <= {n.op_type for n in fp32.graph.node if n.name in front}
    for node in half.graph.node:
        if node.name in front:
            weights = [initial[i] for i in node.input if i in initial]
            assert TensorProto.FLOAT16 not in weights, node.name


def test_int8_is_qdq_per_channel_with_the_front_end_unquantized(export_dir: Path) -> None:
    fp32 = onnx.load(str(export_dir / "model.onnx"))
    q = onnx.load(str(export_dir / "model.int8.onnx"))
    ops = [n.op_type for n in q.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not {"QLinearConv", "QLinearMatMul", "ConvInteger"} & set(ops)  # QDQ, not QOperator
    producers = _producers(q)
    front = set(frontend_nodes(fp32))
    for node in q.graph.node:
        inputs = [producers.get(i) for i in node.input]
        dequantized = any(p is not None and p.op_type == "DequantizeLinear" for p in inputs)
        if node.name in front:
            assert not dequantized, f"front-end node {node.name} was quantized"
    inits = {i.name: i for i in q.graph.initializer}
    weight_dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT8
                 and len(inits[n.input[0]].dims) == 4]
    assert weight_dq, "no quantized conv weights"
    for node in weight_dq:  # per-channel: one scale per output channel
        scale = inits[node.input[1]]
        assert scale.dims[0] == inits[node.input[0]].dims[0] > 1


def test_variants_agree_with_fp32_on_held_out_clips(export_dir: Path, manifest: Path,
                                                    spec: ExportSpec) -> None:
    report = read_report(export_dir)
    assert report["heldout"]["clips"] == 16
    assert report["calibration"] == {"manifest": str(manifest), "split": "train", "clips": 32}
    assert min(report["agreement_fp32"]["fp16"].values()) >= 0.995
    assert min(report["agreement_fp32"]["int8"].values()) >= 0.99
    clips = manifest_clips(manifest, spec, ("test",))
    scores = check_variant(export_dir / "model.onnx", export_dir / "model.int8.onnx", "int8",
                           clips, spec, quiet=True)
    assert scores == report["agreement_fp32"]["int8"]
    rows = compare_models(None, {"fp32": export_dir / "model.onnx",
                                 "int8": export_dir / "model.int8.onnx"}, clips,
                          reference="fp32")
    species = next(r for r in rows if r.output == "species_logits")
    assert 0 < species.mean_abs <= species.max_abs and species.top1 == scores["species_logits"]


def test_a_model_that_disagrees_is_refused(tmp_path: Path, export_dir: Path,
                                          student: torch.nn.Module, spec: ExportSpec,
                                          clips: np.ndarray) -> None:
    other = copy.deepcopy(student)
    with torch.no_grad():
        other.heads["species"].weight.copy_(other.heads["species"].weight.roll(1, 0))
        other.heads["species"].bias.copy_(other.heads["species"].bias.roll(1, 0))
    export_student(other, tmp_path / "other.onnx", spec)
    with pytest.raises(PrecisionError, match="species_logits 0.00%"):
        check_variant(export_dir / "model.onnx", tmp_path / "other.onnx", "fp16", clips, spec,
                      quiet=True)


def test_calibration_reader_and_manifest_clips(manifest: Path, spec: ExportSpec,
                                               clips: np.ndarray) -> None:
    train = manifest_clips(manifest, spec, ("train",))
    np.testing.assert_array_equal(train, np.delete(clips, np.arange(0, len(clips), 3), axis=0))
    reader = ClipReader(train, batch=10)
    sizes = [len(b["audio"]) for b in iter(reader.get_next, None)]
    assert sizes == [10, 10, 10, 2]
    reader.rewind()
    assert reader.get_next()["audio"].shape == (10, spec.samples)
    with pytest.raises(ValueError, match="non-empty"):
        ClipReader(np.zeros((0, 5), np.float32))
    from runtime.errors import ManifestError

    with pytest.raises(ManifestError, match="no clips with audio files in splits"):
        manifest_clips(manifest, spec, ("valid",))
