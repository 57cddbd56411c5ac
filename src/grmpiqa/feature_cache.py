"""Cache of what is frozen in stage 2, so a fine-tuning epoch only runs the trained part.

Stage 2 (method.md 7) trains the last ``finetune_blocks`` (4) image blocks, ``ln_post``,
the text context and the last text blocks; the visual prompts and the image tower up to
block 7 are frozen. So for a fixed input view the hidden state entering block 8 never
changes, and neither do the frozen teacher's scene logits. This module computes them
once, for a fixed *bank* of ``K`` augmented views per training image (default 8, drawn
with a seeded generator) plus the deterministic eval view; epoch ``e`` then uses view
``(e - 1) mod K`` of every image and runs only blocks 8..11 and the head
(:meth:`~grmpiqa.towers.PromptedVisionTower.forward_from`).

Exactness: the cached and uncached paths give the same losses and gradients for the same
view (up to float rounding, tested) provided the frozen layers run without prompt
dropout. The released code applies dropout (p = 0.1) to *every* projected visual prompt
in train mode; the cache computes the frozen part in eval mode (no dropout on the
prompts of blocks 0..7) and keeps dropout on the prompts inserted before the trained
blocks. That, and the finite bank of views instead of a fresh random crop every epoch,
are the cache's deviations from the released path (``FinetuneConfig(cache=False)`` /
``--no-cache`` keeps it exactly).

Memory: ``N * K`` hidden states of ``T * W`` values, where the prompt rows are not
stored (every trained block replaces them): ViT-B/16 has T = 197, W = 768, i.e. 0.6 MB
per view in fp32; 50 shots x (8 + 1 eval) views = 272 MB (half in bf16, used when
fine-tuning in bf16).
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm

from grmpiqa.distributed import Context
from grmpiqa.model import QualityModel
from grmpiqa.pipeline import eval_input
from grmpiqa.precision import autocast, storage_dtype
from grmpiqa.transforms import ResizeCropNormalize

__all__ = [
    "FrozenFeatureCache",
    "bank_generator",
    "bank_view",
    "build_feature_cache",
    "encode_frozen",
    "epoch_generator",
    "frozen_image_blocks",
]


def frozen_image_blocks(model: QualityModel) -> int | None:
    """How many leading image blocks are frozen *and* preceded only by frozen parts.

    The hidden state entering that block can be cached. ``None`` when the embedding or
    the visual prompts train (nothing can be cached).
    """
    if model.visual is not None and any(p.requires_grad for p in model.visual.parameters()):
        return None
    tower = model.image_tower
    blocks = tower.block_modules()
    if any(p.requires_grad for p in tower.trunk.embed_parameters()):
        return None
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(blocks)


def bank_generator(seed: int, index: int, view: int) -> random.Random:
    """Generator of view ``view`` of training image ``index`` in the augmentation bank."""
    return random.Random(f"grmpiqa-bank:{seed}:{index}:{view}")


def epoch_generator(seed: int, epoch: int, index: int) -> random.Random:
    """Generator of the fresh augmentation of image ``index`` at ``epoch`` (uncached path)."""
    return random.Random(f"grmpiqa-epoch:{seed}:{epoch}:{index}")


def bank_view(
    model: QualityModel, image: Image.Image, seed: int, index: int, view: int
) -> torch.Tensor:
    """View ``view`` of training image ``index`` of the bank (the train transform)."""
    tf = ResizeCropNormalize(
        model.preprocess, train=True, generator=bank_generator(seed, index, view)
    )
    return tf(image)


@torch.no_grad()
def encode_frozen(
    model: QualityModel,
    images: torch.Tensor,
    start_block: int,
    precision: str = "fp32",
) -> torch.Tensor:
    """Hidden state entering block ``start_block`` for preprocessed ``images``.

    Computed in eval mode (no prompt dropout), in the layout
    :meth:`~grmpiqa.towers.PromptedVisionTower.forward_from` takes.
    """
    was = model.training
    model.eval()
    try:
        with autocast(model.device, precision):
            return model.image_tower.hidden(images.to(model.device), start_block)
    finally:
        model.train(was)


@dataclass
class FrozenFeatureCache:
    """Frozen stage-2 features of the training images (see the module docstring).

    Attributes:
        start_block: first trained image block; ``hidden`` enters it.
        hidden: ``[N, K, T, W]`` hidden states of the K bank views of each image.
        eval_hidden: ``[N, T, W]`` hidden states of the eval (centre-crop) view.
        teacher_logits: ``[N, K, S]`` frozen teacher's scene logits per view, or None.
        augmentations: K.
        seed: seed of the bank.
        build_seconds: wall time spent building it.
    """

    start_block: int
    hidden: torch.Tensor
    eval_hidden: torch.Tensor
    teacher_logits: torch.Tensor | None
    augmentations: int
    seed: int
    build_seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        n = self.hidden.numel() * self.hidden.element_size()
        n += self.eval_hidden.numel() * self.eval_hidden.element_size()
        if self.teacher_logits is not None:
            n += self.teacher_logits.numel() * self.teacher_logits.element_size()
        return n

    def view_index(self, epoch: int) -> int:
        """Bank view used at (1-based) ``epoch``."""
        return (epoch - 1) % self.augmentations

    def batch(self, indices: Sequence[int], view: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden ``[B, T, W]``, teacher logits ``[B, S]`` or None) of one view of some images."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        h = self.hidden[idx, view]
        t = self.teacher_logits[idx, view] if self.teacher_logits is not None else None
        return h, t


def build_feature_cache(
    model: QualityModel,
    images: Sequence[Image.Image],
    *,
    start_block: int,
    augmentations: int = 8,
    seed: int = 0,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    precision: str = "fp32",
    batch_size: int = 16,
    progress: bool = False,
    context: Context | None = None,
) -> FrozenFeatureCache:
    """Compute the frozen features of ``images`` (decoded RGB training images).

    ``teacher`` maps preprocessed views to scene logits (the frozen CLIP of method.md 7).
    Hidden states are stored in fp32, or bf16 when computing in bf16.

    ``context`` (several ranks, :mod:`grmpiqa.distributed`): each rank computes the
    chunks of ``batch_size`` views it owns (chunk ``c`` on rank ``c mod world``, the same
    chunks as in one process), the others' rows stay zero, and one all-reduce per tensor
    gives every rank the whole cache with the bits one process computes.
    """
    if augmentations < 1:
        raise ValueError(f"cache_augmentations must be at least 1, got {augmentations}")
    t0 = time.perf_counter()
    n, k = len(images), augmentations
    store = storage_dtype(precision, model.device)
    eval_tf = functools.partial(eval_input, preprocess=model.preprocess)
    jobs: list[tuple[int, int]] = [(i, v) for i in range(n) for v in range(-1, k)]  # -1: eval view
    hidden: torch.Tensor | None = None
    eval_hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    shared = context is not None and context.is_distributed
    starts = list(range(0, len(jobs), batch_size))
    if context is not None and shared:  # this rank's chunks (a rank without one runs the
        # first, unwritten, to learn the shapes)
        starts = [s for c, s in enumerate(starts) if context.owns(c)] or starts[:1]
    total = sum(len(jobs[s : s + batch_size]) for s in starts)
    bar = tqdm(total=total, unit="view", desc="caching frozen features", disable=not progress)
    try:
        for s in starts:
            chunk = jobs[s : s + batch_size]
            write = not shared or context is None or context.owns(s // batch_size)
            x = torch.stack(
                [
                    eval_tf(images[i]) if v < 0 else bank_view(model, images[i], seed, i, v)
                    for i, v in chunk
                ]
            ).to(model.device)
            h = encode_frozen(model, x, start_block, precision).to(store)
            if hidden is None:
                new = torch.zeros if shared else torch.empty
                hidden = new((n, k, *h.shape[1:]), dtype=store, device=h.device)
                eval_hidden = new((n, *h.shape[1:]), dtype=store, device=h.device)
            assert eval_hidden is not None
            if not write:
                continue
            train_rows = [j for j, (_, v) in enumerate(chunk) if v >= 0]
            for j, (i, v) in enumerate(chunk):
                if v < 0:
                    eval_hidden[i] = h[j]
                else:
                    hidden[i, v] = h[j]
            if teacher is not None and train_rows:
                with torch.no_grad(), autocast(model.device, precision):
                    t = teacher(x[train_rows]).float()
                if logits is None:
                    new = torch.zeros if shared else torch.empty
                    logits = new((n, k, t.shape[1]), dtype=torch.float32, device=t.device)
                for r, j in enumerate(train_rows):
                    i, v = chunk[j]
                    logits[i, v] = t[r]
            bar.update(len(chunk))
    finally:
        bar.close()
    assert hidden is not None and eval_hidden is not None
    if context is not None and shared:
        if teacher is not None:  # a rank whose chunks held no training view has no logits
            shapes = [s for s in context.all_gather_json(_shape(logits)) if s is not None]
            if logits is None:
                logits = torch.zeros(shapes[0], dtype=torch.float32, device=hidden.device)
        for full in (hidden, eval_hidden, logits):
            if full is not None:
                context.all_reduce_(full)
    return FrozenFeatureCache(
        start_block=start_block,
        hidden=hidden,
        eval_hidden=eval_hidden,
        teacher_logits=logits,
        augmentations=k,
        seed=seed,
        build_seconds=time.perf_counter() - t0,
    )


def _shape(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else list(t.shape)
