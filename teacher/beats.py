"""BEATs audio encoder (Chen et al. 2022, arXiv 2212.09058), the encoder of NatureLM-audio.

Waveform at 16 kHz -> Kaldi 128-bin log-mel fbank (:mod:`teacher.fbank`) -> 16 x 16 patch
embedding (or, off the official architecture, a convolutional stem onto the same patch grid:
``BEATsConfig.conv_stem``, what the `tiny` teacher uses) -> LayerNorm -> ``post_extract_proj``
-> transformer encoder (convolutional position embedding, bucketed relative position bias
shared by all layers and gated per query by ``grep_linear`` / ``grep_a``, post-norm with
DeepNorm residual scaling).
Parameter names follow the official BEATs checkpoints, so a user's
``BEATs_iter3_plus_AS2M*.pt`` loads with :func:`load_beats` and no missing keys.

Tokens are ordered time-major: 8 frequency patches per 16-frame time step, so 10 s gives
62 x 8 = 496 tokens of ``encoder_embed_dim`` (768 at full size).

    >>> import torch
    >>> from teacher.beats import BEATs, beats_config
    >>> model = BEATs(beats_config("tiny")).eval()
    >>> features, mask = model(torch.randn(2, 16000) * 0.1)
    >>> tuple(features.shape), mask
    ((2, 48, 192), None)
    >>> model.num_tokens(160000), beats_config("iter3").encoder_embed_dim
    (496, 768)
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from runtime.errors import InputError
from teacher.fbank import BEATS_FBANK_MEAN, BEATS_FBANK_STD, FbankConfig, KaldiFbank, num_frames

ACTIVATIONS = ("gelu", "gelu_accurate", "relu", "tanh", "linear")


@dataclass(frozen=True)
class BEATsConfig:
    """BEATs architecture; field names and meanings are those of the official ``BEATsConfig``.

    The last six fields are not in the official config (it hard-codes them or has no such
    option): the sample rate, the mel bins and hop of the fbank, its normalisation constants,
    and ``conv_stem``: empty (the official 16 x 16 patch embedding, one linear map per patch)
    or the channels of stride-2, 4 x 4 convolutions (each followed by GELU) that take the
    fbank down to the patch grid, then a 1 x 1 ``patch_embedding`` into ``embed_dim``: the
    same tokens in the same order, seen through overlapping, nonlinear filters ("early
    convolutions help transformers see better", Xiao et al. 2021). Their number fixes the
    stride, which must equal ``input_patch_size``.
    """

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = False
    predictor_dropout: float = 0.0
    predictor_class: int = 527
    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_shift_ms: float = 10.0
    fbank_mean: float = BEATS_FBANK_MEAN
    fbank_std: float = BEATS_FBANK_STD
    conv_stem: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.input_patch_size <= 0:
            raise ValueError(f"input_patch_size must be positive, got {self.input_patch_size}")
        if self.conv_stem and (2 ** len(self.conv_stem) != self.input_patch_size
                               or min(self.conv_stem) < 1):
            raise ValueError(
                f"conv_stem {list(self.conv_stem)}: {len(self.conv_stem)} stride-2 layers "
                f"make patches of {2 ** len(self.conv_stem)}, not input_patch_size "
                f"{self.input_patch_size} (or a channel count is below 1)"
            )
        if self.frame_shift_ms <= 0:
            raise ValueError(f"frame_shift_ms must be positive, got {self.frame_shift_ms}")
        if self.num_mel_bins % self.input_patch_size:
            raise ValueError(
                f"num_mel_bins {self.num_mel_bins} is not a multiple of "
                f"input_patch_size {self.input_patch_size}"
            )
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(
                f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"encoder_attention_heads {self.encoder_attention_heads}"
            )
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ValueError(
                f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"conv_pos_groups {self.conv_pos_groups}"
            )
        if self.activation_fn not in ACTIVATIONS:
            raise ValueError(
                f"activation_fn {self.activation_fn!r} is not supported; "
                f"known: {', '.join(ACTIVATIONS)}"
            )
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("deep_norm and layer_norm_first exclude each other")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field, for checkpoints (round-trips through :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> BEATsConfig:
        """Config from a checkpoint's ``cfg`` dict (ours or the official one).

        Keys absent from ``cfg`` take the official ``BEATsConfig`` defaults (as the official
        code does), not the iter3 values; keys that do not describe the architecture
        (training options in some checkpoints) are ignored with a warning naming them.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            warnings.warn(
                f"BEATs config keys ignored (not architecture fields): {', '.join(unknown)}",
                stacklevel=2,
            )
        values = {**_OFFICIAL_DEFAULTS, **{k: v for k, v in cfg.items() if k in known}}
        values["conv_stem"] = tuple(values.get("conv_stem", ()))
        return cls(**values)


_OFFICIAL_DEFAULTS: dict[str, Any] = {
    "input_patch_size": -1,
    "embed_dim": 512,
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 1.0,
    "layer_norm_first": False,
    "deep_norm": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "dropout_input": 0.0,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
    "finetuned_model": False,
    "predictor_dropout": 0.1,
    "predictor_class": 527,
}
"""Defaults of the official ``BEATsConfig`` class, used for keys a checkpoint omits."""

_PRESETS: dict[str, BEATsConfig] = {
    # BEATs_iter3_plus_AS2M, the encoder of NatureLM-audio v1 (90M parameters).
    "iter3": BEATsConfig(encoder_layerdrop=0.05),
    # Trains on 2 CPU cores in minutes; same token rate and every mechanism of iter3.
    "tiny": BEATsConfig(
        embed_dim=128,
        encoder_layers=2,
        encoder_embed_dim=192,
        encoder_ffn_embed_dim=384,
        encoder_attention_heads=4,
        conv_pos=32,
        conv_pos_groups=8,
        num_buckets=64,
        max_distance=256,
    ),
}


def beats_config(name: str, **overrides: Any) -> BEATsConfig:
    """Named preset (``"tiny"`` or ``"iter3"``), optionally with fields overridden."""
    if name not in _PRESETS:
        raise ValueError(f"unknown BEATs preset {name!r}; known: {', '.join(sorted(_PRESETS))}")
    return replace(_PRESETS[name], **overrides)


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``scale`` (layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:  # noqa: ANN401
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN401
        return grad * ctx.scale, None


def _activation(name: str, x: Tensor) -> Tensor:
    if name == "gelu":
        return F.gelu(x.float()).type_as(x)
    if name == "gelu_accurate":
        return F.gelu(x.float(), approximate="tanh").type_as(x)
    if name == "relu":
        return F.relu(x)
    if name == "tanh":
        return torch.tanh(x)
    return x


def _tap_norm(v: Tensor) -> Tensor:
    """``[1, 1, K]`` L2 norm of a ``[out, in, K]`` kernel per tap, as weight_norm(dim=2).

    Reduced over one contiguous row per tap: a strided reduction over dims (0, 1) is ~100x
    less accurate in float32 (~1e-5 relative at 768 x 48 elements).
    """
    rows = v.transpose(0, 2).reshape(v.shape[2], -1)
    return torch.linalg.vector_norm(rows, dim=1).view(1, 1, -1)


class WeightNormConv1d(nn.Module):
    """Conv1d with weight normalisation over dim 2, stored as ``weight_g`` / ``weight_v``.

    The official checkpoints were saved with ``torch.nn.utils.weight_norm(dim=2)``; keeping
    the two tensors as plain parameters keeps their names and exports cleanly to ONNX.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.padding = kernel_size // 2
        weight = torch.empty(channels, channels // groups, kernel_size)
        nn.init.normal_(weight, mean=0.0, std=math.sqrt(4.0 / (kernel_size * channels)))
        self.weight_g = nn.Parameter(_tap_norm(weight))
        self.weight_v = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(channels))

    def weight(self) -> Tensor:
        """The effective kernel ``g * v / ||v||`` (norm over output and input channels)."""
        return self.weight_v * (self.weight_g / _tap_norm(self.weight_v))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class _SamePad(nn.Module):
    """Drops the extra last step an even kernel with ``padding = k // 2`` produces."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, : x.shape[2] - self.remove]


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> Tensor:
    """``[length, length]`` bucket of key position minus query position (T5 style, two-sided).

    Half of the buckets per direction are exact offsets, the rest log-spaced up to
    ``max_distance``; computed in float32 exactly as the official code, so the buckets match.
    """
    position = torch.arange(length, dtype=torch.long)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).to(torch.long) * half
    distance = relative.abs()
    max_exact = half // 2
    scaled = torch.log(distance.clamp(min=1).float() / max_exact)
    scaled = scaled / math.log(max_distance / max_exact) * (half - max_exact)
    large = torch.clamp(max_exact + scaled.to(torch.long), max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class BEATsAttention(nn.Module):
    """Multi-head self-attention with a gated relative position bias (module ``self_attn``)."""

    def __init__(self, cfg: BEATsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = dim // self.num_heads
        self.dropout = cfg.attention_dropout
        self.num_buckets = cfg.num_buckets
        self.max_distance = cfg.max_distance
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        for proj in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))
        self.relative_attention_bias: nn.Embedding | None = None
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, self.num_heads)
            nn.init.xavier_normal_(self.relative_attention_bias.weight)

    def position_bias(self, length: int) -> Tensor:
        """``[1, heads, length, length]`` learned bias of each relative-position bucket."""
        if self.relative_attention_bias is None:
            raise RuntimeError("this attention layer has no relative position embedding")
        table = self.relative_attention_bias.weight
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
        return F.embedding(buckets.to(table.device), table).permute(2, 0, 1).unsqueeze(0)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None, position_bias: Tensor | None
    ) -> Tensor:
        """``x``: ``[B, N, D]``; ``key_padding_mask``: ``[B, N]`` True where padded."""
        batch, length, dim = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        bias: Tensor | None = None
        if position_bias is not None:
            bias = position_bias.to(q.dtype)
            if self.gru_rel_pos:
                gates = self.grep_linear(q).view(batch, self.num_heads, length, 2, 4).sum(-1)
                gate_a, gate_b = torch.sigmoid(gates).chunk(2, dim=-1)
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
        if key_padding_mask is not None:
            blocked = torch.zeros(batch, 1, 1, length, dtype=q.dtype, device=q.device)
            # The dtype's minimum, not -inf: a clip that is all padding gets uniform weights
            # instead of NaN; any row with one real key is unchanged.
            lowest = torch.finfo(q.dtype).min
            blocked = blocked.masked_fill(key_padding_mask[:, None, None, :], lowest)
            bias = blocked if bias is None else bias + blocked
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and torch.is_grad_enabled():
            out = _attention_math(q, k, v, bias, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


def _attention_math(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                    dropout: float) -> Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v``, as `F.scaled_dot_product_attention` computes it.

    Used where gradients flow on the CPU: there PyTorch's SDPA takes its math path with a
    "safe" softmax (checks for rows of -inf, which this module never makes: padding is the
    dtype's minimum), and its backward is slow; measured on the `tiny` preset's encoder
    pretraining step (16 clips, 248 tokens, one thread, a busy 2-core machine, fastest of
    six): 562 -> 352 ms, outputs equal to 4e-8. Inference and CUDA keep SDPA (its fused
    kernels)."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias
    weights = scores.softmax(dim=-1)
    if dropout > 0:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, v)


def _conv_stem(channels: tuple[int, ...]) -> nn.Sequential:
    """Stride-2, 4 x 4 convolutions + GELU from the one-channel fbank through ``channels``
    (`BEATsConfig.conv_stem`). Biases start at zero: with PyTorch's default ones the layers'
    constant offsets swamp the input at init (the `tiny` preset's tokens of different clips
    2% apart, 28% with zeros)."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip((1, *channels[:-1]), channels, strict=True):
        conv = nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.GELU()]
    return nn.Sequential(*layers)


class BEATsLayer(nn.Module):
    """One encoder layer: post-norm (DeepNorm residual scaling) or pre-norm."""

    def __init__(self, cfg: BEATsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.activation_fn = cfg.activation_fn
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn = BEATsAttention(cfg, has_relative_attention_bias)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.activation_dropout)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def _feed_forward(self, x: Tensor) -> Tensor:
        x = self.dropout2(_activation(self.activation_fn, self.fc1(x)))
        return self.dropout3(self.fc2(x))

    def forward(
        self, x: Tensor, padding_mask: Tensor | None, position_bias: Tensor | None
    ) -> Tensor:
        if self.layer_norm_first:
            x = x + self.dropout1(
                self.self_attn(self.self_attn_layer_norm(x), padding_mask, position_bias)
            )
            return x + self._feed_forward(self.final_layer_norm(x))
        x = x * self.alpha + self.dropout1(self.self_attn(x, padding_mask, position_bias))
        x = self.self_attn_layer_norm(x)
        x = x * self.alpha + self._feed_forward(x)
        return self.final_layer_norm(x)


class BEATsEncoder(nn.Module):
    """The transformer (module ``encoder``): conv position embedding, layers, final norm."""

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.dropout = cfg.dropout
        self.layerdrop = cfg.encoder_layerdrop
        self.layer_norm_first = cfg.layer_norm_first
        self.gradient_decay = cfg.layer_wise_gradient_decay_ratio
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups),
            _SamePad(cfg.conv_pos),
            nn.GELU(),
        )
        relative = cfg.relative_position_embedding
        self.layers = nn.ModuleList(
            BEATsLayer(cfg, has_relative_attention_bias=relative and i == 0)
            for i in range(cfg.encoder_layers)
        )
        if relative:
            shared = self.layers[0].self_attn.relative_attention_bias
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = shared
        self.layer_norm = nn.LayerNorm(dim)
        self._init_weights(cfg)

    def _init_weights(self, cfg: BEATsConfig) -> None:
        """BERT-style init (normal 0.02), then DeepNorm's Xavier gains, as the official code."""
        for module in self.layers.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        if cfg.deep_norm:
            beta = math.pow(8 * cfg.encoder_layers, -0.25)
            for layer in self.layers:
                attn = layer.self_attn
                nn.init.xavier_normal_(attn.k_proj.weight, gain=1.0)
                nn.init.xavier_normal_(attn.q_proj.weight, gain=1.0)
                for weight in (attn.v_proj.weight, attn.out_proj.weight):
                    nn.init.xavier_normal_(weight, gain=beta)
                nn.init.xavier_normal_(layer.fc1.weight, gain=beta)
                nn.init.xavier_normal_(layer.fc2.weight, gain=beta)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``[B, N, D]`` tokens and ``[B, N]`` padding mask (True = padded) -> ``[B, N, D]``."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, p=self.dropout, training=self.training)
        first = self.layers[0].self_attn
        bias = (
            first.position_bias(x.shape[1]) if first.relative_attention_bias is not None else None
        )
        for layer in self.layers:
            if self.gradient_decay != 1.0 and torch.is_grad_enabled():
                x = _GradScale.apply(x, self.gradient_decay)
            if self.training and self.layerdrop > 0.0 and float(torch.rand(())) < self.layerdrop:
                continue
            x = layer(x, padding_mask, bias)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATs(nn.Module):
    """BEATs encoder: ``forward(wave [B, T] at 16 kHz, padding_mask [B, T] | None)``.

    Returns ``(features [B, N, encoder_embed_dim], padding_mask [B, N] | None)``; the mask
    is True on tokens whose samples were all padding, derived as the official code does.
    """

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fbank = KaldiFbank(
            FbankConfig(sample_rate=cfg.sample_rate, num_mel_bins=cfg.num_mel_bins,
                        frame_shift_ms=cfg.frame_shift_ms)
        )
        self.conv_stem: nn.Sequential | None = None
        if cfg.conv_stem:
            self.conv_stem = _conv_stem(cfg.conv_stem)
            self.patch_embedding = nn.Conv2d(cfg.conv_stem[-1], cfg.embed_dim, 1,
                                             bias=cfg.conv_bias)
        else:
            self.patch_embedding = nn.Conv2d(
                1, cfg.embed_dim, cfg.input_patch_size, stride=cfg.input_patch_size,
                bias=cfg.conv_bias
            )
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj: nn.Linear | None = None
        if cfg.embed_dim != cfg.encoder_embed_dim:
            self.post_extract_proj = nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = BEATsEncoder(cfg)
        self.predictor: nn.Linear | None = None
        if cfg.finetuned_model:
            self.predictor_dropout = nn.Dropout(cfg.predictor_dropout)
            self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)

    @property
    def min_samples(self) -> int:
        """Shortest input that yields one token (2,800 samples = 0.175 s at full size)."""
        fb = self.fbank.cfg
        return fb.window_size + (self.cfg.input_patch_size - 1) * fb.window_shift

    def num_tokens(self, num_samples: int) -> int:
        """Tokens produced for ``num_samples`` samples (496 for 10 s at 16 kHz)."""
        patch = self.cfg.input_patch_size
        frames = num_frames(num_samples, self.fbank.cfg)
        return (frames // patch) * (self.cfg.num_mel_bins // patch)

    def preprocess(self, wave: Tensor) -> Tensor:
        """Normalised fbank ``[B, frames, mel]`` of ``wave`` in [-1, 1], always float32."""
        cfg = self.cfg
        feats = self.fbank(wave.to(torch.float32) * 2**15)
        return (feats - cfg.fbank_mean) / (2.0 * cfg.fbank_std)

    @staticmethod
    def _downsample_mask(padding_mask: Tensor, steps: int) -> Tensor:
        """Official mask reduction: trim the remainder, group, and keep all-padded groups."""
        usable = padding_mask.shape[1] - padding_mask.shape[1] % steps
        return padding_mask[:, :usable].reshape(padding_mask.shape[0], steps, -1).all(-1)

    def _check(self, wave: Tensor, padding_mask: Tensor | None) -> None:
        if wave.dim() != 2:
            raise ValueError(f"BEATs expects a [batch, samples] waveform, got {tuple(wave.shape)}")
        if wave.shape[1] < self.min_samples:
            raise ValueError(
                f"BEATs needs at least {self.min_samples} samples "
                f"({self.min_samples / self.cfg.sample_rate:.3f} s), got {wave.shape[1]}"
            )
        if padding_mask is not None and padding_mask.shape != wave.shape:
            raise ValueError(
                f"padding_mask {tuple(padding_mask.shape)} must match the waveform "
                f"{tuple(wave.shape)}"
            )

    def forward(
        self, wave: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        self._check(wave, padding_mask)
        feats = self.preprocess(wave)
        mask = None if padding_mask is None else padding_mask.to(torch.bool)
        if mask is not None:
            mask = self._downsample_mask(mask, feats.shape[1])
        return self.encode_fbank(feats, mask)

    def encode_fbank(
        self, feats: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The encoder from a normalised fbank ``[B, frames, mel]`` (`preprocess`'s output),
        with an optional ``[B, frames]`` padding mask: what `forward` runs after `preprocess`,
        so a fixed fbank can be computed once and reused (encoder pretraining caches it)."""
        grid = feats.unsqueeze(1).to(self.patch_embedding.weight.dtype)
        if self.conv_stem is not None:
            grid = self.conv_stem(grid)
        patches = self.patch_embedding(grid)
        tokens = self.layer_norm(patches.flatten(2).transpose(1, 2))
        if mask is not None:
            mask = self._downsample_mask(mask, tokens.shape[1])
        if self.post_extract_proj is not None:
            tokens = self.post_extract_proj(tokens)
        x = self.encoder(self.dropout_input(tokens), mask)
        return x, mask

    def classify(self, wave: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Clip logits ``[B, predictor_class]`` of a fine-tuned checkpoint (mean over tokens)."""
        if self.predictor is None:
            raise RuntimeError("this BEATs has no predictor (finetuned_model is False)")
        x, mask = self(wave, padding_mask)
        logits = self.predictor(self.predictor_dropout(x))
        if mask is None:
            return logits.mean(dim=1)
        keep = (~mask).unsqueeze(-1).to(logits.dtype)
        return (logits * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


_PARAMETRIZATION_SUFFIXES = {
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}
_DERIVED_BUFFERS = ("fbank.window", "fbank.mel_fb", "fbank.mel_banks")


def beats_state_dict_keys(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Map a BEATs state dict onto this module's names.

    Takes the keys under ``prefix`` (e.g. ``"beats."`` inside a larger model; the prefix is
    stripped), renames ``torch.nn.utils.parametrizations.weight_norm`` tensors
    (``...parametrizations.weight.original0/1``) to the official ``weight_g`` / ``weight_v``
    and drops fbank constants (window, mel matrix) that some ports store as buffers; they are
    recomputed from the config. The relative position table is one tensor shared by every
    layer; files that store it once (safetensors drops shared copies) get it copied to each
    layer. Official checkpoints pass through unchanged.
    """
    mapped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name in _DERIVED_BUFFERS:
            continue
        for old, new in _PARAMETRIZATION_SUFFIXES.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        mapped[name] = value
    _share_relative_bias(mapped)
    return mapped


def _share_relative_bias(mapped: dict[str, Tensor]) -> None:
    first = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    if first not in mapped:
        return
    layers = {int(key.split(".")[2]) for key in mapped if key.startswith("encoder.layers.")}
    for index in layers:
        mapped.setdefault(
            f"encoder.layers.{index}.self_attn.relative_attention_bias.weight", mapped[first]
        )


def load_beats_state_dict(model: BEATs, state_dict: dict[str, Tensor], source: str) -> None:
    """Strictly load a (mapped) state dict; raises ``InputError`` naming differing keys."""
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            source,
            "BEATs weights do not match the config: "
            f"missing keys {sorted(result.missing_keys)}, "
            f"unexpected keys {sorted(result.unexpected_keys)}",
        )


def load_beats(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> BEATs:
    """Rebuild BEATs from an official ``BEATs_*.pt`` file (keys ``cfg`` and ``model``).

    Reads with `teacher.torchio.load_checkpoint` (``weights_only``): only tensors and plain
    containers are unpickled, never arbitrary objects. A file that needs more raises
    ``InputError``; re-save it as ``{"cfg": dict, "model": state_dict}`` from a trusted
    environment.
    """
    from teacher.torchio import load_checkpoint

    source = os.fspath(path)
    checkpoint = load_checkpoint(source, what="BEATs checkpoint", map_location=map_location)
    if not {"cfg", "model"} <= set(checkpoint):
        raise InputError(source, "a BEATs checkpoint holds 'cfg' and 'model'; "
                                 f"found {sorted(checkpoint)}")
    cfg = checkpoint["cfg"]
    cfg = BEATsConfig.from_dict(cfg if isinstance(cfg, dict) else vars(cfg))
    model = BEATs(cfg)
    load_beats_state_dict(model, beats_state_dict_keys(checkpoint["model"]), source)
    return model.eval()
