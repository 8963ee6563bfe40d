"""Training the NatureLM teacher with Lightning: `TeacherModule` and `TeacherDataModule`.

`TeacherModule` holds a `teacher.model.NatureLM` built from a preset plus nested overrides; its
hyper-parameters store the whole resolved `TeacherConfig` and every checkpoint embeds the
tokenizer, so `teacher.checkpoint.load_teacher(path)` rebuilds the teacher from the file alone.
Loss: next-token cross-entropy on the answer tokens only (the model's ``forward``). AdamW with
linear warm-up and cosine decay, stepped per optimizer step; clipping and precision are the
Trainer's (``gradient_clip_val``, ``precision``), so DDP / FSDP / multi-node are a Trainer
``strategy`` away.

The tiny preset trains its byte-level BPE tokenizer on the corpus text in ``setup`` (rank 0
trains, the others receive it); a preset with a local LLM path uses that model's tokenizer.

`TeacherDataModule` reads a manifest (`corpus.manifest.read_manifest`), decodes 16 kHz mono
clips through `runtime.audio.read_audio`, crops (random in training) or zero-pads to exactly
``clip_s``, samples the tasks evenly, mixes in background noise at a random SNR, and replaces
detection examples by background alone answered "None" with probability ``none_prob``. With
``group_by_clip`` a batch holds whole clips with all their tasks (`ClipGroupDataset`): each clip
goes through the encoder, Q-Former and projection once per step and its audio tokens serve every
task, which is what makes training the encoder affordable (the tiny preset does).

    $ naturelm-edge teacher fit --config tiny --data.manifest runs/default/corpus/manifest.jsonl

    >>> warmup_cosine(0, warmup_steps=10, total_steps=100)
    0.1
    >>> warmup_cosine(100, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    0.1
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    WeightedRandomSampler,
)

from corpus.records import Record
from corpus.tasks import NONE_LABEL, TASKS

TOKENIZER_KEY = "teacher_tokenizer"
CONFIG_KEY = "teacher_config"
CONFIG_HASH_KEY = "teacher_config_hash"
EXTERNAL_KEY = "teacher_external_keys"


def warmup_cosine(step: int, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_lr_ratio``."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any] | None,
                    where: str = "config") -> dict[str, Any]:
    """``base`` with ``overrides`` merged in recursively; unknown keys raise naming the path."""
    merged = dict(base)
    for key, value in (overrides or {}).items():
        if key not in merged:
            raise KeyError(f"{where}.{key} is not a teacher config field; known fields: "
                           f"{', '.join(sorted(merged))}")
        if isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = merge_overrides(merged[key], value, f"{where}.{key}")
        else:
            merged[key] = value
    return merged


def resolve_config(preset: str, config: dict[str, Any] | None = None) -> Any:
    """The `TeacherConfig` of ``preset`` with the nested ``config`` overrides applied."""
    from teacher.config import TeacherConfig, teacher_config

    return TeacherConfig.from_dict(merge_overrides(teacher_config(preset).to_dict(), config))


class EncoderCache:
    """Outputs of a frozen encoder, kept per clip so each clip is encoded once per run.

    A frozen encoder in eval mode is a fixed function of its input; with unaugmented clips
    (``cache_key`` set by `ClipDataset`) its output for a clip never changes, so training
    pays for the encoder once per clip instead of once per example (a clip serves several
    tasks) and per epoch. Features are stored in ``dtype`` on the CPU.
    """

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        self.dtype = dtype
        self.store: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self.store)

    def encode(self, encoder: torch.nn.Module, wave: torch.Tensor,
               keys: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``encoder(wave)`` with rows whose key is cached taken from the cache."""
        if wave.shape[0] != len(keys):
            raise ValueError(f"the encoder got {wave.shape[0]} rows for {len(keys)} cache keys")
        todo = [i for i, key in enumerate(keys) if key is None or key not in self.store]
        if todo:
            with torch.no_grad():
                features, mask = type(encoder).forward(encoder, wave[todo])
            for j, i in enumerate(todo):
                if keys[i] is not None:
                    self.store[keys[i]] = (features[j].to("cpu", self.dtype),
                                           None if mask is None else mask[j].cpu())
            if len(todo) == len(keys):
                return features, mask
        fresh = {i: j for j, i in enumerate(todo)}
        rows, masks = [], []
        for i, key in enumerate(keys):
            if i in fresh:
                rows.append(features[fresh[i]])
                masks.append(None if mask is None else mask[fresh[i]])
            else:
                cached, cached_mask = self.store[key]
                rows.append(cached.to(wave.device, torch.float32))
                masks.append(None if cached_mask is None else cached_mask.to(wave.device))
        out_mask = None if all(m is None for m in masks) else torch.stack(
            [m if m is not None else torch.zeros_like(next(x for x in masks if x is not None))
             for m in masks])
        return torch.stack(rows), out_mask

    @contextlib.contextmanager
    def serving(self, encoder: torch.nn.Module, keys: Sequence[str | None]) -> Iterator[None]:
        """Within the block, ``encoder(wave)`` answers from the cache for ``keys``' rows."""
        encoder.forward = lambda wave, padding_mask=None: self.encode(encoder, wave, keys)
        try:
            yield
        finally:
            del encoder.forward


