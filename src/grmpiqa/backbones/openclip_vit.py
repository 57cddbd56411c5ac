"""open_clip's own ``VisionTransformer``: OpenAI and LAION CLIPs of every size and input
resolution, CLIPA, and CoCa's image tower (attention-pooled).

open_clip's split points moved across releases (``_embeds``/``_pool`` appeared in 2.32);
each function here uses them where present and the same computation otherwise, so
grmpiqa runs on every open_clip_torch it admits (CI runs the fast tests against the
lowest one).

The exact fast path (:meth:`OpenClipViT.run_unit_rows`) computes a standard pre-norm
``ResidualAttentionBlock`` (``nn.MultiheadAttention`` with packed in-projection, no
mask, no attention dropout) for the first rows of a sequence only, reading keys and
values from every row; :attr:`OpenClipViT.row_problem` says why a tower cannot use it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from grmpiqa.backbones.base import ImageTrunk, PromptSlot
from grmpiqa.backbones.registry import register_family

__all__ = [
    "MIN_VERSION",
    "OpenClipViT",
    "block_problem",
    "block_rows",
    "open_clip_version",
    "project",
    "vision_blocks",
    "vision_embed",
]

#: Lowest open_clip_torch release grmpiqa supports (declared in pyproject.toml; CI runs
#: the fast tests against it).
MIN_VERSION = (2, 29, 0)


def open_clip_version() -> tuple[int, ...]:
    """The installed open_clip_torch version as a tuple of ints (best effort)."""
    from importlib import metadata

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


def vision_blocks(visual: Any) -> list[nn.Module]:
    """The residual blocks of an open_clip ``VisionTransformer``, in order."""
    return OpenClipViT(visual).unit_modules()


def vision_embed(visual: Any, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding, CLS, positions, ``ln_pre`` of an open_clip ``VisionTransformer``."""
    return OpenClipViT(visual).embed(images)


def project(x: torch.Tensor, proj: Any) -> torch.Tensor:
    """open_clip's projection: a parameter matrix, a Linear, or none."""
    if proj is None:
        return x
    if isinstance(proj, nn.Module):
        return proj(x)  # type: ignore[no-any-return]
    return x @ proj


