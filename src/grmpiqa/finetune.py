"""Stage 2 of GRMP-IQA: few-shot fine-tuning with quality-aware gradient regularization.

Implements method.md 7:

* trainable: text context, the last 4 blocks of both towers, ``ln_final``, ``ln_post``
  (``STAGE2_GROUPS``); the visual prompts stay frozen;
* a frozen, unmodified CLIP teacher (no visual prompts, base weights) scores the 9
  LIQE scene prompts ``"a photo of a {scene}"``; the student scores the same prompts
  through its own partly trainable text tower; ``L_s`` = distillation with T = 1;
* per step two gradients (``L_q`` and ``L_s``) combined per tensor by
  :func:`~grmpiqa.gradient.quality_aware_gradient`, then plain SGD (lr 1e-3, weight
  decay 1e-4, no momentum), all shots in one batch;
* the released plateau schedule: evaluate every 5 epochs; when the monitored figure has
  not improved for more than 5 evaluations (and epoch > 10), lr *= 0.3; stop when
  lr < 5e-7, or after 2000 epochs.

The released code monitors the *test* SRCC + PLCC (selection on the test set). Here the
default monitor is the SRCC on the training shots (eval transform), or on ``val`` when it
is given; a caller may monitor any figure its ``on_eval`` callback returns.

Where a step's image features come from is a :class:`ShotSource`: :class:`CachedShots`
computes the frozen part of the image tower and the teacher's logits once for a bank of
augmented views (:mod:`grmpiqa.feature_cache`, ``cache=True``, default);
:class:`PixelShots` runs the released path (a fresh augmentation every epoch, prompt
dropout everywhere, the live teacher). Run files (checkpoint, resume state, log) are
handled by :mod:`grmpiqa.runs`.

Example:
    >>> from grmpiqa import create_model, finetune, FinetuneConfig  # doctest: +SKIP
    >>> model = create_model(checkpoint="meta.safetensors")  # doctest: +SKIP
    >>> cfg = FinetuneConfig(max_epochs=100)
    >>> result = finetune(model, shots, cfg, out="ft.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from grmpiqa.backbone import load_backbone
from grmpiqa.backbones import ImageTrunk
from grmpiqa.checkpoint import save_checkpoint
from grmpiqa.config import COMPILE_MODES, SCENE_PROMPTS, SCENES, FinetuneConfig
from grmpiqa.data.datasets import Dataset
from grmpiqa.distributed import Context, DataParallel, current
from grmpiqa.errors import GrmpiqaError, RunError, TrainingError
from grmpiqa.factory import pretrained_from_identity
from grmpiqa.feature_cache import (
    FrozenFeatureCache,
    FrozenPool,
    build_feature_cache,
    encode_frozen,
    epoch_generator,
    frozen_image_blocks,
)
from grmpiqa.gradient import apply_quality_aware_grads, first_nonfinite
from grmpiqa.log import get_logger
from grmpiqa.losses import distillation_loss, quality_loss
from grmpiqa.model import QualityModel
from grmpiqa.pipeline import describe_device, model_input
from grmpiqa.precision import autocast, storage_dtype
from grmpiqa.prompts import l2_normalize, scaled_cosines
from grmpiqa.runs import (
    DEFAULT_SAVE_EVERY,
    NUMBER,
    RunFiles,
    RunState,
    SaveClock,
    json_safe,
    optimizer_from_state,
    optimizer_to_state,
    stop_signals,
)
from grmpiqa.scale import LabelScale, fit_score_scale, label_scale_of
from grmpiqa.scoring.api import score as score_images
from grmpiqa.towers import PromptedVisionTower
from grmpiqa.transforms import ResizeCropNormalize, _pil_resample

__all__ = [
    "COMPILE_MODES",
    "SCENES",
    "SCENE_PROMPTS",
    "CachedShots",
    "FinetuneConfig",
    "FinetuneResult",
    "PixelShots",
    "PlateauSchedule",
    "SemanticTeacher",
    "ShotBatch",
    "ShotSource",
    "Stage2Step",
    "build_teacher",
    "finetune",
    "state_path",
    "log_path",
]

logger = get_logger("finetune")

# FinetuneConfig fields that may change when a run is resumed.
_RESUMABLE_CHANGES = {"max_epochs"}
#: The ``torch.compile`` backend of ``FinetuneConfig.compile`` (tests swap in
#: ``"aot_eager"``, which checks the wiring without a C++ toolchain's compile time).
COMPILE_BACKEND = "inductor"


@dataclass
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes:
        history: one row per evaluation: ``epoch``, ``lr``, ``loss_q``, ``loss_s`` (mean
            over the steps since the previous evaluation), ``train_srcc``/``train_plcc``
            (and ``val_*``), ``monitor`` (its name), ``monitored`` (its value),
            ``grad_cos`` (cosine of g_q and g_s at the last step), ``seconds`` (total
            training time so far), plus whatever ``on_eval`` returned.
        epochs: epochs trained.
        seconds: wall time of training (all sessions of a resumed run).
        stopped: ``"min_lr"`` or ``"max_epochs"``.
        cache_build_s: time spent building the frozen-feature cache (this session).
        final_lr: the learning rate at the end (after the last decay).
        epoch_seconds: wall time of each training epoch of this session, evaluations
            excluded (the evaluation time is ``eval_seconds`` in the history rows).
    """

    history: list[dict[str, Any]]
    epochs: int
    seconds: float
    stopped: str
    cache_build_s: float = 0.0
    final_lr: float = float("nan")
    epoch_seconds: list[float] = field(default_factory=list)


# -- teacher ---------------------------------------------------------------------------


