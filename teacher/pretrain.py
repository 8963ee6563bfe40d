"""Supervised pretraining of the teacher's BEATs encoder on a corpus's clip-level labels.

NatureLM-audio starts from a *pretrained* BEATs (BEATs_iter3_plus_AS2M: self-supervised, then
fine-tuned on AudioSet labels). Offline nothing comparable exists for the ``tiny`` preset,
so this module is the analogue of the AudioSet fine-tuning: the preset's encoder, mean
pooling over its tokens and one linear head per task, trained on the manifest's clips with
cross-entropy (single-label tasks: species, life stage, call type, count) and binary
cross-entropy (multi-label tasks: detection, multi-hot over its labels). The encoder is
saved in the official BEATs checkpoint format ``{"cfg": ..., "model": ...}``, so
:func:`teacher.beats.load_beats` (and a teacher built on the same encoder config) reads it.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from teacher.pretrain import clip_targets
    >>> from corpus.records import Record
    >>> recs = [Record(id="a.s", task="species", instruction="", output="Kea",
    ...                labels=("Kea", "Tui"), file_name="a.flac"),
    ...         Record(id="a.d", task="detection", instruction="", output="Kea, Tui",
    ...                labels=("Kea", "Tui", "None"), file_name="a.flac")]
    >>> clips, heads = clip_targets(recs)
    >>> len(clips), heads["species"].labels, clips[0].targets["detection"]
    (1, ('Kea', 'Tui'), (0, 1))

Command line (the figures are printed per epoch; a few minutes on one CPU thread):

    python -c "from pathlib import Path; from teacher.pretrain import pretrain_encoder; \
pretrain_encoder(Path('/tmp/synth/manifest.jsonl'), Path('runs/beats-tiny.pt'))"
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from corpus.records import Record
from runtime.errors import ManifestError


@dataclass(frozen=True)
class TaskHead:
    """One task's label vocabulary and kind (multi-label: a multi-hot target)."""

    name: str
    labels: tuple[str, ...]
    multi_label: bool


@dataclass(frozen=True)
class ClipTargets:
    """One clip (its first record locates the audio) and its target per task.

    Single-label tasks map to a class index; multi-label tasks to the indices present.
    """

    record: Record
    split: str
    targets: dict[str, int | tuple[int, ...]]


def _answer_parts(output: str) -> list[str]:
    return [part.strip() for part in output.split(",") if part.strip()]


def clip_targets(records: Sequence[Record]) -> tuple[list[ClipTargets], dict[str, TaskHead]]:
    """Group ``records`` by clip and turn each task's answer into a target.

    A task's vocabulary is the union of its records' ``labels`` in order of first
    appearance. An answer outside its record's labels raises ``ManifestError``.
    """
    from distill.label import group_by_clip
    from teacher.lightning import is_multi_label

    vocab: dict[str, dict[str, int]] = {}
    for record in records:
        names = vocab.setdefault(record.task, {})
        for label in record.labels:
            names.setdefault(label, len(names))
    heads = {task: TaskHead(task, tuple(names), is_multi_label(task))
             for task, names in vocab.items()}
    clips: list[ClipTargets] = []
    for group in group_by_clip(records):
        targets: dict[str, int | tuple[int, ...]] = {}
        for record in group:
            names = vocab[record.task]
            parts = _answer_parts(record.output) if heads[record.task].multi_label \
                else [record.output.strip()]
            unknown = [p for p in parts if p not in names]
            if unknown or not parts:
                raise ManifestError(
                    record.file_name or record.id,
                    f"record {record.id!r}: answer {record.output!r} is not among its labels "
                    f"({', '.join(record.labels) or 'none given'})")
            if heads[record.task].multi_label:
                targets[record.task] = tuple(sorted(names[p] for p in parts))
            else:
                targets[record.task] = names[parts[0]]
        clips.append(ClipTargets(group[0], group[0].split, targets))
    return clips, heads


def _target_tensors(clips: Sequence[ClipTargets], heads: dict[str, TaskHead]) -> dict[str, Any]:
    """Per task: class indices (``-100`` where a clip lacks the task) or multi-hot rows with
    a presence mask."""
    import torch

    out: dict[str, Any] = {}
    for task, head in heads.items():
        if head.multi_label:
            hot = torch.zeros(len(clips), len(head.labels))
            present = torch.zeros(len(clips), dtype=torch.bool)
            for i, clip in enumerate(clips):
                if task in clip.targets:
                    present[i] = True
                    hot[i, list(clip.targets[task])] = 1.0  # type: ignore[arg-type]
            out[task] = (hot, present)
        else:
            out[task] = torch.tensor([int(clip.targets.get(task, -100)) for clip in clips])
    return out


