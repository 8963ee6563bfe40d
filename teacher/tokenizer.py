"""Tokenizers: a byte-level BPE trained on corpus text (tiny teacher) or a local Llama's own.

The trained tokenizer carries the Llama-3 special tokens and the audio markers as single tokens,
and serialises to one JSON string so a checkpoint embeds it.

    >>> tok = train_tokenizer(["What is the common name? Answer: Kea", "Tui, Kea"], 300)
    >>> tok.convert_ids_to_tokens(tok("<Audio><AudioHere></Audio>")["input_ids"])
    ['<Audio>', '<AudioHere>', '</Audio>']
    >>> tok.decode(tok("Kea")["input_ids"])
    'Kea'
    >>> tokenizer_from_json(tokenizer_to_json(tok))("Tui")["input_ids"] == tok("Tui")["input_ids"]
    True
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
END_OF_TEXT = "<|end_of_text|>"
AUDIO_OPEN = "<Audio>"
AUDIO_HERE = "<AudioHere>"
AUDIO_CLOSE = "</Audio>"
SPECIAL_TOKENS = (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT,
                  AUDIO_OPEN, AUDIO_HERE, AUDIO_CLOSE)
_ROLES = {"bos_token": BEGIN_OF_TEXT, "eos_token": EOT, "pad_token": END_OF_TEXT}


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` with at most ``vocab_size`` tokens.

    The 256 byte symbols and the special tokens are always in the vocabulary, so any text
    encodes; bos is ``<|begin_of_text|>``, eos ``<|eot_id|>``, pad ``<|end_of_text|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is below the {minimum} byte and special "
                         "tokens a byte-level BPE needs")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, _ROLES)


def _wrap(tok: Any, roles: dict[str, str]) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def tokenizer_to_json(tok: PreTrainedTokenizerFast) -> str:
    """One JSON string holding the tokenizer and its bos / eos / pad roles."""
    roles = {name: getattr(tok, name) for name in _ROLES if getattr(tok, name) is not None}
    return json.dumps({"tokenizer": json.loads(tok.backend_tokenizer.to_str()),
                       "roles": roles})


def tokenizer_from_json(s: str) -> PreTrainedTokenizerFast:
    """Rebuild a tokenizer written by `tokenizer_to_json`."""
    from tokenizers import Tokenizer

    d = json.loads(s)
    if not isinstance(d, dict) or "tokenizer" not in d:
        raise ValueError("not a tokenizer written by tokenizer_to_json: no 'tokenizer' key")
    return _wrap(Tokenizer.from_str(json.dumps(d["tokenizer"])), dict(d.get("roles", {})))


def load_llm_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local transformers model directory (never downloads).

    Raises FileNotFoundError naming the path when it is not a directory.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: LLM directory not found (a local transformers "
                                "model folder, e.g. Llama-3.1-8B-Instruct, is needed)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
