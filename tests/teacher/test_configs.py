"""Every shipped teacher YAML parses through the LightningCLI parser and resolves to a config."""

from __future__ import annotations

import pytest

from teacher.cli import resolve_config_args, shipped_config, shipped_configs, teacher_cli
from teacher.lightning import resolve_config


def test_both_presets_ship_a_config() -> None:
    assert {"tiny", "naturelm-8b"} <= set(shipped_configs())


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_shipped_yaml_parses(name: str) -> None:
    cli = teacher_cli(["--config", str(shipped_config(name)), "--data.manifest", "m.jsonl"],
                      run=False, instantiate=False)
    config = cli.config
    cfg = resolve_config(config.model.preset, config.model.config)
    assert cfg.preset == name
    assert config.data.clip_s == cfg.clip_s
    assert config.data.sample_rate == cfg.sample_rate
    assert config.trainer.gradient_clip_val > 0
    assert config.checkpoint.dirpath == config.trainer.default_root_dir
    assert config.checkpoint.filename == "teacher"
    if name == "naturelm-8b":
        assert config.trainer.precision == "bf16-mixed"
        assert cfg.llm.path is not None and not cfg.train_llm
    if name == "tiny":
        assert config.trainer.accelerator == "cpu"
        assert config.trainer.precision == "32-true"
        assert config.num_threads == 1


def test_shipped_config_names_resolve_and_unknown_raise() -> None:
    args = resolve_config_args(["--config", "tiny", "--data.manifest", "m.jsonl"])
    assert args[1] == str(shipped_config("tiny"))
    assert resolve_config_args(["--config=./x.yaml"]) == ["--config=./x.yaml"]
    with pytest.raises(KeyError, match="shipped configs: "):
        shipped_config("huge")


def test_unknown_override_raises_naming_the_field() -> None:
    with pytest.raises(KeyError, match=r"config\.llm\.layers is not a teacher config field"):
        resolve_config("tiny", {"llm": {"layers": 3}})
    with pytest.raises(KeyError, match="unknown teacher preset 'huge'"):
        resolve_config("huge")


def test_tiny_audio_tokens_start_on_the_text_scale_and_vary_across_clips() -> None:
    import torch

    from tests.teacher.helpers import chirps, tiny_config, tiny_model

    model = tiny_model(cfg=tiny_config(audio_norm=True))
    assert model.cfg.audio_norm and model.audio_norm is not None
    text = model.llama_model.get_input_embeddings().weight
    text_norm = float(text.norm(dim=-1).mean())
    with torch.no_grad():
        tokens = model.encode_audio(chirps(4, 1.0))
    audio_norm = float(tokens.norm(dim=-1).mean())
    assert 0.8 < audio_norm / text_norm < 1.25  # same scale as the text (was ~70x larger)
    spread = (tokens - tokens.mean(0)).norm(dim=-1).mean() / tokens.norm(dim=-1).mean()
    # The clips stay apart: 15% at the preset's init, 0.5% at BERT's 0.02 (32-bin fbank).
    assert float(spread) > 0.1
    assert model.audio_norm.weight.requires_grad == model.cfg.train_projection
    model.cfg = model.cfg.replace(train_projection=False)  # the policy re-applied covers it too
    model.apply_freeze_policy()
    assert not model.audio_norm.weight.requires_grad and not model.audio_norm.bias.requires_grad


def test_naturelm_8b_stays_faithful_to_the_official_model() -> None:
    from teacher.config import teacher_config

    cfg = teacher_config("naturelm-8b")
    assert not cfg.audio_norm and not cfg.train_encoder and not cfg.train_llm
    assert cfg.qformer.initializer_range == 0.02 and cfg.qformer.hidden_size == 768
    assert cfg.encoder.encoder_embed_dim == 768 and cfg.encoder.conv_pos == 128
