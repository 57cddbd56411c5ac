"""A ``torch.utils.data.Dataset`` over dataset items and a transform (method.md 6, 7).

Pair it with the released transforms of :mod:`grmpiqa.transforms`, e.g.
``stage2_train_transform()`` for the shots and ``stage2_test_transform()`` for the
test set, or ``stage1_support_transform()`` / ``stage1_query_transform()`` for stage-1
tasks (``stats="clip"`` switches to CLIP's normalisation statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from grmpiqa.data.datasets import Dataset

__all__ = ["ImageDataset"]


class ImageDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """``(image tensor, label float32 scalar, dataset index)`` for the chosen items.

    Args:
        dataset: the items.
        transform: maps an RGB ``PIL.Image`` to a tensor.
        indices: which items (default: all), e.g. ``split.shots``; the third element
            returned is the index into ``dataset``, not into ``indices``.
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: Callable[[Image.Image], torch.Tensor],
        indices: Sequence[int] | None = None,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        index = self.indices[i]
        item = self.dataset[index]
        image = self.transform(item.load())
        return image, torch.tensor(item.label, dtype=torch.float32), index
