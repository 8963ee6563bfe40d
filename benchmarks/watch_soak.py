"""A simulated month of the `watch` daemon: per-round time, memory and bytes written.

Each simulated day a recorder drops `--per-day` recordings (AudioMoth names,
``YYYYMMDD_HHMMSS.WAV``, `--seconds` long, tones the model detects) into an inbox and the
daemon runs one round over them, as `watch` does (same `Watcher`, model loaded once). A
journal pre-filled with `--history` recordings of earlier days stands for the months
before. Per round it records the wall time, the resident memory (VmRSS), the bytes the
round appended to the combined files, everything the round made reach storage (Linux
``/proc/self/io``: Raven tables, journal lines, day files, file-system metadata), and what rewriting one combined file from the whole history each round
(what the daemon did before the per-day files) would have written instead. Prints a table
of every `--every`-th day and a final JSON line.

    $ python -m benchmarks.watch_soak --days 30 --per-day 24 --history 100000
    $ python -m benchmarks.watch_soak --bundle runs/default/bundle --days 7
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from benchmarks.harness import context, json_line, markdown_table, peak_rss_mb


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _written_bytes() -> int:
    """Bytes this process caused to be written to storage so far (Linux), or -1."""
    try:
        with open("/proc/self/io", encoding="ascii") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("write_bytes"))
    except (OSError, StopIteration):
        return -1


def _prefill(out: Path, header: bytes, entries: int, start: dt.date) -> None:
    """`entries` finished recordings (one detection each) on the days before `start`, with
    the day files their journal lines name, written in one go."""
    from runtime.journal import Entry
    from runtime.postprocess import Detection
    from runtime.writers import CSV_HEADER, format_csv_rows, format_jsonl

    per_day = 24
    days = max(1, -(-entries // per_day))
    lines, files = [], {}
    for i in range(entries):
        day = (start - dt.timedelta(days=days - i // per_day)).isoformat()
        name = f"/data/inbox/{day.replace('-', '')}_{i % per_day:02d}0000.WAV"
        dets = (Detection(name, 0.0, 1.0, "detection", "A", 0.9),)
        csv_rel, jsonl_rel = f"detections/{day}.csv", f"detections/{day}.jsonl"
        files.setdefault(csv_rel, [CSV_HEADER]).append(format_csv_rows(dets))
        files.setdefault(jsonl_rel, [""]).append(format_jsonl(dets))
        lengths = {rel: sum(len(t.encode()) for t in files[rel]) for rel in (csv_rel, jsonl_rel)}
        lines.append(Entry(name, 1000, i, "ok", 60.0, detections=dets, outputs=lengths).to_json())
    for rel, parts in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("".join(parts), encoding="utf-8")
    (out / "journal.jsonl").write_bytes(header + "".join(f"{x}\n" for x in lines).encode())


def _open(bundle: Path, inbox: Path, out: Path, threads: int) -> Any:
    from runtime.analyze import JOURNAL, make_settings
    from runtime.bundle import load_bundle
    from runtime.journal import Journal
    from runtime.runners import open_runner
    from runtime.watch import Watcher

    loaded = load_bundle(bundle)
    settings = make_settings(loaded.manifest, None, None, None, None, None, None, None, None,
                             True, 0.0, None, None)
    runner = open_runner(loaded, "cpu", threads=threads).__enter__()
    journal = Journal.open(out / JOURNAL, settings.fingerprint(loaded, Path(
        str(getattr(runner, "model", ""))).name))
    daemon = Watcher(loaded, settings, runner, journal, inbox, out, policy="delete",
                     settle_s=0.0, queue_size=10_000)
    return daemon


def _drop_day(inbox: Path, day: dt.date, per_day: int, seconds: float, rate: int,
              rng: np.random.Generator) -> None:
    for hour in range(per_day):
        audio = rng.normal(0, 0.01, round(seconds * rate)).astype(np.float32)
        start = int(rng.integers(0, max(1, round((seconds - 1.0) * rate))))
        t = np.arange(rate) / rate
        audio[start:start + rate] += 0.5 * np.sin(2 * np.pi * 1000.0 * (1 + hour % 4) * t)[
            : len(audio) - start]
        stamp = f"{day:%Y%m%d}_{hour % 24:02d}{hour // 24 % 60:02d}00"
        sf.write(inbox / f"{stamp}.WAV", audio, rate, subtype="PCM_16")


def soak(bundle: Path | None, days: int, per_day: int, seconds: float, history: int,
         threads: int, every: int) -> dict[str, Any]:
    """Run the simulated month; returns the per-round rows and the summary."""
    with tempfile.TemporaryDirectory(prefix="watch-soak-") as scratch:
        root = Path(scratch)
        if bundle is None:
            from benchmarks.fixtures import make_bundle

            bundle = make_bundle(root / "bundle")
        elif not bundle.is_dir():
            from runtime.bundle import load_bundle

            bundle = load_bundle(bundle, extract_to=root / "unpacked").root
        inbox, out = root / "inbox", root / "out"
        inbox.mkdir()
        start = dt.date(2024, 5, 1)
        if history:
            first = _open(bundle, inbox, out, threads)
            first.journal.close()
            header = (out / "journal.jsonl").read_bytes()
            _prefill(out, header, history, start)
        began = time.perf_counter()
        daemon = _open(bundle, inbox, out, threads)
        daemon.start()
        open_s = time.perf_counter() - began
        rate = daemon.bundle.manifest.sample_rate
        rng = np.random.default_rng(0)
        rows = []
        for index in range(days):
            day = start + dt.timedelta(days=index)
            _drop_day(inbox, day, per_day, seconds, rate, rng)
            os.sync()  # the recorder's own writes must not count against the round
            io_before, t0 = _written_bytes(), time.perf_counter()
            stats = daemon.round()
            wall = time.perf_counter() - t0
            io_after = _written_bytes()
            history_bytes = sum(p.stat().st_size for p in (out / "detections").iterdir())
            rows.append({"day": index + 1, "recordings": stats.recordings,
                         "detections": stats.detections, "round_s": wall,
                         "rss_mb": _status_mb("VmRSS"),
                         "appended_kb": stats.bytes_written / 1024,
                         "written_kb": (io_after - io_before) / 1024 if io_before >= 0 else None,
                         "rewrite_all_kb": history_bytes / 1024,
                         "journal_keys": len(daemon.journal.finished)})
        daemon.journal.close()
        daemon.runner.__exit__(None, None, None)
    return {"rows": rows, "open_s": open_s, "bundle": str(bundle)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle folder (default: the tone bundle of benchmarks.fixtures)")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--per-day", type=int, default=24, help="recordings per day")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each recording")
    parser.add_argument("--history", type=int, default=100_000,
                        help="recordings already in the journal before the month starts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--every", type=int, default=5, help="print every n-th day")
    args = parser.parse_args(argv)
    result = soak(args.bundle, args.days, args.per_day, args.seconds, args.history,
                  args.threads, args.every)
    rows = result["rows"]
    shown = [r for r in rows if r["day"] == 1 or r["day"] % args.every == 0
             or r["day"] == len(rows)]
    print(markdown_table(shown, floatfmt=".3g"))
    first, last = rows[0], rows[-1]
    later = rows[1:] or rows
    summary = {
        "benchmark": "watch_soak", "days": args.days, "per_day": args.per_day,
        "seconds": args.seconds, "history": args.history, "open_s": result["open_s"],
        "round_s_first": first["round_s"], "round_s_last": last["round_s"],
        "round_s_median": float(np.median([r["round_s"] for r in later])),
        "rss_mb_first": first["rss_mb"], "rss_mb_last": last["rss_mb"],
        "rss_growth_mb": last["rss_mb"] - first["rss_mb"],
        "appended_kb_per_round": float(np.mean([r["appended_kb"] for r in rows])),
        "written_kb_per_round": (float(np.mean([r["written_kb"] for r in rows]))
                                 if first["written_kb"] is not None else None),
        "rewrite_all_kb_last_round": last["rewrite_all_kb"],
        "peak_rss_mb": peak_rss_mb(), "context": context(args.threads, probe_gpu=False),
    }
    json_line(summary)


if __name__ == "__main__":
    main()
