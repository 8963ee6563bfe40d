"""The console script: typed functions become parsers; missing extras give one clear line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import pytest

from naturelm_edge import cli


def _example(source: Path, *, target: str, out: Path | None = None, seed: int = 0, rate: float = 1.5,
             tasks: list[str] | None = None, mode: Literal["a", "b"] = "a",
             resume: bool = True) -> int:
    """Do an example thing.

    Args:
        source: where to read.
        out: where to write; it
            wraps onto a second line.
        seed: random seed.
    """
    return 0


def test_parser_follows_signature_types_and_docstring() -> None:
    parser = cli.parser_for(_example, "x")
    args = parser.parse_args(["in.wav", "--target", "t", "--out", "o", "--seed", "3", "--rate", "2",
                              "--tasks", "species", "count", "--mode", "b", "--no-resume"])
    assert vars(args) == {"source": Path("in.wav"), "target": "t", "out": Path("o"), "seed": 3, "rate": 2.0,
                          "tasks": ["species", "count"], "mode": "b", "resume": False}
    assert vars(parser.parse_args(["in.wav", "--target", "t"]))["resume"] is True
    with pytest.raises(SystemExit):
        parser.parse_args(["in.wav"])  # --target is required
    text = parser.format_help()
    assert "Do an example thing." in text
    assert "wraps onto a second line" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["in.wav", "--mode", "c"])


def test_unknown_command_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["no-such-command"]) == 2
    assert "usage: naturelm-edge" in capsys.readouterr().err
    assert cli.main([]) == 0


def test_missing_workstation_dependency_names_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "needs_torch_mod.py").write_text("import torch_not_installed_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli._EXTRA_OF_MODULE, "torch_not_installed_here", "train")
    monkeypatch.setitem(cli.COMMANDS, "fake fit", cli.Command("needs_torch_mod:fit"))
    assert cli.main(["fake", "fit"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "pip install 'naturelm-edge[train]'" in err
    sys.modules.pop("needs_torch_mod", None)


def test_every_table_entry_names_an_importable_typed_function() -> None:
    for words, command in cli.COMMANDS.items():
        func = cli._load(command, words)
        assert callable(func), words
        if not command.passthrough:
            cli.parser_for(func, words)
