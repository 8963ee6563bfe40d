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
