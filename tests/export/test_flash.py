"""`flash`: platform tags and the commands it builds (no network), a kit for this machine's
x86_64 CPU installed offline into a fresh venv that analyses a recording, manifest checks that
catch a tampered file. Kit builds download wheels, so they carry the `registry` marker and
skip when the package registry is unreachable."""

from __future__ import annotations

import csv
import json
import platform
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from export.flash import (
    SUMS,
    TARGETS,
    download_command,
    flash,
    parse_remote,
    remote_commands,
    requirements_text,
    verify_kit,
    wheel_name_version,
)
from runtime.errors import ManifestError
from tests.runtime.model_fixtures import RATE, make_bundle, tone

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def test_platform_tags_cover_the_units_glibc_down_to_manylinux2014() -> None:
    tags = TARGETS["jetson-orin"].platforms()
    assert tags[0] == "manylinux_2_35_aarch64" and tags[-2:] == [
        "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert len(tags) == 35 - 17 + 2
    assert TARGETS["cpu-x86_64"].platforms("2.28")[0] == "manylinux_2_28_x86_64"
    with pytest.raises(ValueError, match="not a manylinux glibc"):
        TARGETS["cpu-x86_64"].platforms("2.12")


def test_download_command_asks_pip_for_the_targets_binaries(tmp_path: Path) -> None:
    command = download_command(TARGETS["jetson-orin"], "3.10", tmp_path,
                               ["naturelm-edge==0.1.0", "cuda-python>=12.2,<12.7"])
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--only-binary=:all:" in command
    flags = dict(zip(command, command[1:], strict=False))
    assert flags["--python-version"] == "3.10" and flags["--implementation"] == "cp"
    assert flags["--find-links"] == str(tmp_path) and flags["--dest"] == str(tmp_path)
    platforms = [command[i + 1] for i, arg in enumerate(command) if arg == "--platform"]
    assert platforms == TARGETS["jetson-orin"].platforms()
    assert command[-2:] == ["naturelm-edge==0.1.0", "cuda-python>=12.2,<12.7"]


def test_targets() -> None:
    jetson, gpu = TARGETS["jetson-orin"], TARGETS["linux-gpu-x86_64"]
    assert jetson.system_site_packages and jetson.backend == "engine"
    assert not any("tensorrt" in r or "onnxruntime-gpu" in r for r in jetson.requirements)
    assert gpu.exclude == ("onnxruntime",) and "onnxruntime-gpu>=1.17" in gpu.requirements
    assert TARGETS["cpu-aarch64"].arch == "aarch64" and TARGETS["cpu-x86_64"].backend == "cpu"


def test_remote_copy_commands() -> None:
    archive = Path("/tmp/kits/orin kit.tar.gz")
    mkdir, scp, unpack = remote_commands(archive, "field@unit-7.local:kits/2025")
    assert mkdir == ["ssh", "field@unit-7.local", "mkdir -p kits/2025"]
    assert scp == ["scp", "-q", str(archive), "field@unit-7.local:kits/2025/orin kit.tar.gz"]
    assert unpack[:2] == ["ssh", "field@unit-7.local"]
    assert unpack[2] == ("cd kits/2025 && tar -xzf 'orin kit.tar.gz' && cd 'orin kit' && "
                         f"sha256sum --quiet --check {SUMS}")
    assert parse_remote("unit7:/srv/naturelm/") == ("unit7", "/srv/naturelm")
    for bad in ("unit7", "unit7:", "a@b:x;reboot", "unit7:~/kits", "-oProxyCommand=x:y"):
        with pytest.raises(ValueError, match="expected"):
            parse_remote(bad)


def test_requirements_pin_everything_when_a_dependency_is_swapped(tmp_path: Path) -> None:
    for name in ("naturelm_edge-0.1.0-py3-none-any.whl",
                 "onnxruntime_gpu-1.20.1-cp310-cp310-manylinux_2_27_x86_64.whl",
                 "numpy-2.2.6-cp310-cp310-manylinux_2_17_x86_64.whl"):
        (tmp_path / name).write_bytes(b"")
    text, no_deps = requirements_text(tmp_path, TARGETS["linux-gpu-x86_64"], "0.1.0")
    assert no_deps
    assert text.split() == ["naturelm-edge==0.1.0", "numpy==2.2.6", "onnxruntime-gpu==1.20.1"]
    text, no_deps = requirements_text(tmp_path, TARGETS["jetson-orin"], "0.1.0")
    assert not no_deps and text.split() == ["naturelm-edge==0.1.0", "cuda-python>=12.2,<12.7"]
    assert wheel_name_version(Path("Soundfile-0.14.0-py2.py3-none-any.whl")) == (
        "soundfile", "0.14.0")


def test_flash_refuses_a_bad_bundle_and_a_used_folder(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "tones")
    (bundle / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="does not verify"):
        flash(bundle, target="cpu-x86_64", out=tmp_path / "kit")
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    with pytest.raises(FileExistsError):
        flash(make_bundle(tmp_path / "ok"), target="cpu-x86_64", out=used)
    with pytest.raises(ValueError, match="unknown target"):
        flash(bundle, target="jetson-nano", out=tmp_path / "k2")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- registry tests


def _registry_reachable(tmp: Path) -> bool:
    """One tiny pip download through the user's pip configuration (index and mirrors)."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--dest", str(tmp), "packaging"]
    try:
        return subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if platform.machine() != "x86_64" or not sys.platform.startswith("linux"):
        pytest.skip("the kit test installs a cpu-x86_64 kit on this machine")
    root = tmp_path_factory.mktemp("flash")
    if not _registry_reachable(root / "probe"):
        pytest.skip("the package registry is unreachable (pip download failed)")
    bundle = make_bundle(root / "tones")
    assert flash(bundle, target="cpu-x86_64", out=root / "kit", python=PYTHON,
                 inbox=root / "inbox", outbox=root / "detections",
                 log_file=root / "log" / "watch.log") == 0
    return root / "kit"


@pytest.mark.registry
@pytest.mark.slow
def test_kit_holds_everything_and_its_archive_matches(kit: Path, tmp_path: Path) -> None:
    meta = json.loads((kit / "kit.json").read_text())
    assert meta["target"] == "cpu-x86_64" and meta["python"] == PYTHON
    wheels = {wheel_name_version(Path(w))[0] for w in meta["wheels"]}
    assert {"naturelm-edge", "numpy", "soundfile", "soxr", "onnxruntime"} <= wheels
    assert not wheels & {"torch", "lightning", "transformers", "onnx"}
    pinned = f"naturelm-edge=={meta['naturelm_edge']}"
    assert (kit / "requirements.txt").read_text().split() == [pinned]
    assert not (kit / "bundle" / "engines").exists()
    assert verify_kit(kit) == []
    subprocess.run(["sha256sum", "--quiet", "--check", SUMS], cwd=kit, check=True)
    with tarfile.open(kit.with_name(kit.name + ".tar.gz")) as tar:
        assert tar.getmember("kit/install.sh").mode == 0o755
        tar.extractall(tmp_path, filter="data")
    assert verify_kit(tmp_path / "kit") == []


@pytest.mark.registry
@pytest.mark.slow
def test_tampered_kit_is_caught_and_not_installed(kit: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(kit, tmp_path / "kit"))
    with open(copy / "bundle" / "model.onnx", "r+b") as handle:
        handle.seek(64)
        handle.write(b"\xff\xfe")
    (copy / "wheelhouse" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    problems = verify_kit(copy)
    assert "bundle/model.onnx: sha256 mismatch: the file was changed or damaged" in problems
    assert f"wheelhouse/evil-1.0-py3-none-any.whl: not listed in {SUMS}" in problems
    result = subprocess.run(["bash", str(copy / "install.sh")], capture_output=True, text=True,
                            env=_install_env(tmp_path))
    assert result.returncode == 1
    assert "the kit is damaged or was changed" in result.stderr
    assert not (tmp_path / "opt").exists()


@pytest.mark.registry
@pytest.mark.slow
def test_install_refuses_another_python(kit: Path, tmp_path: Path) -> None:
    other = tmp_path / "python-other"
    other.write_text("#!/bin/sh\necho 3.9\n")
    other.chmod(0o755)
    env = {**_install_env(tmp_path), "PYTHON": str(other)}
    result = subprocess.run(["bash", str(kit / "install.sh")], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 1
    assert f"this kit holds wheels for Python {PYTHON}" in result.stderr
    assert "rebuild the kit with --python 3.9" in result.stderr
    assert not (tmp_path / "opt").exists()


def _install_env(root: Path) -> dict[str, str]:
    base = Path(sys.base_prefix) / "bin" / f"python{PYTHON}"
    return {"PATH": "/usr/bin:/bin", "HOME": str(root), "PREFIX": str(root / "opt"),
            "CONFIG_DIR": str(root / "etc"), "SKIP_SYSTEMD": "1", "PYTHON": str(base)}


@pytest.mark.registry
@pytest.mark.slow
def test_kit_installs_offline_and_analyses_a_recording(kit: Path, tmp_path: Path) -> None:
    env = _install_env(tmp_path)
    result = subprocess.run(["bash", str(kit / "install.sh")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "0 failed" in result.stdout  # doctor ran on the fresh unit
    venv = tmp_path / "opt" / "venv"
    config = (tmp_path / "etc" / "naturelm-edge.conf").read_text()
    assert f"bundle = {tmp_path / 'opt' / 'bundle'}" in config

    recording = tmp_path / "dusk song.wav"
    sf.write(recording, np.concatenate([tone(2000.0, 3.0), np.zeros(RATE, np.float32)]), RATE)
    out = tmp_path / "detections"
    analysed = subprocess.run([str(venv / "bin" / "naturelm-edge"), "analyze",
                               str(tmp_path / "opt" / "bundle"), str(recording), "--out",
                               str(out), "--no-progress"],
                              capture_output=True, text=True, env=env, timeout=120)
    assert analysed.returncode == 0, analysed.stderr
    with open(out / "detections.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["task"], r["label"], r["start_s"]) for r in rows} == {
        ("species", "B", "0.000"), ("detection", "B", "0.000")}

    # The installed runtime is the lean base: no torch or workstation package came along.
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import importlib.util as u; print([m for m in ('torch', 'onnx', "
                            "'lightning', 'transformers') if u.find_spec(m)])"],
                           capture_output=True, text=True, env=env, check=True)
    assert probe.stdout.strip() == "[]"
