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
from pathlib import Path
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


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dict at ``path``; a missing, unreadable or non-teacher file raises."""
    from teacher.lightning import TOKENIZER_KEY

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such teacher checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise InputError(path, f"not a readable checkpoint ({exc})") from exc
    if not isinstance(checkpoint, dict):
        raise InputError(path, "not a Lightning checkpoint (no dict at the top level)")
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
