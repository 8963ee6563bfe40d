"""The STFT-op variant of a student for CPU bundles, exported only where it is faster.

TensorRT 10 has no STFT op, so every student's front end is a Conv1d DFT basis + mel MatMul
(`distill.frontend`). ONNX Runtime's CPU provider does have an ``STFT`` kernel (an FFT), which
may beat the Conv1d's dense ``2 * bins * win_length`` products per frame. This module builds the
same student with a ``torch.stft`` front end (same window, same kept bins, same mel matrix, so the
same numbers), times both front ends alone in ONNX Runtime on the CPU (`measure_frontends`), and
`maybe_export_stft` writes ``model.stft.onnx`` only when the STFT form is faster. The bundle
lists it first for the ``cpu`` backend (variant ``"stft"``), so `runtime.runners.open_runner`
picks it on the CPU while TensorRT and CUDA keep the Conv1d form.

Only the ``"dft"`` front end has an STFT twin; the learned ``"filterbank"`` variant has none.

    >>> import torch
    >>> from distill.frontend import FrontEndConfig, build_frontend
    >>> cfg = FrontEndConfig(n_fft=400, win_length=320, hop_length=160, n_mels=40)
    >>> conv, stft = build_frontend(cfg), stft_frontend(cfg)
    >>> x = torch.randn(2, 16000)
    >>> bool((conv(x) - stft(x)).abs().max() < 1e-3)
    True
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.spec import ExportSpec

if TYPE_CHECKING:
    from torch import nn

    from distill.frontend import FrontEndConfig

STFT_SUFFIX = ".stft.onnx"
# ONNX Runtime's STFT kernel (1.32, CPU) is a float32 DFT for lengths that are not powers of
# two; on a loud clipped tone it leaks about 1e-5 of power into empty bins, which moves the
# trained test student's logits by up to 0.07 (real audio: under 1e-3). So the STFT variant is
# held to this looser difference and to top-1 agreement with the Conv1d student instead.
STFT_ATOL = 0.1
AGREEMENT_BAR = 0.995


def stft_frontend(config: FrontEndConfig) -> nn.Module:
    """A log-mel module equal to ``build_frontend(config)`` computed with ``torch.stft``."""
    import torch
    from torch import nn

    from distill.frontend import hann_window, mel_matrix

    if config.variant != "dft":
        raise ValueError(f"front-end variant {config.variant!r} has no STFT form; only the fixed "
                         f"'dft' basis does")
    bins = config.kept_bins()
    if bins != list(range(bins[0], bins[-1] + 1)):
        raise ValueError(f"kept DFT bins are not contiguous: {bins}")

    class StftLogMel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.first, self.stop = bins[0], bins[-1] + 1
            self.register_buffer("window", hann_window(config).float(), persistent=False)
            self.register_buffer("mel", mel_matrix(config)[:, bins].float(), persistent=False)

        def forward(self, audio: torch.Tensor) -> torch.Tensor:
            spec = torch.stft(audio, config.n_fft, config.hop_length, config.win_length,
                              window=self.window, center=config.center, pad_mode="constant",
                              onesided=True, return_complex=True)
            spec = torch.view_as_real(spec[:, self.first : self.stop])  # [B, bins, T, 2]
            power = spec[..., 0] ** 2 + spec[..., 1] ** 2
            mel = torch.matmul(self.mel, power)
            return torch.log(mel + config.log_offset).unsqueeze(1)

    return StftLogMel()


def with_stft_frontend(student: nn.Module) -> nn.Module:
    """A copy of ``student`` whose front end is the STFT form (weights shared by value)."""
    twin = copy.deepcopy(student).eval()
    twin.frontend = stft_frontend(student.config.frontend)
    return twin


@dataclass(frozen=True)
class FrontEndTiming:
    """Median ms per batch of each front end alone on ONNX Runtime's CPU provider."""

    conv_ms: float
    stft_ms: float
    batch: int
    threads: int

    @property
    def stft_faster(self) -> bool:
        return self.stft_ms < self.conv_ms

    def line(self) -> str:
        return (f"front end on CPU ({self.threads} thread(s), batch {self.batch}): Conv1d "
                f"{self.conv_ms:.3f} ms, STFT op {self.stft_ms:.3f} ms -> "
                f"{'STFT' if self.stft_faster else 'Conv1d'} is faster")


