"""Bundles: round trip through folder and .tar.gz, verification, and every refusal."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from runtime.bundle import (
    MANIFEST,
    SCHEMA_VERSION,
    ModelSpec,
    bundle_tar,
    load_bundle,
    safe_extract,
    verify_bundle,
)
from runtime.errors import ManifestError
from runtime.verify_cli import verify
from tests.runtime.model_fixtures import LABELS, make_bundle


@pytest.fixture()
def bundle_dir(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "tones", with_stft_variant=True)


def test_folder_and_archive_load_the_same_manifest(bundle_dir: Path, tmp_path: Path) -> None:
    folder = load_bundle(bundle_dir)
    archive = bundle_tar(bundle_dir)
    assert archive.name == "tones.tar.gz"
    unpacked = load_bundle(archive, extract_to=tmp_path / "x")
    assert unpacked.manifest == folder.manifest
    assert unpacked.manifest.schema_version == SCHEMA_VERSION
    assert unpacked.manifest.task("detection").labels == LABELS
    assert set(folder.manifest.files) == {"model.onnx", "model.stft.onnx"}
    assert verify_bundle(bundle_dir) == [] and verify_bundle(archive) == []
    assert bundle_tar(bundle_dir, tmp_path / "again.tar.gz").read_bytes() == archive.read_bytes()


def test_an_archive_needs_a_folder_to_extract_into(bundle_dir: Path) -> None:
    archive = bundle_tar(bundle_dir)
    with pytest.raises(ManifestError, match=r"tones.tar.gz.*unpack it first"):
        load_bundle(archive)


def test_model_is_picked_per_backend(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.model_for("cpu").variant == "stft"
    assert bundle.model_for("tensorrt").file == "model.onnx"
    assert bundle.model_for("cpu", variant="conv").file == "model.onnx"
    with pytest.raises(ManifestError, match="no model for backend 'cuda' at precision 'int8'"):
        bundle.model_for("cuda", precision="int8")
    with pytest.raises(ValueError, match="unknown backend"):
        bundle.model_for("tpu")


def test_tampered_missing_and_unlisted_files_are_reported(bundle_dir: Path) -> None:
    (bundle_dir / "model.onnx").write_bytes(b"tampered")
    (bundle_dir / "model.stft.onnx").unlink()
    (bundle_dir / "extra.bin").write_bytes(b"x")
    problems = verify_bundle(bundle_dir)
    assert any(p.startswith("model.onnx: sha256 mismatch") for p in problems)
    assert "model.stft.onnx: file is missing" in problems
    assert any(p.startswith("extra.bin: file is in the bundle but not listed") for p in problems)
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        load_bundle(bundle_dir)
    assert verify(bundle_dir) == 1


def test_engines_folder_is_not_hashed(bundle_dir: Path) -> None:
    (bundle_dir / "engines").mkdir()
    (bundle_dir / "engines" / "model.trt10.3.0.Orin.sm87.fp16.engine").write_bytes(b"e")
    assert verify_bundle(bundle_dir) == []


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(schema_version=99), "unknown bundle schema version 99"),
    (lambda m: m.pop("sample_rate"), "missing field 'sample_rate'"),
    (lambda m: m["tasks"][0].update(activation="relu"), "activation 'relu'"),
    (lambda m: m["tasks"][0].update(threshold=2.0), "threshold 2.0"),
    (lambda m: m["models"][0].update(precision="fp8"), "precision 'fp8'"),
    (lambda m: m["models"][0].update(file="../evil.onnx"), "relative path inside"),
])
def test_bad_manifests_are_refused(bundle_dir: Path, change: object, message: str) -> None:
    path = bundle_dir / MANIFEST
    data = json.loads(path.read_text())
    change(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        load_bundle(bundle_dir, check_hashes=False)
    problems = verify_bundle(bundle_dir)
    assert len(problems) == 1 and message.split("'")[0] in problems[0]


def test_not_json_manifest_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST).write_bytes(b"\x80\x04pickle")
    with pytest.raises(ManifestError, match="cannot read bundle manifest"):
        load_bundle(bundle_dir)


def _tar_with(tmp_path: Path, bundle_dir: Path, evil: tarfile.TarInfo) -> Path:
    archive = bundle_tar(bundle_dir)
    out = tmp_path / "evil.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        dst.addfile(evil, io.BytesIO(b"owned") if evil.isfile() else None)
    return out


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 5 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("evil, message", [
    (_entry("/etc/evil"), "escapes the bundle folder"),
    (_entry("tones/../../evil"), "escapes the bundle folder"),
    (_entry("tones/link", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
    (_entry("tones/hard", tarfile.LNKTYPE, "tones/bundle.json"), "is a link"),
    (_entry("tones/dev", tarfile.CHRTYPE), "device, FIFO"),
    (_entry("tones/fifo", tarfile.FIFOTYPE), "device, FIFO"),
])
def test_unsafe_archive_entries_are_refused(tmp_path: Path, bundle_dir: Path,
                                            evil: tarfile.TarInfo, message: str) -> None:
    archive = _tar_with(tmp_path, bundle_dir, evil)
    target = tmp_path / "unpacked"
    with pytest.raises(ManifestError, match=message):
        safe_extract(archive, target)
    assert not target.exists()  # nothing is extracted when one entry is unsafe
    assert any(message in p for p in verify_bundle(archive))
    assert not (tmp_path / "evil").exists()


def test_not_an_archive_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "b.tar.gz"
    fake.write_bytes(b"not a tar")
    assert "not a readable .tar.gz bundle" in verify_bundle(fake)[0]
    with pytest.raises(ManifestError, match="not a readable"):
        load_bundle(fake, extract_to=tmp_path / "x")


def test_writing_a_manifest_needs_its_model_files(tmp_path: Path, bundle_dir: Path) -> None:
    from runtime.bundle import replace_models, write_bundle_manifest

    manifest = load_bundle(bundle_dir).manifest
    with pytest.raises(ManifestError, match="missing from the bundle: int8.onnx"):
        write_bundle_manifest(bundle_dir, replace_models(
            manifest, [*manifest.models, ModelSpec("int8.onnx", "int8")]))


def test_verify_cli_prints_ok(bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify(bundle_tar(bundle_dir)) == 0
    assert "ok: tones 0.1.0, 2 files verified" in capsys.readouterr().out
