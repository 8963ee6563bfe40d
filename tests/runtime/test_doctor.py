"""`doctor`: a missing or mismatched engine, an unwritable or missing inbox, a tampered bundle,
disk days, the clock, and the exit code, on the tone bundle."""

from __future__ import annotations

import importlib.util
import os
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from runtime.doctor import (
    DAY_S,
    Gpu,
    check_clock,
    check_engine,
    check_folder,
    check_gpu,
    clock_floor,
    doctor,
    recording_days,
    run_checks,
)
from runtime.firstboot import FAILED_MARKER, UnitConfig, config_text
from runtime.trt_runner import DeviceInfo, EngineSidecar, engine_file_name, write_sidecar
from tests.runtime.model_fixtures import make_bundle

ORIN = DeviceInfo("10.3.0", "Orin", "8.7")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "tones")


def lines(output: str) -> dict[str, str]:
    """``name -> "status detail"`` from doctor's report."""
    out = {}
    for line in output.splitlines()[:-1]:
        status, name, detail = line.split(maxsplit=2)
        out[name] = f"{status} {detail}"
    return out


def fake_engine(bundle: Path, device: DeviceInfo, precision: str = "fp16") -> Path:
    import json

    sha = json.loads((bundle / "bundle.json").read_text())["files"]["model.onnx"]
    sidecar = EngineSidecar(device.tensorrt_version, device.gpu_name, device.compute_capability,
                            precision, {"min": 1, "opt": 4, "max": 8}, sha, "model.onnx")
    engine = bundle / "engines" / engine_file_name(sidecar)
    write_sidecar(engine, sidecar)
    engine.write_bytes(b"serialized engine")
    return engine


def test_engine_missing_mismatched_matching_and_failed(bundle: Path) -> None:
    missing = check_engine(bundle, "fp16", "engine", device=lambda: ORIN)
    assert missing.status == "warn"
    assert "no fp16 engine for TensorRT 10.3.0 on Orin" in missing.detail
    assert "first start builds it" in missing.detail

    fake_engine(bundle, DeviceInfo("10.0.1", "Orin", "8.7"))
    old = check_engine(bundle, "fp16", "engine", device=lambda: ORIN)
    assert old.status == "warn"
    assert "built with TensorRT 10.0.1, this device has TensorRT 10.3.0" in old.detail

    (bundle / "engines" / FAILED_MARKER).write_text('{"error": "out of memory"}')
    assert check_engine(bundle, "fp16", "engine", device=lambda: ORIN).status == "fail"

    engine = fake_engine(bundle, ORIN)
    good = check_engine(bundle, "fp16", "engine", device=lambda: ORIN)
    assert (good.status, good.detail.split()[0]) == ("ok", engine.name)


@pytest.mark.skipif(HAS_TRT, reason="checks the report where TensorRT is absent")
def test_engine_backend_without_tensorrt_fails_with_exit_code_1(
        bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    config = tmp_path / "unit.conf"
    config.write_text(config_text(UnitConfig(bundle=bundle, inbox=inbox, outbox=tmp_path / "o",
                                             backend="engine")))
    assert doctor(config=config) == 1
    report = lines(capsys.readouterr().out)
    assert report["engine"].startswith("fail cannot check the engine")
    assert report["tensorrt"].startswith("fail tensorrt is not importable")
    assert report["bundle"].startswith("ok tones 0.1.0")
    assert report["inbox"].startswith("ok")


def test_cpu_unit_is_healthy(bundle: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    config = tmp_path / "unit.conf"
    config.write_text(config_text(UnitConfig(
        bundle=bundle, inbox=inbox, outbox=tmp_path / "out", backend="cpu", rate=8000,
        built_at=datetime.now(timezone.utc).isoformat())))
    code = doctor(config=config)
    report = lines(capsys.readouterr().out)
    assert code == 0, report
    assert "engine" not in report  # the cpu backend never uses one
    assert report["outbox"].startswith("warn") and "will be created" in report["outbox"]
    assert "at 8000 Hz, 1 ch, 16 bit" in report["disk"]
    assert report["clock"].startswith("ok")


def test_inbox_under_a_regular_file_fails(bundle: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "recordings"
    blocker.write_text("not a folder")
    check = check_folder("inbox", blocker / "inbox")
    assert check.status == "fail" and "is a file" in check.detail
    assert check_folder("inbox", blocker).detail.endswith("not a folder")
    assert doctor(bundle, inbox=blocker / "inbox") == 1
    assert lines(capsys.readouterr().out)["inbox"].startswith("fail")


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder that refuses new files for this user: permission bits for a normal user; for
    root (who ignores them) a read-only mount such as /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return folder
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            tempfile.NamedTemporaryFile(dir=candidate).close()
        except OSError:
            return candidate
    pytest.skip("running as root with no read-only folder to point at")


def test_unwritable_inbox_fails(bundle: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    folder = _read_only_folder(tmp_path)
    try:
        check = check_folder("inbox", folder)
        assert check.status == "fail" and "not writable" in check.detail
        assert doctor(bundle, inbox=folder, outbox=tmp_path / "out") == 1
        assert lines(capsys.readouterr().out)["inbox"].startswith(f"fail {folder}: not writable")
    finally:
        if folder.is_relative_to(tmp_path):
            folder.chmod(0o755)


def test_missing_inbox_and_tampered_bundle_fail(bundle: Path, tmp_path: Path) -> None:
    with open(bundle / "model.onnx", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01")
    checks = {c.name: c for c in run_checks(bundle, tmp_path / "nowhere", None, "cpu", "fp16",
                                            48000, 1, 16, gpu=None)}
    assert checks["bundle"].status == "fail" and "sha256 mismatch" in checks["bundle"].detail
    assert checks["inbox"].status == "fail" and "does not exist" in checks["inbox"].detail


def test_gpu_lines_depend_on_the_backend() -> None:
    orin = Gpu("Orin", "8.7", "12.6")
    assert [c.status for c in check_gpu(orin, "engine")] == ["ok", "ok"]
    assert "CUDA 12.6" in check_gpu(orin, "cpu")[1].detail
    assert check_gpu(None, "cuda")[0].status == "fail"
    assert check_gpu(None, "cpu")[0].status == "ok"
    assert check_gpu(None, None)[0].status == "warn"


def test_recording_days() -> None:
    one_day = 48000 * 1 * 2 * DAY_S
    assert recording_days(one_day, 48000, 1, 16) == pytest.approx(1.0)
    assert recording_days(one_day, 96000, 2, 24) == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        recording_days(one_day, 0, 1, 16)


def test_clock(tmp_path: Path) -> None:
    built = "2026-03-01T12:00:00+00:00"
    floor, source = clock_floor(built)
    assert source == "the kit's build time"
    assert floor == datetime(2026, 3, 1, 12, tzinfo=timezone.utc).timestamp()
    assert check_clock(floor + 3600, floor, source).status == "ok"
    reset = check_clock(datetime(2000, 1, 1, tzinfo=timezone.utc).timestamp(), floor, source)
    assert reset.status == "fail" and "2000-01-01" in reset.detail and "2026-03-01" in reset.detail
    assert check_clock(floor + 20 * 365 * DAY_S, floor, source).status == "warn"
    newer = tmp_path / "bundle.json"
    newer.write_text("{}")
    assert clock_floor(built, (newer, tmp_path / "absent")) == (newer.stat().st_mtime, str(newer))
