"""Tiny teacher configs, a tokenizer trained on the task questions, and test audio.

    >>> model = tiny_model()
    >>> model.cfg.clip_s, chirps(2, 0.5).shape
    (1.0, torch.Size([2, 8000]))
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corpus.tasks import TASKS
from teacher.config import TeacherConfig, teacher_config
from teacher.model import NatureLM

LABELS = ("Kea", "Tui", "Morepork", "Kiwi", "Bellbird", "None", "adult", "juvenile", "song",
          "call", "alarm")


def corpus_texts() -> list[str]:
    """The text a tiny tokenizer is trained on: every task question and the label names."""
    return [t.question for t in TASKS.values()] + [", ".join(LABELS)] + list(LABELS)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    """A byte-level BPE trained on `corpus_texts` (cached: training is deterministic)."""
    from teacher.tokenizer import train_tokenizer

    return train_tokenizer(corpus_texts(), 400)


def tiny_config(clip_s: float = 1.0, **changes: Any) -> TeacherConfig:
    """The tiny preset with short clips (fast tests) in the official model's layout: without the
    tiny preset's ``audio_norm``, so state dicts with the official names load into it.
    ``changes`` replace top-level fields (``audio_norm=True`` gives the preset's own layout)."""
    return teacher_config("tiny").replace(**{"clip_s": clip_s, "audio_norm": False, **changes})


def tiny_model(seed: int = 0, cfg: TeacherConfig | None = None) -> NatureLM:
    """A randomly initialised tiny NatureLM in eval mode (seeded)."""
    torch.manual_seed(seed)
    return NatureLM(cfg or tiny_config(), tiny_tokenizer()).eval()


def chirps(batch: int, seconds: float, rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """``[batch, samples]`` of distinct up-sweeping tones in light noise, peak about 0.5."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    rows = []
    for _ in range(batch):
        f0, f1 = rng.uniform(800, 2500), rng.uniform(3000, 6000)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * max(seconds, 1e-3)))
        rows.append(0.4 * np.sin(phase) + 0.02 * rng.standard_normal(t.shape))
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def read_mono_16k(path: Path) -> torch.Tensor:
    """A real recording as mono float32 at 16 kHz (soundfile + soxr)."""
    import soundfile as sf
    import soxr

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != 16000:
        mono = soxr.resample(mono, rate, 16000)
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))
