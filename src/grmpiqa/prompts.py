"""The learned prompts of GRMP-IQA: parameters only (method.md 3 and 4).

* :class:`TextPromptLearner` - CoOp-style context vectors shared by the quality classes;
  ``forward()`` gives the prompt token embeddings (method.md 3).
* :class:`VisualPrompts` - the VPT-deep tensors, shared projection, norm and dropout
  (method.md 4); :class:`~grmpiqa.towers.PromptedVisionTower` inserts them.

The towers that run these through CLIP live in :mod:`grmpiqa.towers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PLACEHOLDER = "X"


class TextPromptLearner(nn.Module):
    """Shared learnable context for the quality classes (CoOp, method.md 3).

    ``n_ctx`` context vectors of the text width, initialised N(0, 0.02), replace the
    embeddings of the placeholder words at positions ``ctx_start..ctx_start+n_ctx-1``
    of ``"X X X X {class}."``: right after SOT (1) for CLIP's tokenizer, first (0) for
    tokenizers without a start token (SigLIP).

    Args:
        token_embedding: the CLIP text tower's embedding (used once, to build buffers).
        tokenizer: open_clip tokenizer.
        class_names: e.g. ``("high quality", "low quality")``; index 0 is "good".
        n_ctx: number of context vectors.
        init_std: std of the normal init.
        ctx_start: position of the first placeholder word
            (:func:`grmpiqa.backbones.placeholder_start`).
    """

    tokens: torch.Tensor
    token_prefix: torch.Tensor
    token_suffix: torch.Tensor
    placeholder_embedding: torch.Tensor

    def __init__(
        self,
        token_embedding: nn.Module,
        tokenizer: object,
        class_names: Sequence[str] = ("high quality", "low quality"),
        n_ctx: int = 4,
        init_std: float = 0.02,
        ctx_start: int = 1,
    ) -> None:
        super().__init__()
        width = int(token_embedding.weight.shape[1])  # type: ignore[index]
        self.n_ctx = n_ctx
        self.class_names = tuple(class_names)
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        texts = [f"{prefix} {name}." for name in self.class_names]
        tokens = tokenizer(texts)  # type: ignore[operator]
        with torch.no_grad():
            embedded = token_embedding(tokens).float()
        self.ctx = nn.Parameter(torch.empty(n_ctx, width).normal_(0.0, init_std))
        self.register_buffer("tokens", tokens, persistent=False)
        s = self.ctx_start = int(ctx_start)
        self.register_buffer("token_prefix", embedded[:, :s].clone(), persistent=False)
        self.register_buffer("token_suffix", embedded[:, s + n_ctx :].clone(), persistent=False)
        #: embeddings of the placeholder words (context equal to these = the plain text)
        self.register_buffer(
            "placeholder_embedding", embedded[0, s : s + n_ctx].clone(), persistent=False
        )

    def forward(self) -> torch.Tensor:
        """Prompt embeddings ``[n_classes, context_length, width]``."""
        n = len(self.class_names)
        ctx = self.ctx.unsqueeze(0).expand(n, -1, -1)
        return torch.cat([self.token_prefix.to(ctx.dtype), ctx, self.token_suffix.to(ctx.dtype)], 1)


class VisualPrompts(nn.Module):
    """VPT-deep prompt parameters for a ViT of ``width`` and ``n_blocks`` (method.md 4).

    ``prompt_embeddings`` [1, P, W] enter with the patch tokens; before block ``i`` for
    ``i = 1..deep_layers`` the P prompt rows are replaced by ``deep_prompt_embeddings[i-1]``.
    Every prompt goes through the shared ``prompt_proj`` and dropout (after expanding to
    the batch, as the released code). ``prompt_norm`` (LayerNorm, eps 1e-6) normalises
    the final sequence. Init: uniform(-a, a), a = sqrt(6 / (3 p^2 + W)); ``prompt_proj``
    kaiming-normal (fan_out).

    Args:
        width: token width W of the image transformer.
        n_blocks: its number of blocks.
        patch_size: p, for the init bound.
        num_tokens: prompt tokens P (100 in the paper).
        deep_layers: blocks after the first that get fresh prompts; ``None`` = all.
        dropout: dropout on projected prompts (0.1 in the released code).
    """

    def __init__(
        self,
        width: int,
        n_blocks: int,
        patch_size: int,
        num_tokens: int = 100,
        deep_layers: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.deep_layers = n_blocks - 1 if deep_layers is None else min(deep_layers, n_blocks - 1)
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + width))
        self.prompt_embeddings = nn.Parameter(
            torch.empty(1, num_tokens, width).uniform_(-bound, bound)
        )
        self.deep_prompt_embeddings = nn.Parameter(
            torch.empty(self.deep_layers, num_tokens, width).uniform_(-bound, bound)
        )
        self.prompt_proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_norm = nn.LayerNorm(width, eps=1e-6)
        self.prompt_dropout = nn.Dropout(dropout)

    def replaces(self, block: int) -> bool:
        """Whether fresh prompts replace the prompt rows before ``block``."""
        return self.num_tokens > 0 and 1 <= block <= self.deep_layers

    def prompts(self, block: int, batch: int) -> torch.Tensor:
        """``dropout(proj(p))`` entering ``block`` (0: the input prompts), ``[B, P, W]``."""
        p = self.prompt_embeddings if block == 0 else self.deep_prompt_embeddings[block - 1 : block]
        return self.prompt_dropout(self.prompt_proj(p).expand(batch, -1, -1))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def scaled_cosines(
    scale: torch.Tensor | float, image_features: torch.Tensor, text_features: torch.Tensor
) -> torch.Tensor:
    """``scale * v @ t.T`` of L2-normalised features: CLIP's logits (method.md 1), in the
    image features' dtype (the quality model and the scene teacher both use it)."""
    return scale * image_features @ text_features.t().to(image_features.dtype)