@contextlib.contextmanager
def serving_audio_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model.encode_audio(audio)`` returns ``tokens`` (computed beforehand,
    gradients included) for a batch of exactly ``tokens.shape[0]`` audios."""
    def encode_audio(audio: torch.Tensor, truncate: bool = False) -> torch.Tensor:
        rows = 1 if audio.dim() == 1 else audio.shape[0]
        if rows != tokens.shape[0]:
            raise ValueError(f"encode_audio got {rows} audios but serves {tokens.shape[0]} "
                             "precomputed rows")
        return tokens

    model.encode_audio = encode_audio
    try:
        yield
    finally:
        del model.encode_audio


def check_data_matches(cfg: Any, datamodule: TeacherDataModule) -> None:
    """Raise when the data's rate or clip length differs from the teacher config's."""
    hp = datamodule.hparams
    if hp.sample_rate != cfg.sample_rate or abs(hp.clip_s - cfg.clip_s) > 1e-9:
        raise ValueError(f"data gives {hp.clip_s} s at {hp.sample_rate} Hz but the teacher "
                         f"expects {cfg.clip_s} s at {cfg.sample_rate} Hz: set data.clip_s and "
                         "data.sample_rate to match model.config")


class TeacherModule(pl.LightningModule):
    """NatureLM trained on instruction / answer pairs (answer tokens only in the loss).

    Args:
        preset: a `teacher.config.teacher_config` preset name ("tiny", "naturelm-8b").
        config: nested overrides of the preset's fields, e.g. ``{"llm": {"num_layers": 2}}``.
            The saved hyper-parameters hold the whole resolved config here.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay on matrices (biases and norms get none).
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warm-up (capped at the run's length).
        min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio``.
        cache_encoder: with a frozen encoder, encode each unaugmented training clip once and
            reuse its features (`EncoderCache`); ignored when the encoder trains.
        task_weights: loss weight per task name (others 1.0), e.g. ``{"species": 3.0}``: a
            weighted mean over the batch's examples, so the loss keeps its scale.
    """

    def __init__(self, preset: str = "tiny", config: dict[str, Any] | None = None,
                 lr: float = 1e-4, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, cache_encoder: bool = False,
                 task_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        bad = {task: w for task, w in (task_weights or {}).items()
               if isinstance(w, bool) or not isinstance(w, (int, float))
               or not (math.isfinite(w) and w > 0)}
        if bad:
            raise ValueError(f"task_weights must be finite and > 0, got {bad}")
        self.teacher_config = resolve_config(preset, config)
        self.save_hyperparameters()
        self.hparams["config"] = self.teacher_config.to_dict()
        self.model: torch.nn.Module | None = None
        self.tokenizer_json: str | None = None
        self.encoder_cache = EncoderCache() \
            if cache_encoder and not self.teacher_config.train_encoder else None

    # -- building -------------------------------------------------------------------------
    def build(self, tokenizer: Any) -> None:
        """Build the NatureLM around ``tokenizer`` (its JSON is embedded in checkpoints)."""
        from teacher.model import NatureLM
        from teacher.tokenizer import tokenizer_to_json

        self.model = NatureLM(self.teacher_config, tokenizer)
        self.tokenizer_json = tokenizer_to_json(tokenizer)

    def setup(self, stage: str) -> None:
        """Build the model unless a tokenizer was given; the tiny preset trains one here."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if isinstance(datamodule, TeacherDataModule):
            check_data_matches(self.teacher_config, datamodule)
            unknown = sorted(set(self.hparams.get("task_weights") or {})
                             - {r.task for r in datamodule.records})
            if unknown:
                raise ValueError(f"task_weights names tasks the data does not have: {unknown}")
        if self.model is not None:
            return
        from teacher.tokenizer import tokenizer_from_json

        tokenizer_json = None
        if self.trainer.is_global_zero:
            tokenizer_json = self._tokenizer_json_for_corpus()
        tokenizer_json = self.trainer.strategy.broadcast(tokenizer_json, src=0)
        self.build(tokenizer_from_json(tokenizer_json))
        self._load_pretrained_encoder()

    def _load_pretrained_encoder(self) -> None:
        """Load ``encoder_checkpoint`` (a pretrained BEATs) into a freshly built teacher."""
        path = self.teacher_config.encoder_checkpoint
        if not path:
            return
        from runtime.errors import InputError
        from teacher.beats import load_beats

        pretrained = load_beats(path)
        if pretrained.cfg != self.teacher_config.encoder:
            raise InputError(path, "its encoder config differs from the teacher's encoder config "
                                   f"(preset {self.teacher_config.preset!r})")
        self._require_model().beats.load_state_dict(pretrained.state_dict())

    def _tokenizer_json_for_corpus(self) -> str:
        from teacher.tokenizer import tokenizer_to_json, train_tokenizer

        llm = self.teacher_config.llm
        if llm.path is not None:
            from teacher.tokenizer import load_llm_tokenizer

            return tokenizer_to_json(load_llm_tokenizer(llm.path))
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, TeacherDataModule):
            raise RuntimeError("the tiny teacher trains its tokenizer on the corpus: fit it with a "
                               "TeacherDataModule, or call TeacherModule.build(tokenizer) first")
        return tokenizer_to_json(train_tokenizer(datamodule.tokenizer_texts(), llm.vocab_size))

    def _require_model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("TeacherModule has no model yet: call build(tokenizer) or fit it")
        return self.model

    # -- steps ----------------------------------------------------------------------------
    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        model = self._require_model()
        if "clip_index" in batch:
            return self._grouped_loss(model, batch)
        keys = batch.get("cache_key")
        weights = self._task_weights(batch)
        if self.encoder_cache is None or keys is None:
            return model(batch["audio"], batch["instruction"], batch["answer"], weights)
        with self.encoder_cache.serving(model.beats, keys):
            return model(batch["audio"], batch["instruction"], batch["answer"], weights)

    def _task_weights(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Each example's ``task_weights`` entry (1.0 when the task has none); None if unset."""
        table = self.hparams.get("task_weights")
        if not table:
            return None
        return torch.tensor([float(table.get(task, 1.0)) for task in batch["task"]])

    def _grouped_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of a `collate_groups` batch: each clip goes through the encoder, Q-Former and
        projection once (with gradients where they train) and its audio tokens serve every
        example of that clip."""
        wave = model.fit_clip(batch["audio"], truncate=True)
        with contextlib.ExitStack() as stack:
            if self.encoder_cache is not None:
                stack.enter_context(self.encoder_cache.serving(model.beats, batch["cache_key"]))
            tokens = model.encode_audio(wave)
        index = torch.as_tensor(batch["clip_index"], dtype=torch.long, device=wave.device)
        with serving_audio_tokens(model, tokens[index]):
            return model(wave[index], batch["instruction"], batch["answer"],
                         self._task_weights(batch))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["answer"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["answer"]))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the trainable parameters, warm-up + cosine schedule stepped per step."""
        model = self._require_model()
        decay, no_decay = [], []
        for param in model.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        if not decay and not no_decay:
            raise RuntimeError("the freeze policy leaves no trainable parameter")
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr, betas=tuple(hp.betas))
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- checkpoints ----------------------------------------------------------------------
    def external_keys(self) -> list[str]:
        """State-dict keys left out of checkpoints: frozen LLM weights loaded from ``llm.path``."""
        if self.model is None or self.teacher_config.llm.path is None:
            return []
        from teacher.checkpoint import frozen_llm_keys

        return ["model." + key for key in frozen_llm_keys(self.model)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Embed the tokenizer and config; drop frozen weights that come from a local LLM."""
        from teacher.config import config_hash

        self._require_model()
        checkpoint[TOKENIZER_KEY] = self.tokenizer_json
        checkpoint[CONFIG_KEY] = self.teacher_config.to_dict()
        checkpoint[CONFIG_HASH_KEY] = config_hash(self.teacher_config)
        external = self.external_keys()
        checkpoint[EXTERNAL_KEY] = external
        for key in external:
            checkpoint["state_dict"].pop(key, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild around the embedded tokenizer, then refill weights that come from the LLM."""
        from teacher.tokenizer import tokenizer_from_json

        tokenizer_json = checkpoint.get(TOKENIZER_KEY)
        if tokenizer_json is None:
            raise KeyError(f"the checkpoint holds no {TOKENIZER_KEY!r}: not a teacher checkpoint")
        if self.model is None or tokenizer_json != self.tokenizer_json:
            self.build(tokenizer_from_json(tokenizer_json))
        own = self._require_model().state_dict()
        for key in checkpoint.get(EXTERNAL_KEY, []):
            checkpoint["state_dict"][key] = own[key.removeprefix("model.")]


# ---------------------------------------------------------------------------------------------
# Data


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of unit-RMS 1/f noise (a stand-in background when the corpus has none)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(spectrum.shape[0], dtype=np.float64)
    spectrum /= np.sqrt(np.maximum(freqs, 1.0))
    noise = np.fft.irfft(spectrum, n)
    return (noise / max(float(np.sqrt(np.mean(noise**2))), 1e-12)).astype(np.float32)


def mix_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``signal + g * noise`` with ``g`` set so the signal-to-noise ratio is ``snr_db``.

    A silent signal gets the noise at unit RMS scaled by ``10 ** (-snr_db / 20)``.
    """
    signal_rms = float(np.sqrt(np.mean(signal.astype(np.float64) ** 2)))
    noise_rms = max(float(np.sqrt(np.mean(noise.astype(np.float64) ** 2))), 1e-12)
    reference = signal_rms if signal_rms > 1e-6 else 0.05
    gain = reference / noise_rms * 10.0 ** (-snr_db / 20.0)
    return (signal + gain * noise).astype(np.float32)


def fit_length(audio: np.ndarray, n: int, rng: np.random.Generator | None) -> np.ndarray:
    """Exactly ``n`` samples: a crop (random when ``rng`` is given, else the start) or zero pad."""
    if audio.shape[0] > n:
        start = int(rng.integers(0, audio.shape[0] - n + 1)) if rng is not None else 0
        return audio[start:start + n]
    if audio.shape[0] < n:
        return np.pad(audio, (0, n - audio.shape[0]))
    return audio


def load_clip(record: Record, sample_rate: int) -> np.ndarray:
    """The record's mono float32 samples at ``sample_rate`` (its offset and duration applied;
    in-memory audio at another rate is resampled)."""
    from runtime.audio import read_audio

    if record.audio is not None:
        if record.sample_rate is None:
            raise ValueError(f"record {record.id!r} holds audio without a sample_rate")
        audio = np.asarray(record.audio, dtype=np.float32)
        if record.sample_rate != sample_rate:
            import soxr

            audio = soxr.resample(audio, record.sample_rate, sample_rate).astype(np.float32)
        start = int(round(record.offset_s * sample_rate))
        stop = None if record.duration_s is None \
            else start + int(round(record.duration_s * sample_rate))
        return audio[start:stop]
    if record.file_name is None:
        raise ValueError(f"record {record.id!r} has neither audio nor a file_name")
    return read_audio(record.file_name, target_rate=sample_rate, offset_s=record.offset_s,
                      duration_s=record.duration_s)


def is_multi_label(task: str) -> bool:
    """Whether answers of ``task`` list several labels (our detection, BEANS-Zero detection)."""
    known = TASKS.get(task)
    return known.multi_label if known is not None else "detection" in task.lower()


class ClipDataset(Dataset):
    """Records as training examples: ``{"audio", "instruction", "answer", "task", "id",
    "cache_key"}``; ``cache_key`` names the clip when the audio is exactly that clip's (no noise
    mixed, no random crop), else None.

    With ``augment`` the clip is cropped at random, noise is mixed in with probability
    ``noise_prob`` and detection examples become background answered "None" with probability
    ``none_prob``. Decoded files are cached per file (a corpus reuses a clip across tasks).
    """

    def __init__(self, records: Sequence[Record], sample_rate: int, clip_s: float,
                 augment: bool, noise_prob: float = 0.0, snr_db: tuple[float, float] = (5, 30),
                 none_prob: float = 0.0, backgrounds: Sequence[Record] = (),
                 cache_audio: bool = True) -> None:
        self.records = list(records)
        self.sample_rate = sample_rate
        self.samples = int(round(clip_s * sample_rate))
        self.augment = augment
        self.noise_prob = noise_prob
        self.snr_db = snr_db
        self.none_prob = none_prob
        self.backgrounds = list(backgrounds)
        self.cache_audio = cache_audio
        self._cache: dict[tuple[str, float, float | None], np.ndarray] = {}
        self._last_background: Record | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _clip(self, record: Record) -> np.ndarray:
        key = (record.file_name or record.id, record.offset_s, record.duration_s)
        if key in self._cache:
            return self._cache[key]
        audio = load_clip(record, self.sample_rate)
        if self.cache_audio and record.audio is None:
            self._cache[key] = audio
        return audio

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        if self.backgrounds:
            pick = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
            self._last_background = pick
            return fit_length(self._clip(pick), self.samples, rng)
        return pink_noise(self.samples, rng) * np.float32(0.02)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        answer = record.output
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item())) \
            if self.augment else None
        source = record
        if rng is not None and is_multi_label(record.task) and rng.random() < self.none_prob:
            audio, answer, source = self._background(rng), NONE_LABEL, None
            if self.backgrounds:
                source = self._last_background
        else:
            audio = fit_length(self._clip(record), self.samples, rng)
        cropped = source is not None and self._clip(source).shape[0] > self.samples
        if rng is not None and rng.random() < self.noise_prob:
            audio = mix_at_snr(audio, self._background(rng), float(rng.uniform(*self.snr_db)))
            source = None
        key = None if source is None or (cropped and rng is not None) else _clip_key(source)
        return {"audio": torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)),
                "instruction": record.instruction, "answer": answer, "task": record.task,
                "id": record.id, "cache_key": key}


def _clip_key(record: Record) -> str:
    """Names a clip's exact samples: file (or id), offset and duration."""
    return f"{record.file_name or record.id}|{record.offset_s}|{record.duration_s}"


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the audio ``[B, T]``; the text fields (and cache keys) become lists."""
    out: dict[str, Any] = {"audio": torch.stack([item["audio"] for item in items])}
    for key in ("instruction", "answer", "task", "id", "cache_key"):
        out[key] = [item[key] for item in items]
    return out


class ClipGroupDataset(Dataset):
    """Clips with all their tasks: item ``i`` is one clip and every record of it.

    A training step then encodes each clip once for all its tasks (what makes a trained
    encoder affordable: one encoder pass per clip instead of one per example) and the clip's
    examples share one random crop and one noise mix. A detection example that becomes
    background (probability ``none_prob``) brings its background as a second clip. Items are
    ``{"clips": [T] tensors, "cache_key": one per clip, "examples": [{"clip", "instruction",
    "answer", "task", "id"}]}``; `collate_groups` batches them.
    """

    def __init__(self, records: Sequence[Record], sample_rate: int, clip_s: float,
                 augment: bool, noise_prob: float = 0.0, snr_db: tuple[float, float] = (5, 30),
                 none_prob: float = 0.0, backgrounds: Sequence[Record] = (),
                 cache_audio: bool = True) -> None:
        self.base = ClipDataset(records, sample_rate, clip_s, augment, noise_prob, snr_db,
                                none_prob, backgrounds, cache_audio)
        groups: dict[str, list[Record]] = {}
        for record in records:
            groups.setdefault(_clip_key(record), []).append(record)
        self.groups = list(groups.values())

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, Any]:
        base = self.base
        records = self.groups[index]
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item())) \
            if base.augment else None
        full = base._clip(records[0])
        audio = fit_length(full, base.samples, rng)
        key = None if rng is not None and full.shape[0] > base.samples \
            else _clip_key(records[0])
        if rng is not None and rng.random() < base.noise_prob:
            audio = mix_at_snr(audio, base._background(rng), float(rng.uniform(*base.snr_db)))
            key = None
        clips, keys, examples = [audio], [key], []
        for record in records:
            clip, answer = 0, record.output
            if rng is not None and is_multi_label(record.task) and rng.random() < base.none_prob:
                clips.append(base._background(rng))
                keys.append(None)
                clip, answer = len(clips) - 1, NONE_LABEL
            examples.append({"clip": clip, "instruction": record.instruction, "answer": answer,
                             "task": record.task, "id": record.id})
        return {"clips": [torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))
                          for c in clips], "cache_key": keys, "examples": examples}


def collate_groups(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`ClipGroupDataset` items as one batch: ``audio[C, T]`` (every clip once), ``cache_key``
    per clip, and per example ``clip_index`` (its row of ``audio``), ``instruction``,
    ``answer``, ``task`` and ``id``."""
    clips: list[torch.Tensor] = []
    out: dict[str, Any] = {"cache_key": [], "clip_index": [], "instruction": [], "answer": [],
                           "task": [], "id": []}
    for item in items:
        offset = len(clips)
        clips.extend(item["clips"])
        out["cache_key"].extend(item["cache_key"])
        for example in item["examples"]:
            out["clip_index"].append(offset + example["clip"])
            for key in ("instruction", "answer", "task", "id"):
                out[key].append(example[key])
    out["audio"] = torch.stack(clips)
    return out


