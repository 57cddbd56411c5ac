"""timm ViT trunks wrapped by open_clip's ``TimmModel``: SigLIP, SigLIP2, ViT-SO400M,
MobileCLIP-B and MobileCLIP2-B/L, ViTamin (convolutional stem + ViT), and timm's ViTs
with average pooling or relative positions; :mod:`grmpiqa.backbones.eva` adds rotary
embeddings (EVA, EVA02, PE-Core).

The trunk is timm's ``VisionTransformer`` (``forward_features`` / ``forward_head``):
``patch_embed`` -> ``_pos_embed`` (CLS/register tokens, if any, and positions) ->
``patch_drop`` -> ``norm_pre`` -> blocks -> ``norm`` -> ``forward_head`` (token, average
or MAP attention pooling, ``fc_norm``, the trunk's head) -> open_clip's projection.
SigLIP-style trunks have no CLS token: VPT prompts then go first in the sequence, and
the pooling (MAP or average) reads the model's own tokens only, never the prompts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grmpiqa.backbones.base import ImageTrunk, PromptSlot
from grmpiqa.backbones.registry import register_family, timm_module

__all__ = ["TimmTokenTrunk", "TimmViT", "TimmViTRelPos"]


class TimmTokenTrunk(ImageTrunk):
    """Shared parts of timm token trunks (``visual.trunk`` + ``visual.head``)."""

    @property
    def trunk(self) -> Any:
        return self.visual.trunk

    @property
    def width(self) -> int:
        return int(self.trunk.embed_dim)

    @property
    def patch_size(self) -> int:
        ps = getattr(self.trunk.patch_embed, "patch_size", 16)
        return int(ps[0] if isinstance(ps, tuple | list) else ps)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.trunk, "num_prefix_tokens", 0))

    @property
    def grid_size(self) -> tuple[int, int]:
        g = self.trunk.patch_embed.grid_size
        return int(g[0]), int(g[1])

    @property
    def pooled_rows(self) -> int | None:
        t = self.trunk
        if getattr(t, "attn_pool", None) is None and getattr(t, "global_pool", "") == "token":
            return 1
        return None

    @property
    def n_units(self) -> int:
        return len(self.trunk.blocks)

    def unit_modules(self) -> list[nn.Module]:
        return list(self.trunk.blocks)

    def final_norm_modules(self) -> list[nn.Module]:
        t = self.trunk
        mods: list[Any] = [t.norm, getattr(t, "fc_norm", None)]
        return [m for m in mods if _has_params(m)]

    def head_parameters(self) -> list[nn.Parameter]:
        t = self.trunk
        mods = [t.norm, getattr(t, "fc_norm", None), getattr(t, "attn_pool", None), t.head]
        params = [p for m in mods if isinstance(m, nn.Module) for p in m.parameters()]
        return params + list(self.visual.head.parameters())

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.head(self.trunk.forward_head(self.trunk.norm(x)))  # type: ignore[no-any-return]

    def token_readout(self, x: torch.Tensor) -> torch.Tensor:
        """Each token pooled alone: the CLS/average head on one token, or the MAP
        attention pooler over a one-token sequence (its value path)."""
        t = self.trunk
        n, rows, w = x.shape
        y = t.norm(x).reshape(n * rows, 1, w)
        z = t.attn_pool(y) if getattr(t, "attn_pool", None) is not None else y[:, 0]
        z = t.head(t.head_drop(t.fc_norm(z)))
        return self.visual.head(z).reshape(n, rows, -1)  # type: ignore[no-any-return]


def _has_params(m: Any) -> bool:
    return isinstance(m, nn.Module) and any(True for _ in m.parameters())


_VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "vitamin")


@register_family("timm-vit")
class TimmViT(TimmTokenTrunk):
    """timm ``VisionTransformer`` (SigLIP, SigLIP2, SO400M, MobileCLIP ViTs, ViTamin)."""

    summary = "timm ViT trunk (SigLIP, SigLIP2, SO400M, MobileCLIP-B/L, ViTamin, GAP ViT)"

    @classmethod
    def claims(cls, model_cfg: dict[str, Any]) -> bool:
        return timm_module(model_cfg) in _VIT_MODULES

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(getattr(visual, "trunk", None), VisionTransformer)

    @classmethod
    def label(cls, model_cfg: dict[str, Any]) -> str:
        name = str(model_cfg["vision_cfg"]["timm_model_name"])
        if "siglip" in name:
            return "SigLIP ViT"
        if "mci" in name or "clip_224" in name:
            return "MobileCLIP ViT"
        if name.startswith("vitamin"):
            return "ViTamin"
        return "timm ViT"

    @property
    def visual_prompts_problem(self) -> str | None:
        if getattr(self.trunk, "dynamic_img_size", False):
            return "the trunk resizes its positions per input (dynamic_img_size)"
        return None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.patch_embed(images)
        x = t._pos_embed(x)
        x = t.patch_drop(x)
        return t.norm_pre(x)  # type: ignore[no-any-return]

    def run_unit(
        self, index: int, x: torch.Tensor, prompts: PromptSlot | None = None
    ) -> torch.Tensor:
        return self.trunk.blocks[index](x)  # type: ignore[no-any-return]


@register_family("timm-vit-relpos")
class TimmViTRelPos(TimmTokenTrunk):
    """timm ``VisionTransformerRelPos``: relative-position bias on the fixed token grid,
    so no visual prompts (the bias has no entries for extra rows)."""

    summary = "timm ViT with relative-position bias (text prompts + last blocks)"

    @classmethod
    def claims(cls, model_cfg: dict[str, Any]) -> bool:
        return timm_module(model_cfg) == "vision_transformer_relpos"

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos

        return isinstance(getattr(visual, "trunk", None), VisionTransformerRelPos)

    @classmethod
    def label(cls, model_cfg: dict[str, Any]) -> str:
        return "ViT (relative positions)"

    @classmethod
    def config_visual_prompts(cls, model_cfg: dict[str, Any]) -> str | None:
        return "relative-position bias is defined on the fixed token grid only"

    @property
    def visual_prompts_problem(self) -> str | None:
        return self.config_visual_prompts({})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.patch_embed(images)
        if t.cls_token is not None:
            x = torch.cat((t.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x  # type: ignore[no-any-return]

    def run_unit(
        self, index: int, x: torch.Tensor, prompts: PromptSlot | None = None
    ) -> torch.Tensor:
        t = self.trunk
        shared = t.shared_rel_pos.get_bias() if t.shared_rel_pos is not None else None
        return t.blocks[index](x, shared_rel_pos=shared)  # type: ignore[no-any-return]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.head(self.trunk.forward_head(self.trunk.norm(x)))  # type: ignore[no-any-return]

    def token_readout(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("no per-token read-out for relative-position ViTs")
