"""Cache of what is frozen in stage 2, so a fine-tuning epoch only runs the trained part.

Stage 2 (method.md 7) trains the last ``finetune_blocks`` (4) image blocks, ``ln_post``,
the text context and the last text blocks; the visual prompts and the image tower up to
block 7 are frozen. So for a fixed input view the hidden state after the last frozen
block never changes, and neither do the frozen teacher's scene logits. This module
computes them once, for a fixed *bank* of ``K`` augmented views per training image
(default 8, drawn with a seeded generator) plus the deterministic eval view; epoch ``e``
then uses view ``(e - 1) mod K`` of every image and runs only blocks 8..11 and the head.

Exactness: the cached and uncached paths give the same losses and gradients for the same
view provided the frozen layers run without prompt dropout. The released code applies
dropout (p = 0.1) to *every* projected visual prompt in train mode; the cached path
computes the frozen part in eval mode (no dropout on the prompts of blocks 0..7) and keeps
dropout on the prompts inserted before the trained blocks. That, and the finite bank of
views instead of a fresh random crop every epoch, are the cache's deviations from the
released path (``FinetuneConfig(cache=False)`` / ``--no-cache`` keeps it exactly).

Memory: ``N * K * T * W`` values; ViT-B/16 with 100 prompt tokens has T = 297, W = 768,
i.e. 0.9 MB per view in fp32: 50 shots x 8 views = 365 MB (half in bf16, used when
fine-tuning in bf16).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from open_clip.transformer import ResidualAttentionBlock, text_global_pool
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from grmpiqa.model import QualityModel
from grmpiqa.prompts import l2_normalize
from grmpiqa.scoring import autocast
from grmpiqa.transforms import ResizeCropNormalize

__all__ = [
    "FrozenFeatureCache",
    "ImageTower",
    "bank_generator",
    "build_feature_cache",
    "encode_frozen",
    "epoch_generator",
    "frozen_image_blocks",
    "hard_prompt_features",
    "quality_text_features",
    "text_features",
]


class ImageTower:
    """The image tower of a :class:`QualityModel` split into embed / blocks / head.

    With visual prompts it delegates to :class:`~grmpiqa.prompts.VisualPromptedEncoder`;
    without, it splits open_clip's ``VisionTransformer`` the same way, so
    ``head(blocks(embed(x)))`` equals the unnormalised image embedding either way.
    """

    def __init__(self, model: QualityModel) -> None:
        self.model = model
        self.vit = model.clip.visual
        self.n_blocks = len(self.vit.transformer.resblocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if self.model.visual is not None:
            return self.model.visual.embed(images)
        return self.vit._embeds(images)

    def blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        if self.model.visual is not None:
            return self.model.visual.blocks(x, start, end)
        end = self.n_blocks if end is None else end
        tr = self.vit.transformer
        batch_first = getattr(tr, "batch_first", True)
        for i in range(start, end):
            block = tr.resblocks[i]
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.visual is not None:
            return self.model.visual.head(x)
        pooled, _ = self.vit._pool(x)
        if self.vit.proj is not None:
            pooled = pooled @ self.vit.proj
        return pooled

    @property
    def cls_only_ok(self) -> bool:
        """Whether only the CLS token of the last block's output is used (CLIP ViTs)."""
        v = self.vit
        block = v.transformer.resblocks[-1] if self.n_blocks else None
        return (
            getattr(v, "pool_type", "tok") == "tok"
            and getattr(v, "attn_pool", None) is None
            and getattr(v.transformer, "batch_first", True)
            and isinstance(block, ResidualAttentionBlock)
            and not hasattr(block, "ln_1_kv")
        )

    def features_from_hidden(
        self, hidden: torch.Tensor, start: int, cls_only: bool = True
    ) -> torch.Tensor:
        """L2-normalised image embedding from the hidden state entering block ``start``.

        ``cls_only``: run the last block for the CLS query only (its other outputs are
        never used: the head pools the CLS token) - the same result up to rounding, at
        about a sixth of that block's cost.
        """
        last = self.n_blocks - 1
        if not (cls_only and self.cls_only_ok and start <= last):
            return l2_normalize(self.head(self.blocks(hidden, start)))
        x = self.blocks(hidden, start, last)
        vpt = self.model.visual
        if vpt is not None and 1 <= last <= vpt.deep_layers:
            deep = vpt._prompt(vpt.deep_prompt_embeddings[last - 1 : last], x.shape[0]).to(x.dtype)
            x = torch.cat([x[:, :1], deep, x[:, 1 + vpt.num_tokens :]], dim=1)
        return l2_normalize(self.head(_cls_block(self.vit.transformer.resblocks[last], x)))


def _cls_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock`` evaluated for the first token only.

    Keys and values come from every token, the query, residual and MLP from the first,
    exactly as in the full block (batch-first input ``[B, T, W]`` -> ``[B, 1, W]``).
    """
    y = block.ln_1(x)
    a = block.attention(q_x=y[:, :1], k_x=y, v_x=y)
    h = x[:, :1] + block.ls_1(a)
    return h + block.ls_2(block.mlp(block.ln_2(h)))


def text_features(
    model: QualityModel, embeddings: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Unnormalised text features, running the causal text tower only up to the last EOT.

    Equal (up to rounding) to ``model.text_encoder(embeddings, tokens)``: with the causal
    mask, positions after the pooled EOT token cannot influence it. Falls back to the
    full tower for non-causal or non-EOT-pooled towers.
    """
    c = model.clip
    if getattr(c, "attn_mask", None) is None or getattr(c, "text_pool_type", "") != "argmax":
        return model.text_encoder(embeddings, tokens)
    n = int(tokens.argmax(dim=-1).max()) + 1
    x = embeddings[:, :n] + c.positional_embedding[:n].to(embeddings.dtype)
    x = c.transformer(x, attn_mask=c.attn_mask[:n, :n])
    x = c.ln_final(x)
    x = text_global_pool(x, tokens[:, :n], c.text_pool_type, getattr(c, "text_eos_id", None))
    proj = c.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


