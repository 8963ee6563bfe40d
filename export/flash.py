"""`naturelm-edge flash BUNDLE --target TARGET --out KIT`: an offline deployment kit.

The kit is a folder and a ``.tar.gz`` of it::

    KIT/
      bundle/             the verified bundle (no engines: they are built on the unit)
      wheelhouse/         naturelm-edge's own wheel and every dependency, for the target's
                          platform and Python (pip's own platform-specific download)
      requirements.txt    what install.sh installs from the wheelhouse
      naturelm-edge.conf  the unit config: bundle, inbox, outbox, backend, thresholds, logs
      naturelm-edge-watch.service   the systemd unit (runs `python -m runtime.firstboot`)
      install.sh          offline install into a venv, config, systemd unit, then doctor
      README.txt          what the kit holds and what the target needs from its OS
      kit.json            target, Python, platforms, wheels, bundle, build time
      SHA256SUMS          the sha256 of every other file (`sha256sum -c`, checked by install.sh)

Targets (`TARGETS`):

- ``jetson-orin``: aarch64, JetPack 6 (Ubuntu 22.04, glibc 2.35, Python 3.10). TensorRT, CUDA
  and their Python bindings come from JetPack (``apt install python3-libnvinfer``), never pip,
  and onnxruntime-gpu for Jetson is not on PyPI. The kit therefore ships PyPI's CPU
  onnxruntime for aarch64 plus cuda-python 12.2-12.6 (the native engine runner's CUDA
  bindings), makes the venv with ``--system-site-packages`` so JetPack's ``tensorrt`` is
  importable, and sets backend ``engine``: the first start builds the TensorRT engine on the
  unit, and falls back to ONNX Runtime on the CPU if that fails (runtime.firstboot).
- ``linux-gpu-x86_64``: a desktop NVIDIA GPU. onnxruntime-gpu replaces onnxruntime (the two
  cannot share a venv, so install.sh installs a pinned lock with ``--no-deps``), plus
  cuda-python; TensorRT comes from the system (NVIDIA's apt repository) through
  ``--system-site-packages``, or from the wheelhouse with ``extra_requirements``.
- ``cpu-x86_64`` and ``cpu-aarch64``: the base runtime on CPU ONNX Runtime (a Raspberry Pi
  class unit is ``cpu-aarch64``).

Building a kit needs the package registry (pip download); installing it needs no network.

    >>> TARGETS["jetson-orin"].platforms()[:2]
    ['manylinux_2_35_aarch64', 'manylinux_2_34_aarch64']
    >>> remote_commands(Path("kit.tar.gz"), "field@unit7:/srv/kits")[1]
    ['scp', '-q', 'kit.tar.gz', 'field@unit7:/srv/kits/kit.tar.gz']

    $ naturelm-edge flash runs/default/bundle --target jetson-orin --out runs/kit-orin \\
          --inbox /data/inbox --outbox /data/detections --to field@unit7:kits
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from runtime.bundle import MANIFEST, bundle_files, load_bundle, sha256_file, verify_bundle
from runtime.errors import ManifestError
from runtime.firstboot import UnitConfig, config_text

REPO = Path(__file__).resolve().parents[1]
SUMS = "SHA256SUMS"
KIT_JSON = "kit.json"
CONFIG_FILE = "naturelm-edge.conf"
SERVICE_FILE = "naturelm-edge-watch.service"
PACKAGE = "naturelm-edge"
TargetName = Literal["jetson-orin", "linux-gpu-x86_64", "cpu-x86_64", "cpu-aarch64"]


@dataclass(frozen=True)
class Target:
    """One kind of field unit: where its wheels come from and how the unit runs."""

    name: str
    arch: str
    glibc: str
    requirements: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    system_site_packages: bool = False
    backend: str = "cpu"
    fallback_backend: str = "cpu"
    notes: str = ""

    def platforms(self, glibc: str | None = None) -> list[str]:
        """pip ``--platform`` tags, newest first: every manylinux_2_N from the unit's glibc
        down to 2.17, and the legacy aliases (pip does not expand manylinux_2_N itself)."""
        major, minor = (int(x) for x in (glibc or self.glibc).split("."))
        if major != 2 or minor < 17:
            raise ValueError(f"glibc {glibc or self.glibc} is not a manylinux glibc (2.17 or "
                             f"newer)")
        tags = [f"manylinux_2_{n}_{self.arch}" for n in range(minor, 16, -1)]
        return tags + [f"manylinux2014_{self.arch}"]


TARGETS: dict[str, Target] = {
    "jetson-orin": Target(
        "jetson-orin", "aarch64", "2.35", requirements=("cuda-python>=12.2,<12.7",),
        system_site_packages=True, backend="engine", fallback_backend="cpu",
        notes="Jetson Orin, JetPack 6.x (Ubuntu 22.04, Python 3.10). Before install.sh: "
              "sudo apt install python3-venv python3-libnvinfer (TensorRT's Python bindings "
              "from JetPack; not on PyPI for Jetson). onnxruntime here is PyPI's CPU build "
              "(onnxruntime-gpu for Jetson is not on PyPI); inference runs on the native "
              "TensorRT engine that the first start builds for this GPU, or on the CPU if "
              "that build fails."),
    "linux-gpu-x86_64": Target(
        "linux-gpu-x86_64", "x86_64", "2.31",
        requirements=("onnxruntime-gpu>=1.17", "cuda-python>=12,<13"), exclude=("onnxruntime",),
        system_site_packages=True, backend="engine", fallback_backend="cuda",
        notes="Desktop Linux with an NVIDIA GPU, driver, CUDA 12 and cuDNN 9 libraries. "
              "onnxruntime-gpu replaces onnxruntime. For the native engine backend install "
              "TensorRT 10 system-wide (NVIDIA's apt repository: python3-libnvinfer) or build "
              "the kit with extra requirement tensorrt-cu12; otherwise the unit runs on ONNX "
              "Runtime's CUDA provider."),
    "cpu-x86_64": Target(
        "cpu-x86_64", "x86_64", "2.31",
        notes="CPU-only Linux x86_64 (glibc 2.31+, e.g. Ubuntu 20.04 or Debian 11 and newer)."),
    "cpu-aarch64": Target(
        "cpu-aarch64", "aarch64", "2.31",
        notes="CPU-only Linux aarch64 (e.g. a Raspberry Pi 4/5 on a 64-bit OS, glibc 2.31+)."),
}


# ----------------------------------------------------------------------------- commands


def wheel_command(project: Path, dest: Path) -> list[str]:
    """``pip wheel --no-deps`` of naturelm-edge itself."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
            "--wheel-dir", str(dest), str(project)]


