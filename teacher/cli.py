"""`naturelm-edge teacher fit` (LightningCLI) and `naturelm-edge teacher eval` (BEANS-Zero style).

``fit`` hands its arguments to `lightning.pytorch.cli.LightningCLI` over `TeacherModule` and
`TeacherDataModule`; ``--config NAME`` accepts a shipped config by name ("tiny",
"naturelm-8b") as well as a YAML path. The checkpoint is written to
``<trainer.default_root_dir>/teacher.ckpt``.

``eval`` rebuilds the teacher from its checkpoint, generates an answer for every record of a
split, snaps it to the task's labels (Levenshtein) and prints accuracy per classification task
and macro-F1 / mAP for detection; with ``--score`` it also ranks the labels by the teacher's
log-likelihood (``score_labels``), giving mAP from scores and a scored accuracy.

``import`` turns the published NatureLM-audio ``model.safetensors`` over a local
Llama-3.1-8B-Instruct (`teacher.official.load_naturelm`) into a teacher checkpoint that every
command taking ``--teacher`` / a checkpoint reads (`teacher.checkpoint.load_teacher`): the
LLM's base weights stay in the local folder and are refilled from it on load.

    $ naturelm-edge teacher fit --config tiny --data.manifest /tmp/synth/manifest.jsonl \\
          --trainer.default_root_dir runs/teacher-tiny
    $ naturelm-edge teacher eval runs/teacher-tiny/teacher.ckpt /tmp/synth/manifest.jsonl
    $ naturelm-edge teacher import NatureLM-audio/model.safetensors Llama-3.1-8B-Instruct \\
          runs/naturelm-8b/teacher.ckpt
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """The LightningCLI configs shipped with the package, by name."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.yaml"))}


def shipped_config(name: str) -> Path:
    """The shipped config called ``name``; unknown names raise listing the known ones."""
    configs = shipped_configs()
    if name not in configs:
        raise KeyError(f"unknown teacher config {name!r}; shipped configs: {', '.join(configs)}")
    return configs[name]


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config NAME`` (or ``-c NAME``) of a shipped config made a path."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
            if "/" not in value and not value.endswith((".yaml", ".yml", ".json")):
                out[i] = f"--config={shipped_config(value)}"
        elif arg in ("--config", "-c") and i + 1 < len(out):
            value = out[i + 1]
            if "/" not in value and not value.endswith((".yaml", ".yml", ".json")):
                out[i + 1] = str(shipped_config(value))
    return out


def teacher_cli(args: Sequence[str] | None, run: bool = True, instantiate: bool = True) -> Any:
    """The teacher's LightningCLI (``args`` starts with a subcommand when ``run``).

    ``instantiate=False`` (with ``run=False``) only parses: ``cli.config`` holds the result and
    no model, data or trainer is built (how the shipped YAMLs are checked without a GPU).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from teacher.lightning import TeacherDataModule, TeacherModule

    class TeacherCLI(LightningCLI):
        """Adds a checkpoint callback that writes ``<default_root_dir>/teacher.ckpt`` and
        ``num_threads`` (torch intra-op threads; on a shared CPU one thread per process avoids
        OpenMP threads spinning while a sibling is descheduled)."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.filename": "teacher",
                                 "checkpoint.enable_version_counter": False})
            parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath")
            add_num_threads(parser)

        def instantiate_classes(self) -> None:
            if not instantiate:
                return
            apply_num_threads(self.config[self.subcommand] if self.subcommand else self.config)
            super().instantiate_classes()

    return TeacherCLI(TeacherModule, TeacherDataModule, args=list(args or []), run=run,
                      save_config_kwargs={"overwrite": True})


def add_num_threads(parser: Any) -> None:
    """A LightningCLI ``--num_threads`` option: torch intra-op threads (on a shared CPU one
    thread per process avoids OpenMP threads spinning while a sibling is descheduled)."""
    parser.add_argument("--num_threads", type=int | None, default=None,
                        help="torch intra-op threads (default: torch's choice)")


def apply_num_threads(config: Any) -> None:
    """Set torch's intra-op threads from a parsed config's ``num_threads``, if given."""
    if config.get("num_threads"):
        import torch

        torch.set_num_threads(int(config["num_threads"]))


def fit(argv: list[str]) -> int:
    """Train the teacher: LightningCLI ``fit`` with the given arguments (see ``--help``)."""
    teacher_cli(["fit", *resolve_config_args(argv)], run=True)
    return 0


