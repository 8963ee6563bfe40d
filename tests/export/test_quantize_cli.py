"""`naturelm-edge export quantize --int8-cpu`: the CPU INT8 variant written and listed for the CPU
only (the QDQ model for CUDA / TensorRT), none with ``never``, a stale entry dropped on a rerun,
and a bundle whose CPU runner at INT8 gets the CPU variant."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.bundle import read_report, update_report
from export.cli import INT8_CPU, bundle
from export.onnx_export import run_onnx
from naturelm_edge.cli import main
from runtime.bundle import load_bundle, verify_bundle
from runtime.runners import open_runner


def _backends(folder: Path) -> dict[str, list[str]]:
    return {m["file"]: m["backends"] for m in read_report(folder)["models"]}


def _quantize(folder: Path, manifest: Path, mode: str) -> None:
    assert main(["export", "quantize", str(folder), str(manifest), "--precisions", "int8",
                 "--calibration-clips", "8", "--int8-cpu", mode]) == 0


@pytest.fixture()
def folder(tmp_path: Path, export_dir: Path) -> Path:
    """A private copy of the session's export folder with only FP32 in its report."""
    out = tmp_path / "export"
    out.mkdir()
    shutil.copyfile(export_dir / "model.onnx", out / "model.onnx")
    shutil.copyfile(export_dir / "export.json", out / "export.json")
    report = read_report(out)
    update_report(out, drop=[m["file"] for m in report["models"] if m["file"] != "model.onnx"])
    return out


