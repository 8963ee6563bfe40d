"""runtime.windows: windows across block boundaries equal windows of the whole array."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime.audio import read_audio, stream_audio
from runtime.windows import (
    PRESETS,
    Window,
    WindowSpec,
    iter_windows,
    window_preset,
)


def _reference(x: np.ndarray, rate: int, spec: WindowSpec) -> list[tuple[float, float, np.ndarray]]:
    """Windows of the whole array straight from the policy definitions in the module docstring."""
    size, hop = spec.frames(rate)
    spans: list[tuple[int, int]] = []
    start = 0
    while start + size <= len(x):
        spans.append((start, start + size))
        start += hop
    covered = spans[-1][1] if spans else 0
    if spec.last != "drop" and covered < len(x) and start < len(x):
        begin = len(x) - size if spec.last == "shift" and len(x) >= size else start
        spans.append((begin, len(x)))
    out = []
    for begin, end in spans:
        samples = np.zeros(size, dtype=np.float32)
        part = x[begin : begin + size]
        samples[: len(part)] = part
        out.append((begin / rate, end / rate, samples))
    return out


def _split(x: np.ndarray, sizes: list[int]) -> Iterator[np.ndarray]:
    """Cut `x` into consecutive blocks whose sizes cycle through `sizes`."""
    at = 0
    for size in itertools.cycle(sizes):
        if at >= len(x):
            return
        yield x[at : at + size]
        at += size


def _same(windows: list[Window], reference: list[tuple[float, float, np.ndarray]]) -> None:
    assert len(windows) == len(reference)
    for i, (window, (start, end, samples)) in enumerate(zip(windows, reference, strict=True)):
        assert window.index == i
        assert (window.start_s, window.end_s) == (start, end)
        assert window.samples.dtype == np.float32
        assert np.array_equal(window.samples, samples)


SPECS = [
    WindowSpec(1.0, 1.0, "pad"),
    WindowSpec(1.0, 0.5, "pad"),
    WindowSpec(1.0, 0.3, "shift"),
    WindowSpec(1.0, 1.0, "shift"),
    WindowSpec(1.0, 0.25, "drop"),
    WindowSpec(0.5, 1.7, "pad"),  # hop longer than the window: gaps between windows
    WindowSpec(0.5, 1.7, "shift"),
    WindowSpec(3.0, 3.0, "pad"),  # longer than some recordings below
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.window_s}-{s.hop_s}-{s.last}")
@pytest.mark.parametrize("length", [1, 57, 100, 150, 249, 250, 251, 1013])
def test_blocks_of_any_size_give_the_whole_array_windows(spec: WindowSpec, length: int) -> None:
    rate = 100
    x = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    reference = _reference(x, rate, spec)
    _same(list(iter_windows([x], rate, spec)), reference)
    for sizes in ([1], [7], [99, 1, 250], [3, 400], [100000]):
        _same(list(iter_windows(_split(x, sizes), rate, spec)), reference)


def test_pad_drop_shift_on_a_worked_example() -> None:
    x = np.arange(1, 24, dtype=np.float32)  # 23 samples at 10 Hz: 2.3 s
    times = {last: [(w.start_s, w.end_s) for w in iter_windows([x], 10, WindowSpec(1.0, 0.5, last))]
             for last in ("pad", "drop", "shift")}
    assert times["drop"] == [(0.0, 1.0), (0.5, 1.5), (1.0, 2.0)]
    assert times["pad"] == times["drop"] + [(1.5, 2.3)]
    assert times["shift"] == times["drop"] + [(1.3, 2.3)]
    padded = list(iter_windows([x], 10, WindowSpec(1.0, 0.5, "pad")))[-1].samples
    assert padded.tolist() == list(range(16, 24)) + [0.0, 0.0]
    shifted = list(iter_windows([x], 10, WindowSpec(1.0, 0.5, "shift")))[-1].samples
    assert shifted.tolist() == list(range(14, 24))


def test_exact_fit_gives_no_extra_window() -> None:
    x = np.ones(30, dtype=np.float32)
    for last in ("pad", "drop", "shift"):
        ends = [w.end_s for w in iter_windows([x], 10, WindowSpec(1.0, 0.5, last))]
        assert ends == [1.0, 1.5, 2.0, 2.5, 3.0]


def test_recording_shorter_than_one_window() -> None:
    x = np.full(7, 0.5, dtype=np.float32)
    pad = list(iter_windows([x[:3], x[3:]], 10, WindowSpec(1.0, 1.0, "pad")))
    assert len(pad) == 1 and (pad[0].start_s, pad[0].end_s) == (0.0, 0.7)
    assert pad[0].samples.tolist() == [0.5] * 7 + [0.0] * 3
    shift = list(iter_windows([x], 10, WindowSpec(1.0, 1.0, "shift")))
    assert [(w.start_s, w.end_s) for w in shift] == [(0.0, 0.7)]
    assert list(iter_windows([x], 10, WindowSpec(1.0, 1.0, "drop"))) == []
    assert list(iter_windows([], 10, WindowSpec(1.0, 1.0, "pad"))) == []


def test_origin_shifts_every_time() -> None:
    x = np.zeros(25, dtype=np.float32)
    windows = list(iter_windows([x], 10, WindowSpec(1.0, 1.0), origin_s=3600.0))
    assert [(w.start_s, w.end_s) for w in windows] == [(3600.0, 3601.0), (3601.0, 3602.0),
                                                       (3602.0, 3602.5)]


def test_windows_come_out_before_the_stream_ends() -> None:
    def endless() -> Iterator[np.ndarray]:
        n = 0
        while True:
            yield np.full(13, n, dtype=np.float32)
            n += 1

    first = list(itertools.islice(iter_windows(endless(), 10, WindowSpec(2.0, 2.0)), 5))
    assert [w.start_s for w in first] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert first[1].samples.tolist() == [1.0] * 6 + [2.0] * 13 + [3.0]


def test_windows_do_not_share_memory_with_the_blocks() -> None:
    block = np.arange(20, dtype=np.float32)
    window = next(iter_windows([block], 10, WindowSpec(1.0, 1.0)))
    block[:] = -1
    assert window.samples.tolist() == list(range(10))


def test_streamed_recording_windows_equal_whole_recording_windows(real_recording: Path) -> None:
    spec = WindowSpec(window_s=3.0, hop_s=1.5, last="pad")
    whole = read_audio(real_recording, 16000)
    reference = _reference(whole, 16000, spec)
    assert len(reference) == 6 and reference[-1][1] == len(whole) / 16000
    for block_s in (0.07, 1.0, 2.9):
        _same(list(iter_windows(stream_audio(real_recording, 16000, block_s=block_s), 16000,
                                spec)), reference)


def test_spec_validation_and_presets() -> None:
    assert WindowSpec().frames(16000) == (160000, 160000)
    assert window_preset("naturelm") == WindowSpec(10.0, 10.0, "pad")
    assert set(PRESETS) >= {"naturelm", "naturelm-overlap", "birdnet"}
    with pytest.raises(ValueError, match="unknown window preset 'beats'; known: naturelm"):
        window_preset("beats")
    with pytest.raises(ValueError, match="last-window policy 'keep'"):
        WindowSpec(1.0, 1.0, "keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window_s"):
        WindowSpec(0.0, 1.0)
    with pytest.raises(ValueError, match="hop_s"):
        WindowSpec(1.0, -1.0)
    with pytest.raises(ValueError, match="1-D"):
        list(iter_windows([np.zeros((4, 2), dtype=np.float32)], 10, WindowSpec()))
