"""The scoring API of a model: ``score(model, images)`` and ``quality_map(model, image)``.

A thin facade over the layers below: the image pipeline and the batch scorer
(:mod:`grmpiqa.scoring.engine`), quality maps (:mod:`grmpiqa.explain`) and the MOS map
(:mod:`grmpiqa.scale`). :class:`ScoringModel` is the :class:`~grmpiqa.model.QualityModel`
that :func:`grmpiqa.create_model` returns: the same network with these two functions as
methods, so ``model.score(...)`` and ``model.quality_map(...)`` work while
:mod:`grmpiqa.model` itself imports nothing above it.

Example:
    >>> import torch, grmpiqa
    >>> model = grmpiqa.create_model("test-tiny", pretrained=None)
    >>> scores = model.score(torch.rand(2, 3, 256, 256))
    >>> scores.shape, bool(((scores > 0) & (scores < 1)).all())
    (torch.Size([2]), True)
    >>> torch.equal(score(model, torch.rand(1, 3, 64, 64)).isfinite(), torch.tensor([True]))
    True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from grmpiqa.explain import QualityMap, quality_maps
from grmpiqa.model import QualityModel
from grmpiqa.scale import apply_scale, check_scale, require_score_scale
from grmpiqa.scoring.engine import score_inputs

__all__ = ["ScoringModel", "quality_map", "score"]

#: What :func:`score` takes: paths, PIL images, or a float tensor in [0, 1].
Inputs = torch.Tensor | str | os.PathLike[str] | Image.Image | Sequence[Any]


def score(
    model: QualityModel,
    inputs: Inputs,
    batch_size: int = 32,
    *,
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
    scale: str = "prob",
    decode: str = "auto",
) -> torch.Tensor:
    """Quality scores in (0, 1), higher is better, as a 1-D float tensor on the CPU.

    ``inputs``: image paths, PIL images, or a float tensor ``[N, 3, H, W]`` in [0, 1]
    (preprocessed with the model's eval transform). Scores do not depend on
    ``batch_size``. Unreadable files raise :class:`~grmpiqa.errors.ImageError`.
    ``scale="mos"`` maps them to the label scale recorded by fine-tuning
    (:mod:`grmpiqa.scale`; the same dtype as p); a model without one raises GrmpiqaError.
    ``decode``: ``auto`` (nvJPEG on CUDA, Pillow elsewhere), ``pil`` or ``torch``
    (:mod:`grmpiqa.pipeline`). Runs on the model's device.
    """
    if check_scale(scale) == "mos":
        require_score_scale(model)
    scores = score_inputs(
        model,
        inputs,
        batch_size=batch_size,
        precision=precision,
        num_workers=num_workers,
        progress=progress,
        decode=decode,
    )
    return apply_scale(model, scores, scale)


def quality_map(
    model: QualityModel, image: str | os.PathLike[str] | Image.Image, *, precision: str = "fp32"
) -> QualityMap:
    """Map of local quality of one image from its patch tokens (:mod:`grmpiqa.explain`)."""
    return quality_maps(model, [image], precision=precision)[0]


class ScoringModel(QualityModel):
    """A :class:`~grmpiqa.model.QualityModel` with the scoring API as methods (what
    :func:`grmpiqa.create_model` returns). Same parameters, state dict and forward."""

    def score(
        self,
        inputs: Inputs,
        batch_size: int = 32,
        *,
        precision: str = "fp32",
        num_workers: int = 0,
        progress: bool = False,
        scale: str = "prob",
        decode: str = "auto",
    ) -> torch.Tensor:
        """:func:`score` of this model."""
        return score(
            self,
            inputs,
            batch_size,
            precision=precision,
            num_workers=num_workers,
            progress=progress,
            scale=scale,
            decode=decode,
        )

    def quality_map(
        self, image: str | os.PathLike[str] | Image.Image, *, precision: str = "fp32"
    ) -> QualityMap:
        """:func:`quality_map` of this model."""
        return quality_map(self, image, precision=precision)
