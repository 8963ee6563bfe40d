"""Training students by knowledge distillation with Lightning: `StudentModule`, `StudentDataModule`.

The data module groups a manifest's records into clips (records sharing audio: file, offset and
duration), one example per clip with every task's teacher target from a `TargetStore`, its mask
and the ground truth. A clip-task with a record but no target is masked (no KD term) and counted
in ``missing``; never dropped silently. Training audio is augmented per clip: random crop, gain,
circular time shift and background noise at a random SNR (background clips from the corpus's
empty detection clips, else pink noise); and per batch in the module: mixing two clips
(``x = lam * a + (1 - lam) * b`` with ``lam >= 0.5``; single-label teacher distributions are
mixed linearly in probability, detection probabilities as a union ``1 - (1 - p)(1 - q)``, the
"None" label as ``p * q``; hard labels follow the dominant clip, detection ground truth takes
the union). With ``cache_audio`` every clip is decoded once, in `StudentDataModule.setup` in the
main process, into an `AudioCache` (int16) that DataLoader workers forked afterwards share
copy-on-write; augmentation still runs per item and per step.

Loss: `distill.losses.multitask_kd_loss` (tempered KL x T^2 blended with the hard labels;
binary KD for detection). Validation logs per task ``val/agreement/<task>`` (top-1 agreement
with the teacher; for detection the share of clips whose thresholded label set equals the
teacher's), ``val/accuracy/<task>`` (against ground truth; detection: exact set) and
``val/teacher_accuracy/<task>``; ``val/agreement`` (their mean) is what checkpoints monitor.

    $ naturelm-edge distill fit --config student-s --data.manifest corpus/manifest.jsonl \\
          --data.targets runs/targets --trainer.default_root_dir runs/student-s

    >>> mix_single(torch.log(torch.tensor([[0.9, 0.1]])), torch.log(torch.tensor([[0.1, 0.9]])),
    ...            torch.tensor([0.5])).exp()
    tensor([[0.5000, 0.5000]])
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from corpus.records import Record
from corpus.tasks import NONE_LABEL
from distill.targets import TargetMismatchError, TargetStore, check_label_sets, read_meta

NO_LABEL = -1


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Clip:
    """One clip's audio reference and its record per task."""

    key: str
    audio: Record
    records: dict[str, Record]


def clip_key(record: Record) -> str:
    """Names a record's audio: file, offset and duration (the record id for in-memory audio)."""
    if record.file_name:
        return f"{record.file_name}|{record.offset_s}|{record.duration_s}"
    return record.id


def group_clips(records: Sequence[Record]) -> list[Clip]:
    """Records sharing audio (file, offset, duration; else id) as clips, in first-seen order."""
    groups: dict[str, dict[str, Record]] = {}
    first: dict[str, Record] = {}
    for r in records:
        key = clip_key(r)
        first.setdefault(key, r)
        tasks = groups.setdefault(key, {})
        if r.task in tasks:
            raise ValueError(f"records {tasks[r.task].id!r} and {r.id!r} share audio and task "
                             f"{r.task!r}")
        tasks[r.task] = r
    return [Clip(key, first[key], groups[key]) for key in groups]


def hard_label(record: Record | None, labels: Sequence[str], multi_label: bool) -> torch.Tensor:
    """Ground truth: a label index (``-1`` when unknown), or a 0/1 row (``-1`` row)."""
    if multi_label:
        row = torch.full((len(labels),), float(NO_LABEL))
        if record is None:
            return row
        from teacher.eval import split_answer

        present = {x for x in split_answer(record.output) if x != NONE_LABEL}
        if not present <= set(labels):
            return row
        row = torch.tensor([float(x in present) for x in labels])
        if NONE_LABEL in labels:
            row[list(labels).index(NONE_LABEL)] = float(not present)
        return row
    if record is None or record.output not in labels:
        return torch.tensor(NO_LABEL)
    return torch.tensor(list(labels).index(record.output))


