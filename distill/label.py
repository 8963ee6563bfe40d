"""`naturelm-edge distill label`: run the teacher over a corpus and write a target store.

Lightning prediction: `LabelModule` wraps the teacher, `LabelDataModule` serves the records that
have no target yet, grouped by clip (`clip_key`: one item is a clip with all of its pending
tasks), and `TargetWriter` (a `BasePredictionWriter`) writes every batch of every rank as its
own shard (`distill.targets`). Many GPUs or nodes are a Trainer ``devices`` / ``num_nodes`` /
``strategy`` away; Lightning's prediction sampler never repeats a clip across ranks. What is
already in the store is computed on every rank in ``setup``, before the setup barrier and
before anything is written, so all ranks agree on the work left.

For every record: the greedy answer (what `NatureLM.generate` says), the log-likelihood of every
label (what `NatureLM.score_labels` says, ``normalize="sum"``) and, for detection, the per-label
presence probabilities of `distill.targets.marginal_probs`. A batch costs one encoding per clip,
one run of the prompt up to the audio per clip, one run of the rest of each record's prompt
(shared by its answer and its candidates), greedy steps for the batch, and batched candidate
forwards (`teacher_rows`).

    $ naturelm-edge distill label runs/teacher-tiny/teacher.ckpt corpus/manifest.jsonl \\
          runs/targets --batch-size 8 --devices 2 --strategy ddp

    >>> import torch
    >>> from corpus.records import Record
    >>> from corpus.tasks import instruction_for
    >>> from teacher.config import teacher_config
    >>> from teacher.model import NatureLM
    >>> from teacher.tokenizer import train_tokenizer
    >>> _ = torch.manual_seed(0)
    >>> tokenizer = train_tokenizer([instruction_for("species"), "Kea", "Tui"], 300)
    >>> model = NatureLM(teacher_config("tiny").replace(clip_s=1.0), tokenizer).eval()
    >>> rec = Record(id="c1.species", task="species", instruction=instruction_for("species"),
    ...              output="Kea", labels=("Kea", "Tui"))
    >>> rows = teacher_rows(model, 0.1 * torch.randn(1, 16000), [rec], max_new_tokens=4)
    >>> sorted(rows[0]), len(rows[0]["scores"])
    (['answer', 'id', 'scores', 'task'], 2)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from corpus.records import Record
from corpus.tasks import NONE_LABEL, get_task
from distill.targets import (
    TargetMeta,
    TaskLabels,
    answer_text,
    detection_candidates,
    done_keys,
    marginal_probs,
    next_seq,
    write_index,
    write_meta,
    write_part,
)
from runtime.errors import InputError, ManifestError


def _parse_answer(task: str, answer: str, labels: Sequence[str]) -> list[str]:
    try:
        return get_task(task).parse(answer, labels)
    except KeyError:
        return [x for x in (p.strip() for p in answer.split(",")) if x in labels]


def teacher_rows(model: Any, audio: torch.Tensor, records: Sequence[Record],
                 max_new_tokens: int = 24, num_beams: int = 1,
                 audio_index: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The target rows of a batch, one per record.

    ``audio[C, clip_samples]`` holds the batch's clips and ``audio_index[i]`` the clip of
    ``records[i]`` (default: one clip per record, in order). Each clip is encoded once for all
    of its records, and the prompt up to its audio runs once per clip; the rest of each
    record's prompt runs once (`NatureLM.prompt_cache`) for its greedy answer and all of its
    candidates, and the candidates of the whole batch are scored together.
    """
    from teacher.lightning import is_multi_label

    index = list(range(len(records))) if audio_index is None else list(audio_index)
    if len(index) != len(records) or any(not 0 <= i < audio.shape[0] for i in index):
        raise ValueError(f"audio_index must give each of the {len(records)} records one of the "
                         f"{audio.shape[0]} clips, got {index}")
    instructions = [r.instruction for r in records]
    was_training = model.training
    model.eval()  # generate / score_labels run in eval mode: so does the encoding they share
    try:
        with torch.no_grad():
            tokens = model.encode_audio(audio)
    finally:
        model.train(was_training)
    prompt = model.prompt_cache(None, instructions, audio_embeds=tokens, audio_index=index)
    if num_beams == 1:
        answer_ids = model.greedy_from(prompt, max_new_tokens)
    else:
        embeds = tokens[torch.tensor(index, dtype=torch.long, device=tokens.device)]
        answer_ids = model.generate_ids(None, instructions, max_new_tokens, num_beams,
                                        audio_embeds=embeds)
    answers = [model.decode_answer(ids) for ids in answer_ids]
    candidates: list[list[frozenset[str]] | None] = []
    texts: list[list[str]] = []
    for record, answer in zip(records, answers, strict=True):
        labels = list(record.labels)
        if is_multi_label(record.task):
            cands = detection_candidates(labels, _parse_answer(record.task, answer, labels))
            candidates.append(cands)
            texts.append([answer_text(c, NONE_LABEL) for c in cands])
        else:
            candidates.append(None)
            texts.append(labels)
    ids = model.label_token_ids(texts, len(records))
    scores = model.score_from(prompt, ids).double().cpu().numpy()
    rows = []
    for i, record in enumerate(records):
        n = len(record.labels)
        row: dict[str, Any] = {"id": record.id, "task": record.task, "answer": answers[i],
                               "scores": [float(v) for v in scores[i, :n]]}
        cands = candidates[i]
        if cands is not None:
            probs = marginal_probs(cands, scores[i, :len(cands)], record.labels)
            row["probs"] = [float(v) for v in probs]
        rows.append(row)
    return rows


