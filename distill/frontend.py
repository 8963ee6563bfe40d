"""The students' front end: raw audio -> log-mel, from Conv1d, MatMul and elementwise ops only.

TensorRT 10 has no ONNX STFT, DFT or window-function op, so the spectrogram is built from a fixed
Conv1d DFT basis (windowed cos and sin kernels, stride = hop), the power ``re**2 + im**2``, a mel
MatMul and a log. Two variants share one config:

- ``"dft"``: the fixed basis. Only the DFT bins that some mel filter uses are computed (bins
  outside ``fmin..fmax`` are dropped), and a window shorter than ``n_fft`` shortens the kernels
  instead of padding them with zeros. Equal to ``torch.stft`` + the mel matrix (see the tests).
- ``"filterbank"``: a learned strided filterbank, one complex (cos / sin) kernel pair per mel
  band, initialised so that its expected band power on white noise equals the ``"dft"`` variant's.
  It needs ``2 * n_mels`` kernels instead of ``2 * bins`` and no mel MatMul.

Mel scales: ``"htk"`` is ``2595 * log10(1 + f / 700)``; ``"slaney"`` is linear below 1 kHz
(``3 f / 200``) and logarithmic above (27 steps per ``ln 6.4``), as librosa's default.
Triangles are evaluated at the DFT bin frequencies (as torchaudio's ``melscale_fbanks``);
``mel_norm="slaney"`` scales each triangle to unit area.

    >>> import torch
    >>> cfg = FrontEndConfig(n_fft=400, win_length=400, hop_length=160, n_mels=64)
    >>> fe = build_frontend(cfg)
    >>> fe(torch.zeros(2, 16000)).shape
    torch.Size([2, 1, 64, 101])
    >>> cfg.n_frames(16000), cfg.dft_macs(16000) == 2 * len(cfg.kept_bins()) * 400 * 101
    (101, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

VARIANTS = ("dft", "filterbank")
MEL_SCALES = ("htk", "slaney")
MEL_NORMS = ("none", "slaney")


@dataclass(frozen=True)
class FrontEndConfig:
    """Every parameter of the front end; stored in student checkpoints and exports.

    Args:
        sample_rate: input rate in Hz.
        n_fft: DFT length (any integer, not only powers of two); bins are ``sample_rate / n_fft``
            apart.
        win_length: periodic Hann window length, at most ``n_fft`` (centred in the frame).
        hop_length: samples between frames (the Conv1d stride).
        n_mels: mel bands.
        fmin: lowest mel edge in Hz.
        fmax: highest mel edge in Hz (at most ``sample_rate / 2``).
        log_offset: added to the mel power before the natural log.
        variant: ``"dft"`` (fixed basis) or ``"filterbank"`` (learned, initialised as mel).
        mel_scale: ``"htk"`` or ``"slaney"``.
        mel_norm: ``"none"`` (peak 1) or ``"slaney"`` (unit area).
        center: pad ``n_fft // 2`` zeros on both sides, so a clip of ``L`` samples gives
            ``1 + L // hop_length`` frames (``torch.stft(center=True, pad_mode="constant")``).
    """

    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 64
    fmin: float = 50.0
    fmax: float = 8000.0
    log_offset: float = 1e-5
    variant: str = "dft"
    mel_scale: str = "htk"
    mel_norm: str = "none"
    center: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown front-end variant {self.variant!r}; known: {VARIANTS}")
        if self.mel_scale not in MEL_SCALES:
            raise ValueError(f"unknown mel scale {self.mel_scale!r}; known: {MEL_SCALES}")
        if self.mel_norm not in MEL_NORMS:
            raise ValueError(f"unknown mel norm {self.mel_norm!r}; known: {MEL_NORMS}")
        if not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"win_length must be in 1..n_fft={self.n_fft}, got {self.win_length}")
        if self.hop_length <= 0 or self.n_mels <= 0 or self.sample_rate <= 0:
            raise ValueError("sample_rate, hop_length and n_mels must be positive")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={self.fmin}, "
                             f"fmax={self.fmax}, sample_rate={self.sample_rate}")
        if self.log_offset <= 0:
            raise ValueError(f"log_offset must be positive, got {self.log_offset}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the checkpoint form)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrontEndConfig:
        """Rebuild from `to_dict` output; unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FrontEndConfig fields: {unknown}")
        return cls(**data)

    @property
    def n_bins(self) -> int:
        """Bins of a one-sided DFT of length ``n_fft``."""
        return self.n_fft // 2 + 1

    def n_frames(self, samples: int) -> int:
        """Frames for a clip of ``samples`` samples."""
        if self.center:
            return 1 + samples // self.hop_length
        if samples < self.n_fft:
            raise ValueError(f"a clip of {samples} samples is shorter than n_fft={self.n_fft}")
        return 1 + (samples - self.n_fft) // self.hop_length

    def kept_bins(self) -> list[int]:
        """DFT bins that at least one mel filter weights (the only ones the ``dft`` variant computes)."""
        weights = mel_matrix(self)
        return [int(k) for k in (weights.abs().sum(0) > 0).nonzero().flatten()]

    def dft_macs(self, samples: int) -> int:
        """Multiply-accumulates of the Conv1d for one clip of ``samples`` samples."""
        channels = 2 * (len(self.kept_bins()) if self.variant == "dft" else self.n_mels)
        return channels * self.win_length * self.n_frames(samples)


