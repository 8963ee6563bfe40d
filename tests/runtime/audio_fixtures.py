"""Audio test files written on the fly into a temporary folder (no binary fixtures committed).

    >>> import tempfile
    >>> from pathlib import Path
    >>> path = write_tone(Path(tempfile.mkdtemp()) / "a.flac", rate=22050, seconds=0.5)
    >>> path.suffix
    '.flac'
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import soundfile as sf

# format name -> (soundfile format, default subtype)
FORMATS: dict[str, tuple[str, str]] = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".opus": ("OGG", "OPUS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}


def tone(rate: int, seconds: float, channels: int = 1, freq: float = 440.0,
         amplitude: float = 0.5, seed: int = 0) -> np.ndarray:
    """A float32 [frames, channels] signal: a tone (per-channel frequency) plus a little noise.

    Channel c carries `freq * (c + 1)` at `amplitude / (c + 1)`, so channels differ.
    """
    frames = round(rate * seconds)
    t = np.arange(frames) / rate
    rng = np.random.default_rng(seed)
    cols = [amplitude / (c + 1) * np.sin(2 * np.pi * freq * (c + 1) * t)
            + 0.01 * rng.standard_normal(frames) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


def write_tone(path: Path, rate: int = 16000, seconds: float = 1.0, channels: int = 1,
               subtype: str | None = None, freq: float = 440.0) -> Path:
    """Write `tone(...)` to `path`; the format follows the suffix, the subtype may be given."""
    fmt, default_subtype = FORMATS[path.suffix.lower()]
    sf.write(str(path), tone(rate, seconds, channels, freq), rate, format=fmt,
             subtype=subtype or default_subtype)
    return path


def write_array(path: Path, data: np.ndarray, rate: int, subtype: str = "FLOAT") -> Path:
    """Write `data` ([frames] or [frames, channels]) as WAV with the given subtype."""
    sf.write(str(path), data, rate, format="WAV", subtype=subtype)
    return path


def truncate(path: Path, keep_fraction: float = 0.5) -> Path:
    """Cut `path` to the first `keep_fraction` of its bytes (header left claiming the full size)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def patch_wav_fmt(path: Path, *, channels: int | None = None, rate: int | None = None,
                  format_tag: int | None = None) -> Path:
    """Overwrite fields of a WAV file's `fmt ` chunk in place (to make corrupt headers)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"fmt ")
    if at < 0:
        raise ValueError(f"{path}: no fmt chunk")
    if format_tag is not None:
        data[at + 8 : at + 10] = struct.pack("<H", format_tag)
    if channels is not None:
        data[at + 10 : at + 12] = struct.pack("<H", channels)
    if rate is not None:
        data[at + 12 : at + 16] = struct.pack("<I", rate)
    path.write_bytes(bytes(data))
    return path


def set_wav_data_size(path: Path, size: int) -> Path:
    """Overwrite the byte count of a WAV file's `data` chunk."""
    data = bytearray(path.read_bytes())
    at = data.find(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", size)
    path.write_bytes(bytes(data))
    return path
