"""The student family: presets, outputs, config round trip, MAC counting, ONNX export."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from torch import nn

from distill.frontend import FrontEndConfig
from distill.students import (
    ARCHS,
    SIZES,
    StudentConfig,
    TaskHead,
    build_student,
    count_macs,
    count_parameters,
    student_config,
    task_heads,
)

HEADS = task_heads({"species": ("Kea", "Tui", "Kaka", "Ruru"), "detection": ("Kea", "Tui", "Kaka"),
                    "calltype": ("song", "call")})
BANNED_OPS = {"STFT", "DFT", "HannWindow", "HammingWindow", "BlackmanWindow"}
# Conv / MatMul, elementwise, norms, reductions and shape plumbing: what TensorRT 10 parses.
ALLOWED_OPS = {"Conv", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Log", "Exp",
               "Erf", "Relu", "HardSigmoid", "HardSwish", "Sigmoid", "Softmax",
               "BatchNormalization", "LayerNormalization", "ReduceMean", "Reshape", "Transpose",
               "Squeeze", "Unsqueeze", "Slice", "Concat", "Shape", "Gather", "Constant", "Cast",
               "Identity", "Pad"}
# (min, max) parameters per size: roughly 0.3M, 1.5M and 6M.
PARAM_RANGE = {"s": (0.2e6, 0.45e6), "m": (1.0e6, 2.0e6), "l": (4.5e6, 7.5e6)}


@pytest.fixture(scope="module")
def birds16k(real_recording: Path) -> torch.Tensor:
    audio, rate = sf.read(real_recording, dtype="float32")
    return torch.from_numpy(soxr.resample(audio, rate, 16000).astype(np.float32))


def test_task_heads_take_multi_label_from_the_corpus_tasks() -> None:
    assert HEADS["detection"].multi_label and not HEADS["species"].multi_label
    with pytest.raises(ValueError, match="duplicate"):
        TaskHead(("Kea", "Kea"))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", SIZES)
def test_presets_hit_their_size_and_output_every_head(arch: str, size: str) -> None:
    torch.manual_seed(0)
    model = build_student(student_config(size, arch, tasks=HEADS)).eval()
    low, high = PARAM_RANGE[size]
    assert low <= count_parameters(model) <= high
    with torch.no_grad():
        out = model(torch.randn(2, 12345) * 0.1)
    assert list(out) == ["species_logits", "detection_logits", "calltype_logits", "embedding"]
    assert out["species_logits"].shape == (2, 4) and out["detection_logits"].shape == (2, 3)
    assert out["embedding"].shape == (2, model.config.embedding_dim)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_unknown_presets_raise() -> None:
    with pytest.raises(ValueError, match="unknown student size 'xl'"):
        student_config("xl", tasks=HEADS)
    with pytest.raises(ValueError, match="unknown student arch 'rnn'"):
        student_config("s", "rnn", tasks=HEADS)
    with pytest.raises(ValueError, match="at least one task"):
        student_config("s", tasks={})
    with pytest.raises(ValueError, match="unknown StudentConfig fields"):
        StudentConfig.from_dict({**student_config("s", tasks=HEADS).to_dict(), "depthh": 3})



def test_a_front_end_mapping_overrides_the_sizes_own() -> None:
    """What ``distill fit --model.config '{"frontend": {...}}'`` passes: a plain mapping."""
    cfg = student_config("s", tasks=HEADS, frontend={"n_mels": 64, "fmin": 50.0})
    assert isinstance(cfg.frontend, FrontEndConfig)
    assert (cfg.frontend.n_mels, cfg.frontend.fmin) == (64, 50.0)
    assert cfg.frontend.n_fft == student_config("s", tasks=HEADS).frontend.n_fft  # kept
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown front-end field.*mels; known: center"):
        student_config("s", tasks=HEADS, frontend={"mels": 64})

@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trip_rebuilds_the_same_model(arch: str, birds16k: torch.Tensor) -> None:
    cfg = student_config("s", arch, tasks=HEADS,
                         frontend=FrontEndConfig(n_fft=320, win_length=320, hop_length=320,
                                                 n_mels=48, fmin=100.0, variant="filterbank"))
    data = cfg.to_dict()
    assert data["tasks"]["detection"] == {"labels": ["Kea", "Tui", "Kaka"], "multi_label": True}
    rebuilt_cfg = StudentConfig.from_dict(data)
    assert rebuilt_cfg == cfg
    torch.manual_seed(1)
    model = build_student(cfg)
    model.train()
    model(torch.randn(4, 16000) * 0.1)  # moves the BatchNorm statistics
    model.eval()
    rebuilt = build_student(rebuilt_cfg).eval()
    rebuilt.load_state_dict(model.state_dict())
    audio = birds16k[None, :32000]
    with torch.no_grad():
        a, b = model(audio), rebuilt(audio)
    for name in cfg.output_names:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_students_train_and_the_fixed_dft_takes_no_gradient() -> None:
    model = build_student(student_config("s", tasks=HEADS))
    out = model(torch.randn(3, 8000) * 0.1)
    (out["species_logits"].logsumexp(-1).sum() + out["embedding"].pow(2).mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert not any(n.startswith("frontend.") for n in grads)
    assert grads["backbone.0.weight"] is not None and grads["backbone.0.weight"].abs().sum() > 0


def test_count_macs_matches_hand_counts() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 5, stride=2)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.linear = nn.Linear(4, 3)
            self.proj = nn.Parameter(torch.randn(6, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x.unsqueeze(1))  # [1, 4, 48]
            h = self.dw(h.unsqueeze(-1)).squeeze(-1)  # [1, 4, 48]
            h = self.proj @ h  # [1, 6, 48]
            return self.linear(h.transpose(1, 2)[..., :4])  # [1, 48, 3]

    frames = (100 - 5) // 2 + 1
    expected = 4 * frames * 5 + 4 * frames * 9 + 6 * frames * 4 + frames * 3 * 4
    assert count_macs(Tiny(), 100) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_macs_count_the_front_end_and_scale_with_length(arch: str) -> None:
    model = build_student(student_config("s", arch, tasks=HEADS))
    fe = model.config.frontend
    front = count_macs(model.frontend, 32000)
    assert front == fe.dft_macs(32000) + fe.n_mels * len(fe.kept_bins()) * fe.n_frames(32000)
    whole = count_macs(model, 32000)
    assert front < whole
    assert count_macs(model, 64000) > 1.8 * whole


def _export_and_check(model: nn.Module, path: Path, audio: torch.Tensor) -> str:
    """Dynamo export (TorchScript opset 17 as fallback); check ops and ORT parity. Returns how."""
    import onnx
    import onnxruntime as ort

    names = model.config.output_names
    dims = {"audio": {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("samples")}}
    how = "dynamo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (audio[:2],), str(path), dynamo=True, input_names=["audio"],
                              output_names=names, dynamic_shapes=dims, verbose=False)
        except Exception as exc:  # noqa: BLE001 - we fall back and say why
            how = f"torchscript (dynamo failed: {type(exc).__name__})"
            torch.onnx.export(model, (audio[:2],), str(path), dynamo=False, opset_version=17,
                              input_names=["audio"], output_names=names,
                              dynamic_axes={"audio": {0: "batch", 1: "samples"}})
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert not ops & BANNED_OPS, f"banned ops in the graph: {ops & BANNED_OPS}"
    assert ops <= ALLOWED_OPS, f"ops outside the TensorRT-safe set: {ops - ALLOWED_OPS}"
    assert [o.name for o in graph.graph.output] == names
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for batch in (audio, audio[:1, :12000]):  # another batch size and another length
        got = session.run(names, {"audio": batch.numpy()})
        with torch.no_grad():
            want = model(batch)
        for name, value in zip(names, got, strict=True):
            assert value.shape == tuple(want[name].shape)
            np.testing.assert_allclose(value, want[name].numpy(), atol=1e-4, rtol=0)
    return how


@pytest.mark.slow  # ~10 s each on 2 idle cores (dynamo export + ORT)
@pytest.mark.parametrize("arch", ARCHS)
def test_students_export_to_onnx_without_stft_and_match_torch(
        arch: str, tmp_path: Path, birds16k: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = build_student(student_config("s", arch, tasks=HEADS)).eval()
    audio = torch.stack([birds16k[:48000], birds16k[50000:98000], birds16k[100000:148000]])
    how = _export_and_check(model, tmp_path / "student.onnx", audio)
    assert how == "dynamo"


@pytest.mark.slow
@pytest.mark.parametrize("arch,size,variant", [("cnn", "l", "dft"),
                                               ("transformer", "m", "dft"),
                                               ("cnn", "s", "filterbank")])
def test_other_students_export_too(arch: str, size: str, variant: str, tmp_path: Path,
                                   birds16k: torch.Tensor) -> None:
    base = student_config(size, arch, tasks=HEADS)
    cfg = student_config(size, arch, tasks=HEADS, frontend=FrontEndConfig(
        **{**base.frontend.to_dict(), "variant": variant}))
    model = build_student(cfg).eval()
    audio = torch.stack([birds16k[:32000], birds16k[60000:92000]])
    assert _export_and_check(model, tmp_path / "student.onnx", audio) == "dynamo"
    assert math.isfinite(count_macs(model, 160000))
