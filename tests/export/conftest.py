"""Fixtures for the export tests: a briefly trained tiny student, its checkpoint, a manifest of
real audio (windows of the real recording) and the export folder the CLI functions write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from corpus.manifest import write_manifest
from corpus.records import Record
from corpus.tasks import instruction_for
from distill.checkpoint import save_student
from distill.students import build_student, student_config, task_heads
from export.onnx_export import fit_window
from export.spec import ExportSpec, spec_for
from runtime.audio import read_audio

WINDOW_S = 1.0
SPECIES = ("Kea", "Tui", "Kaka", "Ruru", "Weka")
HEADS = task_heads({"species": SPECIES, "detection": SPECIES[:3]}, multi_label=["detection"])
CLIPS = 48  # 1 s windows of the real recording, 0.18 s apart; every third is held out


def tiny_config():
    """The ``s`` CNN cut to four blocks: real front end and blocks, seconds to export."""
    return student_config("s", tasks=HEADS, n_blocks=4)


def clip_offsets() -> list[float]:
    return [round(0.18 * i, 2) for i in range(CLIPS)]


@pytest.fixture(scope="session")
def spec() -> ExportSpec:
    return spec_for(tiny_config(), window_s=WINDOW_S)


@pytest.fixture(scope="session")
def manifest(tmp_path_factory: pytest.TempPathFactory, real_recording: Path) -> Path:
    """Records on the real recording (train: calibration; test: held out)."""
    path = tmp_path_factory.mktemp("corpus") / "manifest.jsonl"
    records = [Record(id=f"birds-{i:02d}", task="species", instruction=instruction_for("species"),
                      output=SPECIES[i % len(SPECIES)], labels=SPECIES,
                      file_name=str(real_recording), offset_s=offset, duration_s=WINDOW_S,
                      split="test" if i % 3 == 0 else "train", recording=f"r{i}")
               for i, offset in enumerate(clip_offsets())]
    write_manifest(records, path)
    return path


@pytest.fixture(scope="session")
def clips(real_recording: Path, spec: ExportSpec) -> np.ndarray:
    """Every manifest clip as a window ``[CLIPS, samples]`` (same reading as the manifest's)."""
    return np.stack([fit_window(read_audio(real_recording, spec.sample_rate, offset_s=o,
                                           duration_s=WINDOW_S), spec.samples, 1)[0]
                     for o in clip_offsets()])


@pytest.fixture(scope="session")
def student(clips: np.ndarray) -> torch.nn.Module:
    """The tiny student trained for a few steps to give distinct answers per clip (a random
    student answers the same for every clip, which would make agreement checks vacuous)."""
    torch.manual_seed(0)
    model = build_student(tiny_config())
    audio = torch.from_numpy(clips)
    species = torch.arange(len(clips)) % len(SPECIES)
    detection = (torch.arange(len(clips))[:, None] % torch.tensor([2, 3, 5]) == 0).float()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one thread is faster than fighting for two
    for _ in range(25):
        out = model(audio)
        loss = (torch.nn.functional.cross_entropy(out["species_logits"], species)
                + torch.nn.functional.binary_cross_entropy_with_logits(
                    out["detection_logits"], detection))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    # Running statistics from the whole set, so eval mode answers as training did.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model(audio)
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, student: torch.nn.Module) -> Path:
    path = tmp_path_factory.mktemp("student") / "student.ckpt"
    save_student(path, student, student.config, teacher_hash="feedc0de12345678")
    return path


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, real_recording: Path,
               manifest: Path) -> Path:
    """`export onnx` then `export quantize` through the CLI functions."""
    from export.cli import onnx, quantize

    out = tmp_path_factory.mktemp("export") / "export"
    assert onnx(checkpoint, out, window_s=WINDOW_S, recording=real_recording, stft="never") == 0
    # "never": the CPU INT8 keep-or-drop choice depends on this machine's timing.
    assert quantize(out, manifest, calibration_clips=32, int8_cpu="never") == 0
    return out
