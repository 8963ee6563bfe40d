"""BEATs encoder latency on CPU (or CUDA) for the ``tiny`` and ``iter3`` presets.

Random weights (latency does not depend on them), 10 s clips at 16 kHz, a warm-up, then the
median of timed runs; prints a table and a final JSON line with the context.

    python -m benchmarks.encoder_speed --presets tiny --runs 3 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence

import torch

from benchmarks.harness import json_line
from teacher.beats import BEATs, beats_config


def measure(
    preset: str, batch: int, seconds: float, runs: int, device: str, dtype: torch.dtype
) -> dict[str, float | int | str]:
    """Median and min latency of one forward of ``batch`` clips of ``seconds`` seconds."""
    model = BEATs(beats_config(preset)).eval().to(device=device, dtype=dtype)
    wave = torch.randn(batch, int(seconds * model.cfg.sample_rate), device=device) * 0.1
    times = []
    with torch.inference_mode():
        model(wave)  # warm-up
        for _ in range(runs):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            features, _ = model(wave)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {
        "preset": preset,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "tokens": int(features.shape[1]),
        "dim": int(features.shape[2]),
        "median_ms": round(1000 * statistics.median(times), 1),
        "min_ms": round(1000 * min(times), 1),
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, float | int | str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "iter3"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = [
        measure(name, args.batch, args.seconds, args.runs, args.device, dtype)
        for name in args.presets
    ]
    print(f"{'preset':8} {'params M':>9} {'tokens':>7} {'dim':>5} {'median ms':>10} {'min ms':>8}")
    for row in rows:
        print(
            f"{row['preset']:8} {row['params_m']:>9} {row['tokens']:>7} {row['dim']:>5} "
            f"{row['median_ms']:>10} {row['min_ms']:>8}"
        )
    context = {
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "dtype": args.dtype,
        "batch": args.batch,
        "seconds": args.seconds,
        "torch": torch.__version__,
    }
    json_line({"benchmark": "encoder_speed", **context, "results": rows})
    return rows


if __name__ == "__main__":
    main()
