"""The tone bundle: a small but real ONNX model and a bundle around it, built with `onnx.helper`.

Benchmarks use it when no bundle is given (`benchmarks.watch_soak`), and the runtime, export
and benchmark tests use it as their model (`tests.runtime.model_fixtures` re-exports it). No
torch: it needs only numpy, onnx and `runtime.bundle`.

The model follows DESIGN.md contract 5: input `audio` float32 [batch, samples] at 16 kHz,
one `<task>_logits` output per task and an `embedding`. It cuts the window into 10 ms frames,
measures the power of four tones (1, 2, 3 and 4 kHz, exact DFT bins of a 160-sample frame)
with MatMuls against fixed cosine / sine bases, averages over frames and takes the log: a
tone at 2 kHz fires label "B". `detection` is sigmoid (log power minus an offset, so silence
and faint noise stay below 0.5); `species` is softmax over the same four bands.

    >>> from pathlib import Path; import tempfile
    >>> bundle = make_bundle(Path(tempfile.mkdtemp()) / "tones")
    >>> sorted(p.name for p in bundle.iterdir())
    ['bundle.json', 'model.onnx']
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RATE = 16000
FRAME = 160
BAND_HZ = (1000.0, 2000.0, 3000.0, 4000.0)
LABELS = ("A", "B", "C", "D")
OFFSET = 4.0  # log power below which `detection` scores under 0.5


def _bases() -> tuple[np.ndarray, np.ndarray]:
    n = np.arange(FRAME)[:, None]
    freqs = np.array(BAND_HZ)[None, :]
    angle = 2 * np.pi * freqs * n / RATE
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def tone_model(window_s: float = 1.0, opset: int = 17,
               metadata: dict[str, str] | None = None) -> bytes:
    """Serialized ONNX bytes of the tone model for windows of `window_s` seconds."""
    from onnx import TensorProto, checker, helper, numpy_helper

    samples = round(window_s * RATE)
    if samples % FRAME:
        raise ValueError(f"window of {samples} samples is not a whole number of {FRAME}-frames")
    cos, sin = _bases()
    weights = np.eye(len(LABELS), dtype=np.float32)
    inits = [
        numpy_helper.from_array(np.array([-1, samples // FRAME, FRAME], np.int64), "frame_shape"),
        numpy_helper.from_array(cos, "cos_basis"),
        numpy_helper.from_array(sin, "sin_basis"),
        numpy_helper.from_array(np.array([1e-6], np.float32), "eps"),
        numpy_helper.from_array(np.array([OFFSET], np.float32), "offset"),
        numpy_helper.from_array(weights, "head"),
    ]
    nodes = [
        helper.make_node("Reshape", ["audio", "frame_shape"], ["frames"]),
        helper.make_node("MatMul", ["frames", "cos_basis"], ["re"]),
        helper.make_node("MatMul", ["frames", "sin_basis"], ["im"]),
        helper.make_node("Mul", ["re", "re"], ["re2"]),
        helper.make_node("Mul", ["im", "im"], ["im2"]),
        helper.make_node("Add", ["re2", "im2"], ["power"]),
        helper.make_node("ReduceMean", ["power"], ["mean_power"], axes=[1], keepdims=0),
        helper.make_node("Add", ["mean_power", "eps"], ["power_eps"]),
        helper.make_node("Log", ["power_eps"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "head"], ["species_logits"]),
        helper.make_node("Sub", ["species_logits", "offset"], ["detection_logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tone_model",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", samples])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", len(LABELS)])
         for name in ("species_logits", "detection_logits", "embedding")],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="naturelm-edge-fixtures")
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    checker.check_model(model)
    return model.SerializeToString()


def make_bundle(folder: Path, window_s: float = 1.0, hop_s: float | None = None,
                with_stft_variant: bool = False) -> Path:
    """Write the tone model and a complete `bundle.json` into `folder`; returns `folder`."""
    from runtime.bundle import BundleManifest, ModelSpec, TaskSpec, write_bundle_manifest

    folder.mkdir(parents=True, exist_ok=True)
    models = [ModelSpec("model.onnx", "fp32", "conv", ("cpu", "cuda", "tensorrt"))]
    if with_stft_variant:
        models.insert(0, ModelSpec("model.stft.onnx", "fp32", "stft", ("cpu",)))
    manifest = BundleManifest(
        name="tones", version="0.1.0", sample_rate=RATE, window_s=window_s,
        hop_s=hop_s if hop_s is not None else window_s,
        tasks=(TaskSpec("species", LABELS, "softmax", 0.5),
               TaskSpec("detection", LABELS, "sigmoid", 0.5)),
        models=tuple(models), tools={"onnx": "test"}, teacher_id="tone-teacher",
        agreement={"species_top1": 1.0}, latency_ms={"cpu_batch1": 0.1})
    meta = {"naturelm_edge_manifest": json.dumps({"name": manifest.name})}
    for spec in models:
        (folder / spec.file).write_bytes(tone_model(window_s, metadata=meta))
    write_bundle_manifest(folder, manifest)
    return folder


def tone(freq_hz: float, seconds: float, rate: int = RATE, amplitude: float = 0.5) -> np.ndarray:
    """A float32 sine tone."""
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)
