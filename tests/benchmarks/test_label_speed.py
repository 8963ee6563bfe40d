"""`benchmarks.label_speed`: configurations parse, subsets keep whole clips (no timing here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.label_speed import parse_config, subset_manifest


def test_configurations_parse_and_bad_ones_are_named() -> None:
    assert parse_config("1x1") == (1, 1) and parse_config("2X1") == (2, 1)
    for bad in ("2", "0x1", "axb"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_config(bad)


def test_subset_takes_every_task_of_the_first_clips(tmp_path: Path) -> None:
    from corpus.manifest import read_manifest
    from tests.distill.test_label import make_corpus

    manifest = make_corpus(tmp_path / "corpus", clips=3)
    path, records, clips = subset_manifest(manifest, 2, tmp_path)
    chosen = read_manifest(path)
    assert (records, clips) == (4, 2) == (len(chosen), len({r.file_name for r in chosen}))
    assert [r.id for r in chosen] == [r.id for r in read_manifest(manifest)[:4]]
