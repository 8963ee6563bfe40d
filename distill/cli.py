"""`naturelm-edge distill label | fit | report`: teacher targets, student training, the report.

``label`` is `distill.label.label` (typed). ``fit`` hands its arguments to LightningCLI over
`StudentModule` and `StudentDataModule`; ``--config NAME`` takes a shipped config by name
("student-s", "student-m") as well as a YAML path; ``model.targets`` is linked to
``data.targets``; the checkpoint with the best ``val/agreement`` is written to
``<trainer.default_root_dir>/student.ckpt``. ``report`` prints, per task, the student's size and
cost beside its agreement with the teacher and both accuracies.

    $ naturelm-edge distill label runs/teacher-tiny/teacher.ckpt corpus/manifest.jsonl runs/targets
    $ naturelm-edge distill fit --config student-s --data.manifest corpus/manifest.jsonl \\
          --data.targets runs/targets --trainer.default_root_dir runs/student-s
    $ naturelm-edge distill report runs/student-s/student.ckpt runs/targets corpus/manifest.jsonl

    >>> sorted(shipped_configs())
    ['student-m', 'student-s']
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill.label import label

__all__ = ["fit", "label", "report", "shipped_configs", "student_cli"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CHECKPOINT_NAME = "student"


def shipped_configs() -> dict[str, Path]:
    """The LightningCLI configs shipped with the package, by name."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.yaml"))}


def _resolve(value: str) -> str:
    if "/" in value or value.endswith((".yaml", ".yml", ".json")):
        return value
    configs = shipped_configs()
    if value not in configs:
        raise KeyError(f"unknown student config {value!r}; shipped configs: {', '.join(configs)}")
    return str(configs[value])


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config NAME`` (or ``-c NAME``) of a shipped config made a path."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + _resolve(arg.split("=", 1)[1])
        elif arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = _resolve(out[i + 1])
    return out


def student_cli(args: Sequence[str] | None, run: bool = True, instantiate: bool = True) -> Any:
    """The student's LightningCLI (``args`` starts with a subcommand when ``run``).

    ``instantiate=False`` (with ``run=False``) only parses (how the shipped YAMLs are checked).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from distill.lightning import StudentDataModule, StudentModule
    from teacher.cli import add_num_threads, apply_num_threads

    class StudentCLI(LightningCLI):
        """Links the target store into the model; checkpoints on agreement with the teacher;
        ``num_threads`` as the teacher's CLI."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.filename": CHECKPOINT_NAME,
                                 "checkpoint.monitor": "val/agreement",
                                 "checkpoint.mode": "max",
                                 "checkpoint.enable_version_counter": False})
            parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath")
            parser.link_arguments("data.targets", "model.targets")
            add_num_threads(parser)

        def instantiate_classes(self) -> None:
            if instantiate:
                apply_num_threads(self.config[self.subcommand] if self.subcommand
                                  else self.config)
                super().instantiate_classes()

    return StudentCLI(StudentModule, StudentDataModule, args=list(args or []), run=run,
                      save_config_kwargs={"overwrite": True})


def fit(argv: list[str]) -> int:
    """Distill a student: LightningCLI ``fit`` with the given arguments (see ``--help``)."""
    student_cli(["fit", *resolve_config_args(argv)], run=True)
    return 0