def load_eval_records(manifest: Path, split: str, tasks: Sequence[str] | None) -> list[Any]:
    """Records of ``split`` (and ``tasks``) from a JSONL / CSV manifest or a BEANS-Zero parquet."""
    from runtime.errors import ManifestError

    if manifest.suffix == ".parquet":
        from corpus.beans import read_beans_parquet

        records = read_beans_parquet(manifest)
    else:
        from corpus.manifest import read_manifest

        records = read_manifest(manifest)
    chosen = [r for r in records if r.split == split and (not tasks or r.task in set(tasks))]
    if not chosen:
        raise ManifestError(manifest, f"no records in split {split!r}"
                            + (f" for tasks {list(tasks)}" if tasks else ""))
    return chosen


def predict(model: Any, records: Sequence[Any], batch_size: int = 8, max_new_tokens: int = 24,
            num_beams: int = 1, score: bool = True) -> list[dict[str, Any]]:
    """Generate (and score) every record: one dict per record with ``answer`` and ``scores``.

    Each call sees exactly the teacher's ``clip_s``; a longer clip is cut to its first
    ``clip_s`` seconds and its prediction carries ``"cut_s"`` (the seconds dropped). Records
    are run grouped by clip, and a clip's encoder output is computed once for all its tasks.
    """
    import torch

    from teacher.lightning import EncoderCache, _clip_key, fit_length, load_clip

    cfg = model.cfg
    n = cfg.clip_samples
    device = next(model.parameters()).device
    order = sorted(range(len(records)), key=lambda i: _clip_key(records[i]))
    cache = EncoderCache(torch.float32)
    out: list[dict[str, Any] | None] = [None] * len(records)
    for start in range(0, len(order), batch_size):
        batch = [records[i] for i in order[start:start + batch_size]]
        keys = [_clip_key(r) for r in batch]
        cache.store = {k: v for k, v in cache.store.items() if k in set(keys)}
        clips = [load_clip(r, cfg.sample_rate) for r in batch]
        audio = torch.from_numpy(np.stack([fit_length(c, n, None) for c in clips])).to(device)
        instructions = [r.instruction for r in batch]
        with torch.inference_mode(), cache.serving(model.beats, keys):
            answers = model.generate(audio, instructions, max_new_tokens=max_new_tokens,
                                     num_beams=num_beams)
            scores = model.score_labels(audio, instructions, [list(r.labels) for r in batch]) \
                if score else None
        for i, (record, clip) in enumerate(zip(batch, clips, strict=True)):
            row: dict[str, Any] = {"id": record.id, "task": record.task, "output": record.output,
                                   "answer": answers[i]}
            if scores is not None:
                row["scores"] = [float(v) for v in scores[i][:len(record.labels)]]
            if clip.shape[0] > n:
                row["cut_s"] = (clip.shape[0] - n) / cfg.sample_rate
            out[order[start + i]] = row
    return [row for row in out if row is not None]


def score_predictions(records: Sequence[Any], predictions: Sequence[dict[str, Any]]) -> list[Any]:
    """`TaskResult`s per task (per task and dataset where a task spans several datasets, as
    BEANS-Zero's classification does); records with no label set (captioning) are skipped."""
    from teacher.eval import accuracy, score_detection, score_single, split_answer
    from teacher.lightning import is_multi_label

    groups: dict[tuple[str, str], list[tuple[Any, dict[str, Any]]]] = defaultdict(list)
    for record, prediction in zip(records, predictions, strict=True):
        if record.labels:
            groups[(record.task, record.dataset_name)].append((record, prediction))
    datasets_of: dict[str, int] = defaultdict(int)
    for task, _ in groups:
        datasets_of[task] += 1
    results = []
    for (task, dataset), pairs in groups.items():
        name = task if datasets_of[task] == 1 else f"{task}/{dataset}"
        labels = list(pairs[0][0].labels)
        if any(list(r.labels) != labels for r, _ in pairs):
            raise ValueError(f"task {name!r} mixes label sets within one dataset")
        answers = [p["answer"] for _, p in pairs]
        scored = all("scores" in p for _, p in pairs)
        if is_multi_label(task):
            truth = [[x for x in split_answer(r.output) if x != "None"] for r, _ in pairs]
            scores = np.array([p["scores"] for _, p in pairs]) if scored else None
            results.append(score_detection(name, answers, truth, labels, scores))
            continue
        result = score_single(name, answers, [r.output for r, _ in pairs], labels)
        if scored:
            best = [labels[int(np.argmax(p["scores"]))] for _, p in pairs]
            result.metrics["scored_accuracy"] = accuracy(best, [r.output for r, _ in pairs])
        results.append(result)
    return results


