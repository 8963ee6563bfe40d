"""The student family: one size dial (``s``, ``m``, ``l``), a CNN and a small transformer.

Every student takes raw audio ``[batch, samples]`` at its front end's rate (any length), turns it
into log-mel with `distill.frontend` (Conv1d + MatMul only, so it exports without an STFT op) and
returns ``{"<task>_logits": [batch, labels], ..., "embedding": [batch, embedding_dim]}``.

- ``arch="cnn"``: MobileNetV3-style inverted residual blocks with squeeze-excitation on log-mel,
  as the EfficientAT students, scaled by a width multiplier; global mean pooling; an embedding.
- ``arch="transformer"``: a two-layer strided conv stem, frame tokens, a depthwise-conv position
  encoding (any length), pre-norm encoder layers, mean pooling; an embedding.

One head per task: softmax tasks get logits over their labels, multi-label (detection) tasks get
per-label sigmoid logits. `StudentConfig` holds all of it and round-trips through a plain dict,
which is what checkpoints and exports store.

    >>> import torch
    >>> heads = {"species": TaskHead(("Kea", "Tui", "Kaka")),
    ...          "detection": TaskHead(("Kea", "Tui", "Kaka"), multi_label=True)}
    >>> cfg = student_config("s", tasks=heads)
    >>> model = build_student(cfg).eval()
    >>> out = model(torch.zeros(2, 16000))
    >>> sorted(out), tuple(out["species_logits"].shape)
    (['detection_logits', 'embedding', 'species_logits'], (2, 3))
    >>> StudentConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from distill.frontend import FrontEndConfig, build_frontend

if TYPE_CHECKING:
    import torch
    from torch import nn

ARCHS = ("cnn", "transformer")
SIZES = ("s", "m", "l")

# MobileNetV3-Large blocks: (kernel, expanded channels, out channels, squeeze-excite,
# hard-swish activation, stride), the EfficientAT backbone before width scaling.
MBV3_BLOCKS: tuple[tuple[int, int, int, bool, bool, int], ...] = (
    (3, 16, 16, False, False, 1),
    (3, 64, 24, False, False, 2),
    (3, 72, 24, False, False, 1),
    (5, 72, 40, True, False, 2),
    (5, 120, 40, True, False, 1),
    (5, 120, 40, True, False, 1),
    (3, 240, 80, False, True, 2),
    (3, 200, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 184, 80, False, True, 1),
    (3, 480, 112, True, True, 1),
    (3, 672, 112, True, True, 1),
    (5, 672, 160, True, True, 2),
    (5, 960, 160, True, True, 1),
    (5, 960, 160, True, True, 1),
)


@dataclass(frozen=True)
class TaskHead:
    """One task's output: its labels in logit order, and sigmoid (multi-label) or softmax."""

    labels: tuple[str, ...]
    multi_label: bool = False

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("a task head needs at least one label")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"duplicate labels in task head: {list(self.labels)}")
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))


def task_heads(label_sets: Mapping[str, Sequence[str]],
               multi_label: Iterable[str] | None = None) -> dict[str, TaskHead]:
    """Heads for ``{task: labels}``; ``multi_label`` defaults to the corpus tasks flagged so."""
    if multi_label is None:
        from corpus.tasks import TASKS

        multi = {name for name, task in TASKS.items() if task.multi_label}
    else:
        multi = set(multi_label)
    return {name: TaskHead(tuple(labels), name in multi) for name, labels in label_sets.items()}


