"""Reading a teacher checkpoint never runs code from the file (weights_only loading)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from runtime.errors import InputError
from teacher.checkpoint import read_checkpoint


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran while loading",))


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "x": _Payload()}, path,
               pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(InputError, match="refusing to unpickle .* from the teacher checkpoint"):
        read_checkpoint(path)
