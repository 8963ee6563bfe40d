"""`benchmarks.gpu_latency`: on a GPU, CUDA-graph replays and FP16 autocast compute what the
eager FP32 student computes, and every configuration is timed; the command's rows and JSON
line. On the CPU: the same rows without graphs, and graphs refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gpu_latency import (
    Timed,
    eager_call,
    gpu_latency,
    graph_call,
    run,
    student_model,
    teacher_rows,
)
from naturelm_edge.cli import parser_for


def test_cpu_rows_without_graphs() -> None:
    rows = run(sizes=("s",), device="cpu", precisions=("fp32",), batch_sizes=(1, 2),
               graphs=(False,), teacher_batch_sizes=(), warmup=1, repeats=2, quiet=True)["rows"]
    assert [(r["model"], r["batch"], r["cuda_graph"]) for r in rows] == [
        ("student-s", 1, False), ("student-s", 2, False)]
    for r in rows:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["gpu_mb"] is None
        assert r["x_real_time"] == pytest.approx(r["batch"] * 10_000 / r["mean_ms"])


def test_graphs_need_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        run(sizes=("s",), device="cpu", precisions=("fp32",), batch_sizes=(1,),
            graphs=(True,), teacher_batch_sizes=(), warmup=1, repeats=1, quiet=True)


@pytest.mark.cuda
def test_graph_replay_and_fp16_match_eager_fp32() -> None:
    import torch

    model, samples, _ = student_model("s")
    model.to("cuda")
    audio = 0.1 * torch.randn(4, samples, generator=torch.Generator().manual_seed(1))
    audio = audio.to("cuda")
    eager = eager_call(model, audio, "cuda", "fp32")()
    replay = graph_call(model, audio, "cuda", "fp32")
    first = {k: v.clone() for k, v in replay().items()}
    second = replay()
    half = eager_call(model, audio, "cuda", "fp16")()
    for name, want in eager.items():
        assert torch.allclose(first[name], want, atol=1e-4, rtol=1e-4), name
        assert torch.equal(first[name], second[name]), name
        assert torch.isfinite(half[name]).all(), name
        assert torch.allclose(half[name].float(), want, atol=5e-2, rtol=5e-2), name


@pytest.mark.cuda
def test_command_times_every_configuration_on_the_gpu(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--sizes", "s", "--batch-sizes", "1", "64", "--teacher-batch-sizes", "1",
            "--warmup", "1", "--repeats", "3", "--results-dir", str(tmp_path)]
    parsed = parser_for(gpu_latency, "gpu_latency").parse_args(args)
    assert gpu_latency(**vars(parsed)) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = {(r["model"], r["precision"], r["cuda_graph"], r["batch"]) for r in result["rows"]}
    assert got == {("student-s", p, g, b) for p in ("fp32", "fp16") for g in (False, True)
                   for b in (1, 64)} | {("teacher-tiny", "fp32", False, 1)}
    assert all(r["gpu_mb"] > 0 and r["device"] == "cuda" for r in result["rows"])
    assert result["context"]["gpu"]
    assert "gpu_latency" in json.loads(Path(result["results_file"]).read_text())["benchmarks"]


@pytest.mark.cuda
def test_teacher_scores_on_the_gpu() -> None:
    rows = teacher_rows("cuda", (2,), Timed(warmup=1, repeats=3))
    assert rows[0]["batch"] == 2 and rows[0]["mean_ms"] > 0 and rows[0]["gpu_mb"] > 0