def download_command(target: Target, python: str, wheelhouse: Path, requirements: list[str],
                     glibc: str | None = None) -> list[str]:
    """``pip download`` of `requirements` (and their dependencies) as binary wheels for the
    target's platform and CPython `python`; the wheelhouse is also searched (our own wheel)."""
    platforms = [arg for tag in target.platforms(glibc) for arg in ("--platform", tag)]
    return [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
            *platforms, "--python-version", python, "--implementation", "cp",
            "--dest", str(wheelhouse), "--find-links", str(wheelhouse), *requirements]


def parse_remote(to: str) -> tuple[str, str]:
    """Split ``[user@]host:PATH``; PATH may be relative to the remote home but must be plain
    (letters, digits, ``._/+-``) so scp and the remote shell read it the same way."""
    match = re.fullmatch(r"((?:[A-Za-z0-9._-]+@)?[A-Za-z0-9.-]+):([A-Za-z0-9._/+-]+)", to)
    if match is None:
        raise ValueError(f"--to {to!r}: expected [user@]host:PATH with a plain PATH "
                         f"(letters, digits and ._/+-)")
    return match.group(1), match.group(2).rstrip("/") or "/"


def remote_commands(archive: Path, to: str) -> list[list[str]]:
    """The ssh / scp commands that copy the kit archive to `to`, unpack it there and check its
    sha256 sums: mkdir, scp, then extract and verify."""
    host, path = parse_remote(to)
    name = archive.name
    folder = name.removesuffix(".tar.gz")
    q = shlex.quote
    return [["ssh", host, f"mkdir -p {q(path)}"],
            ["scp", "-q", str(archive), f"{host}:{path}/{name}"],
            ["ssh", host, f"cd {q(path)} && tar -xzf {q(name)} && cd {q(folder)} && "
                          f"sha256sum --quiet --check {SUMS}"]]