def task_balanced_weights(records: Sequence[Record]) -> torch.Tensor:
    """Per-record sampling weights giving every task the same total weight."""
    counts = Counter(r.task for r in records)
    return torch.tensor([1.0 / counts[r.task] for r in records], dtype=torch.double)


class TeacherDataModule(pl.LightningDataModule):
    """Corpus records for teacher training.

    Args:
        manifest: a JSONL / CSV manifest of `corpus.records.Record` rows.
        batch_size: clips per batch (per device).
        num_workers: DataLoader worker processes (0 decodes in the training process).
        sample_rate: the teacher's rate; audio is resampled to it.
        clip_s: seconds per example (crop or zero-pad); must equal the teacher's clip_s.
        tasks: tasks to train on (default: every task in the manifest).
        balance_tasks: sample the tasks evenly instead of in corpus proportion.
        samples_per_epoch: training examples per epoch (default: the train split's size).
        noise_prob: probability of mixing background into a training clip.
        snr_db: range of the signal-to-noise ratio of that mix, in dB.
        none_prob: probability that a detection example becomes background answered "None".
        train_split: split trained on.
        val_split: split validated on (skipped when it has no records).
        cache_audio: keep decoded clips in memory (a corpus reuses each clip across tasks).
        group_by_clip: batch whole clips with all their tasks (`ClipGroupDataset`), so each
            clip is encoded once per step for every task; ``batch_size`` and
            ``samples_per_epoch`` then count clips, and clips are drawn uniformly
            (``balance_tasks`` does not apply: every clip brings all its tasks).
    """

    def __init__(self, manifest: str, batch_size: int = 8, num_workers: int = 0,
                 sample_rate: int = 16000, clip_s: float = 10.0,
                 tasks: list[str] | None = None, balance_tasks: bool = True,
                 samples_per_epoch: int | None = None, noise_prob: float = 0.3,
                 snr_db: tuple[float, float] = (5.0, 30.0), none_prob: float = 0.1,
                 train_split: str = "train", val_split: str = "valid",
                 cache_audio: bool = True, group_by_clip: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._records: list[Record] | None = None

    @property
    def records(self) -> list[Record]:
        """The manifest's records of the selected tasks (read once)."""
        if self._records is None:
            from corpus.manifest import read_manifest
            from runtime.errors import ManifestError

            records = read_manifest(Path(self.hparams.manifest))
            tasks = self.hparams.tasks
            if tasks:
                records = [r for r in records if r.task in set(tasks)]
            if not records:
                raise ManifestError(self.hparams.manifest,
                                    f"no records for tasks {tasks}" if tasks else "no records")
            self._records = records
        return self._records

    def split(self, name: str) -> list[Record]:
        """The records of split ``name``."""
        return [r for r in self.records if r.split == name]

    def tokenizer_texts(self) -> list[str]:
        """The text a corpus tokenizer is trained on: instructions, answers and label sets."""
        texts: set[str] = {NONE_LABEL}
        for record in self.records:
            texts.update((record.instruction, record.output, *record.labels))
        return sorted(texts)

    def backgrounds(self) -> list[Record]:
        """Training clips with nothing in them: detection records answered "None"."""
        return [r for r in self.split(self.hparams.train_split)
                if is_multi_label(r.task) and r.output.strip() == NONE_LABEL]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        records = self.split(hp.train_split)
        if not records:
            from runtime.errors import ManifestError

            raise ManifestError(hp.manifest, f"no records in split {hp.train_split!r}")
        kind = ClipGroupDataset if hp.group_by_clip else ClipDataset
        dataset = kind(records, hp.sample_rate, hp.clip_s, augment=True,
                       noise_prob=hp.noise_prob, snr_db=tuple(hp.snr_db),
                       none_prob=hp.none_prob, backgrounds=self.backgrounds(),
                       cache_audio=hp.cache_audio)
        n = hp.samples_per_epoch or len(dataset)
        if hp.group_by_clip:  # every clip once per pass, in a fresh order each pass
            sampler: Sampler = RandomSampler(dataset, num_samples=n)
        else:
            weights = task_balanced_weights(records) if hp.balance_tasks \
                else torch.ones(len(records), dtype=torch.double)
            sampler = WeightedRandomSampler(weights, num_samples=n, replacement=True)
        return DataLoader(dataset, batch_size=hp.batch_size, sampler=sampler,
                          num_workers=hp.num_workers,
                          collate_fn=collate_groups if hp.group_by_clip else collate,
                          drop_last=True, persistent_workers=hp.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        hp = self.hparams
        records = self.split(hp.val_split)
        if not records:
            return []
        kind = ClipGroupDataset if hp.group_by_clip else ClipDataset
        dataset = kind(records, hp.sample_rate, hp.clip_s, augment=False,
                       cache_audio=hp.cache_audio)
        return DataLoader(dataset, batch_size=hp.batch_size, shuffle=False,
                          num_workers=hp.num_workers,
                          collate_fn=collate_groups if hp.group_by_clip else collate)
