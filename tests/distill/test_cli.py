"""`distill.cli`: shipped YAMLs parse, a tiny `distill fit` through the CLI, `distill report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.cli import fit, format_report, report, report_rows, shipped_configs, student_cli
from distill.targets import TargetMismatchError
from tests.distill.test_lightning import make_store


@pytest.mark.parametrize("name", ["student-s", "student-m"])
def test_shipped_configs_parse(name: str) -> None:
    cli = student_cli(["--config", str(shipped_configs()[name]), "--data.manifest", "m.jsonl",
                       "--data.targets", "targets"], run=False, instantiate=False)
    assert cli.config.model.size == name.split("-")[1]
    assert cli.config.checkpoint.monitor == "val/agreement"


def test_unknown_config_name_raises() -> None:
    with pytest.raises(KeyError, match="student-s"):
        fit(["--config", "student-xl"])


@pytest.fixture(scope="module")
def fitted(corpus: Path, store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    code = fit(["--config", "student-s", "--data.manifest", str(corpus),
                "--data.targets", str(store), "--data.batch_size", "2",
                "--data.num_workers", "0", "--model.config",
                '{"width_mult": 0.1, "n_blocks": 3, "embedding_dim": 16}',
                "--trainer.accelerator", "cpu", "--trainer.max_steps", "3",
                "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(root)])
    assert code == 0
    return root / "student.ckpt"


def test_fit_through_the_cli_writes_a_student(fitted: Path, store: Path) -> None:
    from distill.checkpoint import load_student, teacher_hash_of

    assert fitted.is_file()
    model, cfg = load_student(fitted)
    assert set(cfg.tasks) == {"species", "detection"} and cfg.width_mult == 0.1
    assert teacher_hash_of(fitted) == json.loads((store / "targets.json").read_text())[
        "teacher_hash"]


def test_report_prints_every_task(fitted: Path, store: Path, corpus: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert report(fitted, store, corpus, split="test", out=out) == 0
    printed = capsys.readouterr().out
    assert "species" in printed and "detection" in printed and "teacher%" in printed
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["task"] for r in rows) == ["detection", "species"]
    assert "differ s/t/n" in printed
    for r in rows:
        assert r["params"] > 0 and r["macs"] > 0 and r["clips"] == 2
        assert 0.0 <= r["agreement"] <= 1.0 and r["teacher_accuracy"] == 1.0
        # The teacher is right on every clip here, so every disagreement is the student's error.
        differ = round(r["clips"] * (1 - r["agreement"]))
        assert (r["student_right"], r["teacher_right"], r["neither_right"]) == (0, differ, 0)
    assert format_report(report_rows(fitted, store, corpus, "test")).count("\n") >= 2


def test_report_refuses_targets_of_another_teacher(fitted: Path, corpus: Path,
                                                   tmp_path: Path) -> None:
    other = make_store(corpus, tmp_path / "other", teacher_hash="2" * 16)
    with pytest.raises(TargetMismatchError, match="come from teacher 2222"):
        report(fitted, other, corpus)


def test_label_signature_parses_as_a_table_command(tmp_path: Path) -> None:
    """What `naturelm-edge distill label ...` will hand to `distill.cli.label`."""
    from distill.cli import label
    from naturelm_edge.cli import parser_for

    args = parser_for(label, "naturelm-edge distill label").parse_args(
        ["t.ckpt", "m.jsonl", "out", "--devices", "2", "--strategy", "ddp", "--tasks", "species",
         "detection", "--split", "train", "--no-resume"])
    assert args.teacher == Path("t.ckpt") and args.devices == "2" and args.resume is False
    assert args.tasks == ["species", "detection"] and args.batch_size == 8
    args = parser_for(report, "naturelm-edge distill report").parse_args(["s.ckpt", "t", "m"])
    assert args.split == "test" and args.out is None


def test_teacher_size_is_counted_for_the_shipped_tiny_preset() -> None:
    """The report counts the teacher on the meta device: the tiny preset (audio_norm on,
    whose init reads the text embeddings) must build there too, and count what a real
    build counts."""
    from distill.cli import _teacher_parameters
    from teacher.config import teacher_config
    from teacher.model import NatureLM
    from teacher.tokenizer import train_tokenizer

    cfg = teacher_config("tiny")
    assert cfg.audio_norm
    real = NatureLM(cfg, train_tokenizer(["a"], 300))
    assert _teacher_parameters(cfg.to_dict()) == sum(p.numel() for p in real.parameters())
