"""KD losses: T^2 scaling against a reference, gradients, masks, invariances, the binary form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.losses import TaskTargets, kd_loss, kd_loss_binary, multitask_kd_loss

# float(loss) on a tensor that carries a graph is what these tests mean to do.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _batch(seed: int = 0, batch: int = 6, labels: int = 5) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, labels, generator=gen, dtype=torch.float64) * 2
    teacher = torch.log_softmax(torch.randn(batch, labels, generator=gen, dtype=torch.float64) * 3,
                                -1) - 7.0  # log-likelihoods: any per-clip offset
    hard = torch.randint(0, labels, (batch,), generator=gen)
    return student.requires_grad_(), teacher, hard


def reference_kd(student: np.ndarray, teacher: np.ndarray, hard: np.ndarray, t: float,
                 alpha: float) -> float:
    """Loop reference: mean over clips of T^2 KL(p_t || p_s) and of the cross-entropy."""
    soft, ce = [], []
    for s_row, t_row, y in zip(student, teacher, hard, strict=True):
        p_t = np.exp(t_row / t - np.logaddexp.reduce(t_row / t))
        log_p_s = s_row / t - np.logaddexp.reduce(s_row / t)
        soft.append(t * t * float(np.sum(p_t * (np.log(p_t) - log_p_s))))
        ce.append(float(np.logaddexp.reduce(s_row) - s_row[y]))
    return alpha * float(np.mean(soft)) + (1 - alpha) * float(np.mean(ce))


@pytest.mark.parametrize("t,alpha", [(1.0, 1.0), (2.0, 0.7), (4.0, 0.5), (3.0, 0.0)])
def test_kd_loss_equals_the_reference_with_t_squared(t: float, alpha: float) -> None:
    student, teacher, hard = _batch()
    loss = kd_loss(student, teacher, hard, temperature=t, alpha=alpha)
    ref = reference_kd(student.detach().numpy(), teacher.numpy(), hard.numpy(), t, alpha)
    assert float(loss) == pytest.approx(ref, rel=1e-10)


def test_soft_gradient_is_t_times_probability_difference() -> None:
    student, teacher, _ = _batch(1)
    t = 3.0
    kd_loss(student, teacher, None, temperature=t, alpha=1.0).backward()
    expected = t * (torch.softmax(student.detach() / t, -1) - torch.softmax(teacher / t, -1))
    torch.testing.assert_close(student.grad, expected / student.shape[0])


def test_masked_clips_contribute_nothing_even_with_nan_targets() -> None:
    student, teacher, hard = _batch(2)
    mask = torch.tensor([True, False, True, True, False, True])
    teacher_nan = teacher.clone()
    teacher_nan[~mask] = float("nan")
    loss = kd_loss(student, teacher_nan, hard, temperature=2.0, alpha=0.6, mask=mask)
    sub = kd_loss(student[mask], teacher[mask], hard[mask], temperature=2.0, alpha=0.6)
    assert float(loss) == pytest.approx(float(sub), rel=1e-12)
    loss.backward()
    assert torch.isfinite(student.grad).all() and (student.grad[~mask] == 0).all()


def test_all_masked_is_zero_with_a_graph() -> None:
    student, teacher, _ = _batch(3)
    mask = torch.zeros(6, dtype=torch.bool)
    loss = kd_loss(student, teacher * float("nan"), torch.full((6,), -1), temperature=2.0,
                   alpha=0.5, mask=mask)
    assert float(loss) == 0.0 and loss.requires_grad
    loss.backward()
    assert (student.grad == 0).all()
    probs = torch.full((6, 5), float("nan"), dtype=torch.float64)
    bin_loss = kd_loss_binary(student, probs, None, temperature=2.0, alpha=1.0, mask=mask)
    assert float(bin_loss) == 0.0 and bin_loss.requires_grad


def test_missing_hard_labels_only_drop_the_hard_term() -> None:
    student, teacher, hard = _batch(4)
    partial = hard.clone()
    partial[:3] = -1
    soft = kd_loss(student, teacher, None, temperature=2.0, alpha=1.0)
    hard_part = kd_loss(student[3:], teacher[3:], hard[3:], temperature=2.0, alpha=0.0)
    mixed = kd_loss(student, teacher, partial, temperature=2.0, alpha=0.25)
    assert float(mixed) == pytest.approx(0.25 * float(soft) + 0.75 * float(hard_part), rel=1e-12)


def test_invariances() -> None:
    student, teacher, hard = _batch(5)
    base = float(kd_loss(student, teacher, hard, temperature=2.0, alpha=0.5))
    shift = torch.randn(6, 1, dtype=torch.float64)
    assert float(kd_loss(student + shift, teacher - 3 * shift, hard, temperature=2.0,
                         alpha=0.5)) == pytest.approx(base, rel=1e-10)
    perm = torch.tensor([3, 0, 4, 1, 2])
    inverse = torch.argsort(perm)
    assert float(kd_loss(student[:, perm], teacher[:, perm], inverse[hard], temperature=2.0,
                         alpha=0.5)) == pytest.approx(base, rel=1e-10)
    order = torch.randperm(6)
    assert float(kd_loss(student[order], teacher[order], hard[order], temperature=2.0,
                         alpha=0.5)) == pytest.approx(base, rel=1e-10)
    assert float(kd_loss(teacher.clone(), teacher, None, temperature=5.0, alpha=1.0)) == (
        pytest.approx(0.0, abs=1e-12))


def reference_binary(student: np.ndarray, probs: np.ndarray, hard: np.ndarray, t: float,
                     alpha: float) -> float:
    def sig(x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-x))

    q = sig(np.log(probs / (1 - probs)) / t)
    p = sig(student / t)
    kl = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
    y, s = hard, sig(student)
    bce = -(y * np.log(s) + (1 - y) * np.log(1 - s))
    return alpha * t * t * float(kl.mean()) + (1 - alpha) * float(bce.mean())


@pytest.mark.parametrize("t,alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.2)])
def test_binary_loss_equals_the_reference(t: float, alpha: float) -> None:
    gen = torch.Generator().manual_seed(6)
    student = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    probs = torch.rand(5, 4, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    hard = (torch.rand(5, 4, generator=gen) > 0.5).double()
    loss = kd_loss_binary(student, probs, hard, temperature=t, alpha=alpha)
    ref = reference_binary(student.numpy(), probs.numpy(), hard.numpy(), t, alpha)
    assert float(loss) == pytest.approx(ref, rel=1e-9)


def test_binary_soft_term_vanishes_at_the_teacher_and_masks_rows() -> None:
    probs = torch.tensor([[0.9, 0.2, 0.5], [0.05, 0.6, 0.99]], dtype=torch.float64)
    student = torch.logit(probs).clone().requires_grad_()
    loss = kd_loss_binary(student, probs, None, temperature=2.0, alpha=1.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(student.grad, torch.zeros_like(student))
    hard = torch.tensor([[1.0, 0.0, 1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    only_first = kd_loss_binary(student[:1], probs[:1], hard[:1], temperature=2.0, alpha=0.0)
    both = kd_loss_binary(student, probs, hard, temperature=2.0, alpha=0.0)
    assert float(both) == pytest.approx(float(only_first), rel=1e-12)


def test_multitask_sums_tasks_and_refuses_unknown_heads() -> None:
    student, teacher, hard = _batch(7, labels=3)
    det = torch.randn(6, 3, dtype=torch.float64)
    probs = torch.rand(6, 3, dtype=torch.float64)
    outputs = {"species_logits": student, "detection_logits": det}
    targets = {"species": TaskTargets(teacher, hard), "detection": TaskTargets(probs, None)}
    multi = {"species": False, "detection": True}
    total, per = multitask_kd_loss(outputs, targets, multi, temperature=2.0, alpha=1.0,
                                   weights={"detection": 0.5})
    assert set(per) == {"species", "detection"}
    assert float(total) == pytest.approx(float(per["species"]) + 0.5 * float(per["detection"]))
    assert math.isfinite(float(total))
    with pytest.raises(KeyError, match="no 'calltype_logits' head"):
        multitask_kd_loss(outputs, {"calltype": TaskTargets(teacher, hard)}, multi)


def test_bad_arguments_raise() -> None:
    student, teacher, hard = _batch(8)
    with pytest.raises(ValueError, match="no hard labels"):
        kd_loss(student, teacher, None, temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(student, teacher, hard, temperature=0.0)
    with pytest.raises(ValueError, match="must both be"):
        kd_loss(student, teacher[:, :3], hard)
    with pytest.raises(ValueError, match="mask"):
        kd_loss(student, teacher, hard, mask=torch.ones(5, dtype=torch.bool))


def test_a_label_the_teacher_rules_out_adds_nothing() -> None:
    student, teacher, hard = _batch(9, labels=4)
    ruled_out = teacher.clone()
    ruled_out[:, 3] = float("-inf")
    loss = kd_loss(student, ruled_out, hard, temperature=2.0, alpha=0.5)
    loss.backward()
    assert math.isfinite(float(loss)) and torch.isfinite(student.grad).all()
    # Reference: the teacher's mass renormalised over labels 0..2, the student's over all 4.
    t = 2.0
    p_t = torch.softmax(teacher[:, :3] / t, -1)
    log_p_s = torch.log_softmax(student.detach() / t, -1)[:, :3]
    soft = (t * t * (p_t * (p_t.log() - log_p_s)).sum(-1)).mean()
    ce = torch.nn.functional.cross_entropy(student.detach(), hard)
    assert float(loss) == pytest.approx(float(0.5 * soft + 0.5 * ce), rel=1e-10)