def clip_key(record: Record) -> tuple[Any, ...]:
    """What identifies a record's audio: its file span, or its id for in-memory audio.

    Records with one key are one clip: it is loaded and encoded once for all of them.
    """
    if record.audio is not None or record.file_name is None:
        return ("id", record.id)
    return ("file", record.file_name, record.offset_s, record.duration_s)


def group_by_clip(records: Sequence[Record]) -> list[list[Record]]:
    """Records grouped by `clip_key`, groups in order of first appearance."""
    groups: dict[tuple[Any, ...], list[Record]] = {}
    for r in records:
        groups.setdefault(clip_key(r), []).append(r)
    return list(groups.values())


class LabelDataset(Dataset):
    """One item per clip: ``{"audio": [clip_samples], "records": [...], "cut_s"}`` at the
    teacher's rate and length, with every record (task) of that clip."""

    def __init__(self, records: Sequence[Record], sample_rate: int, clip_s: float) -> None:
        self.clips = group_by_clip(records)
        self.sample_rate = sample_rate
        self.samples = int(round(clip_s * sample_rate))

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from teacher.lightning import fit_length, load_clip

        records = self.clips[index]
        audio = load_clip(records[0], self.sample_rate)
        cut = max(0, audio.shape[0] - self.samples) / self.sample_rate
        clip = fit_length(audio, self.samples, None)
        return {"audio": torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32)),
                "records": [_plain(r) for r in records], "cut_s": cut}


def _plain(record: Record) -> dict[str, Any]:
    """What `teacher_rows` needs of a record, as a dict (Lightning moves batches through
    `apply_to_collection`, which refuses frozen dataclasses)."""
    return {"id": record.id, "task": record.task, "instruction": record.instruction,
            "labels": list(record.labels)}


def _from_plain(row: dict[str, Any]) -> Record:
    return Record(id=row["id"], task=row["task"], instruction=row["instruction"], output="",
                  labels=tuple(row["labels"]))


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Clips stacked; their records flattened, with each record's clip row and cut."""
    records, index, cuts = [], [], []
    for c, item in enumerate(items):
        records.extend(item["records"])
        index.extend([c] * len(item["records"]))
        cuts.extend([item["cut_s"]] * len(item["records"]))
    return {"audio": torch.stack([x["audio"] for x in items]), "records": records,
            "audio_index": index, "cut_s": cuts}


class LabelDataModule(pl.LightningDataModule):
    """The records of ``records`` with no target in the store at ``out`` yet."""

    def __init__(self, records: Sequence[Record], out: Path, sample_rate: int, clip_s: float,
                 batch_size: int = 8, num_workers: int = 0) -> None:
        super().__init__()
        self.records = list(records)
        self.out = Path(out)
        self.sample_rate = sample_rate
        self.clip_s = clip_s
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pending: list[Record] = []
        self.already = 0

    def setup(self, stage: str) -> None:
        done = done_keys(self.out)
        self.pending = [r for r in self.records if (r.id, r.task) not in done]
        self.already = len(self.records) - len(self.pending)

    def predict_dataloader(self) -> DataLoader:
        dataset = LabelDataset(self.pending, self.sample_rate, self.clip_s)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=_collate)


class LabelModule(pl.LightningModule):
    """The teacher in prediction: ``predict_step`` returns the target rows of a batch."""

    def __init__(self, teacher: torch.nn.Module, max_new_tokens: int = 24,
                 num_beams: int = 1) -> None:
        super().__init__()
        self.teacher = teacher
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        records = [_from_plain(r) for r in batch["records"]]
        rows = teacher_rows(self.teacher, batch["audio"], records, self.max_new_tokens,
                            self.num_beams, batch.get("audio_index"))
        for row, cut in zip(rows, batch["cut_s"], strict=True):
            if cut > 0:
                row["cut_s"] = float(cut)
        return rows


class TargetWriter(BasePredictionWriter):
    """Writes each batch's rows as one shard of this rank; the index once all ranks are done."""

    def __init__(self, out: Path) -> None:
        super().__init__(write_interval="batch")
        self.out = Path(out)
        self.rank = 0
        self.seq = 0
        self.written = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.rank = trainer.global_rank
        self.seq = next_seq(self.out, self.rank)

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           prediction: Any, batch_indices: Sequence[int] | None, batch: Any,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        write_part(self.out, self.rank, self.seq, prediction)
        self.seq += 1
        self.written += len(prediction)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier("targets_written")
        if trainer.is_global_zero:
            write_index(self.out)


