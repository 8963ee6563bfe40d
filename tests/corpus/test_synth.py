"""The synthetic chorus: determinism, species design, labels and splits, soundscape truth."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from corpus.baseline import MelConfig, log_mel
from corpus.manifest import read_manifest
from corpus.synth import (
    BANDS_HZ,
    CALLTYPES,
    FAMILIES,
    LIFESTAGES,
    SynthConfig,
    draw_animal,
    generate,
    label_sets,
    mix_at_snr,
    read_config,
    render_animal,
    render_element,
    schedule_bouts,
    species_catalogue,
)
from corpus.tasks import TASKS
from runtime.errors import InputError
from runtime.raven import read_raven_table

RATE = 16000


def _tiny(**overrides: object) -> SynthConfig:
    fields = dict(seed=3, clips=8, clip_s=2.0, clips_per_recording=2, soundscape_min=0.1)
    fields.update(overrides)
    return SynthConfig(**fields)


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    generate(_tiny(), tmp_path / "a")
    generate(_tiny(), tmp_path / "b")
    generate(_tiny(seed=4), tmp_path / "c")
    a, b, c = (file_hashes(tmp_path / name) for name in "abc")
    assert "soundscape.flac" in a and "clips/clip000000.flac" in a and "manifest.jsonl" in a
    # Paths inside the manifest are relative to its folder, so whole folders compare equal.
    assert a == b
    assert a["clips/clip000000.flac"] != c["clips/clip000000.flac"]


def test_catalogue_has_24_distinct_species_in_overlapping_bands() -> None:
    catalogue = species_catalogue()
    assert len(catalogue) >= 24
    assert len({s.name for s in catalogue}) == len(catalogue)
    assert all("," not in s.name for s in catalogue)  # detection answers join with ", "
    assert len({(s.band_hz, s.shape) for s in catalogue}) == len(catalogue)
    by_band = defaultdict(set)
    for spec in catalogue:
        by_band[spec.band_hz].add(spec.shape)
    assert all(len(shapes) == 4 for shapes in by_band.values())
    # Adjacent bands overlap, so band alone does not name the species.
    assert all(BANDS_HZ[k][1] > BANDS_HZ[k + 1][0] for k in range(len(BANDS_HZ) - 1))
    # The first six species lie in six different bands (the easy subset).
    assert len({s.band_hz for s in catalogue[:6]}) == 6


def _spectrogram(audio: np.ndarray) -> np.ndarray:
    return log_mel(audio, MelConfig(n_mels=64))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pair_members_share_the_mean_spectrum_but_differ_in_time(family: str) -> None:
    first, second = FAMILIES[family]
    rng = np.random.default_rng(0)
    rate_b = 12.0 if second.endswith("slow") else 30.0  # fast / slow pairs differ in rate
    a = render_element(first, (1500.0, 3000.0), 0.4, 30.0, RATE, rng=rng)
    b = render_element(second, (1500.0, 3000.0), 0.4, rate_b, RATE, rng=rng)
    sa, sb = _spectrogram(a), _spectrogram(b)
    frames = min(len(sa), len(sb))
    sa, sb = sa[:frames], sb[:frames]
    mean_corr = np.corrcoef(sa.mean(axis=0), sb.mean(axis=0))[0, 1]
    # What is left after removing each band's mean: the pattern in time.
    pattern_corr = np.corrcoef((sa - sa.mean(axis=0)).ravel(), (sb - sb.mean(axis=0)).ravel())
    if family != "arch":  # arch / dip are not time reversals of each other
        assert mean_corr > 0.9, f"{first}/{second} mean spectra differ (r={mean_corr:.2f})"
    assert pattern_corr[0, 1] < 0.5, f"{first}/{second} look alike in time"


def test_juveniles_call_higher_and_alarms_are_rapid_short_runs() -> None:
    spec = species_catalogue()[0]
    animal = draw_animal(spec, np.random.default_rng(1))
    centroids = {}
    for stage in LIFESTAGES:
        rng = np.random.default_rng(2)
        bouts = schedule_bouts(animal, stage, "song", 6.0, rng)
        track, mask = render_animal(animal, stage, "song", bouts, 6 * RATE, RATE, rng)
        spectrum = np.abs(np.fft.rfft(track)) ** 2
        freqs = np.fft.rfftfreq(track.size, 1 / RATE)
        centroids[stage] = float((spectrum * freqs).sum() / spectrum.sum())
        assert mask.any()
    assert centroids["juvenile"] > 1.1 * centroids["adult"]
    lengths = {}
    for calltype in CALLTYPES:
        bouts = schedule_bouts(animal, "adult", calltype, 10.0, np.random.default_rng(5))
        lengths[calltype] = np.mean([x for b in bouts for x in b.lengths])
        per_bout = [len(b.onsets) for b in bouts]
        if calltype == "call":
            assert per_bout == [1] * len(bouts)
        if calltype == "alarm":
            assert min(per_bout) >= 6
    assert lengths["alarm"] < lengths["call"] < lengths["song"]


def test_mix_at_snr_sets_the_power_ratio() -> None:
    rng = np.random.default_rng(0)
    track = np.zeros(16000)
    track[4000:8000] = rng.standard_normal(4000)
    mask = track != 0
    mixed = mix_at_snr(track, mask, background_rms=0.01, snr_db=12.0)
    ratio = 10 * np.log10(np.mean(mixed[mask] ** 2) / 0.01 ** 2)
    assert ratio == pytest.approx(12.0, abs=1e-9)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthConfig, Path]:
    config = SynthConfig(seed=7, clips=120, clip_s=1.5, species=6, clips_per_recording=4,
                         soundscape_min=0.5)
    out = tmp_path_factory.mktemp("synth") / "corpus"
    generate(config, out)
    return config, out


def test_every_split_covers_the_labels_and_no_recording_crosses_splits(corpus) -> None:
    config, out = corpus
    records = read_manifest(out / "manifest.jsonl")
    labels = label_sets(config)
    split_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        split_of[record.recording].add(record.split)
        assert record.labels == labels[record.task]
        assert record.instruction.endswith(TASKS[record.task].question)
    assert all(len(splits) == 1 for splits in split_of.values())
    splits = {r.split for r in records}
    assert splits == {"train", "valid", "test"}
    for split in splits:
        for task in ("species", "lifestage", "calltype"):
            seen = {r.output for r in records if r.split == split and r.task == task}
            assert seen == set(labels[task]), f"{split} lacks {task} labels"
    train_counts = {r.output for r in records if r.split == "train" and r.task == "count"}
    assert train_counts == set(labels["count"])


def test_answers_agree_with_the_ground_truth_calls(corpus) -> None:
    config, out = corpus
    by_clip: dict[str, dict[str, object]] = defaultdict(dict)
    for record in read_manifest(out / "manifest.jsonl"):
        by_clip[record.file_name][record.task] = record
    assert len(by_clip) == config.clips
    for tasks in by_clip.values():
        calls = tasks["detection"].metadata["calls"]
        present = sorted({c["species"] for c in calls})
        assert tasks["detection"].output == TASKS["detection"].answer(present)
        assert tasks["count"].output == str(len(present))
        if not present:
            assert set(tasks) == {"detection", "count"}
            continue
        assert set(tasks) == set(TASKS)
        focal = [c for c in calls if c["focal"]]
        assert focal and {c["species"] for c in focal} == {tasks["species"].output}
        assert focal[0]["lifestage"] == tasks["lifestage"].output
        assert focal[0]["calltype"] == tasks["calltype"].output
        loudest = max(calls, key=lambda c: c["snr_db"])
        assert loudest["focal"]


def test_clips_are_16_bit_flac_of_the_configured_length(corpus) -> None:
    config, out = corpus
    clip = next(iter(sorted((out / "clips").glob("*.flac"))))
    info = sf.info(str(clip))
    assert (info.format, info.subtype, info.samplerate) == ("FLAC", "PCM_16", config.sample_rate)
    assert info.frames == int(config.clip_s * config.sample_rate)
    assert read_config(out) == config
    stored = json.loads((out / "synth.json").read_text())
    assert [s["name"] for s in stored["species"]] == list(label_sets(config)["species"])


def _band_energy(audio: np.ndarray, begin: float, end: float, low: float, high: float) -> float:
    segment = audio[int(begin * RATE):int(end * RATE)]
    spectrum = np.abs(np.fft.rfft(segment)) ** 2 / max(segment.size, 1)
    freqs = np.fft.rfftfreq(segment.size, 1 / RATE)
    return float(spectrum[(freqs >= low) & (freqs <= high)].mean())


def test_soundscape_truth_matches_its_audio(corpus) -> None:
    config, out = corpus
    audio, rate = sf.read(str(out / "soundscape.flac"))
    assert rate == RATE and audio.size == int(config.soundscape_min * 60 * RATE)
    selections = read_raven_table(out / "soundscape.selections.txt")
    assert len(selections) >= 5
    names = set(label_sets(config)["species"])
    assert all(s.annotations["Species"] in names for s in selections)
    assert all(0 <= s.begin_s < s.end_s <= audio.size / RATE for s in selections)
    busy = np.zeros(audio.size, dtype=bool)
    for s in selections:
        busy[int(s.begin_s * RATE):int(s.end_s * RATE) + 1] = True
    quiet = np.flatnonzero(~busy)
    assert quiet.size > RATE  # at least a second with no call
    checked = 0
    for s in selections:
        if float(s.annotations["SNR (dB)"]) < 6 or s.end_s - s.begin_s < 0.2:
            continue
        inside = _band_energy(audio, s.begin_s, s.end_s, s.low_hz, s.high_hz)
        outside = np.mean([_band_energy(audio[quiet], k, k + 0.5, s.low_hz, s.high_hz)
                           for k in np.arange(0, quiet.size / RATE - 0.5, 0.5)])
        assert inside > 2 * outside, f"selection at {s.begin_s} s is not louder in its band"
        checked += 1
    assert checked >= 3


def test_a_foreign_folder_is_refused_and_an_old_corpus_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="synth.json"):
        generate(_tiny(), tmp_path)
    out = tmp_path / "corpus"
    generate(_tiny(clips=8), out)
    generate(_tiny(clips=6, soundscape_min=0.0), out)
    assert len(list((out / "clips").glob("*.flac"))) == 6
    assert not (out / "soundscape.flac").exists()


@pytest.mark.parametrize("bad", [dict(clips=0), dict(seed=-1), dict(sample_rate=8000), dict(species=30),
                                 dict(species=2), dict(focal_snr_db=(10.0, 0.0))])
def test_bad_configs_raise(bad: dict) -> None:
    with pytest.raises(ValueError):
        _tiny(**bad)
