"""Teacher labelling speed (`naturelm-edge distill label`): records per second on this machine.

Runs `distill.label.label` on the first ``--clips`` clips of a manifest (every task of each
clip) with a teacher checkpoint, once per configuration of processes x torch threads
(``1x1``: one process, one thread; ``2x1``: two-process DDP on the CPU, one thread each),
taking turns for ``--rounds`` rounds so that load from other work on the machine hits every
configuration alike. Each run is a fresh process and a fresh store; the time covers the whole
call (checkpoint load, audio decoding, labelling, writing). ``--tree NAME=PATH`` also runs
another checkout of the project (for example ``git archive`` of an older commit) in the same
rounds, so before / after figures come from the same conditions. Prints a table, the expected
time for ``--corpus-records`` records, and a final JSON line.

    python -m benchmarks.label_speed runs/demo/teacher/teacher.ckpt \\
        runs/demo/corpus/manifest.jsonl --clips 40 --configs 1x1,1x2 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import context, json_line, markdown_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS_RECORDS = 7610  # the default synthetic corpus (1,600 clips x up to 5 tasks)

CHILD = """
import inspect, os, sys, time
sys.path.insert(0, {tree!r})
import torch
torch.set_num_threads({threads})
from distill.label import label
# label() sets its own thread count where it has the option (older checkouts do not)
threads = {{"num_threads": {threads}}} if "num_threads" in inspect.signature(label).parameters \
    else {{}}
start = time.perf_counter()
label({teacher!r}, {manifest!r}, {out!r}, batch_size={batch_size}, accelerator="cpu",
      devices="{processes}", strategy={strategy!r}, max_new_tokens={max_new_tokens}, **threads)
if os.environ.get("LOCAL_RANK", "0") == "0":
    print("LABEL_SECONDS", time.perf_counter() - start, flush=True)
"""


def parse_config(text: str) -> tuple[int, int]:
    """``"PxT"`` -> (processes, threads per process); both at least 1."""
    try:
        processes, threads = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"configuration {text!r} is not PROCESSESxTHREADS, e.g. 1x1") from None
    if processes < 1 or threads < 1:
        raise ValueError(f"configuration {text!r}: processes and threads must be >= 1")
    return processes, threads


def subset_manifest(manifest: Path, clips: int, folder: Path) -> tuple[Path, int, int]:
    """The records of the first ``clips`` clips of ``manifest`` (with a label set), written
    to ``folder``; returns the path, the record count and the clip count."""
    from corpus.manifest import read_manifest, write_manifest
    from distill.label import group_by_clip

    records = [r for r in read_manifest(manifest) if r.labels]
    groups = group_by_clip(records)[:clips]
    chosen = [r for g in groups for r in g]
    if not chosen:
        raise ValueError(f"{manifest}: no records with a label set")
    path = folder / "manifest.jsonl"
    write_manifest(chosen, path)
    return path, len(chosen), len(groups)


def run_once(tree: Path, teacher: Path, manifest: Path, out: Path, processes: int,
             threads: int, batch_size: int, max_new_tokens: int, timeout_s: float) -> float:
    """Seconds one labelling call took in a fresh process (or DDP group)."""
    script = out.parent / f"{out.name}.py"
    script.write_text(textwrap.dedent(CHILD.format(
        tree=str(tree), threads=threads, teacher=str(teacher), manifest=str(manifest),
        out=str(out), batch_size=batch_size, processes=processes,
        strategy="ddp" if processes > 1 else "auto", max_new_tokens=max_new_tokens)))
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, str(script)], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"labelling with {tree} ({processes}x{threads}) failed:\n"
                           f"{done.stderr[-3000:]}")
    for line in done.stdout.splitlines():
        if line.startswith("LABEL_SECONDS"):
            return float(line.split()[1])
    raise RuntimeError(f"no timing in the output of {script}:\n{done.stdout[-2000:]}")


def measure(teacher: Path, manifest: Path, trees: Sequence[tuple[str, Path]],
            configs: Sequence[str], clips: int, rounds: int, batch_size: int,
            max_new_tokens: int, timeout_s: float) -> tuple[list[dict[str, Any]], int, int]:
    """Rows of (tree, configuration, records per second over the rounds)."""
    with tempfile.TemporaryDirectory(prefix="label_speed_") as tmp:
        folder = Path(tmp)
        subset, n_records, n_clips = subset_manifest(manifest, clips, folder)
        seconds: dict[tuple[str, str], list[float]] = {}
        for r in range(rounds):
            for name, tree in trees:
                for config in configs:
                    processes, threads = parse_config(config)
                    out = folder / f"store-{name}-{config}-{r}"
                    took = run_once(tree, teacher, subset, out, processes, threads,
                                    batch_size, max_new_tokens, timeout_s)
                    seconds.setdefault((name, config), []).append(took)
                    print(f"round {r + 1}: {name} {config}: {took:.1f} s", file=sys.stderr)
    rows = []
    for (name, config), times in seconds.items():
        best, median = min(times), statistics.median(times)
        rows.append({"tree": name, "processes x threads": config, "records": n_records,
                     "clips": n_clips, "best_s": best, "median_s": median,
                     "records_per_s": n_records / best,
                     "records_per_s_median": n_records / median})
    return rows, n_records, n_clips


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", type=Path, help="teacher checkpoint")
    parser.add_argument("manifest", type=Path, help="manifest to take clips from")
    parser.add_argument("--clips", type=int, default=40, help="clips labelled per run")
    parser.add_argument("--configs", default="1x1,1x2",
                        help="comma-separated PROCESSESxTHREADS (e.g. 1x1,1x2,2x1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="clips per batch")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="another checkout to measure in the same rounds")
    parser.add_argument("--corpus-records", type=int, default=DEFAULT_CORPUS_RECORDS,
                        help="records to extrapolate the labelling time to")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    args = parser.parse_args(argv)
    trees = [("this", REPO)]
    for item in args.tree:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            parser.error(f"--tree {item!r}: give NAME=PATH of a checkout folder")
        trees.append((name, Path(path).resolve()))
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        parse_config(c)
    rows, n_records, n_clips = measure(args.teacher, args.manifest, trees, configs, args.clips,
                                       args.rounds, args.batch_size, args.max_new_tokens,
                                       args.timeout)
    for row in rows:
        row["corpus_minutes"] = args.corpus_records / row["records_per_s"] / 60
    print(markdown_table(rows))
    print(f"{n_records} records of {n_clips} clips per run; corpus_minutes: expected time for "
          f"{args.corpus_records} records at the best rate", file=sys.stderr)
    json_line({"benchmark": "label_speed", "teacher": str(args.teacher), "rows": rows,
               "context": context(probe_gpu=False)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