class SemanticTeacher(nn.Module):
    """The frozen, unmodified CLIP of method.md 7: ``s * v @ scene_text.T``.

    Holds only the image tower (the scene text features are computed once) and runs it
    through :class:`~grmpiqa.towers.PromptedVisionTower` without prompts.
    """

    text_features: torch.Tensor

    def __init__(self, trunk: ImageTrunk, text_features: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.visual = trunk.visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.tower = PromptedVisionTower(trunk, None)
        self.register_buffer("text_features", text_features.detach().float())
        self.logit_scale = float(logit_scale)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = l2_normalize(self.tower(images))
        return scaled_cosines(self.logit_scale, v, self.text_features)

    def train(self, mode: bool = True) -> SemanticTeacher:  # always eval
        return super().train(False)


def _has_base_weights(model: QualityModel) -> bool:
    return not any(k.startswith("clip.") for k in model.adapted_keys)


def build_teacher(
    model: QualityModel, scene_prompts: Sequence[str] = SCENE_PROMPTS
) -> SemanticTeacher:
    """The semantic teacher for ``model``: same backbone and weights, no prompts.

    While ``model``'s CLIP still has its base weights (a stage-1 checkpoint only holds
    prompts) its image tower is deep-copied; otherwise the backbone is loaded again from
    its recorded identity.
    """
    tokens = model.tokenizer(list(scene_prompts)).to(model.device)
    if _has_base_weights(model):
        trunk = type(model.adapter.image)(copy.deepcopy(model.adapter.image.visual))
        with torch.no_grad():
            text = model.text_tower.encode_tokens(tokens)
    else:
        ident = model.backbone_pretrained
        pretrained = pretrained_from_identity(
            ident, model.backbone_name, model.backbone_name, loaded_here=True
        )
        bb = load_backbone(
            model.backbone_name,
            pretrained,
            seed=int(ident.get("seed", 0)),
            tokenizer=model.adapter.extra.get("tokenizer"),
        )
        assert bb.adapter is not None
        bb.clip.to(model.device)
        trunk = bb.adapter.image
        with torch.no_grad():
            text = bb.adapter.text.encode(tokens)
    return SemanticTeacher(trunk, l2_normalize(text.float()), float(model.logit_scale)).to(
        model.device
    )


# -- schedule --------------------------------------------------------------------------


#: The resume-state fields :func:`finetune` reads, with their JSON types.
STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "fingerprint": dict,
    "epoch": int,
    "seconds": NUMBER,
    "stopped": str,
    "history": list,
    "schedule": dict,
    "schedule.lr": NUMBER,
    "optimizer": dict,
}


@dataclass
class PlateauSchedule:
    """The released learning-rate schedule (method.md 7).

    At each evaluation: an improvement of the monitored figure resets the counter,
    otherwise it grows; when it exceeds ``patience`` and ``epoch > 10``, lr *= decay and
    the counter resets; training stops once lr < ``min_lr``.
    """

    lr: float
    patience: int = 5
    decay: float = 0.3
    min_lr: float = 5e-7
    best: float = -math.inf
    bad: int = 0
    decays: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an evaluation; return True when training should stop."""
        if math.isfinite(value) and value > self.best:
            self.best = value
            self.bad = 0
        else:
            self.bad += 1
        if self.bad > self.patience and epoch > 10:
            self.lr *= self.decay
            self.decays += 1
            self.bad = 0
            if self.lr < self.min_lr:
                return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- where a step's image features come from -------------------------------------------


@dataclass
class ShotBatch:
    """One step's inputs: labels, the student's normalised image features (with grad),
    and the frozen teacher's scene logits (None without distillation).

    A cached source may leave ``features`` None and give ``hidden``, the cached state
    entering block ``start_block``: :meth:`Stage2Step.losses` then runs the trained
    blocks itself (inside its compiled region when ``FinetuneConfig.compile`` is on).
    """

    labels: torch.Tensor
    features: torch.Tensor | None
    teacher_logits: torch.Tensor | None
    hidden: torch.Tensor | None = None
    start_block: int = 0


class ShotSource(Protocol):
    """Produces training batches and eval-view features of the shots."""

    build_seconds: float

    def batch(self, indices: Sequence[int], epoch: int) -> ShotBatch: ...

    def eval_features(self, batch_size: int) -> torch.Tensor: ...


def _is_everything(indices: Sequence[int], n: int) -> bool:
    """Whether ``indices`` are ``0..n-1`` in order (the released one batch per epoch)."""
    return len(indices) == n and all(i == k for k, i in enumerate(indices))


def _device_index(indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """``indices`` as a long tensor on ``device``, copied without waiting for the GPU."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    if device.type == "cuda":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


