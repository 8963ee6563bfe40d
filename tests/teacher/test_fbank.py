"""teacher.fbank against kaldi-native-fbank (an independent C++ Kaldi port) on real birdsong."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.audio import read_audio
from teacher.fbank import (
    BEATS_FBANK_MEAN,
    BEATS_FBANK_STD,
    FRAMES_PER_PASS,
    FbankConfig,
    KaldiFbank,
    beats_fbank,
    fbank,
    kaldi_mel_banks,
    num_frames,
)

knf = pytest.importorskip("kaldi_native_fbank", reason="kaldi-native-fbank is a test dependency")

EPS_LOG = math.log(torch.finfo(torch.float32).eps)


@pytest.fixture(scope="module")
def birds_16k(real_recording: Path) -> np.ndarray:
    return read_audio(real_recording, target_rate=16000)


def _knf_fbank(samples: np.ndarray, num_bins: int, window: str = "povey") -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.window_type = window
    opts.mel_opts.num_bins = num_bins
    online = knf.OnlineFbank(opts)
    online.accept_waveform(16000, samples.tolist())
    online.input_finished()
    frames = [online.get_frame(i) for i in range(online.num_frames_ready)]
    return np.stack(frames) if frames else np.zeros((0, num_bins), dtype=np.float32)


@pytest.mark.parametrize(
    ("num_bins", "window"),
    [(80, "povey"), (40, "povey"), (40, "hamming"), (40, "hanning"), (40, "rectangular")],
)
def test_matches_kaldi_native_fbank(birds_16k: np.ndarray, num_bins: int, window: str) -> None:
    scaled = birds_16k * 2**15
    reference = _knf_fbank(scaled, num_bins, window)
    cfg = FbankConfig(num_mel_bins=num_bins, window_type=window)
    ours = fbank(torch.from_numpy(scaled)[None], cfg)[0].numpy()
    assert ours.shape == reference.shape == (num_frames(len(scaled), cfg), num_bins)
    diff = np.abs(ours - reference)
    print(
        f"fbank vs kaldi-native-fbank ({num_bins} bins, {window}): "
        f"max abs diff {diff.max():.2e}, mean {diff.mean():.2e}, range {reference.min():.1f}"
        f"..{reference.max():.1f}"
    )
    # float32 on both sides; the largest gaps sit in the quietest bins (ill-conditioned).
    assert diff.max() < 1e-3
    assert diff.mean() < 2e-5


def test_beats_128_bins_on_the_recording(birds_16k: np.ndarray) -> None:
    """At 128 bins filter 3 holds no FFT bin (kaldi-native-fbank refuses the setting; torchaudio,
    which BEATs used, keeps it at log(eps)); every other filter holds at least one."""
    with pytest.raises(ValueError, match="num_mel_bins"):
        _knf_fbank(birds_16k[:16000] * 2**15, 128)
    banks = kaldi_mel_banks(FbankConfig())
    empty = (banks.sum(dim=0) == 0).nonzero().flatten().tolist()
    assert empty == [3]
    feats = fbank(torch.from_numpy(birds_16k)[None] * 2**15)[0]
    assert feats.shape == (1 + (len(birds_16k) - 400) // 160, 128)
    assert torch.all(feats[:, 3] == EPS_LOG)
    assert torch.isfinite(feats).all()
    assert feats[:, [0, 1, 2, 4]].min() > EPS_LOG


def test_frame_count_matches_kaldi() -> None:
    cfg = FbankConfig(num_mel_bins=40)
    rng = np.random.default_rng(0)
    for length in (0, 399, 400, 559, 560, 16000, 16399):
        samples = rng.standard_normal(length).astype(np.float32) * 1000
        expected = _knf_fbank(samples, 40).shape[0]
        assert num_frames(length, cfg) == expected, length
        assert fbank(torch.from_numpy(samples)[None], cfg).shape == (1, expected, 40)


def test_batched_equals_one_by_one(birds_16k: np.ndarray) -> None:
    clips = torch.from_numpy(np.stack([birds_16k[:48000], birds_16k[48000:96000]])) * 2**15
    batched = fbank(clips)
    for i in range(2):
        torch.testing.assert_close(batched[i], fbank(clips[i]).squeeze(0), atol=1e-5, rtol=0)
    assert not torch.allclose(batched[0], batched[1])


def test_batch_split_into_passes_is_exact(birds_16k: np.ndarray) -> None:
    # 5 s rows: 498 frames at 10 ms, so a pass of FRAMES_PER_PASS (2048) takes 4 rows and a
    # batch of 9 runs in 3 passes; each pass must give what one pass over the batch gives.
    cfg = FbankConfig()
    assert FRAMES_PER_PASS // num_frames(80000, cfg) == 4
    clips = torch.from_numpy(np.stack(
        [np.roll(birds_16k[:80000], 1601 * i) for i in range(9)])) * 2**15
    layer = KaldiFbank(cfg)
    split = layer(clips)
    whole = layer._log_mel(clips)
    assert split.shape == (9, 498, 128)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=0)  # equal here, bit for bit
    assert not torch.equal(split[0], split[4])


def test_beats_scaling_and_silence(birds_16k: np.ndarray) -> None:
    wave = torch.from_numpy(birds_16k[:32000])[None]
    expected = (fbank(wave * 2**15) - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)
    torch.testing.assert_close(beats_fbank(wave), expected, atol=0, rtol=0)
    silent = beats_fbank(torch.zeros(1, 16000))
    floor = (EPS_LOG - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)
    torch.testing.assert_close(silent, torch.full_like(silent, floor))


def test_autocast_keeps_float32(birds_16k: np.ndarray) -> None:
    module = KaldiFbank()
    wave = torch.from_numpy(birds_16k[:16000])[None] * 2**15
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = module(wave)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, module(wave), atol=0, rtol=0)
    assert module.state_dict() == {}


def test_bad_options_and_input() -> None:
    with pytest.raises(ValueError, match="known: povey"):
        FbankConfig(window_type="blackman")
    with pytest.raises(ValueError, match="low_freq"):
        FbankConfig(low_freq=9000.0)
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        fbank(torch.zeros(1, 1, 1000))
    with pytest.raises(TypeError, match="floating-point"):
        fbank(torch.zeros(1, 1000, dtype=torch.int16))
