"""The teacher's configuration: one dataclass per component, two named presets, a stable hash.

The whole `TeacherConfig` is stored in every teacher checkpoint, so a checkpoint rebuilds the
model from the file alone (DESIGN contract 2). ``config_hash`` names a teacher in its targets.

    >>> cfg = teacher_config("tiny")
    >>> cfg.qformer.window_tokens, cfg.llm.path is None
    (17, True)
    >>> TeacherConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> len(config_hash(cfg))
    16
    >>> teacher_config("huge")
    Traceback (most recent call last):
    ...
    KeyError: "unknown teacher preset 'huge'; known presets: tiny, naturelm-8b"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from teacher.beats import BEATsConfig, beats_config

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class QFormerConfig:
    """The windowed Q-Former: BERT-style layers, self-attention over the queries of one window
    and cross-attention to that window's encoder tokens.

    Args:
        hidden_size: width of the queries (768 in NatureLM-audio, BERT-base).
        num_layers: Q-Former layers, each with cross-attention (2 in NatureLM-audio).
        num_heads: attention heads.
        intermediate_size: feed-forward width.
        window_tokens: encoder tokens per window (17: about 0.33 s of BEATs tokens).
        stride_tokens: hop between windows in encoder tokens (17: no overlap).
        queries_per_window: learned queries per window, hence LLM tokens per window.
        pad_last_window: zero-pad (and mask) a last partial window, giving ceil(N / stride)
            windows; False drops it as NatureLM-audio's unfold does, giving floor (29 for the
            496 BEATs tokens of a 10 s clip, the count the official weights were trained with).
        dropout: hidden and attention dropout.
        layer_norm_eps: LayerNorm epsilon (BERT's 1e-12).
        initializer_range: std of the normal initialisation of weights and queries (BERT's
            0.02). A Q-Former trained from scratch needs more: at 0.02 the cross-attention adds
            about 1/20 of the query's norm to it, so the outputs hardly vary across clips.
    """

    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    window_tokens: int = 17
    stride_tokens: int = 17
    queries_per_window: int = 1
    pad_last_window: bool = False
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"qformer hidden_size {self.hidden_size} is not a multiple of "
                             f"num_heads {self.num_heads}")
        if min(self.window_tokens, self.stride_tokens, self.queries_per_window,
               self.num_layers) < 1:
            raise ValueError("qformer window_tokens, stride_tokens, queries_per_window and "
                             "num_layers must be >= 1")


@dataclass(frozen=True)
class LLMConfig:
    """The language model: a local transformers model directory, or a small Llama from config.

    Args:
        path: a local transformers causal-LM directory (Llama-3.1-8B-Instruct for the 8B
            preset); None builds a `LlamaForCausalLM` from the fields below.
        vocab_size: embedding rows of the built model (must hold the tokenizer).
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: key/value heads (grouped-query attention).
        intermediate_size: MLP width.
        max_position_embeddings: longest sequence (prompt + audio tokens + answer).
        dtype: "float32", "bfloat16" or "float16".
    """

    path: str | None = None
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"llm dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the LLM's attention projections (peft). ``r=0`` disables LoRA."""

    r: int = 32
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TeacherConfig:
    """The whole teacher. Freeze policy: the ``train_*`` flags say which parts get gradients.

    Args:
        preset: the preset this config came from (informative).
        encoder: the BEATs encoder.
        qformer: the windowed Q-Former.
        llm: the language model.
        lora: LoRA on the LLM.
        sample_rate: audio rate every call expects (16 kHz).
        clip_s: seconds of audio per call; shorter audio is zero-padded.
        end_token: appended to every answer in training and scored by `score_labels`
            (NatureLM-audio's released model was trained with ``<|end_of_text|>``).
        train_encoder: train BEATs (else frozen and kept in eval mode).
        train_qformer: train the Q-Former, its queries and ``ln_audio``.
        train_projection: train the Linear into the LLM width.
        train_lora: train the LoRA adapters.
        train_llm: train the LLM's own weights (for an LM built from scratch; never for 8B).
        audio_norm: a LayerNorm after the projection whose gain starts at the RMS of the LLM's
            input embeddings, so audio tokens enter on the text tokens' scale (a from-scratch
            LM needs it; NatureLM-audio has none, so the 8B preset keeps it off).
        encoder_checkpoint: an official-format BEATs file (``{"cfg", "model"}``, for example
            from `naturelm-edge teacher pretrain`) loaded into the encoder when a fresh
            teacher is built for training; its config must equal ``encoder``. Reloading a
            trained teacher never needs it.
    """

    preset: str = "tiny"
    encoder: BEATsConfig = field(default_factory=lambda: beats_config("tiny"))
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sample_rate: int = 16000
    clip_s: float = 10.0
    end_token: str = "<|eot_id|>"
    train_encoder: bool = False
    train_qformer: bool = True
    train_projection: bool = True
    train_lora: bool = True
    train_llm: bool = False
    audio_norm: bool = False
    encoder_checkpoint: str | None = None

    @property
    def clip_samples(self) -> int:
        """Samples per call: ``round(clip_s * sample_rate)``."""
        return int(round(self.clip_s * self.sample_rate))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists) that `from_dict` turns back into this."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherConfig:
        """Rebuild from `to_dict` output; unknown keys raise naming them."""
        d = dict(d)
        parts: dict[str, Any] = {
            "encoder": _build(BEATsConfig, d.pop("encoder", {}), "encoder"),
            "qformer": _build(QFormerConfig, d.pop("qformer", {}), "qformer"),
            "llm": _build(LLMConfig, d.pop("llm", {}), "llm"),
            "lora": _build(LoRAConfig, d.pop("lora", {}), "lora"),
        }
        return _build(cls, {**d, **parts}, "teacher")

    def replace(self, **changes: Any) -> TeacherConfig:
        """A copy with top-level fields changed (sub-configs are replaced whole)."""
        return dataclasses.replace(self, **changes)


