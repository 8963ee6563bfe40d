"""benchmarks.fixtures is the one tone bundle; shipped packages never import from tests."""

from __future__ import annotations

import ast
import doctest
import json
import subprocess
import sys
from pathlib import Path

import benchmarks.fixtures as fixtures
import tests.runtime.model_fixtures as model_fixtures

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("naturelm_edge", "runtime", "corpus", "teacher", "distill", "export", "benchmarks")


def _imports_of_tests(path: Path) -> list[str]:
    """Imports of ``tests`` in the module's code and in its docstring examples."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    examples = "\n".join(example.source for node in ast.walk(tree)
                         if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef
                                       | ast.AsyncFunctionDef)
                         and (doc := ast.get_docstring(node, clean=False))
                         for example in doctest.DocTestParser().get_examples(doc))
    found = [f"{path.relative_to(REPO)} (docstring example) imports {line.split()[1]}"
             for line in examples.splitlines()
             if line.split()[:1] in (["import"], ["from"]) and len(line.split()) > 1
             and line.split()[1].split(".")[0] == "tests"]
    for node in ast.walk(tree):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                 else [])
        found += [f"{path.relative_to(REPO)}:{node.lineno} imports {name}"
                  for name in names if name == "tests" or name.startswith("tests.")]
    return found


def test_no_shipped_module_imports_from_tests() -> None:
    bad = [hit for package in SHIPPED for path in sorted((REPO / package).rglob("*.py"))
           for hit in _imports_of_tests(path)]
    assert bad == []


def test_the_tests_use_the_one_implementation() -> None:
    for name in model_fixtures.__all__:
        assert getattr(model_fixtures, name) is getattr(fixtures, name), name


def test_watch_soak_runs_on_its_own_bundle_without_the_tests() -> None:
    code = ("import json, sys\n"
            "from benchmarks.watch_soak import soak\n"
            "result = soak(None, days=2, per_day=2, seconds=1.5, history=20, threads=1, every=1)\n"
            "print(json.dumps({'tests': sorted(m for m in sys.modules\n"
            "                                  if m.split('.')[0] == 'tests'),\n"
            "                  'rows': result['rows']}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tests"] == []
    # each recording holds one tone: one species and one detection row; the journal holds
    # the 20 recordings of the history and every recording of the month
    assert [row["detections"] for row in result["rows"]] == [4, 4]
    assert [row["journal_keys"] for row in result["rows"]] == [22, 24]
