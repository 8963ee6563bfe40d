"""The bundle a field unit is flashed with: a folder (or a .tar.gz of it) with `bundle.json`.

`bundle.json` (DESIGN.md contract 6) names the bundle, the sample rate and windowing, the
tasks with their labels, activation and default threshold, the model files with their
precision, front-end variant and the backends each suits, the sha256 of every file, the
tool versions, the teacher id and the measured agreement and latency. Reading a bundle
parses JSON and checks hashes; nothing is ever unpickled. A .tar.gz is extracted only after
every entry was checked (no absolute paths, no ``..``, no links, no devices).

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "demo"
    >>> folder.mkdir()
    >>> _ = (folder / "model.onnx").write_bytes(b"not really a model")
    >>> manifest = BundleManifest(
    ...     name="demo", version="1", sample_rate=16000, window_s=1.0, hop_s=1.0,
    ...     tasks=(TaskSpec("species", ("Kea", "Tui"), "softmax", 0.5),),
    ...     models=(ModelSpec("model.onnx", "fp32", "conv", ("cpu", "cuda", "tensorrt")),))
    >>> _ = write_bundle_manifest(folder, manifest)
    >>> verify_bundle(folder)
    []
    >>> unpacked = load_bundle(bundle_tar(folder), extract_to=folder.with_name("unpacked"))
    >>> unpacked.manifest.tasks[0].labels
    ('Kea', 'Tui')
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from runtime.errors import ManifestError
from runtime.files import atomic_write_bytes, atomic_write_text

SCHEMA_VERSION = 1
MANIFEST = "bundle.json"
ENGINE_DIR = "engines"  # TensorRT engines are built on the device, so they are not hashed
ACTIVATIONS = ("softmax", "sigmoid")
PRECISIONS = ("fp32", "fp16", "int8")
VARIANTS = ("conv", "stft")
BACKENDS = ("cpu", "cuda", "tensorrt")


@dataclass(frozen=True)
class TaskSpec:
    """One output head: `<name>_logits` over `labels`, turned into scores by `activation`."""

    name: str
    labels: tuple[str, ...]
    activation: str = "softmax"
    threshold: float = 0.5

    @property
    def output(self) -> str:
        """The ONNX output that carries this task's logits."""
        return f"{self.name}_logits"


@dataclass(frozen=True)
class ModelSpec:
    """One model file: precision, front-end variant (Conv1d DFT or STFT op), backends it suits."""

    file: str
    precision: str = "fp32"
    variant: str = "conv"
    backends: tuple[str, ...] = BACKENDS


