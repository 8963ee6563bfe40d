"""Bundles (DESIGN.md contract 6) written from an export folder, and the export report.

An export folder holds the ONNX models and ``export.json``, the report every export stage
updates (`update_report`): the student config and export spec, each model with its precision,
front-end variant and backends, the parity with torch, the front-end timing and the agreement
of FP16 / INT8 with FP32. `write_bundle` turns it into a bundle folder and a .tar.gz with
`runtime.bundle`'s schema: the models, ``labels.json``, the report, ``bundle.json`` with tasks,
labels, activations, thresholds, the sha256 of every file, tool versions, the teacher id and
the measured top-1 agreement with the teacher (`teacher_agreement`, from a teacher-target store)
and each model's CPU latency. Both are keyed by the model file's stem (`model_key`), since two
models may share a precision (the TensorRT QDQ INT8 model and the CPU INT8 variant):
``"<stem>.<task>"`` (`agreement_key`) and ``"<stem>.cpu.b<batch>.t<threads>"``
(`latency_key`).

    >>> agreement_key("model.int8cpu.onnx", "species"), latency_key("model.onnx")
    ('model.int8cpu.species', 'model.cpu.b1.t1')

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = update_report(folder, models=[model_entry("model.onnx", "fp32", "conv")])
    >>> read_report(folder)["models"][0]["backends"]
    ['cpu', 'cuda', 'tensorrt']
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle import BACKENDS, BundleManifest, ModelSpec, TaskSpec
from runtime.errors import InputError, ManifestError
from runtime.files import atomic_write_text

REPORT = "export.json"
LABELS = "labels.json"
# Manifest order is the runtime's preference: the CPU-only STFT form first where it was
# exported (it was faster there), then FP32, FP16 and INT8 of the Conv1d form.
_ORDER = {("stft", "fp32"): 0, ("conv", "fp32"): 1, ("conv", "fp16"): 2, ("conv", "int8"): 3}


def model_entry(file: str, precision: str, variant: str,
                backends: Sequence[str] | None = None) -> dict[str, Any]:
    """A model line of the report; the STFT form suits the CPU only (TensorRT has no STFT)."""
    if backends is None:
        backends = ("cpu",) if variant == "stft" else BACKENDS
    return {"file": file, "precision": precision, "variant": variant,
            "backends": list(backends)}


def model_key(file: str) -> str:
    """The key a model's figures go under in a bundle: its file name without ``.onnx``."""
    name = Path(file).name
    return name[: -len(".onnx")] if name.endswith(".onnx") else name


def agreement_key(file: str, task: str) -> str:
    """``"<stem>.<task>"``: where a model's top-1 agreement with the teacher on a task goes."""
    return f"{model_key(file)}.{task}"


def latency_key(file: str, backend: str = "cpu", batch: int = 1, threads: int = 1) -> str:
    """``"<stem>.<backend>.b<batch>.t<threads>"``: where a model's median latency goes."""
    return f"{model_key(file)}.{backend}.b{batch}.t{threads}"


