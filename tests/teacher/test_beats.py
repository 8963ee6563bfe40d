"""teacher.beats: presets, official parameter names, checkpoint loading, and parity with avex.

avex (earthspecies, MIT) ships the BEATs of NatureLM-audio v1. Its module files are loaded
directly, without running ``avex/__init__.py`` (which pulls a large stack); they need only
torch, numpy and pydantic. Install with ``pip install --no-deps avex``.
"""

from __future__ import annotations

import importlib.util
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from runtime.audio import read_audio
from runtime.errors import InputError
from teacher.beats import (
    BEATs,
    BEATsConfig,
    beats_config,
    beats_state_dict_keys,
    load_beats,
    load_beats_state_dict,
    relative_position_buckets,
)

SMALL = {"encoder_layers": 2}  # iter3 widths, 2 layers: full-size maths, fast


@pytest.fixture(scope="module")
def birds(real_recording: Path) -> torch.Tensor:
    """The real recording at 16 kHz, first 10 s, as [1, 160000]."""
    return torch.from_numpy(read_audio(real_recording, target_rate=16000)[:160000])[None]


@pytest.fixture(scope="module")
def avex_beats() -> types.ModuleType:
    """avex's ``models/beats/beats.py``, imported without the avex package __init__."""
    spec = importlib.util.find_spec("avex")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("avex is not installed (pip install --no-deps avex)")
    if importlib.util.find_spec("pydantic") is None:
        pytest.skip("avex's BEATs needs pydantic")
    root = Path(spec.submodule_search_locations[0]) / "models" / "beats"
    package = "_avex_beats_reference"
    if f"{package}.beats" in sys.modules:
        return sys.modules[f"{package}.beats"]
    parent = types.ModuleType(package)
    parent.__path__ = [str(root)]
    sys.modules[package] = parent
    loaded = None
    for name in ("modules", "backbone", "beats"):
        file_spec = importlib.util.spec_from_file_location(f"{package}.{name}", root / f"{name}.py")
        if file_spec is None or file_spec.loader is None:
            pytest.skip(f"avex has no models/beats/{name}.py")
        loaded = importlib.util.module_from_spec(file_spec)
        sys.modules[file_spec.name] = loaded
        file_spec.loader.exec_module(loaded)
    return loaded


def _official_cfg(cfg: BEATsConfig) -> dict[str, Any]:
    """The cfg dict an official checkpoint holds: official field names only."""
    ours_only = ("sample_rate", "num_mel_bins", "fbank_mean", "fbank_std", "conv_stem")
    return {k: v for k, v in cfg.to_dict().items() if k not in ours_only}


def _twins(avex_beats: types.ModuleType, cfg: BEATsConfig) -> tuple[torch.nn.Module, BEATs]:
    """avex's BEATs with random weights, and ours loaded from its state dict."""
    torch.manual_seed(0)
    theirs = avex_beats.BEATs(avex_beats.BEATsConfig(**_official_cfg(cfg))).eval()
    with torch.no_grad():  # non-default values for parameters that init to constants
        for name, param in theirs.named_parameters():
            if "grep_a" in name or name.endswith("bias") or "layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    ours = BEATs(cfg).eval()
    load_beats_state_dict(ours, beats_state_dict_keys(theirs.state_dict()), "avex state dict")
    return theirs, ours


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


# ---------------------------------------------------------------------------- presets, shapes


def test_presets() -> None:
    full, tiny = beats_config("iter3"), beats_config("tiny")
    assert (full.encoder_layers, full.encoder_embed_dim, full.encoder_attention_heads) == (
        12,
        768,
        12,
    )
    assert (full.encoder_ffn_embed_dim, full.input_patch_size, full.embed_dim) == (3072, 16, 512)
    assert full.deep_norm and full.gru_rel_pos and full.relative_position_embedding
    assert (full.num_buckets, full.max_distance, full.conv_pos, full.conv_pos_groups) == (
        320,
        800,
        128,
        16,
    )
    assert tiny.encoder_layers <= 4 and tiny.encoder_embed_dim <= 192
    assert beats_config("tiny", encoder_layers=3).encoder_layers == 3
    with pytest.raises(ValueError, match="known: iter3, tiny"):
        beats_config("large")
    with pytest.raises(ValueError, match="not divisible"):
        beats_config("tiny", encoder_attention_heads=5)
    with pytest.raises(ValueError, match="known: gelu"):
        beats_config("tiny", activation_fn="glu")


