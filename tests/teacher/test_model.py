"""NatureLM on the tiny architecture: shapes, answer-only loss, score_labels against a manual
forward, batched vs unbatched, greedy vs argmax, freeze policy, bad input, long recordings."""

from __future__ import annotations

import math

import pytest
import torch

from corpus.tasks import instruction_for
from teacher.config import QFormerConfig, TeacherConfig, config_hash, teacher_config
from teacher.model import (
    IGNORE,
    NatureLM,
    answer_cross_entropy,
    clip_windows,
    generate_windows,
    score_windows,
)
from teacher.qformer import num_windows
from tests.teacher.helpers import chirps, read_mono_16k, tiny_config, tiny_model, tiny_tokenizer

Q = instruction_for("species")
LABELS = ["Kea", "Tui", "Morepork", "Bellbird", "None"]


@pytest.fixture(scope="module")
def model() -> NatureLM:
    return tiny_model(seed=3)


def _manual_loglik(model: NatureLM, audio: torch.Tensor, instruction: str,
                   answer: str) -> tuple[float, int]:
    """Sum of log p(answer tokens + end) from one plain forward over the whole sequence."""
    batch = model.build_inputs(audio, [instruction], [answer])
    with torch.no_grad():
        logits = model.llama_model(inputs_embeds=batch.inputs_embeds,
                                   attention_mask=batch.attention_mask).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    labels = batch.labels[0]
    total, count = 0.0, 0
    for pos in range(1, labels.shape[0]):
        if labels[pos] != IGNORE:
            total += float(logp[pos - 1, labels[pos]])
            count += 1
    return total, count


def test_presets_round_trip_hash_and_unknown_names() -> None:
    for name in ("tiny", "naturelm-8b"):
        cfg = teacher_config(name)
        assert TeacherConfig.from_dict(cfg.to_dict()) == cfg
        assert config_hash(TeacherConfig.from_dict(cfg.to_dict())) == config_hash(cfg)
    big = teacher_config("naturelm-8b")
    assert (big.lora.r, big.lora.alpha, big.lora.dropout) == (32, 32, 0.1)
    assert big.encoder.encoder_embed_dim == 768 and big.llm.dtype == "bfloat16"
    assert config_hash(tiny_config(clip_s=3.0)) != config_hash(tiny_config(clip_s=2.0))
    with pytest.raises(KeyError, match="known presets: tiny, naturelm-8b"):
        teacher_config("base")
    with pytest.raises(KeyError, match="colour"):
        TeacherConfig.from_dict({**teacher_config("tiny").to_dict(), "colour": 1})


def test_ten_second_clip_gives_one_token_per_window() -> None:
    model = tiny_model(cfg=tiny_config(clip_s=10.0))
    n = model.beats.num_tokens(160000)
    with torch.no_grad():
        tokens = model.encode_audio(chirps(2, 10.0))
    assert n == 248  # the tiny preset's 32-bin fbank at 5 ms: 124 steps x 2 bands of patches
    assert tokens.shape == (2, math.ceil(n / 17), model.cfg.llm.hidden_size)
    assert tokens.shape[1] == num_windows(n, model.cfg.qformer) == 15
    assert num_windows(496, QFormerConfig()) == 29  # naturelm-8b's 496 tokens, as published


def test_loss_is_cross_entropy_on_answer_tokens_only(model: NatureLM) -> None:
    audio = chirps(2, 0.9, seed=1)
    prompts = [Q, "Short? Answer:"]
    answers = ["Kea", "Morepork, Tui"]
    batch = model.build_inputs(audio, prompts, answers)
    for i, answer in enumerate(answers):
        supervised = batch.labels[i][batch.labels[i] != IGNORE].tolist()
        assert supervised == model._ids(answer) + [model.end_id]
        start = batch.prompt_lengths[i]
        assert batch.labels[i, :start].eq(IGNORE).all()
    with torch.no_grad():
        loss = model(audio, prompts, answers)
    manual = [_manual_loglik(model, audio[i:i + 1], prompts[i], answers[i]) for i in range(2)]
    expected = -sum(t for t, _ in manual) / sum(c for _, c in manual)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_prompt_text_changes_the_loss_but_not_what_is_supervised(model: NatureLM) -> None:
    audio = chirps(1, 1.0, seed=2)
    a = model.build_inputs(audio, ["Which species? Answer:"], ["Kea"])
    b = model.build_inputs(audio, ["Name the focal species, please. Answer:"], ["Kea"])
    assert a.labels[a.labels != IGNORE].tolist() == b.labels[b.labels != IGNORE].tolist()
    with torch.no_grad():
        la = model(audio, ["Which species? Answer:"], ["Kea"])
        lb = model(audio, ["Name the focal species, please. Answer:"], ["Kea"])
    assert la.item() != lb.item()


