"""`distill.lightning.AudioCache` and ``StudentDataModule(cache_audio=True)``: cached items equal
decoded ones (augmentation included, under the same seed), clips are decoded once in `setup`
and DataLoader workers read the cache, an unreadable clip fails `setup` naming its file."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import soundfile as sf
import torch

import teacher.lightning as teacher_lightning
from corpus.records import Record
from distill.lightning import AudioCache, StudentDataModule, StudentModule
from runtime.errors import AudioError
from tests.distill.test_lightning import TINY


def _assert_same_item(a: dict, b: dict) -> None:
    assert a["audio"].dtype == b["audio"].dtype == torch.float32
    assert torch.equal(a["audio"], b["audio"])
    assert a["targets"].keys() == b["targets"].keys()
    for task, t in a["targets"].items():
        for key, value in t.items():
            assert torch.equal(value, b["targets"][task][key]), (task, key)


def test_cached_items_equal_decoded_items_with_and_without_augmentation(corpus: Path,
                                                                         store: Path) -> None:
    kwargs = {"batch_size": 2, "noise_prob": 1.0, "shift_s": 0.5}
    cached = StudentDataModule(str(corpus), str(store), cache_audio=True, **kwargs)
    plain = StudentDataModule(str(corpus), str(store), cache_audio=False, **kwargs)
    for split in ("train", "valid"):
        a, b = cached._dataset(split, augment=False), plain._dataset(split, augment=False)
        assert a.cache is not None and b.cache is None and len(a) == len(b) > 0
        for i in range(len(a)):
            _assert_same_item(a[i], b[i])
    a, b = cached._dataset("train", augment=True), plain._dataset("train", augment=True)
    assert a.backgrounds and a.noise_prob == 1.0  # the background clips come from the cache too
    for i in range(len(a)):
        torch.manual_seed(i)
        first = a[i]
        torch.manual_seed(i)
        _assert_same_item(first, b[i])
        assert not torch.equal(first["audio"], a[i]["audio"])  # a fresh draw every step


def test_cache_is_built_once_in_setup_and_workers_read_it(corpus: Path, store: Path,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    load_clip = teacher_lightning.load_clip

    def counting(record: Record, sample_rate: int) -> np.ndarray:
        decoded.append(record.id)
        return load_clip(record, sample_rate)

    monkeypatch.setattr(teacher_lightning, "load_clip", counting)
    data = StudentDataModule(str(corpus), str(store), batch_size=2, num_workers=1,
                             cache_audio=True)
    data.setup("fit")
    clips = len(data.clips("train")) + len(data.clips("valid"))
    assert len(decoded) == clips == 6  # one decode per clip, not per record (2 tasks each)
    train = data.audio_cache("train")
    assert train.nbytes == 2 * sum(load_clip(c.audio, 16000).size for c in data.clips("train"))

    def refuse(record: Record, sample_rate: int) -> np.ndarray:
        raise AssertionError(f"{record.id} decoded after setup")

    # Workers fork after setup and inherit this: a decode in a worker would fail the run.
    monkeypatch.setattr(teacher_lightning, "load_clip", refuse)
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, default_root_dir=tmp_path,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=1, check_val_every_n_epoch=None)
    trainer.fit(StudentModule(str(store), config=TINY, mix_prob=0.5), datamodule=data)
    assert trainer.global_step == 2 and "val/agreement" in trainer.callback_metrics
    assert data.audio_cache("train") is train  # Lightning's own setup call rebuilt nothing


def test_unreadable_clip_fails_setup_naming_the_file(corpus: Path, store: Path,
                                                     tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    shutil.copytree(corpus.parent, folder)
    manifest = folder / corpus.name
    text = manifest.read_text().replace(str(corpus.parent), str(folder))
    manifest.write_text(text)
    data = StudentDataModule(str(manifest), str(store), cache_audio=True)
    bad = Path(data.clips("train")[1].audio.file_name)
    bad.write_bytes(b"not a flac file at all" * 64)
    with pytest.raises(AudioError, match=str(bad)):
        data.setup("fit")


def test_loud_or_float_audio_keeps_16_bit_resolution_of_its_peak(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(8000) * 0.8).astype(np.float32)  # peaks above 1
    path = tmp_path / "loud.wav"
    sf.write(path, audio, 16000, subtype="FLOAT")
    record = Record(id="loud", task="species", instruction="", output="x", file_name=str(path))
    cache = AudioCache([record, record], 16000)
    out = cache.clip(record)
    peak = float(np.abs(audio).max())
    assert peak > 1.0 and len(cache) == 1 and out.dtype == np.float32
    assert np.max(np.abs(out - audio)) <= 0.5 * peak / 32767 + 1e-6
    other = Record(id="other", task="species", instruction="", output="x",
                   file_name=str(tmp_path / "other.wav"))
    with pytest.raises(KeyError, match="not in the audio cache"):
        cache.clip(other)
