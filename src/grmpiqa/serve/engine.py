"""The one adapter between the service and the scoring engine.

Everything the service asks of a model goes through :class:`ScoringEngine`: the 8-bit
eval geometry of one image (:mod:`grmpiqa.pipeline`, in the decoding threads), the
batched score of a stack of them (normalised on the model's device, then
:class:`~grmpiqa.scoring.engine.BatchScorer`: the same computation as ``grmpiqa score``,
every image preprocessed on its own, model in eval mode, so scores do not depend on how
requests are batched), quality maps, the MOS map, and the model card. When the scoring
engine moves, only this module changes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from grmpiqa._version import __version__
from grmpiqa.explain import QualityMap, grid_shape, maps_from_pixels
from grmpiqa.model import QualityModel
from grmpiqa.pipeline import pixels_from_image
from grmpiqa.precision import check_precision
from grmpiqa.scale import ScoreScale
from grmpiqa.scoring.engine import BatchScorer


class ScoringEngine:
    """One loaded model (a checkpoint, or the bare backbone), ready to score batches.

    Args:
        model: the model (put in eval mode; never trained here).
        name: the name requests select it by (``?checkpoint=NAME``).
        precision: ``fp32``, ``bf16`` or ``auto`` (as ``grmpiqa score --precision``).
        checkpoint: the checkpoint file it came from (only its name and digest are shown).
    """

    def __init__(
        self,
        model: QualityModel,
        name: str,
        precision: str = "fp32",
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model.eval()
        self.name = name
        self.precision = check_precision(precision)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self._scorer = BatchScorer(model, precision=self.precision)
        self._digest = _sha256(self.checkpoint) if self.checkpoint is not None else None

    @property
    def random_weights(self) -> bool:
        return self.model.backbone_pretrained.get("kind") == "random"

    @property
    def scale(self) -> ScoreScale | None:
        return self.model.score_scale

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The eval geometry of one decoded RGB image: uint8 ``[3, crop, crop]``."""
        return pixels_from_image(image, self.model.preprocess)

    def _input(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.preprocess.normalize(pixels.to(self.model.device, non_blocking=True))

    def score(self, pixels: torch.Tensor) -> torch.Tensor:
        """p(high quality) ``[N]`` of a stack of :meth:`preprocess` outputs."""
        return self._scorer.score_tensor(self._input(pixels))[:, 0]

    def maps(self, pixels: torch.Tensor) -> list[QualityMap]:
        """Quality maps of a stack of :meth:`preprocess` outputs."""
        return maps_from_pixels(self.model, self._input(pixels), self.precision)

    def to_mos(self, scores: list[float]) -> list[float]:
        if self.scale is None:
            raise ValueError(f"{self.name}: no MOS scale recorded")
        return [float(v) for v in self.scale.to_mos(scores)]

    def card(self) -> dict[str, Any]:
        """The model card: backbone, weights identity, random or not, checkpoint, scale,
        preprocessing, version (shown in every response)."""
        m = self.model
        weights = dict(m.backbone_pretrained)
        if weights.get("kind") == "file" and "path" in weights:
            weights["path"] = Path(str(weights["path"])).name  # no server paths in answers
        rows, cols = grid_shape(m)
        card: dict[str, Any] = {
            "name": self.name,
            "backbone": m.backbone_name,
            "weights": weights,
            "random_weights": self.random_weights,
            "description": m.describe(),
            "checkpoint": (
                {"file": self.checkpoint.name, "sha256": self._digest, "ref": _public_ref(m)}
                if self.checkpoint is not None
                else None
            ),
            "prompts": {"origin": m.prompt_origin, "description": m.describe_prompts()},
            "scale": self.scale.to_dict() if self.scale is not None else None,
            "preprocess": m.preprocess.to_dict(),
            "precision": self.precision,
            "device": str(m.device),
            "map_grid": [rows, cols],
            "version": __version__,
        }
        if self.random_weights:
            card["warning"] = (
                "RANDOM backbone weights: scores carry no learned quality knowledge "
                "(for tests and demos only)"
            )
        elif m.untrained:
            card["warning"] = "UNTRAINED learned prompts: scores carry no quality knowledge"
        if m.prompt_origin == "zero-shot" and self.checkpoint is None:
            card["note"] = (
                "no checkpoint: zero-shot CLIP-IQA prompts (nothing trained on quality "
                "ratings); serve a checkpoint for a trained scorer"
            )
        return card


def _public_ref(model: QualityModel) -> str | None:
    """The checkpoint as named, when that is no server path (``hf-hub:...``), else its
    file name."""
    ref = model.checkpoint_ref
    if ref is None:
        return None
    return ref if ref.startswith("hf-hub:") else Path(ref).name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