# ----------------------------------------------------------------------------- the kit


def wheel_name_version(path: Path) -> tuple[str, str]:
    """Normalised project name and version from a wheel file name."""
    parts = path.name.split("-")
    if len(parts) < 5 or path.suffix != ".whl":
        raise ValueError(f"{path.name}: not a wheel file name")
    return re.sub(r"[-_.]+", "-", parts[0]).lower(), parts[1]


def requirements_text(wheelhouse: Path, target: Target, version: str) -> tuple[str, bool]:
    """What install.sh installs, and whether it installs with ``--no-deps``: the package and
    the target's extras (resolved offline), or, when the target excludes a dependency (the
    GPU target's onnxruntime), every wheel pinned."""
    if not target.exclude:
        lines = [f"{PACKAGE}=={version}", *target.requirements]
        return "\n".join(lines) + "\n", False
    pins = sorted("==".join(wheel_name_version(w)) for w in wheelhouse.glob("*.whl"))
    return "\n".join(pins) + "\n", True


def unit_service(target: Target, config: UnitConfig) -> str:
    """The systemd unit; install.sh fills in @PREFIX@, @CONFIG@ and @USER@."""
    mounts = " ".join(str(p) for p in (config.inbox, config.outbox))
    return f"""# naturelm-edge watch for a {target.name} unit; installed by install.sh.
# The first start builds the TensorRT engine for this GPU (minutes, once) when the backend
# is `engine`; later starts reuse it. Logs: the log_file of @CONFIG@.
[Unit]
Description=naturelm-edge watch: analyse field recordings as they arrive
After=local-fs.target
RequiresMountsFor={mounts}

[Service]
Type=simple
User=@USER@
ExecStart=@PREFIX@/venv/bin/python -m runtime.firstboot @CONFIG@
# SIGTERM stops between windows; the journal makes the next start pick up where it stopped.
KillSignal=SIGTERM
TimeoutStopSec=60
Restart=on-failure
RestartSec=30
Nice=5

[Install]
WantedBy=multi-user.target
"""


