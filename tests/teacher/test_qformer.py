"""The windowed Q-Former: window counts, locality, masking, and parity with a hand-written
BLIP-2 (LAVIS) query path read through the official parameter names."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from teacher.config import QFormerConfig
from teacher.qformer import WindowedQFormer, num_windows, official_qformer_key, window_tokens

SMALL = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      dropout=0.0)


def _official_state(q: WindowedQFormer) -> dict[str, torch.Tensor]:
    """The module's weights under official NatureLM names (inverting the documented map)."""
    ours = q.state_dict()
    names = ["audio_query_tokens", "audio_Qformer.bert.embeddings.LayerNorm.weight",
             "audio_Qformer.bert.embeddings.LayerNorm.bias"]
    for key in ours:
        if key.startswith("qformer.encoder."):
            rest = key.removeprefix("qformer.encoder.")
            rest = rest.replace("attention.attention.", "attention.self.")
            names.append("audio_Qformer.bert.encoder." + rest)
    state = {name: ours[official_qformer_key(name)] for name in names}
    assert len(state) == len(ours)
    return state


def _lavis_attention(w: dict[str, torch.Tensor], p: str, x: torch.Tensor, kv: torch.Tensor,
                     mask: torch.Tensor | None, heads: int) -> torch.Tensor:
    """BertAttention of LAVIS: multi-head attention, dense, dropout-free residual LayerNorm."""
    def proj(name: str, t: torch.Tensor) -> torch.Tensor:
        y = t @ w[f"{p}.self.{name}.weight"].T + w[f"{p}.self.{name}.bias"]
        return y.view(*y.shape[:2], heads, -1).transpose(1, 2)
    q, k, v = proj("query", x), proj("key", kv), proj("value", kv)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(*x.shape)
    out = ctx @ w[f"{p}.output.dense.weight"].T + w[f"{p}.output.dense.bias"]
    return F.layer_norm(out + x, x.shape[-1:], w[f"{p}.output.LayerNorm.weight"],
                        w[f"{p}.output.LayerNorm.bias"], eps=1e-12)


def _lavis_reference(w: dict[str, torch.Tensor], windows: torch.Tensor, mask: torch.Tensor,
                     cfg: QFormerConfig) -> torch.Tensor:
    """The query path of LAVIS' BertModel(query_embeds=..., encoder_hidden_states=...)."""
    x = w["audio_query_tokens"].expand(windows.shape[0], -1, -1)
    x = F.layer_norm(x, x.shape[-1:], w["audio_Qformer.bert.embeddings.LayerNorm.weight"],
                     w["audio_Qformer.bert.embeddings.LayerNorm.bias"], eps=1e-12)
    for i in range(cfg.num_layers):
        p = f"audio_Qformer.bert.encoder.layer.{i}"
        x = _lavis_attention(w, f"{p}.attention", x, x, None, cfg.num_heads)
        x = _lavis_attention(w, f"{p}.crossattention", x, windows, mask, cfg.num_heads)
        h = F.gelu(x @ w[f"{p}.intermediate_query.dense.weight"].T
                   + w[f"{p}.intermediate_query.dense.bias"])
        h = h @ w[f"{p}.output_query.dense.weight"].T + w[f"{p}.output_query.dense.bias"]
        x = F.layer_norm(h + x, x.shape[-1:], w[f"{p}.output_query.LayerNorm.weight"],
                         w[f"{p}.output_query.LayerNorm.bias"], eps=1e-12)
    return x


def test_window_counts_floor_like_the_official_unfold_or_ceil_when_padding() -> None:
    official = QFormerConfig()
    padded = QFormerConfig(pad_last_window=True)
    assert num_windows(496, official) == 29  # a 10 s clip at full size
    for n in (1, 16, 17, 18, 34, 35, 100, 496):
        assert num_windows(n, padded) == max(1, math.ceil(n / 17))
        assert num_windows(n, official) == max(1, n // 17)


@pytest.mark.parametrize("pad_last_window", [False, True])
def test_matches_hand_written_lavis_query_path(pad_last_window: bool) -> None:
    torch.manual_seed(0)
    cfg = QFormerConfig(**{**SMALL.__dict__, "pad_last_window": pad_last_window})
    q = WindowedQFormer(cfg, encoder_dim=24).eval()
    feats = torch.randn(2, 60, 24)  # 60 = 3 * 17 + 9: a partial last window
    with torch.no_grad():
        out = q(feats)
        windows, mask = window_tokens(feats, cfg)
        ref = _lavis_reference(_official_state(q), windows, mask, cfg)
    assert out.shape == (2, 4 if pad_last_window else 3, 32)
    torch.testing.assert_close(out, ref.reshape(2, -1, 32), atol=1e-5, rtol=1e-5)


def test_each_window_sees_only_its_own_tokens() -> None:
    torch.manual_seed(1)
    q = WindowedQFormer(SMALL, encoder_dim=24).eval()
    feats = torch.randn(1, 68, 24)
    changed = feats.clone()
    changed[:, 34:51] += torch.randn(1, 17, 24)  # window 2 only
    with torch.no_grad():
        a, b = q(feats), q(changed)
    diff = (a - b).abs().amax(dim=-1)[0]
    assert diff[2] > 1e-3
    assert torch.all(diff[[0, 1, 3]] == 0)


def test_zero_padding_and_padding_mask_are_ignored() -> None:
    torch.manual_seed(2)
    cfg = QFormerConfig(**{**SMALL.__dict__, "pad_last_window": True})
    q = WindowedQFormer(cfg, encoder_dim=24).eval()
    feats = torch.randn(1, 40, 24)  # last window: 6 real tokens + 11 zero-padded
    longer = torch.cat([feats, torch.randn(1, 11, 24)], dim=1)
    pad = torch.zeros(1, 51, dtype=torch.bool)
    pad[:, 40:] = True
    with torch.no_grad():
        torch.testing.assert_close(q(feats), q(longer, pad))


def test_full_size_q_former_gives_29_tokens_for_496_beats_tokens() -> None:
    q = WindowedQFormer(QFormerConfig(), encoder_dim=768).eval()
    with torch.no_grad():
        assert q(torch.randn(1, 496, 768)).shape == (1, 29, 768)
    assert q.query_tokens.shape == (1, 1, 768)