def load_fbank(clips: Sequence[ClipTargets], beats: Any, samples: int,
               chunk: int = 32) -> Any:
    """``[clips, frames, mel]`` float16 normalised fbank (``beats.preprocess``) of each clip,
    cut (from its start) or zero-padded to ``samples``: the encoder's fixed input, computed
    once so that every epoch runs only the trained layers (1,996 x 32 values per 10 s clip
    for the `tiny` preset's 32 bins at a 5 ms hop: 2/5 of the waveform's memory)."""
    import torch

    from teacher.lightning import fit_length, load_clip

    rate = beats.cfg.sample_rate
    out: list[torch.Tensor] = []
    for start in range(0, len(clips), chunk):
        waves = torch.stack([
            torch.from_numpy(np.ascontiguousarray(
                fit_length(load_clip(clip.record, rate), samples, None), dtype=np.float32))
            for clip in clips[start:start + chunk]])
        with torch.no_grad():
            out.append(beats.preprocess(waves).to(torch.float16))
    return torch.cat(out)


def roll_time(feats: Any, generator: Any) -> Any:
    """Each clip's fbank rotated by its own random number of frames: the calls move in time,
    every clip-level label stays true (a clip's animals call anywhere in it)."""
    import torch

    batch, frames = feats.shape[:2]
    shift = torch.randint(0, frames, (batch, 1), generator=generator)
    index = (torch.arange(frames).unsqueeze(0) - shift) % frames
    return torch.gather(feats, 1, index.unsqueeze(-1).expand_as(feats))


POOLINGS = ("mean", "meanmax")


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")


