"""First start of a field unit: the unit's config file, the on-device TensorRT engine build,
and `start`, which the systemd unit runs.

A flashed unit is described by one INI file (``/etc/naturelm-edge/naturelm-edge.conf``,
written by `naturelm-edge flash`): bundle, inbox, outbox, backend, thresholds, log paths and
the recorder's format. `start` reads it and, when the backend is ``engine``, makes sure the
bundle's `engines/` folder holds a TensorRT engine for this exact GPU and TensorRT version:
it builds one the first time (TensorRT engines are tied to both, so they are built on the
unit) and reuses it afterwards. If TensorRT or the GPU is missing, or the build fails, the
unit falls back to the config's ONNX Runtime backend with a logged warning; a failed build is
recorded in `engines/firstboot-failed.json` so later starts do not retry it for the same
device and model (delete the file, or pass ``retry=True``, to try again). Then it runs
`runtime.watch.watch` with the config's settings.

The engine is built by `runtime.trt_build` (the builder `naturelm-edge export engine` uses
too), which imports `tensorrt` only inside its build, so this module imports anywhere.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "naturelm-edge.conf"
    >>> _ = path.write_text(config_text(UnitConfig(inbox=pathlib.Path("/data/in"),
    ...                                            backend="engine", threshold=0.4)))
    >>> config = read_config(path)
    >>> config.inbox, config.backend, config.threshold, config.fallback_backend
    (PosixPath('/data/in'), 'engine', 0.4, 'cpu')

    $ python -m runtime.firstboot /etc/naturelm-edge/naturelm-edge.conf
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import json
import logging
import logging.handlers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import trt_build
from runtime.bundle import Bundle, load_bundle
from runtime.errors import ManifestError
from runtime.files import atomic_write_text
from runtime.trt_build import ENGINE_PRECISIONS, EngineOptions, engine_model
from runtime.trt_build import EngineBuildError as EngineBuildError  # raised by build_engine
from runtime.trt_runner import DeviceInfo, EngineMismatchError, current_device, find_engine

# Named explicitly: run as `python -m runtime.firstboot`, __name__ is "__main__".
log = logging.getLogger("runtime.firstboot")

SECTION = "naturelm-edge"
BACKENDS = ("engine", "tensorrt", "cuda", "cpu")
ORT_BACKENDS = ("tensorrt", "cuda", "cpu")
POLICIES = ("leave", "move", "delete")
FAILED_MARKER = "firstboot-failed.json"


@dataclass(frozen=True)
class UnitConfig:
    """What `start` and `doctor` need to know about one field unit (the config file)."""

    bundle: Path = Path("/opt/naturelm-edge/bundle")
    inbox: Path = Path("/data/inbox")
    outbox: Path = Path("/data/detections")
    backend: str = "cpu"
    fallback_backend: str = "cpu"
    precision: str = "fp16"
    max_batch: int = 8
    decoders: int = 2
    workspace_mb: int = 1024
    dla_core: int | None = None
    threshold: float | None = None
    thresholds_file: Path | None = None
    policy: str = "leave"
    done_dir: Path | None = None
    settle_s: float = 30.0
    poll_s: float = 10.0
    log_file: Path | None = Path("/var/log/naturelm-edge/watch.log")
    rate: int = 48000
    channels: int = 1
    bits: int = 16
    built_at: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.backend not in BACKENDS:
            problems.append(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.fallback_backend not in ORT_BACKENDS:
            problems.append(f"fallback_backend {self.fallback_backend!r} is not one of "
                            f"{', '.join(ORT_BACKENDS)}")
        if self.precision not in ENGINE_PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of "
                            f"{', '.join(ENGINE_PRECISIONS)}")
        if self.policy not in POLICIES:
            problems.append(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.policy == "move" and self.done_dir is None:
            problems.append("policy 'move' needs done_dir")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold {self.threshold} is not in [0, 1]")
        if min(self.rate, self.channels, self.bits, self.max_batch, self.decoders,
               self.workspace_mb) < 1:
            problems.append("rate, channels, bits, max_batch, decoders and workspace_mb must be "
                            "positive")
        if self.dla_core is not None and (self.dla_core < 0 or self.precision == "fp32"):
            problems.append(f"dla_core {self.dla_core} needs a core index >= 0 and precision "
                            f"fp16 or int8 (DLA has no FP32)")
        if problems:
            raise ValueError("; ".join(problems))


_COMMENTS = {
    "bundle": "the unpacked bundle folder (its engines/ folder caches the TensorRT engine)",
    "inbox": "where the recorder writes recordings",
    "outbox": "where detections, the errors file and the journal go",
    "backend": "engine (native TensorRT), tensorrt / cuda / cpu (ONNX Runtime providers)",
    "fallback_backend": "ONNX Runtime backend used when the engine cannot be built or run",
    "precision": "engine precision: fp32, fp16 or int8 (int8 needs a QDQ model in the bundle)",
    "max_batch": "largest batch the engine's optimisation profile takes",
    "decoders": "recordings decoded at once, one CPU thread each (a backlog after an outage "
                "clears faster; the GPU runs the model)",
    "workspace_mb": "TensorRT workspace limit for the engine build, in MiB",
    "dla_core": "build the engine for this DLA core with GPU fallback (Orin NX / AGX); "
                "empty: GPU only",
    "threshold": "one threshold for every task and label; empty: the bundle's defaults",
    "thresholds_file": "CSV task,label,threshold overriding the above; empty: none",
    "policy": "what happens to an analysed recording: leave, move (to done_dir) or delete",
    "done_dir": "where policy = move puts analysed recordings",
    "settle_s": "a recording counts as complete once unchanged for this many seconds",
    "poll_s": "seconds between inbox scans",
    "log_file": "rotating log of the watch daemon; empty: stderr (the journal)",
    "rate": "the recorder's sample rate (doctor turns free disk into days of recording)",
    "channels": "the recorder's channel count",
    "bits": "the recorder's bits per sample",
    "built_at": "when the kit was built (UTC); doctor refuses a clock earlier than this",
}


def config_text(config: UnitConfig) -> str:
    """The INI text of `config`, every key with a comment (what `flash` installs)."""
    lines = ["# naturelm-edge field unit configuration; read by `python -m runtime.firstboot`",
             "# (the systemd unit) and by `naturelm-edge doctor --config`.", f"[{SECTION}]"]
    for item in dataclasses.fields(UnitConfig):
        value = getattr(config, item.name)
        lines.append(f"# {_COMMENTS[item.name]}")
        lines.append(f"{item.name} = {'' if value is None else value}")
    return "\n".join(lines) + "\n"


def read_config(path: Path) -> UnitConfig:
    """Parse a unit config file; an unreadable file, unknown key or bad value raises
    `ManifestError` naming the file."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ManifestError(path, f"cannot read the unit config: {exc}") from exc
    if not parser.has_section(SECTION):
        raise ManifestError(path, f"no [{SECTION}] section in the unit config")
    known = {f.name: f for f in dataclasses.fields(UnitConfig)}
    values: dict[str, Any] = {}
    for key, raw in parser.items(SECTION):
        if key not in known:
            raise ManifestError(path, f"unknown key {key!r}; known keys: {', '.join(known)}")
        try:
            values[key] = _parse(key, raw.strip())
        except ValueError as exc:
            raise ManifestError(path, f"{key}: {exc}") from exc
    try:
        return UnitConfig(**values)
    except ValueError as exc:
        raise ManifestError(path, str(exc)) from exc


