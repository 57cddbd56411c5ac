"""Settings and names, importable without torch or open_clip.

The command line reads its flags' defaults and choices here, so ``grmpiqa --help``,
``grmpiqa CMD --help`` and ``--version`` start in a fraction of a second: the modules that
run the work (and import torch and open_clip) are imported only inside the commands that
need them. Each name is re-exported by the module of its concept (``FinetuneConfig`` by
:mod:`grmpiqa.finetune`, ``PRECISIONS`` by :mod:`grmpiqa.precision`, ...), which is where
the documentation points.

* :class:`FinetuneConfig`: stage 2 (method.md 7); :class:`PretrainConfig`: stage 1
  (method.md 6), with :data:`VARIANT_DEFAULTS`.
* :data:`DEFAULT_BACKBONE` / :data:`DEFAULT_PRETRAINED`: ViT-B-16-quickgelu with OpenAI
  weights (method.md 2); :data:`PRECISIONS`; the parameter groups of each stage; the
  zero-shot CLIP-IQA prompts; the evaluation methods (method.md 8).

Example:
    >>> FinetuneConfig().lam, FinetuneConfig().min_lr
    (5.0, 5e-07)
    >>> PretrainConfig(variant="released").inner_lr
    0.0001
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from grmpiqa.errors import GrmpiqaError

__all__ = [
    "CLIPIQA_PROMPTS",
    "DEFAULT_BACKBONE",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_PRETRAINED",
    "LOGISTIC_MODELS",
    "METHODS",
    "OUTER_SCHEDULES",
    "PRECISIONS",
    "SCENES",
    "SCENE_PROMPTS",
    "SELECTIONS",
    "STAGE1_GROUPS",
    "STAGE2_GROUPS",
    "STATS",
    "VARIANTS",
    "VARIANT_DEFAULTS",
    "FinetuneConfig",
    "PretrainConfig",
]

#: The backbone used when none is named (method.md 2).
DEFAULT_BACKBONE = "ViT-B-16-quickgelu"
#: Its weights: open_clip's ``openai`` tag.
DEFAULT_PRETRAINED = "openai"

#: Precisions a user may ask for (``auto`` resolves to one of the other two).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")

#: Parameter groups trained in stage 1 (meta-prompt pre-training, method.md 6).
STAGE1_GROUPS: tuple[str, ...] = ("text_context", "visual_prompts")
#: Parameter groups trained in stage 2 (few-shot fine-tuning, method.md 7).
STAGE2_GROUPS: tuple[str, ...] = (
    "text_context",
    "text_blocks",
    "image_blocks",
    "ln_final",
    "ln_post",
)
#: Hand-written prompts of the zero-shot CLIP-IQA baseline (method.md 9), also what
#: scoring uses when no trained checkpoint is given.
CLIPIQA_PROMPTS: tuple[str, str] = ("Good photo.", "Bad photo.")

#: Normalisation statistics by name (:func:`grmpiqa.transforms.stats_for`).
STATS: tuple[str, ...] = ("imagenet", "clip")

#: Decoded bytes one scoring batch may hold at once (``grmpiqa score --max-decoded-mb``;
#: :data:`grmpiqa.scoring.engine.DEFAULT_MAX_BATCH_BYTES`).
DEFAULT_MAX_BATCH_BYTES = 1024 * 2**20

#: Methods of the evaluation protocol (method.md 8).
METHODS: tuple[str, ...] = ("grmp", "coop", "clipiqa", "linear-probe")
#: What the protocol reports per split: the end of a fixed schedule, or the best test figure.
SELECTIONS: tuple[str, ...] = ("final", "best-on-test")
#: Logistic models fitted for PLCC (logistic) and RMSE.
LOGISTIC_MODELS: tuple[str, ...] = ("4", "5")

# --- stage 2 ----------------------------------------------------------------------------

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


# --- stage 1 ----------------------------------------------------------------------------

VARIANTS: tuple[str, ...] = ("reptile", "released")
OUTER_SCHEDULES: tuple[str, ...] = ("constant", "linear")

#: Defaults of the step-size fields of :class:`PretrainConfig`, per variant (a field left
#: ``None`` takes its variant's value). ``released``: the authors' values (method.md 6).
#: ``reptile``: chosen by measurement (docs/pretraining.md, "Choosing the defaults").
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "reptile": {
        "inner_lr": 1e-3,
        "outer_lr": 1.0,
        "outer_schedule": "constant",
        "inner_passes": 3,
        "support_batch": 16,
        "query_batch": 4,
    },
    "released": {
        "inner_lr": 1e-4,
        "outer_lr": 0.01,
        "outer_schedule": "constant",
        "inner_passes": 1,
        "support_batch": 75,
        "query_batch": 50,
    },
}


@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of stage 1 (method.md 6).

    The step-size fields (``inner_lr``, ``outer_lr``, ``outer_schedule``,
    ``inner_passes``, ``support_batch``, ``query_batch``) left ``None`` take their
    variant's default from ``VARIANT_DEFAULTS``: the authors' values for ``released``
    (1e-4, 0.01, constant, 1, 75, 50), measured ones for ``reptile`` (1e-3, 1.0,
    constant, 3, 16, 4; docs/pretraining.md). After construction they hold numbers.

    Attributes:
        epochs: meta-epochs; each runs every database's tasks once.
        variant: ``"reptile"`` (phi reset to theta, fresh Adam per task) or
            ``"released"`` (the authors' behaviour; see :mod:`grmpiqa.metatrain`).
        inner_lr: Adam learning rate of the inner loop.
        outer_lr: interpolation step of the outer (Reptile) update.
        outer_schedule: ``"constant"``, or ``"linear"``: ``outer_lr * (1 - e / epochs)``
            in 0-based epoch ``e`` (Nichol et al. 2018; the horizon is ``epochs``, so a
            resumed run must keep it).
        inner_passes: passes over a task's support set per epoch (each support step
            followed by a step on the next query batch; later passes in a fresh seeded
            order with fresh augmentation; released: 1).
        support_batch, query_batch: batch sizes (released: 75 and 50).
        support_fraction: share of a task's images in its support set, re-drawn each
            epoch (released: 0.8; the rest is the query set).
        seed: seed of every random choice (split, order, augmentation, dropout).
        precision: ``"fp32"`` or ``"bf16"`` (autocast; parameters stay fp32).
        stats: normalisation statistics, ``"imagenet"`` (released) or ``"clip"``.
        max_tasks: keep only the first N distortion types (sorted ids) of each database
            (the released loop uses 24 of KADID's 25).
        images_per_task: use at most N images per task (a seeded subsample fixed for
            the run), for smoke runs and benchmarks.
        shuffle_tasks: run a database's tasks in a fresh seeded order each epoch
            (released: yes).
        keep_best_val: write the checkpoint of the epoch with the best validation SRCC
            instead of the last epoch (needs a validation set; recorded in metadata).
        cache_images: keep decoded, resized images in memory between epochs (about
            0.35 MB per image; results are identical either way).
    """

    epochs: int = 50
    variant: str = "reptile"
    inner_lr: float | None = None
    outer_lr: float | None = None
    outer_schedule: str | None = None
    inner_passes: int | None = None
    support_batch: int | None = None
    query_batch: int | None = None
    support_fraction: float = 0.8
    seed: int = 0
    precision: str = "fp32"
    stats: str = "imagenet"
    max_tasks: int | None = None
    images_per_task: int | None = None
    shuffle_tasks: bool = True
    keep_best_val: bool = False
    cache_images: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise GrmpiqaError(
                f"unknown variant {self.variant!r}; use one of {', '.join(VARIANTS)}"
            )
        for name, value in VARIANT_DEFAULTS[self.variant].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.outer_schedule not in OUTER_SCHEDULES:
            raise GrmpiqaError(
                f"unknown outer schedule {self.outer_schedule!r}; "
                f"use one of {', '.join(OUTER_SCHEDULES)}"
            )
        if self.inner_passes < 1:  # type: ignore[operator]
            raise GrmpiqaError(f"inner_passes must be at least 1, got {self.inner_passes}")
        if self.precision not in PRECISIONS:
            raise GrmpiqaError(
                f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}"
            )
        if self.stats not in STATS:
            raise GrmpiqaError(
                f"unknown normalisation statistics {self.stats!r}; use 'imagenet' or 'clip'"
            )
        if self.epochs < 1:
            raise GrmpiqaError(f"epochs must be at least 1, got {self.epochs}")
        for name in ("support_batch", "query_batch"):
            if getattr(self, name) < 1:
                raise GrmpiqaError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.support_fraction < 1.0:
            raise GrmpiqaError(f"support_fraction must be in (0, 1), got {self.support_fraction}")
        if self.inner_lr <= 0 or self.outer_lr <= 0:  # type: ignore[operator]
            raise GrmpiqaError("inner_lr and outer_lr must be positive")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise GrmpiqaError(f"max_tasks must be at least 1, got {self.max_tasks}")
        if self.images_per_task is not None and self.images_per_task < 2:
            raise GrmpiqaError(f"images_per_task must be at least 2, got {self.images_per_task}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
