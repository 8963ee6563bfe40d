"""Train / valid / test splits by recording, never by window.

Every clip cut from one recording (`Record.group`: the recording, else the file, else the id)
lands in the same split, so no recording leaks from training into evaluation. Groups are
shuffled with a seeded generator and dealt out one by one, each to the split furthest below
its share of the *records*; the same records and seed always give the same splits.

    >>> from corpus.tasks import instruction_for
    >>> records = [Record(id=f"r{i}w{j}", task="species", instruction=instruction_for("species"),
    ...                   output="Kea", recording=f"r{i}") for i in range(20) for j in range(3)]
    >>> split = assign_splits(records, fractions=(0.8, 0.1, 0.1), seed=0)
    >>> sorted(split_counts(split).items())
    [('test', 6), ('train', 48), ('valid', 6)]
    >>> len({r.split for r in split if r.recording == "r7"})
    1
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from corpus.records import SPLITS, Record

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, valid, test) fractions: three numbers >= 0 that sum to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLITS):
        raise ValueError(f"give one fraction per split ({', '.join(SPLITS)}), got {list(values)}")
    if any(not math.isfinite(f) or f < 0 for f in values):
        raise ValueError(f"split fractions must be finite and >= 0, got {list(values)}")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must sum to 1, got {list(values)} "
                         f"(sum {sum(values):.6g})")
    return values[0], values[1], values[2]


def assign_splits(records: Sequence[Record], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  seed: int = 0) -> list[Record]:
    """Copies of `records` (same order) with `split` set so that no group crosses splits.

    Args:
        records: the records to split; their existing `split` is ignored.
        fractions: share of records for train, valid and test (sum 1).
        seed: seeds the shuffle of the groups; same records and seed, same splits.
    """
    targets = check_fractions(fractions)
    sizes = Counter(r.group for r in records)
    split_of = _deal_groups(sizes, targets, seed)
    return [dataclasses.replace(r, split=split_of[r.group]) for r in records]


def _deal_groups(sizes: Counter[str], targets: tuple[float, float, float],
                 seed: int) -> dict[str, str]:
    """Shuffle the groups, then give each to the open split furthest below its target count."""
    names = sorted(sizes)
    order = np.random.default_rng(seed).permutation(len(names))
    total = sum(sizes.values())
    wanted = [fraction * total for fraction in targets]
    held = [0] * len(targets)
    open_splits = [i for i, fraction in enumerate(targets) if fraction > 0]
    split_of: dict[str, str] = {}
    for index in order:
        name = names[int(index)]
        chosen = max(open_splits, key=lambda i: (wanted[i] - held[i], -i))
        split_of[name] = SPLITS[chosen]
        held[chosen] += sizes[name]
    return split_of


def split_counts(records: Sequence[Record]) -> dict[str, int]:
    """How many records each split holds."""
    return dict(Counter(r.split for r in records))


def leaking_groups(records: Sequence[Record]) -> dict[str, set[str]]:
    """Groups found in more than one split, with the splits they are in (empty when clean)."""
    seen: dict[str, set[str]] = {}
    for record in records:
        seen.setdefault(record.group, set()).add(record.split)
    return {group: splits for group, splits in seen.items() if len(splits) > 1}
