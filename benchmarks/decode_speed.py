"""Decode + resample throughput of runtime.audio on a long file made on the fly, in x real time.

Writes a synthetic recording (tones, chirps and noise) block by block into a temporary
folder, then times, after a warm-up: decoding alone, decoding + soxr resampling to the
target rate, and that plus cutting into windows. Prints a table and a final JSON line with
the context (format, rate, channels, block, versions, CPU) and the peak resident memory,
which stays far below the decoded size because nothing loads the file whole.

    $ python -m benchmarks.decode_speed --minutes 10 --rate 48000 --channels 2 --fmt flac
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import soundfile as sf

from benchmarks.harness import json_line, peak_rss_mb
from runtime.audio import stream_audio
from runtime.windows import WindowSpec, iter_windows

_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_24"), "ogg": ("OGG", "VORBIS"),
            "mp3": ("MP3", "MPEG_LAYER_III")}


def write_long_file(path: Path, minutes: float, rate: int, channels: int, fmt: str,
                    seed: int = 0) -> Path:
    """Write `minutes` of synthetic audio to `path`, five seconds at a time."""
    if fmt not in _FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(_FORMATS)}")
    major, subtype = _FORMATS[fmt]
    rng = np.random.default_rng(seed)
    total = round(minutes * 60 * rate)
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=channels, format=major,
                      subtype=subtype) as out:
        done = 0
        while done < total:
            n = min(5 * rate, total - done)
            t = (done + np.arange(n)) / rate
            chirp = np.sin(2 * np.pi * (2000 + 1500 * np.sin(2 * np.pi * 0.3 * t)) * t)
            base = 0.3 * chirp + 0.05 * rng.standard_normal(n)
            out.write(np.stack([base * (0.9 ** c) for c in range(channels)], axis=1)
                      .astype(np.float32))
            done += n
    return path


def _time(consume: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    samples = consume()
    return time.perf_counter() - start, samples


def _count(blocks: Iterable[np.ndarray]) -> int:
    return sum(len(b) for b in blocks)


def run(minutes: float = 10.0, rate: int = 48000, channels: int = 2, fmt: str = "flac",
        block_s: float = 10.0, target_rate: int = 16000, window_s: float = 10.0) -> dict[str, object]:
    """Time decode, decode + resample and decode + resample + windows; print a table and JSON.

    Args:
        minutes: length of the synthetic recording.
        rate: its sample rate in Hz.
        channels: its channel count (mixed to mono while decoding).
        fmt: wav, flac, ogg or mp3.
        block_s: seconds of source audio decoded per block.
        target_rate: the rate to resample to.
        window_s: window length for the windowing stage (no overlap, last padded).
    """
    with tempfile.TemporaryDirectory() as folder:
        path = write_long_file(Path(folder) / f"long.{fmt}", minutes, rate, channels, fmt)
        size_mb = path.stat().st_size / 1e6
        rss_before = peak_rss_mb()
        _count(stream_audio(path, target_rate, block_s=block_s, duration_s=5.0))  # warm-up
        seconds = minutes * 60
        spec = WindowSpec(window_s, window_s, "pad")
        stages = {
            "decode": lambda: _count(stream_audio(path, None, block_s=block_s)),
            "decode+resample": lambda: _count(stream_audio(path, target_rate, block_s=block_s)),
            "decode+resample+windows": lambda: sum(
                1 for _ in iter_windows(stream_audio(path, target_rate, block_s=block_s),
                                        target_rate, spec)),
        }
        rows = {name: _time(stage) for name, stage in stages.items()}
        rss_after = peak_rss_mb()
    decoded_mb = seconds * rate * channels * 4 / 1e6
    print(f"{minutes:g} min {fmt} {rate} Hz x{channels} ({size_mb:.1f} MB on disk, "
          f"{decoded_mb:.0f} MB decoded as float32), block {block_s:g} s -> {target_rate} Hz")
    print(f"{'stage':<26}{'wall s':>9}{'x real time':>14}")
    for name, (wall, _) in rows.items():
        print(f"{name:<26}{wall:>9.2f}{seconds / wall:>14.0f}")
    print(f"peak RSS {rss_after:.0f} MB (before timing {rss_before:.0f} MB)")
    result: dict[str, object] = {
        "benchmark": "decode_speed", "minutes": minutes, "format": fmt, "rate": rate,
        "channels": channels, "block_s": block_s, "target_rate": target_rate,
        "x_real_time": {name: round(seconds / wall, 1) for name, (wall, _) in rows.items()},
        "output_samples": rows["decode+resample"][1], "peak_rss_mb": round(rss_after, 1),
        "decoded_mb": round(decoded_mb, 1), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "numpy": np.__version__, "soundfile": sf.__version__,
        "libsndfile": sf.__libsndfile_version__, "soxr": _soxr_version(),
    }
    json_line(result)
    return result


def _soxr_version() -> str:
    import soxr

    return str(soxr.__version__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=48000)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--fmt", choices=sorted(_FORMATS), default="flac")
    parser.add_argument("--block-s", type=float, default=10.0)
    parser.add_argument("--target-rate", type=int, default=16000)
    parser.add_argument("--window-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    run(args.minutes, args.rate, args.channels, args.fmt, args.block_s, args.target_rate,
        args.window_s)


if __name__ == "__main__":
    main()
