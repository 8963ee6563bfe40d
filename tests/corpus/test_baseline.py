"""The mean log-mel logistic-regression baseline: front end, models, metrics, easy corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from corpus.baseline import (
    MelConfig,
    fit_one_vs_rest,
    fit_softmax,
    log_mel,
    macro_f1,
    mel_filterbank,
    record_features,
    run_baseline,
)
from corpus.manifest import read_manifest
from corpus.records import Record
from corpus.synth import SynthConfig, generate
from corpus.tasks import instruction_for
from runtime.errors import AudioError


def test_a_tone_lands_in_the_mel_band_around_its_frequency() -> None:
    config = MelConfig(n_mels=40)
    bank = mel_filterbank(config)
    freqs = np.fft.rfftfreq(config.n_fft, 1 / config.sample_rate)
    t = np.arange(16000) / 16000
    for hz in (440.0, 1000.0, 3000.0, 6000.0):
        spec = log_mel(np.sin(2 * np.pi * hz * t), config)
        assert spec.shape == (1 + (16000 - 400) // 160, 40)
        band = int(spec.mean(axis=0).argmax())
        centre = freqs[int(bank[band].argmax())]
        assert abs(centre - hz) / hz < 0.15


def test_softmax_and_one_vs_rest_learn_separable_data() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (3, 5))
    y = np.repeat(np.arange(3), 40)
    x = centres[y] + rng.normal(0, 1, (120, 5))
    model = fit_softmax(x, y, n_classes=3)
    assert (model.predict(x) == y).mean() > 0.95
    proba = model.proba(x)
    assert np.allclose(proba.sum(axis=1), 1.0)
    multi = np.stack([y == 0, y == 2], axis=1)
    ovr = fit_one_vs_rest(x, multi)
    assert ovr.predict(x).shape == (120, 2)
    assert macro_f1(multi, ovr.predict(x)) > 0.95


def test_macro_f1_on_hand_counted_cases() -> None:
    truth = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=bool)
    assert macro_f1(truth, truth) == 1.0
    assert macro_f1(truth, ~truth) == 0.0
    # label 0: tp 1, fp 0, fn 1 -> 2/3; label 1: tp 1, fp 1, fn 0 -> 2/3
    predicted = np.array([[1, 0], [0, 0], [0, 1], [0, 1]], dtype=bool)
    assert macro_f1(truth, predicted) == pytest.approx(2 / 3)


def test_features_read_each_clip_once_and_bad_audio_names_the_file(tmp_path: Path) -> None:
    tone = np.sin(2 * np.pi * 1000 * np.arange(32000) / 32000).astype(np.float32)
    in_memory = Record(id="m", task="species", instruction=instruction_for("species"),
                       output="A", audio=tone, sample_rate=32000)
    features = record_features([in_memory], MelConfig())
    assert features.shape == (1, 64) and np.isfinite(features).all()
    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"not audio at all")
    broken = Record(id="b", task="species", instruction=instruction_for("species"),
                    output="A", file_name=str(bad))
    with pytest.raises(AudioError, match="broken.flac"):
        record_features([broken], MelConfig())


def test_the_baseline_learns_an_easy_corpus_far_above_chance(tmp_path: Path) -> None:
    # Six species in six different bands, one loud animal per clip: the mean spectrum goes a
    # long way. A large test share keeps the estimate steady.
    config = SynthConfig(seed=11, clips=160, clip_s=1.0, species=6, clips_per_recording=2,
                         split_fractions=(0.6, 0.1, 0.3), species_per_clip_weights=(0.0, 1.0),
                         focal_snr_db=(20.0, 30.0), soundscape_min=0.0)
    generate(config, tmp_path / "easy")
    records = read_manifest(tmp_path / "easy" / "manifest.jsonl")
    results = {r.task: r for r in run_baseline(records, "test", MelConfig(n_mels=24))}
    species = results["species"]
    assert species.test == 48 and species.labels == 6
    assert species.score >= 0.45 and species.score > species.chance + 0.25
    assert set(results) == {"species", "detection", "lifestage", "calltype", "count"}
    assert results["detection"].metric == "macro-F1"
