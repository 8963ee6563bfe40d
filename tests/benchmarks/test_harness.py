"""The harness: percentiles against numpy, warm-up and repeat counts, tables, the JSON line,
per-machine results files that keep every benchmark's section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.harness import (
    context,
    json_line,
    machine_id,
    markdown_table,
    peak_rss_mb,
    percentile,
    summarize,
    time_call,
    write_results,
)


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentiles_match_numpy(n: int) -> None:
    values = list(np.random.default_rng(n).exponential(size=n))
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summarize_reports_milliseconds() -> None:
    seconds = list(np.random.default_rng(0).uniform(0.001, 0.01, size=50))
    t = summarize(seconds, warmup=2)
    ms = np.array(seconds) * 1000
    assert (t.n, t.warmup) == (50, 2)
    assert t.mean_ms == pytest.approx(ms.mean())
    assert t.p50_ms == pytest.approx(np.median(ms))
    assert t.p99_ms == pytest.approx(np.percentile(ms, 99))
    assert t.min_ms <= t.p50_ms <= t.p90_ms <= t.p99_ms <= t.max_ms
    assert t.total_s == pytest.approx(sum(seconds))


def test_bad_statistics_input_raises() -> None:
    with pytest.raises(ValueError, match="no timed calls"):
        summarize([])
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)


def test_time_call_warms_up_then_times_and_syncs_every_call() -> None:
    calls: list[str] = []
    t = time_call(lambda: calls.append("call"), warmup=2, repeats=5,
                  sync=lambda: calls.append("sync"))
    assert t.n == 5 and t.warmup == 2
    assert calls == ["call", "sync"] * 7


def test_time_call_keeps_timing_for_min_time() -> None:
    t = time_call(lambda: sum(range(1000)), warmup=0, repeats=1, min_time_s=0.05)
    assert t.n > 1 and t.total_s >= 0.04


def test_markdown_table_aligns_numbers_and_escapes() -> None:
    text = markdown_table([{"model": "a|b", "ms": 1.5}, {"model": "c", "ms": None}])
    lines = text.splitlines()
    assert lines[0] == "| model | ms |"
    assert lines[1] == "| --- | ---: |"
    assert lines[2] == "| a\\|b | 1.5 |"
    assert lines[3] == "| c | - |"
    with pytest.raises(ValueError, match="column"):
        markdown_table([])


def test_json_line_is_one_parseable_line(capsys: pytest.CaptureFixture[str]) -> None:
    result = {"benchmark": "x", "rows": [{"a": 1.5, "b": "multi\nline"}], "path": Path("/p")}
    line = json_line(result)
    out = capsys.readouterr().out
    assert out == line + "\n" and out.count("\n") == 1
    assert json.loads(line) == {"benchmark": "x", "rows": [{"a": 1.5, "b": "multi\nline"}],
                                "path": "/p"}


def test_context_names_the_machine_and_versions() -> None:
    ctx = context(threads=1, probe_gpu=False, extra={"backend": "cpu"})
    assert ctx["versions"]["numpy"] == np.__version__
    assert ctx["threads"] == 1 and ctx["backend"] == "cpu" and ctx["cores"] >= 1
    assert ctx["machine_id"] == machine_id(ctx["cpu"], ctx["cores"], None)
    assert machine_id("Intel(R) Xeon(R) CPU @ 2.2GHz", 2, "NVIDIA H100 80GB") == \
        "intel-r-xeon-r-cpu-2-2ghz-2c-nvidia-h100-80gb"
    assert peak_rss_mb() > 10


def test_results_files_keep_every_benchmark(tmp_path: Path) -> None:
    ctx = {"machine_id": "box-2c", "date": "2026-01-01"}
    write_results("latency", {"context": ctx, "x": 1}, "| a |\n| --- |", tmp_path)
    json_path, md_path = write_results("peer", {"context": ctx, "y": 2}, "peer table", tmp_path)
    assert json_path == tmp_path / "box-2c.json" and md_path == tmp_path / "box-2c.md"
    stored = json.loads(json_path.read_text())
    assert stored["benchmarks"]["latency"]["result"]["x"] == 1
    assert stored["benchmarks"]["peer"]["result"]["y"] == 2
    md = md_path.read_text()
    assert "## latency (2026-01-01)" in md and "## peer (2026-01-01)" in md and "peer table" in md
    write_results("peer", {"context": ctx, "y": 3}, "new", tmp_path)
    assert json.loads(json_path.read_text())["benchmarks"]["peer"]["result"]["y"] == 3


def test_a_corrupt_results_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "box.json").write_text("{not json")
    with pytest.raises(ValueError, match="box.json"):
        write_results("peer", {"context": {}}, "", tmp_path, machine="box")
