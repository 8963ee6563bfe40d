"""The byte-level BPE: special tokens are single tokens, any text round-trips, JSON embedding."""

from __future__ import annotations

import json

import pytest

from teacher.tokenizer import (
    SPECIAL_TOKENS,
    tokenizer_from_json,
    tokenizer_to_json,
    train_tokenizer,
)
from tests.teacher.helpers import corpus_texts

TEXTS = ["What is the common name for the focal species in the audio? Answer: Kea",
         "Tui, Kea", "juvénile — ñandú 鳥 🐦", "<|begin_of_text|><Audio><AudioHere></Audio> x"]


def test_special_tokens_are_single_tokens_with_llama3_roles() -> None:
    tok = train_tokenizer(corpus_texts(), 400)
    for special in SPECIAL_TOKENS:
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [special]
    assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert len(tok) <= 400


@pytest.mark.parametrize("text", TEXTS)
def test_any_text_round_trips(text: str) -> None:
    tok = train_tokenizer(corpus_texts(), 400)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_training_merges_frequent_words() -> None:
    tok = train_tokenizer(corpus_texts() * 5, 400)
    assert len(tok("species", add_special_tokens=False)["input_ids"]) < len("species")


def test_json_round_trip_keeps_ids_and_roles() -> None:
    tok = train_tokenizer(corpus_texts(), 400)
    text = tokenizer_to_json(tok)
    again = tokenizer_from_json(text)
    assert json.loads(text)["roles"]["bos_token"] == "<|begin_of_text|>"
    for t in TEXTS:
        assert again(t)["input_ids"] == tok(t)["input_ids"]
    assert (again.bos_token, again.eos_token, again.pad_token) == (
        tok.bos_token, tok.eos_token, tok.pad_token)
    assert len(again) == len(tok)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_tokenizer(corpus_texts(), 100)
    with pytest.raises(ValueError, match="tokenizer_to_json"):
        tokenizer_from_json('{"vocab": {}}')