def label_sets(records: Sequence[Record], where: Path) -> dict[str, TaskLabels]:
    """Each task's label set; a task whose records disagree on it raises `ManifestError`."""
    from teacher.lightning import is_multi_label

    sets: dict[str, TaskLabels] = {}
    for r in records:
        entry = TaskLabels(tuple(r.labels), is_multi_label(r.task))
        if sets.setdefault(r.task, entry) != entry:
            raise ManifestError(where, f"record {r.id!r}: task {r.task!r} has label set "
                                       f"{list(r.labels)}, others {list(sets[r.task].labels)}")
    return sets


def select_records(manifest: Path, split: str | None, tasks: Sequence[str] | None
                   ) -> tuple[list[Record], int]:
    """Records to label (of ``split`` and ``tasks``) and the count skipped for no label set."""
    from corpus.manifest import read_manifest

    records = [r for r in read_manifest(manifest)
               if (split is None or r.split == split) and (not tasks or r.task in set(tasks))]
    usable = [r for r in records if r.labels]
    if not usable:
        raise ManifestError(manifest, "no records with a label set to label"
                            + (f" in split {split!r}" if split else "")
                            + (f" for tasks {list(tasks)}" if tasks else ""))
    return usable, len(records) - len(usable)


def label(teacher: Path, manifest: Path, out: Path, batch_size: int = 8,
          split: str | None = None, tasks: list[str] | None = None, accelerator: str = "auto",
          devices: str = "auto", strategy: str = "auto", num_nodes: int = 1,
          precision: str = "32-true", num_workers: int = 0, max_new_tokens: int = 24,
          num_beams: int = 1, resume: bool = True, num_threads: int = 1) -> int:
    """Label a corpus with the teacher: per clip and task, every label's log-likelihood, the
    generated answer and the teacher's config hash, sharded by rank (resumable).

    Args:
        teacher: a teacher checkpoint (`naturelm-edge teacher fit`).
        manifest: a JSONL / CSV manifest of records.
        out: the target store folder (created; an existing one of the same teacher is resumed).
        batch_size: clips per batch and per shard, each with all of its pending tasks.
        split: label only this split (default: all).
        tasks: label only these tasks (default: all with a label set).
        accelerator: Lightning accelerator (cpu, gpu, auto).
        devices: devices per node (a number, a list like "0,1", or auto).
        strategy: Lightning strategy (auto, ddp, ...).
        num_nodes: nodes.
        precision: Lightning precision (32-true, bf16-mixed, ...).
        num_workers: DataLoader worker processes per rank.
        max_new_tokens: longest generated answer.
        num_beams: beam width of the generated answer (1 is greedy).
        resume: continue a store that holds shards; with --no-resume such a store is refused.
        num_threads: torch CPU threads per process while labelling (restored afterwards); 0
            leaves torch's setting. 1 is the default: the labelling forwards are small, and
            on a 2-core machine shared with other work one thread labelled about 5x faster
            than two (`benchmarks.label_speed`); use more processes (--devices) for more cores.
    """
    from teacher.checkpoint import load_teacher
    from teacher.config import config_hash

    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0 (0: torch's setting), got {num_threads}")
    out = Path(out)
    records, unlabelled = select_records(Path(manifest), split, tasks)
    if not resume and any(out.glob("shards/part-*.jsonl")):
        raise InputError(out, "already holds targets; resume it, or choose an empty folder")
    model = load_teacher(teacher)
    cfg = model.cfg
    meta = TargetMeta(teacher_hash=config_hash(cfg), teacher_config=cfg.to_dict(),
                      tasks=label_sets(records, Path(manifest)), sample_rate=cfg.sample_rate,
                      clip_s=cfg.clip_s)
    write_meta(out, meta)
    data = LabelDataModule(records, out, cfg.sample_rate, cfg.clip_s, batch_size, num_workers)
    writer = TargetWriter(out)
    trainer = pl.Trainer(accelerator=accelerator, devices=_devices(devices), strategy=strategy,
                         num_nodes=num_nodes, precision=precision, callbacks=[writer],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    threads = torch.get_num_threads()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        trainer.predict(LabelModule(model, max_new_tokens, num_beams), datamodule=data,
                        return_predictions=False)
    finally:
        torch.set_num_threads(threads)
    if trainer.is_global_zero:
        print(f"{out}: {len(records)} clip-tasks, {data.already} already labelled, "
              f"{len(records) - data.already} labelled now (teacher {meta.teacher_hash})"
              + (f"; {unlabelled} without a label set skipped" if unlabelled else ""),
              file=sys.stderr)
    return 0


def _devices(value: str | int) -> Any:
    text = str(value)
    if text == "auto":
        return "auto"
    if text.isdigit() or text == "-1":
        return int(text)
    return [int(x) for x in text.split(",") if x.strip()]