def test_full_size_names_shapes_and_tokens() -> None:
    """Built on the meta device: no memory, just the official names and shapes."""
    with torch.device("meta"):
        model = BEATs(beats_config("iter3"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["patch_embedding.weight"] == (512, 1, 16, 16)
    assert "patch_embedding.bias" not in shapes
    assert shapes["layer_norm.weight"] == (512,)
    assert shapes["post_extract_proj.weight"] == (768, 512)
    assert shapes["encoder.pos_conv.0.weight_g"] == (1, 1, 128)
    assert shapes["encoder.pos_conv.0.weight_v"] == (768, 48, 128)
    assert shapes["encoder.pos_conv.0.bias"] == (768,)
    assert shapes["encoder.layer_norm.weight"] == (768,)
    for i in range(12):
        prefix = f"encoder.layers.{i}."
        assert shapes[prefix + "self_attn.relative_attention_bias.weight"] == (320, 12)
        assert shapes[prefix + "self_attn.grep_linear.weight"] == (8, 64)
        assert shapes[prefix + "self_attn.grep_a"] == (1, 12, 1, 1)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert shapes[prefix + f"self_attn.{proj}.weight"] == (768, 768)
        assert shapes[prefix + "fc1.weight"] == (3072, 768)
        assert shapes[prefix + "final_layer_norm.bias"] == (768,)
        assert shapes[prefix + "self_attn_layer_norm.bias"] == (768,)
    assert not [k for k in shapes if k.startswith(("fbank", "predictor"))]
    assert len(shapes) == 5 + 3 + 2 + 12 * 20
    assert 89e6 < sum(p.numel() for p in model.parameters()) < 91e6  # BEATs: 90M
    assert model.num_tokens(160000) == 496


def test_tiny_forward_backward(birds: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = BEATs(beats_config("tiny"))
    wave = torch.cat([birds, birds.flip(1)])
    features, mask = model(wave)
    assert features.shape == (2, model.num_tokens(wave.shape[1]), model.cfg.encoder_embed_dim)
    assert features.shape[1] == 496 and mask is None
    features.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []
    model.eval()
    with torch.no_grad():
        again, _ = model(wave)
        single, _ = model(wave[1:])
    torch.testing.assert_close(again[1:], single, atol=1e-5, rtol=0)
    assert _max_diff(again[0], again[1]) > 1e-2


def test_padding_mask(birds: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = BEATs(beats_config("tiny")).eval()
    wave = torch.cat([birds, birds])
    pad = torch.zeros_like(wave, dtype=torch.bool)
    pad[1, 80000:] = True  # second clip: 5 s of audio, 5 s of padding
    wave[1, 80000:] = 0.0
    with torch.no_grad():
        features, mask = model(wave, pad)
        _, none = model(wave)
    assert none is None
    assert mask.shape == features.shape[:2] == (2, 496)
    assert not mask[0].any()
    # The official reduction: samples -> 998 frames of 160 samples (frame i padded from
    # sample 80000 on, i.e. i >= 500), then frames -> 496 tokens of 2 frames (j >= 250).
    assert torch.equal(mask[1], torch.arange(496) >= 250)
    all_padding = torch.ones_like(wave, dtype=torch.bool)
    with torch.no_grad():
        out, full_mask = model(torch.zeros_like(wave), all_padding)
    assert full_mask.all() and torch.isfinite(out).all()


def test_too_short_and_bad_shapes() -> None:
    model = BEATs(beats_config("tiny")).eval()
    assert model.min_samples == 2800
    assert model(torch.zeros(1, 2800))[0].shape == (1, 8, 192)
    with pytest.raises(ValueError, match="at least 2800 samples"):
        model(torch.zeros(1, 2799))
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        model(torch.zeros(16000))
    with pytest.raises(ValueError, match="must match"):
        model(torch.zeros(1, 16000), torch.zeros(1, 1600, dtype=torch.bool))


def test_fbank_hop_sets_the_token_rate(birds: torch.Tensor) -> None:
    """``frame_shift_ms`` (not an official field; 10 ms there) reaches the fbank: a 5 ms hop
    gives twice the frames, so twice the tokens, and the mask reduction follows."""
    torch.manual_seed(0)
    model = BEATs(beats_config("tiny", frame_shift_ms=5.0)).eval()
    assert model.fbank.cfg.window_shift == 80 and model.num_tokens(160000) == 2 * 496
    assert model.min_samples == 400 + 15 * 80
    pad = torch.zeros_like(birds, dtype=torch.bool)
    pad[:, 80000:] = True
    with torch.no_grad():
        features, mask = model(birds, pad)
    # 1,996 frames of 80 samples (padded from frame 1000), then 992 tokens of 2 frames.
    assert features.shape[1] == 992 and torch.equal(mask[0], torch.arange(992) >= 500)
    assert BEATsConfig.from_dict(model.cfg.to_dict()).frame_shift_ms == 5.0
    assert beats_config("iter3").frame_shift_ms == 10.0
    with pytest.raises(ValueError, match="frame_shift_ms must be positive"):
        beats_config("tiny", frame_shift_ms=0.0)


def test_relative_position_buckets() -> None:
    buckets = relative_position_buckets(496, 320, 800)
    assert buckets.shape == (496, 496)
    assert int(buckets.min()) == 0 and int(buckets.max()) < 320
    offsets = torch.arange(496)
    # keys before the query: buckets 0..159 by distance; after: 160..319
    assert torch.equal(
        buckets[0, :80], torch.cat([torch.zeros(1, dtype=torch.long), 160 + offsets[1:80]])
    )
    assert torch.equal(buckets[79, :80].flip(0), offsets[:80])
    assert bool((buckets[0].diff() >= 0).all())  # monotone in distance
    assert torch.equal(torch.diagonal(buckets), torch.zeros(496, dtype=torch.long))


def test_gradient_decay_and_layerdrop(birds: torch.Tensor) -> None:
    torch.manual_seed(0)
    base = BEATs(beats_config("tiny"))
    decayed = BEATs(beats_config("tiny", layer_wise_gradient_decay_ratio=0.5))
    decayed.load_state_dict(base.state_dict())
    wave = birds[:, :32000]
    grads = []
    for model in (base, decayed):
        out, _ = model.eval()(wave)
        out.sum().backward()
        grads.append(model.patch_embedding.weight.grad.clone())
    torch.testing.assert_close(base(wave)[0], decayed(wave)[0], atol=0, rtol=0)
    # every path to the patch embedding crosses both layers' scaling: 0.5 ** 2
    torch.testing.assert_close(grads[1], 0.25 * grads[0], atol=1e-7, rtol=1e-4)
    skip_all = BEATs(beats_config("tiny", encoder_layerdrop=1.0))
    skip_all.load_state_dict(base.state_dict())
    trained, _ = skip_all.train()(wave)
    evaluated, _ = skip_all.eval()(wave)
    assert _max_diff(trained, evaluated) > 1e-3  # training skipped every layer


# ------------------------------------------------------------------------- checkpoint loading


def _save_official(path: Path, cfg: BEATsConfig, model: BEATs, **extra: Any) -> Path:
    torch.save({"cfg": {**_official_cfg(cfg), **extra}, "model": model.state_dict()}, path)
    return path


def test_load_beats_round_trip(tmp_path: Path, birds: torch.Tensor) -> None:
    cfg = beats_config("iter3", **SMALL)
    torch.manual_seed(1)
    source = BEATs(cfg).eval()
    path = _save_official(tmp_path / "BEATs_iter3_plus_AS2M.pt", cfg, source)
    loaded = load_beats(path)
    assert loaded.cfg == cfg and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(birds)[0], source(birds)[0], atol=0, rtol=0)


def test_conv_stem_makes_the_patch_grid_and_round_trips(tmp_path: Path,
                                                          birds: torch.Tensor) -> None:
    stem = BEATs(beats_config("tiny", conv_stem=(4, 8, 8, 16))).eval()
    patch = BEATs(beats_config("tiny")).eval()
    for frames in (16, 17, 31, 250, 998):  # the same [time, frequency] grid as the patches
        grid = torch.zeros(1, 1, frames, 128)
        with torch.no_grad():
            assert stem.patch_embedding(stem.conv_stem(grid)).shape == \
                patch.patch_embedding(grid).shape
    wave = torch.cat([birds, birds])
    pad = torch.zeros_like(wave, dtype=torch.bool)
    pad[1, 80000:] = True
    with torch.no_grad():
        features, mask = stem(wave, pad)
        _, patch_mask = patch(wave, pad)
    assert features.shape == (2, 496, stem.cfg.encoder_embed_dim)
    assert torch.equal(mask, patch_mask)
    cfg = stem.cfg
    path = tmp_path / "stem.pt"
    torch.save({"cfg": cfg.to_dict(), "model": stem.state_dict()}, path)
    loaded = load_beats(path)
    assert loaded.cfg == cfg and loaded.cfg.conv_stem == (4, 8, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(birds)[0], stem(birds)[0], atol=0, rtol=0)
    assert BEATsConfig.from_dict({**cfg.to_dict(), "conv_stem": [4, 8, 8, 16]}) == cfg
    assert BEATsConfig.from_dict(_official_cfg(beats_config("iter3"))).conv_stem == ()
    with pytest.raises(ValueError, match="3 stride-2 layers make patches of 8"):
        beats_config("tiny", conv_stem=(4, 8, 16))


def test_load_finetuned_and_defaults(tmp_path: Path, birds: torch.Tensor) -> None:
    cfg = beats_config("tiny", finetuned_model=True, predictor_class=5)
    torch.manual_seed(2)
    source = BEATs(cfg).eval()
    path = tmp_path / "finetuned.pt"
    torch.save(
        {
            "cfg": _official_cfg(cfg),
            "model": source.state_dict(),
            "label_dict": {"0": "/m/09x0r"},
        },
        path,
    )
    loaded = load_beats(path)
    logits = loaded.classify(birds)
    assert logits.shape == (1, 5)
    torch.testing.assert_close(logits, source.classify(birds), atol=0, rtol=0)
    official = _official_cfg(beats_config("iter3"))
    del official["max_distance"], official["deep_norm"]
    with pytest.warns(UserWarning, match="layer_wise_lr"):
        rebuilt = BEATsConfig.from_dict({**official, "layer_wise_lr": 0.6})
    assert rebuilt.max_distance == 1280 and rebuilt.deep_norm is False  # official defaults


def test_shared_bias_stored_once(birds: torch.Tensor) -> None:
    """safetensors keeps one copy of a shared tensor; the mapping restores every layer."""
    torch.manual_seed(3)
    source = BEATs(beats_config("tiny")).eval()
    state = {
        "beats." + k: v
        for k, v in source.state_dict().items()
        if "relative_attention_bias" not in k or k.startswith("encoder.layers.0.")
    }
    state["qformer.bert.weight"] = torch.zeros(1)
    target = BEATs(beats_config("tiny")).eval()
    load_beats_state_dict(
        target, beats_state_dict_keys(state, prefix="beats."), "model.safetensors"
    )
    with torch.no_grad():
        torch.testing.assert_close(target(birds)[0], source(birds)[0], atol=0, rtol=0)


class _NotAWeight:
    pass


def test_load_errors(tmp_path: Path) -> None:
    cfg = beats_config("tiny")
    model = BEATs(cfg)
    with pytest.raises(InputError, match="not found"):
        load_beats(tmp_path / "missing.pt")
    wrong = model.state_dict()
    wrong.pop("encoder.layer_norm.weight")
    wrong["encoder.extra.weight"] = torch.zeros(1)
    torch.save({"cfg": _official_cfg(cfg), "model": wrong}, tmp_path / "wrong.pt")
    with pytest.raises(InputError, match=r"missing keys \['encoder.layer_norm.weight'\]") as err:
        load_beats(tmp_path / "wrong.pt")
    assert "unexpected keys ['encoder.extra.weight']" in str(err.value)
    assert str(tmp_path / "wrong.pt") in str(err.value)
    torch.save({"model": model.state_dict()}, tmp_path / "nocfg.pt")
    with pytest.raises(InputError, match="holds 'cfg' and 'model'"):
        load_beats(tmp_path / "nocfg.pt")
    with open(tmp_path / "pickled.pt", "wb") as handle:
        pickle.dump({"cfg": _NotAWeight(), "model": {}}, handle, protocol=2)
    with pytest.raises(InputError, match="refusing to unpickle"):
        load_beats(tmp_path / "pickled.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(InputError):
        load_beats(tmp_path / "text.pt")


# ------------------------------------------------------------------------------ avex parity


def test_avex_fbank_parity(avex_beats: types.ModuleType, birds: torch.Tensor) -> None:
    theirs, ours = _twins(avex_beats, beats_config("tiny"))
    wave = torch.cat([birds, 0.01 * torch.randn_like(birds)])
    diff = _max_diff(theirs.preprocess(wave), ours.preprocess(wave))
    print(f"normalised fbank vs avex: max abs diff {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize(
    "cfg",
    [
        beats_config("iter3", **SMALL),
        beats_config("tiny"),
        beats_config("tiny", deep_norm=False, layer_norm_first=True, gru_rel_pos=False),
        beats_config("tiny", relative_position_embedding=False, embed_dim=192),
    ],
    ids=["iter3-2-layers", "tiny", "tiny-prenorm-nogate", "tiny-norel-noproj"],
)
def test_avex_encoder_parity(
    avex_beats: types.ModuleType, birds: torch.Tensor, cfg: BEATsConfig
) -> None:
    theirs, ours = _twins(avex_beats, cfg)
    torch.manual_seed(4)
    clip = birds[:, :80000]  # 5 s: 248 tokens
    wave = torch.cat([clip, 0.05 * torch.randn_like(clip)])
    pad = torch.zeros_like(wave, dtype=torch.bool)
    pad[1, 50000:] = True
    with torch.no_grad():
        expected, _ = theirs(wave)
        got, _ = ours(wave)
        expected_masked, expected_mask = theirs(wave, pad)
        got_masked, got_mask = ours(wave, pad)
    diff = _max_diff(expected, got)
    masked_diff = _max_diff(expected_masked, got_masked)
    print(f"encoder vs avex: max abs diff {diff:.2e} (with padding {masked_diff:.2e})")
    assert got.shape == (2, 248, cfg.encoder_embed_dim)
    assert diff < 1e-5 and masked_diff < 1e-5
    assert torch.equal(expected_mask, got_mask) and got_mask[1].any()
    trained, _ = ours(wave, pad)  # gradients on: the CPU math path, not SDPA
    assert trained.requires_grad and _max_diff(expected_masked, trained.detach()) < 1e-5


def test_attention_math_equals_sdpa_with_gradients() -> None:
    from teacher.beats import _attention_math

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(2, 4, 37, 37, dtype=torch.float64)
    bias[1, :, :, 30:] = torch.finfo(torch.float64).min  # padded keys, as the module masks
    bias.requires_grad_(True)
    inputs = (q, k, v, bias)
    ours = _attention_math(q, k, v, bias, 0.0)
    grads = torch.autograd.grad(ours.square().sum(), inputs)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    torch.testing.assert_close(ours, ref)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected)
    unbiased = _attention_math(q, k, v, None, 0.0)
    torch.testing.assert_close(unbiased, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_avex_relative_buckets(avex_beats: types.ModuleType) -> None:
    theirs, _ = _twins(avex_beats, beats_config("tiny"))
    for length, buckets, distance in ((496, 320, 800), (300, 64, 256)):
        attn = theirs.encoder.layers[0].self_attn
        attn.num_buckets, attn.max_distance = buckets, distance
        positions = torch.arange(length)
        expected = attn._relative_positions_bucket(positions[None, :] - positions[:, None])
        assert torch.equal(relative_position_buckets(length, buckets, distance), expected)


@pytest.mark.slow
def test_avex_parity_full_size(avex_beats: types.ModuleType, birds: torch.Tensor) -> None:
    theirs, ours = _twins(avex_beats, beats_config("iter3"))
    with torch.inference_mode():
        expected, _ = theirs(birds)
        got, _ = ours(birds)
    diff = _max_diff(expected, got)
    print(f"full-size encoder vs avex: {tuple(got.shape)}, max abs diff {diff:.2e}")
    assert got.shape == (1, 496, 768)
    assert diff < 1e-5
    assert np.isfinite(got.numpy()).all()
