"""Activations, threshold resolution, top-k, label lists and merging of detections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.errors import ManifestError
from runtime.postprocess import (
    Detection,
    Thresholds,
    activate,
    check_labels,
    load_label_list,
    load_thresholds,
    merge_consecutive,
    select,
)

LABELS = ("Kea", "Tui", "Ruru")


def test_activations_match_their_definitions() -> None:
    logits = np.array([[1.0, -2.0, 0.5], [800.0, 0.0, -800.0]])
    soft = activate(logits, "softmax")
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(soft[0], np.exp(logits[0]) / np.exp(logits[0]).sum(), rtol=1e-6)
    sig = activate(logits, "sigmoid")
    np.testing.assert_allclose(sig[0], 1 / (1 + np.exp(-logits[0])), rtol=1e-6)
    assert np.isfinite(sig).all() and sig[1, 0] == 1.0 and sig[1, 2] == 0.0
    with pytest.raises(ValueError, match="unknown activation"):
        activate(logits, "relu")


def test_thresholds_resolve_most_specific_first(tmp_path: Path) -> None:
    path = tmp_path / "th.csv"
    path.write_text("task,label,threshold\nspecies,,0.3\n*,Tui,0.2\nspecies,Ruru,0.9\n")
    rules = load_thresholds(path, Thresholds(defaults={"species": 0.5, "detection": 0.6},
                                             global_=0.4))
    assert rules.threshold("species", "Ruru") == 0.9  # task + label
    assert rules.threshold("detection", "Tui") == 0.2  # label in any task
    assert rules.threshold("species", "Kea") == 0.3  # task
    assert rules.threshold("detection", "Kea") == 0.4  # global
    assert Thresholds(defaults={"detection": 0.6}).threshold("detection", "Kea") == 0.6
    with pytest.raises(KeyError, match="not one of the bundle's tasks"):
        Thresholds(defaults={"detection": 0.6}).threshold("count", "Kea")


@pytest.mark.parametrize("body, message", [
    ("task,label\nspecies,Kea\n", "header must be"),
    ("task,label,threshold\nspecies,Kea,high\n", r"th\.csv:2: threshold 'high'"),
    ("task,label,threshold\nspecies,Kea,0.5\nspecies,Tui,1.5\n", r"th\.csv:3: .* not in \[0, 1\]"),
])
def test_bad_threshold_files_name_file_and_line(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "th.csv"
    path.write_text(body)
    with pytest.raises(ManifestError, match=message):
        load_thresholds(path, Thresholds())


def test_select_applies_thresholds_lists_and_top_k() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.95, 0.7]], dtype=np.float32)
    starts, ends = np.array([0.0, 3.0]), np.array([3.0, 6.0])
    rules = Thresholds(defaults={"species": 0.5})
    rows = select("r.wav", starts, ends, "species", LABELS, scores, rules)
    assert [(d.start_s, d.label) for d in rows] == [(0.0, "Kea"), (0.0, "Tui"), (3.0, "Tui"),
                                                    (3.0, "Ruru")]
    top1 = select("r.wav", starts, ends, "species", LABELS, scores, rules, top_k=1)
    assert [d.label for d in top1] == ["Kea", "Tui"]
    only = select("r.wav", starts, ends, "species", LABELS, scores, rules, include={"Ruru"})
    assert [d.label for d in only] == ["Ruru"]
    # top-k is taken among the allowed labels only
    no_kea = select("r.wav", starts, ends, "species", LABELS, scores, rules, top_k=1,
                    exclude={"Kea"})
    assert [(d.start_s, d.label) for d in no_kea] == [(0.0, "Tui"), (3.0, "Tui")]
    assert rows[0] == Detection("r.wav", 0.0, 3.0, "species", "Kea", pytest.approx(0.9))
    with pytest.raises(ValueError, match="do not match"):
        select("r.wav", starts, ends, "species", LABELS[:2], scores, rules)


def test_merge_joins_touching_windows_of_one_label_only() -> None:
    rows = [Detection("a", 0, 3, "s", "Kea", 0.6), Detection("a", 3, 6, "s", "Kea", 0.9),
            Detection("a", 9, 12, "s", "Kea", 0.7), Detection("a", 3, 6, "s", "Tui", 0.8),
            Detection("b", 6, 9, "s", "Kea", 0.5)]
    merged = merge_consecutive(rows)
    assert [(d.file, d.start_s, d.end_s, d.label, d.score) for d in merged] == [
        ("a", 0, 6, "Kea", 0.9), ("a", 3, 6, "Tui", 0.8), ("a", 9, 12, "Kea", 0.7),
        ("b", 6, 9, "Kea", 0.5)]
    assert len(merge_consecutive(rows, gap_s=3.0)) == 3


def test_label_lists(tmp_path: Path) -> None:
    path = tmp_path / "keep.txt"
    path.write_text("# my site\nKea\n\nTui  # common\n")
    assert load_label_list(path) == {"Kea", "Tui"}
    check_labels({"Kea"}, LABELS, "--include")
    with pytest.raises(ManifestError, match="unknown label.*'Kaa'"):
        check_labels({"Kaa"}, LABELS, "--include")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ManifestError, match="empty"):
        load_label_list(tmp_path / "empty.txt")
