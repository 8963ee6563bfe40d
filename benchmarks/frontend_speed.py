"""Per-window latency of each front-end variant and each student on one CPU thread.

Times a 10 s window (batch 1) in torch and in ONNX Runtime (CPU EP, one intra-op thread) for
every front-end variant in `VARIANTS` and every student preset, and prints the share of a
student's latency that its front end takes. Warm-up runs first; figures are the best and the
median of ``--repeats`` runs (on a shared, loaded CPU the best is the one to compare).

    $ .venv/bin/python -m benchmarks.frontend_speed --repeats 20
    $ .venv/bin/python -m benchmarks.frontend_speed --no-onnx --students cnn:s

Ends with one JSON line holding the context and every row.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distill.frontend import FrontEndConfig

SAMPLE_RATE = 16000
WINDOW_S = 10.0

# The levers from the issue: DFT length, bins kept (fmin / fmax), hop, a learned filterbank.
VARIANTS: dict[str, FrontEndConfig] = {
    "dft512-hop10-allbins": FrontEndConfig(n_fft=512, win_length=512, hop_length=160, n_mels=64,
                                           fmin=0.0),
    "dft512-hop20-allbins": FrontEndConfig(n_fft=512, win_length=512, hop_length=320, n_mels=64,
                                           fmin=0.0),
    "dft512w400-hop10": FrontEndConfig(n_fft=512, win_length=400, hop_length=160, n_mels=64,
                                       fmin=50.0),
    "dft400-hop10 (l)": FrontEndConfig(n_fft=400, win_length=400, hop_length=160, n_mels=64,
                                       fmin=50.0),
    "dft400-hop20 (m)": FrontEndConfig(n_fft=400, win_length=400, hop_length=320, n_mels=64,
                                       fmin=50.0),
    "dft320-hop20-48mel (s)": FrontEndConfig(n_fft=320, win_length=320, hop_length=320,
                                             n_mels=48, fmin=100.0),
    "dft256-hop20-48mel": FrontEndConfig(n_fft=256, win_length=256, hop_length=320, n_mels=48,
                                         fmin=100.0),
    "filterbank320-hop20-48": FrontEndConfig(n_fft=320, win_length=320, hop_length=320,
                                             n_mels=48, fmin=100.0, variant="filterbank"),
    "filterbank400-hop20-64": FrontEndConfig(n_fft=400, win_length=400, hop_length=320,
                                             n_mels=64, fmin=50.0, variant="filterbank"),
}


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> tuple[float, float]:
    """(best, median) milliseconds; the best is the figure to trust on a shared, loaded CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return min(times), statistics.median(times)


def _torch_ms(module: Any, audio: Any, repeats: int) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        return _median_ms(lambda: module(audio), repeats)


def _onnx_ms(module: Any, audio: Any, repeats: int, folder: Path,
             name: str) -> tuple[float, float]:
    import onnxruntime as ort
    import torch

    path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (audio,), str(path), dynamo=True, input_names=["audio"],
                          verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"audio": audio.numpy()}
    return _median_ms(lambda: session.run(None, feed), repeats)


def _ms(times: tuple[float, float]) -> str:
    return f"{times[0]:6.2f}/{times[1]:6.2f}"


def _context() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    return {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": 1,
            "batch": 1, "window_s": WINDOW_S, "sample_rate": SAMPLE_RATE, "precision": "fp32",
            "torch": torch.__version__, "onnxruntime": ort.__version__}


