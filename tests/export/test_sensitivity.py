"""`naturelm-edge export sensitivity`: every Conv / Gemm outside the front end quantized alone
and measured against FP32, MACs counted from the graph's shapes, and the least sensitive nodes
that hold the INT8 bar together, recorded in export.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import export.precision
from export.bundle import read_report
from export.precision import conv_kinds, frontend_nodes, load_named
from export.sensitivity import by_sensitivity, node_macs
from naturelm_edge.cli import main


@pytest.fixture()
def folder(tmp_path: Path, export_dir: Path) -> Path:
    out = tmp_path / "export"
    out.mkdir()
    for name in ("model.onnx", "export.json"):
        shutil.copyfile(export_dir / name, out / name)
    return out


def test_macs_cover_every_conv_and_gemm_outside_the_front_end(export_dir: Path) -> None:
    model = load_named(export_dir / "model.onnx")
    macs = node_macs(model)
    front = set(frontend_nodes(model))
    want = {n.name for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and n.name not in front}
    assert set(macs) == want and all(v > 0 for v in macs.values())
    # the stem by hand: out channels x output map x (1 input channel x 3 x 3)
    stem = next(name for name, kind in conv_kinds(model).items() if kind == "stem")
    inferred = onnx.shape_inference.infer_shapes(model)
    node = next(n for n in model.graph.node if n.name == stem)
    shape = next([d.dim_value for d in v.type.tensor_type.shape.dim]
                 for v in inferred.graph.value_info if v.name == node.output[0])
    assert macs[stem] == int(np.prod(shape[1:])) * 9


def test_cli_measures_each_node_and_records_the_passing_set(
        folder: Path, manifest: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    args = ["export", "sensitivity", str(folder), str(manifest), "--calibration-clips", "8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    record = read_report(folder)["int8_sensitivity"]
    nodes = record["nodes"]
    assert [n["node"] for n in nodes] == list(node_macs(load_named(folder / "model.onnx")))
    assert record["heldout_clips"] == 16 and record["calibration_clips"] == 8
    for n in nodes:
        assert set(n["agreement"]) == {"species_logits", "detection_logits"}
        assert all(0.0 <= v <= 1.0 for v in n["agreement"].values()) and n["rel_error"] >= 0
        assert n["node"] in text
    # quantizing one node changes the logits (else the measurement would be vacuous)
    assert max(n["rel_error"] for n in nodes) > 0
    passing = record["passing"]
    from export.sensitivity import NodeSensitivity

    order = [r.node for r in by_sensitivity([NodeSensitivity(**n) for n in nodes])]
    assert passing["nodes"] == order[:len(passing["nodes"])]
    assert 0.0 <= passing["mac_share"] <= 1.0
    assert f"the {len(passing['nodes'])} least sensitive hold it together" in text

    monkeypatch.setitem(export.precision.BARS, "int8", 1.01)  # nothing can pass
    assert main(args) == 0
    passing = read_report(folder)["int8_sensitivity"]["passing"]
    assert passing == {"nodes": [], "mac_share": 0.0, "agreement": None}
    assert f"{len(nodes)} of {len(nodes)} nodes alone fall below the 101.0% bar" in (
        capsys.readouterr().out)
    monkeypatch.setitem(export.precision.BARS, "int8", 0.0)  # everything passes
    assert main(args) == 0
    passing = read_report(folder)["int8_sensitivity"]["passing"]
    assert passing["nodes"] == order and passing["mac_share"] == pytest.approx(1.0)


def test_an_empty_node_list_is_refused(folder: Path, clips: np.ndarray) -> None:
    with pytest.raises(ValueError, match="no nodes to quantize"):
        export.precision.to_int8(folder / "model.onnx", folder / "x.onnx", clips[:4], nodes=[])
