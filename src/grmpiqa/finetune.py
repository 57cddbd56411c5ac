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

With ``cache=True`` (default) the frozen part of the image tower and the teacher's logits
are computed once for a bank of augmented views (:mod:`grmpiqa.feature_cache`);
``cache=False`` runs the released path (fresh augmentation, prompt dropout everywhere).

Example:
    >>> from grmpiqa import create_model, finetune, FinetuneConfig  # doctest: +SKIP
    >>> model = create_model(checkpoint="meta.safetensors")  # doctest: +SKIP
    >>> cfg = FinetuneConfig(max_epochs=100)
    >>> result = finetune(model, shots, cfg, out="ft.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from grmpiqa.backbone import load_backbone
from grmpiqa.checkpoint import save_checkpoint
from grmpiqa.data.datasets import Dataset
from grmpiqa.errors import GrmpiqaError
from grmpiqa.feature_cache import (
    FrozenFeatureCache,
    ImageTower,
    build_feature_cache,
    epoch_generator,
    frozen_image_blocks,
    hard_prompt_features,
    quality_text_features,
)
from grmpiqa.gradient import set_quality_aware_grads
from grmpiqa.log import get_logger
from grmpiqa.losses import distillation_loss, quality_loss
from grmpiqa.model import STAGE2_GROUPS, QualityModel
from grmpiqa.precision import PRECISIONS, autocast
from grmpiqa.prompts import l2_normalize
from grmpiqa.scale import LabelScale, fit_score_scale, label_scale_of
from grmpiqa.transforms import ResizeCropNormalize, _pil_resample
from grmpiqa.utils import atomic_open, atomic_path

__all__ = [
    "SCENES",
    "SCENE_PROMPTS",
    "FinetuneConfig",
    "FinetuneResult",
    "PlateauSchedule",
    "SemanticTeacher",
    "Stage2Step",
    "build_teacher",
    "finetune",
    "state_path",
    "log_path",
]

#: LIQE's scene classes, as written in the released GRMP-IQA code (``still_life`` with
#: its underscore: the released code tokenizes ``f"a photo of a {c}"`` verbatim).
SCENES: tuple[str, ...] = (
    "animal",
    "cityscape",
    "human",
    "indoor",
    "landscape",
    "night",
    "plant",
    "still_life",
    "others",
)
#: The teacher's and student's hard scene prompts (method.md 7).
SCENE_PROMPTS: tuple[str, ...] = tuple(f"a photo of a {s}" for s in SCENES)

_STATE_VERSION = 1
# FinetuneConfig fields that may change when a run is resumed.
_RESUMABLE_CHANGES = {"max_epochs"}


@dataclass
class FinetuneConfig:
    """Settings of stage 2 (method.md 7); defaults are the released ones.

    Attributes:
        lam: QGR lambda; 0 = plain fine-tuning (one backward pass).
        lr, weight_decay: SGD (no momentum).
        max_epochs, eval_every, patience, lr_decay, min_lr: the plateau schedule.
        batch_size: shots per step; None = all shots in one batch (released).
        groups: trainable parameter groups (``("text_context",)`` = CoOp).
        distill: use the teacher and ``L_s`` (False: no teacher at all).
        temperature: distillation temperature T.
        precision: ``"fp32"`` or ``"bf16"`` (autocast, CPU or CUDA).
        cache: cache the frozen features (:mod:`grmpiqa.feature_cache`).
        cache_augmentations: views per image in the cache's augmentation bank.
        seed: seeds augmentation, prompt dropout and batch order.
        monitor: figure the schedule watches: ``train_srcc`` (becomes ``val_srcc`` when
            a validation set is given), any key of the evaluation row or of what
            ``on_eval`` returns, a sum ``"a+b"``, or ``"-key"`` for lower-is-better.
        scene_prompts: the hard scene prompts of teacher and student.
        eval_batch_size: batch size when scoring for evaluations.
    """

    lam: float = 5.0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_epochs: int = 2000
    eval_every: int = 5
    patience: int = 5
    lr_decay: float = 0.3
    min_lr: float = 5e-7
    batch_size: int | None = None
    groups: tuple[str, ...] = STAGE2_GROUPS
    distill: bool = True
    temperature: float = 1.0
    precision: str = "fp32"
    cache: bool = True
    cache_augmentations: int = 8
    seed: int = 0
    monitor: str = "train_srcc"
    scene_prompts: tuple[str, ...] = SCENE_PROMPTS
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        self.groups = tuple(self.groups)
        self.scene_prompts = tuple(self.scene_prompts)

    def validate(self) -> None:
        """Raise :class:`GrmpiqaError` for settings that cannot run."""
        problems = []
        if not math.isfinite(self.lam) or self.lam < 0:
            problems.append(f"lambda must be >= 0, not {self.lam}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, not {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight decay must be >= 0, not {self.weight_decay}")
        if self.max_epochs < 1:
            problems.append(f"max_epochs must be >= 1, not {self.max_epochs}")
        if self.eval_every < 1:
            problems.append(f"eval_every must be >= 1, not {self.eval_every}")
        if not 0 < self.lr_decay < 1:
            problems.append(f"lr_decay must be in (0, 1), not {self.lr_decay}")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"batch size must be >= 1, not {self.batch_size}")
        if self.precision not in PRECISIONS:
            problems.append(
                f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"
            )
        if self.cache_augmentations < 1:
            problems.append(f"cache_augmentations must be >= 1, not {self.cache_augmentations}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, not {self.temperature}")
        if self.distill and not self.scene_prompts:
            problems.append("distillation needs at least one scene prompt")
        if not self.groups:
            problems.append("no trainable parameter groups")
        if problems:
            raise GrmpiqaError("fine-tuning settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"] = list(self.groups)
        d["scene_prompts"] = list(self.scene_prompts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("groups", "scene_prompts"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


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

    Holds only the image tower (the scene text features are computed once).
    """

    def __init__(self, visual: nn.Module, text_features: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.visual = visual.eval()
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.text_features: torch.Tensor
        self.register_buffer("text_features", text_features.detach().float())
        self.logit_scale = float(logit_scale)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit: Any = self.visual
        if hasattr(vit, "_embeds") and hasattr(vit, "_pool") and not vit.output_tokens:
            # open_clip's forward with an fp32 residual stream (faster under bf16
            # autocast on CPU; identical in fp32)
            x = vit.transformer(vit._embeds(images).float())
            feats, _ = vit._pool(x)
            if vit.proj is not None:
                feats = feats @ vit.proj
        else:
            feats = vit(images)
        v = l2_normalize(feats)
        return self.logit_scale * v @ self.text_features.t().to(v.dtype)

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
    if _has_base_weights(model):
        clip = model.clip
        visual = copy.deepcopy(clip.visual)
    else:
        ident = model.backbone_pretrained
        kind = ident.get("kind")
        pretrained: Any
        if kind == "random":
            pretrained = None
        elif kind == "tag":
            pretrained = ident["tag"]
        elif kind == "file":
            pretrained = ident["path"]
        else:
            pretrained = None
        bb = load_backbone(model.backbone_name, pretrained, seed=int(ident.get("seed", 0)))
        clip = bb.clip.to(model.device)
        visual = clip.visual
    tokens = model.tokenizer(list(scene_prompts)).to(model.device)
    with torch.no_grad():
        if clip is model.clip:
            text = model.text_encoder.encode_tokens(tokens)
        else:
            text = clip.encode_text(tokens)
    return SemanticTeacher(visual, l2_normalize(text.float()), float(model.logit_scale)).to(
        model.device
    )


# -- schedule --------------------------------------------------------------------------


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


# -- one training step -----------------------------------------------------------------


@dataclass
class StepStats:
    loss_q: float
    loss_s: float
    projected: int
    grad_cos: float


class Stage2Step:
    """The loss and gradient step of stage 2, shared by the cached and uncached paths.

    ``losses(pixels=...)`` runs the whole student (and the teacher, unless
    ``teacher_logits`` is given); ``losses(hidden=...)`` starts at the cached hidden
    state entering block ``start_block``. ``step`` applies the gradient rule and the
    optimiser.
    """

    def __init__(
        self,
        model: QualityModel,
        config: FinetuneConfig,
        teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
        start_block: int | None = None,
        fast: bool | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.teacher = teacher
        self.start_block = start_block
        #: exact shortcuts of the cached path: CLS-only last image block, text tower
        #: truncated after the EOT token (same results up to rounding)
        self.fast = start_block is not None if fast is None else fast
        self.tower = ImageTower(model)
        named = model.trainable_parameters()
        self.names = list(named)
        self.params = list(named.values())
        self.scene_tokens = model.tokenizer(list(config.scene_prompts)).to(model.device)

    def image_features(
        self, pixels: torch.Tensor | None = None, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        if hidden is not None:
            if self.start_block is None:
                raise ValueError("no start_block: this step has no cache")
            return self.tower.features_from_hidden(hidden, self.start_block, fast=self.fast)
        assert pixels is not None
        return self.model.encode_image(pixels)

    def quality_text(self) -> torch.Tensor:
        """The student's normalised ``[t_hq, t_lq]``."""
        if self.fast:
            return quality_text_features(self.model)
        return self.model.quality_text_features()

    def scene_text(self) -> torch.Tensor:
        """The student's normalised scene-prompt features (partly trainable text tower)."""
        if self.fast:
            return hard_prompt_features(self.model, self.scene_tokens)
        return l2_normalize(self.model.text_encoder.encode_tokens(self.scene_tokens))

    def losses(
        self,
        labels: torch.Tensor,
        *,
        pixels: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(L_q, L_s or None, quality logits) for one batch."""
        model, cfg = self.model, self.config
        with autocast(model.device, cfg.precision):
            img = self.image_features(pixels, None if hidden is None else hidden.to(model.device))
            logits = model.logits_from_features(img, self.quality_text())
            lq = quality_loss(logits, labels.to(model.device))
            ls = None
            if cfg.distill:
                if teacher_logits is None:
                    if self.teacher is None or pixels is None:
                        raise ValueError(
                            "distillation needs teacher logits or a teacher and pixels"
                        )
                    with torch.no_grad():
                        teacher_logits = self.teacher(pixels)
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

        ``cosine``: also measure the cosine between g_q and g_s (a diagnostic).
        """
        gq, gs = self.gradients(lq, ls)
        rule = set_quality_aware_grads(self.params, gq, gs, self.config.lam, cosine=cosine)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return StepStats(
            float(lq.detach()),
            float(ls.detach()) if ls is not None else float("nan"),
            rule.projected,
            rule.cosine,
        )


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


def state_path(out: str | Path) -> Path:
    """The resume sidecar of checkpoint ``out``: ``OUT`` with suffix ``.state.pt``."""
    return Path(out).with_suffix(".state.pt")


def log_path(out: str | Path) -> Path:
    """The JSON-lines training log of checkpoint ``out``: suffix ``.log.jsonl``."""
    return Path(out).with_suffix(".log.jsonl")


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return _json_safe(v.item())
    return v


# -- the loop --------------------------------------------------------------------------


def finetune(
    model: QualityModel,
    train: Dataset,
    config: FinetuneConfig,
    *,
    val: Dataset | None = None,
    on_eval: Callable[[int, QualityModel], dict[str, float]] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on the ``train`` shots (method.md 7).

    Args:
        model: the student, usually from a stage-1 checkpoint (its CLIP must still have
            the base weights, or the teacher is reloaded from the backbone identity).
        train: the shots, with labels in [0, 1] (higher is better).
        config: :class:`FinetuneConfig`.
        val: optional validation set; its SRCC is then the default monitor.
        on_eval: called as ``on_eval(epoch, model)`` at every evaluation (model in eval
            mode); the returned figures join the history row and may be monitored.
        out: checkpoint written at every evaluation and at the end (the final model),
            with ``OUT.state.pt`` (resume state) and ``OUT.log.jsonl`` (history).
        resume: continue from ``OUT.state.pt`` when it exists.
        progress: tqdm progress on stderr.
        extra: metadata added to the checkpoint's ``extra`` record.

    Returns:
        :class:`FinetuneResult`; ``model`` holds the final weights.
    """
    config.validate()
    if len(train) == 0:
        raise GrmpiqaError(f"{train.spec}: no training images")
    if not train.has_labels:
        raise GrmpiqaError(f"{train.spec}: fine-tuning needs a label for every shot")
    if val is not None and not val.has_labels:
        raise GrmpiqaError(f"{val.spec}: the validation set needs labels")
    if resume and out is None:
        raise GrmpiqaError("resume needs the output checkpoint path (out)")
    device = model.device
    monitor = config.monitor
    if monitor == "train_srcc" and val is not None:
        monitor = "val_srcc"

    state: dict[str, Any] | None = None
    if resume and out is not None and state_path(out).is_file():
        state = _read_state(state_path(out), config, train)
        if state["stopped"]:  # nothing left to do: restore the final weights
            model.set_trainable(config.groups)
            _apply_tensors(state_path(out), state, model)
            model.eval()
            return FinetuneResult(
                history=list(state["history"]),
                epochs=int(state["epoch"]),
                seconds=float(state["seconds"]),
                stopped=str(state["stopped"]),
                final_lr=float(state["schedule"]["lr"]),
            )

    # The teacher and the cache need the model as it was *before* fine-tuning.
    teacher: SemanticTeacher | None = (
        build_teacher(model, config.scene_prompts) if config.distill else None
    )
    model.set_trainable(config.groups)
    start_block = frozen_image_blocks(model) if config.cache else None
    if config.cache and start_block is None:
        print(
            "grmpiqa: the image embedding or visual prompts are trained; fine-tuning without "
            "the frozen-feature cache",
            file=sys.stderr,
        )

    images = _load_resized(model, train)
    labels_all = torch.tensor(train.labels, dtype=torch.float32)
    cache: FrozenFeatureCache | None = None
    if start_block is not None:
        cache = build_feature_cache(
            model,
            images,
            start_block=start_block,
            augmentations=config.cache_augmentations,
            seed=config.seed,
            teacher=teacher,
            precision=config.precision,
            progress=progress,
        )
        teacher = None  # its logits are cached; free the copy
    eval_pixels: torch.Tensor | None = None
    if cache is None:
        eval_tf = model.preprocess.eval_transform()
        eval_pixels = torch.stack([eval_tf(im) for im in images])
    val_hidden: torch.Tensor | None = None
    if val is not None and cache is not None and start_block is not None:
        val_hidden = _val_cache(model, val, start_block, config)

    step = Stage2Step(model, config, teacher, start_block)
    optimizer = torch.optim.SGD(
        step.params, lr=config.lr, weight_decay=config.weight_decay, momentum=0.0
    )
    schedule = PlateauSchedule(config.lr, config.patience, config.lr_decay, config.min_lr)
    history: list[dict[str, Any]] = []
    epoch0, seconds0, stopped = 0, 0.0, ""
    if state is not None and out is not None:
        _apply_tensors(state_path(out), state, model)
        optimizer.load_state_dict(state["optimizer"])
        for k, v in state["schedule"].items():
            setattr(schedule, k, v)
        history.extend(state["history"])
        epoch0, seconds0, stopped = int(state["epoch"]), float(state["seconds"]), ""
        if progress:
            print(f"grmpiqa: resuming {out} after epoch {epoch0}", file=sys.stderr)

    label_scale = _label_scale(train)
    n = len(train)
    bs = config.batch_size or n
    t_start = time.perf_counter()
    epoch_seconds: list[float] = []
    window: list[StepStats] = []
    last_eval = epoch0 if history else 0
    bar = tqdm(
        total=config.max_epochs,
        initial=epoch0,
        unit="epoch",
        desc="fine-tuning",
        disable=not progress,
    )
    epoch = epoch0
    try:
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
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(config.seed * 1_000_003 + epoch)
                for s in range(0, n, bs):
                    idx = order[s : s + bs]
                    y = labels_all[idx]
                    if cache is not None:
                        h, t = cache.batch(idx, cache.view_index(epoch))
                        lq, ls, _ = step.losses(y, hidden=h, teacher_logits=t)
                    else:
                        x = torch.stack(
                            [
                                ResizeCropNormalize(
                                    model.preprocess,
                                    train=True,
                                    generator=epoch_generator(config.seed, epoch, i),
                                )(images[i])
                                for i in idx
                            ]
                        ).to(device)
                        lq, ls, _ = step.losses(y, pixels=x)
                    evaluated = epoch % config.eval_every == 0 or epoch == config.max_epochs
                    window.append(step.step(optimizer, lq, ls, cosine=evaluated))
            epoch_seconds.append(time.perf_counter() - t_epoch)
            bar.update(1)
            bar.set_postfix(lr=f"{schedule.lr:.2g}", loss_q=f"{window[-1].loss_q:.4f}")
            final = epoch == config.max_epochs
            if epoch % config.eval_every == 0 or final:
                t_eval = time.perf_counter()
                row, shot_pred = _evaluate(
                    model,
                    step,
                    config,
                    epoch,
                    schedule.lr,
                    window,
                    cache,
                    eval_pixels,
                    train,
                    val,
                    val_hidden,
                )
                row["eval_seconds"] = time.perf_counter() - t_eval
                if on_eval is not None:
                    model.eval()
                    row.update(on_eval(epoch, model))
                row["monitor"] = monitor
                row["seconds"] = seconds0 + time.perf_counter() - t_start
                window = []
                if epoch % config.eval_every == 0:
                    row["monitored"] = _monitor_value(monitor, row)
                    if schedule.update(row["monitored"], epoch):
                        stopped = "min_lr"
                    row["next_lr"] = schedule.lr
                history.append(row)
                last_eval = epoch
                if out is not None:
                    _save(
                        out,
                        model,
                        config,
                        epoch,
                        schedule,
                        history,
                        optimizer,
                        train,
                        stopped or ("max_epochs" if final else ""),
                        row["seconds"],
                        _with_scale(extra, label_scale, shot_pred, train),
                    )
    finally:
        bar.close()
        model.eval()
    if not stopped:
        stopped = "max_epochs"
    seconds = seconds0 + time.perf_counter() - t_start
    if out is not None and last_eval != epoch:
        model.eval()
        shot_pred = _shot_predictions(model, step, config, cache, eval_pixels)
        extra = _with_scale(extra, label_scale, shot_pred, train)
        _save(
            out, model, config, epoch, schedule, history, optimizer, train, stopped, seconds, extra
        )
    return FinetuneResult(
        history=history,
        epochs=epoch,
        seconds=seconds,
        stopped=stopped,
        cache_build_s=cache.build_seconds if cache is not None else 0.0,
        final_lr=schedule.lr,
        epoch_seconds=epoch_seconds,
    )


def _load_resized(model: QualityModel, data: Dataset) -> list[Image.Image]:
    """Decode every image once and resize it to the transform's square (exact: the
    transforms' own resize is then the identity)."""
    c = model.preprocess
    out = []
    for it in data:
        img = it.load()
        out.append(img.resize((c.resize, c.resize), _pil_resample(c.interpolation)))
    return out


_VAL_CACHE_BYTES = 2 * 1024**3


def _val_cache(
    model: QualityModel, val: Dataset, start_block: int, config: FinetuneConfig
) -> torch.Tensor | None:
    """Frozen hidden states of the validation images' eval view (None if too big)."""
    from grmpiqa.feature_cache import encode_frozen

    tf = model.preprocess.eval_transform()
    chunks: list[torch.Tensor] = []
    total = 0
    store = torch.bfloat16 if config.precision == "bf16" else torch.float32
    for s in range(0, len(val), config.eval_batch_size):
        x = torch.stack(
            [tf(val.load(i)) for i in range(s, min(len(val), s + config.eval_batch_size))]
        )
        h = encode_frozen(model, x, start_block, config.precision).to(store)
        total += h.numel() * h.element_size()
        if total > _VAL_CACHE_BYTES:
            return None
        chunks.append(h)
    return torch.cat(chunks)


@torch.no_grad()
def _predict_hidden(step: Stage2Step, hidden: torch.Tensor, config: FinetuneConfig) -> np.ndarray:
    model = step.model
    out = []
    with autocast(model.device, config.precision):
        text = step.quality_text()
        for s in range(0, hidden.shape[0], config.eval_batch_size):
            img = step.image_features(
                hidden=hidden[s : s + config.eval_batch_size].to(model.device)
            )
            logits = model.logits_from_features(img, text)
            out.append(torch.softmax(logits.float(), -1)[:, 0].cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def _predict_pixels(
    model: QualityModel, pixels: torch.Tensor, config: FinetuneConfig
) -> np.ndarray:
    out = []
    with autocast(model.device, config.precision):
        for s in range(0, pixels.shape[0], config.eval_batch_size):
            logits = model(pixels[s : s + config.eval_batch_size].to(model.device))
            out.append(torch.softmax(logits.float(), -1)[:, 0].cpu())
    return torch.cat(out).numpy()


def _evaluate(
    model: QualityModel,
    step: Stage2Step,
    config: FinetuneConfig,
    epoch: int,
    lr: float,
    window: list[StepStats],
    cache: FrozenFeatureCache | None,
    eval_pixels: torch.Tensor | None,
    train: Dataset,
    val: Dataset | None,
    val_hidden: torch.Tensor | None,
) -> tuple[dict[str, Any], np.ndarray]:
    """The evaluation row, and the shots' eval-view predictions it was computed from."""
    model.eval()
    pred = _shot_predictions(model, step, config, cache, eval_pixels)
    srcc, plcc = _correlations(pred, train.labels)
    row: dict[str, Any] = {
        "epoch": epoch,
        "lr": lr,
        "loss_q": float(np.mean([w.loss_q for w in window])) if window else float("nan"),
        "loss_s": float(np.mean([w.loss_s for w in window])) if window else float("nan"),
        "grad_cos": window[-1].grad_cos if window else float("nan"),
        "projected": window[-1].projected if window else 0,
        "train_srcc": srcc,
        "train_plcc": plcc,
    }
    if val is not None:
        if val_hidden is not None:
            vpred = _predict_hidden(step, val_hidden, config)
        else:
            vpred = model.score(
                val.paths, config.eval_batch_size, precision=config.precision
            ).numpy()
        row["val_srcc"], row["val_plcc"] = _correlations(vpred, val.labels)
    return row, pred


def _shot_predictions(
    model: QualityModel,
    step: Stage2Step,
    config: FinetuneConfig,
    cache: FrozenFeatureCache | None,
    eval_pixels: torch.Tensor | None,
) -> np.ndarray:
    """p(high quality) of every shot's eval view (model in eval mode)."""
    if cache is not None:
        return _predict_hidden(step, cache.eval_hidden, config)
    assert eval_pixels is not None
    return _predict_pixels(model, eval_pixels, config)


def _label_scale(train: Dataset) -> LabelScale | None:
    """The shots' label scale, or None (with a warning) when it cannot be told."""
    try:
        return label_scale_of(train)
    except GrmpiqaError as err:
        get_logger("finetune").warning("no MOS scale recorded in the checkpoint: %s", err)
        return None


def _with_scale(
    extra: dict[str, Any] | None,
    label_scale: LabelScale | None,
    shot_pred: np.ndarray,
    train: Dataset,
) -> dict[str, Any] | None:
    """``extra`` plus the ``scale`` record: the p -> MOS map fitted on this model's
    predictions of the shots (:mod:`grmpiqa.scale`)."""
    if label_scale is None:
        return extra
    fitted = fit_score_scale(shot_pred, train.mos, label_scale)
    return {**(extra or {}), "scale": fitted.to_dict()}


# -- persistence -----------------------------------------------------------------------


def _save(
    out: str | Path,
    model: QualityModel,
    config: FinetuneConfig,
    epoch: int,
    schedule: PlateauSchedule,
    history: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    train: Dataset,
    stopped: str,
    seconds: float,
    extra: dict[str, Any] | None,
) -> None:
    out = Path(out)
    record = {
        "stage": "finetune",
        "finetune": config.to_dict(),
        "epoch": epoch,
        "stopped": stopped,
        "lr": schedule.lr,
        "train_spec": train.spec,
        "train_names": train.names,
        **(extra or {}),
    }
    save_checkpoint(model, out, extra=json.loads(json.dumps(record, default=_json_safe)))
    state = {
        "version": _STATE_VERSION,
        "epoch": epoch,
        "seconds": seconds,
        "stopped": stopped,
        "schedule": schedule.state_dict(),
        "history": history,
        "config": config.to_dict(),
        "train_names": train.names,
        "tensors": {n: p.detach().cpu().clone() for n, p in model.trainable_parameters().items()},
        "optimizer": optimizer.state_dict(),
    }
    with atomic_path(state_path(out)) as tmp:
        torch.save(state, tmp)
    with atomic_open(log_path(out), "w", encoding="utf-8") as fh:
        for row in history:
            fh.write(json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n")


def _read_state(path: Path, config: FinetuneConfig, train: Dataset) -> dict[str, Any]:
    """The resume state at ``path``, checked against the settings and training images."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt files
        raise GrmpiqaError(f"{path}: cannot read the resume state ({err})") from None
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        raise GrmpiqaError(f"{path}: not a grmpiqa fine-tuning state file")
    old = state["config"]
    new = config.to_dict()
    for k, v in new.items():
        if k not in _RESUMABLE_CHANGES and old.get(k) != v:
            raise GrmpiqaError(
                f"{path}: written with {k}={old.get(k)!r}, now {v!r}; resume with the same "
                "settings (only --max-epochs may change) or start a new output"
            )
    if state["train_names"] != train.names:
        raise GrmpiqaError(f"{path}: written for other training images than {train.spec}")
    if state.get("stopped") == "max_epochs" and config.max_epochs > state["epoch"]:
        state["stopped"] = ""
    return dict(state)


def _apply_tensors(path: Path, state: dict[str, Any], model: QualityModel) -> None:
    tensors = state["tensors"]
    named = model.trainable_parameters()
    if set(tensors) != set(named):
        raise GrmpiqaError(f"{path}: trainable tensors differ from this model's")
    with torch.no_grad():
        for n, t in tensors.items():
            if named[n].shape != t.shape:
                raise GrmpiqaError(
                    f"{path}: tensor {n} has shape {tuple(t.shape)}, model {tuple(named[n].shape)}"
                )
            named[n].copy_(t.to(named[n].dtype))
