"""What every benchmark shares: context, timing with warm-up, percentiles, memory, outputs.

- `context` records where figures were measured: CPU model, cores, threads, GPU (through
  torch only when torch is installed and asked for), library versions (read from the
  installed distributions, so nothing heavy is imported), date and a `machine_id`.
- `time_call` warms up, optionally synchronises after every call (pass
  ``torch.cuda.synchronize``), and summarises the timed calls as a `Timing` (mean, p50, p90,
  p99, min, max in milliseconds).
- `peak_rss_mb` and `gpu_memory_mb` measure memory; `markdown_table` and `json_line` print;
  `write_results` keeps one JSON and one markdown file per machine in `benchmarks/results/`,
  one section per benchmark, so `bench peer` and `bench latency` add to the same files.

    >>> t = summarize([0.001, 0.002, 0.003, 0.004])
    >>> (t.n, t.mean_ms, t.p50_ms)
    (4, 2.5, 2.5)
    >>> print(markdown_table([{"model": "s", "ms": 1.23456}]))
    | model | ms |
    | --- | ---: |
    | s | 1.235 |
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "tensorrt",
             "ai-edge-litert", "birdnet", "soundfile", "soxr")


@dataclass(frozen=True)
class Timing:
    """Latency of timed calls, in milliseconds, after `warmup` untimed calls."""

    n: int
    warmup: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    total_s: float

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out a matplotlib figure, write it as a PNG at ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(seconds: Sequence[float], warmup: int = 0) -> Timing:
    """A `Timing` of per-call durations given in seconds."""
    if not seconds:
        raise ValueError("no timed calls to summarize")
    ms = [s * 1000.0 for s in seconds]
    return Timing(n=len(ms), warmup=warmup, mean_ms=sum(ms) / len(ms),
                  p50_ms=percentile(ms, 50), p90_ms=percentile(ms, 90),
                  p99_ms=percentile(ms, 99), min_ms=min(ms), max_ms=max(ms),
                  total_s=float(sum(seconds)))


def time_call(fn: Callable[[], object], warmup: int = 3, repeats: int = 20,
              sync: Callable[[], object] | None = None, min_time_s: float = 0.0) -> Timing:
    """Call `fn` `warmup` times untimed, then at least `repeats` times (and for at least
    `min_time_s` seconds) timed; `sync` runs after every call, inside the timed span."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_time_s:
        begin = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - begin)
    return summarize(times, warmup)


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process so far, in MB (MiB); with `children`, the
    largest peak among its finished child processes instead."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    peak = resource.getrusage(who).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def gpu_memory_mb(pid: int | None = None) -> float | None:
    """GPU memory held by process `pid` (default: this one) in MB, from ``nvidia-smi``;
    None without an NVIDIA driver or when the process holds none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    pid = os.getpid() if pid is None else pid
    out = subprocess.run([exe, "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=30, check=False)
    if out.returncode != 0:
        return None
    used = 0.0
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                used += float(parts[1])
            except ValueError:
                continue  # "[N/A]" where the driver does not report per-process memory
    return used or None


def versions(names: Sequence[str] = LIBRARIES) -> dict[str, str]:
    """Installed versions of the named distributions (absent ones are left out)."""
    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else `platform`)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gpu_name() -> str | None:
    """The first CUDA device's name through torch, when torch is installed and sees one."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def machine_id(cpu: str | None = None, cores: int | None = None,
               gpu: str | None = None) -> str:
    """A file-name-safe id of the hardware (not the host name, which containers change):
    the CPU model, the usable cores and the GPU if any."""
    parts = [cpu or cpu_model(), f"{cores or usable_cores()}c"]
    if gpu:
        parts.append(gpu)
    slug = re.sub(r"[^a-z0-9]+", "-", " ".join(parts).lower()).strip("-")
    return re.sub(r"-+", "-", slug)[:100] or "unknown"


def context(threads: int | None = None, probe_gpu: bool = True,
            extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where the figures were measured. `probe_gpu` imports torch (when installed) to name
    the GPU; call it after measuring when torch's import would spoil memory figures."""
    cpu = cpu_model()
    cores = usable_cores()
    gpu = gpu_name() if probe_gpu else None
    return {
        "machine_id": machine_id(cpu, cores, gpu),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cores": cores, "cpu_count": os.cpu_count(), "threads": threads,
        "gpu": gpu, "platform": platform.platform(), "python": platform.python_version(),
        "versions": versions(), **dict(extra or {}),
    }


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   floatfmt: str = ".4g") -> str:
    """A GitHub markdown table of `rows` (columns: `columns` or the keys of every row, in
    order of appearance); numbers are right-aligned, None prints as ``-``."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        raise ValueError("a table needs at least one column")
    numeric = [all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows)
               and any(r.get(c) is not None for r in rows) for c in columns]
    lines = ["| " + " | ".join(columns) + " |",
             "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    lines += ["| " + " | ".join(_cell(row.get(c), floatfmt) for c in columns) + " |"
              for row in rows]
    return "\n".join(lines)


def json_line(result: Mapping[str, Any]) -> str:
    """Print `result` as one JSON line on stdout (the line scripts parse) and return it."""
    line = json.dumps(result, default=str, separators=(", ", ": "))
    if "\n" in line:
        raise ValueError("a JSON line must not contain a newline")
    print(line, flush=True)
    return line


def publish(name: str, result: dict[str, Any], markdown: str,
            results_dir: str | os.PathLike[str] | None, quiet: bool = False) -> dict[str, Any]:
    """How every benchmark ends: store `result` and `markdown` under `name` in `results_dir`
    (`write_results`; ``None`` stores nothing) noting the file in ``result["results_file"]``,
    then, unless `quiet`, print the markdown and the final JSON line. Returns `result`."""
    if results_dir is not None:
        json_path, _ = write_results(name, result, markdown, results_dir)
        result["results_file"] = str(json_path)
    if not quiet:
        print(markdown)
        json_line(result)
    return result


def write_results(name: str, result: Mapping[str, Any], markdown: str,
                  folder: str | os.PathLike[str] = RESULTS_DIR,
                  machine: str | None = None) -> tuple[Path, Path]:
    """Store benchmark `name`'s `result` and `markdown` section in ``<folder>/<machine>.json``
    and ``.md`` (other benchmarks' sections are kept); returns both paths."""
    from runtime.files import atomic_write_text

    machine = machine or str(result.get("context", {}).get("machine_id") or machine_id())
    folder = Path(folder)
    json_path, md_path = folder / f"{machine}.json", folder / f"{machine}.md"
    stored: dict[str, Any] = {"machine_id": machine, "benchmarks": {}}
    if json_path.is_file():
        try:
            stored = json.loads(json_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{json_path}: not a results file ({exc}); move it away") from exc
    stored.setdefault("benchmarks", {})[name] = {"result": result, "markdown": markdown}
    atomic_write_text(json_path, json.dumps(stored, indent=1, default=str) + "\n")
    sections = [f"# Benchmarks on {machine}", ""]
    for key, entry in sorted(stored["benchmarks"].items()):
        date = entry["result"].get("context", {}).get("date", "")
        sections += [f"## {key} ({date})", "", entry["markdown"].rstrip(), ""]
    atomic_write_text(md_path, "\n".join(sections))
    return json_path, md_path