@dataclass(frozen=True)
class StudentConfig:
    """Everything needed to rebuild a student; saved in every checkpoint and export.

    Args:
        tasks: ``{task: TaskHead}``, one output ``<task>_logits`` each, in this order.
        arch: ``"cnn"`` or ``"transformer"``.
        size: the preset name it came from (``"s"``, ``"m"``, ``"l"`` or ``"custom"``).
        frontend: the log-mel front end.
        embedding_dim: width of the ``embedding`` output.
        width_mult: CNN channel multiplier on the MobileNetV3 blocks (rounded to multiples of 8).
        n_blocks: CNN blocks kept from `MBV3_BLOCKS` (from the start).
        dim: transformer token width.
        depth: transformer encoder layers.
        heads: transformer attention heads.
        mlp_ratio: transformer MLP width / dim.
        dropout: dropout before the heads (training only).
    """

    tasks: dict[str, TaskHead]
    arch: str = "cnn"
    size: str = "custom"
    frontend: FrontEndConfig = field(default_factory=FrontEndConfig)
    embedding_dim: int = 128
    width_mult: float = 0.4
    n_blocks: int = len(MBV3_BLOCKS)
    dim: int = 112
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown student arch {self.arch!r}; known: {ARCHS}")
        if not self.tasks:
            raise ValueError("a student needs at least one task")
        for name, head in self.tasks.items():
            if not isinstance(head, TaskHead):
                raise TypeError(f"task {name!r}: expected a TaskHead, got {type(head).__name__}")
            if name == "embedding" or not name.isidentifier():
                raise ValueError(f"task name {name!r} cannot name an output")
        if not 1 <= self.n_blocks <= len(MBV3_BLOCKS):
            raise ValueError(f"n_blocks must be in 1..{len(MBV3_BLOCKS)}, got {self.n_blocks}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        if self.embedding_dim <= 0 or self.width_mult <= 0:
            raise ValueError("embedding_dim and width_mult must be positive")

    @property
    def output_names(self) -> list[str]:
        """Model outputs in order: ``<task>_logits`` per task, then ``embedding``."""
        return [f"{name}_logits" for name in self.tasks] + ["embedding"]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the checkpoint and export form)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["frontend"] = self.frontend.to_dict()
        data["tasks"] = {name: {"labels": list(head.labels), "multi_label": head.multi_label}
                         for name, head in self.tasks.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudentConfig:
        """Rebuild from `to_dict` output; unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown StudentConfig fields: {unknown}")
        values = dict(data)
        values["frontend"] = FrontEndConfig.from_dict(dict(data.get("frontend", {})))
        values["tasks"] = {name: TaskHead(tuple(head["labels"]), bool(head["multi_label"]))
                           for name, head in data["tasks"].items()}
        return cls(**values)


# Front ends per size, chosen with benchmarks/frontend_speed.py (10 s window, 1 CPU thread, best
# of 30, MACs including the mel MatMul, ms in torch / ONNX Runtime). A 512-point DFT of all bins:
# 279 MMACs, 7.9 / 4.0 ms at a 10 ms hop; 140 MMACs, 2.2 / 2.1 ms at 20 ms. Here s: 55 MMACs,
# 1.0 / 0.84 ms; m: 86 MMACs, 1.5 / 1.3 ms; l: 172 MMACs, 2.9 / 2.7 ms. Shorter DFTs (50 and
# 40 Hz bins), only the bins the mel filters use, and a 20 ms hop for s and m (l keeps 10 ms).
# The learned "filterbank" variant cuts s's front end to 15 MMACs, 0.46 / 0.33 ms.
FRONTENDS: dict[str, FrontEndConfig] = {
    "s": FrontEndConfig(n_fft=320, win_length=320, hop_length=320, n_mels=48, fmin=100.0),
    "m": FrontEndConfig(n_fft=400, win_length=400, hop_length=320, n_mels=64, fmin=50.0),
    "l": FrontEndConfig(n_fft=400, win_length=400, hop_length=160, n_mels=64, fmin=50.0),
}

PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("cnn", "s"): {"width_mult": 0.3, "embedding_dim": 128},
    ("cnn", "m"): {"width_mult": 0.65, "embedding_dim": 256},
    ("cnn", "l"): {"width_mult": 1.35, "embedding_dim": 512},
    ("transformer", "s"): {"dim": 112, "depth": 2, "heads": 4, "embedding_dim": 128},
    ("transformer", "m"): {"dim": 224, "depth": 3, "heads": 4, "embedding_dim": 256},
    ("transformer", "l"): {"dim": 352, "depth": 5, "heads": 8, "embedding_dim": 512},
}


def student_config(size: str, arch: str = "cnn", *, tasks: Mapping[str, TaskHead],
                   frontend: FrontEndConfig | Mapping[str, Any] | None = None,
                   **overrides: Any) -> StudentConfig:
    """The named preset ``size`` (``s``, ``m``, ``l``: about 0.3M, 1.5M, 6M parameters).

    Unknown sizes or archs raise; ``frontend`` and keyword ``overrides`` replace preset fields.
    A mapping ``frontend`` (as ``distill fit --model.config '{"frontend": {"n_mels": 64}}'``
    gives) overrides fields of the size's own front end; unknown keys raise.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown student arch {arch!r}; known: {ARCHS}")
    if size not in SIZES:
        raise ValueError(f"unknown student size {size!r}; known: {SIZES}")
    if isinstance(frontend, Mapping):
        known = {f.name for f in fields(FrontEndConfig)}
        unknown = sorted(set(frontend) - known)
        if unknown:
            raise ValueError(f"unknown front-end field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        frontend = replace(FRONTENDS[size], **frontend)
    cfg = StudentConfig(tasks=dict(tasks), arch=arch, size=size,
                        frontend=frontend or FRONTENDS[size], **PRESETS[(arch, size)])
    return replace(cfg, **overrides) if overrides else cfg


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _cnn_backbone(cfg: StudentConfig) -> tuple[nn.Module, int]:
    """MobileNetV3 features on ``[B, 1, mels, frames]``; returns the module and its channels."""
    import torch
    from torch import nn

    class SqueezeExcite(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            hidden = _make_divisible(channels / 4)
            self.reduce = nn.Conv2d(channels, hidden, 1)
            self.expand = nn.Conv2d(hidden, channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = x.mean((2, 3), keepdim=True)
            scale = nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(scale))))
            return x * scale

    def conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int,
                act: type[nn.Module] | None) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2,
                                             groups=groups, bias=False), nn.BatchNorm2d(c_out)]
        return layers + ([act()] if act is not None else [])

    class InvertedResidual(nn.Module):
        def __init__(self, c_in: int, kernel: int, c_exp: int, c_out: int, se: bool,
                     hswish: bool, stride: int) -> None:
            super().__init__()
            act = nn.Hardswish if hswish else nn.ReLU
            layers = [] if c_exp == c_in else conv_bn(c_in, c_exp, 1, 1, 1, act)
            layers += conv_bn(c_exp, c_exp, kernel, stride, c_exp, act)
            layers += [SqueezeExcite(c_exp)] if se else []
            layers += conv_bn(c_exp, c_out, 1, 1, 1, None)
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and c_in == c_out

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.block(x)
            return x + out if self.residual else out

    width = cfg.width_mult
    c_in = _make_divisible(16 * width)
    layers: list[nn.Module] = conv_bn(1, c_in, 3, 2, 1, nn.Hardswish)
    for kernel, c_exp, c_out, se, hswish, stride in MBV3_BLOCKS[: cfg.n_blocks]:
        c_exp, c_out = _make_divisible(c_exp * width), _make_divisible(c_out * width)
        layers.append(InvertedResidual(c_in, kernel, c_exp, c_out, se, hswish, stride))
        c_in = c_out
    c_last = 6 * c_in
    layers += conv_bn(c_in, c_last, 1, 1, 1, nn.Hardswish)
    return nn.Sequential(*layers), c_last