def _frontend_onnx(module: nn.Module, spec: ExportSpec, path: Path) -> Path:
    import torch

    from export.onnx_export import torch_to_onnx

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"mel": self.inner(audio)}

    import onnx

    onnx.save(torch_to_onnx(Wrap(), _mel_spec(spec)), str(path))
    return path


def _mel_spec(spec: ExportSpec) -> ExportSpec:
    from dataclasses import replace

    return replace(spec, output_names=["mel"])


def measure_frontends(config: FrontEndConfig, spec: ExportSpec, workdir: str | os.PathLike[str],
                      batch: int = 1, threads: int = 1, repeats: int = 20) -> FrontEndTiming:
    """Export both front ends alone and time them on ONNX Runtime's CPU provider."""
    from distill.frontend import build_frontend
    from export.compare import cpu_latency_ms

    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    audio = spec.dummy_input(batch)
    conv = _frontend_onnx(build_frontend(config), spec, folder / "frontend.conv.onnx")
    stft = _frontend_onnx(stft_frontend(config), spec, folder / "frontend.stft.onnx")
    return FrontEndTiming(conv_ms=cpu_latency_ms(conv, audio, threads, repeats),
                          stft_ms=cpu_latency_ms(stft, audio, threads, repeats),
                          batch=batch, threads=threads)


def export_stft_variant(student: nn.Module, out: str | os.PathLike[str], spec: ExportSpec,
                        recording: str | os.PathLike[str] | None = None, quiet: bool = False,
                        ) -> Any:
    """Export the STFT twin to ``out`` (STFT allowed, CPU only) and check it against the
    Conv1d student in torch: the largest difference is printed and must stay within
    `STFT_ATOL`, and top-1 agreement on every task must reach `AGREEMENT_BAR`. Returns the
    `ParityReport`; a failing model is deleted and `ExportError` raised."""
    from dataclasses import replace

    from export.onnx_export import (
        ExportError,
        export_student,
        parity_inputs,
        run_onnx,
        run_torch,
        validate,
    )
    from export.precision import agreement

    path = Path(export_student(with_stft_frontend(student), out, spec, variant="stft",
                               allow_stft=True))
    try:
        report = validate(student, path, replace(spec, atol=max(spec.atol, STFT_ATOL)),
                          recording, quiet=quiet)
        audio = np.concatenate(list(parity_inputs(spec, recording).values()))
        tasks = [n for n in spec.output_names if n.endswith("_logits")]
        scores = agreement(run_torch(student, audio), run_onnx(path, audio), tasks)
        low = {n: v for n, v in scores.items() if v < AGREEMENT_BAR}
        if low:
            raise ExportError(f"{path}: the STFT variant's top-1 agreement with the student is "
                              f"below {AGREEMENT_BAR:.1%}: {low}")
        return report
    except Exception:
        path.unlink(missing_ok=True)
        raise


def maybe_export_stft(student: nn.Module, conv_path: str | os.PathLike[str], spec: ExportSpec,
                      mode: str = "auto", recording: str | os.PathLike[str] | None = None,
                      threads: int = 1, quiet: bool = False,
                      ) -> tuple[Path | None, FrontEndTiming | None]:
    """Beside ``conv_path`` write ``<stem>.stft.onnx`` when ``mode`` is ``always``, or ``auto``
    and the STFT front end is faster on this CPU; ``never`` writes nothing. Returns the path
    (or None) and the timing (None unless measured)."""
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"unknown STFT variant mode {mode!r}; choose auto, always or never")
    config = student.config.frontend
    if mode == "never" or config.variant != "dft":
        return None, None
    conv = Path(conv_path)
    timing = None
    if mode == "auto":
        with tempfile.TemporaryDirectory(prefix="naturelm-frontends-") as tmp:
            timing = measure_frontends(config, spec, tmp, threads=threads)
        if not quiet:
            print(timing.line())
        if not timing.stft_faster:
            return None, timing
    target = conv.with_name(conv.name.removesuffix(".onnx") + STFT_SUFFIX)
    export_stft_variant(student, target, spec, recording, quiet=quiet)
    return target, timing
