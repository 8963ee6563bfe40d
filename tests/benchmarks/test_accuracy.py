"""`bench accuracy`: ECE and the Pareto front on hand-checkable cases, per-task scoring by hand,
and the command on a tiny real bundle (the tone model), a manifest of real tone clips with two
wrong answers and a teacher target store that disagrees on two clips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile

from benchmarks.accuracy import (
    accuracy,
    expected_calibration_error,
    pareto_front,
    score_task,
    sigmoid,
    softmax,
)
from naturelm_edge.cli import parser_for
from tests.runtime.model_fixtures import BAND_HZ, LABELS, RATE, make_bundle, tone


# -- ECE ----------------------------------------------------------------------------------------
def test_ece_is_zero_when_confidence_matches_the_hit_rate() -> None:
    # 4 predictions at 0.75, 3 right; 2 at 0.5, 1 right
    conf = [0.75] * 4 + [0.5] * 2
    hit = [1, 1, 1, 0, 1, 0]
    assert expected_calibration_error(conf, hit, bins=10) == pytest.approx(0.0)


def test_ece_of_overconfident_predictions() -> None:
    # always sure, right half the time: off by 0.5 everywhere
    assert expected_calibration_error([1.0] * 4, [1, 0, 1, 0]) == pytest.approx(0.5)
    # two bins: 0.9 with 1/2 right (gap 0.4), 0.6 with 2/2 right (gap 0.4), equal weights
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1],
                                      bins=10) == pytest.approx(0.4)
    # one bin holds everything: |mean hit - mean conf| = |0.5 - 0.7|
    assert expected_calibration_error([0.9, 0.5], [1, 0], bins=1) == pytest.approx(0.2)


def test_ece_weights_bins_by_their_share() -> None:
    # bin of 3 at 0.95 all right (gap 0.05), bin of 1 at 0.15 wrong (gap 0.15)
    got = expected_calibration_error([0.95, 0.95, 0.95, 0.15], [1, 1, 1, 0], bins=10)
    assert got == pytest.approx(0.75 * 0.05 + 0.25 * 0.15)


def test_ece_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="outcomes"):
        expected_calibration_error([0.5, 0.5], [1])
    with pytest.raises(ValueError, match="zero"):
        expected_calibration_error([], [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error([0.5], [1], bins=0)


# -- Pareto front -------------------------------------------------------------------------------
def test_pareto_front_keeps_the_non_dominated_points() -> None:
    # (latency, score): the 3 ms model is slower and worse than the 2 ms one
    points = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.4), (10.0, 0.95)]
    assert pareto_front(points) == [0, 1, 3, 4]


def test_pareto_front_ties_and_single_points() -> None:
    assert pareto_front([(1.0, 0.5)]) == [0]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]          # equal: both kept
    assert pareto_front([(1.0, 0.5), (1.0, 0.6)]) == [1]             # same cost, better score
    assert pareto_front([(1.0, 0.5), (2.0, 0.5)]) == [0]             # same score, cheaper
    assert pareto_front([]) == []


# -- per-task scoring by hand ------------------------------------------------------------------
def test_single_label_task_scored_by_hand() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    records = [_Rec("A"), _Rec("A"), _Rec("A")]
    row = score_task("m", "species", logits, ["A", "B"], "softmax", 0.5, records,
                     ["A", "B", None])
    assert row["metric"] == "accuracy" and row["n"] == 3
    assert row["score"] == pytest.approx(2 / 3) and row["accuracy"] == row["score"]
    assert row["agreement"] == 1.0                           # both clips with a target agree
    confidence = math.exp(2) / (1 + math.exp(2))
    assert row["ece"] == pytest.approx(abs(2 / 3 - confidence))


def test_detection_task_scored_by_hand() -> None:
    labels = ["A", "B", "None"]
    logits = np.array([[5.0, -5.0, 0.0], [-5.0, -5.0, 5.0], [-5.0, 5.0, -5.0]])
    records = [_Rec("A"), _Rec("None"), _Rec("A")]
    row = score_task("m", "detection", logits, labels, "sigmoid", 0.5, records, ["A", "A", "B"])
    # predicted sets {A}, {}, {B} against {A}, {}, {A}: label A F1 2/3, label B F1 0
    assert row["metric"] == "macro_f1"
    assert row["score"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert row["exact"] == pytest.approx(2 / 3)
    assert row["agreement"] == pytest.approx(2 / 3)           # top-1: A, None, B vs A, A, B
    probs = sigmoid(logits)[:, :2]
    present = np.array([[1, 0], [0, 0], [1, 0]])
    assert row["ece"] == pytest.approx(expected_calibration_error(probs, present))


def test_softmax_ignores_ruled_out_labels() -> None:
    got = softmax(np.array([[0.0, -np.inf, 0.0]]))
    assert got.tolist() == [[0.5, 0.0, 0.5]]


class _Rec:
    def __init__(self, output: str) -> None:
        self.output = output


# -- the command on a tiny bundle ---------------------------------------------------------------
WRONG = (2, 5)          # clips whose manifest answer is not the tone they hold
TEACHER_WRONG = (1, 6)  # clips where the teacher's top-1 is another label


@pytest.fixture(scope="module")
def tone_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tone bundle, 8 one-second tone clips (test split) and a teacher target store."""
    from distill.targets import TargetMeta, TaskLabels, write_meta, write_part

    root = tmp_path_factory.mktemp("acc")
    bundle = make_bundle(root / "tones", with_stft_variant=True)
    rows, targets = [], []
    for n in range(8):
        band = n % 4
        path = root / f"clip{n}.wav"
        soundfile.write(path, tone(BAND_HZ[band], 1.0), RATE)
        said = LABELS[(band + 1) % 4] if n in WRONG else LABELS[band]
        teacher = LABELS[(band + 2) % 4] if n in TEACHER_WRONG else LABELS[band]
        for task in ("species", "detection"):
            rows.append({"id": f"c{n}.{task}", "task": task, "instruction": "<AudioHere> q",
                         "output": said, "labels": list(LABELS), "split": "test",
                         "file_name": path.name, "dataset_name": "tones"})
            scores = [0.0 if x == teacher else -5.0 for x in LABELS]
            row = {"id": f"c{n}.{task}", "task": task, "scores": scores,
                   "answer": teacher.lower()}
            if task == "detection":
                row["probs"] = [0.9 if x == teacher else 0.1 for x in LABELS]
            targets.append(row)
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = root / "targets"
    write_meta(store, TargetMeta("t" * 16, {}, {"species": TaskLabels(LABELS),
                                                "detection": TaskLabels(LABELS, True)},
                                 RATE, 1.0))
    write_part(store, 0, 0, targets)
    return {"bundle": bundle, "manifest": manifest, "targets": store, "root": root}


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    parsed = parser_for(accuracy, "naturelm-edge bench accuracy").parse_args(args)
    code = accuracy(**vars(parsed))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else {}), captured.err


