"""The STFT-op variant: same numbers as the Conv1d front end, CPU only, exported when faster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from distill.frontend import FrontEndConfig, build_frontend
from export.onnx_export import ExportError, banned_ops, export_student, read_manifest
from export.spec import ExportSpec
from export.stft_variant import (
    export_stft_variant,
    maybe_export_stft,
    measure_frontends,
    stft_frontend,
    with_stft_frontend,
)


@pytest.mark.parametrize("cfg", [
    FrontEndConfig(n_fft=320, win_length=320, hop_length=320, n_mels=48, fmin=100.0),
    FrontEndConfig(n_fft=512, win_length=400, hop_length=160, n_mels=64, fmin=50.0),
])
def test_stft_front_end_equals_the_conv1d_front_end(cfg: FrontEndConfig,
                                                    clips: np.ndarray) -> None:
    audio = torch.from_numpy(clips[:4])
    with torch.no_grad():
        torch.testing.assert_close(stft_frontend(cfg)(audio), build_frontend(cfg)(audio),
                                   atol=2e-3, rtol=1e-4)


def test_learned_filterbank_has_no_stft_form() -> None:
    with pytest.raises(ValueError, match="'filterbank' has no STFT form"):
        stft_frontend(FrontEndConfig(variant="filterbank"))


def test_stft_variant_exports_for_the_cpu_and_matches_the_student(
        tmp_path: Path, student: torch.nn.Module, spec: ExportSpec,
        real_recording: Path) -> None:
    path = tmp_path / "model.stft.onnx"
    report = export_stft_variant(student, path, spec, real_recording, quiet=True)
    assert report.ok and set(report.max_abs) == {"synthetic", "real"}
    model = onnx.load(str(path))
    assert any("STFT" in f for f in banned_ops(model))
    assert read_manifest(model)["variant"] == "stft"
    # The same graph is refused where TensorRT would get it.
    with pytest.raises(ExportError, match="cannot run: graph: STFT"):
        export_student(with_stft_frontend(student), tmp_path / "trt.onnx", spec)
    assert not (tmp_path / "trt.onnx").exists()


def test_front_end_timing_decides_the_cpu_variant(tmp_path: Path, student: torch.nn.Module,
                                                  spec: ExportSpec,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    timing = measure_frontends(student.config.frontend, spec, tmp_path, repeats=5)
    assert timing.conv_ms > 0 and timing.stft_ms > 0
    path, measured = maybe_export_stft(student, tmp_path / "model.onnx", spec, "auto")
    assert measured is not None and "front end on CPU (1 thread(s), batch 1)" in \
        capsys.readouterr().out
    assert (path is not None) == measured.stft_faster
    assert (path is None) or path.name == "model.stft.onnx"
    assert maybe_export_stft(student, tmp_path / "model.onnx", spec, "never") == (None, None)
    with pytest.raises(ValueError, match="unknown STFT variant mode 'sometimes'"):
        maybe_export_stft(student, tmp_path / "model.onnx", spec, "sometimes")