def _transformer_backbone(cfg: StudentConfig) -> tuple[nn.Module, int]:
    """Conv stem, frame tokens, conv position encoding, pre-norm encoder, mean pooling."""
    import torch
    from torch import nn

    class Gelu(nn.Module):
        """Exact GELU written with erf, so ONNX gets Erf (TensorRT-safe) rather than Gelu-20."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.5 * x * (1.0 + torch.erf(x * 0.7071067811865476))

    class Attention(nn.Module):
        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads, self.scale = heads, 1.0 / math.sqrt(dim // heads)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.out = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, tokens, dim = x.shape
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
            mixed = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tokens, dim)
            return self.out(mixed)

    class Layer(nn.Module):
        def __init__(self, dim: int, heads: int, hidden: int) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = Attention(dim, heads)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), Gelu(), nn.Linear(hidden, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class Encoder(nn.Module):
        def __init__(self, config: StudentConfig) -> None:
            super().__init__()
            dim, stem = config.dim, max(16, config.dim // 4)
            self.stem = nn.Sequential(
                nn.Conv2d(1, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), Gelu(),
                nn.Conv2d(stem, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), Gelu())
            mels = config.frontend.n_mels
            stem_mels = ((mels + 1) // 2 + 1) // 2
            self.embed = nn.Linear(stem * stem_mels, dim)
            self.pos = nn.Conv1d(dim, dim, 15, padding=7, groups=dim)
            self.pos_act = Gelu()
            self.layers = nn.ModuleList(
                Layer(dim, config.heads, int(dim * config.mlp_ratio)) for _ in range(config.depth))
            self.norm = nn.LayerNorm(dim)

        def forward(self, mel: torch.Tensor) -> torch.Tensor:
            x = self.stem(mel)  # [B, C, F', T']
            x = self.embed(x.flatten(1, 2).transpose(1, 2))  # [B, T', dim]
            x = x + self.pos_act(self.pos(x.transpose(1, 2))).transpose(1, 2)
            for layer in self.layers:
                x = layer(x)
            return self.norm(x).mean(1)

    return Encoder(cfg), cfg.dim


def build_student(cfg: StudentConfig) -> nn.Module:
    """A fresh student for ``cfg``: ``forward(audio [B, samples]) -> {name: tensor}``."""
    from torch import nn

    class Student(nn.Module):
        """Front end, input normalisation per mel band, backbone, embedding, one head per task."""

        def __init__(self, config: StudentConfig) -> None:
            super().__init__()
            self.config = config
            self.frontend = build_frontend(config.frontend)
            self.norm = nn.BatchNorm1d(config.frontend.n_mels)
            if config.arch == "cnn":
                self.backbone, features = _cnn_backbone(config)
            else:
                self.backbone, features = _transformer_backbone(config)
            self.embed = nn.Sequential(nn.Linear(features, config.embedding_dim), nn.Hardswish())
            self.dropout = nn.Dropout(config.dropout)
            self.heads = nn.ModuleDict({name: nn.Linear(config.embedding_dim, len(head.labels))
                                        for name, head in config.tasks.items()})

        def forward(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
            mel = self.norm(self.frontend(audio).squeeze(1)).unsqueeze(1)
            features = self.backbone(mel)
            if features.dim() == 4:
                features = features.mean((2, 3))
            embedding = self.embed(features)
            hidden = self.dropout(embedding)
            out = {f"{name}_logits": head(hidden) for name, head in self.heads.items()}
            out["embedding"] = embedding
            return out

    return Student(cfg)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``model`` (the fixed DFT basis is a buffer and is not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, samples: int, batch: int = 1,
               inputs: torch.Tensor | None = None) -> int:
    """Multiply-accumulates of one forward pass on ``[batch, samples]`` audio.

    Counts every convolution, linear layer and matrix product (``matmul``, ``bmm``, ``@``) by
    intercepting those calls while the model runs; elementwise ops, norms and pooling are not
    counted. ``model`` may be a whole student or a part (e.g. ``student.frontend``); pass
    ``inputs`` to feed something other than zeros of ``[batch, samples]``.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    convs = {torch.conv1d, torch.conv2d, torch.nn.functional.conv1d, torch.nn.functional.conv2d}
    linears = {torch.nn.functional.linear}
    products = {torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__}

    class Counter(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.macs = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func in convs:
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                self.macs += out.numel() * weight[0].numel()
            elif func in linears:
                self.macs += out.numel() * args[0].shape[-1]
            elif func in products:
                self.macs += out.numel() * args[0].shape[-1]
            return out

    x = inputs if inputs is not None else torch.zeros(batch, samples)
    was_training = model.training
    model.eval()
    counter = Counter()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.macs
