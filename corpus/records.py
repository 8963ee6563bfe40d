"""The record: one audio clip, one task, one instruction and its answer (DESIGN contract 1).

Field names follow BEANS-Zero / NatureLM so their files read without conversion. Audio is either
a file (``file_name`` with ``offset_s`` and ``duration_s``) or an in-memory array with its rate.

    >>> r = Record(id="c1", task="species", instruction=instruction_for("species"),
    ...            output="Kea", labels=("Kea", "Tui"), file_name="c1.flac")
    >>> r.instruction_text
    'What is the common name for the focal species in the audio? Answer:'
    >>> r.group
    'c1.flac'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from corpus.tasks import AUDIO_PLACEHOLDER, instruction_for  # noqa: F401  (doctest)

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Record:
    """One audio-text example.

    Args:
        id: unique within the corpus; teacher targets are keyed by it.
        task: a name in `corpus.tasks.TASKS` (or a BEANS-Zero task name when read from there).
        instruction: prompt text holding `AUDIO_PLACEHOLDER`.
        output: the answer text.
        labels: the task's whole label set (the candidates `score_labels` ranks).
        dataset_name: the corpus or source dataset.
        split: "train", "valid" or "test".
        file_name: audio path (relative to the manifest's folder, or absolute).
        offset_s: where the clip starts in the file.
        duration_s: clip length; None means to the end of the file.
        audio: in-memory mono float32 samples instead of a file.
        sample_rate: the rate of ``audio``.
        recording: the recording the clip comes from; splits never cut a recording.
        metadata: anything else (SNR, call type, ground-truth boxes, source row).
    """

    id: str
    task: str
    instruction: str
    output: str
    labels: tuple[str, ...] = ()
    dataset_name: str = ""
    split: str = "train"
    file_name: str | None = None
    offset_s: float = 0.0
    duration_s: float | None = None
    audio: np.ndarray | None = field(default=None, repr=False, compare=False)
    sample_rate: int | None = None
    recording: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def instruction_text(self) -> str:
        """The instruction without the audio placeholder (BEANS-Zero's ``instruction_text``)."""
        return self.instruction.replace(AUDIO_PLACEHOLDER, "").strip()

    @property
    def group(self) -> str:
        """The unit that splits keep together: the recording, else the file, else the id."""
        return self.recording or self.file_name or self.id
