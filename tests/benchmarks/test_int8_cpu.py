"""benchmarks.int8_cpu: conv kinds from profiler events, the Amdahl bound, and a short run."""

from __future__ import annotations

import pytest

from benchmarks.int8_cpu import amdahl_bound, conv_kind_of, report, run


def test_profiled_convs_get_their_kind_by_name_or_shape() -> None:
    kinds = {"node_Conv_7": "depthwise", "node_Conv_71": "pointwise"}
    assert conv_kind_of("QLinearConv", [], "node_Conv_71_quant_token_3", kinds) == "pointwise"
    assert conv_kind_of("QLinearConv", [], "node_Conv_7_quant", kinds) == "depthwise"
    # ORT's NCHWc FP32 convs are renamed: their shapes tell the kind.
    assert conv_kind_of("Conv", [[8, 1, 48, 501], [16, 1, 3, 3]], "x_nchwc", kinds) == "stem"
    assert conv_kind_of("Conv", [[8, 16, 24, 251], [16, 1, 3, 3]], "y", kinds) == "depthwise"
    assert conv_kind_of("Conv", [[8, 48, 1, 1], [16, 48, 1, 1]], "z", kinds) == "squeeze"
    assert conv_kind_of("Conv", [[8, 16, 24, 251], [32, 16, 1, 1]], "w", kinds) == "pointwise"
    assert conv_kind_of("Conv", [[8, 16, 24, 251], [32, 16, 3, 3]], "v", kinds) == "dense"


def test_amdahl_bound_swaps_in_only_the_kinds_that_got_faster() -> None:
    fp32 = {"conv:pointwise": 4.0, "conv:depthwise": 2.0, "Mul": 2.0}
    int8 = {"conv:pointwise": 2.0, "conv:depthwise": 5.0, "QuantizeLinear": 3.0}
    assert amdahl_bound(fp32, int8) == (8.0 / 6.0, ["conv:pointwise"])
    assert amdahl_bound(fp32, {"conv:depthwise": 9.0}) == (1.0, [])
    # matrix products count like convs; other ops never do, however much faster
    fp32 = {"MatMul": 4.0, "Softmax": 4.0}
    assert amdahl_bound(fp32, {"MatMul": 2.0, "Softmax": 1.0}) == (8.0 / 6.0, ["MatMul"])


@pytest.mark.slow
def test_a_short_run_times_every_form_and_bounds_the_speed_up() -> None:
    result = run("s", window_s=1.0, batch_sizes=(1,), repeats=5, calibration_clips=4)
    names = [r["body"] for r in result["rows"]]
    assert names == ["fp32", "int8 qdq (tensorrt)", "int8 cpu (default)",
                     "int8 cpu pointwise", "int8 cpu all convs"]
    assert result["rows"][0]["vs_fp32"] == 1.0
    assert all(0 < r["best_ms"] <= r["median_ms"] for r in result["rows"])
    assert result["kind_counts"]["pointwise"] > result["kind_counts"]["stem"] == 1
    ops = {r["op"] for r in result["profile"]}
    assert {"conv:pointwise", "conv:depthwise", "QuantizeLinear"} <= ops
    assert result["bound"] >= 1.0
    assert "Amdahl bound" in report(result)


@pytest.mark.slow
def test_the_transformer_variant_profiles_its_matrix_products_under_one_name() -> None:
    result = run("s", window_s=1.0, batch_sizes=(1,), repeats=5, calibration_clips=4,
                 arch="transformer")
    assert result["arch"] == "transformer"
    profile = {r["op"]: r for r in result["profile"]}
    # FP32's MatMul / FusedMatMul and INT8's QLinearMatMul land on one row with both figures
    assert profile["MatMul"]["fp32_ms"] and profile["MatMul"]["int8_all_ms"]
    assert not {"FusedMatMul", "QLinearMatMul", "MatMulInteger"} & set(profile)
    assert "transformer student" in report(result)