def _build(kind: type, d: dict[str, Any] | Any, where: str) -> Any:
    """Instantiate dataclass ``kind`` from ``d``, converting lists to tuples where typed so."""
    if dataclasses.is_dataclass(d):
        return d
    known = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise KeyError(f"unknown {where} config keys: {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return kind(**values)


def _tiny() -> TeacherConfig:
    return TeacherConfig(
        preset="tiny",
        # BEATs "tiny" narrowed to 128, a 16-tap positional conv and a 32-bin fbank at a 5 ms
        # hop: 248 tokens per 10 s (124 steps of 80 ms x 2 bands of 16 x 16 patches) instead
        # of 496. Encoder pretraining on the default corpus alone (3,840 clips, one thread, two
        # runs at a time), minutes per epoch and held-out species at the end of the schedule:
        # 64 bins 1.0 min, 8 epochs 72.6%; 48 bins 0.66 min, 12 epochs 79.2%; 32 bins 0.4 min,
        # 16 epochs 78.3%: the same accuracy per epoch at 2.5 times the epochs per minute.
        # The hop: at 10 ms (100 frames/s) the 55-75 Hz amplitude modulation that tells one
        # buzzing species from its twin aliases into a weak flutter; at 5 ms it does not. Same
        # ~16 minutes each: 10 ms, 40 epochs 80.5% (the buzz pair 64.0%); 5 ms, 16 epochs
        # 82.8% (70.7%). A 5 ms fbank with 32-frame patches (still 124 tokens) gave nothing
        # (76.0% vs 76.2% at 16 epochs): the encoder needs the finer steps, not finer frames.
        # A convolutional stem (four stride-2 4 x 4 convs, 8-16-32-64 channels, then the 1 x 1
        # patch embedding; `BEATsConfig.conv_stem`) instead of the linear 16 x 16 patches: the
        # same 248 tokens, pretraining probe 85.1% -> 88.9% held-out species (life stage
        # 97.3%, call type 96.8%, count 78.5%), the teacher 89.1% -> 90.5%; 2x the time per
        # pretraining step (0.27 s against 0.14 s for 16 clips at two threads).
        encoder=beats_config("tiny", encoder_embed_dim=128, encoder_ffn_embed_dim=256,
                             conv_pos=16, num_mel_bins=32, frame_shift_ms=5.0,
                             conv_stem=(8, 16, 32, 64)),
        qformer=QFormerConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                              pad_last_window=True, dropout=0.0, initializer_range=0.15),
        llm=LLMConfig(path=None, vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=256, max_position_embeddings=256),
        lora=LoRAConfig(r=8, alpha=16, dropout=0.0),
        end_token="<|eot_id|>",
        # Nothing pretrained exists offline: the encoder and the LM learn from scratch, and the
        # audio tokens are normalised onto the text embeddings' scale.
        train_encoder=True,
        train_llm=True,
        audio_norm=True,
    )


def _naturelm_8b() -> TeacherConfig:
    return TeacherConfig(
        preset="naturelm-8b",
        encoder=beats_config("iter3"),
        qformer=QFormerConfig(),
        llm=LLMConfig(path="Llama-3.1-8B-Instruct", vocab_size=128256, hidden_size=4096,
                      num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                      max_position_embeddings=131072, dtype="bfloat16"),
        lora=LoRAConfig(),
        end_token="<|end_of_text|>",
    )


PRESETS = {"tiny": _tiny, "naturelm-8b": _naturelm_8b}


def teacher_config(name: str) -> TeacherConfig:
    """The named preset: ``"tiny"`` (CPU, minutes) or ``"naturelm-8b"`` (BEATs iter3+,
    Llama-3.1-8B-Instruct from a local path set in ``llm.path``, bf16). Unknown names raise."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown teacher preset {name!r}; known presets: "
                       f"{', '.join(PRESETS)}") from None


def config_hash(cfg: TeacherConfig) -> str:
    """First 16 hex chars of the sha256 of the canonical JSON of ``cfg``."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
