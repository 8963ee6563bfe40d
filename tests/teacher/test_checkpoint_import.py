"""`naturelm-edge teacher import`: official NatureLM-audio weights (official names, tiny shapes)
over a tiny saved Llama become a teacher checkpoint that `load_teacher` rebuilds exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from teacher.checkpoint import MODEL_PREFIX, load_teacher, read_checkpoint
from teacher.cli import import_official
from teacher.config import TeacherConfig
from teacher.lightning import EXTERNAL_KEY, TOKENIZER_KEY, TeacherModule
from teacher.official import OfficialWeightsError, load_naturelm
from tests.teacher.helpers import chirps, tiny_config
from tests.teacher.test_official import _official_state, _save, llm_dir  # noqa: F401

Q = "What is the common name for the focal species in the audio? Answer:"
LABELS = ["Kea", "Tui", "None"]


def _cfg() -> TeacherConfig:
    """The tiny layout with NatureLM-audio's freeze policy (LLM base frozen, encoder frozen)."""
    return tiny_config(train_llm=False, train_encoder=False)


def _config_file(cfg: TeacherConfig, folder: Path) -> Path:
    path = folder / "teacher-config.json"
    path.write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    return path


def _import(argv: list[str]) -> int:
    """Through the command table when it has the entry, else the function itself."""
    from naturelm_edge.cli import COMMANDS, main

    if "teacher import" in COMMANDS:
        return main(["teacher", "import", *argv])
    checkpoint, llm, out, _, config = argv
    return import_official(Path(checkpoint), Path(llm), Path(out), config=config)


def test_imported_checkpoint_rebuilds_the_official_model_exactly(
        tmp_path: Path, llm_dir: Path) -> None:  # noqa: F811
    cfg = _cfg()
    weights = _save(_official_state(cfg), tmp_path / "model.safetensors")
    out = tmp_path / "naturelm" / "teacher.ckpt"
    config = _config_file(cfg, tmp_path)
    assert _import([str(weights), str(llm_dir), str(out), "--config", str(config)]) == 0

    official = load_naturelm(weights, llm_dir, cfg=cfg)
    ckpt = read_checkpoint(out)
    stored = {k.removeprefix(MODEL_PREFIX) for k in ckpt["state_dict"]}
    external = {k.removeprefix(MODEL_PREFIX) for k in ckpt[EXTERNAL_KEY]}
    # The frozen LLM base stays in the local folder; everything the official file holds is kept.
    base = {k for k in official.state_dict() if k.startswith("llama_model.") and "lora_" not in k}
    assert external == base and not stored & base
    assert stored | external == set(official.state_dict())
    assert TeacherConfig.from_dict(ckpt["hyper_parameters"]["config"]) == official.cfg
    assert ckpt["hyper_parameters"]["config"]["llm"]["path"] == str(llm_dir.resolve())

    teacher = load_teacher(out)
    for key, value in official.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[key], value, rtol=0, atol=0)
    audio = chirps(2, 1.0, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(teacher.score_labels(audio, [Q, Q], LABELS),
                                   official.score_labels(audio, [Q, Q], LABELS), rtol=0, atol=0)
        assert teacher.generate(audio, [Q, Q], max_new_tokens=6) == \
            official.generate(audio, [Q, Q], max_new_tokens=6)
        assert teacher.generate(audio, [Q, Q], max_new_tokens=4, num_beams=2) == \
            official.generate(audio, [Q, Q], max_new_tokens=4, num_beams=2)
    # The checkpoint also resumes as a LightningModule (fine-tuning the official teacher).
    module = TeacherModule.load_from_checkpoint(out)
    assert module.tokenizer_json == ckpt[TOKENIZER_KEY]
    torch.testing.assert_close(module.model.state_dict(), official.state_dict(), rtol=0, atol=0)


def test_wrong_keys_list_the_difference_and_write_nothing(
        tmp_path: Path, llm_dir: Path) -> None:  # noqa: F811
    cfg = _cfg()
    state = _official_state(cfg)
    state["audio_llama_proj.weights"] = state.pop("audio_llama_proj.weight")
    weights = _save(state, tmp_path / "wrong.safetensors")
    out = tmp_path / "teacher.ckpt"
    with pytest.raises(OfficialWeightsError) as info:
        _import([str(weights), str(llm_dir), str(out), "--config",
                 str(_config_file(cfg, tmp_path))])
    assert info.value.missing == ["audio_llama_proj.weight"]
    assert info.value.unexpected == ["audio_llama_proj.weights"]
    assert str(weights) in str(info.value)
    assert not out.exists() and list(tmp_path.glob(".teacher.ckpt*")) == []


def test_grown_vocabulary_is_stored_and_restored(tmp_path: Path, llm_dir: Path) -> None:  # noqa: F811
    """A file that carries the LLM embedding with the extra ``[PAD]`` row the official code
    adds: the embedding is loaded over the local one, stored, and resized to on load."""
    cfg = _cfg()
    official = load_naturelm(_save(_official_state(cfg), tmp_path / "a.safetensors"), llm_dir,
                             cfg=cfg)
    embed = "llama_model.base_model.model.model.embed_tokens.weight"
    rows, width = official.state_dict()[embed].shape
    state = _official_state(cfg)
    state[embed] = torch.randn(rows + 1, width, generator=torch.Generator().manual_seed(2))
    weights = _save(state, tmp_path / "model.safetensors")
    out = tmp_path / "teacher.ckpt"
    assert _import([str(weights), str(llm_dir), str(out), "--config",
                    str(_config_file(cfg, tmp_path))]) == 0
    ckpt = read_checkpoint(out)
    assert MODEL_PREFIX + embed in ckpt["state_dict"]
    assert MODEL_PREFIX + embed not in ckpt[EXTERNAL_KEY]
    teacher = load_teacher(out)
    reference = load_naturelm(weights, llm_dir, cfg=cfg)
    torch.testing.assert_close(teacher.state_dict()[embed], state[embed], rtol=0, atol=0)
    audio = chirps(1, 1.0, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(teacher.score_labels(audio, [Q], LABELS),
                                   reference.score_labels(audio, [Q], LABELS), rtol=0, atol=0)


def test_bad_config_argument_names_the_problem(tmp_path: Path, llm_dir: Path) -> None:  # noqa: F811
    weights = _save(_official_state(_cfg()), tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="unknown teacher preset 'huge'"):
        import_official(weights, llm_dir, tmp_path / "t.ckpt", config="huge")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    from runtime.errors import InputError

    with pytest.raises(InputError, match="broken.json: not a teacher config JSON"):
        import_official(weights, llm_dir, tmp_path / "t.ckpt", config=str(broken))
