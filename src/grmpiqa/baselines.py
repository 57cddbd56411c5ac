"""Baselines of the evaluation protocol (method.md 8, 9): CLIP-IQA, CoOp, linear probe.

* ``clipiqa``: zero-shot CLIP with the antonym prompts ``("Good photo.", "Bad photo.")``
  and no visual prompts; nothing is trained (CLIP-IQA, method.md 9).
* ``coop``: only the 4 text context vectors are learned (CoOp) on the shots, with the
  stage-2 loop but no visual prompts, no distillation and no gradient rule.
* ``linear-probe``: ridge regression from frozen, L2-normalised CLIP image embeddings
  (no prompts) to the normalised labels; the ridge strength is chosen by k-fold
  cross-validation on the shots alone (never on the test set).

Example:
    >>> probe = RidgeProbe.fit(features, labels, seed=0)  # doctest: +SKIP
    >>> probe.predict(test_features)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from grmpiqa.factory import DEFAULT, ZERO_SHOT, create_model
from grmpiqa.model import ModelConfig, QualityModel

if TYPE_CHECKING:
    from grmpiqa.finetune import FinetuneConfig

__all__ = [
    "DEFAULT_ALPHAS",
    "RidgeProbe",
    "clipiqa_config",
    "clipiqa_model",
    "coop_finetune_config",
    "coop_model_config",
    "image_features",
]

#: Ridge strengths searched by the linear probe: logspace(-3, 3, 13).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 3, 13))


def clipiqa_config() -> ModelConfig:
    """Zero-shot CLIP-IQA: antonym hand prompts, no visual prompts."""
    return ZERO_SHOT


def clipiqa_model(
    backbone: str | None = None,
    pretrained: Any = DEFAULT,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> QualityModel:
    """The zero-shot CLIP-IQA model (nothing to train)."""
    return create_model(backbone, pretrained, device=device, seed=seed, config=clipiqa_config())


def coop_model_config(base: ModelConfig | None = None) -> ModelConfig:
    """CoOp: learned text context on the quality class names, no visual prompts."""
    return replace(base or ModelConfig(), hand_prompts=None, visual_prompts=False)


def coop_finetune_config(config: FinetuneConfig) -> FinetuneConfig:
    """The stage-2 schedule with only the text context trained, no distillation, no QGR."""
    return replace(config, groups=("text_context",), distill=False, lam=0.0)


@torch.inference_mode()
def image_features(
    model: QualityModel,
    paths: Sequence[str | os.PathLike[str]],
    batch_size: int = 32,
    *,
    precision: str = "fp32",
    progress: bool = False,
) -> np.ndarray:
    """L2-normalised image embeddings ``[N, D]`` (float64) with the eval transform.

    Uses the model's own image tower (with its visual prompts if it has any; the linear
    probe builds its model without).
    """
    from grmpiqa.errors import ImageError
    from grmpiqa.pipeline import ImageLoader
    from grmpiqa.precision import autocast

    loader = ImageLoader(
        list(paths), model.preprocess, model.device, batch_size, decode="pil", reduced_decode=False
    )
    out: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(loader, desc="features", unit="batch", disable=not progress):
            if b.errors:
                raise ImageError(b.errors[0][1])
            with autocast(model.device, precision):
                f = model.encode_image(b.pixels)
            out.append(f.float().cpu().numpy().astype(np.float64))
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0))
    return np.concatenate(out)


def _ridge_solve(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge with an unpenalised intercept: centre, then solve in the cheaper space."""
    xm, ym = x.mean(0), y.mean()
    xc, yc = x - xm, y - ym
    n, d = xc.shape
    if n < d:  # dual form: w = X^T (X X^T + a I)^-1 y
        k = xc @ xc.T
        w = xc.T @ np.linalg.solve(k + alpha * np.eye(n), yc)
    else:
        w = np.linalg.solve(xc.T @ xc + alpha * np.eye(d), xc.T @ yc)
    return w, float(ym - xm @ w)


@dataclass
class RidgeProbe:
    """A fitted ridge regressor ``y = X w + b`` and how its ``alpha`` was chosen.

    Attributes:
        weights, bias: the model refitted on all shots with the chosen alpha.
        alpha: the ridge strength with the lowest cross-validated MSE.
        alphas, cv_mse: the searched strengths and their mean validation MSE.
        folds: the number of folds used.
    """

    weights: np.ndarray
    bias: float
    alpha: float
    alphas: list[float] = field(default_factory=list)
    cv_mse: list[float] = field(default_factory=list)
    folds: int = 5

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        folds: int = 5,
        seed: int = 0,
    ) -> RidgeProbe:
        """Choose ``alpha`` by ``folds``-fold CV on (features, labels), then refit on all.

        Fold membership is a seeded permutation (``numpy.random.default_rng(seed)``);
        with fewer samples than folds, leave-one-out is used. Ties go to the larger alpha.
        """
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"features {x.shape} and labels {y.shape} do not match")
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"a linear probe needs at least 2 training images, got {n}")
        k = max(2, min(int(folds), n))
        perm = np.random.default_rng(seed).permutation(n)
        fold_of = np.empty(n, dtype=np.int64)
        fold_of[perm] = np.arange(n) % k
        alist = [float(a) for a in alphas]
        mse = []
        for a in alist:
            err = 0.0
            for f in range(k):
                tr, va = fold_of != f, fold_of == f
                w, b = _ridge_solve(x[tr], y[tr], a)
                err += float(np.sum((x[va] @ w + b - y[va]) ** 2))
            mse.append(err / n)
        best = min(range(len(alist)), key=lambda i: (round(mse[i], 12), -alist[i]))
        w, b = _ridge_solve(x, y, alist[best])
        return cls(w, b, alist[best], alist, mse, k)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Raw ridge outputs (not clipped: clipping would create ties that bias SRCC)."""
        return np.asarray(features, dtype=np.float64) @ self.weights + self.bias