@dataclass(frozen=True)
class BundleManifest:
    """The parsed `bundle.json`."""

    name: str
    version: str
    sample_rate: int
    window_s: float
    hop_s: float
    tasks: tuple[TaskSpec, ...]
    models: tuple[ModelSpec, ...]
    files: Mapping[str, str] = field(default_factory=dict)
    tools: Mapping[str, str] = field(default_factory=dict)
    teacher_id: str = ""
    agreement: Mapping[str, float] = field(default_factory=dict)
    latency_ms: Mapping[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def task(self, name: str) -> TaskSpec:
        """The task called `name`; unknown names raise listing the bundle's tasks."""
        for spec in self.tasks:
            if spec.name == name:
                return spec
        raise KeyError(f"bundle {self.name!r} has no task {name!r}; it has "
                       f"{', '.join(t.name for t in self.tasks)}")


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its manifest and the folder its files live in."""

    root: Path
    manifest: BundleManifest

    @property
    def engine_dir(self) -> Path:
        """Where TensorRT engines built on this device are kept."""
        return self.root / ENGINE_DIR

    def model_path(self, spec: ModelSpec) -> Path:
        return self.root / spec.file

    def model_for(self, backend: str, precision: str | None = None,
                  variant: str | None = None) -> ModelSpec:
        """The first model (in manifest order, the exporter's preference) suiting `backend`,
        optionally of one `precision` and front-end `variant`; raises listing what exists."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        for spec in self.manifest.models:
            if (backend in spec.backends and precision in (None, spec.precision)
                    and variant in (None, spec.variant)):
                return spec
        have = ", ".join(f"{m.file} ({m.precision}, {m.variant}, {'/'.join(m.backends)})"
                         for m in self.manifest.models)
        raise ManifestError(self.root / MANIFEST,
                            f"no model for backend {backend!r}"
                            f"{f' at precision {precision!r}' if precision else ''}"
                            f"{f' with variant {variant!r}' if variant else ''}; it has {have}")


# ----------------------------------------------------------------------------- (de)serialising


def manifest_to_dict(manifest: BundleManifest) -> dict[str, Any]:
    """The JSON-ready form of a manifest (what `bundle.json` holds)."""
    data = dataclasses.asdict(manifest)
    data["files"] = dict(sorted(manifest.files.items()))
    return {"schema_version": data.pop("schema_version"), **data}


def manifest_from_dict(data: Any, where: str | os.PathLike[str] = MANIFEST) -> BundleManifest:
    """Parse and check a manifest; every problem raises `ManifestError` naming `where`."""
    if not isinstance(data, dict):
        raise ManifestError(where, "bundle manifest must be a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(where, f"unknown bundle schema version {version!r}; this runtime "
                                   f"reads version {SCHEMA_VERSION} (upgrade naturelm-edge or "
                                   f"re-export the bundle)")
    try:
        manifest = BundleManifest(
            name=_str(data, "name"), version=_str(data, "version"),
            sample_rate=int(data["sample_rate"]), window_s=float(data["window_s"]),
            hop_s=float(data["hop_s"]),
            tasks=tuple(_task(t) for t in data["tasks"]),
            models=tuple(_model(m) for m in data["models"]),
            files={str(k): str(v) for k, v in dict(data.get("files", {})).items()},
            tools={str(k): str(v) for k, v in dict(data.get("tools", {})).items()},
            teacher_id=str(data.get("teacher_id", "")),
            agreement={str(k): float(v) for k, v in dict(data.get("agreement", {})).items()},
            latency_ms={str(k): float(v) for k, v in dict(data.get("latency_ms", {})).items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(where, f"malformed bundle manifest: {_describe(exc)}") from exc
    _check(manifest, where)
    return manifest


def _describe(exc: Exception) -> str:
    return f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def _task(data: Mapping[str, Any]) -> TaskSpec:
    labels = data["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"task {data.get('name')!r}: labels must be a list of strings")
    return TaskSpec(_str(data, "name"), tuple(labels), str(data.get("activation", "softmax")),
                    float(data.get("threshold", 0.5)))


def _model(data: Mapping[str, Any]) -> ModelSpec:
    return ModelSpec(_str(data, "file"), str(data.get("precision", "fp32")),
                     str(data.get("variant", "conv")),
                     tuple(str(b) for b in data.get("backends", BACKENDS)))


def _check(manifest: BundleManifest, where: str | os.PathLike[str]) -> None:
    problems: list[str] = []
    if manifest.sample_rate <= 0 or manifest.window_s <= 0 or manifest.hop_s <= 0:
        problems.append("sample_rate, window_s and hop_s must be positive")
    if not manifest.tasks:
        problems.append("no tasks")
    if not manifest.models:
        problems.append("no models")
    names = [t.name for t in manifest.tasks]
    if len(set(names)) != len(names):
        problems.append(f"duplicate task names in {names}")
    for task in manifest.tasks:
        if task.activation not in ACTIVATIONS:
            problems.append(f"task {task.name!r}: activation {task.activation!r} is not one of "
                            f"{', '.join(ACTIVATIONS)}")
        if not task.labels or len(set(task.labels)) != len(task.labels):
            problems.append(f"task {task.name!r}: labels must be non-empty and unique")
        if not 0.0 <= task.threshold <= 1.0:
            problems.append(f"task {task.name!r}: threshold {task.threshold} is not in [0, 1]")
    for model in manifest.models:
        problems.extend(_model_problems(model))
    if problems:
        raise ManifestError(where, "; ".join(problems))


def _model_problems(model: ModelSpec) -> list[str]:
    problems = []
    if model.precision not in PRECISIONS:
        problems.append(f"model {model.file!r}: precision {model.precision!r} is not one of "
                        f"{', '.join(PRECISIONS)}")
    if model.variant not in VARIANTS:
        problems.append(f"model {model.file!r}: variant {model.variant!r} is not one of "
                        f"{', '.join(VARIANTS)}")
    unknown = [b for b in model.backends if b not in BACKENDS]
    if unknown or not model.backends:
        problems.append(f"model {model.file!r}: backends {list(model.backends)} must be a "
                        f"non-empty subset of {', '.join(BACKENDS)}")
    if _unsafe_name(model.file):
        problems.append(f"model {model.file!r}: file must be a relative path inside the bundle")
    return problems


# ----------------------------------------------------------------------------- writing


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def bundle_files(folder: str | os.PathLike[str]) -> list[str]:
    """The bundle's files as sorted POSIX paths relative to `folder`: everything except
    `bundle.json` itself and the device-built `engines/` folder."""
    root = Path(folder)
    out = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() or rel == MANIFEST or rel.split("/")[0] == ENGINE_DIR:
            continue
        out.append(rel)
    return sorted(out)


def write_bundle_manifest(folder: str | os.PathLike[str], manifest: BundleManifest) -> Path:
    """Hash every file in `folder`, store the hashes in the manifest and write `bundle.json`
    atomically. Checks the manifest first and that every model file is present."""
    root = Path(folder)
    _check(manifest, root / MANIFEST)
    missing = [m.file for m in manifest.models if not (root / m.file).is_file()]
    if missing:
        raise ManifestError(root, f"model file(s) missing from the bundle: {', '.join(missing)}")
    files = {rel: sha256_file(root / rel) for rel in bundle_files(root)}
    final = dataclasses.replace(manifest, files=files)
    path = root / MANIFEST
    atomic_write_text(path, json.dumps(manifest_to_dict(final), indent=2, ensure_ascii=False)
                      + "\n")
    return path


def bundle_tar(folder: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Pack a bundle folder into `<folder>.tar.gz` (or `out`), atomically and reproducibly:
    sorted entries under the folder's name, zeroed owners and times, no engines."""
    root = Path(folder)
    if not (root / MANIFEST).is_file():
        raise ManifestError(root, f"not a bundle folder: no {MANIFEST}")
    target = Path(out) if out is not None else root.with_name(root.name + ".tar.gz")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for rel in [MANIFEST, *bundle_files(root)]:
            data = (root / rel).read_bytes()
            info = tarfile.TarInfo(f"{root.name}/{rel}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    atomic_write_bytes(target, buffer.getvalue())
    return target


# ----------------------------------------------------------------------------- reading


def load_bundle(path: str | os.PathLike[str], extract_to: str | os.PathLike[str] | None = None,
                check_hashes: bool = True) -> Bundle:
    """Load a bundle folder or .tar.gz (extracted safely into `extract_to`, which the caller
    owns and removes: a field unit that restarts for months must not fill /tmp with copies).
    With `check_hashes` every listed file must exist and match its sha256.

    Raises:
        ManifestError: no bundle.json, malformed or unknown schema, unsafe tar entry,
            missing model file, (with `check_hashes`) a missing or tampered file, or an
            archive with no `extract_to`.
    """
    root = _bundle_root(Path(path), extract_to)
    manifest = _read_manifest(root)
    problems = _file_problems(root, manifest) if check_hashes else _missing_models(root, manifest)
    if problems:
        raise ManifestError(path, "; ".join(problems))
    return Bundle(root=root, manifest=manifest)


def verify_bundle(path: str | os.PathLike[str]) -> list[str]:
    """Every problem with a bundle folder or .tar.gz, as messages (empty when it is sound):
    unsafe tar entries, unreadable or unknown-schema manifest, missing, unlisted or tampered
    files."""
    source = Path(path)
    if source.is_file():
        problems = tar_problems(source)
        if problems:
            return problems
        with tempfile.TemporaryDirectory(prefix="naturelm-verify-") as tmp:
            return verify_bundle(_bundle_root(source, tmp))
    try:
        root = _bundle_root(source, None)
        manifest = _read_manifest(root)
    except ManifestError as exc:
        return [str(exc)]
    return _file_problems(root, manifest) + [
        f"{rel}: file is in the bundle but not listed in {MANIFEST}"
        for rel in bundle_files(root) if rel not in manifest.files]


def _bundle_root(path: Path, extract_to: str | os.PathLike[str] | None) -> Path:
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return path
        raise ManifestError(path, f"not a bundle: no {MANIFEST} in the folder")
    if not path.is_file():
        raise ManifestError(path, "bundle not found")
    if extract_to is None:
        raise ManifestError(path, f"an archive, and this command needs a bundle folder: unpack "
                                  f"it first (tar xzf {path.name})")
    target = Path(extract_to)
    safe_extract(path, target)
    if (target / MANIFEST).is_file():
        return target
    tops = [p for p in target.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    if len(tops) != 1:
        raise ManifestError(path, f"archive holds no {MANIFEST} at its top or in one folder")
    return tops[0]


def _read_manifest(root: Path) -> BundleManifest:
    where = root / MANIFEST
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(where, f"cannot read bundle manifest: {exc}") from exc
    return manifest_from_dict(data, where)


def _missing_models(root: Path, manifest: BundleManifest) -> list[str]:
    return [f"{m.file}: model file is missing" for m in manifest.models
            if not (root / m.file).is_file()]


def _file_problems(root: Path, manifest: BundleManifest) -> list[str]:
    problems = [p for p in _missing_models(root, manifest)
                if p.split(":")[0] not in manifest.files]
    problems += [f"{m.file}: model file has no sha256 in {MANIFEST}" for m in manifest.models
                 if m.file not in manifest.files]
    for rel, expected in sorted(manifest.files.items()):
        if _unsafe_name(rel):
            problems.append(f"{rel}: listed path escapes the bundle folder")
            continue
        file = root / rel
        if not file.is_file():
            problems.append(f"{rel}: file is missing")
        elif (actual := sha256_file(file)) != expected:
            problems.append(f"{rel}: sha256 mismatch (expected {expected[:12]}..., found "
                            f"{actual[:12]}...): the file was changed or damaged")
    return problems


def _unsafe_name(name: str) -> bool:
    pure = PurePosixPath(name.replace("\\", "/"))
    return (not name or pure.is_absolute() or ".." in pure.parts
            or (len(name) > 1 and name[1] == ":"))


def tar_problems(path: str | os.PathLike[str]) -> list[str]:
    """Entries of a bundle archive that must not be extracted: absolute paths, ``..``,
    symbolic or hard links, devices, FIFOs; an unreadable archive is one problem."""
    try:
        with tarfile.open(path, mode="r:*") as tar:
            return [p for member in tar.getmembers() if (p := _member_problem(member))]
    except (tarfile.TarError, OSError, EOFError) as exc:
        return [f"{path}: not a readable .tar.gz bundle ({exc})"]


def _member_problem(member: tarfile.TarInfo) -> str | None:
    if _unsafe_name(member.name):
        return f"{member.name}: archive entry escapes the bundle folder (absolute path or '..')"
    if member.issym() or member.islnk():
        return f"{member.name}: archive entry is a link (to {member.linkname!r}); links are refused"
    if not (member.isfile() or member.isdir()):
        return f"{member.name}: archive entry is a device, FIFO or other special file; refused"
    return None


def safe_extract(path: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Extract a bundle archive after checking every entry (see `tar_problems`); regular
    files and folders only, written with plain permissions. Raises `ManifestError`."""
    problems = tar_problems(path)
    if problems:
        raise ManifestError(path, "unsafe or unreadable bundle archive: " + "; ".join(problems))
    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode="r:*") as tar:
        for member in tar.getmembers():
            dest = out / member.name
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            source = tar.extractfile(member)
            if source is None:
                raise ManifestError(path, f"{member.name}: archive entry cannot be read")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with source, open(dest, "wb") as handle:
                for piece in iter(lambda src=source: src.read(1 << 20), b""):
                    handle.write(piece)
    return out


def task_labels(manifest: BundleManifest) -> dict[str, tuple[str, ...]]:
    """Each task's labels, by task name."""
    return {t.name: t.labels for t in manifest.tasks}


def replace_models(manifest: BundleManifest, models: Iterable[ModelSpec]) -> BundleManifest:
    """A copy of `manifest` with another model list (the exporter adds FP16 / INT8 variants)."""
    return dataclasses.replace(manifest, models=tuple(models))