def test_score_labels_equals_manual_forward_log_likelihood(model: NatureLM) -> None:
    audio = chirps(2, 0.9, seed=4)
    scores = model.score_labels(audio, [Q, Q], LABELS, label_batch_size=2)
    means = model.score_labels(audio, [Q, Q], LABELS, normalize="mean")
    for b in range(2):
        for j, label in enumerate(LABELS):
            total, count = _manual_loglik(model, audio[b:b + 1], Q, label)
            assert scores[b, j].item() == pytest.approx(total, abs=1e-4)
            assert means[b, j].item() == pytest.approx(total / count, abs=1e-4)


def test_batched_equals_unbatched(model: NatureLM) -> None:
    audio = chirps(3, 0.8, seed=5)
    prompts = [Q, instruction_for("calltype"), "Which one? Answer:"]
    batched = model.score_labels(audio, prompts, LABELS)
    texts = model.generate(audio, prompts, max_new_tokens=4)
    for i in range(3):
        single = model.score_labels(audio[i:i + 1], prompts[i:i + 1], LABELS)
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-4, rtol=1e-4)
        assert model.generate(audio[i:i + 1], prompts[i:i + 1], max_new_tokens=4) == [texts[i]]


def test_ragged_label_sets_are_padded_with_minus_inf(model: NatureLM) -> None:
    audio = chirps(1, 1.0, seed=6).repeat(2, 1)
    scores = model.score_labels(audio, [Q, Q], [["Kea", "Tui", "None"], ["Kea"]])
    assert scores.shape == (2, 3) and scores[1, 1:].eq(-math.inf).all()
    torch.testing.assert_close(scores[1, 0], scores[0, 0], atol=1e-4, rtol=1e-4)


def test_greedy_generation_is_the_argmax_over_one_token_answers(model: NatureLM) -> None:
    audio = chirps(2, 1.0, seed=7)
    vocab = len(model.tokenizer)
    singles = [[[t] for t in range(vocab)]] * 2
    scores = model.score_token_ids(audio, [Q, Q], singles, with_end=False)
    greedy = scores.argmax(dim=1).tolist()
    assert not set(greedy) & set(model.stop_ids), "the random model stops at once: reseed"
    first = [ids[0] for ids in model.generate_ids(audio, [Q, Q], max_new_tokens=1)]
    assert first == greedy


def test_beam_search_and_max_new_tokens(model: NatureLM) -> None:
    audio = chirps(2, 1.0, seed=8)
    ids = model.generate_ids(audio, [Q, Q], max_new_tokens=3, num_beams=2)
    assert len(ids) == 2 and all(len(x) <= 3 for x in ids)
    assert all(isinstance(t, str) for t in model.generate(audio, [Q, Q], 3, num_beams=2))


def test_default_freeze_policy_trains_only_lora_qformer_and_projection() -> None:
    cfg = tiny_config(train_llm=TeacherConfig.train_llm,  # the default policy of TeacherConfig
                      train_encoder=TeacherConfig.train_encoder)
    assert (cfg.train_encoder, cfg.train_llm) == (TeacherConfig.train_encoder,
                                                  TeacherConfig.train_llm)
    model = tiny_model(cfg=cfg).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_" in n or n.startswith(("audio_qformer.", "ln_audio.", "audio_llama_proj.",
                                      "audio_norm."))  # audio_norm: part of the projection
        for n in trainable)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for p in model.beats.parameters())
    assert not model.beats.training and model.audio_qformer.training
    loss = model(chirps(2, 1.0), [Q, Q], ["Kea", "Tui"])
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable


def test_silent_and_empty_audio_give_answers(model: NatureLM) -> None:
    for audio in (torch.zeros(1, 0), torch.zeros(1, 16000), torch.zeros(2, 5)):
        texts = model.generate(audio, [Q] * audio.shape[0], max_new_tokens=3)
        assert len(texts) == audio.shape[0] and all(isinstance(t, str) for t in texts)
        assert torch.isfinite(model.score_labels(audio, [Q] * audio.shape[0], LABELS)).all()


def test_bad_audio_raises_clearly(model: NatureLM) -> None:
    with pytest.raises(ValueError, match="NaN"):
        model.generate(torch.full((1, 100), math.nan), [Q])
    with pytest.raises(ValueError, match="generate_windows"):
        model.generate(torch.zeros(1, model.cfg.clip_samples + 1), [Q])
    with pytest.raises(ValueError, match="placeholders"):
        model.generate(chirps(2, 1.0), [Q])
    with pytest.raises(ValueError, match="normalize"):
        model.score_labels(chirps(1, 1.0), [Q], LABELS, normalize="max")
    long = chirps(1, 3.0)  # training crops: forward takes the first clip_s
    with torch.no_grad():
        assert model(long, [Q], ["Kea"]).item() == pytest.approx(
            model(long[:, :model.cfg.clip_samples], [Q], ["Kea"]).item())


def test_tokenizer_larger_than_the_llm_vocabulary_raises() -> None:
    from teacher.config import LLMConfig

    cfg = tiny_config().replace(llm=LLMConfig(vocab_size=300))
    with pytest.raises(ValueError, match="vocab_size is 300"):
        NatureLM(cfg, tiny_tokenizer())


