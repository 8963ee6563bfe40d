"""The tone model and bundle the runtime, export and benchmark tests run on.

One implementation lives in `benchmarks.fixtures` (a benchmark shipped in the package must not
import from tests); this module re-exports it under the names the tests use.

    >>> from pathlib import Path; import tempfile
    >>> bundle = make_bundle(Path(tempfile.mkdtemp()) / "tones")
    >>> (bundle / "bundle.json").is_file()
    True
"""

from __future__ import annotations

from benchmarks.fixtures import BAND_HZ, FRAME, LABELS, OFFSET, RATE, make_bundle, tone, tone_model

__all__ = ["BAND_HZ", "FRAME", "LABELS", "OFFSET", "RATE", "make_bundle", "tone", "tone_model"]