def report_rows(checkpoint: Path, targets: Path, manifest: Path, split: str = "test",
                batch_size: int = 32, device: str = "cpu") -> list[dict[str, Any]]:
    """One dict per task: parameters, MACs per window, agreement, both accuracies, and the
    clips where student and teacher disagree by who matches the ground truth."""
    from distill.checkpoint import load_student, teacher_hash_of
    from distill.lightning import DISAGREEMENTS, StudentDataModule, evaluate
    from distill.students import count_macs, count_parameters

    model, cfg = load_student(checkpoint, map_location=device)
    data = StudentDataModule(str(manifest), str(targets), batch_size=batch_size,
                             sample_rate=cfg.frontend.sample_rate, tasks=list(cfg.tasks))
    data.store.check(teacher_hash=teacher_hash_of(checkpoint),
                     label_sets={t: h.labels for t, h in cfg.tasks.items()})
    loader = data.eval_dataloader(split)
    if not loader:
        from runtime.errors import ManifestError

        raise ManifestError(manifest, f"no clips in split {split!r}")
    rates = evaluate(model, loader, {t: h.multi_label for t, h in cfg.tasks.items()})
    window = int(round(data.store.meta.clip_s * cfg.frontend.sample_rate))
    params = count_parameters(model)
    macs = count_macs(model.cpu(), window)
    teacher_params = _teacher_parameters(data.store.meta.teacher_config)
    rows = []
    for task in cfg.tasks:
        r = rates.get(task, {"agreement": math.nan, "accuracy": math.nan,
                             "teacher_accuracy": math.nan, "clips": 0.0,
                             **dict.fromkeys(DISAGREEMENTS, 0.0)})
        ratio = r["accuracy"] / r["teacher_accuracy"] if r["teacher_accuracy"] else math.nan
        rows.append({"task": task, "params": params, "macs": macs,
                     "teacher_params": teacher_params, "clips": int(r["clips"]),
                     "agreement": r["agreement"], "accuracy": r["accuracy"],
                     "teacher_accuracy": r["teacher_accuracy"], "accuracy_ratio": ratio,
                     "masked": data.missing.get(f"{split}/{task}", 0),
                     **{key: int(r[key]) for key in DISAGREEMENTS}})
    return rows


def _teacher_parameters(config: dict[str, Any]) -> int | None:
    """The teacher's parameter count, built on the meta device from its stored config."""
    import torch

    from teacher.config import TeacherConfig

    cfg = TeacherConfig.from_dict(config)
    if cfg.llm.path is not None:
        return None
    from teacher.model import NatureLM
    from teacher.tokenizer import train_tokenizer

    with torch.device("meta"):
        tok = train_tokenizer(["a"], 300)
        model = NatureLM(cfg, tok)
    return sum(p.numel() for p in model.parameters())


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    """The report table (percentages), a legend of its disagreement column and a summary line
    of size against the teacher."""
    from distill.lightning import DISAGREEMENTS

    head = (f"{'task':<12} {'params':>9} {'MMACs':>8} {'clips':>6} {'agree%':>7} {'acc%':>7} "
            f"{'teacher%':>8} {'acc/teacher':>11} {'masked':>6} {'differ s/t/n':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        differ = "/".join(str(r[key]) for key in DISAGREEMENTS)
        lines.append(f"{r['task']:<12} {r['params']:>9,} {r['macs'] / 1e6:>8.1f} {r['clips']:>6} "
                     f"{100 * r['agreement']:>7.2f} {100 * r['accuracy']:>7.2f} "
                     f"{100 * r['teacher_accuracy']:>8.2f} {100 * r['accuracy_ratio']:>10.2f}% "
                     f"{r['masked']:>6} {differ:>13}")
    lines.append("differ s/t/n: clips with ground truth where student and teacher answer "
                 "differently, by who is right: student / teacher / neither")
    if rows and rows[0]["teacher_params"]:
        share = rows[0]["params"] / rows[0]["teacher_params"]
        lines.append(f"student / teacher parameters: {rows[0]['params']:,} / "
                     f"{rows[0]['teacher_params']:,} = 1/{1 / share:.1f}")
    return "\n".join(lines)


def report(checkpoint: Path, targets: Path, manifest: Path, split: str = "test",
           batch_size: int = 32, device: str = "cpu", out: Path | None = None) -> int:
    """Print per task: parameters, MACs for one window, top-1 agreement with the teacher,
    accuracy against ground truth and the teacher's own accuracy beside it.

    Args:
        checkpoint: a student checkpoint (`naturelm-edge distill fit`).
        targets: the target store the student is compared with.
        manifest: the corpus manifest (ground truth and audio).
        split: the split reported.
        batch_size: clips per forward.
        device: torch device, e.g. cpu or cuda.
        out: also write the rows to this JSON file.
    """
    rows = report_rows(Path(checkpoint), Path(targets), Path(manifest), split, batch_size, device)
    print(format_report(rows))
    if out is not None:
        from runtime.files import atomic_write_text

        atomic_write_text(Path(out), json.dumps({"checkpoint": str(checkpoint), "split": split,
                                                 "rows": rows}, indent=1))
    return 0
