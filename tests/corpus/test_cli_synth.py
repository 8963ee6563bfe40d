"""`naturelm-edge corpus synth` and `corpus baseline` end to end through the console script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corpus.manifest import read_manifest
from corpus.synth import read_config
from naturelm_edge.cli import main
from runtime.raven import read_raven_table


def test_synth_then_baseline_through_the_cli(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "corpus"
    code = main(["corpus", "synth", "--out", str(out), "--seed", "5", "--clips", "30",
                 "--clip-s", "2", "--clips-per-recording", "3", "--soundscape-min", "0.2",
                 "--species", "8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "30 clips" in printed and "clips per split" in printed and "soundscape" in printed
    config = read_config(out)
    assert (config.seed, config.clips, config.clip_s, config.species) == (5, 30, 2.0, 8)
    records = read_manifest(out / "manifest.jsonl")
    assert {r.split for r in records} == {"train", "valid", "test"}
    assert all(Path(r.file_name).is_file() for r in records)
    assert read_raven_table(out / "soundscape.selections.txt")

    code = main(["corpus", "baseline", str(out / "manifest.jsonl"), "--steps", "100"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["task", "metric", "baseline", "chance"]
    figures = json.loads(lines[-1])["baseline"]
    assert figures["species"]["metric"] == "accuracy"
    assert 0.0 <= figures["detection"]["score"] <= 1.0


def test_synth_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["corpus", "synth", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--soundscape-min" in text and "--clips" in text and "--seed" in text


def test_baseline_on_a_missing_manifest_names_it(tmp_path: Path) -> None:
    from runtime.errors import ManifestError

    with pytest.raises(ManifestError, match="nothing.jsonl"):
        main(["corpus", "baseline", str(tmp_path / "nothing.jsonl")])
