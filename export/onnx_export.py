"""ONNX export of a student with its front end inside, checked and compared with torch.

`export_student` runs ``torch.onnx.export(dynamo=True)`` (the torch.export + onnxscript path;
the students export cleanly with it, and its per-node ``name_scopes`` metadata names the front
end), with the spec's dynamic batch and fixed window, then:

1. stores the manifest (student config, export spec, front-end variant, tool versions) as JSON in
   ``metadata_props`` under `METADATA_KEY`;
2. runs the ONNX checker (full check) and strict shape inference;
3. walks every graph, subgraph and function and refuses any STFT, DFT or window-function op
   (`banned_ops`), which TensorRT 10 cannot parse;
4. compares ONNX Runtime with torch on real audio (the recording, resampled with
   `runtime.audio`) and on synthetic audio (`parity`), prints the largest absolute difference
   of every output and raises `ExportError` above the spec's tolerance.

    >>> import tempfile, pathlib, torch
    >>> from distill.students import build_student, student_config, task_heads
    >>> from export.spec import spec_for
    >>> cfg = student_config("s", tasks=task_heads({"species": ("Kea", "Tui")}), n_blocks=2)
    >>> student = build_student(cfg).eval()
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "model.onnx"
    >>> report = export_onnx(student, out, spec_for(cfg, window_s=1.0))  # doctest: +SKIP
    parity synthetic: species_logits max |diff| 2.4e-07 ...
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.spec import BANNED_OPS, ExportSpec

if TYPE_CHECKING:
    import onnx
    from torch import nn

METADATA_KEY = "naturelm_edge"


class ExportError(RuntimeError):
    """An export failed a check: banned op, checker, shape inference or parity."""


@dataclass(frozen=True)
class ParityReport:
    """Largest and mean absolute differences per input set and output, against a tolerance."""

    atol: float
    max_abs: dict[str, dict[str, float]] = field(default_factory=dict)
    mean_abs: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        """The largest absolute difference over every input set and output."""
        return max((v for per in self.max_abs.values() for v in per.values()), default=0.0)

    @property
    def ok(self) -> bool:
        return self.worst <= self.atol

    def lines(self) -> list[str]:
        """One printable line per input set and output."""
        return [f"parity {where}: {name} max |diff| {value:.3g} mean "
                f"{self.mean_abs[where][name]:.3g} (tolerance {self.atol:g})"
                for where, per in self.max_abs.items() for name, value in per.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"atol": self.atol, "worst": self.worst, "max_abs": self.max_abs,
                "mean_abs": self.mean_abs}


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shape an export (only those importable here)."""
    import importlib.metadata as md

    out = {}
    for name in ("naturelm-edge", "torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def export_manifest(config: Any, spec: ExportSpec, variant: str = "conv",
                    precision: str = "fp32") -> dict[str, Any]:
    """The JSON stored in ``metadata_props``: enough to know what the graph computes."""
    return {"student": config.to_dict(), "spec": spec.to_dict(), "variant": variant,
            "precision": precision, "tools": tool_versions()}


def read_manifest(model: onnx.ModelProto | str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest an export stored in ``metadata_props``; raises naming the file if absent."""
    import onnx

    where = str(model) if not isinstance(model, onnx.ModelProto) else "model"
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model),
                                                                        load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ExportError(f"{where}: no {METADATA_KEY!r} manifest in metadata_props; "
                      f"it was not written by `naturelm-edge export onnx`")


def set_manifest(model: onnx.ModelProto, manifest: Mapping[str, Any]) -> None:
    """Store (or replace) the manifest in ``model.metadata_props``."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, json.dumps(dict(manifest), sort_keys=True))]:
        model.metadata_props.add(key=key, value=value)


def _graphs(model: onnx.ModelProto) -> Iterator[tuple[str, Any]]:
    """Every node list in the model: the main graph, subgraphs in attributes, local functions."""
    from onnx import AttributeProto

    def walk(where: str, nodes: Any) -> Iterator[tuple[str, Any]]:
        yield where, nodes
        for node in nodes:
            for attr in node.attribute:
                if attr.type == AttributeProto.GRAPH:
                    yield from walk(f"{where}/{node.name}.{attr.name}", attr.g.node)
                elif attr.type == AttributeProto.GRAPHS:
                    for i, sub in enumerate(attr.graphs):
                        yield from walk(f"{where}/{node.name}.{attr.name}[{i}]", sub.node)

    yield from walk("graph", model.graph.node)
    for function in model.functions:
        yield from walk(f"function {function.domain}.{function.name}", function.node)


def banned_ops(model: onnx.ModelProto, banned: frozenset[str] = BANNED_OPS) -> list[str]:
    """``"<where>: <op> (<node>)"`` for every node whose op TensorRT 10 lacks."""
    return [f"{where}: {node.op_type} ({node.name or 'unnamed'})"
            for where, nodes in _graphs(model) for node in nodes if node.op_type in banned]


def check_graph(model: onnx.ModelProto, where: str, allow_stft: bool = False) -> None:
    """Unless ``allow_stft``, the op walk; then the ONNX checker (full) and strict shape
    inference."""
    import onnx

    if not allow_stft:
        found = banned_ops(model)
        if found:
            raise ExportError(f"{where}: ops TensorRT 10 cannot run: {'; '.join(found)}; the "
                              f"front end must use Conv1d + MatMul only")
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{where}: the ONNX checker or shape inference failed: {exc}") from exc


def torch_to_onnx(module: nn.Module, spec: ExportSpec) -> onnx.ModelProto:
    """``module`` (audio -> dict of tensors) as an ONNX model with the spec's names and batch."""
    import torch

    example = torch.from_numpy(spec.dummy_input(2))
    batch = torch.export.Dim("batch", min=1, max=max(spec.max_batch, 4096))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), (example,), None, dynamo=True, input_names=[spec.input_name],
            output_names=list(spec.output_names), dynamic_shapes={spec.input_name: {0: batch}},
            opset_version=spec.opset, optimize=True, verbose=False)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    model = program.model_proto
    got = [o.name for o in model.graph.output]
    if got != list(spec.output_names):
        raise ExportError(f"exported outputs {got} differ from the spec's {spec.output_names}")
    return model