def eval(checkpoint: Path, manifest: Path, split: str = "test", out: Path | None = None,
         batch_size: int = 8, tasks: list[str] | None = None, max_new_tokens: int = 24,
         num_beams: int = 1, score: bool = True, device: str = "cpu") -> int:
    """Score a trained teacher BEANS-Zero style and print a per-task table.

    Args:
        checkpoint: a teacher checkpoint (from `naturelm-edge teacher fit`).
        manifest: a JSONL / CSV manifest, or a BEANS-Zero parquet file.
        split: the split evaluated.
        out: write the metrics and every prediction to this JSON file.
        batch_size: clips per forward.
        tasks: evaluate only these tasks.
        max_new_tokens: longest generated answer.
        num_beams: beam width (1 is greedy).
        score: also rank the labels by log-likelihood (mAP from scores, scored accuracy).
        device: torch device, e.g. cpu or cuda.
    """
    from runtime.files import atomic_write_text
    from teacher.checkpoint import load_teacher
    from teacher.eval import format_table, results_to_json

    model = load_teacher(checkpoint, map_location=device)
    records = load_eval_records(Path(manifest), split, tasks)
    predictions = predict(model, records, batch_size, max_new_tokens, num_beams, score)
    results = score_predictions(records, predictions)
    cut = sum(1 for p in predictions if "cut_s" in p)
    print(format_table(results))
    if cut:
        print(f"{cut} clip(s) longer than the teacher's clip were cut to their first seconds "
              "(see cut_s in --out)", file=sys.stderr)
    if out is not None:
        payload = {"checkpoint": str(checkpoint), "manifest": str(manifest), "split": split,
                   "results": results_to_json(results), "predictions": predictions}
        atomic_write_text(Path(out), json.dumps(payload, indent=1))
    return 0


def import_config(config: str) -> Any:
    """The `TeacherConfig` named by ``config``: a preset name, or a JSON file of
    `TeacherConfig.to_dict` output (the architecture of a differently sized release)."""
    from runtime.errors import InputError
    from teacher.config import TeacherConfig, teacher_config

    if not config.endswith(".json"):
        return teacher_config(config)
    path = Path(config)
    try:
        return TeacherConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"not a teacher config JSON ({exc})") from exc


def import_official(checkpoint: Path, llm: Path, out: Path, strict: bool = True,
                    config: str = "naturelm-8b") -> int:
    """Write the official NatureLM-audio weights as a teacher checkpoint at ``out``.

    Args:
        checkpoint: the published NatureLM-audio ``model.safetensors``.
        llm: local transformers folder of Llama-3.1-8B-Instruct (model and tokenizer); stored
            as an absolute path, and its weights are read from it again on load.
        out: the teacher checkpoint written (atomically; nothing is written on an error).
        strict: refuse weights whose keys or shapes differ from the model (listing them);
            with --no-strict, load what matches and warn about the rest.
        config: the architecture: a preset name, or a JSON file of a whole teacher config.
    """
    import torch

    from runtime.files import atomic_stream
    from teacher.checkpoint import local_llm_keys, teacher_checkpoint
    from teacher.official import load_naturelm_with_report
    from teacher.tokenizer import tokenizer_to_json

    llm = Path(llm).resolve()
    model, report = load_naturelm_with_report(Path(checkpoint), llm, strict=strict,
                                              cfg=import_config(config))
    external = local_llm_keys(model, overridden=report.loaded)
    ckpt = teacher_checkpoint(model, tokenizer_to_json(model.tokenizer), external,
                              teacher_imported_from=str(Path(checkpoint).resolve()))
    with atomic_stream(Path(out), binary=True) as handle:
        torch.save(ckpt, handle)
    stored = len(ckpt["state_dict"])
    print(f"{out}: NatureLM-audio teacher ({len(report.loaded)} tensors from {checkpoint}, "
          f"{stored} stored, {len(external)} read from {llm} on load)")
    return 0