def test_accuracy_command_on_the_tone_bundle(tone_set: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "pareto.png"
    code, result, _ = _run([str(tone_set["bundle"]), "--manifest", str(tone_set["manifest"]),
                            "--targets", str(tone_set["targets"]), "--measure-latency",
                            "--plot", str(plot), "--no-save"], capsys)
    assert code == 0
    rows = {(r["model"], r["task"]): r for r in result["rows"]}
    assert set(rows) == {(m, t) for m in ("teacher", "tones fp32", "tones fp32-stft")
                         for t in ("species", "detection")}
    student = rows[("tones fp32", "species")]
    # the tone model names every tone; the manifest is wrong on 2 of 8 clips
    assert student["n"] == 8 and student["accuracy"] == pytest.approx(6 / 8)
    assert student["agreement"] == pytest.approx(6 / 8)        # the teacher is off on 2 others
    assert student["ece"] == pytest.approx(0.25, abs=1e-3)     # sure of itself, right 6/8
    detection = rows[("tones fp32", "detection")]
    assert detection["metric"] == "macro_f1" and detection["exact"] == pytest.approx(6 / 8)
    teacher = rows[("teacher", "species")]
    # answers "a".."d" snap to labels; right where neither it nor the manifest is off
    assert teacher["accuracy"] == pytest.approx(4 / 8) and teacher["agreement"] == 1.0
    models = {m["model"]: m for m in result["models"]}
    assert models["teacher"]["latency_ms"] is None and models["teacher"]["pareto"] == "-"
    assert models["tones fp32"]["latency_ms"] > 0
    assert models["tones fp32"]["x_real_time"] == pytest.approx(
        1000 / models["tones fp32"]["latency_ms"])
    assert "yes" in {models["tones fp32"]["pareto"], models["tones fp32-stft"]["pareto"]}
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"


def test_recorded_latency_and_saved_results(tone_set: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, result, _ = _run([str(tone_set["bundle"]), "--manifest", str(tone_set["manifest"]),
                            "--results-dir", str(tmp_path)], capsys)
    assert code == 0
    # no targets: no teacher row, no agreement; the tone bundle recorded no per-model latency
    assert {m["model"] for m in result["models"]} == {"tones fp32", "tones fp32-stft"}
    assert all(r["agreement"] is None for r in result["rows"])
    assert all(m["latency_ms"] is None and m["pareto"] == "-" for m in result["models"])
    saved = json.loads(Path(result["results_file"]).read_text())
    assert "accuracy" in saved["benchmarks"]


def test_a_label_set_other_than_the_bundle_is_refused(tone_set: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "other.jsonl"
    lines = tone_set["manifest"].read_text().splitlines()
    row = json.loads(lines[0])
    row["labels"] = ["A", "B"]
    row["file_name"] = str(tone_set["root"] / row["file_name"])
    manifest.write_text(json.dumps(row) + "\n")
    code, _, err = _run([str(tone_set["bundle"]), "--manifest", str(manifest), "--no-save"],
                        capsys)
    assert code == 2 and "other.jsonl" in err and "label set" in err


def test_teacher_timing_needs_its_targets(tone_set: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run([str(tone_set["bundle"]), "--manifest", str(tone_set["manifest"]),
                         "--teacher", "t.ckpt", "--no-save"], capsys)
    assert code == 2 and "--targets" in err