def hz_to_mel(freq: torch.Tensor, scale: str = "htk") -> torch.Tensor:
    """Hz -> mel on the HTK or Slaney scale."""
    import torch

    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + freq / 700.0)
    if scale != "slaney":
        raise ValueError(f"unknown mel scale {scale!r}; known: {MEL_SCALES}")
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    linear = freq / f_sp
    log = min_log_mel + torch.log(freq.clamp(min=min_log_hz) / min_log_hz) / logstep
    return torch.where(freq >= min_log_hz, log, linear)


def mel_to_hz(mel: torch.Tensor, scale: str = "htk") -> torch.Tensor:
    """Mel -> Hz, the inverse of `hz_to_mel`."""
    import torch

    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    if scale != "slaney":
        raise ValueError(f"unknown mel scale {scale!r}; known: {MEL_SCALES}")
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(mel >= min_log_mel,
                       min_log_hz * torch.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def mel_matrix(cfg: FrontEndConfig) -> torch.Tensor:
    """Triangular mel filters ``[n_mels, n_bins]`` (float64) at the DFT bin frequencies.

    Raises ValueError when a filter covers no bin (too many mels for the DFT length), naming it.
    """
    import torch

    bin_hz = torch.arange(cfg.n_bins, dtype=torch.float64) * cfg.sample_rate / cfg.n_fft
    lo, hi = hz_to_mel(torch.tensor([cfg.fmin, cfg.fmax], dtype=torch.float64), cfg.mel_scale)
    edges = mel_to_hz(torch.linspace(float(lo), float(hi), cfg.n_mels + 2, dtype=torch.float64),
                      cfg.mel_scale)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bin_hz[None, :] - left) / (centre - left)
    down = (right - bin_hz[None, :]) / (right - centre)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    if cfg.mel_norm == "slaney":
        weights = weights * (2.0 / (right - left))
    empty = (weights.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"mel filters {empty} of {cfg.n_mels} cover no DFT bin (bins are "
            f"{cfg.sample_rate / cfg.n_fft:.1f} Hz apart with n_fft={cfg.n_fft}); use fewer mels, "
            "a longer n_fft or a higher fmin")
    return weights


def hann_window(cfg: FrontEndConfig) -> torch.Tensor:
    """The periodic Hann window of ``win_length`` (as ``torch.hann_window``), float64."""
    import torch

    n = torch.arange(cfg.win_length, dtype=torch.float64)
    return 0.5 - 0.5 * torch.cos(2.0 * math.pi * n / cfg.win_length)