def read_report(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``export.json`` of an export folder ({} when there is none yet)."""
    path = Path(folder) / REPORT
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(path, f"unreadable export report: {exc}") from exc


def update_report(folder: str | os.PathLike[str], models: Sequence[Mapping[str, Any]] = (),
                  drop: Sequence[str] = (), **fields: Any) -> Path:
    """Merge ``fields`` into ``export.json``, remove the models whose file is in ``drop`` (a
    rerun that no longer writes them) and add or replace ``models`` (by file name)."""
    both = sorted(set(drop) & {m["file"] for m in models})
    if both:
        raise ValueError(f"models both added and dropped: {both}")
    report = read_report(folder)
    report.update(fields)
    known = {m["file"]: m for m in report.get("models", []) if m["file"] not in drop}
    known.update({m["file"]: dict(m) for m in models})
    report["models"] = sorted(known.values(),
                              key=lambda m: (_ORDER.get((m["variant"], m["precision"]), 9),
                                             m["file"]))
    path = Path(folder) / REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")  # keeps the task order
    return path


def teacher_agreement(model_path: str | os.PathLike[str], manifest: str | os.PathLike[str],
                      targets: str | os.PathLike[str], spec: Any,
                      label_sets: Mapping[str, Sequence[str]],
                      splits: Sequence[str] = ("test",)) -> tuple[dict[str, float], str, int]:
    """Top-1 agreement of an ONNX model with the teacher per task on ``manifest`` clips.

    Clips are the manifest's records of ``splits`` whose ``(id, task)`` the target store holds;
    the student's label is matched to the teacher's by name. Returns ``(agreement per task,
    teacher hash, clips without a target)``; a store whose label sets differ raises.
    """
    from corpus.manifest import read_manifest as read_records
    from distill.targets import TargetStore
    from export.onnx_export import fit_window, run_onnx
    from runtime.audio import read_audio

    store = TargetStore(targets)
    store.check(label_sets={t: label_sets[t] for t in label_sets if t in store.meta.tasks})
    hits: dict[str, list[bool]] = {}
    missing = 0
    clips, keys = [], []
    for record in read_records(manifest):
        if record.split not in splits or record.task not in label_sets:
            continue
        target = store.get(record.id, record.task)
        if target is None or record.file_name is None:
            missing += 1
            continue
        audio = read_audio(record.file_name, target_rate=spec.sample_rate,
                           offset_s=record.offset_s, duration_s=record.duration_s)
        clips.append(fit_window(audio, spec.samples, max_windows=1)[0])
        keys.append((record.task, store.labels(record.task)[target.top1]))
    if not clips:
        raise ManifestError(manifest, f"no clip of splits {list(splits)} has a teacher target "
                                      f"in {targets}")
    outputs = run_onnx(model_path, np.stack(clips))
    for row, (task, teacher_label) in enumerate(keys):
        student_label = label_sets[task][int(outputs[f"{task}_logits"][row].argmax())]
        hits.setdefault(task, []).append(student_label == teacher_label)
    return ({t: float(np.mean(v)) for t, v in hits.items()}, store.teacher_hash, missing)


def bundle_manifest(report: Mapping[str, Any], name: str, version: str,
                    thresholds: Mapping[str, float] | None = None, hop_s: float | None = None,
                    teacher_id: str = "", agreement: Mapping[str, float] | None = None,
                    latency_ms: Mapping[str, float] | None = None) -> BundleManifest:
    """The `BundleManifest` for an export report (hashes are added when it is written)."""
    from export.onnx_export import tool_versions

    student, spec = report["student"], report["spec"]
    thresholds = dict(thresholds or {})
    unknown = sorted(set(thresholds) - set(student["tasks"]))
    if unknown:
        raise ValueError(f"thresholds for unknown tasks {unknown}; tasks: {list(student['tasks'])}")
    tasks = tuple(TaskSpec(task, tuple(head["labels"]),
                           "sigmoid" if head["multi_label"] else "softmax",
                           float(thresholds.get(task, 0.5)))
                  for task, head in student["tasks"].items())
    models = tuple(ModelSpec(m["file"], m["precision"], m["variant"], tuple(m["backends"]))
                   for m in report["models"])
    window_s = spec["samples"] / spec["sample_rate"]
    return BundleManifest(
        name=name, version=version, sample_rate=int(spec["sample_rate"]), window_s=window_s,
        hop_s=float(hop_s or window_s), tasks=tasks, models=models, tools=tool_versions(),
        teacher_id=teacher_id, agreement=dict(agreement or {}), latency_ms=dict(latency_ms or {}))


def write_bundle(export_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                 name: str | None = None, version: str = "1",
                 thresholds: Mapping[str, float] | None = None, hop_s: float | None = None,
                 teacher_id: str = "", agreement: Mapping[str, float] | None = None,
                 latency_ms: Mapping[str, float] | None = None,
                 extra_files: Sequence[str | os.PathLike[str]] = ()) -> tuple[Path, Path]:
    """Write the bundle folder ``out`` and ``out.tar.gz`` from an export folder.

    The folder is assembled beside ``out`` and renamed into place, so a failure leaves nothing
    half-written; an existing ``out`` raises. Returns ``(folder, tar path)``.
    """
    from runtime.bundle import bundle_tar, verify_bundle, write_bundle_manifest

    source, target = Path(export_dir), Path(out)
    report = read_report(source)
    if not report.get("models") or "student" not in report:
        raise InputError(source, f"not an export folder: no models in {REPORT} (run "
                                 f"`naturelm-edge export onnx` first)")
    if target.exists():
        raise InputError(target, "bundle folder already exists; remove it or choose another")
    manifest = bundle_manifest(report, name or target.name, version, thresholds, hop_s,
                               teacher_id, agreement, latency_ms)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for file in [*(m.file for m in manifest.models), REPORT]:
            shutil.copyfile(source / file, staging / file)
        for extra in extra_files:
            shutil.copyfile(extra, staging / Path(extra).name)
        labels = {t.name: list(t.labels) for t in manifest.tasks}
        atomic_write_text(staging / LABELS, json.dumps(labels, indent=2) + "\n")
        write_bundle_manifest(staging, manifest)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    problems = verify_bundle(target)
    if problems:
        raise ManifestError(target, "; ".join(problems))
    return target, bundle_tar(target)
