"""The one place that knows open_clip's internals (used by :mod:`grmpiqa.towers` only).

open_clip's ``VisionTransformer`` and ``CLIP`` text tower expose their split points
differently across releases (``_embeds``/``_pool`` appeared in 2.32; ``text_global_pool``
changed its signature and return type in 2.32 and 3.0). Everything grmpiqa needs from
inside them is a function here, written against the modules' public attributes where
possible, so the towers never depend on a particular release.

Supported: open_clip_torch >= :data:`MIN_VERSION` (CI runs the fast tests against it).

The exact fast path (:func:`block_rows`) computes a standard pre-norm
``ResidualAttentionBlock`` (``nn.MultiheadAttention`` with packed in-projection, no
mask, no attention dropout) for the first rows of a sequence only, reading keys and
values from every row. :func:`fast_path_problem` says why a model cannot use it.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Lowest open_clip_torch release grmpiqa supports (declared in pyproject.toml).
MIN_VERSION = (2, 29, 0)


def open_clip_version() -> tuple[int, ...]:
    """The installed open_clip_torch version as a tuple of ints (best effort)."""
    try:
        raw = metadata.version("open_clip_torch")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        import open_clip

        raw = str(getattr(open_clip, "__version__", "0"))
    parts: list[int] = []
    for piece in raw.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# -- the image tower ------------------------------------------------------------------------


def vision_blocks(visual: Any) -> nn.ModuleList:
    """The residual blocks of a ``VisionTransformer`` (batch-first order of execution)."""
    return visual.transformer.resblocks  # type: ignore[no-any-return]


def batch_first(visual_or_transformer: Any) -> bool:
    tr = getattr(visual_or_transformer, "transformer", visual_or_transformer)
    return bool(getattr(tr, "batch_first", True))


def patch_size(visual: Any) -> int:
    return int(visual.conv1.kernel_size[0])


def vision_width(visual: Any) -> int:
    return int(visual.conv1.out_channels)


def grid_size(visual: Any) -> tuple[int, int]:
    g = getattr(visual, "grid_size", None)
    if g is not None:
        return int(g[0]), int(g[1])
    n = int(visual.positional_embedding.shape[0]) - 1
    side = int(round(n**0.5))
    return side, side


def vision_embed(visual: Any, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding, CLS token, positional embedding, patch dropout, ``ln_pre``:
    ``[N, 3, H, W]`` -> ``[N, 1 + L, W]`` (open_clip's ``_embeds``)."""
    if hasattr(visual, "_embeds"):
        return visual._embeds(images)  # type: ignore[no-any-return]
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))  # type: ignore[no-any-return]


def run_block(block: nn.Module, x: torch.Tensor, first: bool = True) -> torch.Tensor:
    """One open_clip residual block on a batch-first sequence."""
    if first:
        return block(x)  # type: ignore[no-any-return]
    return block(x.transpose(0, 1)).transpose(0, 1)  # type: ignore[no-any-return]


def vision_pool(visual: Any, x: torch.Tensor) -> torch.Tensor:
    """``ln_post`` and pooling of the final sequence, then the projection: ``[N, D]``."""
    if hasattr(visual, "_pool"):
        pooled, _ = visual._pool(x)
    elif getattr(visual, "attn_pool", None) is not None:  # pragma: no cover - CoCa towers
        raise NotImplementedError("attention-pooled image towers need open_clip >= 2.32")
    else:
        pool_type = getattr(visual, "pool_type", "tok")
        if getattr(visual, "final_ln_after_pool", False):
            pooled = visual.ln_post(_global_pool(x, pool_type))
        else:
            pooled = _global_pool(visual.ln_post(x), pool_type)
    return project(pooled, visual.proj)