class AudioCache:
    """Clips decoded once (`teacher.lightning.load_clip`) and held in memory as int16.

    Each file-backed clip is one int16 numpy array with a per-clip scale: ``32768`` when the
    clip fits (16-bit PCM files at the cached rate then come back bit-exact), else
    ``32767 / peak`` (resampled or float audio keeps 16-bit resolution relative to its peak).
    `clip` returns float32 samples exactly as `load_clip` would, before any crop. Records holding
    in-memory audio are not copied (`clip` hands them to `load_clip`).

    Memory: 2 bytes per sample, i.e. ``2 * sample_rate`` bytes per clip-second: 32,000 B at
    16 kHz, so a 10 s clip takes 320 kB and the default corpus's 1,280 training clips about
    410 MB (float32 would take twice that); plus about 200 B of index per clip. Built in the
    main process before DataLoader workers fork, the arrays are shared copy-on-write: reading
    never writes their pages, so workers add no copy (with the ``spawn`` start method each
    worker unpickles its own copy).

        >>> import tempfile, soundfile as sf
        >>> from corpus.records import Record
        >>> path = Path(tempfile.mkdtemp()) / "tone.flac"
        >>> sf.write(path, np.sin(np.arange(16000) / 8) / 2, 16000)  # 1 s, 16-bit PCM
        >>> rec = Record(id="a", task="species", instruction="", output="x", file_name=str(path))
        >>> cache = AudioCache([rec], 16000)
        >>> len(cache), cache.nbytes, cache.clip(rec).dtype
        (1, 32000, dtype('float32'))
        >>> from teacher.lightning import load_clip
        >>> bool(np.array_equal(cache.clip(rec), load_clip(rec, 16000)))
        True
    """

    def __init__(self, records: Iterable[Record], sample_rate: int) -> None:
        from teacher.lightning import load_clip

        self.sample_rate = sample_rate
        self._clips: dict[str, tuple[np.ndarray, float]] = {}
        for record in records:
            key = clip_key(record)
            if record.audio is not None or key in self._clips:
                continue
            audio = load_clip(record, sample_rate)
            peak = float(np.max(np.abs(audio))) if audio.size else 0.0
            scale = 32768.0 if peak * 32768.0 <= 32767.0 else 32767.0 / peak
            self._clips[key] = (np.rint(audio * np.float32(scale)).astype(np.int16), scale)

    def __len__(self) -> int:
        return len(self._clips)

    def __contains__(self, record: Record) -> bool:
        return clip_key(record) in self._clips

    @property
    def nbytes(self) -> int:
        """Bytes of decoded samples held."""
        return sum(a.nbytes for a, _ in self._clips.values())

    def clip(self, record: Record) -> np.ndarray:
        """The record's float32 samples at the cache's rate (what `load_clip` returns)."""
        if record.audio is not None:
            from teacher.lightning import load_clip

            return load_clip(record, self.sample_rate)
        entry = self._clips.get(clip_key(record))
        if entry is None:
            raise KeyError(f"clip {clip_key(record)!r} (record {record.id!r}) is not in the "
                           f"audio cache")
        samples, scale = entry
        return samples.astype(np.float32) / np.float32(scale)


