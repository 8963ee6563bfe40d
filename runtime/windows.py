"""Cut a stream of audio blocks into fixed-length windows, across block boundaries.

`iter_windows` takes blocks of any sizes (for example from `runtime.audio.stream_audio`) and
yields the same windows that cutting the whole recording at once would give, holding at
most about one window plus one block in memory. Every window has exactly the window's
length of samples; `end_s` is where the real audio ends (before any zero padding).

Policies for the part after the last full window (`WindowSpec.last`):

- ``"pad"``: one more window starting on the hop grid, zero-padded at the end; a recording
  shorter than one window gives one padded window.
- ``"drop"``: no window for the tail; a recording shorter than one window gives none.
- ``"shift"``: one more full window ending at the last sample (off the hop grid); a
  recording shorter than one window gives one padded window, as under "pad".

    >>> import numpy as np
    >>> audio = np.arange(25, dtype=np.float32)
    >>> spec = WindowSpec(window_s=1.0, hop_s=1.0, last="pad")
    >>> [(w.start_s, w.end_s) for w in iter_windows([audio[:7], audio[7:]], 10, spec)]
    [(0.0, 1.0), (1.0, 2.0), (2.0, 2.5)]
    >>> window_preset("naturelm")
    WindowSpec(window_s=10.0, hop_s=10.0, last='pad')
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

LastPolicy = Literal["pad", "drop", "shift"]
LAST_POLICIES: tuple[str, ...] = ("pad", "drop", "shift")


@dataclass(frozen=True)
class WindowSpec:
    """Window length and hop in seconds (hop < window overlaps, hop > window skips audio)."""

    window_s: float = 10.0
    hop_s: float = 10.0
    last: LastPolicy = "pad"

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError(f"window_s must be positive, got {self.window_s}")
        if not self.hop_s > 0:
            raise ValueError(f"hop_s must be positive, got {self.hop_s}")
        if self.last not in LAST_POLICIES:
            raise ValueError(f"unknown last-window policy {self.last!r}; "
                             f"choose one of {', '.join(LAST_POLICIES)}")

    def frames(self, rate: int) -> tuple[int, int]:
        """Window and hop in samples at `rate` (each at least one sample)."""
        if rate <= 0:
            raise ValueError(f"rate must be a positive number of Hz, got {rate}")
        return max(1, round(self.window_s * rate)), max(1, round(self.hop_s * rate))


PRESETS: dict[str, WindowSpec] = {
    # NatureLM-audio sees exactly 10 s per call, zero-padded.
    "naturelm": WindowSpec(window_s=10.0, hop_s=10.0, last="pad"),
    "naturelm-overlap": WindowSpec(window_s=10.0, hop_s=5.0, last="pad"),
    # BirdNET-style 3 s chunks, for comparisons with the field peer.
    "birdnet": WindowSpec(window_s=3.0, hop_s=3.0, last="pad"),
}


def window_preset(name: str) -> WindowSpec:
    """The named window spec; unknown names raise and list the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown window preset {name!r}; known: {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class Window:
    """One window: `samples` has exactly the window length; `end_s` is the real end."""

    index: int
    start_s: float
    end_s: float
    samples: np.ndarray


class _Buffer:
    """The samples from absolute position `start` on, kept as pending blocks until needed."""

    def __init__(self) -> None:
        self.start = 0
        self.total = 0
        self._head = np.zeros(0, dtype=np.float32)
        self._pending: list[np.ndarray] = []

    def append(self, block: np.ndarray) -> None:
        self._pending.append(block)
        self.total += len(block)

    def take(self, begin: int, length: int) -> np.ndarray:
        """A copy of samples [begin, begin + length), zero-padded past the end of the data."""
        if self._pending:
            self._head = np.concatenate([self._head, *self._pending])
            self._pending = []
        lo = begin - self.start
        part = self._head[lo : lo + length]
        if len(part) == length:
            return part.copy()
        out = np.zeros(length, dtype=np.float32)
        out[: len(part)] = part
        return out

    def drop_before(self, position: int) -> None:
        """Forget samples before absolute `position` (clamped to what has arrived)."""
        position = min(position, self.total)
        if position <= self.start:
            return
        cut = position - self.start
        while cut and len(self._head) <= cut and self._pending:
            cut -= len(self._head)
            self._head = self._pending.pop(0)
        # a view, not a copy: what it keeps alive is at most a window and a block
        self._head = self._head[cut:] if cut <= len(self._head) else self._head[:0]
        self.start = position


def iter_windows(
    blocks: Iterable[np.ndarray], rate: int, spec: WindowSpec, origin_s: float = 0.0,
) -> Iterator[Window]:
    """Yield the windows of the concatenated `blocks` (1-D, any sizes) under `spec`.

    `origin_s` is added to every time (the stream's offset into its recording).
    """
    size, hop = spec.frames(rate)
    buf = _Buffer()
    start = 0  # next window start on the hop grid
    last_end = 0  # end (exclusive) of the last full window emitted
    index = 0
    for raw in blocks:
        block = np.asarray(raw, dtype=np.float32)
        if block.ndim != 1:
            raise ValueError(f"blocks must be 1-D mono arrays, got shape {block.shape}")
        buf.append(block)
        while start + size <= buf.total:
            yield _window(index, buf.take(start, size), start, start + size, rate, origin_s)
            index += 1
            last_end = start + size
            start += hop
        keep_from = min(start, buf.total - size) if spec.last == "shift" else start
        buf.drop_before(keep_from)
    total = buf.total
    if spec.last == "drop" or total == 0 or last_end >= total or start >= total:
        return
    if spec.last == "shift" and total >= size:
        start = total - size
    yield _window(index, buf.take(start, size), start, total, rate, origin_s)


def _window(index: int, samples: np.ndarray, begin: int, end: int, rate: int,
            origin_s: float) -> Window:
    return Window(index=index, start_s=origin_s + begin / rate, end_s=origin_s + end / rate,
                  samples=samples)
