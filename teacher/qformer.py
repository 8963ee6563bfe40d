"""The windowed Q-Former of NatureLM-audio: learned queries read each window of encoder tokens.

The encoder tokens (already through ``ln_audio``) are cut into windows of ``window_tokens``
(17 BEATs tokens, about 0.33 s) every ``stride_tokens``; each window is one batch item of a
BLIP-2 Q-Former (transformers' `Blip2QFormerModel`: a LayerNorm on the queries, then BERT
layers with self-attention over the queries, cross-attention to the window's tokens and a
query feed-forward), so a clip gives ``windows * queries_per_window`` output vectors.

    >>> import torch
    >>> from teacher.config import QFormerConfig
    >>> cfg = QFormerConfig(hidden_size=32, num_heads=4, intermediate_size=64)
    >>> qformer = WindowedQFormer(cfg, encoder_dim=48)
    >>> qformer(torch.randn(2, 496, 48)).shape   # floor(496 / 17) windows
    torch.Size([2, 29, 32])

Parameter names and the official checkpoint: NatureLM-audio builds the Q-Former with LAVIS'
``BertLMHeadModel`` and stores it as ``audio_Qformer.bert.*`` beside ``audio_query_tokens``.
`official_qformer_key` maps those names onto this module's (see `OFFICIAL_QFORMER_RENAMES`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from teacher.config import QFormerConfig

# Official (LAVIS BertModel under `audio_Qformer.bert.`) -> this module (under `qformer.`).
OFFICIAL_QFORMER_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^audio_Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^audio_Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
     r"qformer.encoder.layer.\1.\2.attention."),
    (r"^audio_Qformer\.bert\.encoder\.", "qformer.encoder."),
    (r"^audio_query_tokens$", "query_tokens"),
)
# Official keys that hold no weights this model uses (a BERT position-id buffer).
OFFICIAL_QFORMER_IGNORED = (r"^audio_Qformer\.bert\.embeddings\.position_ids$",)


def num_windows(n_tokens: int, cfg: QFormerConfig) -> int:
    """Windows over ``n_tokens`` encoder tokens: floor, or ceil with ``pad_last_window``.

    At least one window (a clip shorter than one window is zero-padded to it).
    """
    if n_tokens <= cfg.window_tokens:
        return 1
    span = n_tokens - cfg.window_tokens
    full = span // cfg.stride_tokens + 1
    if cfg.pad_last_window and span % cfg.stride_tokens:
        return full + 1
    return full


def window_tokens(features: torch.Tensor, cfg: QFormerConfig,
                  padding_mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``features[B, N, D]`` into ``windows[B * W, window_tokens, D]`` and a key mask.

    ``padding_mask[B, N]`` (True = padding, BEATs' convention) and the zero-padding of the last
    window are both folded into ``mask[B * W, window_tokens]`` (1 = attend, 0 = ignore).
    """
    b, n, d = features.shape
    w = num_windows(n, cfg)
    needed = (w - 1) * cfg.stride_tokens + cfg.window_tokens
    valid = torch.ones(b, n, dtype=torch.long, device=features.device)
    if padding_mask is not None:
        valid = (~padding_mask.bool()).long()
    if needed > n:
        features = torch.nn.functional.pad(features, (0, 0, 0, needed - n))
        valid = torch.nn.functional.pad(valid, (0, needed - n))
    windows = features.unfold(1, cfg.window_tokens, cfg.stride_tokens)[:, :w]  # B, W, D, K
    windows = windows.permute(0, 1, 3, 2).reshape(b * w, cfg.window_tokens, d)
    mask = valid.unfold(1, cfg.window_tokens, cfg.stride_tokens)[:, :w]
    mask = mask.reshape(b * w, cfg.window_tokens)
    # A window that is all padding still needs one key to attend to (its output is unused
    # information anyway); let it see its first token rather than produce NaN.
    empty = mask.sum(1) == 0
    mask[empty, 0] = 1
    return windows, mask


class WindowedQFormer(nn.Module):
    """Learned queries per window, a BLIP-2 Q-Former over each window; [B, W*Q, hidden]."""

    def __init__(self, cfg: QFormerConfig, encoder_dim: int) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        self.cfg = cfg
        bert = Blip2QFormerConfig(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
            layer_norm_eps=cfg.layer_norm_eps, cross_attention_frequency=1,
            encoder_hidden_size=encoder_dim, use_qformer_text_input=False,
            initializer_range=cfg.initializer_range,
        )
        bert._attn_implementation = "eager"
        self.qformer = Blip2QFormerModel(bert)
        self.query_tokens = nn.Parameter(
            torch.randn(1, cfg.queries_per_window, cfg.hidden_size) * bert.initializer_range)

    def forward(self, features: torch.Tensor,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``features[B, N, encoder_dim]`` -> ``[B, windows * queries_per_window, hidden]``."""
        b = features.shape[0]
        windows, mask = window_tokens(features, self.cfg, padding_mask)
        queries = self.query_tokens.expand(windows.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=windows,
                           encoder_attention_mask=mask).last_hidden_state
        return out.reshape(b, -1, out.shape[-1])


def official_qformer_key(key: str) -> str | None:
    """This module's name (relative to `WindowedQFormer`) for an official Q-Former key.

    Returns None for keys that are not Q-Former keys or that are ignored buffers.
    """
    if any(re.match(p, key) for p in OFFICIAL_QFORMER_IGNORED):
        return None
    for pattern, repl in OFFICIAL_QFORMER_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def tokens_per_clip(n_encoder_tokens: int, cfg: QFormerConfig) -> int:
    """LLM audio tokens for a clip of ``n_encoder_tokens``: windows times queries."""
    return num_windows(n_encoder_tokens, cfg) * cfg.queries_per_window