class ClipTargets(Dataset):
    """Clips with every task's teacher target: ``{"audio", "targets": {task: {...}}}``.

    Per task: ``teacher`` (log-likelihoods, or probabilities for multi-label tasks; zeros when
    masked), ``mask`` (a target exists), ``hard`` (ground truth, see `hard_label`). With a
    ``cache`` (holding every clip and background) audio comes from it instead of being decoded
    per item; items and their random augmentation are otherwise the same.
    """

    def __init__(self, clips: Sequence[Clip], store: TargetStore, tasks: Sequence[str],
                 sample_rate: int, clip_s: float, augment: bool = False,
                 gain_db: tuple[float, float] = (-6.0, 6.0), shift_s: float = 1.0,
                 noise_prob: float = 0.0, snr_db: tuple[float, float] = (5.0, 30.0),
                 backgrounds: Sequence[Record] = (), cache: AudioCache | None = None) -> None:
        if cache is not None and cache.sample_rate != sample_rate:
            raise ValueError(f"the audio cache holds {cache.sample_rate} Hz audio, the dataset "
                             f"reads {sample_rate} Hz")
        self.clips = list(clips)
        self.store = store
        self.tasks = list(tasks)
        self.sample_rate = sample_rate
        self.samples = int(round(clip_s * sample_rate))
        self.augment = augment
        self.gain_db = gain_db
        self.shift = int(round(shift_s * sample_rate))
        self.noise_prob = noise_prob
        self.snr_db = snr_db
        self.backgrounds = list(backgrounds)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.clips)

    def _audio(self, record: Record, rng: np.random.Generator | None) -> np.ndarray:
        from teacher.lightning import fit_length, load_clip

        audio = self.cache.clip(record) if self.cache is not None \
            else load_clip(record, self.sample_rate)
        return fit_length(audio, self.samples, rng)

    def _augment(self, audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from teacher.lightning import mix_at_snr, pink_noise

        audio = audio * np.float32(10.0 ** (rng.uniform(*self.gain_db) / 20.0))
        if self.shift > 0:
            audio = np.roll(audio, int(rng.integers(-self.shift, self.shift + 1)))
        if rng.random() < self.noise_prob:
            if self.backgrounds:
                pick = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
                noise = self._audio(pick, rng)
            else:
                noise = pink_noise(self.samples, rng)
            audio = mix_at_snr(audio, noise, float(rng.uniform(*self.snr_db)))
        return audio

    def targets(self, clip: Clip) -> dict[str, dict[str, torch.Tensor]]:
        """The per-task target tensors of ``clip``."""
        out = {}
        for task in self.tasks:
            info = self.store.meta.tasks[task]
            record = clip.records.get(task)
            target = self.store.get(record.id, task) if record is not None else None
            n = len(info.labels)
            if target is None:
                teacher = torch.zeros(n)
            else:
                values = target.probs if info.multi_label else target.scores
                teacher = torch.from_numpy(np.asarray(values, dtype=np.float32))
            out[task] = {"teacher": teacher, "mask": torch.tensor(target is not None),
                         "hard": hard_label(record, info.labels, info.multi_label)}
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = self.clips[index]
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item())) \
            if self.augment else None
        audio = self._audio(clip.audio, rng)
        if rng is not None:
            audio = self._augment(audio, rng)
        return {"audio": torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)),
                "targets": self.targets(clip)}


