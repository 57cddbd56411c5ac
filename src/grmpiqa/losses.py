"""Losses of GRMP-IQA: soft-label quality BCE (method.md 5), scene distillation (7).

Functional, so training loops and tests can call them on plain tensors.

Example:
    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> round(float(quality_loss(logits, torch.tensor([1.0, 0.0]))), 4)
    0.1269
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quality_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft-label binary cross-entropy on the two-way softmax (method.md 5).

    ``L = -mean(y * log p_hq + (1 - y) * log p_lq)`` with ``p = softmax(logits)``,
    ``logits[:, 0]`` the "high quality" class and ``y`` in [0, 1].
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    y = labels.to(logp.dtype).reshape(-1)
    return -(y * logp[:, 0] + (1.0 - y) * logp[:, 1]).mean()


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Scene-knowledge distillation (method.md 7).

    ``mean over batch of sum_k -softmax(t/T)_k * log_softmax(u/T)_k * T^2``.
    """
    t = temperature
    target = F.softmax(teacher_logits.float() / t, dim=-1)
    logq = F.log_softmax(student_logits.float() / t, dim=-1)
    return -(target * logq).sum(dim=-1).mean() * (t * t)
