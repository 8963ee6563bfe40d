"""The embedded default: a deterministic synthetic chorus of 24 made-up species.

Every species is a parametric call model: a frequency band (six overlapping bands, four species
each) and a call shape. Within a band the species come in time-reversal pairs (upsweep /
downsweep, ascending / descending steps, up- / down-chirp pulse trains, fast / slow trills, fast
/ slow buzzes, arch / dip) that share band, harmonics and loudness, so a clip's *mean* spectrum
says little about which species calls; sweep direction, note order, pulse and trill rate and
song rhythm (what a model that sees time learns) tell them apart. Individuals vary (band,
bandwidth, tempo, harmonic strength); juveniles call higher, shorter and with vibrato; songs are
bouts of elements at the species' rhythm, calls are isolated short elements, alarms are rapid
runs of shorter, noisy elements. Backgrounds mix coloured noise, wind, rain-like impulses and a
distant chorus of non-target species at a range of levels and SNRs.

`generate(config, out)` writes (all deterministic by seed, same seed same bytes)::

    out/clips/clip000000.flac ...     10 s clips, 16-bit FLAC, 0 to 3 species each
    out/manifest.jsonl                one record per clip and applicable task
    out/soundscape.flac               a long soundscape (default 10 minutes)
    out/soundscape.selections.txt     its ground truth as a Raven selection table
    out/synth.json                    the SynthConfig, the species catalogue and a summary

Clips are grouped into recordings (sessions sharing a site and its animals) and splits are
assigned by recording (80/10/10), so no animal or site leaks from train into test.

Every clip draws from its own random stream (seed, clip index), so ``generate(config, out,
workers=N)`` renders chunks of clips, and the soundscape beside them, in N worker processes and
writes the same bytes as ``workers=1``; ``workers=0`` picks `default_workers` (one per core, none
for a small corpus). The worker count is not part of the config, so it never changes synth.json.

    >>> import tempfile, pathlib
    >>> cfg = SynthConfig(seed=1, clips=6, clip_s=2.0, clips_per_recording=2,
    ...                   soundscape_min=0.1)
    >>> summary = generate(cfg, pathlib.Path(tempfile.mkdtemp()) / "chorus")
    >>> summary.clips, sorted(summary.split_clips)
    (6, ['test', 'train', 'valid'])
    >>> len(species_catalogue())
    24
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from corpus.manifest import write_manifest
from corpus.records import SPLITS, Record
from corpus.tasks import TASKS, instruction_for
from runtime.errors import InputError
from runtime.files import atomic_write_text
from runtime.raven import Selection, write_raven_table

DATASET_NAME = "synthetic-chorus"
LIFESTAGES = ("adult", "juvenile")
CALLTYPES = ("song", "call", "alarm")
SYNTH_VERSION = 1

# Six overlapping bands (Hz) of the adult fundamental; each holds four species.
BANDS_HZ: tuple[tuple[float, float], ...] = (
    (700.0, 1400.0), (1100.0, 2200.0), (1700.0, 3300.0),
    (2500.0, 4300.0), (3300.0, 5400.0), (4300.0, 6500.0),
)
# Pair families: both members share band, harmonics, element length and loudness.
FAMILIES: dict[str, tuple[str, str]] = {
    "sweep": ("upsweep", "downsweep"),
    "steps": ("steps-up", "steps-down"),
    "pulses": ("pulses-up", "pulses-down"),
    "trill": ("trill-fast", "trill-slow"),
    "buzz": ("buzz-fast", "buzz-slow"),
    "arch": ("arch", "dip"),
}
_FAMILY_ORDER = ("sweep", "steps", "pulses", "trill", "buzz", "arch")
SHAPES = tuple(shape for pair in FAMILIES.values() for shape in pair)

SPECIES_NAMES = (
    "Amber Reedhopper", "Dusky Fenwarbler", "Copper Thicket-dove", "Slate-throated Tinkerbird",
    "Moss Wren", "Pale Creekrunner", "Ochre Sedgefinch", "Whistling Ridge-quail",
    "Cinder Flycatcher", "Lantern Treefrog", "Gilded Canopy-tit", "Marbled Nightjar",
    "Hollow-voiced Cuckoo", "Silver Brook-pipit", "Rufous Scrub-robin", "Tawny Bellbird",
    "Spotted Cane-cricket", "Ivory-browed Sunbird", "Banded Heath-lark", "Chestnut Reed-katydid",
    "Misty Hillstar", "Saffron Leafgleaner", "Sooty Ground-chat", "Azure Chorus-frog",
)
# The catalogue's own parameters never depend on the user's seed: the label set is fixed.
_CATALOGUE_SEED = 2411_07186

# Stream tags for numpy SeedSequence entropy: one independent stream per purpose and index.
_PLAN, _SESSION, _ANIMAL, _CLIP, _SOUNDSCAPE = 1, 2, 3, 4, 5

# workers=0 (automatic): at most this many processes, and one per this much audio to render.
MAX_AUTO_WORKERS = 8
AUDIO_S_PER_WORKER = 300.0
_CHUNK_MAX = 50

JUVENILE_PITCH = 1.18
JUVENILE_TEMPO = 0.8
_EDGE_S = 0.008


class SynthError(RuntimeError):
    """Rendering or writing part of the corpus failed, in this process or in a worker; the
    message names the file and the cause (one string argument, so it crosses processes)."""


@dataclass(frozen=True)
class SpeciesSpec:
    """One species' call model (adult, before individual variation).

    Args:
        name: common name (the label).
        shape: one of `SHAPES`.
        band_hz: low and high frequency of the fundamental.
        harmonics: number of harmonics (1 = pure).
        element_s: length of one song element.
        rate_hz: pulse, trill or buzz modulation rate (shapes that use one).
        gap_s: silence between song elements (the species' rhythm).
    """

    name: str
    shape: str
    band_hz: tuple[float, float]
    harmonics: int
    element_s: float
    rate_hz: float
    gap_s: float


@functools.lru_cache(maxsize=1)
def species_catalogue() -> tuple[SpeciesSpec, ...]:
    """The 24 species, ordered so that the first six lie in six different bands (immutable,
    built once)."""
    rng = np.random.default_rng(_CATALOGUE_SEED)
    specs: list[SpeciesSpec] = []
    for slot in range(2):
        for band in range(len(BANDS_HZ)):
            family = _FAMILY_ORDER[(band + 3 * slot) % len(_FAMILY_ORDER)]
            specs.extend(_pair(family, band, rng))
    order = [2 * k for k in range(12)] + [2 * k + 1 for k in range(12)]
    return tuple(SpeciesSpec(SPECIES_NAMES[i], *_fields(specs[j])) for i, j in enumerate(order))


def _fields(spec: SpeciesSpec) -> tuple:
    return (spec.shape, spec.band_hz, spec.harmonics, spec.element_s, spec.rate_hz, spec.gap_s)


def _pair(family: str, band: int, rng: np.random.Generator) -> list[SpeciesSpec]:
    """Two species of one family in one band; they differ only in shape and rhythm."""
    harmonics = int(rng.integers(1, 3))
    # Rate-based shapes get elements long enough for about three cycles of the slow member.
    element_s = float(rng.uniform(0.3, 0.45) if family in ("pulses", "trill", "buzz")
                      else rng.uniform(0.16, 0.3))
    rates = {"pulses": (rng.uniform(11, 16),) * 2, "trill": (rng.uniform(28, 36),
             rng.uniform(9, 13)), "buzz": (rng.uniform(55, 75), rng.uniform(16, 24))}
    pair_rates = rates.get(family, (0.0, 0.0))
    gaps = rng.uniform(0.05, 0.25, size=2)
    return [SpeciesSpec("", shape, BANDS_HZ[band], harmonics, round(element_s, 4),
                        round(float(rate), 3), round(float(gap), 4))
            for shape, rate, gap in zip(FAMILIES[family], pair_rates, gaps, strict=True)]


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic corpus; stored in the output as synth.json.

    Args:
        seed: the only source of randomness (numpy Generator streams derived from it).
        clips: number of clips.
        clip_s: clip length in seconds (NatureLM sees exactly 10 s).
        sample_rate: output rate, at least 16 kHz.
        species: how many catalogue species to use (the first ones span all six bands).
        clips_per_recording: clips per recording session; splits keep sessions whole.
        split_fractions: train, valid and test shares of the recordings.
        species_per_clip_weights: relative frequency of clips with 0, 1, 2, 3 species.
        focal_snr_db: range of the focal animal's SNR (call power over background power).
        distractor_drop_db: how much quieter than the focal animal the other species are.
        background_dbfs: range of the background level (RMS, dB full scale).
        soundscape_min: length of the long soundscape in minutes (0 writes none).
        soundscape_calls_per_min: mean number of vocalisation bouts per minute in it.
    """

    seed: int = 0
    clips: int = 4800
    clip_s: float = 10.0
    sample_rate: int = 16000
    species: int = 24
    clips_per_recording: int = 10
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    species_per_clip_weights: tuple[float, ...] = (0.08, 0.42, 0.3, 0.2)
    focal_snr_db: tuple[float, float] = (3.0, 22.0)
    distractor_drop_db: tuple[float, float] = (6.0, 16.0)
    background_dbfs: tuple[float, float] = (-60.0, -45.0)
    soundscape_min: float = 10.0
    soundscape_calls_per_min: float = 24.0

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.clips < 1:
            raise ValueError(f"clips must be at least 1, got {self.clips}")
        if self.clip_s <= 0.5:
            raise ValueError(f"clip_s must be more than 0.5 s, got {self.clip_s}")
        if self.sample_rate < 16000:
            raise ValueError(f"sample_rate must be at least 16000 Hz, got {self.sample_rate}")
        if not 2 <= self.species <= len(SPECIES_NAMES):
            raise ValueError(f"species must be 2..{len(SPECIES_NAMES)}, got {self.species}")
        if self.clips_per_recording < 1:
            raise ValueError("clips_per_recording must be at least 1")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0:
            raise ValueError(f"split_fractions must be three shares, got {self.split_fractions}")
        weights = self.species_per_clip_weights
        if len(weights) < 2 or min(weights) < 0 or sum(weights[1:]) <= 0:
            raise ValueError(f"species_per_clip_weights needs clips with species, got {weights}")
        if len(weights) - 1 > self.species:
            raise ValueError(f"up to {len(weights) - 1} species per clip needs at least as many "
                             f"species, got {self.species}")
        for name in ("focal_snr_db", "distractor_drop_db", "background_dbfs"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (low, high), got {(low, high)}")
        if self.soundscape_min < 0:
            raise ValueError(f"soundscape_min must be >= 0, got {self.soundscape_min}")

    @property
    def max_species(self) -> int:
        """The most species one clip holds."""
        return len(self.species_per_clip_weights) - 1

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SynthConfig:
        """Inverse of `to_dict` (lists back to tuples); unknown keys raise."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SynthConfig field(s): {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def label_sets(config: SynthConfig) -> dict[str, tuple[str, ...]]:
    """Each task's whole label set for a corpus made with ``config``."""
    names = tuple(spec.name for spec in species_catalogue()[: config.species])
    return {
        "species": names,
        "detection": (*names, "None"),
        "lifestage": LIFESTAGES,
        "calltype": CALLTYPES,
        "count": tuple(str(k) for k in range(config.max_species + 1)),
    }


# ----------------------------------------------------------------------------- call rendering

@dataclass(frozen=True)
class Animal:
    """An individual of a species in one recording session: its personal call parameters."""

    spec: SpeciesSpec
    pitch: float
    bandwidth: float
    tempo: float
    rate: float
    gap: float
    harmonic_gain: float
    vibrato_hz: float


def draw_animal(spec: SpeciesSpec, rng: np.random.Generator) -> Animal:
    """Individual variation around the species' call model."""
    return Animal(spec, pitch=float(rng.uniform(0.94, 1.06)),
                  bandwidth=float(rng.uniform(0.85, 1.15)), tempo=float(rng.uniform(0.88, 1.12)),
                  rate=float(rng.uniform(0.92, 1.08)), gap=float(rng.uniform(0.85, 1.15)),
                  harmonic_gain=float(rng.uniform(0.3, 0.6)), vibrato_hz=float(rng.uniform(6, 9)))


def call_band(animal: Animal, lifestage: str) -> tuple[float, float]:
    """The fundamental's band for this animal at this life stage."""
    low, high = animal.spec.band_hz
    centre = math.sqrt(low * high) * animal.pitch
    half = math.sqrt(high / low) ** animal.bandwidth
    shift = JUVENILE_PITCH if lifestage == "juvenile" else 1.0
    return centre * shift / half, centre * shift * half


def render_element(shape: str, band: tuple[float, float], dur_s: float, rate_hz: float,
                   sample_rate: int, harmonics: int = 1, harmonic_gain: float = 0.4,
                   vibrato: tuple[float, float] = (0.0, 0.0), noisy: float = 0.0,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """One call element as float64 samples, peak about 1.

    Args:
        shape: one of `SHAPES`, or "warble" / "whistle" (the distant, non-target chorus).
        band: low and high frequency of the fundamental in Hz.
        dur_s: element length.
        rate_hz: pulse, trill or buzz rate for the shapes that use one.
        sample_rate: output rate.
        harmonics: number of harmonics (those above 0.95 Nyquist are dropped).
        harmonic_gain: amplitude ratio between successive harmonics.
        vibrato: (rate Hz, relative depth) of a frequency vibrato (juveniles).
        noisy: share of band noise mixed in (alarms).
        rng: needed by buzzes, warbles and noisy elements.
    """
    n = max(int(round(dur_s * sample_rate)), 8)
    t = np.arange(n) / sample_rate
    u = t / (n / sample_rate)
    low, high = band
    nyquist = sample_rate / 2
    if shape.startswith("buzz"):
        out = _band_noise(n, sample_rate, band, _need(rng, shape))
        out *= 0.55 + 0.45 * np.cos(2 * np.pi * rate_hz * t)
    else:
        freq, gate = _frequency_track(shape, low, high, u, t, rate_hz, rng)
        if vibrato[1] > 0:
            freq = freq * (1 + vibrato[1] * np.sin(2 * np.pi * vibrato[0] * t))
        freq = np.minimum(freq, 0.97 * nyquist)
        phase = 2 * np.pi * np.cumsum(freq) / sample_rate
        top = float(freq.max())
        out = np.zeros(n)
        for k in range(1, harmonics + 1):
            if k * top < 0.95 * nyquist:
                out += harmonic_gain ** (k - 1) * np.sin(k * phase)
        out *= gate
    if noisy > 0:
        out = (1 - noisy) * out + noisy * _band_noise(
            n, sample_rate, (low * 0.6, min(high * 1.5, 0.95 * nyquist)), _need(rng, "noisy"))
    return out * _edges(n, sample_rate)


def _need(rng: np.random.Generator | None, what: str) -> np.random.Generator:
    if rng is None:
        raise ValueError(f"rendering {what!r} needs a random generator")
    return rng


def _frequency_track(shape: str, low: float, high: float, u: np.ndarray, t: np.ndarray,
                     rate: float, rng: np.random.Generator | None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Instantaneous frequency and amplitude gate of the tonal shapes."""
    width = high - low
    gate = np.ones_like(u)
    if shape == "upsweep":
        return low + width * u, gate
    if shape == "downsweep":
        return high - width * u, gate
    if shape in ("arch", "dip"):
        bend = np.sin(np.pi * u)
        return (low + width * bend, gate) if shape == "arch" else (high - width * bend, gate)
    if shape in ("steps-up", "steps-down"):
        notes = np.array([low + 0.12 * width, low + 0.5 * width, high - 0.12 * width])
        if shape == "steps-down":
            notes = notes[::-1]
        position = u * 3
        index = np.minimum(position.astype(int), 2)
        frac = position - index
        gate = np.clip(np.minimum(frac, 0.78 - frac) / 0.05, 0, 1)
        return notes[index], gate
    if shape in ("pulses-up", "pulses-down"):
        cycle = (t * rate) % 1.0
        within = np.clip(cycle / 0.55, 0, 1)
        gate = np.where(cycle < 0.55, np.sin(np.pi * within) ** 2, 0.0)
        sweep = low + width * within if shape == "pulses-up" else high - width * within
        return sweep, gate
    if shape.startswith("trill"):
        return low + width * (0.5 + 0.5 * np.sin(2 * np.pi * rate * t)), gate
    if shape == "warble":
        g = _need(rng, shape)
        rates, phases = g.uniform(2, 7, size=3), g.uniform(0, 2 * np.pi, size=3)
        wander = np.sin(2 * np.pi * rates[:, None] * t[None, :] + phases[:, None]).mean(axis=0)
        return low + width * (0.5 + 0.5 * wander), gate
    if shape == "whistle":
        return low + width * 0.15 * u, gate
    raise ValueError(f"unknown call shape {shape!r}; known: {', '.join(SHAPES)}")


def _band_noise(n: int, sample_rate: int, band: tuple[float, float],
                rng: np.random.Generator) -> np.ndarray:
    """White noise limited to ``band`` (brick-wall in the FFT), peak about 1."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sample_rate)
    spectrum[(freqs < band[0]) | (freqs > band[1])] = 0
    out = np.fft.irfft(spectrum, n)
    return out / (3 * (out.std() + 1e-12))


def _edges(n: int, sample_rate: int) -> np.ndarray:
    """Raised-cosine fade in and out so elements never click."""
    ramp = min(int(_EDGE_S * sample_rate), n // 2)
    env = np.ones(n)
    if ramp > 0:
        rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        env[:ramp] = rise
        env[n - ramp:] = rise[::-1]
    return env


@dataclass(frozen=True)
class Bout:
    """One vocalisation bout: element onsets and lengths relative to the clip, in seconds."""

    onsets: tuple[float, ...]
    lengths: tuple[float, ...]

    @property
    def begin_s(self) -> float:
        return self.onsets[0]

    @property
    def end_s(self) -> float:
        return self.onsets[-1] + self.lengths[-1]


def schedule_bouts(animal: Animal, lifestage: str, calltype: str, span_s: float,
                   rng: np.random.Generator) -> list[Bout]:
    """When the animal calls within ``span_s`` seconds; always at least one element."""
    if calltype not in CALLTYPES:
        raise ValueError(f"unknown call type {calltype!r}; known: {', '.join(CALLTYPES)}")
    tempo = animal.tempo * (JUVENILE_TEMPO if lifestage == "juvenile" else 1.0)
    element = animal.spec.element_s * tempo
    max_bouts = int(rng.integers(2, 7)) if calltype == "call" else int(rng.integers(1, 4))
    cursor = float(rng.uniform(0.0, min(1.5, 0.2 * span_s)))
    bouts: list[Bout] = []
    while len(bouts) < max_bouts:
        lengths, gaps = _bout_elements(animal, calltype, element, rng)
        onsets = cursor + np.concatenate([[0.0], np.cumsum(lengths[:-1] + gaps[:-1])])
        fits = onsets + lengths <= span_s
        if not fits.all():
            if not bouts:
                keep = max(int(fits.sum()), 1)
                onsets, lengths = onsets[:keep], np.minimum(lengths[:keep], span_s - onsets[:keep])
                bouts.append(Bout(tuple(onsets.tolist()), tuple(lengths.tolist())))
            break
        bouts.append(Bout(tuple(onsets.tolist()), tuple(lengths.tolist())))
        pause = {"song": (1.0, 3.0), "call": (0.5, 2.0), "alarm": (0.8, 2.5)}[calltype]
        cursor = bouts[-1].end_s + float(rng.uniform(*pause))
    return bouts


def _bout_elements(animal: Animal, calltype: str, element: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Element lengths and the gaps after each, for one bout of this call type."""
    if calltype == "song":
        count = int(rng.integers(4, 8))
        lengths = element * rng.uniform(0.93, 1.07, size=count)
        gaps = animal.spec.gap_s * animal.gap * rng.uniform(0.9, 1.1, size=count)
    elif calltype == "call":
        count = 1
        lengths = element * 0.6 * rng.uniform(0.93, 1.07, size=count)
        gaps = np.zeros(count)
    else:
        count = int(rng.integers(6, 11))
        lengths = element * 0.5 * rng.uniform(0.9, 1.1, size=count)
        gaps = rng.uniform(0.03, 0.05, size=count)
    return lengths, gaps


def render_animal(animal: Animal, lifestage: str, calltype: str, bouts: Sequence[Bout],
                  n: int, sample_rate: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The animal's track over ``n`` samples, and a mask of where it sounds."""
    track = np.zeros(n)
    mask = np.zeros(n, dtype=bool)
    band = call_band(animal, lifestage)
    juvenile = lifestage == "juvenile"
    vibrato = (animal.vibrato_hz, 0.035) if juvenile else (0.0, 0.0)
    harmonics = animal.spec.harmonics + (1 if calltype == "alarm" else 0)
    noisy = 0.3 if calltype == "alarm" else 0.0
    for bout in bouts:
        for onset, length in zip(bout.onsets, bout.lengths, strict=True):
            jitter = float(rng.uniform(0.98, 1.02))
            element = render_element(
                animal.spec.shape, (band[0] * jitter, band[1] * jitter), length,
                animal.spec.rate_hz * animal.rate, sample_rate, harmonics,
                animal.harmonic_gain, vibrato, noisy, rng)
            start = int(round(onset * sample_rate))
            stop = min(start + element.size, n)
            track[start:stop] += element[: stop - start]
            mask[start:stop] = True
    return track, mask


def box_band(animal: Animal, lifestage: str, calltype: str, sample_rate: int
             ) -> tuple[float, float]:
    """The frequency extent of the animal's calls (fundamental to the top harmonic or noise)."""
    low, high = call_band(animal, lifestage)
    if animal.spec.shape.startswith("buzz"):
        top = high
    else:
        top = high * (animal.spec.harmonics + (1 if calltype == "alarm" else 0))
    if calltype == "alarm":
        low, top = low * 0.6, max(top, high * 1.5)
    return low, min(top, 0.95 * sample_rate / 2)


# ----------------------------------------------------------------------------- backgrounds

@dataclass(frozen=True)
class Site:
    """A recording site's background: what sounds there and how loud, relative to the base."""

    colour: float
    wind: float
    wind_cutoff_hz: float
    rain_per_s: float
    rain: float
    chorus_per_s: float
    chorus: float
    chorus_cutoff_hz: float
    level_dbfs: float


def draw_site(config: SynthConfig, rng: np.random.Generator) -> Site:
    """Random site: pink-to-brown noise, maybe wind, rain and a distant chorus."""
    windy, rainy, chorus = rng.random(3) < (0.5, 0.35, 0.55)
    return Site(
        colour=float(rng.uniform(0.8, 2.0)),
        wind=float(rng.uniform(0.5, 2.5)) if windy else 0.0,
        wind_cutoff_hz=float(rng.uniform(150, 500)),
        rain_per_s=float(rng.uniform(20, 200)) if rainy else 0.0,
        rain=float(rng.uniform(0.3, 1.2)) if rainy else 0.0,
        chorus_per_s=float(rng.uniform(0.5, 2.0)) if chorus else 0.0,
        chorus=float(rng.uniform(0.3, 1.0)) if chorus else 0.0,
        chorus_cutoff_hz=float(rng.uniform(1200, 2500)),
        level_dbfs=float(rng.uniform(*config.background_dbfs)),
    )


def render_background(n: int, sample_rate: int, site: Site, rng: np.random.Generator
                      ) -> tuple[np.ndarray, list[str]]:
    """``n`` samples of the site's background at its level, and the components present."""
    freqs = np.fft.rfftfreq(n, 1 / sample_rate)
    shape = np.maximum(freqs, 20.0) ** (-site.colour / 2)
    shape[0] = 0.0
    out = _unit(np.fft.irfft(_complex_noise(freqs.size, rng) * shape, n))
    parts = [f"colour{site.colour:.1f}"]
    if site.wind > 0:
        low = _lowpass(freqs, site.wind_cutoff_hz)
        low[0] = 0.0
        gusts = _gusts(n, sample_rate, rng)
        out += site.wind * _unit(np.fft.irfft(_complex_noise(freqs.size, rng) * low, n)) * gusts
        parts.append("wind")
    if site.rain > 0:
        out += site.rain * _unit(_rain(n, sample_rate, site.rain_per_s, rng))
        parts.append("rain")
    if site.chorus > 0:
        chorus = _distant_chorus(n, sample_rate, site.chorus_per_s, rng)
        if chorus.any():
            chorus = np.fft.irfft(np.fft.rfft(chorus) * _lowpass(freqs, site.chorus_cutoff_hz), n)
            out += site.chorus * _unit(chorus)
            parts.append("chorus")
    return _unit(out) * 10 ** (site.level_dbfs / 20), parts


def _complex_noise(size: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(size) + 1j * rng.standard_normal(size)


def _unit(x: np.ndarray) -> np.ndarray:
    """Scaled to unit RMS (silence stays silence)."""
    rms = float(np.sqrt(np.mean(x * x)))
    return x / rms if rms > 0 else x


def _lowpass(freqs: np.ndarray, cutoff_hz: float) -> np.ndarray:
    """Magnitude of a 4th-order Butterworth low-pass."""
    return 1.0 / np.sqrt(1.0 + (freqs / cutoff_hz) ** 8)


def _gusts(n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A slow gust envelope between 0.15 and 1."""
    rates, phases = rng.uniform(0.05, 0.4, size=3), rng.uniform(0, 2 * np.pi, size=3)
    coarse = np.arange(0, n + 100, 100) / sample_rate
    slow = np.sin(2 * np.pi * rates[:, None] * coarse[None, :] + phases[:, None]).mean(axis=0)
    envelope = 0.15 + 0.85 * ((slow + 1) / 2) ** 2
    return np.interp(np.arange(n) / sample_rate, coarse, envelope)


def _rain(n: int, sample_rate: int, per_s: float, rng: np.random.Generator) -> np.ndarray:
    """Rain-like impulses: Poisson-timed, short decaying broadband clicks."""
    drops = int(rng.poisson(per_s * n / sample_rate))
    width = max(int(0.004 * sample_rate), 4)
    if drops == 0:
        return np.zeros(n)
    starts = rng.integers(0, max(n - width, 1), size=drops)
    decay = np.exp(-np.arange(width) / (0.0007 * sample_rate))
    values = rng.standard_normal((drops, width)) * decay * rng.lognormal(0, 0.7, (drops, 1))
    index = (starts[:, None] + np.arange(width)[None, :]).ravel()
    return np.bincount(index, weights=values.ravel(), minlength=n)[:n]


def _distant_chorus(n: int, sample_rate: int, per_s: float, rng: np.random.Generator
                    ) -> np.ndarray:
    """Calls of non-target species (warbles and whistles) at random pitches and distances."""
    out = np.zeros(n)
    for _ in range(int(rng.poisson(per_s * n / sample_rate))):
        low = float(rng.uniform(600, 4000))
        band = (low, low * float(rng.uniform(1.2, 1.8)))
        shape = "warble" if rng.random() < 0.6 else "whistle"
        element = render_element(shape, band, float(rng.uniform(0.15, 0.6)), 0.0, sample_rate,
                                 rng=rng)
        start = int(rng.integers(0, max(n - element.size, 1)))
        stop = min(start + element.size, n)
        out[start:stop] += element[: stop - start] * float(rng.uniform(0.2, 1.0))
    return out


def mix_at_snr(track: np.ndarray, mask: np.ndarray, background_rms: float,
               snr_db: float) -> np.ndarray:
    """``track`` scaled so its power where it sounds is ``snr_db`` above the background."""
    if not mask.any():
        return track
    power = float(np.mean(track[mask] ** 2))
    if power <= 0:
        return track
    return track * (background_rms * 10 ** (snr_db / 20) / math.sqrt(power))


# ----------------------------------------------------------------------------- corpus plan

@dataclass(frozen=True)
class Vocalist:
    """One animal in a clip: species index, life stage, call type, SNR."""

    species: int
    lifestage: str
    calltype: str
    snr_db: float


@dataclass(frozen=True)
class ClipPlan:
    """What one clip holds; ``vocalists[0]`` is the focal (loudest) animal when any."""

    index: int
    session: int
    split: str
    vocalists: tuple[Vocalist, ...]

    @property
    def clip_id(self) -> str:
        return f"clip{self.index:06d}"

    @property
    def recording(self) -> str:
        return f"rec{self.session:05d}"


def session_splits(config: SynthConfig) -> list[str]:
    """The split of each recording session: shuffled, then cut by the split fractions."""
    sessions = math.ceil(config.clips / config.clips_per_recording)
    total = sum(config.split_fractions)
    counts = [0, 0, 0]
    if sessions >= 3:
        for k in (1, 2):
            share = config.split_fractions[k] / total
            counts[k] = max(1, round(share * sessions)) if share > 0 else 0
    counts[0] = sessions - counts[1] - counts[2]
    labels = [split for split, count in zip(SPLITS, counts, strict=True) for _ in range(count)]
    order = np.random.default_rng([config.seed, _PLAN]).permutation(sessions)
    out = [""] * sessions
    for position, session in enumerate(order):
        out[int(session)] = labels[position]
    return out


class _Deck:
    """Draws from a multiset, reshuffled when used up: balanced labels in every split."""

    def __init__(self, items: Sequence, rng: np.random.Generator) -> None:
        self.items, self.rng, self.pile = list(items), rng, []

    def draw(self):
        if not self.pile:
            self.pile = [self.items[i] for i in self.rng.permutation(len(self.items))]
        return self.pile.pop()


def plan_clips(config: SynthConfig) -> list[ClipPlan]:
    """Every clip's contents, stratified per split so that labels stay balanced in each."""
    splits = session_splits(config)
    plans: list[ClipPlan] = []
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng([config.seed, _PLAN, split_index])
        count_deck = _Deck(_weighted_items(config.species_per_clip_weights), rng)
        focal_deck = _Deck(range(config.species), rng)
        stage_deck = _Deck(("adult", "adult", "adult", "juvenile", "juvenile"), rng)
        type_deck = _Deck(CALLTYPES, rng)
        for index in range(config.clips):
            session = index // config.clips_per_recording
            if splits[session] != split:
                continue
            vocalists = _vocalists(config, count_deck.draw(), focal_deck, stage_deck, type_deck,
                                   rng)
            plans.append(ClipPlan(index, session, split, vocalists))
    return sorted(plans, key=lambda plan: plan.index)


def _weighted_items(weights: Sequence[float], size: int = 50) -> list[int]:
    """A multiset of size ``size`` with counts proportional to ``weights`` (largest remainder)."""
    raw = np.asarray(weights, dtype=float) / float(sum(weights)) * size
    counts = np.floor(raw).astype(int)
    for k in np.argsort(-(raw - counts), kind="stable")[: size - counts.sum()]:
        counts[k] += 1
    return [k for k, c in enumerate(counts) for _ in range(c)]


def _vocalists(config: SynthConfig, count: int, focal_deck: _Deck, stage_deck: _Deck,
               type_deck: _Deck, rng: np.random.Generator) -> tuple[Vocalist, ...]:
    if count == 0:
        return ()
    focal = int(focal_deck.draw())
    focal_snr = float(rng.uniform(*config.focal_snr_db))
    out = [Vocalist(focal, stage_deck.draw(), type_deck.draw(), focal_snr)]
    others = [s for s in range(config.species) if s != focal]
    for species in rng.choice(others, size=count - 1, replace=False):
        out.append(Vocalist(int(species), LIFESTAGES[int(rng.random() < 0.4)],
                            CALLTYPES[int(rng.integers(3))],
                            focal_snr - float(rng.uniform(*config.distractor_drop_db))))
    return tuple(out)


# ----------------------------------------------------------------------------- clips

@dataclass(frozen=True)
class Call:
    """Ground truth of one bout in a clip or soundscape."""

    species: str
    lifestage: str
    calltype: str
    begin_s: float
    end_s: float
    low_hz: float
    high_hz: float
    snr_db: float
    focal: bool = False


def session_animal(config: SynthConfig, session: int, species: int) -> Animal:
    """The individual of ``species`` that sings in recording session ``session``."""
    rng = np.random.default_rng([config.seed, _ANIMAL, session, species])
    return draw_animal(species_catalogue()[species], rng)


def session_site(config: SynthConfig, session: int) -> Site:
    """The background site of recording session ``session``."""
    return draw_site(config, np.random.default_rng([config.seed, _SESSION, session]))


def render_clip(config: SynthConfig, plan: ClipPlan) -> tuple[np.ndarray, list[Call], list[str]]:
    """One clip's float samples, its ground-truth calls and background components."""
    rate = config.sample_rate
    n = int(round(config.clip_s * rate))
    rng = np.random.default_rng([config.seed, _CLIP, plan.index])
    site = session_site(config, plan.session)
    site = replace(site, level_dbfs=site.level_dbfs + float(rng.uniform(-2, 2)))
    audio, parts = render_background(n, rate, site, rng)
    background_rms = 10 ** (site.level_dbfs / 20)
    calls: list[Call] = []
    for position, voc in enumerate(plan.vocalists):
        animal = session_animal(config, plan.session, voc.species)
        bouts = schedule_bouts(animal, voc.lifestage, voc.calltype, config.clip_s, rng)
        track, mask = render_animal(animal, voc.lifestage, voc.calltype, bouts, n, rate, rng)
        audio += mix_at_snr(track, mask, background_rms, voc.snr_db)
        low, high = box_band(animal, voc.lifestage, voc.calltype, rate)
        calls.extend(Call(animal.spec.name, voc.lifestage, voc.calltype, round(b.begin_s, 4),
                          round(b.end_s, 4), round(low, 1), round(high, 1),
                          round(voc.snr_db, 2), position == 0) for b in bouts)
    return audio, calls, parts


def to_pcm16(audio: np.ndarray) -> tuple[np.ndarray, float]:
    """16-bit samples, scaled down first if the peak would clip; returns the gain applied."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    gain = 0.98 / peak if peak > 0.98 else 1.0
    pcm = np.clip(np.rint(audio * gain * 32767), -32768, 32767).astype("<i2")
    return pcm, gain


def write_flac(path: Path, audio: np.ndarray, sample_rate: int) -> float:
    """Write 16-bit FLAC (deterministic bytes); returns the anti-clipping gain applied."""
    import soundfile as sf

    pcm, gain = to_pcm16(audio)
    sf.write(str(path), pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return gain


def clip_records(config: SynthConfig, plan: ClipPlan, file_name: str,
                 calls: Sequence[Call], metadata: dict) -> list[Record]:
    """The manifest records of one clip: every task that applies to it."""
    labels = label_sets(config)
    catalogue = species_catalogue()
    present = sorted({catalogue[v.species].name for v in plan.vocalists})
    answers = {"detection": present, "count": [str(len(present))]}
    if plan.vocalists:
        focal = plan.vocalists[0]
        answers.update(species=[catalogue[focal.species].name], lifestage=[focal.lifestage],
                       calltype=[focal.calltype])
    meta = {**metadata, "calls": [asdict(c) for c in calls]}
    return [Record(id=f"{plan.clip_id}.{task}", task=task, instruction=instruction_for(task),
                   output=TASKS[task].answer(answers[task]), labels=labels[task],
                   dataset_name=DATASET_NAME, split=plan.split, file_name=file_name,
                   offset_s=0.0, duration_s=config.clip_s, sample_rate=config.sample_rate,
                   recording=plan.recording, metadata=meta)
            for task in TASKS if task in answers]


# ----------------------------------------------------------------------------- soundscape

def render_soundscape(config: SynthConfig, chunk_s: float = 20.0
                      ) -> tuple[np.ndarray, list[Call]]:
    """The long soundscape (float32) and its ground truth: bouts of random species over a
    slowly changing background built from cross-faded chunks."""
    rate = config.sample_rate
    total = int(round(config.soundscape_min * 60 * rate))
    rng = np.random.default_rng([config.seed, _SOUNDSCAPE])
    site = draw_site(config, rng)
    audio = _chunked_background(total, rate, site, chunk_s, rng)
    background_rms = 10 ** (site.level_dbfs / 20)
    animals = [draw_animal(spec, rng) for spec in species_catalogue()[: config.species]]
    calls: list[Call] = []
    cursor = float(rng.exponential(60 / max(config.soundscape_calls_per_min, 1e-9)))
    while cursor < total / rate - 0.5:
        calls.extend(_soundscape_event(config, audio, cursor, animals, background_rms, rng))
        cursor += float(rng.exponential(60 / config.soundscape_calls_per_min))
    calls.sort(key=lambda c: (c.begin_s, c.species))
    return audio, calls


def _chunked_background(total: int, rate: int, site: Site, chunk_s: float,
                        rng: np.random.Generator) -> np.ndarray:
    """Independent background chunks joined by equal-power (sine / cosine) cross-fades."""
    out = np.zeros(total, dtype=np.float32)
    fade = int(rate * 0.5)
    step = int(rate * chunk_s)
    window = np.sin(0.5 * np.pi * (np.arange(fade) + 0.5) / fade)
    for start in range(0, total, step):
        length = min(step + fade, total - start)
        chunk, _ = render_background(length, rate, site, rng)
        if start > 0:
            head = min(fade, length)
            chunk[:head] *= window[:head]
        if start + step < total:
            chunk[step:] *= window[::-1][: length - step]
        out[start:start + length] += chunk.astype(np.float32)
    return out


def _soundscape_event(config: SynthConfig, audio: np.ndarray, at_s: float,
                      animals: Sequence[Animal], background_rms: float,
                      rng: np.random.Generator) -> list[Call]:
    """Mix one animal's calling (a few bouts) into ``audio`` starting at ``at_s``."""
    rate = config.sample_rate
    animal = animals[int(rng.integers(len(animals)))]
    lifestage = LIFESTAGES[int(rng.random() < 0.4)]
    calltype = CALLTYPES[int(rng.integers(3))]
    span = min(float(rng.uniform(3.0, 8.0)), audio.size / rate - at_s)
    bouts = schedule_bouts(animal, lifestage, calltype, span, rng)
    n = int(round(span * rate))
    track, mask = render_animal(animal, lifestage, calltype, bouts, n, rate, rng)
    snr = float(rng.uniform(*config.focal_snr_db))
    start = int(round(at_s * rate))
    stop = min(start + n, audio.size)
    audio[start:stop] += mix_at_snr(track, mask, background_rms, snr)[: stop - start].astype(
        np.float32)
    low, high = box_band(animal, lifestage, calltype, rate)
    return [Call(animal.spec.name, lifestage, calltype, round(at_s + b.begin_s, 4),
                 round(at_s + b.end_s, 4), round(low, 1), round(high, 1), round(snr, 2))
            for b in bouts]


def soundscape_selections(calls: Sequence[Call]) -> list[Selection]:
    """Raven selections for the soundscape's ground truth (species in an annotation column)."""
    return [Selection(c.begin_s, c.end_s, c.low_hz, c.high_hz,
                      annotations={"Species": c.species, "Life Stage": c.lifestage,
                                   "Call Type": c.calltype, "SNR (dB)": f"{c.snr_db:.1f}"})
            for c in calls]


# ----------------------------------------------------------------------------- the corpus

@dataclass(frozen=True)
class SynthSummary:
    """What `generate` wrote."""

    out: str
    clips: int
    records: int
    split_clips: dict[str, int]
    task_counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    soundscape_s: float = 0.0
    soundscape_calls: int = 0
    seconds: float = 0.0

    def format(self) -> str:
        """A human-readable summary: clips per split and label counts per task."""
        lines = [f"synthetic chorus in {self.out}: {self.clips} clips, {self.records} records, "
                 f"{self.seconds:.1f} s"]
        lines.append("clips per split: " + ", ".join(
            f"{split} {self.split_clips.get(split, 0)}" for split in SPLITS))
        for task, per_split in self.task_counts.items():
            for split in SPLITS:
                counts = per_split.get(split, {})
                if not counts:
                    continue
                if len(counts) > 6:
                    text = (f"{len(counts)} labels, {min(counts.values())}-"
                            f"{max(counts.values())} records each")
                else:
                    text = ", ".join(f"{label} {n}" for label, n in sorted(counts.items()))
                lines.append(f"  {task:<10} {split:<5} {text}")
        if self.soundscape_s:
            lines.append(f"soundscape: {self.soundscape_s / 60:.1f} min, "
                         f"{self.soundscape_calls} annotated bouts")
        return "\n".join(lines)


def generate(config: SynthConfig, out: str | os.PathLike[str], workers: int = 0
             ) -> SynthSummary:
    """Write the whole synthetic corpus into ``out`` and return a summary.

    A folder that already holds files but no synth.json is refused (never overwrite what this
    generator did not write); an earlier synthetic corpus there is replaced.

    Args:
        config: what to generate (the corpus's identity; ``workers`` is not part of it).
        out: output folder.
        workers: worker processes that render and write clips (and the soundscape beside
            them); 0 picks `default_workers`, 1 renders in this process. Any count writes the
            same bytes.
    """
    started = time.perf_counter()
    count = resolve_workers(config, workers)
    out = Path(out).resolve()
    _prepare(out)
    clips_dir = out / "clips"
    clips_dir.mkdir(parents=True)
    plans = plan_clips(config)
    soundscape_path = out / "soundscape.flac" if config.soundscape_min > 0 else None
    if count == 1:
        per_clip = render_clips(config, plans, clips_dir, workers=1)
        soundscape = (write_soundscape(config, soundscape_path)
                      if soundscape_path is not None else None)
    else:
        per_clip, soundscape = _render_in_pool(config, plans, clips_dir, soundscape_path, count)
    records = [record for clip in per_clip for record in clip]
    soundscape_s, n_calls = 0.0, 0
    if soundscape is not None:
        soundscape_s, calls = soundscape
        write_raven_table(out / "soundscape.selections.txt", soundscape_selections(calls))
        n_calls = len(calls)
    write_manifest(records, out / "manifest.jsonl")
    summary = SynthSummary(str(out), len(plans), len(records), dict(Counter(p.split for p in plans)),
                           _task_counts(records), soundscape_s, n_calls,
                           time.perf_counter() - started)
    _write_config(out, config, summary)
    return summary


def default_workers(config: SynthConfig) -> int:
    """The worker count ``workers=0`` means: one per CPU core this process may use, at most
    `MAX_AUTO_WORKERS`, and no more than the work pays for (one per `AUDIO_S_PER_WORKER` seconds
    of audio to render), so a small corpus renders in this process without starting any."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    audio_s = config.clips * config.clip_s + config.soundscape_min * 60
    return max(1, min(cores or 1, MAX_AUTO_WORKERS, int(audio_s // AUDIO_S_PER_WORKER)))


def resolve_workers(config: SynthConfig, workers: int) -> int:
    """The worker count `generate` uses for ``workers`` (0: `default_workers`); < 0 raises."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0 (0: automatic), got {workers!r}")
    count = default_workers(config) if workers == 0 else workers
    if count > 1 and not _spawn_can_import_main():
        if workers > 1:
            import warnings

            warnings.warn(f"workers={workers} ignored: the main script "
                          f"({sys.modules['__main__'].__file__}) is not a file a spawned worker "
                          "can import (stdin?); rendering in this process (same bytes)",
                          RuntimeWarning, stacklevel=3)
        return 1
    return count


def _spawn_can_import_main() -> bool:
    """A spawned worker re-imports the main script from its path: impossible for stdin."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is None or Path(path).is_file()


def render_clips(config: SynthConfig, plans: Sequence[ClipPlan], clips_dir: Path,
                 workers: int = 1) -> list[list[Record]]:
    """Render every planned clip into ``clips_dir`` as FLAC; returns each clip's records, in
    the order of ``plans``. ``workers`` > 1 renders chunks of clips in worker processes (same
    bytes, same records); a failed clip raises `SynthError` naming its file."""
    count = resolve_workers(config, workers)
    if count == 1:
        return _render_chunk(config, tuple(plans), str(clips_dir))
    per_clip, _ = _render_in_pool(config, plans, clips_dir, None, count)
    return per_clip


def write_soundscape(config: SynthConfig, path: Path) -> tuple[float, list[Call]]:
    """Render the long soundscape into ``path`` as FLAC; returns its length in seconds and its
    ground-truth calls. A failure raises `SynthError` naming the file."""
    try:
        audio, calls = render_soundscape(config)
        write_flac(path, audio, config.sample_rate)
    except (OSError, RuntimeError, ValueError, MemoryError) as exc:
        raise SynthError(f"{path}: {type(exc).__name__}: {exc}") from exc
    return audio.size / config.sample_rate, calls


def _render_chunk(config: SynthConfig, plans: tuple[ClipPlan, ...], clips_dir: str
                  ) -> list[list[Record]]:
    """Render and write a run of clips; the worker processes' task (top level: picklable)."""
    out: list[list[Record]] = []
    for plan in plans:
        path = Path(clips_dir) / f"{plan.clip_id}.flac"
        try:
            audio, calls, parts = render_clip(config, plan)
            gain = write_flac(path, audio, config.sample_rate)
        except (OSError, RuntimeError, ValueError, MemoryError) as exc:
            raise SynthError(f"{path}: {type(exc).__name__}: {exc}") from exc
        metadata = {"background": parts, "gain_db": round(20 * math.log10(gain), 2)}
        out.append(clip_records(config, plan, str(path), calls, metadata))
    return out


def _chunks(plans: Sequence[ClipPlan], workers: int) -> list[tuple[ClipPlan, ...]]:
    """About eight chunks per worker (balances uneven clips), each at most `_CHUNK_MAX` clips."""
    size = max(1, min(_CHUNK_MAX, math.ceil(len(plans) / (8 * workers))))
    return [tuple(plans[k:k + size]) for k in range(0, len(plans), size)]


def _render_in_pool(config: SynthConfig, plans: Sequence[ClipPlan], clips_dir: Path,
                    soundscape: Path | None, workers: int
                    ) -> tuple[list[list[Record]], tuple[float, list[Call]] | None]:
    """Clips in chunks, and the soundscape beside them, in ``workers`` spawned processes.

    The first failure cancels what has not started and is raised (a `SynthError` naming the
    file, or one saying that a worker process died)."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    chunks = _chunks(plans, workers)
    count = min(workers, len(chunks) + (soundscape is not None))
    pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"))
    try:
        # The soundscape is the longest single task: submitted first so it never runs last.
        scape = pool.submit(write_soundscape, config, soundscape) if soundscape else None
        futures = [pool.submit(_render_chunk, config, chunk, str(clips_dir)) for chunk in chunks]
        everything = [f for f in (scape, *futures) if f is not None]
        done, _ = wait(everything, return_when=FIRST_EXCEPTION)
        for future in everything:
            if future in done and future.exception() is not None:
                future.result()  # raises the failure, with the worker's traceback as its cause
        per_clip = [records for future in futures for records in future.result()]
        return per_clip, scape.result() if scape is not None else None
    except BrokenProcessPool as exc:
        raise SynthError(f"{clips_dir.parent}: a worker process died while rendering the corpus "
                         "(killed or out of memory; or a main script that a spawned process "
                         "cannot import: guard it with if __name__ == '__main__'); try fewer "
                         "workers or workers=1") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "synth.json").is_file():
            raise InputError(out, "folder is not empty and holds no synth.json; refusing to "
                             "write a synthetic corpus into it")
        (out / "synth.json").unlink()
        if (out / "clips").is_dir():
            shutil.rmtree(out / "clips")
        for name in ("manifest.jsonl", "soundscape.flac", "soundscape.selections.txt"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _task_counts(records: Sequence[Record]) -> dict[str, dict[str, dict[str, int]]]:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for record in records:
        answers = TASKS[record.task].parse(record.output, record.labels) or [record.output]
        per_label = counts.setdefault(record.task, {}).setdefault(record.split, {})
        for answer in answers:
            per_label[answer] = per_label.get(answer, 0) + 1
    return counts


def _write_config(out: Path, config: SynthConfig, summary: SynthSummary) -> None:
    body = {
        "version": SYNTH_VERSION,
        "config": config.to_dict(),
        "species": [asdict(spec) for spec in species_catalogue()[: config.species]],
        "labels": {task: list(labels) for task, labels in label_sets(config).items()},
        "summary": {"clips": summary.clips, "records": summary.records,
                    "split_clips": summary.split_clips, "soundscape_s": summary.soundscape_s,
                    "soundscape_calls": summary.soundscape_calls},
    }
    atomic_write_text(out / "synth.json", json.dumps(body, indent=2) + "\n")


def read_config(folder: str | os.PathLike[str]) -> SynthConfig:
    """The SynthConfig stored in a corpus folder's synth.json."""
    path = Path(folder) / "synth.json"
    if not path.is_file():
        raise InputError(path, "no synth.json: not a synthetic corpus folder")
    try:
        return SynthConfig.from_dict(json.loads(path.read_text(encoding="utf-8"))["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"not a valid synth.json ({exc})") from exc
