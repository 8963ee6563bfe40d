"""`naturelm-edge verify BUNDLE`: check a bundle folder or .tar.gz before it is flashed.

Checks the schema version, every file's sha256, files missing or not listed, and (for an
archive) that no entry escapes the folder. Prints each problem; exit code 0 when sound, 1
otherwise.

    $ naturelm-edge verify runs/default/bundle.tar.gz
    >>> verify(Path("bundle"))  # doctest: +SKIP
    0
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from runtime.bundle import load_bundle, verify_bundle


def verify(bundle: Path) -> int:
    """Verify a bundle: schema, sha256 of every file, safe archive entries.

    Args:
        bundle: the bundle folder or .tar.gz.
    """
    problems = verify_bundle(bundle)
    if problems:
        for problem in problems:
            print(f"naturelm-edge verify: {problem}", file=sys.stderr)
        print(f"{bundle}: {len(problems)} problem(s); do not flash this bundle")
        return 1
    with tempfile.TemporaryDirectory(prefix="naturelm-verify-") as tmp:
        manifest = load_bundle(bundle, extract_to=tmp).manifest
    tasks = ", ".join(f"{t.name} ({len(t.labels)} labels)" for t in manifest.tasks)
    models = ", ".join(f"{m.file} [{m.precision}, {m.variant}]" for m in manifest.models)
    print(f"{bundle}: ok: {manifest.name} {manifest.version}, {len(manifest.files)} files "
          f"verified; {manifest.sample_rate} Hz, {manifest.window_s} s windows; tasks {tasks}; "
          f"models {models}")
    return 0