def build_pretrain_model(encoder_cfg: Any, heads: dict[str, TaskHead],
                         pooling: str = "mean") -> Any:
    """BEATs(``encoder_cfg``) + pooling over its tokens + one linear head per task (an
    ``nn.Module`` whose ``forward(fbank)`` takes `load_fbank`'s features and returns
    ``(pooled [B, D or 2D], {task: logits})``).

    ``pooling``: ``"mean"`` (the mean token, as BEATs' AudioSet classifier) or ``"meanmax"``
    (the mean and the per-feature maximum, concatenated: a short call in one token can decide
    a clip label rather than be averaged with the background). Only the encoder is kept, so
    the pooling changes what it learns, not its format. Measured on the default corpus (the
    `tiny` recipe at its former 10 ms hop, 24 epochs): "meanmax" lifts these heads' held-out
    species (84.6% -> 86.2%), but the teacher trained on that encoder is no better (test
    species 83.7% with "mean", 82.8% with "meanmax"; call type 95.0% / 92.5%), so "mean"
    stays the default."""
    import torch
    from torch import nn

    from teacher.beats import BEATs

    _check_pooling(pooling)

    class _Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.beats = BEATs(encoder_cfg)
            width = encoder_cfg.encoder_embed_dim * (2 if pooling == "meanmax" else 1)
            self.heads = nn.ModuleDict({t: nn.Linear(width, len(h.labels))
                                        for t, h in heads.items()})

        def pooled(self, fbank: torch.Tensor) -> torch.Tensor:
            features, _ = self.beats.encode_fbank(fbank)
            if pooling == "mean":
                return features.mean(dim=1)
            return torch.cat([features.mean(dim=1), features.amax(dim=1)], dim=-1)

        def forward(self, fbank: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            pooled = self.pooled(fbank)
            return pooled, {t: head(pooled) for t, head in self.heads.items()}

    return _Model()


def _loss(logits: dict[str, Any], targets: dict[str, Any], index: Any,
          heads: dict[str, TaskHead]) -> Any:
    import torch.nn.functional as F  # noqa: N812

    total = logits[next(iter(logits))].new_zeros(())
    for task, head in heads.items():
        if head.multi_label:
            hot, present = targets[task]
            hot, present = hot[index].to(total.device), present[index].to(total.device)
            if present.any():
                total = total + F.binary_cross_entropy_with_logits(
                    logits[task][present], hot[present])
        else:
            target = targets[task][index].to(total.device)
            if (target >= 0).any():
                total = total + F.cross_entropy(logits[task], target, ignore_index=-100)
    return total


def evaluate(model: Any, feats: Any, targets: dict[str, Any], heads: dict[str, TaskHead],
             batch_size: int) -> dict[str, float]:
    """Per task: accuracy (single-label) or micro-F1 at probability 0.5 (multi-label); the
    model may sit on any device, ``feats`` and ``targets`` stay on the CPU."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    outs: dict[str, list[torch.Tensor]] = {t: [] for t in heads}
    with torch.no_grad():
        for start in range(0, feats.shape[0], batch_size):
            _, logits = model(feats[start:start + batch_size].to(device).float())
            for task in heads:
                outs[task].append(logits[task].cpu())
    model.train()
    metrics: dict[str, float] = {}
    for task, head in heads.items():
        logits = torch.cat(outs[task])
        if head.multi_label:
            hot, present = targets[task]
            pred = (logits[present] > 0).float()
            truth = hot[present]
            tp = float((pred * truth).sum())
            denom = float(pred.sum() + truth.sum())
            metrics[task] = 2.0 * tp / denom if denom > 0 else float("nan")
        else:
            target = targets[task]
            keep = target >= 0
            metrics[task] = float((logits[keep].argmax(-1) == target[keep]).float().mean()) \
                if keep.any() else float("nan")
    return metrics


def _format(metrics: dict[str, float], heads: dict[str, TaskHead]) -> str:
    return "  ".join(f"{t} {'F1' if heads[t].multi_label else 'acc'} {v:.3f}"
                     for t, v in metrics.items())


def pretraining_records(manifest: Path, extra_manifests: Sequence[Path], train_split: str,
                        ) -> tuple[list[Record], list[Record]]:
    """``manifest``'s records, and every record of ``extra_manifests`` moved into
    ``train_split``. A clip (the same audio file span, `distill.label.clip_key`) in two of the
    manifests raises ``ManifestError`` naming both files: it would be trained on twice, or
    leak into the held-out split. Record ids may repeat across manifests (each corpus names
    its own clips)."""
    from dataclasses import replace

    from corpus.manifest import read_manifest
    from distill.label import clip_key

    records = read_manifest(manifest)
    seen = {clip_key(r): (0, manifest) for r in records}
    extra: list[Record] = []
    for index, path in enumerate(extra_manifests, start=1):
        own = read_manifest(path)
        for record in own:
            key = clip_key(record)
            if key in seen and seen[key][0] != index:
                raise ManifestError(path, f"record {record.id!r} is audio that {seen[key][1]} "
                                          "also holds: the extra manifests must hold other "
                                          "clips")
        seen.update((clip_key(r), (index, path)) for r in own)
        extra += [replace(r, split=train_split) for r in own]
    return records, extra


def pretrain_encoder(manifest: Path, out: Path, preset: str = "tiny", epochs: int = 8,
                     batch_size: int = 16, lr: float = 2e-3, num_threads: int = 1,
                     max_minutes: float | None = None, weight_decay: float = 0.01,
                     warmup_steps: int = 30, train_split: str = "train",
                     val_split: str = "valid", seed: int = 0,
                     clip_s: float | None = None, time_roll: bool = True,
                     extra_manifests: list[Path] | None = None, device: str = "cpu",
                     pooling: str = "mean") -> int:
    """Train the ``preset`` teacher's encoder on the clip labels of ``manifest``; save it.

    The encoder config is the teacher preset's (``teacher.config.teacher_config(preset)``;
    unknown names raise), clips are cut or zero-padded to its ``clip_s`` (or ``clip_s`` given
    here) at its rate; their fbank is computed once (`load_fbank`) and, with ``time_roll``,
    each training clip's is rotated in time by a random amount every step (`roll_time`: the
    small corpus is otherwise memorised within a few epochs). AdamW
    with linear warm-up and cosine decay over ``epochs`` (stopping early once
    ``max_minutes`` have passed); per-task validation figures are printed after each epoch
    and stored in the checkpoint under ``"pretrain"``. ``extra_manifests`` add more
    training clips, every clip of each (all its splits: a separate pretraining corpus, such
    as a synthetic chorus of another seed, whose recordings are not the held-out ones of
    ``manifest``); the held-out figures stay on ``manifest``'s ``val_split``. Writes ``out``
    atomically as ``{"cfg", "model", "pretrain"}``; returns 0.

    Args:
        manifest: a JSONL / CSV manifest whose records carry the clip labels.
        out: the encoder checkpoint to write (official BEATs format).
        preset: the teacher preset whose encoder is trained.
        epochs: passes over the training clips.
        batch_size: clips per step.
        lr: peak AdamW learning rate.
        num_threads: torch intra-op threads.
        max_minutes: stop after the epoch that passes this many minutes.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        train_split: the split trained on.
        val_split: the split the per-epoch figures are measured on.
        seed: seeds the initialisation, the order and the rotations.
        clip_s: clip length in seconds (default: the preset's).
        time_roll: rotate each training clip's fbank in time by a random amount.
        extra_manifests: further manifests trained on whole (every split); the same clip
            in two manifests is refused.
        device: torch device of the training steps (cpu, cuda, cuda:1); the fbank is
            computed once on the CPU and each batch is moved to it.
        pooling: how the heads see the tokens: "mean" or "meanmax" (mean and maximum;
            `build_pretrain_model`).
    """
    import torch

    from runtime.files import atomic_stream
    from teacher.beats import beats_state_dict_keys
    from teacher.config import teacher_config
    from teacher.lightning import warmup_cosine

    if epochs < 1 or batch_size < 1 or num_threads < 1:
        raise ValueError("epochs, batch_size and num_threads must be at least 1")
    _check_pooling(pooling)
    try:
        run_on = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown torch device {device!r} ({exc})") from exc
    if run_on.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device here")
    cfg = teacher_config(preset)
    samples = cfg.clip_samples if clip_s is None else int(round(clip_s * cfg.sample_rate))
    records, extra = pretraining_records(manifest, extra_manifests or [], train_split)
    clips, heads = clip_targets([*records, *extra])
    train = [c for c in clips if c.split == train_split]
    val = [c for c in clips if c.split == val_split]
    if not any(r.split == train_split for r in records):
        raise ManifestError(manifest, f"no clips in split {train_split!r}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        started = time.monotonic()
        model = build_pretrain_model(cfg.encoder, heads, pooling)
        train_feats = load_fbank(train, model.beats, samples)
        val_feats = load_fbank(val, model.beats, samples)
        train_targets = _target_tensors(train, heads)
        val_targets = _target_tensors(val, heads)
        model.to(run_on)
        print(f"pretrain {preset}: {len(train)} train / {len(val)} val clips loaded in "
              f"{time.monotonic() - started:.0f} s; tasks "
              + ", ".join(f"{t} ({len(h.labels)})" for t, h in heads.items()), flush=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                      betas=(0.9, 0.98))
        steps_per_epoch = math.ceil(len(train) / batch_size)
        total = steps_per_epoch * epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, warmup_steps, total, 0.05))
        generator = torch.Generator().manual_seed(seed)
        metrics: dict[str, float] = {}
        history: list[dict[str, float]] = []
        started = time.monotonic()
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(train), generator=generator)
            running = 0.0
            for step in range(steps_per_epoch):
                index = order[step * batch_size:(step + 1) * batch_size]
                batch = train_feats[index].float()
                batch = roll_time(batch, generator) if time_roll else batch
                _, logits = model(batch.to(run_on))
                loss = _loss(logits, train_targets, index, heads)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                running += float(loss.detach())
            minutes = (time.monotonic() - started) / 60.0
            metrics = evaluate(model, val_feats, val_targets, heads, batch_size) if val else {}
            history.append({"epoch": float(epoch + 1), "loss": running / steps_per_epoch,
                            "minutes": minutes, **metrics})
            print(f"epoch {epoch + 1}/{epochs} {minutes:.1f} min loss "
                  f"{running / steps_per_epoch:.3f}  val {_format(metrics, heads)}", flush=True)
            if max_minutes is not None and minutes >= max_minutes:
                break
        state = {k: v.detach().cpu().clone() for k, v in model.beats.state_dict().items()}
        checkpoint = {
            "cfg": cfg.encoder.to_dict(),
            "model": beats_state_dict_keys(state),
            "pretrain": {"preset": preset, "manifest": os.fspath(manifest),
                         "extra_manifests": [os.fspath(m) for m in extra_manifests or []],
                         "train_clips": len(train), "time_roll": time_roll,
                         "pooling": pooling,
                         "tasks": {t: list(h.labels) for t, h in heads.items()},
                         "history": history},
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_stream(out, binary=True) as handle:
            torch.save(checkpoint, handle)
        print(f"saved encoder to {out}", flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    return 0