def install_script(target: Target, python: str, no_deps: bool) -> str:
    """install.sh: verify the kit, make the venv, install offline, install bundle, config and
    systemd unit, then run doctor. Paths and the user come from the environment."""
    site = "--system-site-packages " if target.system_site_packages else ""
    deps = "--no-deps " if no_deps else ""
    return f"""#!/usr/bin/env bash
# Offline installer of a naturelm-edge kit for {target.name} (CPython {python}).
# Usage: sudo ./install.sh   (no network needed)
# Environment: PREFIX (/opt/naturelm-edge), CONFIG_DIR (/etc/naturelm-edge),
#   SYSTEMD_DIR (/etc/systemd/system), PYTHON (python3), SERVICE_USER (naturelm),
#   SKIP_SYSTEMD=1 to install without the systemd unit (tests, containers).
set -euo pipefail
KIT="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
PREFIX="${{PREFIX:-/opt/naturelm-edge}}"
CONFIG_DIR="${{CONFIG_DIR:-/etc/naturelm-edge}}"
SYSTEMD_DIR="${{SYSTEMD_DIR:-/etc/systemd/system}}"
PYTHON="${{PYTHON:-python3}}"
SERVICE_USER="${{SERVICE_USER:-naturelm}}"
SKIP_SYSTEMD="${{SKIP_SYSTEMD:-0}}"
CONFIG="$CONFIG_DIR/{CONFIG_FILE}"

echo "naturelm-edge: checking the kit's sha256 sums"
(cd "$KIT" && sha256sum --quiet --check {SUMS}) || {{
    echo "naturelm-edge: the kit is damaged or was changed; copy it again" >&2; exit 1; }}
HAVE="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$HAVE" != "{python}" ]; then
    echo "naturelm-edge: this kit holds wheels for Python {python}, but $PYTHON is $HAVE;" \\
         "set PYTHON=python{python} or rebuild the kit with --python $HAVE" >&2
    exit 1
fi

echo "naturelm-edge: creating $PREFIX/venv and installing from the wheelhouse (offline)"
mkdir -p "$PREFIX"
"$PYTHON" -m venv {site}"$PREFIX/venv"
PIP_CONFIG_FILE=/dev/null "$PREFIX/venv/bin/python" -m pip install --isolated --quiet \\
    --disable-pip-version-check --no-index --find-links "$KIT/wheelhouse" {deps}\\
    -r "$KIT/requirements.txt"

echo "naturelm-edge: installing the bundle in $PREFIX/bundle"
rm -rf "$PREFIX/bundle.new"
cp -R "$KIT/bundle" "$PREFIX/bundle.new"
if [ -d "$PREFIX/bundle/engines" ]; then
    # Engines are checked against the ONNX sha256 on use, so old ones are safe to keep.
    mv "$PREFIX/bundle/engines" "$PREFIX/bundle.new/engines"
fi
mkdir -p "$PREFIX/bundle.new/engines"
rm -rf "$PREFIX/bundle.old"
if [ -d "$PREFIX/bundle" ]; then mv "$PREFIX/bundle" "$PREFIX/bundle.old"; fi
mv "$PREFIX/bundle.new" "$PREFIX/bundle"
rm -rf "$PREFIX/bundle.old"

mkdir -p "$CONFIG_DIR"
NEW_CONFIG="$CONFIG"
if [ -e "$CONFIG" ]; then
    NEW_CONFIG="$CONFIG.new"
    echo "naturelm-edge: keeping $CONFIG; the kit's config is in $NEW_CONFIG"
fi
sed "s#^bundle = .*#bundle = $PREFIX/bundle#" "$KIT/{CONFIG_FILE}" > "$NEW_CONFIG"
FOLDERS="$("$PREFIX/venv/bin/python" -c 'import sys, runtime.firstboot as f
c = f.read_config(sys.argv[1]); print(c.inbox); print(c.outbox)' "$CONFIG")"
while IFS= read -r folder; do mkdir -p "$folder"; done <<< "$FOLDERS"

if [ "$SKIP_SYSTEMD" != "1" ]; then
    if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
    while IFS= read -r folder; do chown -R "$SERVICE_USER" "$folder"; done <<< "$FOLDERS"
    chown -R "$SERVICE_USER" "$PREFIX/bundle/engines"
    sed -e "s#@PREFIX@#$PREFIX#g" -e "s#@CONFIG@#$CONFIG#g" -e "s#@USER@#$SERVICE_USER#g" \\
        "$KIT/{SERVICE_FILE}" > "$SYSTEMD_DIR/{SERVICE_FILE}"
    systemctl daemon-reload
    systemctl enable {SERVICE_FILE}
    echo "naturelm-edge: start it with: sudo systemctl start {SERVICE_FILE}"
fi

echo "naturelm-edge: doctor"
"$PREFIX/venv/bin/python" -c 'import sys, runtime.doctor as d
sys.exit(d.doctor(config=sys.argv[1]))' "$CONFIG" \\
    || echo "naturelm-edge: doctor reported a problem (see above)"
echo "naturelm-edge: installed in $PREFIX"
"""


def readme_text(target: Target, python: str, bundle_name: str, version: str) -> str:
    return (f"naturelm-edge {version} offline kit for {target.name} (CPython {python}), "
            f"bundle {bundle_name}.\n\n{target.notes}\n\n"
            f"Install on the unit (no network needed):\n"
            f"  sha256sum -c {SUMS}      # install.sh checks this too\n"
            f"  sudo ./install.sh\n"
            f"  sudo nano /etc/naturelm-edge/{CONFIG_FILE}   # inbox, outbox, thresholds\n"
            f"  sudo systemctl start {SERVICE_FILE}\n"
            f"Check the unit at any time:\n"
            f"  /opt/naturelm-edge/venv/bin/python -c 'from runtime.doctor import doctor; "
            f"doctor(config=\"/etc/naturelm-edge/{CONFIG_FILE}\")'\n")


def write_sums(kit: Path) -> Path:
    """Write SHA256SUMS (sha256sum format) for every file in `kit` but itself."""
    lines = [f"{sha256_file(kit / rel)}  {rel}" for rel in _kit_files(kit)]
    path = kit / SUMS
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _kit_files(kit: Path) -> list[str]:
    return sorted(p.relative_to(kit).as_posix() for p in kit.rglob("*")
                  if p.is_file() and p.relative_to(kit).as_posix() != SUMS)