def dft_basis(cfg: FrontEndConfig, bins: list[int]) -> torch.Tensor:
    """Windowed cos then sin kernels ``[2 * len(bins), 1, win_length]`` (float64).

    Sample ``j`` of a kernel sits at position ``offset + j`` of the ``n_fft`` frame, where the
    window is centred (``offset = (n_fft - win_length) // 2``), so the phase equals ``torch.stft``.
    """
    import torch

    offset = (cfg.n_fft - cfg.win_length) // 2
    n = torch.arange(cfg.win_length, dtype=torch.float64) + offset
    k = torch.tensor(bins, dtype=torch.float64)
    angle = 2.0 * math.pi * k[:, None] * n[None, :] / cfg.n_fft
    window = hann_window(cfg)[None, :]
    return torch.cat([window * torch.cos(angle), -window * torch.sin(angle)])[:, None, :]


def mel_filterbank_kernels(cfg: FrontEndConfig) -> torch.Tensor:
    """Complex band kernels initialised as mel: ``[2 * n_mels, 1, win_length]`` (float64).

    Band ``m`` is the windowed inverse DFT of ``sqrt(mel[m])`` (an analytic band-pass centred in
    the window), scaled so that white noise gives the same expected power as the ``dft`` variant:
    ``sum |h_m|^2 = sum_k mel[m, k] * sum_n window[n]^2``.
    """
    import torch

    weights = mel_matrix(cfg)
    amp = weights.sqrt()
    n = torch.arange(cfg.win_length, dtype=torch.float64) - (cfg.win_length - 1) / 2
    k = torch.arange(cfg.n_bins, dtype=torch.float64)
    angle = 2.0 * math.pi * k[:, None] * n[None, :] / cfg.n_fft
    window = hann_window(cfg)
    real = (amp @ torch.cos(angle)) * window
    imag = (amp @ torch.sin(angle)) * window
    energy = (real**2 + imag**2).sum(1, keepdim=True)
    target = weights.sum(1, keepdim=True) * (window**2).sum()
    scale = torch.sqrt(target / energy)
    return torch.cat([real * scale, imag * scale])[:, None, :]


def build_frontend(cfg: FrontEndConfig) -> nn.Module:
    """The front-end module for ``cfg``: ``[B, samples]`` float -> ``[B, 1, n_mels, frames]``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class LogMel(nn.Module):
        """Conv1d DFT (or learned band kernels), power, mel MatMul, log."""

        def __init__(self, config: FrontEndConfig) -> None:
            super().__init__()
            self.config = config
            offset = (config.n_fft - config.win_length) // 2
            padding = config.n_fft // 2 - offset if config.center else 0
            if not config.center and offset:
                raise ValueError("center=False needs win_length == n_fft")
            if config.variant == "dft":
                bins = config.kept_bins()
                kernels = dft_basis(config, bins)
                mel = mel_matrix(config)[:, bins]
            else:
                kernels = mel_filterbank_kernels(config)
                mel = None
            self.n_channels = kernels.shape[0] // 2
            self.stride, self.padding = config.hop_length, padding
            if config.variant == "filterbank":
                self.kernels = nn.Parameter(kernels.float())
            else:  # fixed: a buffer, so it is neither trained nor counted as a parameter
                self.register_buffer("kernels", kernels.float(), persistent=False)
            if mel is not None:
                self.register_buffer("mel", mel.float(), persistent=False)
            else:
                self.mel = None

        def forward(self, audio: torch.Tensor) -> torch.Tensor:
            if audio.dim() != 2:
                raise ValueError(f"audio must be [batch, samples], got shape {tuple(audio.shape)}")
            spec = F.conv1d(audio.unsqueeze(1), self.kernels, stride=self.stride,
                            padding=self.padding)
            power = spec[:, : self.n_channels] ** 2 + spec[:, self.n_channels :] ** 2
            if self.mel is not None:
                power = torch.matmul(self.mel, power)
            return torch.log(power + self.config.log_offset).unsqueeze(1)

    return LogMel(cfg)
