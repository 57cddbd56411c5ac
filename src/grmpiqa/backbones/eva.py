"""timm ``Eva`` trunks: EVA01, EVA02 and PE-Core (rotary position embeddings).

The blocks rotate queries and keys of the patch rows by their grid position (the
attention's own ``num_prefix_tokens`` leading rows are not rotated). A VPT prompt has
no grid position, so its rows get the identity rotation (sin 0, cos 1), exactly as
the CLS token: the rotary table handed to a block is the trunk's own with identity
rows spliced in where the prompts sit (:class:`~grmpiqa.backbones.base.PromptSlot`).
With no prompts it is the trunk's own table, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from grmpiqa.backbones.base import PromptSlot
from grmpiqa.backbones.registry import register_family, timm_module
from grmpiqa.backbones.timm_vit import TimmTokenTrunk

__all__ = ["EvaTrunk", "identity_rope_rows"]


def identity_rope_rows(rope: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows of a concatenated ``[sin, cos]`` rotary table that rotate nothing."""
    shape = list(rope.shape)
    shape[-2] = count
    half = shape[-1] // 2
    sin = rope.new_zeros(*shape[:-1], half)
    cos = rope.new_ones(*shape[:-1], shape[-1] - half)
    return torch.cat([sin, cos], dim=-1)


@register_family("eva")
class EvaTrunk(TimmTokenTrunk):
    """timm ``Eva``: EVA01/EVA02 (CLS pooling) and PE-Core (MAP pooling), rotary
    embeddings on the patch rows."""

    summary = "timm EVA trunk with rotary embeddings (EVA01, EVA02, PE-Core)"

    @classmethod
    def claims(cls, model_cfg: dict[str, Any]) -> bool:
        return timm_module(model_cfg) == "eva"

    @classmethod
    def accepts(cls, visual: Any) -> bool:
        from timm.models.eva import Eva

        return isinstance(getattr(visual, "trunk", None), Eva)

    @classmethod
    def label(cls, model_cfg: dict[str, Any]) -> str:
        name = str(model_cfg["vision_cfg"]["timm_model_name"])
        if name.startswith("eva02"):
            return "EVA02"
        if name.startswith("vit_pe"):
            return "PE-Core"
        return "EVA01"

    @property
    def visual_prompts_problem(self) -> str | None:
        if getattr(self.trunk, "dynamic_img_size", False):
            return "the trunk resizes its positions per input (dynamic_img_size)"
        return None

    def _rope(self) -> torch.Tensor | None:
        t = self.trunk
        if getattr(t, "rope", None) is None:
            return None
        if hasattr(t.rope, "feat_shape"):
            return t.rope.get_embed()  # type: ignore[no-any-return]
        return t.rope.get_embed(shape=t.patch_embed.grid_size)  # type: ignore[no-any-return]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.patch_embed(images)
        x, _ = t._pos_embed(x)
        return t.norm_pre(x)  # type: ignore[no-any-return]

    def _rope_for(self, index: int, x: torch.Tensor, prompts: PromptSlot | None) -> Any:
        rope = self._rope()
        if rope is None:
            return None
        if getattr(self.trunk, "rope_mixed", False):
            rope = rope[index]
        if prompts is None or prompts.count == 0:
            return rope
        npt = int(self.trunk.blocks[index].attn.num_prefix_tokens)
        at = prompts.start - npt
        if at < 0:
            raise ValueError("visual prompts must follow the trunk's prefix tokens")
        ident = identity_rope_rows(rope, prompts.count)
        return torch.cat([rope[..., :at, :], ident, rope[..., at:, :]], dim=-2)

    def run_unit(
        self, index: int, x: torch.Tensor, prompts: PromptSlot | None = None
    ) -> torch.Tensor:
        rope = self._rope_for(index, x, prompts)
        return self.trunk.blocks[index](x, rope=rope)  # type: ignore[no-any-return]
