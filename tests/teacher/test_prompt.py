"""The Llama-3 chat prompt with the audio placeholder, and how the model splices audio into it."""

from __future__ import annotations

import torch

from corpus.tasks import instruction_for
from teacher.prompt import (
    AUDIO_PLACEHOLDER,
    chat_prompt,
    count_audios,
    split_prompt,
    with_placeholder,
)
from tests.teacher.helpers import chirps, tiny_model


def test_placeholder_is_prepended_only_when_missing() -> None:
    assert with_placeholder("Which species? ") == f"{AUDIO_PLACEHOLDER} Which species?"
    assert with_placeholder(instruction_for("species")) == instruction_for("species")
    assert with_placeholder("Compare <AudioHere> and <AudioHere>") == (
        "Compare <AudioHere> and <AudioHere>")


def test_chat_template_is_llama3_user_then_assistant_header() -> None:
    prompt = chat_prompt("Which species?")
    assert prompt == ("<|start_header_id|>user<|end_header_id|>\n\n"
                      "<Audio><AudioHere></Audio> Which species?<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert split_prompt(prompt) == [
        "<|start_header_id|>user<|end_header_id|>\n\n<Audio>",
        "</Audio> Which species?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"]


def test_several_audios_per_prompt() -> None:
    query = f"{AUDIO_PLACEHOLDER} {AUDIO_PLACEHOLDER} Same species?"
    assert count_audios(query) == 2 and len(split_prompt(chat_prompt(query))) == 3
    assert count_audios("no placeholder") == 1


def test_model_prepends_placeholder_and_splices_audio_in_its_place() -> None:
    model = tiny_model()
    audio = chirps(1, 1.0)
    with torch.no_grad():
        bare = model.build_inputs(audio, ["Which species?"])
        full = model.build_inputs(audio, [f"{AUDIO_PLACEHOLDER} Which species?"])
        tokens = model.encode_audio(audio)[0]
    torch.testing.assert_close(bare.inputs_embeds, full.inputs_embeds)
    # The audio tokens sit right after bos + "<|start_header_id|>user<|end_header_id|>\n\n<Audio>".
    head = [model.bos_id] + model._ids(split_prompt(chat_prompt("x"))[0])
    emb = bare.inputs_embeds[0]
    torch.testing.assert_close(emb[len(head):len(head) + tokens.shape[0]], tokens)
    table = model.llama_model.get_input_embeddings().weight
    torch.testing.assert_close(emb[:len(head)], table[head])


def test_two_audios_land_at_their_placeholders() -> None:
    model = tiny_model()
    audio = chirps(2, 1.0)
    query = f"{AUDIO_PLACEHOLDER} then {AUDIO_PLACEHOLDER} Same species?"
    with torch.no_grad():
        emb = model.build_inputs(audio, [query]).inputs_embeds[0]
        tokens = model.encode_audio(audio)
    parts = split_prompt(chat_prompt(query))
    first = 1 + len(model._ids(parts[0]))
    second = first + tokens.shape[1] + len(model._ids(parts[1]))
    torch.testing.assert_close(emb[first:first + tokens.shape[1]], tokens[0])
    torch.testing.assert_close(emb[second:second + tokens.shape[1]], tokens[1])