def export_student(student: nn.Module, out: str | os.PathLike[str], spec: ExportSpec,
                   variant: str = "conv", allow_stft: bool = False) -> Path:
    """Export ``student`` to ``out`` with its manifest, checked (see the module docstring)."""
    import onnx

    path = Path(out)
    model = torch_to_onnx(student, spec)
    set_manifest(model, export_manifest(student.config, spec, variant=variant))
    check_graph(model, str(path), allow_stft=allow_stft)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path


def synthetic_audio(spec: ExportSpec, seed: int = 0) -> np.ndarray:
    """Four windows: white noise, a rising chirp with noise, silence and a loud clipped tone."""
    rng = np.random.default_rng(seed)
    t = np.arange(spec.samples) / spec.sample_rate
    nyquist = spec.sample_rate / 2
    sweep = np.sin(2 * np.pi * (200 * t + 0.5 * (0.8 * nyquist - 200) / t[-1] * t**2))
    tone = np.clip(1.5 * np.sin(2 * np.pi * 1500 * t), -1, 1)
    clips = [0.1 * rng.standard_normal(spec.samples), 0.5 * sweep + 0.01 * rng.standard_normal(
        spec.samples), np.zeros(spec.samples), tone]
    return np.stack(clips).astype(np.float32)


def fit_window(audio: np.ndarray, samples: int, max_windows: int = 4) -> np.ndarray:
    """Cut mono ``audio`` into up to ``max_windows`` windows of ``samples`` (the last padded)."""
    count = max(1, min(max_windows, -(-len(audio) // samples)))
    padded = np.zeros(count * samples, np.float32)
    piece = audio[: count * samples]
    padded[: len(piece)] = piece
    return padded.reshape(count, samples)


def recording_windows(path: str | os.PathLike[str], spec: ExportSpec,
                      max_windows: int = 4) -> np.ndarray:
    """A real recording read and resampled to the spec's rate, as windows (see `fit_window`)."""
    from runtime.audio import read_audio

    return fit_window(read_audio(path, target_rate=spec.sample_rate), spec.samples, max_windows)


def run_torch(student: nn.Module, audio: np.ndarray) -> dict[str, np.ndarray]:
    """The student's outputs on ``audio`` as float32 numpy arrays (eval mode, no grad)."""
    import torch

    student.eval()
    with torch.no_grad():
        out = student(torch.from_numpy(np.ascontiguousarray(audio, np.float32)))
    return {name: value.numpy() for name, value in out.items()}


def run_onnx(path: str | os.PathLike[str], audio: np.ndarray, threads: int = 1,
             ) -> dict[str, np.ndarray]:
    """An ONNX model on ONNX Runtime's CPU provider (through `runtime.runners.OrtRunner`)."""
    from runtime.runners import OrtRunner

    with OrtRunner(path, backend="cpu", threads=threads) as runner:
        return runner.infer({"audio": audio})


def parity(student: nn.Module, path: str | os.PathLike[str], inputs: Mapping[str, np.ndarray],
           atol: float) -> ParityReport:
    """Max and mean |ONNX Runtime - torch| per input set and output (no raising)."""
    report = ParityReport(atol=atol)
    for where, audio in inputs.items():
        want, got = run_torch(student, audio), run_onnx(path, audio)
        missing = sorted(set(want) - set(got))
        if missing:
            raise ExportError(f"{path}: outputs {missing} are missing from the ONNX model")
        diffs = {name: np.abs(got[name].astype(np.float64) - want[name]) for name in want}
        report.max_abs[where] = {n: float(d.max()) for n, d in diffs.items()}
        report.mean_abs[where] = {n: float(d.mean()) for n, d in diffs.items()}
    return report


def parity_inputs(spec: ExportSpec, recording: str | os.PathLike[str] | None,
                  ) -> dict[str, np.ndarray]:
    """``{"synthetic": ..., "real": ...}`` (``real`` only when a recording is given)."""
    inputs = {"synthetic": synthetic_audio(spec)}
    if recording is not None:
        inputs["real"] = recording_windows(recording, spec)
    return inputs


def validate(student: nn.Module, path: str | os.PathLike[str], spec: ExportSpec,
             recording: str | os.PathLike[str] | None = None, quiet: bool = False,
             ) -> ParityReport:
    """`parity` on synthetic and real audio; prints every line; raises above ``spec.atol``."""
    report = parity(student, path, parity_inputs(spec, recording), spec.atol)
    if not quiet:
        for line in report.lines():
            print(line)
    if not report.ok:
        raise ExportError(f"{path}: ONNX Runtime differs from torch by {report.worst:.3g}, above "
                          f"the {spec.family} spec's tolerance {spec.atol:g}")
    return report


def export_onnx(student: nn.Module, out: str | os.PathLike[str], spec: ExportSpec,
                recording: str | os.PathLike[str] | None = None, quiet: bool = False,
                ) -> ParityReport:
    """Export, check and validate in one go; a model that fails parity is deleted."""
    path = export_student(student, out, spec)
    try:
        return validate(student, path, spec, recording, quiet=quiet)
    except ExportError:
        path.unlink(missing_ok=True)
        raise
