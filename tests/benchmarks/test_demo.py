"""`naturelm-edge demo`: stage bookkeeping on toy stages (skip, resume, invalidation, failure),
soundscape scoring by hand, and the quick demo end to end through the CLI, then a rerun that
skips every stage and a rerun after one marker is removed (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.demo import Event, Stage, read_calls, read_detections, run_stages, score_events
from naturelm_edge import cli


# -- stage bookkeeping on toy stages ------------------------------------------------------------
def _toy(out: Path, log: list[str], fail: str | None = None,
         option: int = 0) -> list[Stage]:
    def make(name: str) -> object:
        def run(outputs: dict) -> dict:
            log.append(name)
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "part").write_text(name)
            if name == fail:
                raise RuntimeError(f"{name} broke")
            return {"seen": sorted(outputs)}
        return run

    return [Stage(1, "a", "A", make("a"), (), {"option": option}, folder="a"),
            Stage(2, "b", "B", make("b"), ("a",), {}, folder="b", resumable=True),
            Stage(3, "c", "C", make("c"), ("a",), {}, folder="c"),
            Stage(4, "d", "D", make("d"), ("b", "c"), {})]


def test_stages_run_in_order_and_a_rerun_skips_them(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    log: list[str] = []
    markers = run_stages(tmp_path, _toy(tmp_path, log))
    assert log == ["a", "b", "c", "d"]
    assert markers["d"]["outputs"] == {"seen": ["a", "b", "c"]}
    assert all(m["seconds"] >= 0 and len(m["load_before"]) == 3 for m in markers.values())
    again = run_stages(tmp_path, _toy(tmp_path, log))
    assert log == ["a", "b", "c", "d"]                                # nothing ran again
    assert {k: m["run_id"] for k, m in again.items()} == \
        {k: m["run_id"] for k, m in markers.items()}
    assert capsys.readouterr().out.count("skipped") == 4


def test_a_rerun_stage_invalidates_only_its_dependants(tmp_path: Path) -> None:
    log: list[str] = []
    run_stages(tmp_path, _toy(tmp_path, log))
    (tmp_path / "stages" / "03-c.json").unlink()
    run_stages(tmp_path, _toy(tmp_path, log))
    assert log[4:] == ["c", "d"]
    # another option of the first stage reruns everything after it
    run_stages(tmp_path, _toy(tmp_path, log, option=1))
    assert log[6:] == ["a", "b", "c", "d"]
    # --no-resume reruns everything
    run_stages(tmp_path, _toy(tmp_path, log, option=1), resume=False)
    assert log[10:] == ["a", "b", "c", "d"]


def test_a_failed_stage_leaves_no_marker_and_resumes(tmp_path: Path) -> None:
    log: list[str] = []
    with pytest.raises(RuntimeError, match="b broke"):
        run_stages(tmp_path, _toy(tmp_path, log, fail="b"))
    assert not (tmp_path / "stages" / "02-b.json").exists()
    assert (tmp_path / "stages" / "02-b.started.json").exists()
    (tmp_path / "b" / "partial").write_text("kept")
    run_stages(tmp_path, _toy(tmp_path, log))
    assert log == ["a", "b", "b", "c", "d"]                           # a was not redone
    assert (tmp_path / "b" / "partial").read_text() == "kept"         # resumable: folder kept
    assert not (tmp_path / "stages" / "02-b.started.json").exists()


def test_a_stage_that_is_not_resumable_starts_from_a_clean_folder(tmp_path: Path) -> None:
    log: list[str] = []
    with pytest.raises(RuntimeError):
        run_stages(tmp_path, _toy(tmp_path, log, fail="c"))
    (tmp_path / "c" / "stale").write_text("old")
    run_stages(tmp_path, _toy(tmp_path, log))
    assert not (tmp_path / "c" / "stale").exists()


def test_a_damaged_marker_is_named(tmp_path: Path) -> None:
    log: list[str] = []
    run_stages(tmp_path, _toy(tmp_path, log))
    (tmp_path / "stages" / "01-a.json").write_text("{not json")
    with pytest.raises(Exception, match="01-a.json"):
        run_stages(tmp_path, _toy(tmp_path, log))


# -- soundscape scoring -------------------------------------------------------------------------
def test_training_uses_every_usable_core_unless_threads_are_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.demo import PLANS, Options

    monkeypatch.setattr("benchmarks.harness.usable_cores", lambda: 6)

    def options(threads: int | None) -> Options:
        return Options(out=Path("x"), seed=0, plan=PLANS["quick"], corpus=None, soundscape=None,
                       teacher=None, teacher_config="tiny", student_sizes=("s",),
                       accelerator="cpu", devices=1, threads=threads)

    assert options(None).torch_threads == 6
    assert options(1).torch_threads == 1


def test_on_the_cpu_the_student_trains_in_two_processes_sharing_the_cores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.demo import PLANS, Options, student_batch_size

    monkeypatch.setattr("benchmarks.harness.usable_cores", lambda: 6)

    def options(threads: int | None = None, devices: int = 1,
                accelerator: str = "cpu") -> Options:
        return Options(out=Path("x"), seed=0, plan=PLANS["quick"], corpus=None, soundscape=None,
                       teacher=None, teacher_config="tiny", student_sizes=("s",),
                       accelerator=accelerator, devices=devices, threads=threads)

    auto = options()
    assert (auto.processes, auto.process_threads) == (2, 3)
    args = auto.trainer_args(2)
    assert {"--trainer.devices=2", "--num_threads=3", "--trainer.strategy=ddp"} <= set(args)
    single = auto.trainer_args()
    assert {"--trainer.devices=1", "--num_threads=6"} <= set(single)
    assert not any(a.startswith("--trainer.strategy") for a in single)
    # threads given (a shared machine): one process; --devices: that many, as Lightning counts
    assert options(threads=1).processes == 1 and options(threads=4).processes == 1
    assert options(devices=4).processes == 4
    assert options(accelerator="gpu").processes == 1
    monkeypatch.setattr("benchmarks.harness.usable_cores", lambda: 1)
    assert options().processes == 1
    # the batch the processes split: the shipped config's, unless the plan gives one
    assert student_batch_size(["--config", "student-s"]) == 32
    assert student_batch_size(["--config", "student-s", "--data.batch_size=8"]) == 8


def test_score_events_by_hand() -> None:
    calls = [Event(1.0, 2.0, "Kea"), Event(12.0, 12.5, "Tui"), Event(35.0, 36.0, "Kea")]
    detections = [Event(0.0, 10.0, "Kea"),     # right: the first call
                  Event(10.0, 20.0, "Kea"),    # wrong label for the call in it
                  Event(10.0, 20.0, "Tui"),    # right
                  Event(20.0, 30.0, "Kea")]    # nothing there
    got = score_events(detections, calls)
    assert got == {"precision": 0.5, "recall": 2 / 3, "detections": 4, "calls": 3}
    # a window's width of tolerance reaches the call at 35 s from the 20-30 s window
    assert score_events(detections, calls, tolerance_s=10.0)["recall"] == 1.0
    assert score_events([], calls) == {"precision": 0.0, "recall": 0.0, "detections": 0,
                                       "calls": 3}


def test_detections_and_calls_are_read_from_the_runtime_files(tmp_path: Path) -> None:
    csv = tmp_path / "detections.csv"
    csv.write_text("file,start_s,end_s,task,label,score\n"
                   "s.flac,0.000,10.000,detection,Kea,0.9000\n"
                   "s.flac,0.000,10.000,species,Kea,0.8000\n")
    assert read_detections(csv, "detection") == [Event(0.0, 10.0, "Kea")]
    table = tmp_path / "s.selections.txt"
    table.write_text("Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tLow Freq (Hz)\t"
                     "High Freq (Hz)\tSpecies\n1\tSpectrogram 1\t1\t1.5\t2.0\t100\t200\tKea\n")
    assert read_calls(table) == [Event(1.5, 2.0, "Kea")]
    with pytest.raises(Exception, match="Genus"):
        read_calls(table, column="Genus")


# -- the quick demo end to end ------------------------------------------------------------------
def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["demo", *args])
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_quick_demo_end_to_end_then_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.bundle import verify_bundle

    if "demo" not in cli.COMMANDS:  # until the CLI table lists it
        monkeypatch.setitem(cli.COMMANDS, "demo", cli.Command("benchmarks.demo:demo",
                                                              extra="train"))
    out = tmp_path / "demo"
    code, text = _main(["--quick", "--out", str(out)], capsys)
    assert code == 0
    final = json.loads(text.strip().splitlines()[-1])
    names = ["corpus", "teacher", "teacher-eval", "targets", "student-s", "export-s", "bundle-s",
             "analysis-s", "table"]
    assert list(final["stages_s"]) == names
    markers = {p.name: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}
    assert len(markers) == 9 and not list((out / "stages").glob("*.started.json"))
    # the encoder pretraining also trained on two more choruses (the next seeds)
    extra = markers["01-corpus.json"]["outputs"]["pretrain_manifests"]
    assert [Path(m).parent for m in extra] == [out / "corpus-pretrain-1", out / "corpus-pretrain-2"]
    assert all(Path(m).is_file() for m in extra)
    seeds = [json.loads((Path(m).parent / "synth.json").read_text())["config"]["seed"]
             for m in extra]
    assert seeds == [1, 2]
    import torch

    pretrain = torch.load(out / "teacher" / "encoder.pt", weights_only=True)["pretrain"]
    assert pretrain["extra_manifests"] == extra
    models = {m["model"]: m for m in final["models"]}
    assert list(models) == ["teacher", "demo-s fp32", "demo-s fp16", "demo-s int8"]
    for m in models.values():
        assert m["ms_per_window"] > 0
        assert m["x_real_time"] == pytest.approx(10_000 / m["ms_per_window"])
        assert 0.0 <= m["agreement"] <= 1.0 and 0.0 <= m["mean"] <= 1.0
    assert models["teacher"]["agreement"] == 1.0
    sound = final["soundscape"][0]
    assert sound["task"] == "detection" and sound["calls"] > 0
    assert 0.0 <= sound["precision"] <= 1.0 and 0.0 <= sound["recall"] <= 1.0
    assert verify_bundle(out / "bundles" / "s") == []
    assert (out / "bundles" / "s.tar.gz").is_file() and (out / "accuracy.png").is_file()
    assert "| demo-s int8 |" in (out / "report.md").read_text()
    for line in ("1. synthetic corpus", "9. final table"):
        assert line in text
    # with two or more cores the student trained in two DDP processes, the labelling in one
    from benchmarks.harness import usable_cores

    assert ("distill fit: naturelm-edge distill fit" in text) == (usable_cores() >= 2)
    assert "distill label: naturelm-edge" not in text

    # a rerun skips every stage and prints the same table
    code, again = _main(["--quick", "--out", str(out)], capsys)
    assert code == 0 and again.count(": done earlier") == 9
    assert json.loads(again.strip().splitlines()[-1])["models"] == final["models"]
    rerun = {p.name: json.loads(p.read_text())["run_id"] for p in (out / "stages").glob("*.json")}
    assert rerun == {k: m["run_id"] for k, m in markers.items()}

    # without the bundle's marker: the bundle, its analysis and the table run again
    (out / "stages" / "07-bundle-s.json").unlink()
    code, third = _main(["--quick", "--out", str(out)], capsys)
    assert code == 0 and third.count(": done earlier") == 6
    for title in ("bundle (s): done in", "soundscape (s): done in", "final table: done in"):
        assert title in third

    # an INT8 model below its agreement bar (forced here) is left out and reported; the run
    # goes on to the bundle, the analysis and the table with FP32 and FP16
    import export.precision

    monkeypatch.setitem(export.precision.BARS, "int8", 1.01)
    (out / "stages" / "06-export-s.json").unlink()
    code, fourth = _main(["--quick", "--out", str(out)], capsys)
    assert code == 0 and fourth.count(": done earlier") == 5
    assert "dropped model.int8.onnx (kept as rejected/model.int8.onnx): " in fourth
    last = json.loads(fourth.strip().splitlines()[-1])
    assert [m["model"] for m in last["models"]] == ["teacher", "demo-s fp32", "demo-s fp16"]
    # both INT8 forms: the QDQ model (TensorRT, CUDA) and the CPU one, each checked
    assert [(r["bundle"], r["file"], r["bar"]) for r in last["rejected"]] == [
        ("demo-s", "model.int8.onnx", 1.01), ("demo-s", "model.int8cpu.onnx", 1.01)]
    rejected = last["rejected"][0]
    assert set(rejected["agreement"]) == {f"{t}_logits" for t in
                                          ("calltype", "count", "detection", "lifestage",
                                           "species")}
    # kept aside for inspection and scored against the labels beside FP32
    assert rejected["file"] == "model.int8.onnx"
    assert (out / "export" / "s" / "rejected" / "model.int8.onnx").is_file()
    tasks = {"calltype", "count", "detection", "lifestage", "species"}
    assert set(rejected["accuracy"]) == tasks == set(rejected["fp32_accuracy"])
    assert all(0.0 <= v <= 1.0 for v in [*rejected["accuracy"].values(),
                                         *rejected["fp32_accuracy"].values()])
    fp32 = {m["model"]: m for m in last["models"]}["demo-s fp32"]
    assert rejected["fp32_accuracy"]["species"] == fp32["species (acc)"]
    assert not (out / "bundles" / "s" / "model.int8.onnx").exists()
    assert verify_bundle(out / "bundles" / "s") == []
    report = (out / "report.md").read_text()
    assert "| demo-s int8 |" not in report
    assert "## Variants left out" in report and "demo-s: model.int8.onnx (int8, bar 101.0%)" in report
    assert "; against the labels: calltype " in report
