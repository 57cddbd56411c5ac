"""Cache of what is frozen in stage 2, so a fine-tuning epoch only runs the trained part.

Stage 2 (method.md 7) trains the last ``finetune_blocks`` (4) image blocks, ``ln_post``,
the text context and the last text blocks; the visual prompts and the image tower up to
block 7 are frozen. So for a fixed input view the hidden state entering block 8 never
changes, and neither do the frozen teacher's scene logits. This module computes them
once, for a fixed *bank* of ``K`` augmented views per training image (default 8, drawn
with a seeded generator) plus the deterministic eval view; epoch ``e`` then uses view
``(e - 1) mod K`` of every image and runs only blocks 8..11 and the head, on a fast path
(:class:`ImageTower`) that skips rows whose output is discarded.

Exactness: the cached and uncached paths give the same losses and gradients for the same
view (up to float rounding; tested to 1e-5 in fp32) provided the frozen layers run
without prompt dropout. The released code applies dropout (p = 0.1) to *every* projected
visual prompt in train mode; the cached path computes the frozen part in eval mode (no
dropout on the prompts of blocks 0..7) and keeps dropout on the prompts inserted before
the trained blocks. That, and the finite bank of views instead of a fresh random crop
every epoch, are the cache's deviations from the released path
(``FinetuneConfig(cache=False)`` / ``--no-cache`` keeps it exactly).

Memory: ``N * K`` hidden states of ``T * W`` values, where the prompt rows are not
stored (every trained block replaces them): ViT-B/16 has T = 197, W = 768, i.e. 0.6 MB
per view in fp32; 50 shots x (8 + 1 eval) views = 272 MB (half in bf16, used when
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
from torch.nn import functional as F
from tqdm.auto import tqdm

from grmpiqa.model import QualityModel
from grmpiqa.precision import autocast
from grmpiqa.prompts import l2_normalize
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

    It also runs the trained tail of the tower on a *fast path* that gives the same
    result up to floating-point rounding while skipping work whose output is discarded
    (method.md 4: deep prompts replace the prompt positions before every block, and the
    head pools the CLS token):

    * the output rows at the prompt positions of every block but the last are replaced
      by the next block's prompts, so those rows are only used as keys and values: their
      queries, attention output, MLP (and the cached hidden state's prompt rows) are
      skipped ("compact" hidden states of the CLS and patch tokens only);
    * of the last block only the CLS row is computed;
    * attention is computed directly with ``scaled_dot_product_attention`` on the
      block's own weights (no packed-projection copies).
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

    # -- the fast path -------------------------------------------------------------

    def fast_ok(self, start: int) -> bool:
        """Whether blocks ``start..`` can run on the fast path (CLIP ViTs: CLS pooling,
        standard residual blocks, batch-first, no attention dropout)."""
        v = self.vit
        if not (
            start < self.n_blocks
            and getattr(v, "pool_type", "tok") == "tok"
            and getattr(v, "attn_pool", None) is None
            and getattr(v.transformer, "batch_first", True)
        ):
            return False
        for block in list(v.transformer.resblocks)[start:]:
            a = getattr(block, "attn", None)
            if not (
                isinstance(block, ResidualAttentionBlock)
                and not hasattr(block, "ln_1_kv")
                and isinstance(a, nn.MultiheadAttention)
                and a._qkv_same_embed_dim
                and a.in_proj_weight is not None
                and a.bias_k is None
                and not a.add_zero_attn
                and a.dropout == 0.0
            ):
                return False
        return True

    def is_compact(self, start: int) -> bool:
        """Whether the hidden state entering block ``start`` is stored without its prompt
        rows: every block from ``start`` on replaces the prompts (VPT-deep)."""
        vpt = self.model.visual
        return (
            vpt is not None
            and vpt.num_tokens > 0
            and 1 <= start
            and self.n_blocks - 1 <= vpt.deep_layers
            and self.fast_ok(start)
        )

    def compact(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Drop the prompt rows of a full hidden state (when :meth:`is_compact`)."""
        if not self.is_compact(start):
            return hidden
        assert self.model.visual is not None
        p = self.model.visual.num_tokens
        return torch.cat([hidden[:, :1], hidden[:, 1 + p :]], dim=1)

    def expand(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """A full hidden state from a compact one (prompt rows zero: block ``start``
        replaces them anyway)."""
        if not self.is_compact(start):
            return hidden
        assert self.model.visual is not None
        p = self.model.visual.num_tokens
        zeros = hidden.new_zeros(hidden.shape[0], p, hidden.shape[2])
        return torch.cat([hidden[:, :1], zeros, hidden[:, 1:]], dim=1)

    def features_from_hidden(
        self, hidden: torch.Tensor, start: int, fast: bool = True
    ) -> torch.Tensor:
        """L2-normalised image embedding from the hidden state entering block ``start``.

        ``hidden`` is in the layout :func:`encode_frozen` returns (compact when
        :meth:`is_compact`). ``fast`` selects the fast path (see the class docstring);
        ``fast=False`` runs the blocks exactly as the uncached model does.
        """
        if not (fast and self.fast_ok(start)):
            return l2_normalize(self.head(self.blocks(self.expand(hidden, start), start)))
        last = self.n_blocks - 1
        blocks = self.vit.transformer.resblocks
        vpt = self.model.visual
        if self.is_compact(start):
            assert vpt is not None
            r = hidden
            for i in range(start, self.n_blocks):
                prompts = vpt._prompt(vpt.deep_prompt_embeddings[i - 1 : i], r.shape[0])
                x = torch.cat([r, prompts.to(r.dtype)], dim=1)  # keys: order-free
                r = _block_rows(blocks[i], x, 1 if i == last else r.shape[1])
            return l2_normalize(self.head(r))
        x = self.blocks(hidden, start, last) if start < last else hidden
        if vpt is not None and 1 <= last <= vpt.deep_layers:
            deep = vpt._prompt(vpt.deep_prompt_embeddings[last - 1 : last], x.shape[0])
            x = torch.cat([x[:, :1], deep.to(x.dtype), x[:, 1 + vpt.num_tokens :]], dim=1)
        return l2_normalize(self.head(_block_rows(blocks[last], x, 1)))


def _attention(
    attn: nn.MultiheadAttention, q_in: torch.Tensor, kv_in: torch.Tensor
) -> torch.Tensor:
    """``nn.MultiheadAttention(q_in, kv_in, kv_in)`` (batch-first, no mask) computed
    directly: queries ``[B, R, W]`` against keys/values ``[B, T, W]``."""
    b, r, w = q_in.shape
    t = kv_in.shape[1]
    h = attn.num_heads
    d = w // h
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    bq = bkv = None
    if bias is not None:
        bq, bkv = bias[:w], bias[w:]
    q = F.linear(q_in, weight[:w], bq).view(b, r, h, d).transpose(1, 2)
    kv = F.linear(kv_in, weight[w:], bkv).view(b, t, 2, h, d).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, r, w)
    return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)


def _block_rows(block: ResidualAttentionBlock, x: torch.Tensor, rows: int) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock`` for the first ``rows`` tokens only.

    Keys and values come from every token; the queries, residual and MLP from the
    first ``rows``, exactly as in the full block (``[B, T, W]`` -> ``[B, rows, W]``).
    """
    y = block.ln_1(x)
    h = x[:, :rows] + block.ls_1(_attention(block.attn, y[:, :rows], y))
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
    """Hidden state entering block ``start_block`` for preprocessed ``images``.

    Computed in eval mode (no prompt dropout), in the layout
    :meth:`ImageTower.features_from_hidden` takes: without the prompt rows when
    :meth:`ImageTower.is_compact`, since block ``start_block`` replaces them.
    """
    tower = ImageTower(model)
    was = model.training
    model.eval()
    try:
        with autocast(model.device, precision):
            # an fp32 residual stream: bf16 autocast still runs the matmuls in bf16, and
            # on CPUs a bf16 residual stream is about twice as slow
            h = tower.blocks(tower.embed(images.to(model.device)).float(), 0, start_block)
    finally:
        model.train(was)
    return tower.compact(h, start_block)


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
