"""Parallel synthesis: any worker count writes the same corpus; worker failures surface."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from corpus.cli import synth
from corpus.synth import (
    SynthConfig,
    SynthError,
    default_workers,
    generate,
    plan_clips,
    render_clips,
    resolve_workers,
)
from tests.corpus.test_synth import file_hashes

ROOT = Path(__file__).resolve().parents[2]


def _tiny(**overrides: object) -> SynthConfig:
    fields = dict(seed=7, clips=12, clip_s=1.0, clips_per_recording=2, soundscape_min=0.05)
    fields.update(overrides)
    return SynthConfig(**fields)


def test_two_workers_write_the_same_bytes_as_one(tmp_path: Path) -> None:
    config = _tiny()
    serial = generate(config, tmp_path / "serial", workers=1)
    parallel = generate(config, tmp_path / "parallel", workers=2)
    one, two = file_hashes(tmp_path / "serial"), file_hashes(tmp_path / "parallel")
    assert {"manifest.jsonl", "soundscape.flac", "soundscape.selections.txt",
            "synth.json"} <= set(one)
    assert sum(name.startswith("clips/") for name in one) == config.clips
    assert one == two
    assert (serial.records, serial.split_clips, serial.task_counts, serial.soundscape_calls) == (
        parallel.records, parallel.split_clips, parallel.task_counts, parallel.soundscape_calls)
    stored = json.loads((tmp_path / "parallel" / "synth.json").read_text(encoding="utf-8"))
    assert "workers" not in stored["config"]
    assert SynthConfig.from_dict(stored["config"]) == config


def test_more_workers_than_chunks_and_no_soundscape(tmp_path: Path) -> None:
    config = _tiny(clips=3, soundscape_min=0.0)
    generate(config, tmp_path / "serial", workers=1)
    generate(config, tmp_path / "parallel", workers=5)
    hashes = file_hashes(tmp_path / "parallel")
    assert "soundscape.flac" not in hashes
    assert hashes == file_hashes(tmp_path / "serial")


def test_render_clips_returns_records_in_plan_order(tmp_path: Path) -> None:
    config = _tiny(clips=9)
    plans = plan_clips(config)
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    serial = render_clips(config, plans, tmp_path / "one", workers=1)
    parallel = render_clips(config, plans, tmp_path / "two", workers=2)
    assert [records[0].id.split(".")[0] for records in parallel] == [p.clip_id for p in plans]
    strip = [[(r.id, r.output, r.split, r.metadata) for r in clip] for clip in serial]
    assert strip == [[(r.id, r.output, r.split, r.metadata) for r in clip] for clip in parallel]


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unwritable_clip_raises_a_synth_error_naming_it(tmp_path: Path, workers: int) -> None:
    config = _tiny(clips=6)
    clips_dir = tmp_path / "clips"
    clips_dir.mkdir()
    (clips_dir / "clip000003.flac").mkdir()  # a folder where the clip file must go
    with pytest.raises(SynthError, match=r"clip000003\.flac"):
        render_clips(config, plan_clips(config), clips_dir, workers=workers)


def test_a_worker_error_in_generate_surfaces_for_clips_and_soundscape(tmp_path: Path) -> None:
    # FLAC cannot hold 700 kHz: every clip and the soundscape fail inside the workers.
    config = _tiny(clips=4, clip_s=0.6, sample_rate=700_000, soundscape_min=0.01)
    with pytest.raises(SynthError, match="sample rate") as info:
        generate(config, tmp_path / "corpus", workers=2)
    assert "flac" in str(info.value)
    assert not (tmp_path / "corpus" / "synth.json").exists()


def test_worker_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    small = _tiny()
    assert default_workers(small) == 1  # a few seconds of audio: no processes at all
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert default_workers(SynthConfig()) == 8  # 1,600 x 10 s + 10 min on 64 cores: capped
    assert default_workers(SynthConfig(clips=40, soundscape_min=0.0)) == 1
    assert default_workers(SynthConfig(clips=100, soundscape_min=0.0)) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_workers(SynthConfig()) == 2
    assert resolve_workers(small, 0) == 1 and resolve_workers(small, 3) == 3
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            resolve_workers(small, bad)  # type: ignore[arg-type]


def test_cli_passes_workers_and_rejects_a_negative_count(tmp_path: Path) -> None:
    kwargs = dict(clips=4, clip_s=1.0, clips_per_recording=2, soundscape_min=0.0, quiet=True)
    assert synth(out=tmp_path / "a", workers=2, **kwargs) == 0
    assert synth(out=tmp_path / "b", workers=1, **kwargs) == 0
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    with pytest.raises(ValueError, match="workers"):
        synth(out=tmp_path / "c", workers=-2, **kwargs)
    assert not (tmp_path / "c").exists()


_SCRIPT = """
import sys, pathlib
sys.path.insert(0, {root!r})
from corpus.synth import SynthConfig, generate
config = SynthConfig(seed=7, clips=4, clip_s=1.0, clips_per_recording=2, soundscape_min=0.0)
generate(config, pathlib.Path({out!r}), workers=2)
print("written")
"""


def _run(args: list[str], tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], input=script, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, check=False)


def test_a_dying_worker_raises_instead_of_hanging(tmp_path: Path) -> None:
    # A main script without a __main__ guard: every spawned worker dies while importing it.
    script = tmp_path / "unguarded.py"
    script.write_text(_SCRIPT.format(root=str(ROOT), out=str(tmp_path / "corpus")))
    done = _run([str(script)], tmp_path, "")
    assert done.returncode != 0 and "written" not in done.stdout
    assert "SynthError" in done.stderr and "worker process died" in done.stderr
    assert "__main__" in done.stderr


def test_a_script_on_stdin_renders_in_process_with_a_warning(tmp_path: Path) -> None:
    done = _run(["-"], tmp_path, _SCRIPT.format(root=str(ROOT), out=str(tmp_path / "corpus")))
    assert done.returncode == 0, done.stderr
    assert "written" in done.stdout and "workers=2 ignored" in done.stderr
    assert len(list((tmp_path / "corpus" / "clips").glob("*.flac"))) == 4
