"""`naturelm-edge doctor [BUNDLE]`: what a field engineer checks on a unit, one line each.

Python and platform; the GPU and CUDA driver (through ``libcuda`` itself, so it needs no
Python CUDA package); TensorRT and cuda-python; ONNX Runtime and its providers; whether the
bundle's engine matches this GPU and TensorRT version; whether the bundle verifies; whether
inbox and outbox exist and take a new file; free disk and the days of recording it holds at
the recorder's rate; whether the clock looks sane (not before the kit was built or the
software installed, not decades ahead). Each line is ``ok``, ``warn`` or ``fail``; the exit
code is 0 when nothing failed, 1 otherwise. A unit config (``--config``) supplies the
bundle, folders, backend and recorder format that are not given on the command line.

    >>> import tempfile, pathlib
    >>> inbox = pathlib.Path(tempfile.mkdtemp())
    >>> check_folder("inbox", inbox).status
    'ok'
    >>> check_folder("inbox", inbox / "missing").status
    'fail'
    >>> print(format_check(Check("fail", "inbox", "/data/inbox: not found")))
    fail  inbox     /data/inbox: not found

    $ naturelm-edge doctor --config /etc/naturelm-edge/naturelm-edge.conf
"""

from __future__ import annotations

import ctypes
import importlib
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from runtime.errors import ManifestError
from runtime.trt_runner import DeviceInfo

Status = Literal["ok", "warn", "fail"]
GPU_BACKENDS = ("engine", "tensorrt", "cuda")
DAY_S = 86400
WARN_DAYS = 7.0
FUTURE_DAYS = 3650.0
MIN_PYTHON = (3, 10)


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    status: Status
    name: str
    detail: str


@dataclass(frozen=True)
class Gpu:
    """What the CUDA driver says about device 0."""

    name: str
    compute_capability: str
    driver_cuda: str


def format_check(check: Check) -> str:
    """``status  name      detail``, aligned."""
    return f"{check.status:<5} {check.name:<9} {check.detail}"


# ----------------------------------------------------------------------------- the platform


def check_python() -> Check:
    """Interpreter, OS, architecture and C library; Python below 3.10 fails."""
    libc, libc_version = platform.libc_ver()
    where = f"{platform.system()} {platform.machine()}"
    if libc:
        where += f", {libc} {libc_version}"
    tegra = Path("/etc/nv_tegra_release")
    if tegra.is_file():
        where += f", {tegra.read_text(errors='replace').splitlines()[0].strip('# ')[:60]}"
    detail = f"{platform.python_implementation()} {platform.python_version()} on {where}"
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("fail", "python", f"{detail}; naturelm-edge needs Python >= "
                                       f"{'.'.join(map(str, MIN_PYTHON))}")
    return Check("ok", "python", detail)


def cuda_gpu() -> Gpu | None:
    """Device 0 through the CUDA driver API (``libcuda.so.1``), or None without a driver or
    GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count, version, major, minor = (ctypes.c_int() for _ in range(4))
    device = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGet(ctypes.byref(device), 0)
    cuda.cuDeviceGetName(name, 256, device)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # COMPUTE_CAPABILITY_MINOR
    cuda.cuDriverGetVersion(ctypes.byref(version))
    return Gpu(name.value.decode(errors="replace").strip(), f"{major.value}.{minor.value}",
               f"{version.value // 1000}.{version.value % 1000 // 10}")


def _needs_gpu(backend: str | None) -> bool:
    return backend in GPU_BACKENDS


def _absent(name: str, what: str, backend: str | None, needed_by: tuple[str, ...]) -> Check:
    if backend in needed_by:
        return Check("fail", name, f"{what}; backend {backend!r} needs it")
    if backend is None:
        return Check("warn", name, f"{what} (only the cpu backend can run)")
    return Check("ok", name, f"{what} (not needed by backend {backend!r})")


def check_gpu(gpu: Gpu | None, backend: str | None) -> list[Check]:
    """The GPU line and the CUDA driver line."""
    if gpu is None:
        return [_absent("gpu", "no NVIDIA GPU or CUDA driver found", backend, GPU_BACKENDS)]
    return [Check("ok", "gpu", f"{gpu.name} (compute {gpu.compute_capability})"),
            Check("ok", "cuda", f"driver supports CUDA {gpu.driver_cuda}")]


def _version_of(module: str) -> str | None:
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return None
    return str(getattr(imported, "__version__", "unknown version"))


def check_tensorrt(backend: str | None) -> list[Check]:
    """TensorRT and cuda-python (the native engine runner needs both)."""
    checks = []
    trt = _version_of("tensorrt")
    if trt is None:
        checks.append(_absent("tensorrt", "tensorrt is not importable (on Jetson: JetPack's "
                              "python3-libnvinfer and a venv with --system-site-packages)",
                              backend, ("engine",)))
    else:
        checks.append(Check("ok", "tensorrt", f"TensorRT {trt}"))
    cuda_python = _version_of("cuda.bindings") or _version_of("cuda.cudart")
    if cuda_python is None:
        checks.append(_absent("cudapy", "cuda-python is not importable", backend, ("engine",)))
    else:
        checks.append(Check("ok", "cudapy", f"cuda-python {cuda_python}"))
    return checks


def check_onnxruntime(backend: str | None) -> Check:
    """ONNX Runtime's version and providers; a provider the backend wants but lacks warns
    (the runner falls back to the next one and logs it)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return Check("fail", "onnxrt", f"onnxruntime is not importable: {exc}")
    providers = list(ort.get_available_providers())
    detail = f"onnxruntime {ort.__version__}: {', '.join(providers)}"
    wanted = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}
    if backend in wanted and wanted[backend] not in providers:
        return Check("warn", "onnxrt", f"{detail}; backend {backend!r} wants {wanted[backend]} "
                                       f"(install onnxruntime-gpu); it will fall back")
    return Check("ok", "onnxrt", detail)


