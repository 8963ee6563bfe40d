"""Loading the published NatureLM-audio weights: a state dict written with the official names
(spelled out here from the official model's layout) and tiny shapes, saved as safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runtime.errors import InputError
from teacher.config import TeacherConfig
from teacher.official import OfficialWeightsError, load_naturelm, load_official_state_dict
from tests.teacher.helpers import chirps, tiny_config, tiny_model, tiny_tokenizer

Q = "What is the common name for the focal species in the audio? Answer:"
LABELS = ["Kea", "Tui", "None"]


def _official_names_and_shapes(cfg: TeacherConfig) -> dict[str, tuple[int, ...]]:
    """The official NatureLM names (LAVIS Q-Former, peft LoRA) at ``cfg``'s sizes."""
    h, e, f = cfg.qformer.hidden_size, cfg.encoder.encoder_embed_dim, cfg.qformer.intermediate_size
    w, r = cfg.llm.hidden_size, cfg.lora.r
    kv = w // cfg.llm.num_heads * cfg.llm.num_kv_heads
    out: dict[str, tuple[int, ...]] = {
        "audio_query_tokens": (1, 1, h),
        "audio_Qformer.bert.embeddings.LayerNorm.weight": (h,),
        "audio_Qformer.bert.embeddings.LayerNorm.bias": (h,),
        "audio_Qformer.bert.embeddings.position_ids": (1, 512),
        "ln_audio.weight": (e,), "ln_audio.bias": (e,),
        "audio_llama_proj.weight": (w, h), "audio_llama_proj.bias": (w,),
    }
    for i in range(cfg.qformer.num_layers):
        p = f"audio_Qformer.bert.encoder.layer.{i}"
        for att, src in (("attention", h), ("crossattention", e)):
            out[f"{p}.{att}.self.query.weight"] = (h, h)
            out[f"{p}.{att}.self.key.weight"] = (h, src)
            out[f"{p}.{att}.self.value.weight"] = (h, src)
            out[f"{p}.{att}.output.dense.weight"] = (h, h)
            for b in ("self.query", "self.key", "self.value", "output.dense",
                      "output.LayerNorm"):
                out[f"{p}.{att}.{b}.bias"] = (h,)
            out[f"{p}.{att}.output.LayerNorm.weight"] = (h,)
        out[f"{p}.intermediate_query.dense.weight"] = (f, h)
        out[f"{p}.intermediate_query.dense.bias"] = (f,)
        out[f"{p}.output_query.dense.weight"] = (h, f)
        out[f"{p}.output_query.dense.bias"] = (h,)
        out[f"{p}.output_query.LayerNorm.weight"] = (h,)
        out[f"{p}.output_query.LayerNorm.bias"] = (h,)
    for i in range(cfg.llm.num_layers):
        for proj, rows in (("q_proj", w), ("k_proj", kv), ("v_proj", kv), ("o_proj", w)):
            p = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}"
            out[f"{p}.lora_A.default.weight"] = (r, w)
            out[f"{p}.lora_B.default.weight"] = (rows, r)
    return out


