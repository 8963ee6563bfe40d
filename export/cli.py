"""`naturelm-edge export onnx | quantize | sensitivity | compare | engine | bundle`: typed
functions.

The usual order, on the workstation and then on the device::

    naturelm-edge export onnx runs/student.ckpt runs/export --recording birds.wav
    naturelm-edge export quantize runs/export runs/corpus/manifest.jsonl
    naturelm-edge export compare runs/export --checkpoint runs/student.ckpt
    naturelm-edge export bundle runs/export runs/bundle --targets runs/targets \\
        --manifest runs/corpus/manifest.jsonl
    naturelm-edge export engine runs/bundle --precision fp16      # on the Jetson

Every stage records what it did in the export folder's ``export.json`` (`export.bundle`).

    >>> from naturelm_edge.cli import parser_for
    >>> parser_for(engine, "engine").parse_args(["b", "--precision", "int8"]).precision
    'int8'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np

    from export.precision import PrecisionError
    from export.spec import ExportSpec

MODEL = "model.onnx"
# ONNX Runtime CPU's INT8 form (QOperator U8S8); the QDQ model.int8.onnx is TensorRT's.
INT8_CPU = "model.int8cpu.onnx"
# Variants refused by their agreement gate are kept here, out of every bundle.
REJECTED = "rejected"


def _variant_file(precision: str) -> str:
    return MODEL if precision == "fp32" else f"model.{precision}.onnx"


def onnx(checkpoint: Path, out: Path, window_s: float = 10.0, max_batch: int | None = None,
         recording: Path | None = None, stft: Literal["auto", "always", "never"] = "auto",
         threads: int = 1) -> int:
    """Export a student checkpoint to ONNX (front end inside), checked against torch.

    Args:
        checkpoint: student checkpoint (from `naturelm-edge distill fit`).
        out: export folder; gets model.onnx (and model.stft.onnx where faster on the CPU).
        window_s: window length in seconds (fixed in the graph; the batch is dynamic).
        max_batch: largest batch of the TensorRT profile (default: the family's).
        recording: a real recording for the parity check (synthetic audio is always used).
        stft: export the STFT-op variant for CPUs: auto (when measured faster), always, never.
        threads: ONNX Runtime threads for the front-end timing.
    """
    from distill.checkpoint import load_student, teacher_hash_of
    from export.bundle import model_entry, update_report
    from export.onnx_export import export_onnx
    from export.spec import spec_for
    from export.stft_variant import maybe_export_stft

    student, config = load_student(checkpoint)
    overrides = {"max_batch": max_batch} if max_batch else {}
    if max_batch:
        overrides["opt_batch"] = min(spec_for(config).opt_batch, max_batch)
    spec = spec_for(config, window_s=window_s, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    report = export_onnx(student, out / MODEL, spec, recording)
    models = [model_entry(MODEL, "fp32", "conv")]
    stft_path, timing = maybe_export_stft(student, out / MODEL, spec, stft, recording, threads)
    if stft_path is not None:
        models.append(model_entry(stft_path.name, "fp32", "stft"))
    update_report(out, models=models, checkpoint=str(checkpoint),
                  teacher_hash=teacher_hash_of(checkpoint), student=config.to_dict(),
                  spec=spec.to_dict(), parity=report.to_dict(),
                  frontend_timing=None if timing is None else asdict(timing))
    print(f"wrote {out / MODEL}" + (f" and {stft_path}" if stft_path else ""))
    return 0


def _spec(export_dir: Path) -> ExportSpec:
    from export.bundle import read_report
    from export.spec import ExportSpec
    from runtime.errors import InputError

    report = read_report(export_dir)
    if "spec" not in report:
        raise InputError(export_dir, "not an export folder (run `naturelm-edge export onnx`)")
    return ExportSpec.from_dict(report["spec"])


def quantize(export_dir: Path, manifest: Path, precisions: Sequence[str] = ("fp16", "int8"),
             calibration_split: str = "train", heldout_splits: Sequence[str] = ("test", "valid"),
             calibration_clips: int = 128, heldout_clips: int = 512,
             int8_cpu: Literal["auto", "always", "never"] = "auto", threads: int = 1,
             on_fail: Literal["error", "drop"] = "error") -> int:
    """Write FP16 and INT8 variants and check their top-1 agreement with FP32 on held-out clips.

    INT8 comes in two forms: the QDQ model TensorRT and CUDA build from (model.int8.onnx), and
    a CPU variant for ONNX Runtime's CPU kernels (model.int8cpu.onnx). When the CPU variant is
    kept, it is the INT8 model listed for the cpu backend and the QDQ model is listed for cuda
    and tensorrt only; otherwise the QDQ model serves every backend.

    A variant below its agreement bar (FP16 99.5 %, INT8 99 % top-1 per task) is moved to
    ``rejected/``, left out of the models and recorded under ``rejected`` in export.json (its
    agreement, bar, reason and file), so no bundle ships it; then the command stops with
    `PrecisionError`, or with ``--on-fail drop`` goes on with the other variants.

    Args:
        export_dir: the folder `export onnx` wrote.
        manifest: corpus manifest (JSONL / CSV) with real audio for calibration and checks.
        precisions: which variants to write: fp16, int8.
        calibration_split: split whose clips calibrate INT8.
        heldout_splits: splits whose clips measure agreement.
        calibration_clips: most clips used for calibration.
        heldout_clips: most clips used for the agreement check.
        int8_cpu: the CPU INT8 variant: auto (kept when faster than FP32 here), always, never.
        threads: ONNX Runtime CPU threads for the CPU INT8 timing.
        on_fail: a variant below its bar: error (stop) or drop (go on without it); either way
            it is moved to rejected/ and recorded.
    """
    from export.bundle import model_entry, read_report, update_report
    from export.precision import PrecisionError, manifest_clips, to_fp16, to_int8

    unknown = sorted(set(precisions) - {"fp16", "int8"})
    if unknown:
        raise ValueError(f"unknown precisions {unknown}; choose fp16 and/or int8")
    if int8_cpu not in ("auto", "always", "never"):
        raise ValueError(f"unknown CPU INT8 mode {int8_cpu!r}; choose auto, always or never")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if on_fail not in ("error", "drop"):
        raise ValueError(f"unknown on_fail {on_fail!r}; choose error or drop")
    spec = _spec(export_dir)
    fp32 = export_dir / MODEL
    heldout = manifest_clips(manifest, spec, heldout_splits, heldout_clips)
    scores: dict[str, dict[str, float]] = {}
    rejected: dict[str, dict[str, Any]] = {}
    models = []
    drop: list[str] = []
    fields = {}
    for precision in precisions:
        out = export_dir / _variant_file(precision)
        if precision == "fp16":
            to_fp16(fp32, out)
        else:
            calib = manifest_clips(manifest, spec, (calibration_split,), calibration_clips)
            to_int8(fp32, out, calib)
            fields["calibration"] = {"manifest": str(manifest), "split": calibration_split,
                                     "clips": len(calib)}
        passed = _gate(fp32, out, precision, heldout, spec, rejected)
        if passed is None:
            drop.append(out.name)
            if on_fail == "error":
                break
        else:
            scores[precision] = passed
        if precision == "fp16":
            models += [] if passed is None else [model_entry(out.name, precision, "conv")]
            continue
        cpu_entry, fields["int8_cpu"] = _int8_cpu(export_dir, calib, heldout, spec, int8_cpu,
                                                  threads, rejected)
        if cpu_entry is None:
            drop.append(INT8_CPU)
        if passed is not None:
            backends = ("cuda", "tensorrt") if cpu_entry else ("cpu", "cuda", "tensorrt")
            models.append(model_entry(out.name, precision, "conv", backends))
        models += [cpu_entry] if cpu_entry else []
    failed = dict(rejected)
    earlier = read_report(export_dir).get("rejected", {})
    rejected = {**{f: r for f, r in earlier.items() if r["precision"] not in precisions},
                **rejected}
    _clear_rejected(export_dir, rejected)
    update_report(export_dir, models=models, drop=drop, agreement_fp32=scores,
                  rejected=rejected,
                  heldout={"manifest": str(manifest), "splits": list(heldout_splits),
                           "clips": len(heldout)}, **fields)
    if failed and on_fail == "error":
        record = next(iter(failed.values()))
        more = "; `export sensitivity` ranks the layers by it" if record["precision"] == "int8" else ""
        raise PrecisionError(f"{record['reason']} (moved to {record['file']}; `--on-fail drop` "
                             f"leaves the variant out and goes on{more})", record["agreement"])
    return 0


def sensitivity(export_dir: Path, manifest: Path, calibration_split: str = "train",
                heldout_splits: Sequence[str] = ("test", "valid"), calibration_clips: int = 128,
                heldout_clips: int = 512) -> int:
    """Quantize each Conv / Gemm / MatMul alone to INT8 and measure it against FP32 (as
    ``polygraphy debug precision`` does for TensorRT): the layers to keep in float when the
    INT8 model misses its bar. Prints a table, most sensitive first, and records it in
    export.json under ``int8_sensitivity`` with the least sensitive nodes that hold the bar
    together and their share of the MACs.

    Args:
        export_dir: the folder `export onnx` wrote.
        manifest: corpus manifest (JSONL / CSV) with real audio.
        calibration_split: split whose clips calibrate INT8.
        heldout_splits: splits whose clips measure agreement.
        calibration_clips: most clips used for calibration.
        heldout_clips: most clips used for the agreement check.
    """
    from export.bundle import update_report
    from export.precision import BARS, manifest_clips
    from export.sensitivity import format_sensitivity, int8_sensitivity, largest_passing_set

    spec = _spec(export_dir)
    fp32 = export_dir / MODEL
    heldout = manifest_clips(manifest, spec, heldout_splits, heldout_clips)
    calib = manifest_clips(manifest, spec, (calibration_split,), calibration_clips)
    rows = int8_sensitivity(fp32, calib, heldout, spec, progress=True)
    passing = largest_passing_set(fp32, rows, calib, heldout, spec)
    print(format_sensitivity(rows, passing, BARS["int8"]))
    update_report(export_dir, int8_sensitivity={
        "bar": BARS["int8"], "heldout_clips": len(heldout), "calibration_clips": len(calib),
        "nodes": [r.to_dict() for r in rows], "passing": passing.to_dict()})
    return 0


def _gate(fp32: Path, variant: Path, precision: str, heldout: np.ndarray, spec: ExportSpec,
          rejected: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """``variant``'s agreement with FP32 per task, or None when it is below its bar: then the
    file is moved to ``rejected/`` and the failure recorded in ``rejected``."""
    from export.precision import BARS, PrecisionError, check_variant

    try:
        return check_variant(fp32, variant, precision, heldout, spec)
    except PrecisionError as error:
        _reject(variant, precision, BARS[precision], error, rejected)
        return None


def _reject(variant: Path, precision: str, bar: float, error: PrecisionError,
            rejected: dict[str, dict[str, Any]]) -> None:
    """Move a variant that failed its gate to ``rejected/`` beside it (kept for inspection,
    never bundled) and record why under its file name."""
    kept = variant.parent / REJECTED / variant.name
    kept.parent.mkdir(exist_ok=True)
    os.replace(variant, kept)
    rejected[variant.name] = {"precision": precision, "bar": bar, "agreement": error.scores,
                              "reason": str(error), "file": f"{REJECTED}/{variant.name}"}
    print(f"dropped {variant.name} (kept as {REJECTED}/{variant.name}): {error}")


def _clear_rejected(export_dir: Path, rejected: Mapping[str, Any]) -> None:
    """Remove the refused files of earlier runs that are no longer refused."""
    folder = export_dir / REJECTED
    for path in folder.glob("*.onnx") if folder.is_dir() else []:
        if path.name not in rejected:
            path.unlink()


def _int8_cpu(export_dir: Path, calib: np.ndarray, heldout: np.ndarray, spec: ExportSpec,
              mode: str, threads: int, rejected: dict[str, dict[str, Any]],
              ) -> tuple[dict | None, dict]:
    """Write (or not) the CPU INT8 variant; returns its model entry (None when not kept: a
    stale file from an earlier run is removed) and the decision recorded in export.json.
    Below the INT8 bar it is moved to ``rejected/`` and recorded in ``rejected``."""
    from export.bundle import model_entry
    from export.precision import BARS, PrecisionError, maybe_int8_cpu

    try:
        path, decision = maybe_int8_cpu(export_dir / MODEL, export_dir / INT8_CPU, calib,
                                        heldout, spec, mode, threads)
    except PrecisionError as error:
        _reject(export_dir / INT8_CPU, "int8", BARS["int8"], error, rejected)
        return None, {"mode": mode, "kept": False, "threads": threads, "fp32_ms": None,
                      "int8_cpu_ms": None, "agreement": error.scores}
    record = {"mode": mode, "kept": path is not None, "threads": threads,
              "fp32_ms": None if decision is None else decision.fp32_ms,
              "int8_cpu_ms": None if decision is None else decision.int8_cpu_ms,
              "agreement": None if decision is None else dict(decision.agreement)}
    if path is None:
        (export_dir / INT8_CPU).unlink(missing_ok=True)
        return None, record
    if decision is not None and decision.speedup is None:
        print(decision.line())
    return model_entry(path.name, "int8", "conv", ("cpu",)), record


def compare(export_dir: Path, checkpoint: Path | None = None, manifest: Path | None = None,
            recording: Path | None = None, bundle: Path | None = None,
            json_out: Path | None = None, threads: int = 1) -> int:
    """Run torch, ONNX Runtime FP32 / FP16 / INT8 (and TensorRT engines) on the same inputs.

    Args:
        export_dir: the export folder (its models are compared).
        checkpoint: the student checkpoint; torch is the reference when given, else FP32 ONNX.
        manifest: held-out clips (test / valid splits) as inputs.
        recording: a recording cut into windows as inputs (with synthetic audio).
        bundle: a bundle folder whose engines built here join (needs TensorRT and a GPU).
        json_out: also write the rows as JSON here.
        threads: ONNX Runtime threads.
    """
    import numpy as np

    from export.bundle import model_key, read_report
    from export.compare import compare_models, format_table, tensorrt_available
    from export.onnx_export import parity_inputs
    from export.precision import manifest_clips

    spec = _spec(export_dir)
    parts = [parity_inputs(spec, recording)["synthetic"]]
    if recording is not None:
        parts.append(parity_inputs(spec, recording)["real"])
    if manifest is not None:
        parts.append(manifest_clips(manifest, spec))
    audio = np.concatenate(parts)
    student = None
    if checkpoint is not None:
        from distill.checkpoint import load_student

        student = load_student(checkpoint)[0]
    models = {f"ort-{model_key(m['file'])}": export_dir / m["file"]
              for m in read_report(export_dir)["models"]}
    engines = {}
    if bundle is not None and tensorrt_available():
        engines = {f"trt-{p.name.split('.')[-2]}": p
                   for p in sorted((bundle / "engines").glob("*.engine"))}
    reference = "torch" if student is not None else f"ort-{model_key(MODEL)}"
    rows = compare_models(student, models, audio, engines, reference, threads)
    print(f"reference: {reference}; {len(audio)} windows of {spec.window_s:g} s")
    print(format_table(rows))
    if json_out is not None:
        json_out.write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    return 0


def engine(bundle: Path, precision: Literal["fp32", "fp16", "int8"] = "fp16",
           workspace_mb: int = 1024, min_batch: int | None = None, opt_batch: int | None = None,
           max_batch: int | None = None, dla_core: int | None = None,
           timing_cache: bool = True) -> int:
    """Build a TensorRT engine for this device into the bundle's engines/ folder.

    Args:
        bundle: the bundle folder (on the device).
        precision: fp32, fp16, or int8 (from the bundle's QDQ model).
        workspace_mb: TensorRT workspace limit in MiB.
        min_batch: profile minimum batch (default: the export spec's).
        opt_batch: profile batch to tune for (default: the export spec's).
        max_batch: profile maximum batch (default: the export spec's).
        dla_core: build for this DLA core with GPU fallback (Jetson Orin NX / AGX).
        timing_cache: reuse and update the timing cache kept in the bundle.
    """
    from export.engine import EngineOptions, build_engine

    build_engine(bundle, EngineOptions(precision, workspace_mb, min_batch, opt_batch,
                                       max_batch, dla_core, timing_cache))
    return 0


def _latencies(export_dir: Path, report: dict) -> dict[str, float]:
    """``{"<stem>.cpu.b1.t1": median ms}`` (`export.bundle.latency_key`) for every model in the
    report that suits the CPU."""
    from export.bundle import latency_key
    from export.compare import cpu_latency_ms
    from export.spec import ExportSpec

    if "spec" not in report:
        return {}
    audio = ExportSpec.from_dict(report["spec"]).dummy_input(1)
    return {latency_key(m["file"]):
            cpu_latency_ms(export_dir / m["file"], audio, threads=1, repeats=10)
            for m in report.get("models", []) if "cpu" in m["backends"]}


def bundle(export_dir: Path, out: Path, name: str | None = None, version: str = "1",
           targets: Path | None = None, manifest: Path | None = None, teacher_id: str = "",
           threshold: float = 0.5, hop_s: float | None = None, latency: bool = True) -> int:
    """Write a bundle folder and .tar.gz from an export folder.

    Args:
        export_dir: the export folder (after `export onnx` and `export quantize`).
        out: the bundle folder to create (out.tar.gz is written beside it).
        name: bundle name (default: the folder's name).
        version: bundle version string.
        targets: teacher-target store; with manifest, measures agreement with the teacher.
        manifest: corpus manifest whose test clips measure agreement with the teacher.
        teacher_id: the teacher's id (default: the target store's or checkpoint's hash).
        threshold: default score threshold of every task.
        hop_s: hop between windows in seconds (default: the window).
        latency: record each CPU model's median latency (1 thread, one window) in the bundle.
    """
    from export.bundle import agreement_key, read_report, teacher_agreement, write_bundle
    from export.spec import ExportSpec

    report = read_report(export_dir)
    agreement: dict[str, float] = {}
    teacher = teacher_id or str(report.get("teacher_hash") or "")
    if targets is not None and manifest is not None:
        spec = ExportSpec.from_dict(report["spec"])
        labels = {t: h["labels"] for t, h in report["student"]["tasks"].items()}
        for model in report["models"]:
            if model["variant"] != "conv":
                continue
            scores, store_hash, missing = teacher_agreement(
                export_dir / model["file"], manifest, targets, spec, labels)
            agreement.update({agreement_key(model["file"], t): v for t, v in scores.items()})
            teacher = teacher_id or store_hash
            print(f"{model['file']} ({model['precision']}): top-1 agreement with the teacher "
                  + ", ".join(f"{t} {v:.2%}" for t, v in scores.items())
                  + f" ({missing} clips without a target)")
    thresholds = {task: threshold for task in report.get("student", {}).get("tasks", {})}
    latency_ms = _latencies(export_dir, report) if latency else {}
    folder, tar = write_bundle(export_dir, out, name, version, thresholds, hop_s, teacher,
                               agreement, latency_ms)
    print(f"wrote {folder} and {tar}")
    return 0
