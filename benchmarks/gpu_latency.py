"""Student and teacher latency in torch on a GPU: FP32 and FP16, batch 1 to 1024, CUDA graphs.

For each student size (a checkpoint, or a fresh student of the preset with the synthetic
chorus' label sets: latency does not depend on the weights) and each precision (FP32; FP16
through autocast, which keeps the log-mel's ``log`` in FP32) and batch: the mean, p50, p90 and
p99 ms per batch after a warm-up, synchronised after every call, eagerly and replayed from a
captured CUDA graph (static input, one capture per batch). Beside them the ``tiny`` teacher
(a checkpoint, or a fresh one) scoring every task's labels for a batch of clips, as teacher
labelling does. Prints a markdown table and a final JSON line; with ``results_dir`` the
figures join ``<results_dir>/<machine-id>.json|md`` (`benchmarks.harness.write_results`).

Runs on the CPU too (``--device cpu``, no CUDA graphs), which is how it is checked on a
machine without a GPU.

    $ python -m benchmarks.gpu_latency --sizes s m --batch-sizes 1 32 1024 --results-dir out/
    >>> rows = run(sizes=("s",), device="cpu", precisions=("fp32",), batch_sizes=(1,),
    ...            graphs=(False,), teacher_batch_sizes=(), repeats=2, quiet=True)["rows"]
    >>> rows[0]["model"], rows[0]["batch"]
    ('student-s', 1)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS_DIR

BATCH_SIZES = (1, 4, 16, 64, 256, 1024)
PRECISIONS = ("fp32", "fp16")
COLUMNS = ("model", "device", "precision", "cuda_graph", "batch", "mean_ms", "p50_ms",
           "p90_ms", "p99_ms", "windows_per_s", "x_real_time", "gpu_mb")


@dataclass(frozen=True)
class Timed:
    """How each configuration is timed."""

    warmup: int = 5
    repeats: int = 30


def synthetic_label_sets() -> dict[str, tuple[str, ...]]:
    """The label sets of the default synthetic chorus (the demo's tasks)."""
    from corpus.synth import SynthConfig, label_sets

    return label_sets(SynthConfig())


def student_model(size: str, checkpoint: Path | None = None) -> tuple[Any, int, float]:
    """A student in eval mode: ``(model, window samples, window seconds)``; a fresh preset
    ``size`` with the synthetic label sets when no checkpoint is given."""
    if checkpoint is not None:
        from distill.checkpoint import load_student

        model, cfg = load_student(checkpoint)
    else:
        import torch

        from distill.students import build_student, student_config, task_heads

        torch.manual_seed(0)
        cfg = student_config(size, tasks=task_heads(synthetic_label_sets()))
        model = build_student(cfg)
    window_s = 10.0
    return model.eval(), int(round(window_s * cfg.frontend.sample_rate)), window_s


def _autocast(device: str, precision: str) -> Any:
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.float16,
                              cache_enabled=False)
    raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")


def eager_call(model: Any, audio: Any, device: str, precision: str) -> Callable[[], object]:
    """One forward on ``audio`` under the precision's autocast, without gradients."""
    import torch

    def call() -> object:
        with torch.inference_mode(), _autocast(device, precision):
            return model(audio)

    return call


def graph_call(model: Any, audio: Any, device: str, precision: str) -> Callable[[], object]:
    """A CUDA graph of one forward on a static copy of ``audio``: warm-up on a side stream,
    capture, then each call replays it and returns the graph's (static) outputs."""
    import torch

    static = audio.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad(), _autocast(device, precision):
        for _ in range(3):
            model(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph), _autocast(device, precision):
        outputs = model(static)

    def replay() -> object:
        graph.replay()
        return outputs

    return replay


def _gpu_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def _row(model: str, device: str, precision: str, graph: bool, batch: int, window_s: float,
         timing: Any) -> dict[str, Any]:
    per_s = batch / (timing.mean_ms / 1000.0)
    return {"model": model, "device": device, "precision": precision, "cuda_graph": graph,
            "batch": batch, **{k: v for k, v in timing.to_dict().items() if k.endswith("_ms")},
            "windows_per_s": per_s, "x_real_time": per_s * window_s, "gpu_mb": _gpu_mb(device)}


def _progress(row: dict[str, Any]) -> None:
    print(f"{row['model']} {row['precision']} graph={row['cuda_graph']} batch {row['batch']}: "
          f"{row['mean_ms']:.3f} ms", file=sys.stderr, flush=True)


