"""The layering in DESIGN.md: the runtime never imports torch or the workstation packages."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import runtime

WORKSTATION = ("torch", "lightning", "transformers", "peft", "corpus", "teacher", "distill",
               "export", "benchmarks")


def _runtime_modules() -> list[str]:
    root = Path(runtime.__file__).parent
    return ["runtime"] + [f"runtime.{m.name}" for m in pkgutil.walk_packages([str(root)])]


def test_importing_every_runtime_module_pulls_in_no_workstation_package() -> None:
    modules = _runtime_modules()
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    if m.endswith('_trt') or m.endswith('tensorrt_runner'):\n"
        "        continue\n"
        "    importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {WORKSTATION!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"runtime imported: {out.stdout.strip()}"


def test_cli_help_imports_no_torch() -> None:
    code = ("import sys\nfrom naturelm_edge.cli import main\nmain(['--help'])\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")
