"""Student checkpoints (DESIGN contract 4): config dataclass + weights + label sets + front end.

A student checkpoint is a Lightning checkpoint of `distill.lightning.StudentModule` (or a plain
file from `save_student`) holding, besides ``state_dict`` (the student's weights under
``model.``), these top-level entries of plain types:

- ``student_config``: `StudentConfig.to_dict()` (architecture, heads, front end),
- ``student_label_sets``: ``{task: [labels...]}`` in logit order,
- ``student_frontend``: the front end's parameters (`FrontEndConfig.to_dict()`),
- ``teacher_config_hash``: the teacher whose targets trained it.

`load_student` rebuilds the model from the file alone, reading it with
`teacher.torchio.load_checkpoint` (``weights_only``): no arbitrary object is unpickled.

    >>> import tempfile, pathlib, torch
    >>> from distill.students import build_student, student_config, task_heads
    >>> cfg = student_config("s", tasks=task_heads({"species": ["Kea", "Tui"]}))
    >>> model = build_student(cfg).eval()
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "student.ckpt"
    >>> save_student(path, model, cfg, teacher_hash="0123456789abcdef")
    >>> again, cfg2 = load_student(path)
    >>> cfg2 == cfg, torch.equal(again(torch.ones(1, 8000))["species_logits"],
    ...                          model(torch.ones(1, 8000))["species_logits"])
    (True, True)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from runtime.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from distill.students import StudentConfig

CONFIG_KEY = "student_config"
LABELS_KEY = "student_label_sets"
FRONTEND_KEY = "student_frontend"
TEACHER_HASH_KEY = "teacher_config_hash"
MODEL_PREFIX = "model."


def student_entries(cfg: StudentConfig, teacher_hash: str | None) -> dict[str, Any]:
    """The plain-typed entries every student checkpoint carries beside its weights."""
    return {CONFIG_KEY: cfg.to_dict(),
            LABELS_KEY: {name: list(head.labels) for name, head in cfg.tasks.items()},
            FRONTEND_KEY: cfg.frontend.to_dict(),
            TEACHER_HASH_KEY: teacher_hash}


def save_student(path: str | os.PathLike[str], model: nn.Module, cfg: StudentConfig,
                 teacher_hash: str | None = None) -> None:
    """Write a student checkpoint without Lightning (same layout `load_student` reads)."""
    import io

    import torch

    from runtime.files import atomic_write_bytes

    payload = {"state_dict": {MODEL_PREFIX + k: v.detach().cpu()
                              for k, v in model.state_dict().items()},
               **student_entries(cfg, teacher_hash)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_student_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dict (``weights_only`` load); a missing or non-student file raises."""
    from teacher.torchio import load_checkpoint

    checkpoint = load_checkpoint(path, what="student checkpoint")
    missing = [key for key in ("state_dict", CONFIG_KEY) if key not in checkpoint]
    if missing:
        raise InputError(path, f"not a student checkpoint: it lacks {', '.join(missing)}")
    return checkpoint


def student_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The student's weights (the ``model.`` prefix removed)."""
    return {key.removeprefix(MODEL_PREFIX): value
            for key, value in checkpoint["state_dict"].items() if key.startswith(MODEL_PREFIX)}


def load_student(path: str | os.PathLike[str], map_location: str = "cpu"
                 ) -> tuple[nn.Module, StudentConfig]:
    """Rebuild ``(student in eval mode, its StudentConfig)`` from a student checkpoint.

    Args:
        path: a checkpoint from `naturelm-edge distill fit` or `save_student`.
        map_location: device to put the student on.
    """
    from distill.students import StudentConfig, build_student

    checkpoint = read_student_checkpoint(path)
    try:
        cfg = StudentConfig.from_dict(checkpoint[CONFIG_KEY])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"malformed student config ({exc})") from exc
    model = build_student(cfg)
    state = student_state_dict(checkpoint)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise InputError(path, f"weights and student config disagree: missing {missing[:10]}, "
                               f"unexpected {unexpected[:10]}")
    model.load_state_dict(state)
    return model.to(map_location).eval(), cfg


def teacher_hash_of(path: str | os.PathLike[str]) -> str | None:
    """The config hash of the teacher whose targets trained the student at ``path``."""
    value = read_student_checkpoint(path).get(TEACHER_HASH_KEY)
    return None if value is None else str(value)
