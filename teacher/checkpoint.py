"""Teacher checkpoints: rebuild a `NatureLM` from a Lightning checkpoint file alone.

A checkpoint written by `teacher.lightning.TeacherModule` holds the whole `TeacherConfig` in its
hyper-parameters (``hyper_parameters["config"]``), the tokenizer JSON (``teacher_tokenizer``)
and the weights under ``state_dict["model.*"]``. A teacher over a local LLM (``llm.path``) leaves
the frozen LLM weights out (listed under ``teacher_external_keys``); they are read back from
that local model directory when the teacher is rebuilt.

    >>> from teacher.checkpoint import load_teacher
    >>> teacher = load_teacher("runs/teacher-tiny/teacher.ckpt")  # doctest: +SKIP
    >>> teacher.generate(audio, ["What is the common name for the focal species in the audio?"])
    ... # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from runtime.errors import InputError

MODEL_PREFIX = "model."


def frozen_llm_keys(model: torch.nn.Module) -> list[str]:
    """Names of the frozen parameters inside the model's language model (transformers / peft).

    These come from the local LLM directory and are not stored in checkpoints.
    """
    from peft import PeftModel
    from transformers import PreTrainedModel

    keys: list[str] = []
    for child_name, child in model.named_children():
        if isinstance(child, PreTrainedModel | PeftModel):
            keys.extend(f"{child_name}.{name}" for name, param in child.named_parameters()
                        if not param.requires_grad)
    return keys


def embedding_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the language model's input and output embedding matrices."""
    llm = model.llama_model
    targets = [m for m in (llm.get_input_embeddings(), llm.get_output_embeddings())
               if m is not None]
    return sorted({f"{name}.weight" for name, module in model.named_modules()
                   if any(module is t for t in targets)})


def local_llm_keys(model: torch.nn.Module, overridden: Iterable[str] = ()) -> list[str]:
    """Frozen LLM weights that a rebuild from the local LLM (``cfg.llm.path``) reproduces.

    Those are `frozen_llm_keys` minus ``overridden`` (tensors loaded over the local model, e.g.
    from the official file) and minus the embedding matrices when their rows differ from the
    local model's ``vocab_size`` (resized rows are not in the folder). Empty without a local LLM.
    """
    from transformers import AutoConfig

    if model.cfg.llm.path is None:
        return []
    skip = set(overridden)
    rows = AutoConfig.from_pretrained(model.cfg.llm.path, local_files_only=True).vocab_size
    if model.llama_model.get_input_embeddings().weight.shape[0] != rows:
        skip.update(embedding_keys(model))
    return [key for key in frozen_llm_keys(model) if key not in skip]


def match_embedding_rows(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize the LLM's token embeddings to the rows ``state`` stores (a checkpoint of a model
    whose vocabulary was grown, as the official NatureLM-audio adds a ``[PAD]`` row)."""
    keys = embedding_keys(model)
    stored = [state[k].shape[0] for k in keys if k in state]
    own = model.llama_model.get_input_embeddings().weight.shape[0]
    if stored and stored[0] != own:
        llm = model.llama_model
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        base.resize_token_embeddings(stored[0])


def teacher_checkpoint(model: torch.nn.Module, tokenizer_json: str,
                       external: Sequence[str], **extra: Any) -> dict[str, Any]:
    """A checkpoint dict as `TeacherModule` writes it, for a `NatureLM` built outside training.

    ``external`` (model keys, no ``model.`` prefix) is left out and refilled from the local LLM
    by `load_teacher`; ``extra`` adds top-level entries (e.g. where the weights came from).
    """
    import lightning.pytorch as pl

    from teacher.config import config_hash
    from teacher.lightning import (
        CONFIG_HASH_KEY,
        CONFIG_KEY,
        EXTERNAL_KEY,
        TOKENIZER_KEY,
        TeacherModule,
    )

    cfg = model.cfg
    module = TeacherModule(preset=cfg.preset, config=cfg.to_dict())
    if module.teacher_config != cfg:
        raise ValueError("the teacher config does not survive TeacherModule's resolution")
    leave_out = set(external)
    state = {MODEL_PREFIX + key: value.detach().clone()
             for key, value in model.state_dict().items() if key not in leave_out}
    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": pl.__version__,
            "state_dict": state, "hparams_name": "kwargs",
            "hyper_parameters": dict(module.hparams),
            TOKENIZER_KEY: tokenizer_json, CONFIG_KEY: cfg.to_dict(),
            CONFIG_HASH_KEY: config_hash(cfg),
            EXTERNAL_KEY: [MODEL_PREFIX + key for key in external], **extra}


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dict at ``path``; a missing, unreadable or non-teacher file raises."""
    from teacher.lightning import TOKENIZER_KEY
    from teacher.torchio import load_checkpoint

    # weights_only: a checkpoint from elsewhere must not run code when it is read.
    checkpoint = load_checkpoint(path, what="teacher checkpoint")
    hparams = checkpoint.get("hyper_parameters") or {}
    missing = [name for name, present in (("hyper_parameters.config", "config" in hparams),
                                          (TOKENIZER_KEY, TOKENIZER_KEY in checkpoint),
                                          ("state_dict", "state_dict" in checkpoint))
               if not present]
    if missing:
        raise InputError(path, f"not a teacher checkpoint: it lacks {', '.join(missing)}")
    return checkpoint


def teacher_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The NatureLM weights of a Lightning checkpoint (the ``model.`` prefix removed)."""
    return {key.removeprefix(MODEL_PREFIX): value
            for key, value in checkpoint["state_dict"].items() if key.startswith(MODEL_PREFIX)}


def load_teacher(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                 strict: bool = True) -> Any:
    """Rebuild the trained `NatureLM` from a teacher checkpoint, in eval mode on ``map_location``.

    Args:
        path: a checkpoint written by `TeacherModule` (``naturelm-edge teacher fit``).
        map_location: device to put the teacher on.
        strict: raise when the checkpoint's weights and the rebuilt model's differ, naming the
            missing and unexpected keys.
    """
    from teacher.config import TeacherConfig
    from teacher.lightning import EXTERNAL_KEY, TOKENIZER_KEY
    from teacher.model import NatureLM
    from teacher.tokenizer import tokenizer_from_json

    checkpoint = read_checkpoint(path)
    cfg = TeacherConfig.from_dict(checkpoint["hyper_parameters"]["config"])
    model = NatureLM(cfg, tokenizer_from_json(checkpoint[TOKENIZER_KEY]))
    state = teacher_state_dict(checkpoint)
    match_embedding_rows(model, state)
    external = [key.removeprefix(MODEL_PREFIX) for key in checkpoint.get(EXTERNAL_KEY, [])]
    own = model.state_dict()
    for key in external:
        if key not in own:
            raise InputError(path, f"the local LLM at {cfg.llm.path!r} has no weight {key!r} "
                                   "that the checkpoint expects from it")
        state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise InputError(path, "checkpoint and teacher config disagree: missing keys "
                               f"{_listing(missing)}; unexpected keys {_listing(unexpected)}")
    model.load_state_dict(state, strict=strict)
    return model.to(map_location).eval()


def _listing(keys: list[str], limit: int = 20) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more
