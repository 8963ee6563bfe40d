"""Why INT8 does or does not pay on this CPU: the network body (everything after the log-mel front
end) of a student in FP32 and in several INT8 forms, timed apart, and a per-layer-kind profile.

Builds a seeded student of the chosen size and arch (the CNN or the transformer variant;
weights do not change the timing), exports it with a fixed window, writes the INT8 forms
`export.precision` makes (the QDQ model TensorRT reads; the CPU QOperator U8S8 form with only
wide pointwise convs, every pointwise conv, or every conv quantized, Gemm and MatMul always),
splits each at its first ``Log`` (`benchmarks.latency.split_at_frontend`) and times the body
alone on ONNX Runtime's CPU provider (best and median of ``repeats`` runs per batch; the best
is the figure to read on a shared machine). ONNX Runtime's profiler then sums the time of
every convolution kind (`export.precision.conv_kinds`) and of the matrix products in FP32 and
with every conv in INT8; the ``bound`` is the body speed-up INT8 could give if only the kinds
that got faster were swapped and every quantize, dequantize and layout change were free
(Amdahl).

Prints markdown tables and a final JSON line; ``--save`` adds them to ``benchmarks/results``.

    $ python -m benchmarks.int8_cpu --size s --batch-sizes 1 8 --threads 1
    $ python -m benchmarks.int8_cpu --arch transformer --size s    # the transformer variant
    >>> conv_kind_of("QLinearConv", [[1, 1, 48, 501]], "stem_conv_quant_token_9",
    ...              {"stem_conv": "stem"})
    'stem'
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CONVS = ("Conv", "QLinearConv", "FusedConv", "ConvInteger")
# Matrix products under one name in both forms: ORT fuses FP32 MatMuls (FusedMatMul) and the
# quantizer turns them into QLinearMatMul / MatMulInteger (and Gemm into QGemm).
MATMULS = {"MatMul": "MatMul", "FusedMatMul": "MatMul", "QLinearMatMul": "MatMul",
           "MatMulInteger": "MatMul", "Gemm": "Gemm", "QGemm": "Gemm"}


def _session(path: Path, threads: int, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_bodies(paths: Mapping[str, Path], features: np.ndarray, threads: int, repeats: int,
                rounds: int = 5, warmup: int = 5) -> dict[str, tuple[float, float]]:
    """``{name: (best, median)}`` milliseconds of one run of each body model on ``features``;
    the models take turns in ``rounds`` so a burst of load on a shared machine hits them all."""
    sessions = {name: _session(path, threads) for name, path in paths.items()}
    feeds = {name: {s.get_inputs()[0].name: features} for name, s in sessions.items()}
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            for _ in range(max(1, repeats // rounds)):
                start = time.perf_counter()
                session.run(None, feeds[name])
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (float(np.min(t)), float(np.median(t))) for name, t in times.items()}


def conv_kind_of(op: str, input_shapes: Sequence[Sequence[int]], node: str,
                 kinds: Mapping[str, str]) -> str:
    """The kind of a profiled conv: by its original node name where the name survives the
    optimiser (QLinearConv), else by the shapes ORT reports (its NCHWc FP32 convs)."""
    named = [k for k in kinds if node.startswith(k)]
    if named:
        return kinds[max(named, key=len)]
    x = input_shapes[0]
    w = input_shapes[1] if len(input_shapes) > 1 else []
    if len(x) == 4 and x[1] == 1:
        return "stem"
    if len(w) == 4 and w[1] == 1 and w[2] > 1:
        return "depthwise"
    if len(x) == 4 and x[2] * x[3] == 1:
        return "squeeze"
    return "pointwise" if len(w) == 4 and w[2:] == [1, 1] else "dense"


def profile_body(path: Path, features: np.ndarray, threads: int, kinds: Mapping[str, str],
                 runs: int = 20) -> dict[str, float]:
    """Milliseconds per run by op type, convolutions split by kind (``conv:<kind>``) and
    matrix products under their float name (`MATMULS`); each op's figure is its fastest run
    (the least disturbed by other load)."""
    with tempfile.TemporaryDirectory(prefix="naturelm-prof-") as tmp:
        session = _session(path, threads, profile_prefix=str(Path(tmp) / "p"))
        feed = {session.get_inputs()[0].name: features}
        session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_run: dict[tuple[str, int], float] = defaultdict(float)
    seen: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"]["op_name"]
        if op in CONVS:
            shapes = [next(iter(s.values())) for s in event["args"].get("input_type_shape", [])]
            node = event["name"].removesuffix("_kernel_time")
            op = f"conv:{conv_kind_of(op, shapes, node, kinds)}"
        op = MATMULS.get(op, op)
        node_key = event["name"]
        run = seen[node_key]
        seen[node_key] += 1
        per_run[(op, run)] += event["dur"] / 1e3
    totals: dict[str, float] = {}
    for (op, _run), value in per_run.items():
        totals[op] = min(totals.get(op, value), value)
    return totals


def amdahl_bound(fp32: Mapping[str, float], int8: Mapping[str, float]) -> tuple[float, list[str]]:
    """Body speed-up if every conv kind or matrix product that INT8 made faster were swapped
    in and nothing else changed (no quantize / dequantize / layout costs); and those kinds."""
    total = sum(fp32.values())
    weighted = [k for k in fp32 if k.startswith("conv:") or k in MATMULS.values()]
    faster = [k for k in weighted if k in int8 and int8[k] < fp32[k]]
    saved = sum(fp32[k] - int8[k] for k in faster)
    return total / (total - saved), sorted(faster)


def _student(size: str, arch: str, window_s: float, tmp: Path) -> tuple[Path, Any]:
    import torch

    from distill.students import build_student, student_config, task_heads
    from export.onnx_export import export_student
    from export.spec import spec_for

    torch.manual_seed(0)
    labels = [f"species_{i}" for i in range(20)]
    heads = task_heads({"species": labels, "detection": labels[:10]}, multi_label=["detection"])
    config = student_config(size, arch, tasks=heads)
    spec = spec_for(config, window_s=window_s)
    path = tmp / "model.onnx"
    export_student(build_student(config).eval(), path, spec)
    return path, spec


def run(size: str = "s", window_s: float = 10.0, batch_sizes: Sequence[int] = (1, 8),
        threads: int = 1, repeats: int = 50, recording: Path | None = None,
        calibration_clips: int = 16, arch: str = "cnn") -> dict[str, Any]:
    """Time the body of every form and profile FP32 against all-INT8; returns the result."""
    from benchmarks.latency import audio_batch, split_at_frontend
    from export.precision import (
        CONV_KINDS,
        CPU_INT8_MIN_CHANNELS,
        conv_kinds,
        load_named,
        to_int8,
        to_int8_cpu,
    )

    rows, kinds_rows = [], []
    with tempfile.TemporaryDirectory(prefix="naturelm-int8cpu-") as folder:
        tmp = Path(folder)
        fp32, spec = _student(size, arch, window_s, tmp)
        calib = audio_batch(calibration_clips, spec.samples, spec.sample_rate, recording, seed=1)
        forms = {"fp32": (fp32, "float32", "-")}
        to_int8(fp32, tmp / "qdq.onnx", calib)
        forms["int8 qdq (tensorrt)"] = (tmp / "qdq.onnx", "QDQ s8s8", "all")
        to_int8_cpu(fp32, tmp / "cpu.onnx", calib)
        forms["int8 cpu (default)"] = (tmp / "cpu.onnx", "QOperator u8s8",
                                       f"pointwise >= {CPU_INT8_MIN_CHANNELS} ch")
        to_int8_cpu(fp32, tmp / "cpu_pw.onnx", calib, min_channels=0)
        forms["int8 cpu pointwise"] = (tmp / "cpu_pw.onnx", "QOperator u8s8", "pointwise")
        to_int8_cpu(fp32, tmp / "cpu_all.onnx", calib, kinds=CONV_KINDS, min_channels=0)
        forms["int8 cpu all convs"] = (tmp / "cpu_all.onnx", "QOperator u8s8", "all")
        kinds = conv_kinds(load_named(fp32))
        bodies = {name: split_at_frontend(path, tmp / "split")
                  for name, (path, _, _) in forms.items()}
        front, _, feature = bodies["fp32"]
        front_session = _session(front, threads)
        for batch in batch_sizes:
            audio = audio_batch(batch, spec.samples, spec.sample_rate, recording)
            features = front_session.run([feature], {"audio": audio})[0]
            timed = time_bodies({name: parts[1] for name, parts in bodies.items()}, features,
                                threads, repeats)
            for name, (_, form, convs) in forms.items():
                best, median = timed[name]
                rows.append({"body": name, "format": form, "quantized": convs, "batch": batch,
                             "best_ms": best, "median_ms": median,
                             "vs_fp32": timed["fp32"][0] / best})
        features = front_session.run([feature], {"audio": audio_batch(
            max(batch_sizes), spec.samples, spec.sample_rate, recording)})[0]
        prof_fp32 = profile_body(bodies["fp32"][1], features, threads, kinds)
        prof_int8 = profile_body(bodies["int8 cpu all convs"][1], features, threads,
                                 {f"{k}_quant": v for k, v in kinds.items()} | kinds)
    for op in sorted(set(prof_fp32) | set(prof_int8),
                     key=lambda k: -max(prof_fp32.get(k, 0), prof_int8.get(k, 0))):
        a, b = prof_fp32.get(op), prof_int8.get(op)
        kinds_rows.append({"op": op, "fp32_ms": a, "int8_all_ms": b,
                           "int8_vs_fp32": a / b if a and b else None})
    bound, faster = amdahl_bound(prof_fp32, prof_int8)
    return {"size": size, "arch": arch, "window_s": window_s, "threads": threads, "rows": rows,
            "profile_batch": max(batch_sizes), "profile": kinds_rows, "bound": bound,
            "faster_kinds": faster, "kind_counts": {k: list(kinds.values()).count(k)
                                                   for k in sorted(set(kinds.values()))}}


def report(result: Mapping[str, Any]) -> str:
    """The markdown tables and the bound."""
    from benchmarks.harness import markdown_table

    return "\n".join([
        f"Body (after the log-mel) of a `{result['size']}` {result['arch']} student, "
        f"{result['window_s']:g} s "
        f"window, {result['threads']} thread(s), ONNX Runtime CPU; conv kinds "
        f"{result['kind_counts']}.", "",
        markdown_table(result["rows"]), "",
        f"Per op (ms per run, batch {result['profile_batch']}), every conv in INT8:", "",
        markdown_table(result["profile"]), "",
        f"Amdahl bound: swapping in only the conv kinds and matrix products INT8 made faster "
        f"({', '.join(result['faster_kinds']) or 'none'}) with free quantize / dequantize and "
        f"layout changes would make the body at most {result['bound']:.2f}x faster.", ""])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.int8_cpu [--size s] [--batch-sizes 1 8] [--save]``."""
    from benchmarks.harness import context, json_line, write_results

    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_cpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("s", "m", "l"), default="s")
    parser.add_argument("--arch", choices=("cnn", "transformer"), default="cnn")
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--recording", type=Path, default=None,
                        help="calibrate and time on windows of this recording (default: noise)")
    parser.add_argument("--save", action="store_true", help="add to benchmarks/results")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    result = run(args.size, args.window_s, args.batch_sizes, args.threads, args.repeats,
                 args.recording, arch=args.arch)
    result["context"] = context(args.threads, probe_gpu=False)
    text = report(result)
    print(text)
    if args.save:
        name = "" if args.arch == "cnn" else f"{args.arch}_"
        for path in write_results(f"int8_cpu_{name}{args.size}", result, text):
            print(f"wrote {path}")
    json_line(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