class CachedShots:
    """Shots through the frozen-feature cache (:mod:`grmpiqa.feature_cache`): only the
    trained blocks run per step; view ``(epoch - 1) mod K`` of the bank is used.

    The cache, the labels and the step's view live on the model's device; a step of
    all shots (the released one batch per epoch) takes a view without any copy.
    ``images`` may be decoded PIL images or the resized uint8 tensors of a
    :class:`~grmpiqa.feature_cache.FrozenPool` (then ``eval_hidden``, the pool's hidden
    states of the shots' eval view, is reused instead of computed).
    """

    def __init__(
        self,
        model: QualityModel,
        images: Sequence[Image.Image | torch.Tensor],
        labels: torch.Tensor,
        config: FinetuneConfig,
        start_block: int,
        teacher: SemanticTeacher | None,
        progress: bool = False,
        context: Context | None = None,
        eval_hidden: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.labels = labels.to(model.device)
        self.config = config
        self.cache: FrozenFeatureCache = build_feature_cache(
            model,
            images,
            start_block=start_block,
            augmentations=config.cache_augmentations,
            seed=config.seed,
            teacher=teacher,
            precision=config.precision,
            progress=progress,
            context=context,
            eval_hidden=eval_hidden,
        )
        self.build_seconds = self.cache.build_seconds

    def batch(self, indices: Sequence[int], epoch: int) -> ShotBatch:
        c = self.cache
        view = c.view_index(epoch)
        t = c.teacher_logits
        if _is_everything(indices, len(self.labels)):
            h, y = c.hidden[:, view], self.labels
            t = t[:, view] if t is not None else None
        else:
            idx = _device_index(indices, c.hidden.device)
            h, y = c.hidden[idx, view], self.labels[idx]
            t = t[idx, view] if t is not None else None
        return ShotBatch(y, None, t, hidden=h, start_block=c.start_block)

    @torch.no_grad()
    def eval_features(self, batch_size: int) -> torch.Tensor:
        return features_from_hidden(
            self.model, self.cache.eval_hidden, self.cache.start_block, self.config, batch_size
        )


class PixelShots:
    """The released path: a fresh augmentation of every shot each epoch, the whole
    student (prompt dropout everywhere) and the live teacher."""

    def __init__(
        self,
        model: QualityModel,
        images: Sequence[Image.Image],
        labels: torch.Tensor,
        config: FinetuneConfig,
        teacher: SemanticTeacher | None,
    ) -> None:
        self.model = model
        self.images = images
        self.labels = labels
        self.config = config
        self.teacher = teacher
        self.build_seconds = 0.0
        self.eval_pixels = model_input(images, model.preprocess)

    def pixels(self, indices: Sequence[int], epoch: int) -> torch.Tensor:
        return torch.stack(
            [
                ResizeCropNormalize(
                    self.model.preprocess,
                    train=True,
                    generator=epoch_generator(self.config.seed, epoch, i),
                )(self.images[i])
                for i in indices
            ]
        )

    def batch(self, indices: Sequence[int], epoch: int) -> ShotBatch:
        m = self.model
        x = self.pixels(indices, epoch).to(m.device)
        with autocast(m.device, self.config.precision):
            feats = m.encode_image(x)
            t = None
            if self.teacher is not None:
                t = self.teacher(x).float()
        return ShotBatch(self.labels[list(indices)], feats, t)

    @torch.no_grad()
    def eval_features(self, batch_size: int) -> torch.Tensor:
        m = self.model
        out = []
        with autocast(m.device, self.config.precision):
            for s in range(0, len(self.eval_pixels), batch_size):
                out.append(m.encode_image(self.eval_pixels[s : s + batch_size].to(m.device)))
        return torch.cat(out).float()


@torch.no_grad()
def features_from_hidden(
    model: QualityModel,
    hidden: torch.Tensor,
    start_block: int,
    config: FinetuneConfig,
    batch_size: int,
) -> torch.Tensor:
    """Normalised image features of cached hidden states (eval mode)."""
    out = []
    with autocast(model.device, config.precision):
        for s in range(0, hidden.shape[0], batch_size):
            h = hidden[s : s + batch_size].to(model.device)
            out.append(l2_normalize(model.image_tower.forward_from(h, start_block)))
    return torch.cat(out).float()


# -- one training step -----------------------------------------------------------------


@dataclass
class StepStats:
    """What one step did. From :meth:`Stage2Step.step` plain numbers; from
    :meth:`Stage2Step.step_async` 0-d tensors left on the device (``problem``: 0, or the
    code of the first non-finite value, see :class:`_Health`)."""

    loss_q: float | torch.Tensor
    loss_s: float | torch.Tensor | None
    projected: int | torch.Tensor
    grad_cos: float | torch.Tensor | None
    problem: torch.Tensor | None = None


class NonFiniteError(TrainingError):
    """A loss, gradient or weight of a training step is NaN or infinite (``epoch``: the
    epoch it happened in, when found later than the step)."""

    def __init__(self, message: str, epoch: int | None = None) -> None:
        super().__init__(message)
        self.epoch = epoch


class Stage2Step:
    """The losses and the gradient step of stage 2 (method.md 7), for any source.

    Text features run through the model's text tower truncated after the pooled EOT
    token (exact for CLIP's causal tower; the same result up to rounding).

    With :attr:`parallel` set (several ranks, :mod:`grmpiqa.distributed`) each rank
    computes the part of every batch :meth:`share` gives it and :meth:`step` applies
    the rule to the gradients summed over ranks.
    """

    def __init__(self, model: QualityModel, config: FinetuneConfig) -> None:
        self.model = model
        self.config = config
        named = model.trainable_parameters()
        self.names = list(named)
        self.params = list(named.values())
        self.scene_tokens = model.tokenizer(list(config.scene_prompts)).to(model.device)
        self.parallel: DataParallel | None = None
        self._losses: Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
        self._losses = self._losses_eager
        if config.compile != "off":
            self._losses = _compiled(self._losses_eager, config.compile)

    def share(self, batch: Sequence[int]) -> contextlib.AbstractContextManager[Sequence[int]]:
        """The samples of ``batch`` this rank computes (all of them in one process)."""
        if self.parallel is None:
            return contextlib.nullcontext(batch)
        return self.parallel.part(batch)

    def quality_text(self) -> torch.Tensor:
        """The student's normalised ``[t_hq, t_lq]``."""
        return self.model.quality_text_features(truncate=True)

    def scene_text(self) -> torch.Tensor:
        """The student's normalised scene-prompt features (partly trainable text tower)."""
        return self.model.encode_tokens(self.scene_tokens, truncate=True)

    def losses(self, batch: ShotBatch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(L_q, L_s or None, quality logits) for one batch."""
        if self.config.distill and batch.teacher_logits is None:
            raise ValueError("distillation needs the teacher's logits")
        return self._losses(
            batch.labels, batch.features, batch.teacher_logits, batch.hidden, batch.start_block
        )

    def _losses_eager(
        self,
        labels: torch.Tensor,
        features: torch.Tensor | None,
        teacher_logits: torch.Tensor | None,
        hidden: torch.Tensor | None,
        start_block: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        model, cfg = self.model, self.config
        with autocast(model.device, cfg.precision):
            img = features
            if img is None:
                assert hidden is not None
                img = l2_normalize(model.image_tower.forward_from(hidden, start_block))
        with autocast(model.device, cfg.precision):
            logits = model.logits_from_features(img, self.quality_text())
            lq = quality_loss(logits, labels.to(model.device))
            ls = None
            if cfg.distill:
                assert teacher_logits is not None
                u = model.logits_from_features(img, self.scene_text())
                ls = distillation_loss(u, teacher_logits.to(model.device), cfg.temperature)
        return lq, ls, logits

    def gradients(
        self, lq: torch.Tensor, ls: torch.Tensor | None
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None] | None]:
        """g_q and g_s per trainable tensor (None where a loss does not reach a tensor)."""
        two = ls is not None and self.config.lam != 0
        gq: list[torch.Tensor | None] = list(
            torch.autograd.grad(lq, self.params, retain_graph=two, allow_unused=True)
        )
        if not two:
            return gq, None
        assert ls is not None
        gs: list[torch.Tensor | None] = list(
            torch.autograd.grad(ls, self.params, allow_unused=True)
        )
        return gq, gs

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        lq: torch.Tensor,
        ls: torch.Tensor | None,
        *,
        cosine: bool = False,
    ) -> StepStats:
        """Apply the gradient rule (method.md 7) and one optimiser step.

        ``cosine``: also measure the cosine between g_q and g_s (a diagnostic). Raises
        :class:`NonFiniteError` (before changing anything) when a loss or gradient is
        NaN or infinite, and after the step when a weight became so. Returns plain
        numbers (it waits for the device; the training loop runs :meth:`step_async`).
        """
        if self.parallel is not None:
            return self._parallel_step(optimizer, lq, ls, cosine=cosine)
        for name, loss in (("quality loss", lq), ("distillation loss", ls)):
            if loss is not None and not bool(torch.isfinite(loss)):
                raise NonFiniteError(f"the {name} became {float(loss.detach())}")
        gq, gs = self.gradients(lq, ls)
        self._check_gradients(gq, gs)
        rule = apply_quality_aware_grads(self.params, gq, gs, self.config.lam, cosine=cosine)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._check_weights()
        stats = rule.materialize()
        return StepStats(
            float(lq.detach()),
            float(ls.detach()) if ls is not None else float("nan"),
            stats.projected,
            stats.cosine,
        )

    def step_async(
        self,
        optimizer: torch.optim.Optimizer,
        lq: torch.Tensor,
        ls: torch.Tensor | None,
        *,
        cosine: bool = False,
    ) -> StepStats:
        """:meth:`step` without waiting for the device (issue 21): the rule's choices
        are made on the device and nothing is read back. A non-finite loss, gradient or
        weight is not raised here but recorded in ``problem`` (the step is applied; the
        loop reads the record at its next evaluation or save and stops there, naming
        the epoch it happened in). Under torchrun this is :meth:`step`.
        """
        if self.parallel is not None:
            return self._parallel_step(optimizer, lq, ls, cosine=cosine)
        gq, gs = self.gradients(lq, ls)
        n = len(self.params)
        problem = torch.zeros((), dtype=torch.long, device=lq.device)
        bad_g, where_g = first_nonfinite([*gq, *(gs or [])])
        problem = torch.where(bad_g, 3 + where_g % n, problem)
        if ls is not None:
            problem = torch.where(~torch.isfinite(ls.detach()), 2, problem)
        problem = torch.where(~torch.isfinite(lq.detach()), 1, problem)
        rule = apply_quality_aware_grads(self.params, gq, gs, self.config.lam, cosine=cosine)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bad_w, where_w = first_nonfinite(self.params)
        problem = torch.where((problem == 0) & bad_w, 3 + n + where_w, problem)
        return StepStats(
            lq.detach(),
            ls.detach() if ls is not None else None,
            rule.projected,
            rule.cosine,
            problem,
        )

    def _parallel_step(
        self,
        optimizer: torch.optim.Optimizer,
        lq: torch.Tensor,
        ls: torch.Tensor | None,
        *,
        cosine: bool,
    ) -> StepStats:
        """:meth:`step` over ranks: this rank's g_q and g_s (of its part of the batch)
        summed over ranks with weights n_r / n in one flat buffer, then the rule once
        per tensor on the global gradients (method.md 7), as one process on the whole
        batch. Every rank checks the same global values, so all stop together."""
        assert self.parallel is not None
        gq, gs = self.gradients(lq, ls)
        gq, gs, lq_v, ls_v = self.parallel.all_reduce(gq, gs, lq, ls)
        for name, value in (("quality loss", lq_v), ("distillation loss", ls_v)):
            if value is not None and not math.isfinite(value):
                raise NonFiniteError(f"the {name} became {value}")
        self._check_gradients(gq, gs)
        rule = apply_quality_aware_grads(self.params, gq, gs, self.config.lam, cosine=cosine)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._check_weights()
        stats = rule.materialize()
        return StepStats(
            lq_v, ls_v if ls_v is not None else float("nan"), stats.projected, stats.cosine
        )

    def _check_gradients(
        self, gq: Sequence[torch.Tensor | None], gs: Sequence[torch.Tensor | None] | None
    ) -> None:
        for grads in (gq, gs) if gs is not None else (gq,):
            for n, g in zip(self.names, grads, strict=True):
                if g is not None and not bool(torch.isfinite(g).all()):
                    raise NonFiniteError(f"the gradient of {n} is not finite")

    def _check_weights(self) -> None:
        for n, p in zip(self.names, self.params, strict=True):
            if not bool(torch.isfinite(p).all()):
                raise NonFiniteError(f"the weights of {n} became NaN or infinite")

    def problem_message(self, code: int, value: float) -> str:
        """The words for a :class:`StepStats` problem code (``value``: the bad loss)."""
        n = len(self.params)
        if code == 1:
            return f"the quality loss became {value}"
        if code == 2:
            return f"the distillation loss became {value}"
        if 3 <= code < 3 + n:
            return f"the gradient of {self.names[code - 3]} is not finite"
        return f"the weights of {self.names[code - 3 - n]} became NaN or infinite"


def _compiled(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """``torch.compile`` of the step's forward pass (``FinetuneConfig.compile``)."""
    if COMPILE_BACKEND == "inductor":
        return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)
    return torch.compile(fn, backend=COMPILE_BACKEND, dynamic=False)


class _Health:
    """The first non-finite loss, gradient or weight of a run, kept on the device, so
    no epoch waits for the host to look (issue 21). :meth:`check` reads it (at every
    evaluation and before every save) and raises :class:`NonFiniteError` naming the
    epoch it happened in."""

    def __init__(self, step: Stage2Step) -> None:
        self.step = step
        self.code: torch.Tensor | None = None
        self.epoch: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def record(self, epoch: int, stats: StepStats) -> None:
        code = stats.problem
        if code is None:
            return
        if self.code is None or self.epoch is None or self.value is None:
            self.code = torch.zeros_like(code)
            self.epoch = torch.zeros_like(code)
            self.value = torch.zeros((), dtype=torch.float32, device=code.device)
        first = (self.code == 0) & (code != 0)
        loss = torch.as_tensor(stats.loss_q).float()
        if isinstance(stats.loss_s, torch.Tensor):
            loss = torch.where(code == 2, stats.loss_s.float(), loss)
        self.epoch = torch.where(first, epoch, self.epoch)
        self.value = torch.where(first, loss, self.value)
        self.code = torch.where(first, code, self.code)

    def check(self) -> None:
        if self.code is None or self.epoch is None or self.value is None:
            return
        code = int(self.code)
        if code:
            epoch = int(self.epoch)
            raise NonFiniteError(self.step.problem_message(code, float(self.value)), epoch)


# -- evaluation helpers ----------------------------------------------------------------


def _correlations(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(target) == 0:
            return float("nan"), float("nan")
        srcc = float(stats.spearmanr(pred, target)[0])
        plcc = float(stats.pearsonr(pred, target)[0])
    return srcc, plcc


#: The figures of every evaluation row a monitor may combine (``val_*`` with a
#: validation set; an API caller's ``on_eval`` may add its own).
EVALUATION_FIGURES = ("train_srcc", "train_plcc", "loss_q", "loss_s", "grad_cos", "lr")
VALIDATION_FIGURES = ("val_srcc", "val_plcc")


def check_monitor(name: str, with_val: bool, extra: Sequence[str] = ()) -> None:
    """Refuse a monitor (``train_srcc``, ``val_srcc+val_plcc``, ``-loss_q``) that names a
    figure no evaluation row will have, before any training."""
    known = [*EVALUATION_FIGURES, *(VALIDATION_FIGURES if with_val else ()), *extra]
    body = name[1:] if name.startswith("-") else name
    for key in body.split("+"):
        if key.strip() not in known:
            hint = "" if with_val or key.strip() not in VALIDATION_FIGURES else " (needs --val)"
            raise GrmpiqaError(
                f"--monitor {name}: {key.strip()!r} is not an evaluation figure{hint}; use "
                f"{', '.join(known)}, a sum of them with '+', or '-' before to minimise"
            )


def _monitor_value(name: str, row: dict[str, Any]) -> float:
    sign = 1.0
    if name.startswith("-"):
        sign, name = -1.0, name[1:]
    total = 0.0
    for key in name.split("+"):
        key = key.strip()
        if key not in row:
            raise GrmpiqaError(
                f"fine-tuning monitor {key!r} is not an evaluation figure "
                f"(available: {', '.join(sorted(k for k in row if not isinstance(row[k], str)))})"
            )
        total += float(row[key])
    return sign * total


def _probabilities(model: QualityModel, features: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    return model.probabilities(features.to(model.device), text.float()).cpu().numpy()


class _Validation:
    """Scores a validation set at every evaluation (its frozen part cached when possible)."""

    _MAX_BYTES = 2 * 1024**3

    def __init__(
        self, model: QualityModel, val: Dataset, config: FinetuneConfig, start_block: int | None
    ) -> None:
        self.val = val
        self.config = config
        self.start_block = start_block
        self.hidden: torch.Tensor | None = None
        if start_block is not None:
            self.hidden = self._cache(model, start_block)

    def _cache(self, model: QualityModel, start_block: int) -> torch.Tensor | None:
        store = storage_dtype(self.config.precision, model.device)
        chunks: list[torch.Tensor] = []
        total = 0
        bs = self.config.eval_batch_size
        for s in range(0, len(self.val), bs):
            x = model_input(
                [self.val.load(i) for i in range(s, min(len(self.val), s + bs))], model.preprocess
            )
            h = encode_frozen(model, x, start_block, self.config.precision).to(store)
            total += h.numel() * h.element_size()
            if total > self._MAX_BYTES:
                return None
            chunks.append(h)
        return torch.cat(chunks)

    def predictions(self, model: QualityModel, text: torch.Tensor) -> np.ndarray:
        if self.hidden is not None and self.start_block is not None:
            f = features_from_hidden(
                model, self.hidden, self.start_block, self.config, self.config.eval_batch_size
            )
            return _probabilities(model, f, text)
        return score_images(
            model, self.val.paths, self.config.eval_batch_size, precision=self.config.precision
        ).numpy()


def state_path(out: str | Path) -> Path:
    """The resume sidecar of checkpoint ``out`` (``OUT.state.safetensors``)."""
    return RunFiles(Path(out), "finetune").state


def log_path(out: str | Path) -> Path:
    """The JSON-lines training log of checkpoint ``out``: suffix ``.log.jsonl``."""
    return RunFiles(Path(out), "finetune").log


def _fingerprint(config: FinetuneConfig, train: Dataset) -> dict[str, Any]:
    conf = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE_CHANGES}
    return {"config": conf, "train_names": list(train.names)}


# -- the loop --------------------------------------------------------------------------


def finetune(
    model: QualityModel,
    train: Dataset,
    config: FinetuneConfig,
    *,
    val: Dataset | None = None,
    held_out: Dataset | None = None,
    on_eval: Callable[[int, QualityModel], dict[str, float]] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    save_every: float = DEFAULT_SAVE_EVERY,
    checkpoint: bool = True,
    pool: FrozenPool | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on the ``train`` shots (method.md 7).

    Args:
        model: the student, usually from a stage-1 checkpoint (its CLIP must still have
            the base weights, or the teacher is reloaded from the backbone identity).
        train: the shots, with labels in [0, 1] (higher is better).
        config: :class:`FinetuneConfig`.
        val: optional validation set; its SRCC is then the default monitor.
        held_out: rated images kept out of training (``finetune --test-fraction``):
            scored at every evaluation (``held_out_srcc``/``held_out_plcc`` in the
            history and the progress bar), never monitored; the final figures, and the
            RMSE of the p -> MOS map on them, are recorded in the checkpoint
            (``extra["held_out"]``).
        on_eval: called as ``on_eval(epoch, model)`` at every evaluation (model in eval
            mode); the returned figures join the history row and may be monitored.
        out: the run's checkpoint, written when training ends (the final model), with
            ``OUT.state.safetensors`` (resume state) and ``OUT.log.jsonl`` (history, a
            row appended at every evaluation).
        resume: continue from the resume state when it exists.
        overwrite: replace an earlier run at ``out`` (without it, and without ``resume``,
            an existing run is refused).
        progress: tqdm progress on stderr: epochs (no total: the stop rule decides), the
            lr and how many decays are left before the lr floor stops the run, the
            plateau counter, train and held-out SRCC.
        extra: metadata added to the checkpoint's ``extra`` record (which also gets
            ``"world_size"``).
        save_every: seconds between writes of the resume state (issue 21); it is also
            written at the end and when SIGINT or SIGTERM stops the run (which then
            raises :class:`~grmpiqa.runs.RunInterrupted`). ``0``: after every epoch.
        checkpoint: write the checkpoint at ``out`` at the end (False: only the state
            and the log, e.g. for an evaluation split whose model is not kept).
        pool: frozen features shared by several runs on subsets of one dataset
            (:class:`~grmpiqa.feature_cache.FrozenPool`, used by the evaluation protocol);
            it must come from a model whose frozen part equals ``model``'s.

    Launched on several ranks (torchrun, :mod:`grmpiqa.distributed`), every step's
    batch is shared out and the gradients summed before the rule; rank 0 evaluates,
    writes the files and hands the evaluation row to the others.

    Returns:
        :class:`FinetuneResult`; ``model`` holds the final weights.

    Raises:
        TrainingError: a loss, gradient or weight became NaN or infinite (the files at
            ``out`` keep the last saved state).
        RunInterrupted: SIGINT or SIGTERM stopped the run after its state was saved.
    """
    config.validate()
    if len(train) == 0:
        raise GrmpiqaError(f"{train.spec}: no training images")
    if not train.has_labels:
        raise GrmpiqaError(f"{train.spec}: fine-tuning needs a label for every shot")
    if val is not None and not val.has_labels:
        raise GrmpiqaError(f"{val.spec}: the validation set needs labels")
    if held_out is not None and len(held_out) and not held_out.has_labels:
        raise GrmpiqaError(f"{held_out.spec}: the held-out images need labels")
    if resume and out is None:
        raise GrmpiqaError("resume needs the output checkpoint path (out)")
    monitor = config.monitor
    if monitor == "train_srcc" and val is not None:
        monitor = "val_srcc"
    ctx = current()
    progress = progress and ctx.is_main
    run = ctx.run_files(RunFiles(Path(out), "finetune")) if out is not None else None
    fingerprint = _fingerprint(config, train)
    state: RunState | None = None
    if run is not None and ctx.start_run(run, resume, overwrite):
        state = run.load_state(expect=STATE_FIELDS)
        run.check_resume(
            state.record.get("fingerprint", {}),
            fingerprint,
            "resume with the same settings (only --max-epochs may change) or start again "
            "with --overwrite",
        )
        rec = state.record
        if rec.get("stopped") == "max_epochs" and config.max_epochs > int(rec["epoch"]):
            rec["stopped"] = ""
        if rec.get("stopped"):  # nothing left to do: restore the final weights
            model.set_trainable(config.groups)
            _apply_tensors(run, state, model)
            model.eval()
            return FinetuneResult(
                history=list(rec["history"]),
                epochs=int(rec["epoch"]),
                seconds=float(rec["seconds"]),
                stopped=str(rec["stopped"]),
                final_lr=float(rec["schedule"]["lr"]),
            )

    if (
        "text_context" in config.groups
        and model.prompt_learner is None
        and not [g for g in config.groups if g != "text_context"]
    ):
        raise GrmpiqaError(
            "the model has no learned prompts to train (hand prompts, such as the zero-shot "
            "model create_model builds without a checkpoint); build it with "
            "config=ModelConfig()"
        )
    # The teacher and the cache need the model as it was *before* fine-tuning.
    teacher = None
    if config.distill:
        build = functools.partial(build_teacher, model, config.scene_prompts)
        teacher = pool.shared(("teacher", config.scene_prompts), build) if pool else build()
    model.set_trainable(config.groups)
    start_block = frozen_image_blocks(model) if config.cache else None
    if config.cache and start_block is None:
        logger.info(
            "the image embedding or visual prompts are trained; fine-tuning without the "
            "frozen-feature cache"
        )
    labels = torch.tensor(train.labels, dtype=torch.float32)
    source: ShotSource
    if start_block is not None:
        eval_hidden = None
        images: Sequence[Image.Image | torch.Tensor]
        if pool is not None:
            images = pool.resized(model, train)
            eval_hidden = pool.eval_hidden(model, train, start_block, config.precision)
        else:
            images = _load_resized(model, train)
        source = CachedShots(
            model, images, labels, config, start_block, teacher, progress, ctx, eval_hidden
        )
        teacher = None  # its logits are cached; free the copy (a pool keeps its own)
    else:
        source = PixelShots(model, _load_resized(model, train), labels, config, teacher)
    validation = None
    if val is not None and ctx.is_main:  # rank 0 evaluates
        validation = _Validation(model, val, config, start_block)
    held = None
    if held_out is not None and len(held_out) and ctx.is_main:
        held = _Validation(model, held_out, config, start_block)

    step = Stage2Step(model, config)
    if ctx.is_distributed:
        step.parallel = DataParallel(ctx, model)
        if ctx.is_main:
            logger.info(
                "fine-tuning on %d ranks (%s): each step's batch of %d is cut into %d "
                "contiguous parts; g_q and g_s are summed over ranks before the rule",
                ctx.world_size,
                ctx.backend,
                config.batch_size or len(train),
                ctx.world_size,
            )
    optimizer = _sgd(step.params, config)
    schedule = PlateauSchedule(config.lr, config.patience, config.lr_decay, config.min_lr)
    history: list[dict[str, Any]] = []
    window: list[StepStats] = []  # the steps since the last evaluation
    epoch0, seconds0 = 0, 0.0
    if state is not None and run is not None:
        _apply_tensors(run, state, model)
        optimizer_from_state(optimizer, state.tensors, state.record["optimizer"])
        for k, v in state.record["schedule"].items():
            setattr(schedule, k, v)
        if schedule.best is None:  # -inf (nothing seen yet) is written as JSON null
            schedule.best = -math.inf
        history.extend(state.record["history"])
        window = _window_from_record(state.record.get("window", []), run.state)
        epoch0, seconds0 = int(state.record["epoch"]), float(state.record["seconds"])
        run.write_log(history)  # drop rows logged after the state was written
        logger.info("resuming %s after epoch %d", out, epoch0)

    saver = (
        _Saver(
            run,
            model,
            config,
            fingerprint,
            optimizer,
            train,
            _with_world(extra, ctx),
            _label_scale(train),
            held_out=held_out if held is not None else None,
        )
        if run is not None and ctx.is_main
        else None
    )
    n = len(train)
    bs = config.batch_size or n
    t_start = time.perf_counter()
    epoch_seconds: list[float] = []
    saved_epoch = epoch0
    stopped = ""
    # No total: the plateau schedule stops the run long before the epoch cap, so a bar
    # (and an ETA) towards max_epochs would mislead; the postfix shows the stop rule.
    bar = tqdm(
        total=None,
        initial=epoch0,
        unit="epoch",
        desc="fine-tuning",
        disable=not progress,
    )
    figures: dict[str, str] = {}
    shown = {"loss_q": float(history[-1]["loss_q"]) if history else math.nan}
    epoch = epoch0
    device = model.device
    clock = SaveClock(save_every)
    health = _Health(step)

    shot_pred: dict[str, np.ndarray] = {}  # rank 0's latest predictions of the shots

    def evaluation(epoch: int, window: list[StepStats]) -> dict[str, Any]:
        t_eval = time.perf_counter()
        row, shot_pred["last"] = _evaluate(
            model, step, source, config, epoch, schedule.lr, window, train
        )
        if validation is not None:
            vpred = validation.predictions(model, _text(model, step, config))
            row["val_srcc"], row["val_plcc"] = _correlations(vpred, validation.val.labels)
        if held is not None:
            shot_pred["held"] = held.predictions(model, _text(model, step, config))
            row["held_out_srcc"], row["held_out_plcc"] = _correlations(
                shot_pred["held"], held.val.labels
            )
        row["eval_seconds"] = time.perf_counter() - t_eval
        if on_eval is not None:
            model.eval()
            row.update(on_eval(epoch, model))
        row["monitor"] = monitor
        row["seconds"] = seconds0 + time.perf_counter() - t_start
        return row

    def healthy() -> None:
        """Raise the TrainingError of a non-finite step recorded on the device."""
        try:
            health.check()
        except NonFiniteError as err:
            kept = (
                f"{run.state} holds epoch {saved_epoch} (--resume continues from there)"
                if saved_epoch and run is not None
                else "no output"
            )
            raise TrainingError(
                f"fine-tuning stopped at epoch {err.epoch}: {err} (lower --lr); {kept}"
            ) from None

    def save(final: str) -> None:
        nonlocal saved_epoch
        if run is None:
            return
        healthy()
        if saver is not None:
            seconds = seconds0 + time.perf_counter() - t_start
            if final and checkpoint:  # the checkpoint first: a state saying "finished"
                saver.shot_pred = shot_pred.get("last")  # always has its checkpoint
                if saver.shot_pred is None:
                    model.eval()
                    saver.shot_pred = _probabilities(
                        model,
                        source.eval_features(config.eval_batch_size),
                        _text(model, step, config),
                    )
                saver.held_pred = shot_pred.get("held")
                saver.save_checkpoint(epoch, final, schedule.lr, history)
            saver.save_state(epoch, schedule, history, final, seconds, window)
        clock.saved()
        saved_epoch = epoch

    try:
        with stop_signals(enabled=run is not None) as stop:
            while not stopped and epoch < config.max_epochs:
                epoch += 1
                t_epoch = time.perf_counter()
                for g in optimizer.param_groups:
                    g["lr"] = schedule.lr
                model.train()
                order = list(range(n))
                if bs < n:
                    np.random.default_rng([config.seed, epoch]).shuffle(order)
                devices = [device.index or 0] if device.type == "cuda" else []
                evaluated = epoch % config.eval_every == 0 or epoch == config.max_epochs
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(config.seed * 1_000_003 + epoch)
                    for s in range(0, n, bs):
                        with step.share(order[s : s + bs]) as part:
                            lq, ls, _ = step.losses(source.batch(part, epoch))
                        try:
                            stats = step.step_async(optimizer, lq, ls, cosine=evaluated)
                        except NonFiniteError as err:  # torchrun: found at the step
                            raise TrainingError(
                                f"fine-tuning stopped at epoch {epoch}: {err} (lower --lr); "
                                + (
                                    f"{run.state} holds epoch {saved_epoch}"
                                    if saved_epoch and run is not None
                                    else "no output"
                                )
                            ) from None
                        health.record(epoch, stats)
                        window.append(stats)
                epoch_seconds.append(time.perf_counter() - t_epoch)
                bar.update(1)
                if progress:  # the stop rule's state; the loss is read on the host only
                    # on a CPU (a GPU shows the last evaluation's: no epoch waits for it)
                    if device.type == "cpu" and isinstance(window[-1].loss_q, torch.Tensor):
                        shown["loss_q"] = float(window[-1].loss_q)
                    bar.set_postfix_str(_bar_text(schedule, config, shown["loss_q"], figures))
                if evaluated:
                    healthy()  # the first read of the device in this evaluation
                    row = ctx.from_main(functools.partial(evaluation, epoch, window))
                    window = []
                    if epoch % config.eval_every == 0:
                        row["monitored"] = _monitor_value(monitor, row)
                        if schedule.update(row["monitored"], epoch):
                            stopped = "min_lr"
                        row["next_lr"] = schedule.lr
                    history.append(row)
                    shown["loss_q"] = float(row["loss_q"])
                    for key, name in (("train_srcc", "train"), ("held_out_srcc", "held-out")):
                        if isinstance(row.get(key), float):
                            figures[name] = f"{row[key]:.3f}"
                    if saver is not None:
                        saver.run.append_log(row)
                if stopped or epoch >= config.max_epochs:
                    break
                interrupted = run is not None and ctx.any(stop.requested)
                if interrupted or (run is not None and clock.due()):
                    save("")
                if interrupted:
                    raise stop.interrupted(f"{run.state} holds epoch {epoch}")  # type: ignore[union-attr]
            stopped = stopped or "max_epochs"
            save(stopped)
    finally:
        bar.close()
        model.eval()
    healthy()
    seconds = seconds0 + time.perf_counter() - t_start
    return FinetuneResult(
        history=history,
        epochs=epoch,
        seconds=seconds,
        stopped=stopped,
        cache_build_s=source.build_seconds,
        final_lr=schedule.lr,
        epoch_seconds=epoch_seconds,
    )


def _sgd(params: list[nn.Parameter], config: FinetuneConfig) -> torch.optim.SGD:
    """Plain SGD (method.md 7). On a GPU the fused kernel (one launch for all tensors);
    on the CPU torch's default per-tensor loop, whose numbers every figure here has."""
    kw: dict[str, Any] = {}
    if params and all(p.device.type == "cuda" for p in params):
        kw["fused"] = True
    return torch.optim.SGD(
        params, lr=config.lr, weight_decay=config.weight_decay, momentum=0.0, **kw
    )


def _bar_text(
    schedule: PlateauSchedule, config: FinetuneConfig, loss_q: float, figures: dict[str, str]
) -> str:
    """The progress bar's state of the stop rule: lr, how many decays are left before it
    falls below the floor (the run stops there), the plateau counter, the figures."""
    left = 0
    lr = schedule.lr
    while lr >= schedule.min_lr:
        lr *= schedule.decay
        left += 1
    text = (
        f"lr {schedule.lr:.1e} ({left} decay{'s' if left != 1 else ''} to stop; plateau "
        f"{schedule.bad}/{schedule.patience + 1} evals), loss_q {loss_q:.4f}"
    )
    text += "".join(f", {k} SRCC {v}" for k, v in figures.items())
    if config.max_epochs < 2000:
        text += f", cap {config.max_epochs} epochs"
    return text


def _with_world(extra: dict[str, Any] | None, ctx: Context) -> dict[str, Any]:
    """The checkpoint's ``extra`` record with the world size (and how steps were shared)."""
    out = {**(extra or {}), "world_size": ctx.world_size}
    if ctx.is_distributed:
        out["distributed"] = {
            "backend": ctx.backend,
            "sharding": "each step's batch cut into world_size contiguous parts; g_q and g_s "
            "summed over ranks (weights n_r/n) before the rule",
        }
    return out


def _load_resized(model: QualityModel, data: Dataset) -> list[Image.Image]:
    """Decode every image once and resize it to the transform's square (exact: the
    transforms' own resize is then the identity)."""
    c = model.preprocess
    out = []
    for it in data:
        img = it.load()
        out.append(img.resize((c.resize, c.resize), _pil_resample(c.interpolation)))
    return out


@torch.no_grad()
def _text(model: QualityModel, step: Stage2Step, config: FinetuneConfig) -> torch.Tensor:
    with autocast(model.device, config.precision):
        return step.quality_text().float()


def _evaluate(
    model: QualityModel,
    step: Stage2Step,
    source: ShotSource,
    config: FinetuneConfig,
    epoch: int,
    lr: float,
    window: list[StepStats],
    train: Dataset,
) -> tuple[dict[str, Any], np.ndarray]:
    """The evaluation row, and the shots' eval-view predictions it was computed from."""
    model.eval()
    pred = _probabilities(
        model, source.eval_features(config.eval_batch_size), _text(model, step, config)
    )
    srcc, plcc = _correlations(pred, train.labels)
    return _eval_row(pred, srcc, plcc, epoch, lr, window), pred


def _read_window(window: list[StepStats]) -> list[tuple[float, float, int, float]]:
    """The steps' (loss_q, loss_s, projected, grad_cos) as numbers (one read per kind)."""

    def numbers(values: list[Any], default: float) -> list[float]:
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        read = iter(torch.stack([t.double() for t in tensors]).cpu().tolist() if tensors else [])
        return [
            next(read) if isinstance(v, torch.Tensor) else (default if v is None else float(v))
            for v in values
        ]

    lq = numbers([w.loss_q for w in window], math.nan)
    ls = numbers([w.loss_s for w in window], math.nan)
    pr = numbers([w.projected for w in window], 0.0)
    cos = numbers([w.grad_cos for w in window], math.nan)
    return [(a, b, int(c), d) for a, b, c, d in zip(lq, ls, pr, cos, strict=True)]


def _window_from_record(rows: Any, path: Path) -> list[StepStats]:
    """The steps since the last evaluation as a resume state recorded them (pairs of
    losses, null for NaN); anything else is a corrupt state (one line)."""

    def number(v: Any) -> bool:
        return v is None or (isinstance(v, int | float) and not isinstance(v, bool))

    if not isinstance(rows, list) or not all(
        isinstance(r, list) and len(r) == 2 and all(number(v) for v in r) for r in rows
    ):
        raise RunError(f"{path}: corrupt resume state (window is not a list of loss pairs)")
    return [
        StepStats(
            math.nan if lq is None else float(lq),
            math.nan if ls is None else float(ls),
            0,
            math.nan,
        )
        for lq, ls in rows
    ]


def _eval_row(
    pred: np.ndarray, srcc: float, plcc: float, epoch: int, lr: float, window: list[StepStats]
) -> dict[str, Any]:
    steps = _read_window(window)
    return {
        "epoch": epoch,
        "lr": lr,
        "loss_q": float(np.mean([w[0] for w in steps])) if steps else float("nan"),
        "loss_s": float(np.mean([w[1] for w in steps])) if steps else float("nan"),
        "grad_cos": steps[-1][3] if steps else float("nan"),
        "projected": steps[-1][2] if steps else 0,
        "train_srcc": srcc,
        "train_plcc": plcc,
    }


def _label_scale(train: Dataset) -> LabelScale | None:
    """The shots' label scale, or None (with a warning) when it cannot be told."""
    try:
        return label_scale_of(train)
    except GrmpiqaError as err:
        logger.warning("no MOS scale recorded in the checkpoint: %s", err)
        return None


# -- persistence -----------------------------------------------------------------------


@dataclass
class _Saver:
    """Writes the checkpoint, the resume state and the log of one fine-tuning run."""

    run: RunFiles
    model: QualityModel
    config: FinetuneConfig
    fingerprint: dict[str, Any]
    optimizer: torch.optim.Optimizer
    train: Dataset
    extra: dict[str, Any] | None
    #: the shots' label scale; with ``shot_pred`` (the current model's eval-view
    #: predictions of the shots) the checkpoint records the p -> MOS map (grmpiqa.scale)
    label_scale: LabelScale | None = None
    shot_pred: np.ndarray | None = None
    #: images held out of training and the current model's predictions of them
    held_out: Dataset | None = None
    held_pred: np.ndarray | None = None

    def save_checkpoint(
        self, epoch: int, stopped: str, lr: float, history: list[dict[str, Any]]
    ) -> None:
        """The checkpoint: the model now, with the run's record in its metadata."""
        record = {
            "stage": "finetune",
            "device": describe_device(self.model.device),
            "finetune": self.config.to_dict(),
            "epoch": epoch,
            "stopped": stopped,
            "lr": lr,
            "train_spec": self.train.spec,
            "train_names": self.train.names,
            **(self.extra or {}),
        }
        if history:  # the figures of the last evaluation (the model written)
            keys = ("epoch", "train_srcc", "train_plcc", "val_srcc", "val_plcc")
            record["figures"] = {k: history[-1][k] for k in keys if k in history[-1]}
        fitted = None
        if self.label_scale is not None and self.shot_pred is not None:
            fitted = fit_score_scale(self.shot_pred, self.train.mos, self.label_scale)
            record["scale"] = fitted.to_dict()
        if self.held_out is not None and self.held_pred is not None and history:
            last = history[-1]
            held: dict[str, Any] = {
                "n": len(self.held_out),
                "epoch": last.get("epoch"),
                "srcc": last.get("held_out_srcc"),
                "plcc": last.get("held_out_plcc"),
            }
            if fitted is not None:  # the p -> MOS map on images it was not fitted on
                err = fitted.to_mos(self.held_pred) - np.asarray(self.held_out.mos, float)
                held["mos_rmse"] = float(np.sqrt(np.mean(err**2)))
            record["held_out"] = held
        save_checkpoint(self.model, self.run.out, extra=json_safe(record))

    def save_state(
        self,
        epoch: int,
        schedule: PlateauSchedule,
        history: list[dict[str, Any]],
        stopped: str,
        seconds: float,
        window: list[StepStats],
    ) -> None:
        """The resume state after ``epoch`` (with the losses of the steps since the last
        evaluation, so the next history row is the one an uninterrupted run writes)."""
        opt_tensors, opt_record = optimizer_to_state(self.optimizer)
        params = {f"params/{n}": p for n, p in self.model.trainable_parameters().items()}
        self.run.save_state(
            {**params, **opt_tensors},
            {
                "fingerprint": self.fingerprint,
                "epoch": epoch,
                "seconds": seconds,
                "stopped": stopped,
                "schedule": schedule.state_dict(),
                "history": history,
                "window": [[w[0], w[1]] for w in _read_window(window)],
                "optimizer": opt_record,
            },
        )


def _apply_tensors(run: RunFiles, state: RunState, model: QualityModel) -> None:
    tensors = state.take("params")
    named = model.trainable_parameters()
    if set(tensors) != set(named):
        raise GrmpiqaError(f"{run.state}: trainable tensors differ from this model's")
    with torch.no_grad():
        for n, t in tensors.items():
            if named[n].shape != t.shape:
                raise GrmpiqaError(
                    f"{run.state}: tensor {n} has shape {tuple(t.shape)}, "
                    f"model {tuple(named[n].shape)}"
                )
            named[n].copy_(t.to(named[n].dtype))
