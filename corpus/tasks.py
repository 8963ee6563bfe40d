"""Tasks, their NatureLM-style questions, and how answers are written and read back.

A task has one question; its label set comes from the corpus (the records carry it). Single-label
tasks answer one label; the detection task answers the labels present, joined by ", ", or
``"None"`` when none is present (BEANS-Zero's convention).

    >>> TASKS["detection"].answer(["Tui", "Kea"])
    'Kea, Tui'
    >>> TASKS["detection"].parse("kea, Tui", labels=("Kea", "Tui", "None"))
    ['Kea', 'Tui']
    >>> instruction_for("species")
    '<Audio><AudioHere></Audio> What is the common name for the focal species in the audio? Answer:'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

AUDIO_PLACEHOLDER = "<Audio><AudioHere></Audio>"
NONE_LABEL = "None"


@dataclass(frozen=True)
class Task:
    """One task: ``multi_label`` tasks (detection) take sigmoid heads, the others softmax."""

    name: str
    question: str
    multi_label: bool = False

    def answer(self, present: Iterable[str]) -> str:
        """The answer text for the labels present (one label for single-label tasks)."""
        items = sorted(set(present))
        if not self.multi_label:
            if len(items) != 1:
                raise ValueError(f"task {self.name!r} takes exactly one label, got {items}")
            return items[0]
        return ", ".join(items) if items else NONE_LABEL

    def parse(self, text: str, labels: Sequence[str]) -> list[str]:
        """Labels named in an answer, matched case-insensitively; unknown parts are dropped.

        Free text is snapped to labels by the evaluator (Levenshtein), not here.
        """
        by_lower = {label.lower(): label for label in labels}
        parts = [text.strip()] if not self.multi_label else text.split(",")
        found = [by_lower[p.strip().lower()] for p in parts if p.strip().lower() in by_lower]
        if self.multi_label:
            found = [f for f in found if f != NONE_LABEL]
        return sorted(set(found))


TASKS: dict[str, Task] = {
    "species": Task("species", "What is the common name for the focal species in the audio?"
                    " Answer:"),
    "detection": Task("detection", "Which of these, if any, are present in the audio recording?"
                      " Answer:", multi_label=True),
    "lifestage": Task("lifestage", "What is the life stage of the focal animal? Answer:"),
    "calltype": Task("calltype", "What type of vocalization does the focal animal make? Answer:"),
    "count": Task("count", "How many species are vocalizing in the audio? Answer:"),
}


def get_task(name: str) -> Task:
    """The task called ``name``; unknown names raise with the known ones listed."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def instruction_for(task: str) -> str:
    """The full instruction: the audio placeholder, a space, then the task's question."""
    return f"{AUDIO_PLACEHOLDER} {get_task(task).question}"
