"""Learnable prompts around open_clip's towers (method.md 3 and 4).

* :class:`TextPromptLearner` - CoOp-style shared context vectors that replace the
  placeholder tokens of ``"X X X X {class name}."`` (method.md 3).
* :class:`TextEncoder` - runs open_clip's text transformer on token *embeddings*, so
  learned context can be injected; with unmodified embeddings it equals
  ``clip.encode_text`` (tested).
* :class:`VisualPromptedEncoder` - VPT-deep: wraps open_clip's ``VisionTransformer``
  (reusing its modules, never copying them) and inserts prompt tokens after CLS
  (method.md 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

PLACEHOLDER = "X"


class TextEncoder(nn.Module):
    """open_clip's text tower, fed with token embeddings (method.md 3).

    ``forward(embeddings, tokens)`` = positional embedding -> transformer (causal mask)
    -> ln_final -> pool at EOT (argmax of token ids) -> text projection.
    """

    def __init__(self, clip: Any) -> None:
        super().__init__()
        self.clip = [clip]  # not a submodule: the QualityModel owns the CLIP weights

    @property
    def _c(self) -> Any:
        return self.clip[0]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._c.token_embedding(tokens)

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        c = self._c
        x = embeddings + c.positional_embedding.to(embeddings.dtype)
        x = c.transformer(x, attn_mask=c.attn_mask)
        x = c.ln_final(x)
        x = text_global_pool(x, tokens, c.text_pool_type, getattr(c, "text_eos_id", None))
        proj = c.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(self.embed(tokens), tokens)


class TextPromptLearner(nn.Module):
    tokens: torch.Tensor
    token_prefix: torch.Tensor
    token_suffix: torch.Tensor
    placeholder_embedding: torch.Tensor

    """Shared learnable context for the quality classes (CoOp, method.md 3).

    ``n_ctx`` context vectors of the text width, initialised N(0, 0.02), replace the
    embeddings of the placeholder words at positions ``1..n_ctx`` (right after SOT) of
    ``"X X X X {class}."``.

    Args:
        token_embedding: the CLIP text tower's embedding (used once, to build buffers).
        tokenizer: open_clip tokenizer.
        class_names: e.g. ``("high quality", "low quality")``; index 0 is "good".
        n_ctx: number of context vectors.
    """

    def __init__(
        self,
        token_embedding: nn.Embedding,
        tokenizer: object,
        class_names: Sequence[str] = ("high quality", "low quality"),
        n_ctx: int = 4,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        width = token_embedding.weight.shape[1]
        self.n_ctx = n_ctx
        self.class_names = tuple(class_names)
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        texts = [f"{prefix} {name}." for name in self.class_names]
        tokens = tokenizer(texts)  # type: ignore[operator]
        with torch.no_grad():
            embedded = token_embedding(tokens).float()
        self.ctx = nn.Parameter(torch.empty(n_ctx, width).normal_(0.0, init_std))
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)
        self.register_buffer(
            "placeholder_embedding", embedded[0, 1 : 1 + n_ctx].clone(), persistent=False
        )

    def forward(self) -> torch.Tensor:
        """Prompt embeddings ``[n_classes, context_length, width]``."""
        n = len(self.class_names)
        ctx = self.ctx.unsqueeze(0).expand(n, -1, -1)
        return torch.cat([self.token_prefix.to(ctx.dtype), ctx, self.token_suffix.to(ctx.dtype)], 1)


class VisualPromptedEncoder(nn.Module):
    """VPT-deep around open_clip's ``VisionTransformer`` (method.md 4).

    Sequence: ``[CLS, P prompts, patches]``. The input prompts come from
    ``prompt_embeddings`` [1, P, W]; before block ``i`` for ``i = 1..deep_layers`` the P
    prompt positions are replaced by ``deep_prompt_embeddings[i-1]``. Every prompt goes
    through the shared ``prompt_proj`` and dropout. After the last block ``prompt_norm``
    (LayerNorm, eps 1e-6) is applied to the whole sequence, then open_clip's ``ln_post``,
    CLS pooling and projection.

    Args:
        visual: open_clip ``VisionTransformer`` (its weights stay owned by the CLIP).
        num_tokens: prompt tokens P (100 in the paper).
        deep_layers: blocks after the first that get fresh prompts; ``None`` = all.
        dropout: dropout on projected prompts (0.1 in the released code).
        patch_size: for the uniform init bound ``sqrt(6 / (3*p*p + W))``.
    """

    def __init__(
        self,
        visual: Any,
        num_tokens: int = 100,
        deep_layers: int | None = None,
        dropout: float = 0.1,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.visual = [visual]  # not a submodule: the QualityModel owns the CLIP weights
        width = visual.conv1.out_channels
        n_blocks = len(visual.transformer.resblocks)
        self.num_tokens = num_tokens
        self.n_blocks = n_blocks
        self.deep_layers = n_blocks - 1 if deep_layers is None else min(deep_layers, n_blocks - 1)
        p = patch_size or int(visual.conv1.kernel_size[0])
        bound = math.sqrt(6.0 / float(3 * p * p + width))
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

    @property
    def _v(self) -> Any:
        return self.visual[0]

    # -- the three stages; ``forward`` chains them, a feature cache can split them ----

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embed, CLS, positional embedding, ln_pre, then insert input prompts."""
        v = self._v
        if hasattr(v, "_embeds"):
            x = v._embeds(images)
        else:  # open_clip < 2.29 has no _embeds; same computation
            x = v.conv1(images)
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
            x = v.ln_pre(v.patch_dropout(x))
        prompts = self._prompt(self.prompt_embeddings, x.shape[0]).to(x.dtype)
        return torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)

    def blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start..end-1`` (batch-first), replacing deep prompts before each."""
        tr = self._v.transformer
        end = self.n_blocks if end is None else end
        batch_first = getattr(tr, "batch_first", True)
        for i in range(start, end):
            if 1 <= i <= self.deep_layers:
                deep = self._prompt(self.deep_prompt_embeddings[i - 1 : i], x.shape[0])
                deep = deep.to(x.dtype)
                x = torch.cat([x[:, :1], deep, x[:, 1 + self.num_tokens :]], dim=1)
            block = tr.resblocks[i]
            if batch_first:
                x = block(x)
            else:
                x = block(x.transpose(0, 1)).transpose(0, 1)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """prompt_norm on the whole sequence, ln_post, CLS token, projection."""
        v = self._v
        x = self.prompt_norm(x)
        if hasattr(v, "_pool"):
            pooled, _ = v._pool(x)
        else:  # older open_clip: CLIP ViTs pool the CLS token after ln_post
            pooled = v.ln_post(x[:, 0])
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embedding ``[N, embed_dim]``."""
        return self.head(self.blocks(self.embed(images)))

    def _prompt(self, p: torch.Tensor, batch: int) -> torch.Tensor:
        """dropout(proj(p)) per sample, as the released code (dropout after expand)."""
        return self.prompt_dropout(self.prompt_proj(p).expand(batch, -1, -1))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
