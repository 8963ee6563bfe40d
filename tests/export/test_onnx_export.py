"""ONNX export: spec presets, the graph walk, manifest, checker, dynamic batch and parity."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export.bundle import read_report
from export.onnx_export import (
    ExportError,
    banned_ops,
    check_graph,
    export_manifest,
    read_manifest,
    run_onnx,
    run_torch,
    validate,
)
from export.spec import ExportSpec, spec_for
from tests.export.conftest import WINDOW_S, tiny_config


def test_spec_follows_the_family_and_refuses_bad_values() -> None:
    cfg = tiny_config()
    spec = spec_for(cfg, window_s=2.5, max_batch=256)
    assert spec.family == "cnn" and spec.samples == 40000 and spec.opset >= 17
    assert spec.output_names == ["species_logits", "detection_logits", "embedding"]
    assert spec.dynamic_axes["audio"] == {0: "batch"}
    assert spec.trt_shapes() == {"audio": ((1, 40000), (8, 40000), (256, 40000))}
    assert ExportSpec.from_dict(spec.to_dict()) == spec
    assert spec_for(replace(cfg, arch="transformer")).atol > spec.atol
    with pytest.raises(ValueError, match="opset 16 is too old"):
        spec_for(cfg, opset=16)
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        spec_for(cfg, max_batch=4)
    odd = copy.copy(cfg)
    object.__setattr__(odd, "arch", "rnn")
    with pytest.raises(ValueError, match="no export spec for student family 'rnn'"):
        spec_for(odd)


def _model_with(nodes: list, functions: tuple = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, 400])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("local", 1)],
                             functions=list(functions))


def test_graph_walk_finds_banned_ops_in_graphs_subgraphs_and_functions() -> None:
    window = helper.make_node("HannWindow", ["n"], ["w"], name="win")
    branch = helper.make_graph([helper.make_node("DFT", ["x"], ["d"], name="dft")], "branch", [],
                               [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)])
    cond = helper.make_node("If", ["c"], ["y"], name="cond", then_branch=branch,
                            else_branch=branch)
    function = helper.make_function("local", "spec", ["x"], ["y"],
                                    [helper.make_node("STFT", ["x", "s"], ["y"], name="stft")],
                                    [helper.make_opsetid("", 18)])
    model = _model_with([window, cond, helper.make_node("spec", ["x"], ["z"], domain="local")],
                        (function,))
    found = banned_ops(model)
    assert len(found) == 4
    assert any("HannWindow (win)" in f for f in found)
    assert any("cond.then_branch" in f and "DFT" in f for f in found)
    assert any(f.startswith("function local.spec") and "STFT" in f for f in found)
    clean = _model_with([helper.make_node("Relu", ["x"], ["y"])])
    assert banned_ops(clean) == []
    with pytest.raises(ExportError, match="ops TensorRT 10 cannot run: graph: HannWindow"):
        check_graph(_model_with([helper.make_node("HannWindow", ["x"], ["y"], name="w")]), "m")


def test_exported_model_is_clean_typed_and_carries_its_manifest(export_dir: Path) -> None:
    model = onnx.load(str(export_dir / "model.onnx"))
    check_graph(model, "model.onnx")  # checker, strict shape inference, no banned op
    assert banned_ops(model) == []
    assert model.opset_import[0].version >= 17
    (audio,) = model.graph.input
    assert audio.name == "audio" and audio.type.tensor_type.elem_type == TensorProto.FLOAT
    dims = audio.type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == round(16000 * WINDOW_S)
    assert [o.name for o in model.graph.output] == ["species_logits", "detection_logits",
                                                     "embedding"]
    manifest = read_manifest(export_dir / "model.onnx")
    assert manifest["student"] == tiny_config().to_dict()
    assert manifest["variant"] == "conv" and manifest["precision"] == "fp32"
    assert manifest["spec"]["samples"] == 16000 and "onnxruntime" in manifest["tools"]
    report = read_report(export_dir)
    assert report["parity"]["worst"] <= report["spec"]["atol"]
    assert set(report["parity"]["max_abs"]) == {"synthetic", "real"}


def test_onnx_matches_torch_at_any_batch(export_dir: Path, student: torch.nn.Module,
                                         clips: np.ndarray) -> None:
    for batch in (clips[:1], clips[:5], clips):
        want, got = run_torch(student, batch), run_onnx(export_dir / "model.onnx", batch)
        for name, value in want.items():
            assert got[name].shape == value.shape
            np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=0)


def test_validation_prints_differences_and_refuses_a_model_that_drifted(
        export_dir: Path, student: torch.nn.Module, spec: ExportSpec, real_recording: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    report = validate(student, export_dir / "model.onnx", spec, real_recording)
    printed = capsys.readouterr().out
    assert "parity real: species_logits max |diff|" in printed
    assert "parity synthetic: embedding max |diff|" in printed
    assert report.ok and report.worst < spec.atol
    drifted = copy.deepcopy(student)
    with torch.no_grad():
        drifted.heads["species"].bias += 0.01
    with pytest.raises(ExportError, match="differs from torch by 0.01"):
        validate(drifted, export_dir / "model.onnx", spec, quiet=True)


def test_manifest_is_required_and_replaceable(tmp_path: Path) -> None:
    model = _model_with([helper.make_node("Relu", ["x"], ["y"])])
    with pytest.raises(ExportError, match="no 'naturelm_edge' manifest"):
        read_manifest(model)
    from export.onnx_export import set_manifest

    spec = spec_for(tiny_config(), window_s=1.0)
    set_manifest(model, export_manifest(tiny_config(), spec))
    set_manifest(model, {**export_manifest(tiny_config(), spec), "precision": "fp16"})
    assert [p.key for p in model.metadata_props] == ["naturelm_edge"]
    assert read_manifest(model)["precision"] == "fp16"