def test_always_writes_the_cpu_variant_for_the_cpu_only_and_a_bundle_picks_it(
        folder: Path, manifest: Path, clips: np.ndarray, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _quantize(folder, manifest, "always")
    assert "CPU INT8 variant: kept without timing (mode always)" in capsys.readouterr().out
    assert (folder / INT8_CPU).is_file()
    assert _backends(folder) == {"model.onnx": ["cpu", "cuda", "tensorrt"],
                                 "model.int8.onnx": ["cuda", "tensorrt"],
                                 INT8_CPU: ["cpu"]}
    report = read_report(folder)
    decision = report["int8_cpu"]
    assert (decision["mode"], decision["kept"], decision["threads"]) == ("always", True, 1)
    assert decision["fp32_ms"] is None and decision["int8_cpu_ms"] is None  # not timed
    assert set(decision["agreement"]) == {"species_logits", "detection_logits"}
    assert min(decision["agreement"].values()) >= 0.99
    ops = {n.op_type for n in onnx.load(str(folder / INT8_CPU)).graph.node}
    assert "QuantizeLinear" in ops and "QGemm" in ops  # QOperator form, not QDQ around Gemm

    out = tmp_path / "bundle"
    assert bundle(folder, out) == 0
    assert verify_bundle(out) == [] and verify_bundle(tmp_path / "bundle.tar.gz") == []
    loaded = load_bundle(out)
    assert {m.file for m in loaded.manifest.models} == {"model.onnx", "model.int8.onnx",
                                                        INT8_CPU}
    # latency on the CPU for the models the CPU runs, keyed by file stem (no clash at int8)
    assert set(loaded.manifest.latency_ms) == {"model.cpu.b1.t1", "model.int8cpu.cpu.b1.t1"}
    runner = open_runner(loaded, "cpu", threads=1, precision="int8")
    assert runner.model == out / INT8_CPU
    assert open_runner(loaded, "cpu", threads=1).model == out / "model.onnx"
    assert loaded.model_for("cuda", precision="int8").file == "model.int8.onnx"
    assert loaded.model_for("tensorrt", precision="int8").file == "model.int8.onnx"
    with runner:
        got = runner.infer({"audio": clips[:6]})
    want = run_onnx(out / INT8_CPU, clips[:6])
    np.testing.assert_allclose(got["species_logits"], want["species_logits"], atol=1e-5)


def test_never_writes_none_and_a_rerun_drops_the_stale_variant(
        folder: Path, manifest: Path) -> None:
    _quantize(folder, manifest, "never")
    assert not (folder / INT8_CPU).exists()
    assert _backends(folder) == {"model.onnx": ["cpu", "cuda", "tensorrt"],
                                 "model.int8.onnx": ["cpu", "cuda", "tensorrt"]}
    assert read_report(folder)["int8_cpu"] == {"mode": "never", "kept": False, "threads": 1,
                                               "fp32_ms": None, "int8_cpu_ms": None,
                                               "agreement": None}
    _quantize(folder, manifest, "always")
    assert _backends(folder)[INT8_CPU] == ["cpu"]
    _quantize(folder, manifest, "never")  # the rerun drops the entry, the file and the split
    assert not (folder / INT8_CPU).exists()
    assert _backends(folder) == {"model.onnx": ["cpu", "cuda", "tensorrt"],
                                 "model.int8.onnx": ["cpu", "cuda", "tensorrt"]}
    assert read_report(folder)["int8_cpu"]["kept"] is False


def test_auto_records_the_timing_behind_its_choice(folder: Path, manifest: Path) -> None:
    _quantize(folder, manifest, "auto")
    decision = read_report(folder)["int8_cpu"]
    assert decision["fp32_ms"] > 0 and decision["int8_cpu_ms"] > 0
    assert decision["kept"] == (decision["int8_cpu_ms"] < decision["fp32_ms"])
    assert (folder / INT8_CPU).exists() == decision["kept"]
    assert (INT8_CPU in _backends(folder)) == decision["kept"]
    assert _backends(folder)["model.int8.onnx"] == (
        ["cuda", "tensorrt"] if decision["kept"] else ["cpu", "cuda", "tensorrt"])


def test_quantize_refuses_bad_modes_and_threads(folder: Path, manifest: Path) -> None:
    from export.cli import quantize

    with pytest.raises(ValueError, match="unknown CPU INT8 mode 'fast'"):
        quantize(folder, manifest, int8_cpu="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        quantize(folder, manifest, threads=0)
    with pytest.raises(SystemExit):
        main(["export", "quantize", str(folder), str(manifest), "--int8-cpu", "fast"])


def test_update_report_drops_models_and_refuses_a_file_added_and_dropped(tmp_path: Path) -> None:
    from export.bundle import model_entry

    update_report(tmp_path, models=[model_entry("model.onnx", "fp32", "conv"),
                                    model_entry(INT8_CPU, "int8", "conv", ("cpu",))])
    update_report(tmp_path, drop=[INT8_CPU, "model.fp16.onnx"])  # absent files are fine
    assert list(_backends(tmp_path)) == ["model.onnx"]
    with pytest.raises(ValueError, match="both added and dropped"):
        update_report(tmp_path, models=[model_entry(INT8_CPU, "int8", "conv")], drop=[INT8_CPU])


def test_a_variant_below_its_bar_stops_the_command_or_is_dropped_and_recorded(
        folder: Path, manifest: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import export.precision
    from export.precision import PrecisionError

    args = ["export", "quantize", str(folder), str(manifest), "--calibration-clips", "8",
            "--int8-cpu", "always"]
    assert main(args) == 0  # passes: listed
    assert _backends(folder)["model.int8.onnx"] == ["cuda", "tensorrt"]
    monkeypatch.setitem(export.precision.BARS, "int8", 1.01)  # no model can reach it
    with pytest.raises(PrecisionError, match=r"model.int8.onnx: top-1 agreement with FP32 "
                                             r"below 101.0%: species_logits.*"
                                             r"`--on-fail drop` leaves the variant out.*"
                                             r"`export sensitivity` ranks the layers"):
        main(args)
    capsys.readouterr()
    # stopped, but no bundle can pick up the refused model: moved aside, dropped and recorded
    assert not (folder / "model.int8.onnx").exists()
    assert (folder / "rejected" / "model.int8.onnx").is_file()
    assert "model.int8.onnx" not in _backends(folder)
    assert set(read_report(folder)["rejected"]) == {"model.int8.onnx"}
    assert main([*args, "--on-fail", "drop"]) == 0
    out = capsys.readouterr().out
    assert "dropped model.int8.onnx (kept as rejected/model.int8.onnx): " in out
    assert f"dropped {INT8_CPU} (kept as rejected/{INT8_CPU}): " in out
    assert not (folder / "model.int8.onnx").exists() and not (folder / INT8_CPU).exists()
    assert _backends(folder) == {"model.onnx": ["cpu", "cuda", "tensorrt"],
                                 "model.fp16.onnx": ["cpu", "cuda", "tensorrt"]}
    report = read_report(folder)
    assert set(report["agreement_fp32"]) == {"fp16"}
    assert set(report["rejected"]) == {"model.int8.onnx", INT8_CPU}
    record = report["rejected"]["model.int8.onnx"]
    assert (record["precision"], record["bar"]) == ("int8", 1.01)
    assert set(record["agreement"]) == {"species_logits", "detection_logits"}
    assert all(0.0 <= v <= 1.0 for v in record["agreement"].values())
    assert record["reason"].startswith(str(folder / "model.int8.onnx"))
    assert record["file"] == "rejected/model.int8.onnx"
    assert {p.name for p in (folder / "rejected").iterdir()} == {INT8_CPU, "model.int8.onnx"}
    assert report["int8_cpu"]["kept"] is False

    # an FP16-only rerun keeps the INT8 record; an INT8 rerun that passes clears it
    assert main([*args, "--on-fail", "drop", "--precisions", "fp16"]) == 0
    assert set(read_report(folder)["rejected"]) == {"model.int8.onnx", INT8_CPU}
    monkeypatch.setitem(export.precision.BARS, "int8", 0.0)
    assert main([*args, "--on-fail", "drop", "--precisions", "int8"]) == 0
    report = read_report(folder)
    assert report["rejected"] == {} and not list((folder / "rejected").iterdir())
    assert _backends(folder)["model.int8.onnx"] == ["cuda", "tensorrt"]
    assert _backends(folder)[INT8_CPU] == ["cpu"]
    with pytest.raises(ValueError, match="unknown on_fail 'skip'"):
        from export.cli import quantize

        quantize(folder, manifest, on_fail="skip")  # type: ignore[arg-type]
