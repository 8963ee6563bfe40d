"""Shared fixtures: the real recording beside the checkout, and hardware-gated markers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_recording() -> Path:
    """birds_10s.wav: real birdsong, 32 kHz mono 16-bit, 10.13 s (opensoundscape, MIT)."""
    path = SHARED_DATA / "birds_10s.wav"
    if not path.exists():
        pytest.fail(f"the real test recording is missing: {path} (shared/ must sit beside the repo)")
    return path


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `cuda` tests without a GPU and `tensorrt` tests without TensorRT and a GPU."""
    cuda = _has_cuda()
    trt = cuda and importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA"))
        if "tensorrt" in item.keywords and not trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and an NVIDIA GPU"))