class StudentDataModule(pl.LightningDataModule):
    """Corpus clips with teacher targets for distillation.

    Args:
        manifest: a JSONL / CSV manifest of records (the corpus the targets were written for).
        targets: a target store folder (`naturelm-edge distill label`).
        batch_size: clips per batch (per device).
        num_workers: DataLoader worker processes.
        sample_rate: the student's input rate (audio is resampled to it).
        clip_s: seconds per clip (crop or pad); default the teacher's clip length.
        tasks: tasks trained (default: every task in the store).
        train_split: split trained on.
        val_split: split validated on (skipped when empty).
        gain_db: range of the random gain, in dB.
        shift_s: largest circular time shift, in seconds.
        noise_prob: probability of mixing background noise into a training clip.
        snr_db: range of that mix's signal-to-noise ratio, in dB.
        cache_audio: decode every clip of the splits used once, in `setup` (the main process,
            before DataLoader workers fork and share it copy-on-write), into an `AudioCache`:
            ``2 * sample_rate`` bytes per clip-second (32 kB at 16 kHz; about 410 MB for 1,280
            training clips of 10 s). An unreadable clip then fails `setup`, naming its file.
            Off, each item decodes its clip (and background) again.
    """

    def __init__(self, manifest: str, targets: str, batch_size: int = 32, num_workers: int = 0,
                 sample_rate: int = 16000, clip_s: float | None = None,
                 tasks: list[str] | None = None, train_split: str = "train",
                 val_split: str = "valid", gain_db: tuple[float, float] = (-6.0, 6.0),
                 shift_s: float = 1.0, noise_prob: float = 0.3,
                 snr_db: tuple[float, float] = (5.0, 30.0), cache_audio: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._store: TargetStore | None = None
        self._clips: dict[str, list[Clip]] = {}
        self._caches: dict[str, AudioCache] = {}
        self.missing: dict[str, int] = {}

    def setup(self, stage: str) -> None:
        """With ``cache_audio``, decode the clips of the stage's splits (fit: train and val;
        validate: val) before any DataLoader worker starts."""
        if not self.hparams.cache_audio:
            return
        splits = {"fit": [self.hparams.train_split, self.hparams.val_split],
                  "validate": [self.hparams.val_split]}.get(stage, [])
        for split in splits:
            self.audio_cache(split)

    def audio_cache(self, split: str) -> AudioCache:
        """The decoded clips of ``split`` (built once, in the calling process)."""
        if split not in self._caches:
            self._caches[split] = AudioCache((c.audio for c in self.clips(split)),
                                             self.hparams.sample_rate)
        return self._caches[split]

    @property
    def store(self) -> TargetStore:
        """The target store (read once)."""
        if self._store is None:
            self._store = TargetStore(self.hparams.targets)
        return self._store

    @property
    def tasks(self) -> list[str]:
        """The tasks trained: the selected ones, all in the store by default."""
        chosen = self.hparams.tasks or list(self.store.meta.tasks)
        unknown = [t for t in chosen if t not in self.store.meta.tasks]
        if unknown:
            raise TargetMismatchError(self.hparams.targets, f"no targets for tasks {unknown}")
        return list(chosen)

    def clips(self, split: str) -> list[Clip]:
        """The clips of ``split`` (manifest records grouped by audio; label sets checked)."""
        if split not in self._clips:
            from corpus.manifest import read_manifest

            records = [r for r in read_manifest(Path(self.hparams.manifest))
                       if r.split == split and r.task in set(self.tasks)]
            sets: dict[str, tuple[str, ...]] = {}
            for r in records:
                sets.setdefault(r.task, tuple(r.labels))
            check_label_sets(self.store.meta, sets, self.hparams.targets)
            self._clips[split] = group_clips(records)
        return self._clips[split]

    def count_missing(self, clips: Sequence[Clip]) -> dict[str, int]:
        """Per task, the clip-tasks that have a record but no teacher target (masked)."""
        missing: dict[str, int] = defaultdict(int)
        for clip in clips:
            for task, record in clip.records.items():
                if self.store.get(record.id, task) is None:
                    missing[task] += 1
        return dict(missing)

    def _dataset(self, split: str, augment: bool) -> ClipTargets:
        hp = self.hparams
        clips = self.clips(split)
        missing = self.count_missing(clips)
        for task, n in missing.items():
            self.missing[f"{split}/{task}"] = n
        if missing and (self.trainer is None or self.trainer.is_global_zero):
            print(f"{hp.targets}: {sum(missing.values())} {split} clip-task(s) have no teacher "
                  f"target and are masked ({missing})", file=sys.stderr)
        backgrounds = [c.audio for c in clips
                       if any(r.output.strip() == NONE_LABEL and self.store.meta.tasks[t]
                              .multi_label for t, r in c.records.items())] if augment else []
        clip_s = hp.clip_s if hp.clip_s is not None else self.store.meta.clip_s
        cache = self.audio_cache(split) if hp.cache_audio else None
        return ClipTargets(clips, self.store, self.tasks, hp.sample_rate, clip_s, augment,
                           tuple(hp.gain_db), hp.shift_s, hp.noise_prob if augment else 0.0,
                           tuple(hp.snr_db), backgrounds, cache)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset = self._dataset(hp.train_split, augment=True)
        if len(dataset) == 0:
            from runtime.errors import ManifestError

            raise ManifestError(hp.manifest, f"no clips in split {hp.train_split!r}")
        return DataLoader(dataset, batch_size=hp.batch_size, shuffle=True, drop_last=True,
                          num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.eval_dataloader(self.hparams.val_split)

    def eval_dataloader(self, split: str) -> DataLoader | list[DataLoader]:
        """Un-augmented clips of ``split`` in manifest order ([] when the split is empty)."""
        dataset = self._dataset(split, augment=False)
        if len(dataset) == 0:
            return []
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)


# ---------------------------------------------------------------------------------------------
# Mixing and metrics


def mix_single(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Log of ``lam * softmax(a) + (1 - lam) * softmax(b)`` per row (``lam`` is ``[B]``)."""
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    lam = lam[:, None].clamp(1e-6, 1.0)
    return torch.logaddexp(la + lam.log(), lb + (1 - lam).clamp(min=1e-6).log())


def mix_presence(p: torch.Tensor, q: torch.Tensor, none_index: int | None) -> torch.Tensor:
    """Presence probabilities of a mixture: union per label, the "None" label as ``p * q``."""
    out = 1 - (1 - p) * (1 - q)
    if none_index is not None:
        out[:, none_index] = p[:, none_index] * q[:, none_index]
    return out


def mix_batch(audio: torch.Tensor, targets: Mapping[str, Mapping[str, torch.Tensor]],
              multi_label: Mapping[str, bool], none_index: Mapping[str, int | None],
              mix_prob: float, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Mix each clip with a random other clip of the batch with probability ``mix_prob``."""
    batch = audio.shape[0]
    perm = torch.randperm(batch, generator=generator)
    on = torch.rand(batch, generator=generator) < mix_prob
    lam = torch.where(on, 0.5 + 0.5 * torch.rand(batch, generator=generator), torch.ones(batch))
    lam = lam.to(audio.device)
    mixed = lam[:, None] * audio + (1 - lam[:, None]) * audio[perm]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for task, t in targets.items():
        mask = t["mask"] & (t["mask"][perm] | ~on.to(t["mask"].device))
        if multi_label[task]:
            teacher = torch.where(on[:, None].to(audio.device),
                                  mix_presence(t["teacher"], t["teacher"][perm], none_index[task]),
                                  t["teacher"])
            hard_mix = mix_presence(t["hard"].clamp(min=0), t["hard"][perm].clamp(min=0),
                                    none_index[task])
            unknown = (t["hard"] < 0).any(-1) | (t["hard"][perm] < 0).any(-1)
            hard_mix = torch.where(unknown[:, None], torch.full_like(hard_mix, NO_LABEL), hard_mix)
            hard = torch.where(on[:, None].to(audio.device), hard_mix, t["hard"])
        else:
            teacher = torch.where(on[:, None].to(audio.device),
                                  mix_single(t["teacher"], t["teacher"][perm], lam), t["teacher"])
            hard = t["hard"]
        out[task] = {"teacher": teacher, "mask": mask, "hard": hard}
    return mixed, out


def task_predictions(logits: torch.Tensor, teacher: torch.Tensor, multi_label: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) predictions: argmax indices, or 0/1 rows thresholded at 0.5."""
    if multi_label:
        return (torch.sigmoid(logits) > 0.5).long(), (teacher > 0.5).long()
    return logits.argmax(-1), teacher.argmax(-1)


def task_counts(logits: torch.Tensor, target: Mapping[str, torch.Tensor], multi_label: bool
                ) -> dict[str, torch.Tensor]:
    """Per-batch sums: agreement with the teacher over clips with a target, student and teacher
    correct over clips with both ground truth and a target (and the denominators), and those
    scored clips where the two disagree, split by who matches the ground truth: the student
    (``student_right``), the teacher (``teacher_right``) or neither (``neither_right``)."""
    student, teacher = task_predictions(logits, target["teacher"], multi_label)
    mask, hard = target["mask"].bool(), target["hard"]
    if multi_label:
        agree = (student == teacher).all(-1)
        known = (hard >= 0).all(-1)
        s_ok, t_ok = (student == hard).all(-1), (teacher == hard).all(-1)
    else:
        agree = student == teacher
        known = hard >= 0
        s_ok, t_ok = student == hard, teacher == hard
    scored = known & mask
    differ = scored & ~agree
    return {"agree": (agree & mask).sum(), "with_target": mask.sum(),
            "correct": (s_ok & scored).sum(), "teacher_correct": (t_ok & scored).sum(),
            "with_truth": scored.sum(), "student_right": (differ & s_ok).sum(),
            "teacher_right": (differ & t_ok).sum(), "neither_right": (differ & ~s_ok & ~t_ok).sum()}


DISAGREEMENTS = ("student_right", "teacher_right", "neither_right")


def summarize(totals: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Rates per task from summed `task_counts`: agreement, accuracy, teacher_accuracy; and
    the counts of scored disagreements by who is right (student_right, teacher_right,
    neither_right)."""
    out = {}
    for task, c in totals.items():
        def rate(num: str, den: str, c: Mapping[str, float] = c) -> float:
            return float(c[num]) / float(c[den]) if c[den] else float("nan")

        out[task] = {"agreement": rate("agree", "with_target"),
                     "accuracy": rate("correct", "with_truth"),
                     "teacher_accuracy": rate("teacher_correct", "with_truth"),
                     "clips": float(c["with_target"]),
                     **{key: float(c[key]) for key in DISAGREEMENTS}}
    return out


def evaluate(model: torch.nn.Module, loader: DataLoader | Sequence[Any],
             multi_label: Mapping[str, bool]) -> dict[str, dict[str, float]]:
    """Agreement and accuracies per task of ``model`` over ``loader`` (no augmentation)."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in loader:
                outputs = model(batch["audio"].to(device))
                for task, target in batch["targets"].items():
                    counts = task_counts(outputs[f"{task}_logits"].cpu(), target,
                                         multi_label[task])
                    for key, value in counts.items():
                        totals[task][key] += float(value)
    finally:
        model.train(was_training)
    return summarize(totals)


# ---------------------------------------------------------------------------------------------
# Module


class StudentModule(pl.LightningModule):
    """A student (`distill.students`) distilled from a target store.

    Args:
        targets: the target store folder; its tasks and label sets become the student's heads.
        size: student size preset (``s``, ``m``, ``l``).
        arch: ``cnn`` or ``transformer``.
        tasks: heads to build (default: every task in the store).
        config: `StudentConfig` field overrides, e.g. ``{"width_mult": 0.25}``.
        teacher_hash: the teacher the student must follow (default: the store's); a store of
            another teacher is refused.
        temperature: KD temperature ``T``.
        alpha: weight of the soft (KD) term; ``1 - alpha`` weighs the hard labels.
        task_weights: per-task loss weights (default 1).
        mix_prob: probability that a training clip is mixed with another.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay on matrices.
        warmup_steps: optimizer steps of linear warm-up.
        min_lr_ratio: cosine decay ends at ``lr * min_lr_ratio``.
    """

    def __init__(self, targets: str, size: str = "s", arch: str = "cnn",
                 tasks: list[str] | None = None, config: dict[str, Any] | None = None,
                 teacher_hash: str | None = None, temperature: float = 2.0, alpha: float = 0.7,
                 task_weights: dict[str, float] | None = None, mix_prob: float = 0.3,
                 lr: float = 3e-3, weight_decay: float = 0.01, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.05) -> None:
        super().__init__()
        from distill.students import build_student, student_config, task_heads

        meta = read_meta(targets)
        if teacher_hash is not None and teacher_hash != meta.teacher_hash:
            raise TargetMismatchError(targets, f"targets come from teacher {meta.teacher_hash}, "
                                               f"not {teacher_hash}")
        chosen = tasks or list(meta.tasks)
        unknown = [t for t in chosen if t not in meta.tasks]
        if unknown:
            raise TargetMismatchError(targets, f"no targets for tasks {unknown}")
        heads = task_heads({t: meta.tasks[t].labels for t in chosen},
                           multi_label=[t for t in chosen if meta.tasks[t].multi_label])
        self.student_config = student_config(size, arch, tasks=heads, **(config or {}))
        self.teacher_hash = meta.teacher_hash
        self.save_hyperparameters()
        self.hparams["student_config"] = self.student_config.to_dict()
        self.model = build_student(self.student_config)
        self.multi_label = {t: h.multi_label for t, h in self.student_config.tasks.items()}
        self.none_index = {t: (h.labels.index(NONE_LABEL) if NONE_LABEL in h.labels else None)
                           for t, h in self.student_config.tasks.items()}
        self._val: dict[str, dict[str, float]] = {}

    def forward(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(audio)

    def configure_model(self) -> None:
        """On the CPU, keep the backbone's convolutions channels-last (NHWC): oneDNN's
        depthwise convolutions run their backward far faster so. Measured on the 2-core
        machine, `s`, batch 32 of 10 s clips, a whole training step: one thread 791 -> 455 ms,
        two threads 388 -> 363 ms (median of 8). Called before DDP wraps the model; the
        checkpoint's values and the exported graph do not change (loading copies the values
        into the model's own layout)."""
        if self.trainer.strategy.root_device.type == "cpu":
            self.model.backbone.to(memory_format=torch.channels_last)

    def setup(self, stage: str) -> None:
        """Refuse a data module whose targets are another teacher's or hold other labels."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if isinstance(datamodule, StudentDataModule):
            datamodule.store.check(
                teacher_hash=self.teacher_hash,
                label_sets={t: h.labels for t, h in self.student_config.tasks.items()})

    def _loss(self, outputs: Mapping[str, torch.Tensor],
              targets: Mapping[str, Mapping[str, torch.Tensor]]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from distill.losses import TaskTargets, multitask_kd_loss

        task_targets = {}
        for task, t in targets.items():
            hard = t["hard"]
            task_targets[task] = TaskTargets(t["teacher"], hard, t["mask"].bool())
        hp = self.hparams
        return multitask_kd_loss(outputs, task_targets, self.multi_label, hp.temperature,
                                 hp.alpha, hp.task_weights)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        audio, targets = batch["audio"], batch["targets"]
        if self.hparams.mix_prob > 0:
            audio, targets = mix_batch(audio, targets, self.multi_label, self.none_index,
                                       self.hparams.mix_prob)
        loss, per_task = self._loss(self.model(audio), targets)
        size = audio.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for task, value in per_task.items():
            self.log(f"train/loss/{task}", value, batch_size=size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = defaultdict(lambda: defaultdict(float))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        outputs = self.model(batch["audio"])
        loss, _ = self._loss(outputs, batch["targets"])
        self.log("val/loss", loss, sync_dist=True, batch_size=batch["audio"].shape[0])
        for task, target in batch["targets"].items():
            for key, value in task_counts(outputs[f"{task}_logits"], target,
                                          self.multi_label[task]).items():
                self._val[task][key] += float(value)

    def on_validation_epoch_end(self) -> None:
        totals = {task: dict(c) for task, c in self._val.items()}
        if self.trainer.world_size > 1:
            keys = sorted({(t, k) for t, c in totals.items() for k in c})
            vec = torch.tensor([totals[t][k] for t, k in keys], device=self.device)
            vec = self.trainer.strategy.reduce(vec, reduce_op="sum")
            totals = defaultdict(dict)
            for (t, k), v in zip(keys, vec.tolist(), strict=True):
                totals[t][k] = v
        rates = summarize(totals)
        agreements = []
        for task, r in rates.items():
            for name in ("agreement", "accuracy", "teacher_accuracy"):
                if not np.isnan(r[name]):
                    self.log(f"val/{name}/{task}", r[name])
            if not np.isnan(r["agreement"]):
                agreements.append(r["agreement"])
        if agreements:
            self.log("val/agreement", float(np.mean(agreements)), prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW, linear warm-up and cosine decay stepped per optimizer step."""
        from teacher.lightning import warmup_cosine

        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        other = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                       {"params": other, "weight_decay": 0.0}], lr=hp.lr)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the student config, label sets, front end and teacher hash (contract 4)."""
        from distill.checkpoint import student_entries

        checkpoint.update(student_entries(self.student_config, self.teacher_hash))