def run(repeats: int = 20, onnx: bool = True,
        students: Sequence[str] = ("cnn:s", "cnn:m", "cnn:l", "transformer:s", "transformer:m",
                                   "transformer:l")) -> dict[str, Any]:
    """Measure every variant and student; print the tables; return the JSON-able figures."""
    import torch

    from distill.frontend import build_frontend
    from distill.students import (
        build_student,
        count_macs,
        count_parameters,
        student_config,
        task_heads,
    )

    torch.set_num_threads(1)
    samples = int(SAMPLE_RATE * WINDOW_S)
    audio = torch.randn(1, samples) * 0.1
    heads = task_heads({"species": [f"sp{i}" for i in range(20)],
                        "detection": [f"sp{i}" for i in range(20)],
                        "lifestage": ["adult", "juvenile", "nestling"],
                        "calltype": ["song", "call", "alarm", "begging"]})
    rows: dict[str, list[dict[str, Any]]] = {"frontends": [], "students": []}
    nan = (float("nan"), float("nan"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("front-end latency per 10 s window, ms as best / median")
        print(f"{'front end':24s} {'bins':>5s} {'MMACs':>7s} {'torch ms':>13s} {'ORT ms':>13s}")
        for i, (name, cfg) in enumerate(VARIANTS.items()):
            fe = build_frontend(cfg).eval()
            torch_ms = _torch_ms(fe, audio, repeats)
            onnx_ms = _onnx_ms(fe, audio, repeats, folder, f"fe{i}") if onnx else nan
            row = {"name": name, "config": cfg.to_dict(),
                   "channels": len(cfg.kept_bins()) if cfg.variant == "dft" else cfg.n_mels,
                   "mmacs": count_macs(fe, samples) / 1e6, "torch_ms": torch_ms,
                   "onnx_ms": onnx_ms}
            rows["frontends"].append(row)
            print(f"{name:24s} {row['channels']:5d} {row['mmacs']:7.1f} {_ms(torch_ms)} "
                  f"{_ms(onnx_ms)}")
        print("\nstudents: whole model and its front end's share (best times)")
        print(f"{'student':15s} {'params':>8s} {'MMACs':>7s} {'fe MACs':>7s} {'torch ms':>13s} "
              f"{'fe %':>5s} {'ORT ms':>13s} {'fe %':>5s}")
        for key in students:
            arch, size = key.split(":")
            model = build_student(student_config(size, arch, tasks=heads)).eval()
            fe = model.frontend
            row = {"name": key, "params": count_parameters(model),
                   "mmacs": count_macs(model, samples) / 1e6,
                   "frontend_mmacs": count_macs(fe, samples) / 1e6,
                   "torch_ms": _torch_ms(model, audio, repeats),
                   "frontend_torch_ms": _torch_ms(fe, audio, repeats),
                   "onnx_ms": _onnx_ms(model, audio, repeats, folder, f"s-{arch}-{size}")
                   if onnx else nan,
                   "frontend_onnx_ms": _onnx_ms(fe, audio, repeats, folder, f"f-{arch}-{size}")
                   if onnx else nan}
            row["frontend_share_torch"] = row["frontend_torch_ms"][0] / row["torch_ms"][0]
            row["frontend_share_onnx"] = row["frontend_onnx_ms"][0] / row["onnx_ms"][0]
            rows["students"].append(row)
            print(f"{key:15s} {row['params'] / 1e6:7.2f}M {row['mmacs']:7.1f} "
                  f"{row['frontend_mmacs'] / row['mmacs']:6.0%} {_ms(row['torch_ms'])} "
                  f"{row['frontend_share_torch']:5.0%} {_ms(row['onnx_ms'])} "
                  f"{row['frontend_share_onnx']:5.0%}")
    result = {"context": _context(), **rows}
    print(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: ``python -m benchmarks.frontend_speed [--repeats N] [--no-onnx]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per figure")
    parser.add_argument("--no-onnx", action="store_true", help="torch only, no ONNX Runtime")
    parser.add_argument("--students", nargs="*",
                        default=["cnn:s", "cnn:m", "cnn:l", "transformer:s", "transformer:m",
                                 "transformer:l"], help="arch:size pairs")
    args = parser.parse_args(argv)
    run(repeats=args.repeats, onnx=not args.no_onnx, students=args.students)


if __name__ == "__main__":
    main()
