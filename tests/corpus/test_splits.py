"""Splits by recording: no group crosses splits, fractions roughly met, deterministic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from corpus.records import Record
from corpus.splits import assign_splits, check_fractions, leaking_groups, split_counts
from corpus.tasks import instruction_for


def _records(n_recordings: int, seed: int = 1) -> list[Record]:
    """Recordings with 1 to 12 windows each, two tasks per window (like detection + species)."""
    rng = np.random.default_rng(seed)
    records = []
    for rec in range(n_recordings):
        for window in range(int(rng.integers(1, 13))):
            for task in ("detection", "species"):
                records.append(Record(id=f"rec{rec}_w{window}_{task}", task=task,
                                      instruction=instruction_for(task), output="Kea",
                                      file_name=f"/data/rec{rec}.wav", offset_s=10.0 * window,
                                      duration_s=10.0))
    return records


def test_no_recording_crosses_splits_and_fractions_are_roughly_met() -> None:
    records = _records(300)
    split = assign_splits(records, fractions=(0.7, 0.2, 0.1), seed=3)
    assert leaking_groups(split) == {}
    counts = split_counts(split)
    for name, target in zip(("train", "valid", "test"), (0.7, 0.2, 0.1), strict=True):
        assert abs(counts[name] / len(split) - target) < 0.03, counts
    # Order and identity are kept; only the split changes.
    assert [r.id for r in split] == [r.id for r in records]
    assert all(dataclasses.replace(a, split=b.split) == b
               for a, b in zip(records, split, strict=True))


def test_windows_of_one_recording_share_a_split_via_recording_field() -> None:
    records = [Record(id=f"c{i}", task="species", instruction=instruction_for("species"),
                      output="Tui", file_name=f"/clips/c{i}.wav", recording=f"tape{i % 7}")
               for i in range(70)]
    split = assign_splits(records, seed=0)
    assert leaking_groups(split) == {}
    assert len({r.split for r in split}) == 3


def test_deterministic_by_seed_and_seed_matters() -> None:
    records = _records(120)
    first = [r.split for r in assign_splits(records, seed=5)]
    again = [r.split for r in assign_splits(records, seed=5)]
    other = [r.split for r in assign_splits(records, seed=6)]
    assert first == again
    assert first != other


def test_existing_splits_are_replaced_and_zero_fraction_splits_stay_empty() -> None:
    records = [dataclasses.replace(r, split="test") for r in _records(50)]
    split = assign_splits(records, fractions=(0.9, 0.0, 0.1))
    counts = split_counts(split)
    assert "valid" not in counts
    assert counts["train"] > counts["test"] > 0


def test_leaking_groups_reports_a_leak() -> None:
    a = Record(id="a", task="species", instruction="x", output="Kea", recording="tape1")
    b = Record(id="b", task="species", instruction="x", output="Kea", recording="tape1",
               split="test")
    assert leaking_groups([a, b]) == {"tape1": {"train", "test"}}


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.1, -0.1, 0.0),
                                       (float("nan"), 0.5, 0.5)])
def test_bad_fractions_raise(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="fraction"):
        check_fractions(fractions)
    with pytest.raises(ValueError, match="fraction"):
        assign_splits(_records(3), fractions=fractions)
