"""A trivial baseline per task: logistic regression on each clip's mean log-mel spectrum.

It sees the average spectrum only, not how it changes in time, so it measures how much of a
task a model gets for free from band and loudness. numpy alone: an rfft mel spectrogram,
full-batch accelerated gradient descent (on PCA-whitened features) of an L2-regularised softmax (single-label tasks) or one-vs-rest
sigmoid (detection) model, trained on the train split and scored on the test split next to
chance (single-label: always answering the most common training label; detection: guessing
each label independently at its training prevalence, averaged over repeated draws).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.normal(0, 1, (50, 4)), rng.normal(3, 1, (50, 4))])
    >>> y = np.repeat([0, 1], 50)
    >>> model = fit_softmax(x, y, n_classes=2)
    >>> float((model.predict(x) == y).mean()) > 0.95
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from corpus.records import Record
from corpus.tasks import NONE_LABEL, TASKS

FEATURE_RATE = 16000


@dataclass(frozen=True)
class MelConfig:
    """The log-mel front end: 25 ms Hann frames, 10 ms hop, ``n_mels`` bands up to Nyquist."""

    sample_rate: int = FEATURE_RATE
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 50.0


def mel_filterbank(config: MelConfig) -> np.ndarray:
    """Triangular HTK-mel filters, shape ``[n_mels, n_fft // 2 + 1]``."""
    def to_mel(hz: np.ndarray | float) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (mel / 2595.0) - 1.0)

    freqs = np.fft.rfftfreq(config.n_fft, 1 / config.sample_rate)
    edges = to_hz(np.linspace(to_mel(config.f_min), to_mel(config.sample_rate / 2),
                              config.n_mels + 2))
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (freqs[None, :] - low) / (centre - low)
    fall = (high - freqs[None, :]) / (high - centre)
    return np.maximum(0.0, np.minimum(rise, fall))


def log_mel(audio: np.ndarray, config: MelConfig) -> np.ndarray:
    """Log mel power spectrogram ``[frames, n_mels]`` of mono float audio at the config rate."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.size < config.win_length:
        audio = np.pad(audio, (0, config.win_length - audio.size))
    frames = 1 + (audio.size - config.win_length) // config.hop_length
    index = (np.arange(frames)[:, None] * config.hop_length
             + np.arange(config.win_length)[None, :])
    window = np.hanning(config.win_length + 1)[:-1]
    power = np.abs(np.fft.rfft(audio[index] * window, n=config.n_fft, axis=1)) ** 2
    return np.log(power @ mel_filterbank(config).T + 1e-10)


def mean_log_mel(audio: np.ndarray, config: MelConfig) -> np.ndarray:
    """The clip's feature: its log-mel spectrogram averaged over time, ``[n_mels]``."""
    return log_mel(audio, config).mean(axis=0)


def record_features(records: Sequence[Record], config: MelConfig) -> np.ndarray:
    """Mean log-mel of each record's audio (``[len(records), n_mels]``); each clip read once.

    Audio files go through `runtime.audio.read_audio` (resampled to the config rate), so a bad
    file raises `runtime.errors.AudioError` naming it.
    """
    from runtime.audio import read_audio

    cache: dict[tuple, np.ndarray] = {}
    rows = []
    for record in records:
        if record.audio is not None:
            rows.append(mean_log_mel(_resampled(record), config))
            continue
        if record.file_name is None:
            raise ValueError(f"record {record.id!r} has neither a file nor in-memory audio")
        key = (record.file_name, record.offset_s, record.duration_s)
        if key not in cache:
            audio = read_audio(record.file_name, target_rate=config.sample_rate,
                               offset_s=record.offset_s, duration_s=record.duration_s)
            cache[key] = mean_log_mel(audio, config)
        rows.append(cache[key])
    return np.stack(rows) if rows else np.zeros((0, config.n_mels))


def _resampled(record: Record) -> np.ndarray:
    audio = np.asarray(record.audio, dtype=np.float32)
    rate = record.sample_rate or FEATURE_RATE
    if rate == FEATURE_RATE:
        return audio
    import soxr

    return soxr.resample(audio, rate, FEATURE_RATE, quality="HQ")