# ----------------------------------------------------------------------------- the bundle


def check_bundle(bundle: Path) -> Check:
    """Schema, sha256 of every file, no missing or unlisted file."""
    from runtime.bundle import load_bundle, verify_bundle

    problems = verify_bundle(bundle)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return Check("fail", "bundle", f"{bundle}: {'; '.join(problems[:3])}{more}")
    with tempfile.TemporaryDirectory(prefix="naturelm-doctor-") as tmp:
        manifest = load_bundle(bundle, extract_to=tmp).manifest
    return Check("ok", "bundle", f"{manifest.name} {manifest.version}: {len(manifest.files)} "
                                 f"files verified")


def check_engine(bundle: Path, precision: str, backend: str | None,
                 device: Callable[[], DeviceInfo] | None = None) -> Check:
    """Whether the bundle's `engines/` folder holds a `precision` engine for this GPU and
    TensorRT version. `device` returns a `runtime.trt_runner.DeviceInfo` (default: ask
    TensorRT and CUDA)."""
    from runtime.bundle import load_bundle
    from runtime.firstboot import FAILED_MARKER
    from runtime.trt_runner import EngineMismatchError, current_device, find_engine

    if not bundle.is_dir():
        return Check("warn" if backend == "engine" else "ok", "engine",
                     f"{bundle}: not an unpacked folder, so no engine is cached with it")
    try:
        here = (device or current_device)()
    except (ImportError, RuntimeError, OSError) as exc:
        return _absent("engine", f"cannot check the engine: TensorRT or the GPU is not usable "
                                 f"({type(exc).__name__}: {exc})", backend, ("engine",))
    try:
        loaded = load_bundle(bundle)
        engine = find_engine(loaded, precision, here)
    except (EngineMismatchError, ManifestError) as exc:
        marker = bundle / "engines" / FAILED_MARKER
        if marker.is_file():
            return Check("fail", "engine", f"{exc}; the first-start build failed before "
                                           f"(see {marker})")
        return Check("warn", "engine", f"{exc}; the first start builds it "
                                       f"(python -m runtime.firstboot CONFIG)")
    return Check("ok", "engine", f"{engine.name} matches this GPU and TensorRT")


# ----------------------------------------------------------------------------- folders, disk