def verify_kit(kit: Path) -> list[str]:
    """Every problem with a kit folder (empty when sound): missing SHA256SUMS, missing,
    changed or unlisted files."""
    sums = kit / SUMS
    if not sums.is_file():
        return [f"{sums}: missing; not a naturelm-edge kit"]
    listed: dict[str, str] = {}
    for number, line in enumerate(sums.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            return [f"{sums}:{number}: malformed line {line!r}"]
        listed[rel] = digest
    problems = []
    for rel, digest in listed.items():
        path = kit / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in {SUMS} but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: sha256 mismatch: the file was changed or damaged")
    problems += [f"{rel}: not listed in {SUMS}" for rel in _kit_files(kit) if rel not in listed]
    return problems


def kit_tar(kit: Path) -> Path:
    """Pack `kit` into ``<kit>.tar.gz`` (entries under the kit's name, install.sh
    executable, zeroed owners), written beside it and renamed into place."""
    archive = kit.with_name(kit.name + ".tar.gz")
    fd, tmp = tempfile.mkstemp(dir=kit.parent, prefix=f".{archive.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            for rel in [SUMS, *_kit_files(kit)]:
                data = (kit / rel).read_bytes()
                info = tarfile.TarInfo(f"{kit.name}/{rel}")
                info.size, info.mtime = len(data), 0
                info.mode = 0o755 if rel == "install.sh" else 0o644
                tar.addfile(info, io.BytesIO(data))
        os.chmod(tmp, 0o644)
        os.replace(tmp, archive)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return archive


def _copy_bundle(bundle: Path, dest: Path) -> tuple[str, str]:
    """Verify `bundle` (folder or .tar.gz) and copy its listed files (no engines) to `dest`."""
    problems = verify_bundle(bundle)
    if problems:
        raise ManifestError(bundle, "the bundle does not verify; not flashing it: "
                                    + "; ".join(problems))
    with tempfile.TemporaryDirectory(prefix="naturelm-flash-") as tmp:
        loaded = load_bundle(bundle, extract_to=tmp)
        for rel in [MANIFEST, *bundle_files(loaded.root)]:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(loaded.root / rel, dest / rel)
    return loaded.manifest.name, loaded.manifest.version


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {shlex.join(command)}\n"
                           f"{result.stderr.strip()[-3000:]}")


def build_own_wheel(project: Path, dest: Path) -> Path:
    """naturelm-edge's wheel from a source tree, built from a clean copy so the checkout
    gets no build/ or .egg-info."""
    if not (project / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{project}: no pyproject.toml; pass --project SOURCE_TREE or "
                                f"--wheel naturelm_edge-*.whl")
    skip = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info",
                                  "__pycache__", ".pytest_cache", ".ruff_cache", "tests")
    with tempfile.TemporaryDirectory(prefix="naturelm-wheel-") as tmp:
        source = Path(tmp) / "src"
        shutil.copytree(project, source, ignore=skip)
        _run(wheel_command(source, dest), "building the naturelm-edge wheel")
    wheels = sorted(dest.glob("naturelm_edge-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"{dest}: expected one naturelm_edge wheel, found {len(wheels)}")
    return wheels[0]


def flash(
    bundle: Path,
    *,
    target: TargetName,
    out: Path,
    python: str = "3.10",
    to: str | None = None,
    inbox: Path = Path("/data/inbox"),
    outbox: Path = Path("/data/detections"),
    backend: Literal["engine", "tensorrt", "cuda", "cpu"] | None = None,
    precision: Literal["fp32", "fp16", "int8"] = "fp16",
    threshold: float | None = None,
    policy: Literal["leave", "move", "delete"] = "leave",
    done_dir: Path | None = None,
    log_file: Path = Path("/var/log/naturelm-edge/watch.log"),
    rate: int = 48000,
    channels: int = 1,
    bits: int = 16,
    glibc: str | None = None,
    extra_requirements: list[str] | None = None,
    project: Path | None = None,
    wheel: Path | None = None,
) -> int:
    """Build an offline deployment kit (folder + .tar.gz) for one kind of field unit.

    ``target`` and ``out`` are keyword-only: on the command line they are ``--target`` and
    ``--out`` (required flags).

    Args:
        bundle: the bundle folder or .tar.gz (verified before anything is built).
        target: jetson-orin, linux-gpu-x86_64, cpu-x86_64 or cpu-aarch64.
        out: the kit folder to create (must not exist or be empty); the archive goes beside.
        python: the unit's CPython version, major.minor (JetPack 6: 3.10).
        to: copy the kit over ssh to [user@]host:PATH and check it there.
        inbox: where the unit's recorder writes recordings.
        outbox: where detections go on the unit.
        backend: engine, tensorrt, cuda or cpu (default: the target's).
        precision: TensorRT engine precision built on the unit.
        threshold: one threshold for every task and label (default: the bundle's).
        policy: what happens to analysed recordings: leave, move or delete.
        done_dir: where policy move puts them.
        log_file: the watch daemon's rotating log on the unit.
        rate: the recorder's sample rate (doctor's days-of-recording figure).
        channels: the recorder's channels.
        bits: the recorder's bits per sample.
        glibc: the unit's glibc, major.minor (default: the target's).
        extra_requirements: more requirements for the wheelhouse (e.g. tensorrt-cu12).
        project: naturelm-edge source tree to build the wheel from (default: this checkout).
        wheel: a prebuilt naturelm_edge wheel instead of building one.
    """
    spec = TARGETS.get(target)
    if spec is None:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise ValueError(f"--python {python!r}: expected a CPython version like 3.10")
    if to is not None:
        parse_remote(to)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose another --out")
    unit = UnitConfig(inbox=inbox, outbox=outbox, backend=backend or spec.backend,
                      fallback_backend=spec.fallback_backend, precision=precision,
                      threshold=threshold, policy=policy, done_dir=done_dir, log_file=log_file,
                      rate=rate, channels=channels, bits=bits,
                      built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    kit = _build_kit(bundle, spec, out, python, unit, glibc, extra_requirements or [],
                     project or REPO, wheel)
    archive = kit_tar(kit)
    size = archive.stat().st_size / 2**20
    print(f"{kit}: kit for {spec.name} (CPython {python}); {archive} ({size:.1f} MiB)")
    if to is not None:
        for command in remote_commands(archive, to):
            _run(command, f"copying the kit to {to}")
        host, path = parse_remote(to)
        print(f"copied and checked on {host}: ssh {host} 'sudo {path}/{kit.name}/install.sh'")
    return 0


def _build_kit(bundle: Path, spec: Target, out: Path, python: str, unit: UnitConfig,
               glibc: str | None, extra: list[str], project: Path, wheel: Path | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    name, bundle_version = _copy_bundle(bundle, out / "bundle")
    wheelhouse = out / "wheelhouse"
    wheelhouse.mkdir()
    if wheel is not None:
        own = Path(shutil.copy2(wheel, wheelhouse / wheel.name))
    else:
        own = build_own_wheel(project, wheelhouse)
    _, version = wheel_name_version(own)
    requirements = [f"{PACKAGE}=={version}", *spec.requirements, *extra]
    _run(download_command(spec, python, wheelhouse, requirements, glibc),
         f"downloading wheels for {spec.name} (CPython {python})")
    for excluded in spec.exclude:
        for path in wheelhouse.glob("*.whl"):
            if wheel_name_version(path)[0] == excluded:
                path.unlink()
    text, no_deps = requirements_text(wheelhouse, dataclasses.replace(
        spec, requirements=(*spec.requirements, *extra)), version)
    (out / "requirements.txt").write_text(text, encoding="utf-8")
    (out / CONFIG_FILE).write_text(config_text(unit), encoding="utf-8")
    (out / SERVICE_FILE).write_text(unit_service(spec, unit), encoding="utf-8")
    script = out / "install.sh"
    script.write_text(install_script(spec, python, no_deps), encoding="utf-8")
    script.chmod(0o755)
    (out / "README.txt").write_text(readme_text(spec, python, name, version), encoding="utf-8")
    wheels = sorted(p.name for p in wheelhouse.glob("*.whl"))
    meta = {"target": spec.name, "python": python, "glibc": glibc or spec.glibc,
            "platforms": spec.platforms(glibc), "naturelm_edge": version,
            "bundle": {"name": name, "version": bundle_version}, "built_at": unit.built_at,
            "no_deps_install": no_deps, "wheels": wheels}
    (out / KIT_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    write_sums(out)
    return out