@dataclass(frozen=True)
class LinearModel:
    """Whitening plus a linear layer; ``multi_label`` picks sigmoid over softmax."""

    mean: np.ndarray
    projection: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    multi_label: bool = False

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) @ self.projection) @ self.weights + self.bias

    def proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (softmax) or per-label probabilities (sigmoid)."""
        return _activate(self.logits(x), self.multi_label)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices (softmax) or a boolean matrix of labels above 0.5 (sigmoid)."""
        p = self.proba(x)
        return p > 0.5 if self.multi_label else p.argmax(axis=1)


def _activate(z: np.ndarray, multi_label: bool) -> np.ndarray:
    if multi_label:
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _whitening(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and PCA-whitening matrix: mean log-mel bands are strongly correlated, and
    whitened features make gradient descent well conditioned."""
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False).reshape(x.shape[1], x.shape[1])
    values, vectors = np.linalg.eigh(cov)
    values = np.maximum(values, 1e-6 * max(float(values.max()), 1e-12))
    return mean, vectors / np.sqrt(values)


def _fit(x: np.ndarray, targets: np.ndarray, multi_label: bool, l2: float,
         steps: int) -> LinearModel:
    """Nesterov-accelerated gradient descent on whitened features with step 1/L, where L
    bounds the loss curvature (1/2 for softmax, 1/4 for sigmoid, plus ``l2``)."""
    mean, projection = _whitening(x)
    xw = (x - mean) @ projection
    n, d = xw.shape
    lr = 1.0 / ((0.25 if multi_label else 0.5) + l2)
    w, b = np.zeros((d, targets.shape[1])), np.zeros(targets.shape[1])
    w_prev, b_prev = w, b
    for step in range(steps):
        momentum = step / (step + 3)
        look_w, look_b = w + momentum * (w - w_prev), b + momentum * (b - b_prev)
        grad = (_activate(xw @ look_w + look_b, multi_label) - targets) / n
        w_prev, b_prev = w, b
        w = look_w - lr * (xw.T @ grad + l2 * look_w)
        b = look_b - lr * grad.sum(axis=0)
    return LinearModel(mean, projection, w, b, multi_label)


def fit_softmax(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-3,
                steps: int = 500) -> LinearModel:
    """Multinomial logistic regression of class indices ``y`` on features ``x``."""
    targets = np.eye(n_classes)[np.asarray(y, dtype=int)]
    return _fit(np.asarray(x, dtype=float), targets, False, l2, steps)


def fit_one_vs_rest(x: np.ndarray, y: np.ndarray, l2: float = 1e-3,
                    steps: int = 500) -> LinearModel:
    """Independent logistic regressions, one per column of the 0/1 matrix ``y``."""
    return _fit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), True, l2, steps)


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over labels (columns) of F1; a label absent from both counts as F1 = 1."""
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    tp = (truth & predicted).sum(axis=0)
    denominator = truth.sum(axis=0) + predicted.sum(axis=0)
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
    return float(f1.mean())


L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class TaskResult:
    """One task's baseline figure beside chance, and the L2 penalty it used."""

    task: str
    metric: str
    score: float
    chance: float
    labels: int
    train: int
    test: int
    l2: float = 0.0


def _with_none(matrix: np.ndarray) -> np.ndarray:
    """Append the "None" column: set where no other label is."""
    return np.concatenate([matrix, ~matrix.any(axis=1, keepdims=True)], axis=1)


def _detection_targets(records: Sequence[Record], labels: Sequence[str]) -> np.ndarray:
    task = TASKS["detection"]
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(records), len(labels)), dtype=bool)
    for row, record in enumerate(records):
        for label in task.parse(record.output, record.labels or labels):
            out[row, index[label]] = True
    return out