def _parse(key: str, raw: str) -> Any:
    default = getattr(UnitConfig(), key)
    if key in ("threshold", "thresholds_file", "done_dir", "log_file", "dla_core") and raw == "":
        return None
    if key == "dla_core":
        return int(raw)
    if key == "threshold" or isinstance(default, float):
        return float(raw)
    if isinstance(default, int):
        return int(raw)
    if key in ("thresholds_file", "done_dir", "log_file") or isinstance(default, Path):
        if not raw:
            raise ValueError("needs a path")
        return Path(raw)
    return raw


# ----------------------------------------------------------------------------- engine build


def build_engine(bundle: Bundle, precision: str = "fp16", max_batch: int = 8,
                 device: DeviceInfo | None = None, workspace_mb: int = 1024,
                 dla_core: int | None = None) -> Path:
    """Build a TensorRT engine for this GPU with `runtime.trt_build` (the builder
    `naturelm-edge export engine` uses too) and store it, with its sidecar, in the bundle's
    `engines/` folder; returns the engine's path.

    The optimisation profile is the export spec's, capped at `max_batch`; the timing cache
    is kept in `engines/`.

    Raises:
        ImportError: tensorrt is not installed.
        EngineBuildError: the parser or the builder failed (the message lists why).
    """
    options = EngineOptions(precision, workspace_mb=workspace_mb, max_batch=max_batch,
                            dla_core=dla_core)
    engine = trt_build.build_engine(bundle, options, device=device)
    log.info("built %s in %s", engine.name, bundle.engine_dir)
    return engine


# ----------------------------------------------------------------------------- first start


Builder = Callable[..., Path]


