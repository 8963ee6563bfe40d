"""Knowledge-distillation losses: pure functions on tensors, one call per task.

Single-label tasks (`kd_loss`): the KL divergence between the tempered teacher and student
distributions, ``T**2 * KL(softmax(t / T) || softmax(s / T))`` (Hinton et al.; the ``T**2`` keeps
the soft gradients' scale independent of ``T``), blended with the cross-entropy on the hard label:
``alpha * soft + (1 - alpha) * hard``. The teacher's inputs are its per-label log-likelihoods
(any additive constant per clip cancels in the softmax; ``-inf`` rules a label out).

Multi-label detection (`kd_loss_binary`): each label is a Bernoulli; the teacher's per-label
probability, tempered in logit space, is the soft target of a binary KL on the student's sigmoid,
scaled by ``T**2``; the hard term is binary cross-entropy on 0/1 labels; both are averaged over
labels.

Masking: ``mask[b]`` False means clip ``b`` has no teacher target; it contributes nothing to
either term, even if its target row holds NaN. A hard label of ``-1`` (single-label) or a row of ``-1``
(multi-label) means "no ground truth" for that clip's hard term. Each term is averaged over the
clips that have it; when none has, the term is an exact 0 that still carries a gradient graph.

    >>> import torch
    >>> s = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    >>> t = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), -1)
    >>> kd_loss(s, t, torch.tensor([0]), temperature=2.0, alpha=1.0).item()
    0.0
    >>> loss = kd_loss(s, t, torch.tensor([-1]), temperature=2.0, alpha=0.5,
    ...                mask=torch.tensor([False]))
    >>> loss.item(), loss.requires_grad
    (0.0, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _check(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
           alpha: float, mask: torch.Tensor | None) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher targets "
                         f"{tuple(teacher.shape)} must both be [batch, labels]")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if mask is not None and tuple(mask.shape) != (student.shape[0],):
        raise ValueError(f"mask must be [batch]={student.shape[0]}, got {tuple(mask.shape)}")


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[keep]``; an exact 0 (with a graph through ``values``) when none is kept."""
    import torch

    weights = keep.to(values.dtype)
    return torch.where(keep, values, torch.zeros_like(values)).sum() / weights.sum().clamp(min=1.0)


