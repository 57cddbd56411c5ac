"""Several stage-1 tasks in one forward pass: the prompts stacked (issue 21, method.md 6).

Stage 1 (``reptile``) adapts a fresh copy of the prompts to every task; the tasks of a
meta-step are independent until the outer step. A GPU is idle between the kernels of
one task's tiny batches (16 support / 4 query images), so :class:`StackedQualityModel`
runs ``T`` tasks' copies at once: the images of all tasks form one batch through the
frozen CLIP, and only what the prompts touch is per task -

* visual prompts: ``prompt_embeddings`` ``[T, 1, P, W]``, ``deep_prompt_embeddings``
  ``[T, L, P, W]``, ``prompt_proj`` (a batched matrix product) and ``prompt_norm``
  (layer norm, then each task's affine map), each task's rows to its own images;
* text context ``[T, n_ctx, W]``: the two quality prompts of every task in one pass of
  the text tower;
* logits per task (``[T, B, 2]``) and the loss per task (:func:`task_quality_losses`).

The sum of the tasks' losses has, for every task's copy, exactly that task's gradient
(each loss depends on its own copy only), and Adam is elementwise, so one optimiser over
the stacked copies is ``T`` independent Adams.

Exact and reassociated: every operation a task sees is the serial one's on the same
numbers, except that matrix products run over ``T`` times more rows (and the prompt
projection as a batched product, the prompt norm's affine map as a separate multiply-add),
which may round differently: the batched inner loop equals the serial one to float
rounding (tested on the tiny backbone: see tests/test_task_batch.py for the tolerance),
not bit for bit. Prompt dropout draws each task's masks from a generator seeded like the
serial path's (on the CPU: the same masks, bit for bit; on a GPU the serial path uses the
fused dropout kernel, whose masks come from another stream).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from grmpiqa.model import QualityModel
from grmpiqa.precision import autocast
from grmpiqa.prompts import l2_normalize
from grmpiqa.towers import PromptedVisionTower

__all__ = ["StackedPrompts", "StackedQualityModel", "task_quality_losses"]

_VISUAL = "visual."


class StackedPrompts:
    """``T`` copies of a model's visual prompts for a batch of ``T * per_task`` images
    (task-major: the first ``per_task`` images are task 0's). A
    :class:`~grmpiqa.towers.PromptSource`.

    Args:
        base: the model's :class:`~grmpiqa.prompts.VisualPrompts` (shapes, eps, dropout).
        tensors: stacked copies of its parameters by their names in ``base``
            (``prompt_embeddings``, ``prompt_proj.weight``, ...), each ``[T, ...]``.
        generators: one per task, for prompt dropout (None: no dropout).
    """

    def __init__(
        self,
        base: Any,
        tensors: Mapping[str, torch.Tensor],
        generators: Sequence[torch.Generator] | None,
    ) -> None:
        self.base = base
        self.num_tokens = int(base.num_tokens)
        self.deep_layers = int(base.deep_layers)
        self.dropout = float(base.prompt_dropout.p)
        self.bind(tensors, generators)

    def bind(
        self, tensors: Mapping[str, torch.Tensor], generators: Sequence[torch.Generator] | None
    ) -> None:
        """Use other stacked copies (and dropout generators) from now on."""
        self.tensors = tensors
        self.generators = generators
        self.tasks = int(tensors["prompt_embeddings"].shape[0])

    def replaces(self, block: int) -> bool:
        return bool(self.base.replaces(block))

    def prompts(self, block: int, batch: int) -> torch.Tensor:
        """``dropout(proj(p))`` entering ``block`` for every image: ``[batch, P, W]``."""
        t = self.tensors
        if block == 0:
            p = t["prompt_embeddings"][:, 0]
        else:
            p = t["deep_prompt_embeddings"][:, block - 1]
        w, b = t["prompt_proj.weight"], t["prompt_proj.bias"]
        proj = torch.baddbmm(b.unsqueeze(1), p, w.transpose(1, 2))  # [T, P, W]
        per = batch // self.tasks
        x = proj.unsqueeze(1).expand(self.tasks, per, *proj.shape[1:])
        x = x.reshape(batch, *proj.shape[1:])
        if self.generators is None or self.dropout == 0.0:
            return x
        keep = 1.0 - self.dropout
        shape = (per, *proj.shape[1:])
        noise = torch.cat(
            [
                torch.empty(shape, dtype=x.dtype, device=x.device)
                .bernoulli_(keep, generator=g)
                .div_(keep)
                for g in self.generators
            ]
        )
        return x * noise  # F.dropout's arithmetic: input * (bernoulli(1 - p) / (1 - p))

    def prompt_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Layer norm of every token, then each task's affine map."""
        w, b = self.tensors["prompt_norm.weight"], self.tensors["prompt_norm.bias"]
        y = F.layer_norm(x, (x.shape[-1],), None, None, self.base.prompt_norm.eps)
        y = y.view(self.tasks, -1, *x.shape[1:])
        y = y * w.view(self.tasks, 1, 1, -1).to(y.dtype) + b.view(self.tasks, 1, 1, -1).to(y.dtype)
        return y.view(x.shape)


class StackedQualityModel:
    """Quality logits of ``T`` stacked copies of a model's stage-1 prompts.

    ``params`` (to :meth:`logits`) maps the model's trainable prompt names
    (``prompt_learner.ctx``, ``visual.*``) to ``[T, ...]`` tensors; anything not given
    is the model's own (e.g. hand prompts). The frozen CLIP is the model's, shared.
    """

    def __init__(self, model: QualityModel) -> None:
        self.model = model
        self._prompts: StackedPrompts | None = None
        self._tower: PromptedVisionTower | None = None

    def _image_tower(
        self,
        visual: Mapping[str, torch.Tensor],
        generators: Sequence[torch.Generator] | None,
    ) -> PromptedVisionTower:
        m = self.model
        if m.visual is None or not visual:
            return m.image_tower
        if self._prompts is None or self._tower is None:
            self._prompts = StackedPrompts(m.visual, visual, generators)
            self._tower = PromptedVisionTower(m.adapter.image, self._prompts)
        else:
            self._prompts.bind(visual, generators)
        return self._tower

    def logits(
        self,
        params: Mapping[str, torch.Tensor],
        images: torch.Tensor,
        generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """``[T, B, 2]`` quality logits of ``images`` ``[T * B, 3, H, W]`` (task-major),
        task ``t``'s images seen through copy ``t`` (train-mode dropout when
        ``generators`` are given)."""
        m = self.model
        tasks = _tasks(params)
        visual = {k[len(_VISUAL) :]: v for k, v in params.items() if k.startswith(_VISUAL)}
        tower = self._image_tower(visual, generators)
        emb = l2_normalize(tower(images))
        v = emb.view(tasks, -1, emb.shape[-1])
        text = self.text_features(params, tasks)  # [T, 2, D]
        # as QualityModel.logits_from_features: (s * v) @ t.T
        return torch.bmm(m.logit_scale * v, text.transpose(1, 2).to(v.dtype))

    def text_features(self, params: Mapping[str, torch.Tensor], tasks: int) -> torch.Tensor:
        """``[T, 2, D]`` normalised quality text features of every copy."""
        m = self.model
        pl = m.prompt_learner
        ctx = params.get("prompt_learner.ctx")
        if pl is None or ctx is None:  # fixed text: the same for every task
            t = m.quality_text_features()
            return t.unsqueeze(0).expand(tasks, *t.shape)
        n = len(pl.class_names)
        c = ctx.unsqueeze(1).expand(tasks, n, *ctx.shape[1:])
        pre = pl.token_prefix.to(ctx.dtype).unsqueeze(0).expand(tasks, *pl.token_prefix.shape)
        suf = pl.token_suffix.to(ctx.dtype).unsqueeze(0).expand(tasks, *pl.token_suffix.shape)
        emb = torch.cat([pre, c, suf], dim=2)  # [T, n, L, W], as TextPromptLearner.forward
        feats = m.text_tower(emb.reshape(tasks * n, *emb.shape[2:]), pl.tokens.repeat(tasks, 1))
        return l2_normalize(feats).view(tasks, n, -1)


def _tasks(params: Mapping[str, torch.Tensor]) -> int:
    sizes = {int(v.shape[0]) for v in params.values()}
    if len(sizes) != 1:
        raise ValueError(f"stacked prompts disagree on the number of tasks: {sorted(sizes)}")
    return sizes.pop()


def task_quality_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`~grmpiqa.losses.quality_loss` of every task: ``[T, B, 2]``, ``[T, B]`` ->
    ``[T]`` (the same formula, the mean over each task's images)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    y = labels.to(logp.dtype)
    return -(y * logp[..., 0] + (1.0 - y) * logp[..., 1]).mean(dim=-1)


def stacked_logits_autocast(
    stacked: StackedQualityModel,
    params: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    precision: str,
    generators: Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """:meth:`StackedQualityModel.logits` under the precision policy (as a serial step's
    ``model(x)`` under :func:`~grmpiqa.precision.autocast`)."""
    with autocast(images.device, precision):
        return stacked.logits(params, images, generators)