def quality_text_features(model: QualityModel) -> torch.Tensor:
    """``model.quality_text_features()`` computed with the truncated text tower."""
    if model.prompt_learner is not None:
        tokens = model.prompt_learner.tokens
        emb = model.prompt_learner()
    else:
        tokens = model.hand_tokens
        emb = model.text_encoder.embed(tokens)
    return l2_normalize(text_features(model, emb, tokens))


def hard_prompt_features(model: QualityModel, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` of tokenized hard prompts, with the truncated text tower."""
    return l2_normalize(text_features(model, model.text_encoder.embed(tokens), tokens))


def frozen_image_blocks(model: QualityModel) -> int | None:
    """How many leading image blocks are frozen *and* preceded only by frozen parts.

    The hidden state entering that block can be cached. ``None`` when the embedding or
    the visual prompts train (nothing can be cached).
    """
    if model.visual is not None and any(p.requires_grad for p in model.visual.parameters()):
        return None
    vit = model.clip.visual
    embed_parts: list[nn.Module | torch.Tensor] = [vit.conv1, vit.ln_pre]
    for t in (vit.class_embedding, vit.positional_embedding):
        if t.requires_grad:
            return None
    if any(
        p.requires_grad for m in embed_parts if isinstance(m, nn.Module) for p in m.parameters()
    ):
        return None
    for i, block in enumerate(vit.transformer.resblocks):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(vit.transformer.resblocks)


def bank_generator(seed: int, index: int, view: int) -> random.Random:
    """Generator of view ``view`` of training image ``index`` in the augmentation bank."""
    return random.Random(f"grmpiqa-bank:{seed}:{index}:{view}")


def epoch_generator(seed: int, epoch: int, index: int) -> random.Random:
    """Generator of the fresh augmentation of image ``index`` at ``epoch`` (uncached path)."""
    return random.Random(f"grmpiqa-epoch:{seed}:{epoch}:{index}")


@torch.no_grad()
def encode_frozen(
    model: QualityModel,
    images: torch.Tensor,
    start_block: int,
    precision: str = "fp32",
) -> torch.Tensor:
    """Hidden state entering block ``start_block`` for preprocessed ``images`` (eval mode,
    i.e. no prompt dropout)."""
    tower = ImageTower(model)
    was = model.training
    model.eval()
    try:
        with autocast(model.device, precision):
            h = tower.blocks(tower.embed(images.to(model.device)), 0, start_block)
    finally:
        model.train(was)
    return h


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


def bank_view(
    model: QualityModel, image: Image.Image, seed: int, index: int, view: int
) -> torch.Tensor:
    """View ``view`` of training image ``index`` of the bank (the train transform)."""
    tf = ResizeCropNormalize(
        model.preprocess, train=True, generator=bank_generator(seed, index, view)
    )
    return tf(image)


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
) -> FrozenFeatureCache:
    """Compute the frozen features of ``images`` (decoded RGB training images).

    ``teacher`` maps preprocessed views to scene logits (the frozen CLIP of method.md 7).
    Hidden states are stored in fp32, or bf16 when ``precision == "bf16"``.
    """
    if augmentations < 1:
        raise ValueError(f"cache_augmentations must be at least 1, got {augmentations}")
    t0 = time.perf_counter()
    n, k = len(images), augmentations
    store = torch.bfloat16 if precision == "bf16" else torch.float32
    eval_tf = model.preprocess.eval_transform()
    jobs: list[tuple[int, int]] = [(i, v) for i in range(n) for v in range(-1, k)]  # -1: eval view
    hidden: torch.Tensor | None = None
    eval_hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    bar = tqdm(total=len(jobs), unit="view", desc="caching frozen features", disable=not progress)
    try:
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s : s + batch_size]
            x = torch.stack(
                [
                    eval_tf(images[i]) if v < 0 else bank_view(model, images[i], seed, i, v)
                    for i, v in chunk
                ]
            ).to(model.device)
            h = encode_frozen(model, x, start_block, precision).to(store)
            if hidden is None:
                hidden = torch.empty((n, k, *h.shape[1:]), dtype=store, device=h.device)
                eval_hidden = torch.empty((n, *h.shape[1:]), dtype=store, device=h.device)
            assert eval_hidden is not None
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
                    logits = torch.empty((n, k, t.shape[1]), dtype=torch.float32, device=t.device)
                for r, j in enumerate(train_rows):
                    i, v = chunk[j]
                    logits[i, v] = t[r]
            bar.update(len(chunk))
    finally:
        bar.close()
    assert hidden is not None and eval_hidden is not None
    return FrozenFeatureCache(
        start_block=start_block,
        hidden=hidden,
        eval_hidden=eval_hidden,
        teacher_logits=logits,
        augmentations=k,
        seed=seed,
        build_seconds=time.perf_counter() - t0,
    )