def kd_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor,
            hard_labels: torch.Tensor | None, temperature: float = 2.0, alpha: float = 0.5,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax distillation for one single-label task; a scalar.

    Args:
        student_logits: ``[batch, labels]``.
        teacher_logprobs: ``[batch, labels]`` teacher log-likelihoods of every label.
        hard_labels: ``[batch]`` label indices, ``-1`` where a clip has no ground truth; None
            when there is no ground truth at all (then ``alpha`` must be 1).
        temperature: ``T``; the soft term is scaled by ``T**2``.
        alpha: weight of the soft term; ``1 - alpha`` weighs the hard term.
        mask: ``[batch]`` bool, False where the clip has no teacher target.
    """
    import torch
    import torch.nn.functional as F

    _check(student_logits, teacher_logprobs, temperature, alpha, mask)
    keep = _keep(mask, student_logits)
    teacher = torch.where(keep[:, None], teacher_logprobs, torch.zeros_like(teacher_logprobs))
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    p_teacher = log_p_teacher.exp()
    # A label the teacher rules out (log-likelihood -inf) adds 0, not 0 * inf.
    terms = p_teacher * (log_p_teacher - log_p_student)
    kl = torch.where(p_teacher > 0, terms, torch.zeros_like(terms)).sum(-1)
    soft = _masked_mean(kl, keep) * temperature**2
    if hard_labels is None:
        if alpha != 1.0:
            raise ValueError(f"alpha={alpha} weighs a hard term, but no hard labels were given")
        return soft
    if tuple(hard_labels.shape) != (student_logits.shape[0],):
        raise ValueError(f"hard labels must be [batch]={student_logits.shape[0]}, "
                         f"got {tuple(hard_labels.shape)}")
    has_label = (hard_labels >= 0) & keep
    ce = F.cross_entropy(student_logits, hard_labels.clamp(min=0).long(), reduction="none")
    return alpha * soft + (1.0 - alpha) * _masked_mean(ce, has_label)


def kd_loss_binary(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                   hard_labels: torch.Tensor | None, temperature: float = 2.0,
                   alpha: float = 0.5, mask: torch.Tensor | None = None,
                   eps: float = 1e-6) -> torch.Tensor:
    """Sigmoid distillation for one multi-label (detection) task; a scalar.

    Args:
        student_logits: ``[batch, labels]``.
        teacher_probs: ``[batch, labels]`` teacher probability that each label is present.
        hard_labels: ``[batch, labels]`` 0/1 ground truth, a row of ``-1`` where a clip has
            none; None when there is no ground truth at all (then ``alpha`` must be 1).
        temperature: ``T``; the teacher's logit and the student's are divided by it.
        alpha: weight of the soft term.
        mask: ``[batch]`` bool, False where the clip has no teacher target.
        eps: teacher probabilities are clipped to ``[eps, 1 - eps]`` before the logit.
    """
    import torch
    import torch.nn.functional as F

    _check(student_logits, teacher_probs, temperature, alpha, mask)
    keep = _keep(mask, student_logits)
    probs = torch.where(keep[:, None], teacher_probs, torch.full_like(teacher_probs, 0.5))
    probs = probs.clamp(eps, 1.0 - eps)
    target = torch.sigmoid(torch.logit(probs) / temperature)
    scaled = student_logits / temperature
    # Binary KL(target || sigmoid(scaled)) = BCE(scaled, target) - H(target), per label.
    entropy = -(target * target.log() + (1 - target) * (1 - target).log())
    kl = F.binary_cross_entropy_with_logits(scaled, target, reduction="none") - entropy
    soft = _masked_mean(kl.mean(-1), keep) * temperature**2
    if hard_labels is None:
        if alpha != 1.0:
            raise ValueError(f"alpha={alpha} weighs a hard term, but no hard labels were given")
        return soft
    if hard_labels.shape != student_logits.shape:
        raise ValueError(f"hard labels must be {tuple(student_logits.shape)}, "
                         f"got {tuple(hard_labels.shape)}")
    has_label = (hard_labels >= 0).all(-1) & keep
    bce = F.binary_cross_entropy_with_logits(
        student_logits, hard_labels.clamp(min=0).to(student_logits.dtype), reduction="none")
    return alpha * soft + (1.0 - alpha) * _masked_mean(bce.mean(-1), has_label)


def _keep(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    import torch

    if mask is None:
        return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)
    return mask.to(device=like.device, dtype=torch.bool)


@dataclass(frozen=True)
class TaskTargets:
    """One task's targets for a batch: teacher scores, hard labels and the target mask.

    ``teacher`` holds log-likelihoods for softmax tasks and probabilities for multi-label ones.
    """

    teacher: torch.Tensor
    hard_labels: torch.Tensor | None
    mask: torch.Tensor | None = None


def multitask_kd_loss(outputs: Mapping[str, torch.Tensor], targets: Mapping[str, TaskTargets],
                      multi_label: Mapping[str, bool], temperature: float = 2.0,
                      alpha: float = 0.5,
                      weights: Mapping[str, float] | None = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the per-task losses over ``targets``; returns (total, {task: loss}).

    ``outputs`` is a student's output dict (``<task>_logits``); a task in ``targets`` that the
    student does not output raises.
    """
    per_task: dict[str, torch.Tensor] = {}
    for task, target in targets.items():
        key = f"{task}_logits"
        if key not in outputs or task not in multi_label:
            raise KeyError(f"task {task!r} has targets but the student has no {key!r} head")
        loss_fn = kd_loss_binary if multi_label[task] else kd_loss
        per_task[task] = loss_fn(outputs[key], target.teacher, target.hard_labels,
                                 temperature=temperature, alpha=alpha, mask=target.mask)
    if not per_task:
        raise ValueError("no task targets given")
    total = sum((weights or {}).get(task, 1.0) * loss for task, loss in per_task.items())
    return total, per_task