@register_family("openclip-vit")
class OpenClipViT(ImageTrunk):
    """open_clip ``VisionTransformer``: CLS token first, learned positions, ``ln_pre``,
    residual attention blocks, ``ln_post`` + CLS (or average, or attention) pooling and
    a projection. VPT prompts go right after CLS (method.md 4)."""

    summary = "open_clip ViT (OpenAI, LAION, DataComp, CLIPA, CoCa image tower)"
    row_selective = True

    @classmethod
    def claims(cls, model_cfg: dict[str, Any]) -> bool:
        vis = model_cfg.get("vision_cfg", {})
        return not vis.get("timm_model_name") and not isinstance(vis.get("layers"), list | tuple)

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        from open_clip.transformer import VisionTransformer

        return isinstance(visual, VisionTransformer)

    @classmethod
    def label(cls, model_cfg: dict[str, Any]) -> str:
        if "multimodal_cfg" in model_cfg:
            return "CoCa ViT"
        return "ViT"

    # -- geometry -------------------------------------------------------------------------

    @property
    def _blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks  # type: ignore[no-any-return]

    @property
    def _batch_first(self) -> bool:
        return bool(getattr(self.visual.transformer, "batch_first", True))

    @property
    def width(self) -> int:
        return int(self.visual.conv1.out_channels)

    @property
    def patch_size(self) -> int:
        return int(self.visual.conv1.kernel_size[0])

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def grid_size(self) -> tuple[int, int]:
        g = getattr(self.visual, "grid_size", None)
        if g is not None:
            return int(g[0]), int(g[1])
        n = int(self.visual.positional_embedding.shape[0]) - 1
        side = int(round(n**0.5))
        return side, side

    @property
    def pooled_rows(self) -> int | None:
        v = self.visual
        if getattr(v, "attn_pool", None) is None and getattr(v, "pool_type", "tok") == "tok":
            return 1
        return None

    @property
    def row_problem(self) -> str | None:
        if not self._batch_first:
            return "the image transformer is not batch-first"
        for i, block in enumerate(self._blocks):
            problem = block_problem(block)
            if problem is not None:
                return f"block {i}: {problem}"
        return None

    # -- forward --------------------------------------------------------------------------

    @property
    def n_units(self) -> int:
        return len(self._blocks)

    def unit_modules(self) -> list[nn.Module]:
        return list(self._blocks)

    def final_norm_modules(self) -> list[nn.Module]:
        return [self.visual.ln_post]

    def head_parameters(self) -> list[nn.Parameter]:
        v = self.visual
        params: list[nn.Parameter] = list(v.ln_post.parameters())
        proj = getattr(v, "proj", None)
        if isinstance(proj, nn.Parameter):
            params.append(proj)
        elif isinstance(proj, nn.Module):
            params.extend(proj.parameters())
        for name in ("attn_pool", "attn_pool_contrastive", "ln_pool"):
            mod = getattr(v, name, None)
            if isinstance(mod, nn.Module):
                params.extend(mod.parameters())
        return params

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding, CLS, positions, patch dropout, ``ln_pre``: ``[N, 1 + L, W]``."""
        v = self.visual
        if hasattr(v, "_embeds"):
            return v._embeds(images)  # type: ignore[no-any-return]
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))  # type: ignore[no-any-return]

    def run_unit(
        self, index: int, x: torch.Tensor, prompts: PromptSlot | None = None
    ) -> torch.Tensor:
        block = self._blocks[index]
        if self._batch_first:
            return block(x)  # type: ignore[no-any-return]
        return block(x.transpose(0, 1)).transpose(0, 1)  # type: ignore[no-any-return]

    def run_unit_rows(
        self, index: int, x: torch.Tensor, rows: int, prompts: PromptSlot | None = None
    ) -> torch.Tensor:
        if self.row_problem is not None:
            return self.run_unit(index, x)[:, :rows]
        return block_rows(self._blocks[index], x, rows)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if hasattr(v, "_pool"):
            pooled, _ = v._pool(x)
        else:  # open_clip < 2.32: the same computation, from VisionTransformer.forward
            pooled = _pool_fallback(v, x)
        return project(pooled, v.proj)

    def token_readout(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.visual, "attn_pool", None) is not None:
            raise NotImplementedError("an attention-pooled tower has no per-token read-out")
        return project(self.visual.ln_post(x), self.visual.proj)


def _global_pool(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    if pool_type == "avg":
        return x[:, 1:].mean(dim=1)
    if pool_type == "tok":
        return x[:, 0]
    return x


def _pool_fallback(v: Any, x: torch.Tensor) -> torch.Tensor:
    pool_type = getattr(v, "pool_type", "tok")
    if getattr(v, "attn_pool", None) is not None:
        if getattr(v, "attn_pool_contrastive", None) is not None:
            x = v.ln_post(x)
            tokens = v.attn_pool(x)
            if v.attn_pool_type == "parallel":
                return v.attn_pool_contrastive(x)  # type: ignore[no-any-return]
            return v.attn_pool_contrastive(tokens)  # type: ignore[no-any-return]
        return _global_pool(v.ln_post(v.attn_pool(x)), pool_type)
    if getattr(v, "final_ln_after_pool", False):
        return v.ln_post(_global_pool(x, pool_type))  # type: ignore[no-any-return]
    return _global_pool(v.ln_post(x), pool_type)


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
    q = y if rows >= y.shape[1] else y[:, :rows]  # all rows: one fused projection
    h = x[:, :rows] + b.ls_1(_attention(b.attn, q, y))
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
    if q_in is kv_in:  # (no data_ptr: torch.export and ONNX export trace this)
        qkv = F.linear(q_in, weight, bias).view(b, r, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:
        q = F.linear(q_in, weight[:w], bq).view(b, r, h, d).transpose(1, 2)
        kv = F.linear(kv_in, weight[w:], bkv).view(b, t, 2, h, d).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, r, w)
    return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)