def test_long_real_recording_is_windowed_and_reported(real_recording: object) -> None:
    model = tiny_model(cfg=tiny_config(clip_s=4.0))
    audio = read_mono_16k(real_recording)  # 10.13 s of birdsong
    assert clip_windows(10, 4, 4) == [(0, 4), (4, 8), (8, 10)]
    assert clip_windows(3, 4, 2) == [(0, 3)]
    with pytest.raises(ValueError, match="skipped"):
        clip_windows(10, 4, 5)
    answers = generate_windows(model, audio, Q, hop_s=3.0, max_new_tokens=2)
    assert [(a.start_s, a.end_s) for a in answers] == [
        (0.0, 4.0), (3.0, 7.0), (6.0, 10.0), (9.0, audio.shape[0] / 16000)]
    windows, scores = score_windows(model, audio, Q, LABELS, batch_size=2)
    assert windows == [(0.0, 4.0), (4.0, 8.0), (8.0, audio.shape[0] / 16000)]
    assert scores.shape == (3, len(LABELS))
    first = model.score_labels(audio[None, :model.cfg.clip_samples], [Q], LABELS)
    torch.testing.assert_close(scores[:1], first, atol=1e-4, rtol=1e-4)


def test_precomputed_audio_embeds_give_the_same_answers_and_scores(model: NatureLM) -> None:
    """A clip encoded once serves several prompts: same outputs as passing the audio."""
    audio = chirps(2, 0.9, seed=9)
    prompts = [Q, instruction_for("calltype")]
    with torch.no_grad():
        tokens = model.encode_audio(audio)
    torch.testing.assert_close(model.score_labels(None, prompts, LABELS, audio_embeds=tokens),
                               model.score_labels(audio, prompts, LABELS), atol=1e-5, rtol=1e-5)
    assert model.generate(None, prompts, max_new_tokens=4, audio_embeds=tokens) == \
        model.generate(audio, prompts, max_new_tokens=4)
    with pytest.raises(ValueError, match="not both"):
        model.generate(audio, prompts, audio_embeds=tokens)
    with pytest.raises(ValueError, match="no audio"):
        model.score_labels(None, prompts, LABELS)
    with pytest.raises(ValueError, match=r"\[audios, tokens, width\]"):
        model.generate(None, prompts, audio_embeds=tokens[0])


def test_shared_audio_prefix_equals_whole_prompts(model: NatureLM) -> None:
    """Prompts about one clip share the cache up to the audio: same answers and scores as
    running every prompt whole, for prompts of different lengths and a clip asked thrice."""
    audio = chirps(2, 0.9, seed=10)
    prompts = [Q, instruction_for("detection"), "Which? Answer:", Q]
    index = [0, 0, 1, 1]
    with torch.no_grad():
        tokens = model.encode_audio(audio)
    shared = model.prompt_cache(None, prompts, audio_embeds=tokens, audio_index=index)
    whole = model.prompt_cache(audio[index], prompts)
    candidates = model.label_token_ids(LABELS, len(prompts))
    torch.testing.assert_close(model.score_from(shared, candidates),
                               model.score_from(whole, candidates), atol=1e-4, rtol=1e-4)
    assert model.greedy_from(shared, 4) == model.greedy_from(whole, 4) == \
        model.generate_ids(audio[index], prompts, max_new_tokens=4)
    with pytest.raises(ValueError, match="audio_index must give"):
        model.prompt_cache(None, prompts, audio_embeds=tokens, audio_index=[0, 1, 2, 0])


def test_prompts_of_two_audios_take_no_audio_index(model: NatureLM) -> None:
    """Two audios in one prompt: one embeds row per placeholder, as `build_inputs` takes."""
    audio = chirps(2, 0.9, seed=11)
    pair = "<Audio><AudioHere></Audio> <Audio><AudioHere></Audio> Same species? Answer:"
    with torch.no_grad():
        tokens = model.encode_audio(audio)
    with pytest.raises(ValueError, match=r"one audio each, these hold \[2\]"):
        model.prompt_cache(None, [pair], audio_embeds=tokens, audio_index=[0])
    torch.testing.assert_close(model.prompt_cache(None, [pair], audio_embeds=tokens).logits,
                               model.prompt_cache(audio, [pair]).logits, atol=1e-4, rtol=1e-4)


def test_answer_cross_entropy_is_a_weighted_token_mean() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    # Row 0 has three answer tokens, row 1 one; labels are shifted by one against logits.
    labels = torch.full((2, 6), IGNORE)
    labels[0, 3:6] = torch.tensor([4, 7, 2])
    labels[1, 5] = 9
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")
    row0, row1 = per_token[0, 2:5], per_token[1, 4]
    plain = answer_cross_entropy(logits, labels)
    assert torch.allclose(plain, torch.cat([row0, row1.view(1)]).mean())
    assert torch.allclose(plain, torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE))
    # Every answer token counts its example's weight.
    weighted = answer_cross_entropy(logits, labels, torch.tensor([1.0, 3.0]))
    assert torch.allclose(weighted, (row0.sum() + 3 * row1) / (3 + 3))
    assert torch.allclose(answer_cross_entropy(logits, labels, torch.tensor([2.0, 2.0])), plain)
