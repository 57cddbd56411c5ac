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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DeferredRuleStats",
    "first_nonfinite",
    "RuleStats",
    "apply_quality_aware_grads",
    "quality_aware_gradient",
    "set_quality_aware_grads",
]


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
    return _rule(g_quality, g_semantic, lam)[0]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b>`` over all elements, accumulated in at least fp32, without temporaries."""
    a1, b1 = a.reshape(-1), b.reshape(-1)
    if a1.dtype not in (torch.float32, torch.float64):
        a1, b1 = a1.float(), b1.float()
    return torch.dot(a1, b1)


def _rule(
    g_quality: torch.Tensor, g_semantic: torch.Tensor | None, lam: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rule output, ``<g_q, g_s>`` or None)."""
    if g_semantic is None:
        return g_quality, None
    if g_semantic.shape != g_quality.shape:
        raise ValueError(
            f"gradient shapes differ: quality {tuple(g_quality.shape)}, "
            f"semantic {tuple(g_semantic.shape)}"
        )
    dot = _dot(g_quality, g_semantic)
    if not bool(dot > 0):  # also when g_s == 0 (then <g_q, g_s> = 0)
        return g_quality, dot
    coef = (lam * dot / _dot(g_semantic, g_semantic)).to(g_quality.dtype)
    return torch.addcmul(g_quality, g_semantic, coef, value=-1.0), dot


@dataclass
class RuleStats:
    """What one application of the rule did, summed over tensors.

    Attributes:
        projected: tensors whose gradient was changed (``<g_q, g_s> > 0``).
        tensors: tensors with a quality gradient.
        cosine: cosine between the whole g_q and g_s (over tensors that have both);
            the released code logs this angle. NaN when not computed.
    """

    projected: int = 0
    tensors: int = 0
    cosine: float = float("nan")


@dataclass
class DeferredRuleStats:
    """:class:`RuleStats` left on the device (no host synchronisation): ``projected``
    a 0-d integer tensor, ``cosine`` a 0-d float64 tensor or None when not measured.
    :meth:`materialize` reads them (one synchronisation)."""

    projected: torch.Tensor
    tensors: int
    cosine: torch.Tensor | None = None

    def materialize(self) -> RuleStats:
        return RuleStats(
            int(self.projected),
            self.tensors,
            float(self.cosine) if self.cosine is not None else float("nan"),
        )


def _rule_deferred(
    g_quality: torch.Tensor, g_semantic: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rule without reading ``<g_q, g_s> > 0`` on the host: ``(g, dot, projected)``.

    Where the rule projects, ``g`` is computed by the very operations of :func:`_rule`
    (same bits); elsewhere it is ``g_q - 0 * g_s``, which equals ``g_q`` exactly for
    finite gradients.
    """
    if g_semantic.shape != g_quality.shape:
        raise ValueError(
            f"gradient shapes differ: quality {tuple(g_quality.shape)}, "
            f"semantic {tuple(g_semantic.shape)}"
        )
    dot = _dot(g_quality, g_semantic)
    projected = dot > 0
    coef = torch.where(projected, lam * dot / _dot(g_semantic, g_semantic), 0.0)
    return (
        torch.addcmul(g_quality, g_semantic, coef.to(g_quality.dtype), value=-1.0),
        dot,
        projected,
    )


def apply_quality_aware_grads(
    params: Sequence[torch.Tensor],
    grads_quality: Sequence[torch.Tensor | None],
    grads_semantic: Sequence[torch.Tensor | None] | None,
    lam: float,
    *,
    cosine: bool = False,
) -> DeferredRuleStats:
    """:func:`set_quality_aware_grads` without host synchronisation (issue 21).

    Sets ``p.grad`` to the same values: the choice "project or keep g_q" is made on the
    device (``torch.where``), and the statistics stay on the device until read. This is
    what the fine-tuning loop runs, so a GPU never waits for the host inside an epoch.
    """
    if len(grads_quality) != len(params) or (
        grads_semantic is not None and len(grads_semantic) != len(params)
    ):
        raise ValueError("one quality (and semantic) gradient per parameter is needed")
    tensors = 0
    flags: list[torch.Tensor] = []
    dots: list[torch.Tensor] = []
    qq: list[torch.Tensor] = []
    ss: list[torch.Tensor] = []
    device: torch.device | None = None
    for i, p in enumerate(params):
        gq = grads_quality[i]
        if gq is None:
            p.grad = None
            continue
        tensors += 1
        device = gq.device
        gs = None if grads_semantic is None else grads_semantic[i]
        g = gq
        if gs is not None and (lam != 0 or cosine):
            if lam != 0:
                g, dot, projected = _rule_deferred(gq, gs, lam)
                flags.append(projected)
            else:
                dot = _dot(gq, gs)
            if cosine:
                dots.append(dot)
                qq.append(_dot(gq, gq))
                ss.append(_dot(gs, gs))
        p.grad = g.detach()
    count = (
        torch.stack(flags).sum()
        if flags
        else torch.zeros((), dtype=torch.int64, device=device or torch.device("cpu"))
    )
    cos: torch.Tensor | None = None
    if dots:
        denom = (torch.stack(qq).double().sum() * torch.stack(ss).double().sum()).sqrt()
        cos = torch.where(
            denom > 0, torch.stack(dots).double().sum() / denom, torch.full_like(denom, math.nan)
        )
    return DeferredRuleStats(count, tensors, cos)


def set_quality_aware_grads(
    params: Sequence[torch.Tensor],
    grads_quality: Sequence[torch.Tensor | None],
    grads_semantic: Sequence[torch.Tensor | None] | None,
    lam: float,
    *,
    cosine: bool = False,
) -> RuleStats:
    """Set ``p.grad`` of every parameter to the rule's output (method.md 7).

    ``grads_semantic`` (or an entry of it) may be None: that tensor keeps ``g_q``.
    A parameter without quality gradient (None) gets ``p.grad = None`` and is skipped
    by the optimiser, as in the released code. ``cosine`` also measures the cosine
    between g_q and g_s (a diagnostic; costs two more dot products per tensor).
    (:func:`apply_quality_aware_grads`, then its statistics read.)
    """
    return apply_quality_aware_grads(
        params, grads_quality, grads_semantic, lam, cosine=cosine
    ).materialize()


_POSITIONS: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}


def first_nonfinite(tensors: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(any tensor non-finite, index of the first) as 0-d device tensors, without a sync
    (``None`` entries count as finite).

    One max-abs per tensor (``torch._foreach_norm``, a single multi-tensor kernel on a
    GPU): NaN and infinities propagate into it, finite values never overflow it.
    """
    present = [(i, t) for i, t in enumerate(tensors) if t is not None]
    if not present:
        false = torch.zeros((), dtype=torch.bool)
        return false, torch.zeros((), dtype=torch.long)
    norms = torch._foreach_norm([t.detach() for _, t in present], float("inf"))
    bad = ~torch.isfinite(torch.stack([n.float() for n in norms]))
    key = (tuple(i for i, _ in present), str(bad.device))
    where = _POSITIONS.get(key)
    if where is None:  # built once per pattern: no copy to the device per step
        where = _POSITIONS[key] = torch.tensor(key[0], device=bad.device)
    first = bad.int().argmax().reshape(1)  # index_select: the index is never read on the host
    return bad.any(), where.index_select(0, first).squeeze(0)
