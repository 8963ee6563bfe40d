"""A pretrained encoder file (`teacher pretrain`'s output) seeds a freshly built teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.errors import InputError
from teacher.beats import BEATs
from teacher.lightning import TeacherModule
from tests.teacher.helpers import tiny_tokenizer

SMALL = {"clip_s": 1.0, "encoder": {"encoder_layers": 1}, "qformer": {"num_layers": 1},
         "llm": {"num_layers": 1, "hidden_size": 64, "intermediate_size": 128,
                 "num_heads": 2, "num_kv_heads": 1}}


def _save_encoder(module: TeacherModule, path: Path, seed: int) -> BEATs:
    torch.manual_seed(seed)
    encoder = BEATs(module.teacher_config.encoder)
    torch.save({"cfg": encoder.cfg.to_dict(), "model": encoder.state_dict()}, path)
    return encoder


def test_the_encoder_file_is_loaded_into_a_fresh_teacher(tmp_path: Path) -> None:
    path = tmp_path / "encoder.pt"
    probe = TeacherModule(config=SMALL)
    saved = _save_encoder(probe, path, seed=7)
    module = TeacherModule(config={**SMALL, "encoder_checkpoint": str(path)})
    module.build(tiny_tokenizer())
    before = module.model.beats.state_dict()["patch_embedding.weight"].clone()
    module._load_pretrained_encoder()
    after = module.model.beats.state_dict()
    assert not torch.equal(before, after["patch_embedding.weight"])
    for key, value in saved.state_dict().items():
        assert torch.equal(after[key], value), key


def test_an_encoder_of_another_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "encoder.pt"
    other = TeacherModule(config={**SMALL, "encoder": {"encoder_layers": 2}})
    _save_encoder(other, path, seed=1)
    module = TeacherModule(config={**SMALL, "encoder_checkpoint": str(path)})
    module.build(tiny_tokenizer())
    with pytest.raises(InputError, match="encoder config differs"):
        module._load_pretrained_encoder()
