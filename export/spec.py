"""One export spec per student family: names, axes, opset, tolerance, dummy input, TensorRT profile.

The spec is what every export stage agrees on (DESIGN.md contract 5, optimum's export configs):
input ``audio`` float32 ``[batch, samples]`` with a dynamic batch and a fixed window, one output
``<task>_logits`` per task and ``embedding``, the opset, the largest absolute difference the ONNX
model may show against torch, and the TensorRT optimisation profile (minimum, optimum and maximum
batch). `spec_for` picks the family's preset from the student config; unknown families raise.

    >>> from distill.students import student_config, task_heads
    >>> cfg = student_config("s", tasks=task_heads({"species": ("Kea", "Tui")}))
    >>> spec = spec_for(cfg, window_s=1.0)
    >>> spec.input_name, spec.output_names, spec.samples, spec.opset
    ('audio', ['species_logits', 'embedding'], 16000, 18)
    >>> spec.dummy_input(2).shape, spec.trt_profile()
    ((2, 16000), {'min': 1, 'opt': 8, 'max': 64})
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from distill.students import StudentConfig

MIN_OPSET = 17
INPUT_NAME = "audio"
# Ops TensorRT 10 cannot parse (and the graph walk refuses in every TensorRT-bound model).
BANNED_OPS = frozenset({"STFT", "DFT", "HannWindow", "HammingWindow", "BlackmanWindow",
                        "MelWeightMatrix"})


@dataclass(frozen=True)
class FamilySpec:
    """What differs between student families: tolerance, opset and TensorRT batch profile."""

    atol: float = 1e-4
    opset: int = 18
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64


# One preset per student family (`StudentConfig.arch`). Attention sums many more products, so
# the transformer gets a looser tolerance.
FAMILIES: dict[str, FamilySpec] = {
    "cnn": FamilySpec(atol=1e-3),
    "transformer": FamilySpec(atol=2e-3),
}


@dataclass(frozen=True)
class ExportSpec:
    """Everything an export stage needs to know about the graph's interface.

    Args:
        family: the student family (``cnn`` or ``transformer``).
        sample_rate: input rate in Hz.
        samples: window length in samples (fixed in the graph; the batch is dynamic).
        output_names: ``<task>_logits`` per task, then ``embedding``.
        opset: ONNX opset (at least 17).
        atol: largest absolute difference allowed between ONNX Runtime and torch (FP32).
        min_batch: TensorRT profile minimum batch.
        opt_batch: TensorRT profile batch the kernels are tuned for.
        max_batch: TensorRT profile maximum batch.
        input_name: the single input, ``audio``.
    """

    family: str
    sample_rate: int
    samples: int
    output_names: list[str]
    opset: int = 18
    atol: float = 1e-3
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    input_name: str = INPUT_NAME

    def __post_init__(self) -> None:
        if self.opset < MIN_OPSET:
            raise ValueError(f"opset {self.opset} is too old; TensorRT and the STFT-free front "
                             f"end need opset >= {MIN_OPSET}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if self.samples <= 0 or self.sample_rate <= 0:
            raise ValueError("samples and sample_rate must be positive")
        if self.atol <= 0:
            raise ValueError(f"atol must be positive, got {self.atol}")

    @property
    def window_s(self) -> float:
        """The window in seconds."""
        return self.samples / self.sample_rate

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Axis 0 of the input and of every output is the batch."""
        return {name: {0: "batch"} for name in [self.input_name, *self.output_names]}

    def dummy_input(self, batch: int = 1, seed: int = 0) -> np.ndarray:
        """Reproducible quiet noise ``[batch, samples]`` float32 (for tracing and smoke runs)."""
        import numpy as np

        rng = np.random.default_rng(seed)
        return (0.05 * rng.standard_normal((batch, self.samples))).astype(np.float32)

    def trt_profile(self) -> dict[str, int]:
        """The optimisation profile in batches, as the engine sidecar records it."""
        return {"min": self.min_batch, "opt": self.opt_batch, "max": self.max_batch}

    def trt_shapes(self) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """``{input: (min_shape, opt_shape, max_shape)}`` for TensorRT's profile."""
        return {self.input_name: ((self.min_batch, self.samples), (self.opt_batch, self.samples),
                                  (self.max_batch, self.samples))}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in the model's metadata and the export report)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportSpec:
        """Rebuild from `to_dict` output."""
        return cls(**data)


def spec_for(config: StudentConfig, window_s: float = 10.0, **overrides: Any) -> ExportSpec:
    """The export spec of ``config``'s family for windows of ``window_s`` seconds.

    Keyword ``overrides`` replace spec fields (for example ``max_batch=256``); an unknown family
    raises listing the known ones.
    """
    if config.arch not in FAMILIES:
        raise ValueError(f"no export spec for student family {config.arch!r}; known: "
                         f"{sorted(FAMILIES)}")
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    family = FAMILIES[config.arch]
    rate = config.frontend.sample_rate
    spec = ExportSpec(family=config.arch, sample_rate=rate, samples=round(window_s * rate),
                      output_names=list(config.output_names), opset=family.opset,
                      atol=family.atol, min_batch=family.min_batch, opt_batch=family.opt_batch,
                      max_batch=family.max_batch)
    return replace(spec, **overrides) if overrides else spec
