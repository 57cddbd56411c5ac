"""Quality-aware gradient regularization, the GRMP-IQA gradient rule (method.md 7).

For every trainable tensor separately, with ``g_q = dL_q/dw`` (quality loss) and
``g_s = dL_s/dw`` (scene-distillation loss)::

    <g_q, g_s> <= 0 (or no g_s):  g = g_q
    otherwise:                    g = g_q - lam * <g_q, g_s> / ||g_s||^2 * g_s

Only ``g`` is applied; ``L_s`` is never minimised directly. The component of the
quality gradient *along* the semantic gradient is removed (over-removed for
``lam > 1``); ``lam = 0`` is plain fine-tuning.

Example:
    >>> import torch
    >>> quality_aware_gradient(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), 1.0)
    tensor([0., 1.])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["gradient_cosine", "quality_aware_gradient", "set_quality_aware_grads"]


def quality_aware_gradient(
    g_quality: torch.Tensor, g_semantic: torch.Tensor | None, lam: float
) -> torch.Tensor:
    """The gradient rule of method.md 7 for one tensor.

    Args:
        g_quality: gradient of the quality loss.
        g_semantic: gradient of the distillation loss, same shape, or ``None`` when the
            tensor gets no gradient from it (the text context).
        lam: regularization strength (5 in the paper; 0 = plain fine-tuning).

    Returns:
        ``g_quality`` itself when ``g_semantic`` is None or ``<g_q, g_s> <= 0``, else
        ``g_q - lam * <g_q, g_s> / ||g_s||^2 * g_s`` (a new tensor).
    """
    if g_semantic is None:
        return g_quality
    if g_semantic.shape != g_quality.shape:
        raise ValueError(
            f"gradient shapes differ: quality {tuple(g_quality.shape)}, "
            f"semantic {tuple(g_semantic.shape)}"
        )
    gq = g_quality.float()
    gs = g_semantic.float()
    dot = torch.sum(gq * gs)
    if not bool(dot > 0):  # also when g_s == 0 (then <g_q, g_s> = 0)
        return g_quality
    coef = lam * dot / torch.sum(gs * gs)
    return (gq - coef * gs).to(g_quality.dtype)


def set_quality_aware_grads(
    params: Sequence[torch.Tensor],
    grads_quality: Sequence[torch.Tensor | None],
    grads_semantic: Sequence[torch.Tensor | None] | None,
    lam: float,
) -> int:
    """Set ``p.grad`` of every parameter to the rule's output; return how many were projected.

    ``grads_semantic`` (or an entry of it) may be None: that tensor keeps ``g_q``.
    A parameter without quality gradient (None) gets ``p.grad = None`` and is skipped
    by the optimiser, as in the released code.
    """
    if len(grads_quality) != len(params) or (
        grads_semantic is not None and len(grads_semantic) != len(params)
    ):
        raise ValueError("one quality (and semantic) gradient per parameter is needed")
    projected = 0
    for i, p in enumerate(params):
        gq = grads_quality[i]
        if gq is None:
            p.grad = None
            continue
        gs = None if grads_semantic is None else grads_semantic[i]
        g = quality_aware_gradient(gq, gs, lam) if lam != 0 else gq
        if g is not gq:
            projected += 1
        p.grad = g.detach().clone() if g is gq else g.detach()
    return projected


def gradient_cosine(
    grads_a: Sequence[torch.Tensor | None], grads_b: Sequence[torch.Tensor | None]
) -> float:
    """Cosine between two gradients over all tensors both have (a diagnostic, as logged
    by the released code); NaN when either is zero."""
    dot = torch.zeros((), dtype=torch.float64)
    na = torch.zeros((), dtype=torch.float64)
    nb = torch.zeros((), dtype=torch.float64)
    for a, b in zip(grads_a, grads_b, strict=True):
        if a is None or b is None:
            continue
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        dot += torch.sum(a64 * b64)
        na += torch.sum(a64 * a64)
        nb += torch.sum(b64 * b64)
    denom = float(torch.sqrt(na * nb))
    return float(dot) / denom if denom > 0 else float("nan")
