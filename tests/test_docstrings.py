"""Every module's docstring example runs (DESIGN.md: a module docstring with a runnable example)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("naturelm_edge", "runtime", "corpus", "teacher", "distill", "export", "benchmarks")
# Modules whose import needs hardware libraries absent from CI.
HARDWARE = ("runtime.trt_runner", "export.engine")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        names += [f"{package}.{m.name}" for m in pkgutil.walk_packages([str(REPO / package)])]
    return [n for n in names if n not in HARDWARE and not n.endswith("__main__")]


@pytest.mark.parametrize("name", _modules())
def test_module_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no module docstring"
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} docstring example(s) failed"