def student_rows(size: str, device: str, precisions: Sequence[str], batch_sizes: Sequence[int],
                 graphs: Sequence[bool], timed: Timed,
                 checkpoint: Path | None = None) -> list[dict[str, Any]]:
    """Rows for one student: precision x CUDA graph (or not) x batch."""
    import torch

    from benchmarks.harness import time_call

    model, samples, window_s = student_model(size, checkpoint)
    model.to(device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    rows = []
    for batch in batch_sizes:
        audio = (0.05 * torch.randn(batch, samples, generator=torch.Generator().manual_seed(0))
                 ).to(device)
        for precision in precisions:
            for graph in graphs:
                if graph and not cuda:
                    raise ValueError("CUDA graphs need a CUDA device")
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                call = (graph_call if graph else eager_call)(model, audio, device, precision)
                timing = time_call(call, timed.warmup, timed.repeats, sync=sync)
                rows.append(_row(f"student-{size}", device, precision, graph, batch, window_s,
                                 timing))
                _progress(rows[-1])
                del call
        del audio
        if cuda:
            torch.cuda.empty_cache()
    return rows


def teacher_model(checkpoint: Path | None, device: str) -> Any:
    """The teacher of ``checkpoint``, or a fresh ``tiny`` one (tokenizer trained on the task
    questions and the synthetic labels), in eval mode on ``device``."""
    if checkpoint is not None:
        from teacher.checkpoint import load_teacher

        return load_teacher(checkpoint, map_location=device).eval()
    import torch

    from corpus.tasks import TASKS
    from teacher.config import teacher_config
    from teacher.model import NatureLM
    from teacher.tokenizer import train_tokenizer

    labels = synthetic_label_sets()
    texts = [t.question for t in TASKS.values()] + [", ".join(v) for v in labels.values()]
    torch.manual_seed(0)
    cfg = teacher_config("tiny")
    return NatureLM(cfg, train_tokenizer(texts, cfg.llm.vocab_size)).eval().to(device)


def teacher_rows(device: str, batch_sizes: Sequence[int], timed: Timed,
                 checkpoint: Path | None = None) -> list[dict[str, Any]]:
    """Rows for the teacher scoring every synthetic task's labels for a batch of clips."""
    import torch

    from benchmarks.harness import time_call
    from corpus.tasks import instruction_for

    model = teacher_model(checkpoint, device)
    tasks = synthetic_label_sets()
    cfg = model.cfg
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    rows = []
    for batch in batch_sizes:
        clips = (0.05 * torch.randn(batch, cfg.clip_samples,
                                    generator=torch.Generator().manual_seed(0))).to(device)

        def score(clips: Any = clips, batch: int = batch) -> None:
            with torch.inference_mode():
                for task, labels in tasks.items():
                    model.score_labels(clips, [instruction_for(task)] * batch, list(labels))

        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        timing = time_call(score, max(1, timed.warmup // 2), max(3, timed.repeats // 3),
                           sync=sync)
        rows.append(_row(f"teacher-{cfg.preset}", device, "fp32", False, batch, cfg.clip_s,
                         timing))
        _progress(rows[-1])
    return rows


def run(sizes: Sequence[str] = ("s", "m"), checkpoints: Sequence[Path] = (),
        teacher: Path | None = None, device: str = "cuda",
        precisions: Sequence[str] = PRECISIONS, batch_sizes: Sequence[int] = BATCH_SIZES,
        graphs: Sequence[bool] = (False, True), teacher_batch_sizes: Sequence[int] = (1, 8, 32),
        warmup: int = 5, repeats: int = 30, results_dir: Path | None = None,
        quiet: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Measure, print the table and the JSON line; returns the JSON-able result. On the CPU
    torch runs ``threads`` intra-op threads (default 1: spinning OpenMP threads on a shared
    machine slow a small model down by orders of magnitude)."""
    import torch

    from benchmarks.harness import context, markdown_table, publish

    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if threads is not None or device == "cpu":
        torch.set_num_threads(threads or 1)
    timed = Timed(warmup, repeats)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    students = [(s, None) for s in sizes] + [(Path(c).stem, Path(c)) for c in checkpoints]
    for size, checkpoint in students:
        rows += student_rows(size, device, precisions, batch_sizes, graphs, timed, checkpoint)
    if teacher_batch_sizes:
        rows += teacher_rows(device, teacher_batch_sizes, timed, teacher)
    ctx = context(torch.get_num_threads(), probe_gpu=True, extra={"device": device, "warmup": warmup,
                                               "repeats": repeats,
                                               "seconds": round(time.perf_counter() - start, 1)})
    markdown = markdown_table(rows, COLUMNS)
    result = {"benchmark": "gpu_latency", "context": ctx, "rows": rows}
    return publish("gpu_latency", result, markdown, results_dir, quiet)


def gpu_latency(
    sizes: list[str] | None = None,
    checkpoints: list[Path] | None = None,
    teacher: Path | None = None,
    device: str = "cuda",
    precisions: list[str] | None = None,
    batch_sizes: list[int] | None = None,
    cuda_graphs: bool = True,
    teacher_batch_sizes: list[int] | None = None,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    save: bool = True,
    results_dir: Path = RESULTS_DIR,
) -> int:
    """Student latency in torch (FP32 / FP16, eager and CUDA graphs, batch 1 to 1024) and the
    tiny teacher's, on a GPU.

    Args:
        sizes: student presets to time with fresh weights (default: s m).
        checkpoints: student checkpoints to time as well.
        teacher: a teacher checkpoint (default: a fresh tiny teacher).
        device: torch device (cuda, cuda:1, or cpu for a check without a GPU).
        precisions: fp32 and / or fp16 (autocast).
        batch_sizes: windows per call (default: 1 4 16 64 256 1024).
        cuda_graphs: also time replays of captured CUDA graphs (CUDA devices only).
        teacher_batch_sizes: clips per teacher call (default: 1 8 32; none with an empty list).
        warmup: untimed calls per configuration.
        repeats: timed calls per configuration.
        threads: torch intra-op threads (default: 1 on the CPU, torch's choice on a GPU).
        save: add the figures to RESULTS_DIR/<machine-id>.json and .md.
        results_dir: where --save writes.
    """
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        print("naturelm-edge gpu latency: no CUDA device (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 3
    graphs = (False, True) if cuda_graphs and device.startswith("cuda") else (False,)
    try:
        run(sizes if sizes is not None else ("s", "m"), checkpoints or (), teacher, device,
            precisions or PRECISIONS, batch_sizes or BATCH_SIZES, graphs,
            (1, 8, 32) if teacher_batch_sizes is None else teacher_batch_sizes, warmup, repeats,
            results_dir if save else None, threads=threads)
    except (ValueError, KeyError) as exc:
        print(f"naturelm-edge gpu latency: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from naturelm_edge.cli import parser_for

    args = parser_for(gpu_latency, "python -m benchmarks.gpu_latency").parse_args()
    sys.exit(gpu_latency(**vars(args)))
