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
    # Every front-end node reads the audio, a weight not in FP16 or another front-end node's output:
    # no Cast between them, so no intermediate or weight passes through FP16.
    producers = _producers(half)
    audio = {v.name for v in half.graph.input}
    for node in half.graph.node:
        if node.name not in front:
            continue
        for name in node.input:
            if name in initial:
                assert initial[name] != TensorProto.FLOAT16, (node.name, name)
            else:
                assert name in audio or producers[name].name in front, (node.name, name)
    names = [n.name for n in half.graph.node]
    assert len(names) == len(set(names))


def _cast(src: str, dst: str, to: int, name: str) -> onnx.NodeProto:
    return onnx.helper.make_node("Cast", [src], [dst], to=to, name=name)


def test_fp16_round_trips_between_fp32_nodes_are_folded_and_duplicates_dropped() -> None:
    """The graph ONNX Runtime 1.30's float16 converter makes of an FP32 Conv read by two FP32
    Slices: a Cast down after the Conv, and one Cast up per Slice under one name (a model ORT
    refuses to load). After `keep_fp32_paths` the Slices read the Conv itself."""
    from onnx import helper, numpy_helper

    from export.precision import keep_fp32_paths

    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    w = np.arange(6, dtype=np.float32).reshape(2, 1, 3)
    axes, starts, ends = (numpy_helper.from_array(np.array(v, np.int64), n)
                          for v, n in ((1, "axes"), (0, "s0"), (1, "e0")))
    source = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["conv"], name="conv_node"),
         helper.make_node("Slice", ["conv", "s0", "e0", "axes"], ["a"], name="slice_a"),
         helper.make_node("Slice", ["conv", "s0", "e0", "axes"], ["b"], name="slice_b")],
        "g", [helper.make_tensor_value_info("x", f32, [1, 1, 8])],
        [helper.make_tensor_value_info(n, f32, [1, 1, 6]) for n in ("a", "b")],
        [numpy_helper.from_array(w, "w"), axes, starts, ends]))
    half = copy.deepcopy(source)
    graph = half.graph
    graph.initializer[0].CopyFrom(numpy_helper.from_array(w.astype(np.float16), "w"))
    del graph.node[:]
    graph.node.extend([
        _cast("w", "w_cast_to_fp32", f32, "w_cast_to_fp32_node"),
        helper.make_node("Conv", ["x", "w_cast_to_fp32"], ["conv_cast_to_fp16"],
                         name="conv_node"),
        _cast("conv_cast_to_fp16", "conv", f16, "conv_cast_to_fp16_node"),
        _cast("conv", "conv_cast_to_fp32", f32, "conv_cast_to_fp32_node"),
        helper.make_node("Slice", ["conv_cast_to_fp32", "s0", "e0", "axes"], ["a"],
                         name="slice_a"),
        _cast("conv", "conv_cast_to_fp32", f32, "conv_cast_to_fp32_node"),
        helper.make_node("Slice", ["conv_cast_to_fp32", "s0", "e0", "axes"], ["b"],
                         name="slice_b")])
    keep_fp32_paths(half, source, {"conv_node", "slice_a", "slice_b"})
    onnx.checker.check_model(half, full_check=True)
    assert [n.op_type for n in graph.node] == ["Conv", "Slice", "Slice"]
    assert [list(n.input)[0] for n in graph.node] == ["x", "conv_cast_to_fp16",
                                                       "conv_cast_to_fp16"]
    weight = next(i for i in graph.initializer if i.name == graph.node[0].input[1])
    assert weight.data_type == f32
    np.testing.assert_array_equal(numpy_helper.to_array(weight), w)

    clash = copy.deepcopy(source)
    clash.graph.node[2].name = "slice_a"
    with pytest.raises(PrecisionError, match="two different nodes named 'slice_a'"):
        keep_fp32_paths(clash, source, set())


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


