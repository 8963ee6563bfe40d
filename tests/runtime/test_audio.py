"""runtime.audio: decoding, resampling, streaming parity and every bad input, on files made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from runtime.audio import audio_info, read_audio, stream_audio
from runtime.errors import AudioError, InputError
from tests.runtime.audio_fixtures import (
    patch_wav_fmt,
    set_wav_data_size,
    tone,
    truncate,
    write_array,
    write_tone,
)


def _expected_len(frames: int, rate: int, target: int) -> int:
    """round(frames * target / rate), halves rounded up: the length soxr gives."""
    return (frames * target + rate // 2) // rate


def _snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = np.sum((ref.astype(np.float64) - got) ** 2)
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(noise, 1e-30)))


# --- the real recording -------------------------------------------------------------------


def test_real_recording_resampled_to_16k_has_the_right_length_and_energy(
    real_recording: Path,
) -> None:
    info = audio_info(real_recording)
    assert (info.sample_rate, info.channels, info.subtype) == (32000, 1, "PCM_16")
    assert info.duration_s == pytest.approx(10.13, abs=0.01)
    native = read_audio(real_recording, target_rate=None)
    audio = read_audio(real_recording, target_rate=16000)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(native) == info.frames
    # 324263 frames at 32 kHz = 10.133 s -> 162131.5 samples at 16 kHz, rounded up.
    assert info.frames == 324263
    assert len(audio) == _expected_len(info.frames, 32000, 16000) == 162132
    assert np.isfinite(audio).all()
    # A good anti-aliasing resampler keeps the energy of the passband and removes what lies
    # above the new Nyquist (this recording has much of its energy near 7-8 kHz).
    assert _band_energy(audio, 16000, 7000) == pytest.approx(_band_energy(native, 32000, 7000),
                                                           rel=0.02)
    total = np.mean(audio.astype(np.float64) ** 2)
    assert _band_energy(native, 32000, 7000) < total < _band_energy(native, 32000, 8000)


def _band_energy(x: np.ndarray, rate: int, below_hz: float) -> float:
    """Mean-square energy of `x` below `below_hz` (Parseval on the real FFT)."""
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return float(np.mean(x.astype(np.float64) ** 2) * spectrum[freqs < below_hz].sum()
                 / spectrum.sum())


def test_real_recording_native_read_equals_libsndfile(real_recording: Path) -> None:
    ref, _ = sf.read(str(real_recording), dtype="float32")
    assert np.array_equal(read_audio(real_recording, target_rate=None), ref)


@pytest.mark.parametrize("block_s", [0.001, 0.0371, 0.5, 1.0, 3.3, 10.13321875, 60.0])
def test_streaming_equals_whole_file_for_any_block_size(real_recording: Path,
                                                        block_s: float) -> None:
    whole = read_audio(real_recording, target_rate=16000)
    blocks = list(stream_audio(real_recording, 16000, block_s=block_s))
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    assert np.array_equal(np.concatenate(blocks), whole)


def test_stream_blocks_stay_bounded(real_recording: Path) -> None:
    blocks = list(stream_audio(real_recording, 16000, block_s=0.25))
    assert len(blocks) >= 40
    assert max(len(b) for b in blocks) <= 0.25 * 16000 + 200


def test_resampling_matches_one_shot_soxr(real_recording: Path) -> None:
    native, rate = sf.read(str(real_recording), dtype="float32")
    for target in (16000, 22050, 48000):
        ref = soxr.resample(native, rate, target, quality="HQ")
        got = read_audio(real_recording, target_rate=target)
        assert len(got) == len(ref)
        np.testing.assert_allclose(got, ref, atol=1e-6)


def test_offset_and_duration_select_the_right_samples(real_recording: Path) -> None:
    native = read_audio(real_recording, target_rate=None)
    part = read_audio(real_recording, target_rate=None, offset_s=2.5, duration_s=1.25)
    assert np.array_equal(part, native[80000:120000])
    tail = read_audio(real_recording, target_rate=None, offset_s=10.0, duration_s=5.0)
    assert np.array_equal(tail, native[320000:])
    resampled = read_audio(real_recording, 16000, offset_s=2.5, duration_s=1.25)
    assert np.array_equal(resampled, soxr.resample(native[80000:120000], 32000, 16000, "HQ"))
    streamed = stream_audio(real_recording, 16000, block_s=0.3, offset_s=2.5, duration_s=1.25)
    assert np.array_equal(np.concatenate(list(streamed)), resampled)


def test_offset_past_the_end_names_the_file(real_recording: Path) -> None:
    with pytest.raises(AudioError, match="past the end"):
        read_audio(real_recording, offset_s=10.2)
    with pytest.raises(ValueError, match="offset_s"):
        read_audio(real_recording, offset_s=-1.0)


# --- formats, bit depths, channels, rates -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "subtype", "min_snr_db"),
    [
        ("a.wav", "PCM_U8", 35.0),
        ("a.wav", "PCM_16", 80.0),
        ("a.wav", "PCM_24", 110.0),
        ("a.wav", "PCM_32", 110.0),
        ("a.wav", "FLOAT", 110.0),
        ("a.wav", "DOUBLE", 110.0),
        ("a.flac", "PCM_S8", 35.0),
        ("a.flac", "PCM_16", 80.0),
        ("a.flac", "PCM_24", 110.0),
        ("a.ogg", "VORBIS", 10.0),
        ("a.mp3", "MPEG_LAYER_III", 10.0),
    ],
)
def test_formats_and_bit_depths_decode_to_the_source(tmp_path: Path, name: str, subtype: str,
                                                      min_snr_db: float) -> None:
    path = write_tone(tmp_path / name, rate=44100, seconds=0.5, subtype=subtype)
    info = audio_info(path)
    assert (info.sample_rate, info.channels, info.subtype) == (44100, 1, subtype)
    source = tone(44100, 0.5)[:, 0]
    native = read_audio(path, target_rate=None)
    assert len(native) == len(source)
    assert _snr_db(source, native) > min_snr_db
    audio = read_audio(path, target_rate=16000)
    assert len(audio) == _expected_len(len(source), 44100, 16000)
    ref = soxr.resample(source, 44100, 16000, quality="HQ")
    assert _snr_db(ref, audio) > min_snr_db - 1


def test_opus_decodes(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "a.opus", rate=48000, seconds=0.5)
    assert audio_info(path).subtype == "OPUS"
    audio = read_audio(path, target_rate=16000)
    ref = soxr.resample(tone(48000, 0.5)[:, 0], 48000, 16000, quality="HQ")
    assert len(audio) == len(ref)
    assert _snr_db(ref, audio) > 10.0


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5, 6, 7, 8])
def test_channels_mix_to_mono_or_pick_one(tmp_path: Path, channels: int) -> None:
    path = write_tone(tmp_path / "multi.wav", rate=32000, seconds=0.3, channels=channels,
                      subtype="FLOAT")
    source = tone(32000, 0.3, channels)
    assert audio_info(path).channels == channels
    mixed = read_audio(path, target_rate=16000)
    ref = soxr.resample(source.mean(axis=1, dtype=np.float32), 32000, 16000, quality="HQ")
    np.testing.assert_allclose(mixed, ref, atol=1e-6)
    last = read_audio(path, target_rate=16000, channel=channels - 1)
    ref_last = soxr.resample(np.ascontiguousarray(source[:, -1]), 32000, 16000, quality="HQ")
    np.testing.assert_allclose(last, ref_last, atol=1e-6)
    with pytest.raises(AudioError, match=f"channel {channels} requested .* {channels} channel"):
        read_audio(path, channel=channels)


@pytest.mark.parametrize("name", ["a.wav", "a.flac"])
@pytest.mark.parametrize("channels", [1, 2, 3, 8])
def test_16_bit_pcm_read_as_integers_gives_libsndfiles_floats_exactly(
        tmp_path: Path, name: str, channels: int) -> None:
    path = write_tone(tmp_path / name, rate=32000, seconds=0.3, channels=channels,
                      subtype="PCM_16")
    ref, _ = sf.read(str(path), dtype="float32", always_2d=True)  # libsndfile's conversion
    mixed = ref[:, 0].copy()
    for col in range(1, channels):
        mixed += ref[:, col]
    mixed /= np.float32(channels)
    assert np.array_equal(read_audio(path, target_rate=None), mixed)
    assert np.array_equal(read_audio(path, target_rate=None, channel=channels - 1),
                          ref[:, -1])
    np.testing.assert_allclose(read_audio(path, target_rate=None), ref.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize(("rate", "seconds"), [(8000, 1.0), (11025, 0.5), (96000, 0.25),
                                               (192000, 0.25), (384000, 0.25)])
def test_rates_from_8k_to_384k_resample_to_16k(tmp_path: Path, rate: int, seconds: float) -> None:
    path = write_tone(tmp_path / f"r{rate}.flac" if rate <= 192000 else tmp_path / f"r{rate}.wav",
                      rate=rate, seconds=seconds, freq=1000.0)
    audio = read_audio(path, target_rate=16000)
    frames = round(rate * seconds)
    assert len(audio) == _expected_len(frames, rate, 16000)
    t = np.arange(len(audio)) / 16000
    expected = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
    core = slice(len(audio) // 10, -len(audio) // 10)  # away from the filter's edges
    assert _snr_db(expected[core], audio[core]) > 25.0


def test_upsampling_removes_nothing_and_adds_no_images(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "low.wav", rate=8000, seconds=1.0, freq=3000.0, subtype="FLOAT")
    audio = read_audio(path, target_rate=32000).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(audio[4000:-4000] * np.hanning(len(audio) - 8000))) ** 2
    freqs = np.fft.rfftfreq(len(audio) - 8000, 1 / 32000)
    assert spectrum[freqs > 4100].sum() < 1e-4 * spectrum.sum()


def test_downsampling_removes_content_above_the_new_nyquist(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "high.wav", rate=48000, seconds=1.0, freq=12000.0,
                      subtype="FLOAT")
    audio = read_audio(path, target_rate=16000)
    # A 12 kHz tone would alias to 4 kHz with a naive decimator; it must vanish instead.
    assert np.sqrt(np.mean(audio[1600:-1600] ** 2)) < 0.02


@pytest.mark.parametrize("rate", [4000, 7999, 384001, 768000])
def test_rates_outside_8k_384k_are_refused(tmp_path: Path, rate: int) -> None:
    path = write_tone(tmp_path / "odd.wav", rate=rate, seconds=0.05)
    with pytest.raises(AudioError, match=f"sample rate {rate} Hz is outside"):
        read_audio(path)
    assert audio_info(path).sample_rate == rate  # the header itself is fine


def test_unicode_and_spaces_in_paths(tmp_path: Path) -> None:
    folder = tmp_path / "Vogel stimmen" / "Grünfink ñ 鳥"
    folder.mkdir(parents=True)
    path = write_tone(folder / "dawn chorus 05 – 鳥.flac", rate=24000, seconds=0.4)
    assert audio_info(path).path == str(path)
    assert len(read_audio(str(path), 16000)) == _expected_len(9600, 24000, 16000)
    with pytest.raises(AudioError) as err:
        read_audio(folder / "missing ü.wav")
    assert "missing ü.wav" in str(err.value)


def test_wav_with_unknown_length_marker_reads_whole(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "streamed.wav", rate=16000, seconds=0.5)
    set_wav_data_size(path, 0xFFFFFFFF)  # what streaming writers put before they know
    assert len(read_audio(path, target_rate=None)) == 8000


# --- bad input ---------------------------------------------------------------------------


def _raises(path: Path, match: str) -> AudioError:
    with pytest.raises(AudioError, match=match) as err:
        read_audio(path)
    assert isinstance(err.value, InputError)
    assert err.value.path == str(path) and str(err.value).startswith(str(path))
    return err.value


def test_missing_file(tmp_path: Path) -> None:
    _raises(tmp_path / "nope.wav", "does not exist")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.wav").mkdir()
    _raises(tmp_path / "dir.wav", "is a directory")


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    _raises(tmp_path / "empty.wav", r"empty \(0 bytes\)")


def test_header_without_frames(tmp_path: Path) -> None:
    path = write_array(tmp_path / "noframes.wav", np.zeros((0, 1), dtype=np.float32), 16000,
                       subtype="PCM_16")
    _raises(path, "no audio frames")


def test_text_file_named_wav(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("field notes, not audio\n" * 20, encoding="utf-8")
    err = _raises(path, "not a readable audio file.*Format not recognised")
    assert isinstance(err.__cause__, sf.LibsndfileError)


@pytest.mark.parametrize(
    ("patch", "reason"),
    [({"channels": 0}, "Channel count is zero"), ({"format_tag": 77}, "Malformed 'fmt ' chunk"),
     ({"rate": 0}, "header is corrupt")],
)
def test_corrupt_header(tmp_path: Path, patch: dict[str, int], reason: str) -> None:
    path = patch_wav_fmt(write_tone(tmp_path / "bad.wav"), **patch)
    _raises(path, reason)


def test_truncated_wav(tmp_path: Path) -> None:
    path = truncate(write_tone(tmp_path / "cut.wav", seconds=1.0))
    _raises(path, r"truncated: the header declares 32000 bytes of audio data but only \d+")


@pytest.mark.parametrize(
    ("name", "reason"),
    [("cut.flac", "corrupt or truncated: decoding failed"), ("cut.ogg", "truncated: .*Ogg page"),
     ("cut.opus", "truncated|header is corrupt"), ("cut.mp3", "truncated: the header declares")],
)
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.97])
def test_truncated_compressed_files(tmp_path: Path, name: str, reason: str, keep: float) -> None:
    path = truncate(write_tone(tmp_path / name, rate=48000, seconds=2.0), keep_fraction=keep)
    _raises(path, reason)


def test_ogg_cut_at_a_page_boundary_is_truncated(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "cut.ogg", rate=48000, seconds=2.0)
    data = path.read_bytes()
    path.write_bytes(data[: data.rfind(b"OggS")])  # whole pages, but no end-of-stream page
    _raises(path, "last Ogg page is not marked end-of-stream")


def test_truncated_mp3_says_where_decoding_stopped(tmp_path: Path) -> None:
    path = truncate(write_tone(tmp_path / "cut.mp3", seconds=2.0), keep_fraction=0.5)
    blocks = stream_audio(path, 16000, block_s=0.1)
    got: list[np.ndarray] = []
    with pytest.raises(AudioError, match=r"truncated: .*2\.000 s.* stopped at \d\.\d+ s"):
        for block in blocks:
            got.append(block)
    assert 0 < sum(len(b) for b in got) < 32000  # the clean part came out before the error


@pytest.mark.parametrize(("bad", "kind"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nan_and_inf_samples_name_the_second(tmp_path: Path, bad: float, kind: str) -> None:
    data = tone(16000, 2.0, channels=2)
    data[24000, 1] = bad
    path = write_array(tmp_path / "nan.wav", data, 16000, subtype="FLOAT")
    _raises(path, rf"{kind} sample at 1\.500 s \(channel 1\)")
    # A chosen channel that is clean reads; the bad one is named.
    assert len(read_audio(path, channel=0)) == 32000
    with pytest.raises(AudioError, match=rf"{kind} sample at 1\.500 s"):
        read_audio(path, channel=1, offset_s=1.0)


def test_header_errors_raise_before_iteration(tmp_path: Path) -> None:
    path = tmp_path / "junk.flac"
    path.write_bytes(b"\x00\x01" * 300)
    with pytest.raises(AudioError, match="not a readable audio file"):
        stream_audio(path, 16000)
    with pytest.raises(AudioError, match="channel 3"):
        stream_audio(write_tone(tmp_path / "ok.wav"), 16000, channel=3)


def test_bad_arguments_raise_value_errors(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "ok.wav")
    with pytest.raises(ValueError, match="target_rate"):
        stream_audio(path, 0)
    with pytest.raises(ValueError, match="block_s"):
        stream_audio(path, 16000, block_s=0)
    with pytest.raises(ValueError, match="duration_s"):
        read_audio(path, duration_s=0.0)


@pytest.mark.parametrize("name", ["a.flac", "a.ogg", "a.opus", "a.mp3"])
def test_offset_seeks_to_the_same_samples_in_every_format(tmp_path: Path, name: str) -> None:
    path = write_tone(tmp_path / name, rate=48000, seconds=3.0)
    full = read_audio(path, target_rate=None)
    part = read_audio(path, target_rate=None, offset_s=1.3, duration_s=0.5)
    # MP3 restarts its decoder at the seek point: the same samples up to float rounding.
    np.testing.assert_allclose(part, full[62400:86400], rtol=0, atol=1e-6)