def vision_head_parameters(visual: Any) -> list[nn.Parameter]:
    """Parameters used after the blocks: ``ln_post``, the projection, an attention pooler."""
    params: list[nn.Parameter] = list(visual.ln_post.parameters())
    proj = getattr(visual, "proj", None)
    if isinstance(proj, nn.Parameter):
        params.append(proj)
    elif isinstance(proj, nn.Module):
        params.extend(proj.parameters())
    for name in ("attn_pool", "attn_pool_contrastive", "ln_pool"):
        mod = getattr(visual, name, None)
        if isinstance(mod, nn.Module):
            params.extend(mod.parameters())
    return params


def matmul_parameters(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(owner, attribute)`` of every parameter that only feeds a matrix product or a
    convolution (Linear and Conv weights and biases, packed attention in-projections,
    the image tower's ``proj``): the tensors bf16 autocast casts to bf16 at every call.
    Layer norms, embeddings and layer scales are not among them."""
    out: list[tuple[nn.Module, str]] = []
    for mod in module.modules():
        if isinstance(mod, nn.Linear | nn.Conv1d | nn.Conv2d):
            names = ["weight", "bias"]
        elif isinstance(mod, nn.MultiheadAttention):
            names = ["in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight"]
            names += ["v_proj_weight"]
        else:
            names = ["proj"] if mod is module else []
        for name in names:
            if isinstance(getattr(mod, name, None), nn.Parameter):
                out.append((mod, name))
    return out


def vision_tokens(visual: Any, x: torch.Tensor) -> torch.Tensor:
    """Every token of the final sequence through ``ln_post`` and the projection
    (the per-token read-out of the CLS head): ``[N, T, W]`` -> ``[N, T, D]``."""
    return project(visual.ln_post(x), visual.proj)


def _global_pool(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    if pool_type == "avg":
        return x[:, 1:].mean(dim=1)
    if pool_type == "tok":
        return x[:, 0]
    return x


def project(x: torch.Tensor, proj: Any) -> torch.Tensor:
    if proj is None:
        return x
    if isinstance(proj, nn.Linear):
        return proj(x)  # type: ignore[no-any-return]
    return x @ proj


def pools_cls_token(visual: Any) -> bool:
    """Whether the embedding depends on the CLS row of the final sequence only."""
    return (
        getattr(visual, "pool_type", "tok") == "tok" and getattr(visual, "attn_pool", None) is None
    )


def fast_path_problem(visual: Any) -> str | None:
    """Why the row-selective fast path cannot run this image tower (None: it can)."""
    if not pools_cls_token(visual):
        return "the image tower does not pool the CLS token"
    if not batch_first(visual):
        return "the image transformer is not batch-first"
    for i, block in enumerate(vision_blocks(visual)):
        problem = block_problem(block)
        if problem is not None:
            return f"block {i}: {problem}"
    return None


def block_problem(block: nn.Module) -> str | None:
    """Why :func:`block_rows` cannot compute ``block`` (None: it can)."""
    from open_clip.transformer import ResidualAttentionBlock

    if not isinstance(block, ResidualAttentionBlock):
        return f"{type(block).__name__} is not open_clip's ResidualAttentionBlock"
    if hasattr(block, "ln_1_kv"):
        return "cross-attention block"
    a = getattr(block, "attn", None)
    if not isinstance(a, nn.MultiheadAttention):
        return "attention is not nn.MultiheadAttention"
    if not (a._qkv_same_embed_dim and a.in_proj_weight is not None):
        return "attention without a packed in-projection"
    if a.bias_k is not None or a.add_zero_attn or a.dropout != 0.0:
        return "attention with extra keys or dropout"
    if not getattr(a, "batch_first", True):
        return "attention is not batch-first"
    return None


def block_rows(block: nn.Module, x: torch.Tensor, rows: int) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock`` for the first ``rows`` tokens of ``x`` only.

    Keys and values come from every token; queries, residual and MLP from the first
    ``rows`` (``[B, T, W]`` -> ``[B, rows, W]``). Equal to ``block(x)[:, :rows]`` up to
    rounding (attention is order-free over keys). Check :func:`block_problem` first.
    """
    b: Any = block
    y = b.ln_1(x)
    h = x[:, :rows] + b.ls_1(_attention(b.attn, y[:, :rows], y))
    return h + b.ls_2(b.mlp(b.ln_2(h)))  # type: ignore[no-any-return]


def _attention(
    attn: nn.MultiheadAttention, q_in: torch.Tensor, kv_in: torch.Tensor
) -> torch.Tensor:
    """``attn(q_in, kv_in, kv_in)`` (batch-first, no mask) with the module's own weights."""
    b, r, w = q_in.shape
    t = kv_in.shape[1]
    h = attn.num_heads
    d = w // h
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    bq = bkv = None
    if bias is not None:
        bq, bkv = bias[:w], bias[w:]
    if q_in.data_ptr() == kv_in.data_ptr() and r == t:
        qkv = F.linear(q_in, weight, bias).view(b, r, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:
        q = F.linear(q_in, weight[:w], bq).view(b, r, h, d).transpose(1, 2)
        kv = F.linear(kv_in, weight[w:], bkv).view(b, t, 2, h, d).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, r, w)
    return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)


# -- the text tower -------------------------------------------------------------------------


def text_problem(clip: Any) -> str | None:
    """Why :func:`text_forward` cannot run this model's text tower (None: it can)."""
    for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
        if not hasattr(clip, attr):
            return f"the model has no {attr} (not an open_clip CLIP with a built-in text tower)"
    return None


def text_blocks(clip: Any) -> nn.ModuleList:
    return clip.transformer.resblocks  # type: ignore[no-any-return]


def text_width(clip: Any) -> int:
    return int(clip.token_embedding.weight.shape[1])


def text_pool_type(clip: Any) -> str:
    return str(getattr(clip, "text_pool_type", "argmax"))


def text_causal(clip: Any) -> bool:
    return getattr(clip, "attn_mask", None) is not None


def text_forward(
    clip: Any, embeddings: torch.Tensor, tokens: torch.Tensor, length: int | None = None
) -> torch.Tensor:
    """open_clip's text tower on token *embeddings* (so learned context can be injected):
    positional embedding -> transformer (causal mask) -> ``ln_final`` -> pooling ->
    text projection. ``length`` runs only the first ``length`` positions (exact for a
    causal tower pooled at or before ``length - 1``)."""
    n = embeddings.shape[1] if length is None else int(length)
    x = embeddings[:, :n] + clip.positional_embedding[:n].to(embeddings.dtype)
    mask = getattr(clip, "attn_mask", None)
    if mask is not None:
        mask = mask[:n, :n]
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    pooled = _text_pool(x, tokens[:, :n], text_pool_type(clip), getattr(clip, "text_eos_id", None))
    return project(pooled, clip.text_projection)


def _text_pool(
    x: torch.Tensor, tokens: torch.Tensor, pool_type: str, eos_id: int | None
) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device)
    if pool_type == "argmax":  # the EOT token has the highest id of CLIP's vocabulary
        return x[rows, tokens.argmax(dim=-1)]
    if pool_type == "first":
        return x[:, 0]
    if pool_type == "last":
        return x[:, -1]
    if pool_type == "eos" and eos_id is not None:
        return x[rows, (tokens == eos_id).int().argmax(dim=-1)]
    return x


def pooled_positions(clip: Any, tokens: torch.Tensor) -> int | None:
    """How many leading positions determine the pooled text feature (None: all)."""
    if not text_causal(clip):
        return None
    kind = text_pool_type(clip)
    if kind == "argmax":
        return int(tokens.argmax(dim=-1).max()) + 1
    if kind == "first":
        return 1
    if kind == "eos" and getattr(clip, "text_eos_id", None) is not None:
        return int((tokens == clip.text_eos_id).int().argmax(dim=-1).max()) + 1
    return None
