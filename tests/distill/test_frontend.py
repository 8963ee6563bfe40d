"""The log-mel front end: parity with torch.stft + a mel matrix, trimming, the learned variant."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from distill.frontend import (
    FrontEndConfig,
    build_frontend,
    hz_to_mel,
    mel_matrix,
    mel_to_hz,
)
from distill.students import count_macs

CONFIGS = [
    FrontEndConfig(),
    FrontEndConfig(n_fft=512, win_length=400, hop_length=320, n_mels=64, fmin=0.0),
    FrontEndConfig(n_fft=320, win_length=320, hop_length=320, n_mels=48, fmin=100.0,
                   mel_scale="slaney", mel_norm="slaney", log_offset=1e-8),
    FrontEndConfig(n_fft=256, win_length=256, hop_length=128, n_mels=32, fmin=150.0,
                   fmax=7000.0, center=False),
]


@pytest.fixture(scope="module")
def birds16k(real_recording: Path) -> torch.Tensor:
    audio, rate = sf.read(real_recording, dtype="float32")
    return torch.from_numpy(soxr.resample(audio, rate, 16000).astype(np.float32))


def reference_logmel(audio: torch.Tensor, cfg: FrontEndConfig) -> torch.Tensor:
    """torch.stft (float64) with a Hann window, power, the mel matrix, the log."""
    x = audio.double()
    window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64)
    spec = torch.stft(x, cfg.n_fft, cfg.hop_length, cfg.win_length, window, center=cfg.center,
                      pad_mode="constant", return_complex=True)
    return torch.log(mel_matrix(cfg) @ spec.abs() ** 2 + cfg.log_offset)


def loop_mel_matrix(cfg: FrontEndConfig) -> np.ndarray:
    """Triangles bin by bin in plain Python (HTK scale, no norm)."""
    def mel(f: float) -> float:
        return 2595.0 * math.log10(1.0 + f / 700.0)

    def hz(m: float) -> float:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    lo, hi = mel(cfg.fmin), mel(cfg.fmax)
    edges = [hz(lo + (hi - lo) * i / (cfg.n_mels + 1)) for i in range(cfg.n_mels + 2)]
    out = np.zeros((cfg.n_mels, cfg.n_fft // 2 + 1))
    for m in range(cfg.n_mels):
        left, centre, right = edges[m : m + 3]
        for k in range(out.shape[1]):
            f = k * cfg.sample_rate / cfg.n_fft
            if left < f <= centre:
                out[m, k] = (f - left) / (centre - left)
            elif centre < f < right:
                out[m, k] = (right - f) / (right - centre)
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.n_fft}-{c.win_length}-{c.hop_length}")
def test_logmel_equals_torch_stft_and_mel_on_real_audio(cfg: FrontEndConfig,
                                                        birds16k: torch.Tensor) -> None:
    noise = torch.randn(2, 32000, generator=torch.Generator().manual_seed(0)) * 3e-3
    audio = torch.stack([birds16k[:32000], birds16k[40000:72000] * 0.05]) + noise
    out = build_frontend(cfg)(audio)
    ref = reference_logmel(audio, cfg)
    assert out.shape == (2, 1, cfg.n_mels, cfg.n_frames(32000)) and out.dtype == torch.float32
    # float32 DFT against float64: power agrees to 1e-4 relative wherever it is above the floor.
    loud = ref > math.log(cfg.log_offset) + 3
    assert loud.float().mean() > 0.5
    assert (out[:, 0] - ref)[loud].abs().max() < 2e-4
    assert (out[:, 0] - ref).abs().max() < 1e-2


def test_mel_matrix_matches_a_loop_reference_and_known_points() -> None:
    cfg = FrontEndConfig(n_fft=512, win_length=512, n_mels=40, fmin=30.0, fmax=7800.0)
    np.testing.assert_allclose(mel_matrix(cfg).numpy(), loop_mel_matrix(cfg), atol=1e-9)
    f = torch.tensor([0.0, 500.0, 1000.0, 4000.0, 8000.0], dtype=torch.float64)
    assert float(hz_to_mel(torch.tensor(1000.0, dtype=torch.float64), "htk")) == pytest.approx(
        1000.0, abs=0.02)
    assert float(hz_to_mel(torch.tensor(1000.0, dtype=torch.float64), "slaney")) == pytest.approx(15.0)
    for scale in ("htk", "slaney"):
        torch.testing.assert_close(mel_to_hz(hz_to_mel(f, scale), scale), f)
    slaney = FrontEndConfig(n_fft=512, win_length=512, mel_norm="slaney")
    areas = (mel_matrix(slaney) * 16000 / 512).sum(1)  # Riemann sum of each triangle's area
    assert torch.allclose(areas, torch.ones_like(areas), atol=0.1)


def test_only_bins_with_mel_weight_are_computed() -> None:
    cfg = FrontEndConfig(n_fft=400, win_length=400, n_mels=64, fmin=300.0, fmax=6000.0)
    kept = cfg.kept_bins()
    weights = mel_matrix(cfg)
    dropped = sorted(set(range(cfg.n_bins)) - set(kept))
    assert dropped and weights[:, dropped].abs().sum() == 0
    assert (weights[:, kept].sum(0) > 0).all()
    fe = build_frontend(cfg)
    assert fe.kernels.shape == (2 * len(kept), 1, 400)
    assert count_macs(fe, 16000) == cfg.dft_macs(16000) + 64 * len(kept) * cfg.n_frames(16000)
    assert sum(p.numel() for p in fe.parameters()) == 0  # the fixed basis is not trained


def test_any_length_gives_one_frame_per_hop() -> None:
    cfg = FrontEndConfig(hop_length=160)
    fe = build_frontend(cfg)
    for samples in (400, 16001, 23456):
        assert fe(torch.randn(1, samples)).shape[-1] == 1 + samples // 160


def test_bad_configs_raise_clearly() -> None:
    with pytest.raises(ValueError, match="cover no DFT bin"):
        mel_matrix(FrontEndConfig(n_fft=128, win_length=128, n_mels=128, fmin=0.0))
    with pytest.raises(ValueError, match="unknown front-end variant"):
        FrontEndConfig(variant="stft")
    with pytest.raises(ValueError, match="win_length"):
        FrontEndConfig(n_fft=256, win_length=400)
    with pytest.raises(ValueError, match="unknown FrontEndConfig fields"):
        FrontEndConfig.from_dict({**FrontEndConfig().to_dict(), "power": 2})
    with pytest.raises(ValueError, match="batch, samples"):
        build_frontend(FrontEndConfig())(torch.zeros(16000))


def test_config_round_trips() -> None:
    cfg = CONFIGS[2]
    assert FrontEndConfig.from_dict(cfg.to_dict()) == cfg


def test_filterbank_starts_as_mel_in_expected_power_and_learns() -> None:
    torch.manual_seed(0)
    dft_cfg = FrontEndConfig(n_fft=320, win_length=320, hop_length=320, n_mels=48, fmin=100.0)
    fb_cfg = FrontEndConfig(**{**dft_cfg.to_dict(), "variant": "filterbank"})
    noise = torch.randn(4, 160000) * 0.1
    dft, fb = build_frontend(dft_cfg), build_frontend(fb_cfg)
    band_dft = dft(noise).exp().mean((0, 1, 3)).log()
    band_fb = fb(noise).exp().mean((0, 1, 3)).log()
    assert (band_dft - band_fb).abs().max() < 0.1  # within 10% of the dft power in every band
    assert fb.kernels.shape == (2 * 48, 1, 320) and fb.kernels.requires_grad
    fb(noise[:1, :16000]).mean().backward()
    assert fb.kernels.grad is not None and fb.kernels.grad.abs().sum() > 0
    assert fb_cfg.dft_macs(160000) < dft_cfg.dft_macs(160000) / 2