def prepare_backend(config: UnitConfig, device: Callable[[], DeviceInfo] = current_device,
                    builder: Builder = build_engine, retry: bool = False) -> str:
    """The backend the unit runs: ``engine`` when an engine for this device is cached or could
    be built now, else the config's ONNX Runtime fallback (with a logged warning)."""
    if config.backend != "engine":
        return config.backend
    fallback = config.fallback_backend
    if not config.bundle.is_dir():
        log.warning("%s: the engine backend needs an unpacked bundle folder to cache its engine; "
                    "falling back to ONNX Runtime backend %s", config.bundle, fallback)
        return fallback
    bundle = load_bundle(config.bundle)
    try:
        here = device()
    except (ImportError, RuntimeError, OSError) as exc:
        log.warning("TensorRT or the GPU is not usable here (%s: %s); falling back to ONNX "
                    "Runtime backend %s", type(exc).__name__, exc, fallback)
        return fallback
    try:
        engine = find_engine(bundle, config.precision, here)
    except EngineMismatchError as exc:
        log.info("no usable engine yet: %s", exc)
    else:
        log.info("using cached engine %s", engine.name)
        return "engine"
    return _build_once(bundle, config, here, builder, retry)


def _build_once(bundle: Bundle, config: UnitConfig, here: DeviceInfo, builder: Builder,
                retry: bool) -> str:
    fallback = config.fallback_backend
    marker = bundle.engine_dir / FAILED_MARKER
    key = _failure_key(bundle, config.precision, here)
    previous = _read_marker(marker)
    if previous is not None and previous.get("key") == key and not retry:
        log.warning("the TensorRT engine build failed before on this device (%s); running on "
                    "ONNX Runtime backend %s (delete %s to try again)", previous.get("error"),
                    fallback, marker)
        return fallback
    log.info("building the %s TensorRT engine for %s with TensorRT %s (once; it is cached)",
             config.precision, here.gpu_name, here.tensorrt_version)
    try:
        builder(bundle, precision=config.precision, max_batch=config.max_batch, device=here,
                workspace_mb=config.workspace_mb, dla_core=config.dla_core)
    except Exception as exc:  # noqa: BLE001 - any build failure falls back; logged and recorded
        error = f"{type(exc).__name__}: {exc}"
        log.warning("TensorRT engine build failed (%s); falling back to ONNX Runtime backend %s",
                    error, fallback)
        atomic_write_text(marker, json.dumps({"key": key, "error": error}, indent=2) + "\n")
        return fallback
    marker.unlink(missing_ok=True)
    return "engine"


def _failure_key(bundle: Bundle, precision: str, here: DeviceInfo) -> dict[str, str]:
    spec_file = engine_model(bundle, precision).file
    return {"tensorrt_version": here.tensorrt_version, "gpu_name": here.gpu_name,
            "compute_capability": here.compute_capability, "precision": precision,
            "onnx_sha256": bundle.manifest.files.get(spec_file, "")}


def _read_marker(marker: Path) -> dict[str, Any] | None:
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable (%s); ignoring it", marker, exc)
        return None
    return data if isinstance(data, dict) else None


def start(config: Path, retry_engine: bool = False, stop_after_s: float | None = None) -> int:
    """Start the unit: build the TensorRT engine on first start (or fall back), then watch.

    Args:
        config: the unit config file (naturelm-edge.conf).
        retry_engine: try the engine build again even if it failed before on this device.
        stop_after_s: stop watching after this many seconds (default: run until SIGTERM).
    """
    from runtime.watch import watch

    try:
        unit = read_config(config)
    except ManifestError as exc:
        print(f"naturelm-edge start: {exc}", file=sys.stderr)
        return 2
    handler = _log_to(unit.log_file)
    try:
        backend = prepare_backend(unit, retry=retry_engine)
    except ManifestError as exc:
        log.error("start: %s", exc)
        return 2
    finally:
        logging.getLogger("runtime").removeHandler(handler)
        handler.close()
    return watch(unit.bundle, unit.inbox, out=unit.outbox,
                 backend=backend,  # type: ignore[arg-type]  # checked by UnitConfig
                 precision=unit.precision if backend == "engine" else None,
                 policy=unit.policy,  # type: ignore[arg-type]  # checked by UnitConfig
                 done_dir=unit.done_dir,
                 settle_s=unit.settle_s, poll_s=unit.poll_s, batch_size=unit.max_batch,
                 decoders=unit.decoders,
                 threshold=unit.threshold, thresholds_file=unit.thresholds_file,
                 log_file=unit.log_file, stop_after_s=stop_after_s)


def _log_to(log_file: Path | None) -> logging.Handler:
    """Send the runtime's messages to `log_file` (stderr when None) during the first start."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("runtime")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.firstboot CONFIG [--retry-engine]`` (what the systemd unit runs)."""
    parser = argparse.ArgumentParser(
        prog="python -m runtime.firstboot",
        description="Start the unit: build the TensorRT engine on first start, then watch.")
    parser.add_argument("config", type=Path, help="the unit config file")
    parser.add_argument("--retry-engine", action="store_true",
                        help="retry an engine build that failed before on this device")
    parser.add_argument("--stop-after-s", type=float, default=None,
                        help="stop after this many seconds (default: until SIGTERM)")
    args = parser.parse_args(argv)
    return start(args.config, retry_engine=args.retry_engine, stop_after_s=args.stop_after_s)


if __name__ == "__main__":
    sys.exit(main())
