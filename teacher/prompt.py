"""The NatureLM-audio prompt: the Llama-3 chat template around a user turn holding the audio.

The user turn is ``<Audio><AudioHere></Audio> {query}``; the audio embeddings replace
``<AudioHere>`` (one placeholder per audio, several per prompt allowed). A query without the
placeholder gets it prepended, as NatureLM-audio does. The begin-of-text token is added by the
model as a token id, not as text.

    >>> chat_prompt("What is the common name for the focal species in the audio? Answer:")
    '<|start_header_id|>user<|end_header_id|>\\n\\n<Audio><AudioHere></Audio> What is the common name for the focal species in the audio? Answer:<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n'
    >>> split_prompt(chat_prompt("<Audio><AudioHere></Audio> <Audio><AudioHere></Audio> Same?"))[1]
    '</Audio> <Audio>'
    >>> count_audios("<Audio><AudioHere></Audio> Which call?")
    1
"""

from __future__ import annotations

from teacher.tokenizer import AUDIO_CLOSE, AUDIO_HERE, AUDIO_OPEN, END_HEADER, EOT, START_HEADER

AUDIO_PLACEHOLDER = f"{AUDIO_OPEN}{AUDIO_HERE}{AUDIO_CLOSE}"
CHAT_TEMPLATE = (f"{START_HEADER}user{END_HEADER}\n\n{{}}{EOT}"
                 f"{START_HEADER}assistant{END_HEADER}\n\n")


def with_placeholder(query: str) -> str:
    """``query`` itself when it holds ``<AudioHere>``, else the placeholder, a space, the query."""
    if AUDIO_HERE in query:
        return query
    return f"{AUDIO_PLACEHOLDER} {query.strip()}"


def chat_prompt(query: str) -> str:
    """The full prompt text (without begin-of-text) ending where the answer starts."""
    return CHAT_TEMPLATE.format(with_placeholder(query))


def split_prompt(prompt: str) -> list[str]:
    """The text parts around each ``<AudioHere>``: ``count_audios + 1`` parts."""
    return prompt.split(AUDIO_HERE)


def count_audios(query: str) -> int:
    """Audios a query takes once the placeholder rule is applied (at least one)."""
    return with_placeholder(query).count(AUDIO_HERE)