def _official_state(cfg: TeacherConfig, seed: int = 11) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=gen) * 0.2 for k, s in
             _official_names_and_shapes(cfg).items()}
    state["audio_Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    # The encoder keeps BEATs' own (official) names under `beats.`; a fine-tuned BEATs also
    # carries an AudioSet head that NatureLM never uses.
    for key, value in tiny_model(seed=seed, cfg=cfg).beats.state_dict().items():
        state["beats." + key] = value + 0.01 * torch.randn(value.shape, generator=gen)
    state["beats.predictor.weight"] = torch.zeros(527, cfg.encoder.encoder_embed_dim)
    return state


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved as a local transformers folder, with its tokenizer."""
    from dataclasses import replace

    from teacher.model import build_llm

    folder = tmp_path_factory.mktemp("llama")
    # A plain Llama (no LoRA wrapping: a peft-wrapped base saves `base_layer` names, which a
    # reload does not recognise and re-initialises at random).
    cfg = tiny_config()
    torch.manual_seed(5)
    build_llm(cfg.replace(lora=replace(cfg.lora, r=0)), len(tiny_tokenizer())).save_pretrained(
        folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_official_names_load_strictly_and_change_outputs(tmp_path: Path, llm_dir: Path) -> None:
    cfg = tiny_config()
    state = _official_state(cfg)
    path = _save(state, tmp_path / "model.safetensors")
    model = load_naturelm(path, llm_dir, cfg=cfg)
    assert not model.training and model.cfg.llm.path == str(llm_dir)
    qf = model.audio_qformer.qformer.encoder.layer[1]
    torch.testing.assert_close(qf.crossattention.attention.key.weight,
                               state["audio_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"])
    torch.testing.assert_close(qf.output_query.LayerNorm.bias,
                               state["audio_Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias"])
    torch.testing.assert_close(model.audio_qformer.query_tokens, state["audio_query_tokens"])
    lora = "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    torch.testing.assert_close(model.state_dict()[lora], state[lora])
    torch.testing.assert_close(model.beats.encoder.layers[0].fc1.weight,
                               state["beats.encoder.layers.0.fc1.weight"])
    # Same LLM, same architecture, no official weights: different outputs.
    plain = load_naturelm_without_weights(cfg, llm_dir)
    audio = chirps(1, 1.0)
    with torch.no_grad():
        loaded = model.score_labels(audio, [Q], LABELS)
        before = plain.score_labels(audio, [Q], LABELS)
        assert (model.encode_audio(audio) - plain.encode_audio(audio)).abs().max() > 1e-2
    assert (loaded - before).abs().max() > 1e-3
    # The LLM base itself came from the local folder untouched.
    embed = "llama_model.base_model.model.model.embed_tokens.weight"
    torch.testing.assert_close(model.state_dict()[embed], plain.state_dict()[embed])


def load_naturelm_without_weights(cfg: TeacherConfig, llm_dir: Path) -> torch.nn.Module:
    from dataclasses import replace

    from teacher.model import NatureLM
    from teacher.tokenizer import load_llm_tokenizer

    torch.manual_seed(0)
    return NatureLM(cfg.replace(llm=replace(cfg.llm, path=str(llm_dir))),
                    load_llm_tokenizer(llm_dir)).eval()


def test_wrong_and_missing_keys_are_listed_with_the_path(tmp_path: Path, llm_dir: Path) -> None:
    cfg = tiny_config()
    state = _official_state(cfg)
    bad = "audio_Qformer.bert.encoder.layer.0.crossattention.self.query.weight"
    state["audio_Qformer.bert.encoder.layer.0.crossattention.self.querry.weight"] = state.pop(bad)
    state.pop("ln_audio.bias")
    path = _save(state, tmp_path / "wrong.safetensors")
    with pytest.raises(OfficialWeightsError) as info:
        load_naturelm(path, llm_dir, cfg=cfg)
    message = str(info.value)
    assert str(path) in message
    assert "audio_qformer.qformer.encoder.layer.0.crossattention.attention.query.weight" in (
        info.value.missing)
    assert "ln_audio.bias" in info.value.missing
    assert "audio_qformer.qformer.encoder.layer.0.crossattention.attention.querry.weight" in (
        info.value.unexpected)
    assert "2 missing keys" in message and "1 unexpected keys" in message


def test_shape_mismatch_is_listed_and_non_strict_loads_the_rest(tmp_path: Path,
                                                                 llm_dir: Path) -> None:
    cfg = tiny_config()
    state = _official_state(cfg)
    state["audio_llama_proj.bias"] = torch.zeros(7)
    path = _save(state, tmp_path / "shape.safetensors")
    with pytest.raises(OfficialWeightsError, match="shape mismatches: audio_llama_proj.bias"):
        load_naturelm(path, llm_dir, cfg=cfg)
    with pytest.warns(UserWarning, match="audio_llama_proj.bias"):
        model = load_naturelm(path, llm_dir, strict=False, cfg=cfg)
    torch.testing.assert_close(model.ln_audio.weight, state["ln_audio.weight"])


def test_report_names_ignored_buffers(llm_dir: Path) -> None:
    cfg = tiny_config()
    model = load_naturelm_without_weights(cfg, llm_dir)
    report = load_official_state_dict(model, _official_state(cfg), "in-memory")
    assert report.ignored == ["audio_Qformer.bert.embeddings.position_ids",
                              "beats.predictor.weight"]
    assert not (report.missing or report.unexpected or report.mismatched)


def test_missing_files_name_the_path(tmp_path: Path, llm_dir: Path) -> None:
    with pytest.raises(InputError, match="nowhere.safetensors: NatureLM-audio checkpoint"):
        load_naturelm(tmp_path / "nowhere.safetensors", llm_dir)
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="no-llama: LLM directory not found"):
        load_naturelm(fake, tmp_path / "no-llama")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_naturelm(fake, llm_dir, cfg=tiny_config())