def check_folder(name: str, folder: Path, create_ok: bool = False) -> Check:
    """`folder` exists and a new file can be written in it (tried for real: permission bits
    do not bind root, and a read-only mount only shows when writing). With `create_ok` a
    missing folder whose nearest existing parent takes files only warns."""
    if not folder.exists():
        parent = next((p for p in folder.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            return Check("fail", name, f"{folder}: not a folder ({parent} is a file)")
        if create_ok and parent is not None and _writable(parent) is None:
            return Check("warn", name, f"{folder}: does not exist yet; it will be created")
        return Check("fail", name, f"{folder}: does not exist")
    if not folder.is_dir():
        return Check("fail", name, f"{folder}: not a folder")
    error = _writable(folder)
    if error is not None:
        return Check("fail", name, f"{folder}: not writable ({error})")
    return Check("ok", name, f"{folder}: exists and is writable")


def _writable(folder: Path) -> str | None:
    """None when a file can be created in `folder`, else why not."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".naturelm-doctor-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def recording_days(free_bytes: int, rate: int, channels: int, bits: int) -> float:
    """Days of uncompressed recording that `free_bytes` hold."""
    if min(rate, channels, bits) < 1:
        raise ValueError("rate, channels and bits must be positive")
    return free_bytes / (rate * channels * bits / 8 * DAY_S)


def check_disk(folder: Path, rate: int, channels: int, bits: int) -> Check:
    """Free space where recordings land, in GiB and days of recording; under a day fails,
    under a week warns."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    days = recording_days(free, rate, channels, bits)
    detail = (f"{free / 2**30:.1f} GiB free at {existing}: {days:.1f} days of recording at "
              f"{rate} Hz, {channels} ch, {bits} bit")
    if days < 1.0:
        return Check("fail", "disk", detail)
    return Check("warn" if days < WARN_DAYS else "ok", "disk", detail)


# ----------------------------------------------------------------------------- the clock


def clock_floor(built_at: str = "", files: tuple[Path, ...] = ()) -> tuple[float, str]:
    """The earliest plausible time now (epoch seconds) and what sets it: the kit's build time
    (`built_at`, ISO 8601) or the newest modification time of `files` (the installed runtime,
    the bundle), whichever is later."""
    floor, source = 0.0, "nothing"
    if built_at:
        stamp = datetime.fromisoformat(built_at)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        floor, source = stamp.timestamp(), "the kit's build time"
    for path in files:
        if path.exists() and path.stat().st_mtime > floor:
            floor, source = path.stat().st_mtime, str(path)
    return floor, source


def check_clock(now: float, floor: float, source: str) -> Check:
    """Now must not be before `floor` (a day's slack) nor ten years after it."""
    shown = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    floor_shown = datetime.fromtimestamp(floor, timezone.utc).strftime("%Y-%m-%d")
    if now < floor - DAY_S:
        return Check("fail", "clock", f"{shown} is before {floor_shown} ({source}): the clock "
                                      f"is wrong (RTC battery? no NTP?); timestamps would be too")
    if now > floor + FUTURE_DAYS * DAY_S:
        return Check("warn", "clock", f"{shown} is more than ten years after {floor_shown} "
                                      f"({source}): check the clock")
    return Check("ok", "clock", f"{shown} (not before {floor_shown}, {source})")


# ----------------------------------------------------------------------------- the command


def run_checks(bundle: Path | None, inbox: Path | None, outbox: Path | None,
               backend: str | None, precision: str, rate: int, channels: int, bits: int,
               built_at: str = "", gpu: Gpu | None = None,
               device: Callable[[], DeviceInfo] | None = None) -> list[Check]:
    """Every check, in report order. `gpu` and `device` default to asking the hardware."""
    checks = [check_python()]
    checks += check_gpu(gpu if gpu is not None else cuda_gpu(), backend)
    checks += check_tensorrt(backend)
    checks.append(check_onnxruntime(backend))
    if bundle is not None:
        checks.append(check_bundle(bundle))
        if backend in (None, "engine"):
            checks.append(check_engine(bundle, precision, backend, device))
    if inbox is not None:
        checks.append(check_folder("inbox", inbox))
    if outbox is not None:
        checks.append(check_folder("outbox", outbox, create_ok=True))
    disk_at = inbox or outbox or bundle
    if disk_at is not None:
        checks.append(check_disk(disk_at, rate, channels, bits))
    stamps = (Path(__file__).with_name("__init__.py"),)
    if bundle is not None:
        stamps += (bundle / "bundle.json",) if bundle.is_dir() else (bundle,)
    checks.append(check_clock(time.time(), *clock_floor(built_at, stamps)))
    return checks


def doctor(bundle: Path | None = None, inbox: Path | None = None, outbox: Path | None = None,
           config: Path | None = None, rate: int = 48000, channels: int = 1,
           bits: int = 16) -> int:
    """Check this unit: platform, GPU, TensorRT, ONNX Runtime, engine, bundle, folders, disk,
    clock. One line per check (ok / warn / fail); exit code 0 when nothing failed.

    Args:
        bundle: the bundle folder or .tar.gz (default: the config's).
        inbox: where recordings arrive (default: the config's).
        outbox: where detections go (default: the config's).
        config: the unit config file written by `naturelm-edge flash`.
        rate: the recorder's sample rate (the config's when left at 48000).
        channels: the recorder's channels (the config's when left at 1).
        bits: the recorder's bits per sample (the config's when left at 16).
    """
    backend, precision, built_at = None, "fp16", ""
    if config is not None:
        from runtime.firstboot import read_config

        try:
            unit = read_config(config)
        except ManifestError as exc:
            print(format_check(Check("fail", "config", str(exc))))
            return 1
        bundle, inbox, outbox = bundle or unit.bundle, inbox or unit.inbox, outbox or unit.outbox
        backend, precision, built_at = unit.backend, unit.precision, unit.built_at
        rate = unit.rate if rate == 48000 else rate
        channels = unit.channels if channels == 1 else channels
        bits = unit.bits if bits == 16 else bits
    checks = run_checks(bundle, inbox, outbox, backend, precision, rate, channels, bits, built_at)
    for check in checks:
        print(format_check(check))
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    print(f"{len(checks)} checks: {failed} failed, {warned} warnings")
    return 1 if failed else 0
