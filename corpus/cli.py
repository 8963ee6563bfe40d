"""`naturelm-edge corpus synth` and `naturelm-edge corpus baseline`: typed command functions.

    $ naturelm-edge corpus synth --out runs/default/corpus --seed 0
    $ naturelm-edge corpus synth --out runs/default/corpus --seed 0 --workers 4
    $ naturelm-edge corpus baseline runs/default/corpus/manifest.jsonl

The same from Python:

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "corpus"
    >>> synth(out=out, clips=6, clip_s=2.0, clips_per_recording=2, soundscape_min=0.0, quiet=True)
    0
    >>> (out / "manifest.jsonl").is_file()
    True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from corpus.synth import SynthConfig

DEFAULT_CLIPS = SynthConfig().clips
DEFAULT_OUT = Path("runs/default/corpus")


def synth(out: Path = DEFAULT_OUT, seed: int = 0, clips: int = DEFAULT_CLIPS, clip_s: float = 10.0,
          soundscape_min: float = 10.0, sample_rate: int = 16000, species: int = 24,
          clips_per_recording: int = 10, workers: int = 0, quiet: bool = False) -> int:
    """Generate the synthetic chorus: clips, manifest, splits, a soundscape with its truth.

    Deterministic: the same arguments give the same bytes, whatever the number of worker
    processes (not part of the corpus's config). Writes OUT/clips/*.flac,
    OUT/manifest.jsonl, OUT/soundscape.flac, OUT/soundscape.selections.txt and OUT/synth.json.

    Args:
        out: output folder (created; an earlier synthetic corpus there is replaced).
        seed: random seed.
        clips: number of clips (80/10/10 train/valid/test by recording).
        clip_s: clip length in seconds.
        soundscape_min: length of the long soundscape in minutes (0 for none).
        sample_rate: sample rate in Hz (at least 16000).
        species: number of species (2 to 24).
        clips_per_recording: clips per recording session; splits keep sessions whole.
        workers: worker processes rendering clips and the soundscape (0: one per CPU core, at
            most 8, none for a small corpus; 1: all in this process).
        quiet: print nothing.
    """
    from corpus.synth import generate

    config = SynthConfig(seed=seed, clips=clips, clip_s=clip_s, sample_rate=sample_rate,
                         species=species, clips_per_recording=clips_per_recording,
                         soundscape_min=soundscape_min)
    summary = generate(config, out, workers=workers)
    if not quiet:
        print(summary.format())
    return 0


def baseline(manifest: Path, split: Literal["valid", "test"] = "test", n_mels: int = 64, l2: float | None = None,
             steps: int = 500, json_line: bool = True) -> int:
    """Trivial baseline per task: logistic regression on mean log-mel, next to chance.

    Trains on the manifest's train split and scores on SPLIT: accuracy for single-label
    tasks, macro-F1 (with "None") for detection.

    Args:
        manifest: a JSONL or CSV manifest (for example OUT/manifest.jsonl of corpus synth).
        split: the split to score on ("valid" or "test").
        n_mels: mel bands of the feature.
        l2: L2 penalty of the logistic regression (default: picked on the valid split).
        steps: gradient steps.
        json_line: end with one JSON line holding the figures.
    """
    from corpus.baseline import MelConfig, format_results, run_baseline
    from corpus.manifest import read_manifest

    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    records = read_manifest(manifest)
    results = run_baseline(records, test_split=split, mel=MelConfig(n_mels=n_mels), l2=l2,
                           steps=steps)
    if not results:
        print(f"{manifest}: no task has records in both the train and the {split} split")
        return 1
    print(format_results(results))
    if json_line:
        print(json.dumps({"baseline": {r.task: {"metric": r.metric, "score": round(r.score, 4),
                                                "chance": round(r.chance, 4)}
                                       for r in results}}))
    return 0