def test_conv_kinds_name_every_convolution_of_the_student(export_dir: Path) -> None:
    from export.precision import conv_kinds

    model = onnx.load(str(export_dir / "model.onnx"))
    kinds = conv_kinds(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    front = set(frontend_nodes(model))
    # Every 2-D conv is named; the front end's Conv1d DFT is not a 2-D conv.
    assert set(kinds) == {n.name for n in convs if n.name not in front}
    counts = {k: list(kinds.values()).count(k) for k in set(kinds.values())}
    # Four blocks: the stem, a depthwise per block, the last block's squeeze-excitation.
    assert counts["stem"] == 1 and counts["depthwise"] == 4 and counts["squeeze"] == 2
    assert counts["pointwise"] >= 4 and "dense" not in counts


def test_cpu_int8_quantizes_only_pointwise_convs_and_agrees(tmp_path: Path, export_dir: Path,
                                                            manifest: Path,
                                                            spec: ExportSpec) -> None:
    from export.precision import conv_kinds, to_int8_cpu

    fp32 = onnx.load(str(export_dir / "model.onnx"))
    kinds = conv_kinds(fp32)
    calib = manifest_clips(manifest, spec, ("train",))
    path = to_int8_cpu(export_dir / "model.onnx", tmp_path / "cpu.onnx", calib, min_channels=0)
    q = onnx.load(str(path))
    manifest_ = read_manifest(q)
    assert manifest_["precision"] == "int8"
    assert manifest_["quantization"]["format"] == "qoperator"
    ops = [n.op_type for n in q.graph.node]
    assert "QLinearConv" in ops and "QuantizeLinear" in ops
    quantized = [n for n in q.graph.node if n.op_type == "QLinearConv"]
    pointwise = [k for k in kinds.values() if k == "pointwise"]
    assert len(quantized) == len(pointwise) == manifest_["quantization"]["quantized_convs"]
    inits = {i.name: i for i in q.graph.initializer}
    for node in quantized:  # u8 activations, per-channel s8 weights
        assert inits[node.input[2]].data_type == TensorProto.UINT8
        assert inits[node.input[3]].data_type == TensorProto.INT8
        assert inits[node.input[4]].dims[0] == inits[node.input[3]].dims[0] > 1
    float_kinds = {kinds[n.name] for n in q.graph.node if n.op_type == "Conv" and n.name in kinds}
    assert float_kinds == {"stem", "depthwise", "squeeze"}
    front = set(frontend_nodes(fp32))
    assert front <= {n.name for n in q.graph.node}  # the front end is untouched
    clips = manifest_clips(manifest, spec, ("test",))
    scores = check_variant(export_dir / "model.onnx", path, "int8", clips, spec, quiet=True)
    assert min(scores.values()) >= 0.99
    none = to_int8_cpu(export_dir / "model.onnx", tmp_path / "none.onnx", calib,
                       min_channels=4096)
    assert read_manifest(none)["quantization"]["quantized_convs"] == 0
    assert "QLinearConv" not in {n.op_type for n in onnx.load(str(none)).graph.node}
    with pytest.raises(ValueError, match="unknown conv kinds \\['grouped'\\]"):
        to_int8_cpu(export_dir / "model.onnx", tmp_path / "x.onnx", calib, kinds=["grouped"])


def test_cpu_int8_is_kept_only_where_it_is_faster(tmp_path: Path, export_dir: Path,
                                                  manifest: Path, spec: ExportSpec) -> None:
    from export.precision import maybe_int8_cpu, paired_cpu_latency_ms

    calib = manifest_clips(manifest, spec, ("train",))[:8]
    heldout = manifest_clips(manifest, spec, ("test",))
    fp32 = export_dir / "model.onnx"
    assert maybe_int8_cpu(fp32, tmp_path / "a.onnx", calib, heldout, spec, "never") == (
        None, None)
    assert not (tmp_path / "a.onnx").exists()
    path, decision = maybe_int8_cpu(fp32, tmp_path / "b.onnx", calib, heldout, spec, "always",
                                    min_channels=0, quiet=True)
    assert path == tmp_path / "b.onnx" and path.is_file()
    assert decision is not None and decision.kept and decision.speedup is None
    assert min(decision.agreement.values()) >= 0.99
    path, decision = maybe_int8_cpu(fp32, tmp_path / "c.onnx", calib, heldout, spec, "auto",
                                    repeats=5, quiet=True)
    assert decision is not None and decision.fp32_ms and decision.int8_cpu_ms
    assert decision.kept == (decision.int8_cpu_ms < decision.fp32_ms)
    assert (tmp_path / "c.onnx").exists() == decision.kept == (path is not None)
    assert f"{decision.speedup:.2f}x" in decision.line()
    fp32_ms, same_ms = paired_cpu_latency_ms([fp32, fp32], heldout[:2], repeats=3)
    assert fp32_ms > 0 and same_ms > 0
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        paired_cpu_latency_ms([fp32], heldout[:1], repeats=0)
    with pytest.raises(ValueError, match="unknown CPU INT8 mode 'fast'"):
        maybe_int8_cpu(fp32, tmp_path / "d.onnx", calib, heldout, spec, "fast")
