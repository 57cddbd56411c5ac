"""Batch scoring: decode and preprocess in DataLoader workers, score in batches.

Used by :meth:`QualityModel.score` and ``grmpiqa score``. Every image is preprocessed
on its own and the model runs in eval mode, so scores do not depend on batch size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from grmpiqa.errors import GrmpiqaError, ImageError
from grmpiqa.images import DEFAULT_MAX_PIXELS, load_image, to_rgb
from grmpiqa.precision import autocast

if TYPE_CHECKING:
    from grmpiqa.model import QualityModel


class ImageListDataset(Dataset[tuple[int, torch.Tensor | None, str | None]]):
    """Images (paths or PIL) -> ``(index, tensor or None, error or None)``."""

    def __init__(self, items: Sequence[Any], transform: Any, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.items = items
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[i]
        try:
            img = (
                to_rgb(item) if isinstance(item, Image.Image) else load_image(item, self.max_pixels)
            )
            return i, self.transform(img), None
        except ImageError as err:
            return i, None, str(err)


def _collate(batch: list[tuple[int, torch.Tensor | None, str | None]]) -> Any:
    ok = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, e) for i, t, e in batch if t is None]
    idx = [i for i, _ in ok]
    tensor = torch.stack([t for _, t in ok]) if ok else None
    return idx, tensor, bad


@dataclass
class ScoredBatch:
    indices: list[int]
    scores: torch.Tensor
    errors: list[tuple[int, str]]


def iter_scores(
    model: QualityModel,
    items: Sequence[str | os.PathLike[str] | Image.Image],
    batch_size: int = 32,
    *,
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[ScoredBatch]:
    """Score images batch by batch; failures come back as ``(index, message)``."""
    if batch_size < 1:
        raise GrmpiqaError(f"batch size must be at least 1, got {batch_size}")
    ds = ImageListDataset(items, model.preprocess.eval_transform(), max_pixels)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(ds), unit="img", disable=not progress, file=None, dynamic_ncols=True)
    try:
        text = text_features(model, precision)
        for idx, tensor, bad in loader:
            scores = torch.empty(0)
            if tensor is not None:
                scores = _score_tensor(model, tensor, precision, text)
            bar.update(len(idx) + len(bad))
            yield ScoredBatch(idx, scores, bad)
    finally:
        bar.close()
        model.train(was_training)


@torch.inference_mode()
def text_features(model: QualityModel, precision: str) -> torch.Tensor:
    """The two quality prompt features, computed once per scoring run (eval mode)."""
    with autocast(model.device, precision):
        return model.quality_text_features().float()


@torch.inference_mode()
def _score_tensor(
    model: QualityModel, x: torch.Tensor, precision: str, text: torch.Tensor | None = None
) -> torch.Tensor:
    x = x.to(model.device, non_blocking=True)
    if text is None:
        text = text_features(model, precision)
    with autocast(model.device, precision):
        logits = model.logits_from_features(model.encode_image(x), text)
    return torch.softmax(logits.float(), dim=-1)[:, 0].cpu()


def score_inputs(
    model: QualityModel,
    inputs: torch.Tensor | Sequence[str | os.PathLike[str] | Image.Image],
    batch_size: int = 32,
    *,
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Scores of paths, PIL images or a ``[N, 3, H, W]`` tensor in [0, 1]."""
    if isinstance(inputs, torch.Tensor):
        x = model.preprocess.preprocess_tensor(inputs.cpu())
        was_training = model.training
        model.eval()
        try:
            text = text_features(model, precision)
            parts = [
                _score_tensor(model, x[i : i + batch_size], precision, text)
                for i in range(0, len(x), batch_size)
            ]
        finally:
            model.train(was_training)
        return torch.cat(parts) if parts else torch.empty(0)
    out = torch.full((len(inputs),), float("nan"))
    for b in iter_scores(
        model, inputs, batch_size, precision=precision, num_workers=num_workers, progress=progress
    ):
        if b.errors:
            raise ImageError(b.errors[0][1])
        out[b.indices] = b.scores
    return out