def evaluate_task(task: str, train: Sequence[Record], test: Sequence[Record],
                  x_train: np.ndarray, x_test: np.ndarray, l2: float = 1e-3,
                  steps: int = 500, seed: int = 0) -> TaskResult:
    """Train on ``train`` and score on ``test`` for one task (features given)."""
    labels = [label for label in (train[0].labels or ()) if label != NONE_LABEL]
    if TASKS.get(task) is not None and TASKS[task].multi_label:
        y_train = _detection_targets(train, labels)
        y_test = _detection_targets(test, labels)
        model = fit_one_vs_rest(x_train, y_train, l2, steps)
        score = macro_f1(_with_none(y_test), _with_none(model.predict(x_test)))
        chance = _detection_chance(y_train, y_test, seed)
        return TaskResult(task, "macro-F1", score, chance, len(labels) + 1, len(train), len(test),
                          l2)
    names = sorted({r.output for r in train} | {r.output for r in test} | set(labels))
    index = {name: i for i, name in enumerate(names)}
    y_train = np.array([index[r.output] for r in train])
    y_test = np.array([index[r.output] for r in test])
    model = fit_softmax(x_train, y_train, len(names), l2, steps)
    score = float((model.predict(x_test) == y_test).mean())
    majority = np.bincount(y_train, minlength=len(names)).argmax()
    chance = float((y_test == majority).mean())
    return TaskResult(task, "accuracy", score, chance, len(names), len(train), len(test), l2)


def _detection_chance(y_train: np.ndarray, y_test: np.ndarray, seed: int,
                      draws: int = 50) -> float:
    """Macro-F1 of guessing each label at its training prevalence (mean of ``draws``)."""
    rng = np.random.default_rng(seed)
    prevalence = y_train.mean(axis=0)
    truth = _with_none(y_test)
    scores = [macro_f1(truth, _with_none(rng.random(y_test.shape) < prevalence))
              for _ in range(draws)]
    return float(np.mean(scores))


def run_baseline(records: Sequence[Record], test_split: str = "test",
                 mel: MelConfig | None = None, l2: float | None = None, steps: int = 500
                 ) -> list[TaskResult]:
    """Per task (in the records' order of first appearance): train on "train", score on
    ``test_split``. With ``l2=None`` the penalty is picked from `L2_GRID` on the "valid"
    split (when scoring on "test" and "valid" has records), else 1e-3. Tasks missing from
    train or ``test_split`` are skipped."""
    mel = mel or MelConfig()
    by_task: dict[str, list[Record]] = {}
    for record in records:
        by_task.setdefault(record.task, []).append(record)
    wanted = [r for r in records if r.split in ("train", "valid", test_split)]
    features = dict(zip((r.id for r in wanted), record_features(wanted, mel), strict=True))
    results = []
    for task, task_records in by_task.items():
        parts = {split: [r for r in task_records if r.split == split]
                 for split in ("train", "valid", test_split)}
        if not parts["train"] or not parts[test_split]:
            continue
        x = {split: np.stack([features[r.id] for r in rs]) if rs else None
             for split, rs in parts.items()}
        chosen = l2
        if chosen is None:
            chosen = 1e-3
            if test_split != "valid" and parts["valid"]:
                scores = [evaluate_task(task, parts["train"], parts["valid"], x["train"],
                                        x["valid"], grid_l2, steps).score for grid_l2 in L2_GRID]
                chosen = L2_GRID[int(np.argmax(scores))]
        results.append(evaluate_task(task, parts["train"], parts[test_split], x["train"],
                                     x[test_split], chosen, steps))
    return results


def format_results(results: Sequence[TaskResult]) -> str:
    """A plain-text table: task, metric, baseline, chance, labels, train and test sizes."""
    header = (f"{'task':<10} {'metric':<9} {'baseline':>8} {'chance':>7} {'labels':>6} "
              f"{'train':>6} {'test':>5} {'l2':>6}")
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.task:<10} {r.metric:<9} {_pct(r.score):>8} {_pct(r.chance):>7} "
                     f"{r.labels:>6} {r.train:>6} {r.test:>5} {r.l2:>6g}")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.1f}%"
