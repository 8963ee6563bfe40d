"""The BEANS-Zero-style metrics against independent references (torchmetrics, a recursive edit
distance) and the snapping rules."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import (
    binary_average_precision,
    multilabel_f1_score,
)

from teacher.eval import (
    accuracy,
    average_precision,
    format_table,
    levenshtein,
    macro_f1,
    majority_rate,
    mean_average_precision,
    multi_hot,
    results_to_json,
    score_detection,
    score_single,
    snap,
    snap_multi,
)


def _reference_distance(a: str, b: str) -> int:
    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_levenshtein_matches_recursive_definition() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 9)))
        assert levenshtein(a, b) == _reference_distance(a, b), (a, b)


def test_snap_is_case_insensitive_and_picks_nearest() -> None:
    labels = ["Common Blackbird", "Song Thrush", "None"]
    assert snap("song thrush", labels) == "Song Thrush"
    assert snap("  Comon Blackbird ", labels) == "Common Blackbird"
    assert snap("", ["Kea", "Tui"]) == "Kea"  # ties go to the first label
    with pytest.raises(ValueError, match="empty label set"):
        snap("x", [])


def test_snap_multi_drops_none_and_duplicates() -> None:
    labels = ["Kea", "Tui", "None"]
    assert snap_multi("None", labels) == []
    assert snap_multi("", labels) == []
    assert snap_multi("Tui, tui, Kea", labels) == ["Kea", "Tui"]


def test_accuracy_and_majority() -> None:
    assert accuracy(["a", "b", "c"], ["a", "b", "b"]) == pytest.approx(2 / 3)
    assert majority_rate(["a", "b", "b", "b"]) == 0.75
    with pytest.raises(ValueError, match="2 predictions for 1"):
        accuracy(["a", "b"], ["a"])


def test_macro_f1_matches_torchmetrics() -> None:
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c", "d"]
    true = rng.random((40, 4)) < 0.4
    pred = rng.random((40, 4)) < 0.4
    true[0] = True  # every label occurs, so both definitions agree on every label
    to_sets = [[labels[j] for j in np.flatnonzero(row)] for row in pred]
    true_sets = [[labels[j] for j in np.flatnonzero(row)] for row in true]
    ours = macro_f1(to_sets, true_sets, labels)
    ref = multilabel_f1_score(torch.tensor(pred, dtype=torch.float32),
                              torch.tensor(true, dtype=torch.long), num_labels=4,
                              average="macro", threshold=0.5)
    assert ours == pytest.approx(float(ref), abs=1e-6)


def test_average_precision_matches_torchmetrics() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        scores = rng.normal(size=50)
        positives = rng.random(50) < 0.3
        positives[0] = True
        ref = binary_average_precision(torch.tensor(scores), torch.tensor(positives).long())
        assert average_precision(scores, positives) == pytest.approx(float(ref), abs=1e-6)


def test_map_of_perfect_and_constant_scores() -> None:
    truth = np.array([[1, 0], [0, 1], [1, 0], [0, 0]], dtype=float)
    assert mean_average_precision(truth, truth) == 1.0
    # constant scores rank positives last among ties: AP is the prevalence-ish lower bound
    constant = mean_average_precision(np.zeros_like(truth), truth)
    assert constant < 0.6


def test_multi_hot_rejects_unknown_label() -> None:
    with pytest.raises(ValueError, match="'Moa' is not in the label set"):
        multi_hot([["Moa"]], ["Kea"])


def test_score_detection_with_and_without_scores() -> None:
    labels = ["Kea", "Tui", "None"]
    answers = ["Kea", "None", "Tui, Kea", "Tui"]
    truth = [["Kea"], [], ["Kea", "Tui"], ["Kea"]]
    result = score_detection("detection", answers, truth, labels)
    assert result.n == 4
    assert result.metrics["exact"] == 0.75
    assert result.metrics["macro_f1"] == pytest.approx(
        macro_f1([["Kea"], [], ["Kea", "Tui"], ["Tui"]], truth, ["Kea", "Tui"]))
    scores = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.9], [0.8, 0.7, 0.0], [0.7, 0.6, 0.0]])
    scored = score_detection("detection", answers, truth, labels, scores=scores)
    assert scored.metrics["mAP"] == 1.0
    assert scored.metrics["chance_map"] < scored.metrics["mAP"]


def test_table_and_json() -> None:
    results = [score_single("species", ["Kea", "tui"], ["Kea", "Tui"], ["Kea", "Tui"]),
               score_detection("detection", ["None"], [[]], ["Kea", "None"])]
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["task", "n", "accuracy"]
    assert lines[2].split()[:3] == ["species", "2", "100.0"]
    assert "-" in lines[3].split()
    assert results_to_json(results)["species"] == {"n": 2, "accuracy": 1.0, "majority": 0.5}
