"""The published NatureLM-audio weights over a local Llama-3.1-8B-Instruct.

Users obtain ``model.safetensors`` from the NatureLM-audio release (Hugging Face repository
``EarthSpeciesProject/NatureLM-audio``, after accepting its licence) and the Llama base
(``meta-llama/Llama-3.1-8B-Instruct``, gated) themselves; nothing here downloads anything.

    >>> from teacher.official import load_naturelm
    >>> model = load_naturelm("NatureLM-audio/model.safetensors",
    ...                       "Llama-3.1-8B-Instruct")  # doctest: +SKIP

The mapping from the official state-dict names (``NatureLM`` of earthspecies/NatureLM-audio)
onto `teacher.model.NatureLM`:

=================================================  ==============================================
official                                           here
=================================================  ==============================================
``beats.*``                                        ``beats.*`` (`teacher.beats.beats_state_dict_keys`)
``ln_audio.*``                                     ``ln_audio.*``
``audio_query_tokens``                             ``audio_qformer.query_tokens``
``audio_Qformer.bert.embeddings.LayerNorm.*``      ``audio_qformer.qformer.layernorm.*``
``audio_Qformer.bert.encoder.layer.N.``            ``audio_qformer.qformer.encoder.layer.N.``
``{attention,crossattention}.self.*``              ``{attention,crossattention}.attention.*``
``audio_Qformer.bert.encoder.*`` (the rest)        ``audio_qformer.qformer.encoder.*``
``audio_llama_proj.*``                             ``audio_llama_proj.*``
``llama_model.base_model.model.*`` (peft names)    ``llama_model.base_model.model.*``
=================================================  ==============================================

Ignored: ``audio_Qformer.bert.embeddings.position_ids`` (a BERT buffer) and
``beats.predictor.*`` (the AudioSet head of a fine-tuned BEATs, unused by NatureLM).
Required: every encoder, Q-Former, ``ln_audio``, projection and LoRA tensor. LLM base weights
come from ``llm``; when the file carries them too they are loaded over it (an embedding with
the extra ``[PAD]`` row the official code adds is resized to first).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import InputError
from teacher.qformer import official_qformer_key

if TYPE_CHECKING:
    import torch

    from teacher.config import TeacherConfig
    from teacher.model import NatureLM

IGNORED = (r"^audio_Qformer\.bert\.embeddings\.position_ids$", r"^beats\.predictor\.")
_SAME = (r"^ln_audio\.", r"^audio_llama_proj\.", r"^llama_model\.base_model\.model\.")
_EMBED = "llama_model.base_model.model.model.embed_tokens.weight"


class OfficialWeightsError(InputError):
    """The checkpoint's keys or shapes differ from the model's (lists them)."""

    def __init__(self, path: str | os.PathLike[str], missing: list[str], unexpected: list[str],
                 mismatched: list[str]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = [f"{len(missing)} missing keys: {', '.join(missing) or '-'}",
                 f"{len(unexpected)} unexpected keys: {', '.join(unexpected) or '-'}"]
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {', '.join(mismatched)}")
        super().__init__(path, "NatureLM-audio weights do not match the model: "
                         + "; ".join(parts))


@dataclass(frozen=True)
class LoadReport:
    """What `load_official_state_dict` did: keys loaded, and those that differed."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]
    ignored: list[str]


def map_official_state_dict(state: dict[str, torch.Tensor]
                            ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """``(mapped, unmapped, ignored)``: official tensors under this package's names."""
    from teacher.beats import beats_state_dict_keys

    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    ignored: list[str] = []
    beats = {k: v for k, v in state.items()
             if k.startswith("beats.") and not any(re.match(p, k) for p in IGNORED)}
    for name, value in beats_state_dict_keys(beats, prefix="beats.").items():
        mapped["beats." + name] = value
    for key, value in state.items():
        if any(re.match(p, key) for p in IGNORED):
            ignored.append(key)
        elif key.startswith("beats."):
            continue
        elif any(re.match(p, key) for p in _SAME):
            mapped[key] = value
        elif (ours := official_qformer_key(key)) is not None:
            mapped["audio_qformer." + ours] = value
        else:
            unmapped.append(key)
    return mapped, unmapped, ignored


def required_keys(model: NatureLM) -> list[str]:
    """Keys the official file must provide: all but the LLM's base weights."""
    return [k for k in model.state_dict()
            if not k.startswith("llama_model.") or "lora_" in k]


def load_official_state_dict(model: NatureLM, state: dict[str, torch.Tensor],
                             source: str | os.PathLike[str], strict: bool = True) -> LoadReport:
    """Load official-named ``state`` into ``model``; strict raises `OfficialWeightsError`.

    Non-strict loading takes every tensor whose name and shape match and warns about the rest.
    """
    mapped, unmapped, ignored = map_official_state_dict(state)
    if _EMBED in mapped:
        rows = mapped[_EMBED].shape[0]
        base = model.llama_model.get_base_model() if hasattr(
            model.llama_model, "get_base_model") else model.llama_model
        if rows != base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(rows)
    own = model.state_dict()
    missing = sorted(set(required_keys(model)) - set(mapped))
    unexpected = sorted(unmapped + [k for k in mapped if k not in own])
    mismatched = sorted(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
                        for k, v in mapped.items() if k in own and v.shape != own[k].shape)
    if strict and (missing or unexpected or mismatched):
        raise OfficialWeightsError(source, missing, unexpected, mismatched)
    usable = {k: v for k, v in mapped.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)
    if missing or unexpected or mismatched:
        warnings.warn(str(OfficialWeightsError(source, missing, unexpected, mismatched)),
                      stacklevel=2)
    return LoadReport(sorted(usable), missing, unexpected, mismatched, sorted(ignored))


def load_naturelm(checkpoint: str | Path, llm: str | Path, strict: bool = True,
                  cfg: TeacherConfig | None = None) -> NatureLM:
    """NatureLM-audio from its published ``model.safetensors`` over a local LLM, in eval mode.

    Args:
        checkpoint: the official ``model.safetensors``.
        llm: local transformers directory of Llama-3.1-8B-Instruct (model and tokenizer).
        strict: raise when keys or shapes differ (listing them); else load what matches.
        cfg: architecture to build (default: the ``naturelm-8b`` preset); ``llm.path`` is
            set to ``llm``.
    """
    return load_naturelm_with_report(checkpoint, llm, strict, cfg)[0]


def load_naturelm_with_report(checkpoint: str | Path, llm: str | Path, strict: bool = True,
                              cfg: TeacherConfig | None = None) -> tuple[NatureLM, LoadReport]:
    """`load_naturelm` and the `LoadReport` saying which tensors came from ``checkpoint``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from teacher.config import teacher_config
    from teacher.model import NatureLM
    from teacher.tokenizer import load_llm_tokenizer

    checkpoint, llm = Path(checkpoint), Path(llm)
    if not checkpoint.is_file():
        raise InputError(checkpoint, "NatureLM-audio checkpoint not found (the published "
                         "model.safetensors is needed)")
    if not llm.is_dir():
        raise InputError(llm, "LLM directory not found (a local Llama-3.1-8B-Instruct "
                         "transformers folder is needed)")
    cfg = cfg or teacher_config("naturelm-8b")
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, path=str(llm)))
    try:
        state = load_file(str(checkpoint))
    except (SafetensorError, OSError) as exc:
        raise InputError(checkpoint, f"not a readable safetensors file ({exc})") from exc
    model = NatureLM(cfg, load_llm_tokenizer(llm))
    report = load_official_state_dict(model, state, checkpoint, strict=strict)
    return model.eval(), report
