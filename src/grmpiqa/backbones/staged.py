"""Token-free trunks: ConvNeXt, FastViT (MobileCLIP-S*, MobileCLIP2-S*), Swin and
open_clip's ModifiedResNet (RN50 ... RN50x64).

Their stages act on a feature map (convolutions, or attention inside shifted windows
for Swin, or a conv-positioned attention stage for FastViT), with no global token
sequence a prompt could join, so GRMP-IQA runs on them with the text prompts (stage 1)
and, in stage 2, the last units and final norms (method.md 7). A *unit* is one residual
block of a stage; the stage's own entry (downsampling, FastViT's conditional position
encoding) belongs to its first block's unit, so "the last K units" are the last K
residual blocks, with the layers they need.

The backbone always runs in eval mode (BatchNorm on its running statistics, no
stochastic depth): stage 2 trains parameters, not statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from grmpiqa.backbones.base import ImageTrunk, PromptSlot
from grmpiqa.backbones.registry import register_family, timm_module

__all__ = ["StagedTrunk", "ConvNeXtTrunk", "FastViTTrunk", "SwinTrunk", "ModifiedResNetTrunk"]

_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
)


class _Unit(nn.Module):
    """One residual block with the stage entry it needs (not registered anywhere: the
    parameters stay the model's)."""

    def __init__(self, pre: Sequence[nn.Module], block: nn.Module) -> None:
        super().__init__()
        self.pre = nn.ModuleList(pre)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.pre:
            x = m(x)
        return self.block(x)  # type: ignore[no-any-return]


class StagedTrunk(ImageTrunk):
    """A stem, stages of residual blocks, a tail and a head."""

    _TOKEN_FREE = (
        "a token-free trunk: its stages work on a feature map, with no token sequence "
        "for prompts to join (text prompts and the last units are adapted)"
    )

    def __init__(self, visual: nn.Module) -> None:
        super().__init__(visual)
        units: list[_Unit] = []
        for pre, blocks in self._stages():
            for j, block in enumerate(blocks):
                units.append(_Unit(list(pre) if j == 0 else [], block))
        self._units: list[_Unit] = units

    # subclass hooks ----------------------------------------------------------------------

    def _stages(self) -> list[tuple[list[nn.Module], list[nn.Module]]]:
        raise NotImplementedError

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _tail_modules(self) -> list[nn.Module]:
        """Modules run after the last unit and before the pooling head."""
        return []

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _head_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    # protocol ---------------------------------------------------------------------------

    @classmethod
    def config_visual_prompts(cls, model_cfg: dict[str, Any]) -> str | None:
        return cls._TOKEN_FREE

    @property
    def visual_prompts_problem(self) -> str | None:
        return self._TOKEN_FREE

    @property
    def n_units(self) -> int:
        return len(self._units)

    def unit_modules(self) -> list[nn.Module]:
        return list(self._units)

    def final_norm_modules(self) -> list[nn.Module]:
        mods = self._tail_modules() + self._head_modules()
        found: list[nn.Module] = []
        for m in mods:
            for sub in m.modules():
                if isinstance(sub, _NORMS) and any(True for _ in sub.parameters()):
                    found.append(sub)
        return found

    def head_parameters(self) -> list[nn.Parameter]:
        mods = self._tail_modules() + self._head_modules()
        return [p for m in mods for p in m.parameters()]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self._stem(images)

    def run_unit(
        self, index: int, x: torch.Tensor, prompts: PromptSlot | None = None
    ) -> torch.Tensor:
        return self._units[index](x)  # type: ignore[no-any-return]

    def run_unit_rows(
        self, index: int, x: torch.Tensor, rows: int, prompts: PromptSlot | None = None
    ) -> torch.Tensor:
        return self.run_unit(index, x, prompts)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._tail_modules():
            x = m(x)
        return self._head(x)


class _TimmStaged(StagedTrunk):
    """timm trunks behind open_clip's ``TimmModel`` (``visual.trunk``, ``visual.head``)."""

    _module: str = ""
    _class: str = ""
    _stage_pre: tuple[str, ...] = ("downsample",)

    @classmethod
    def claims(cls, model_cfg: dict[str, Any]) -> bool:
        return timm_module(model_cfg) == cls._module

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        import importlib

        mod = importlib.import_module(f"timm.models.{cls._module}")
        return isinstance(getattr(visual, "trunk", None), getattr(mod, cls._class))

    @property
    def trunk(self) -> Any:
        return self.visual.trunk

    def _stages(self) -> list[tuple[list[nn.Module], list[nn.Module]]]:
        out = []
        for stage in self._stage_list():
            pre = [getattr(stage, n) for n in self._stage_pre]
            out.append(([m for m in pre if m is not None], list(stage.blocks)))
        return out

    def _stage_list(self) -> Sequence[Any]:
        return list(self.trunk.stages)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.head(self.trunk.forward_head(x))  # type: ignore[no-any-return]

    def _head_modules(self) -> list[nn.Module]:
        return [self.trunk.head, self.visual.head]


@register_family("convnext")
class ConvNeXtTrunk(_TimmStaged):
    """timm ConvNeXt (open_clip's convnext_* CLIPs)."""

    summary = "ConvNeXt (token-free: text prompts + last blocks)"
    _module = "convnext"
    _class = "ConvNeXt"

    @classmethod
    def label(cls, model_cfg: dict[str, Any]) -> str:
        return "ConvNeXt"

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk.stem(images)  # type: ignore[no-any-return]

    def _tail_modules(self) -> list[nn.Module]:
        return [self.trunk.norm_pre]


@register_family("fastvit")
class FastViTTrunk(_TimmStaged):
    """timm FastViT (MobileCLIP-S1/S2, MobileCLIP2-S0/S2/S3/S4 image towers)."""

    summary = "FastViT MobileCLIP-S* (token-free: text prompts + last blocks)"
    _module = "fastvit"
    _class = "FastVit"
    _stage_pre = ("downsample", "pos_emb")

    @classmethod
    def label(cls, model_cfg: dict[str, Any]) -> str:
        return "FastViT (MobileCLIP)"

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk.stem(images)  # type: ignore[no-any-return]

    def _tail_modules(self) -> list[nn.Module]:
        return [self.trunk.final_conv]


@register_family("swin")
class SwinTrunk(_TimmStaged):
    """timm Swin Transformer (windowed attention over an NHWC map)."""

    summary = "Swin (token-free here: windowed attention; text prompts + last blocks)"
    _module = "swin_transformer"
    _class = "SwinTransformer"

    @classmethod
    def label(cls, model_cfg: dict[str, Any]) -> str:
        return "Swin"

    def _stage_list(self) -> Sequence[Any]:
        return list(self.trunk.layers)

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.patch_embed(images)
        ape = getattr(t, "absolute_pos_embed", None)
        if ape is not None:
            x = x + ape
        drop = getattr(t, "pos_drop", None)
        return drop(x) if drop is not None else x  # type: ignore[no-any-return]

    def _tail_modules(self) -> list[nn.Module]:
        return [self.trunk.norm]


@register_family("modified-resnet")
class ModifiedResNetTrunk(StagedTrunk):
    """open_clip's ModifiedResNet (OpenAI RN50, RN101, RN50x4/x16/x64): a 3-conv stem,
    four layers of bottlenecks, attention pooling."""

    summary = "ModifiedResNet RN50..RN50x64 (token-free: text prompts + last blocks)"

    @classmethod
    def claims(cls, model_cfg: dict[str, Any]) -> bool:
        vis = model_cfg.get("vision_cfg", {})
        return not vis.get("timm_model_name") and isinstance(vis.get("layers"), list | tuple)

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        from open_clip.modified_resnet import ModifiedResNet

        return isinstance(visual, ModifiedResNet)

    @classmethod
    def label(cls, model_cfg: dict[str, Any]) -> str:
        return "ModifiedResNet"

    def _stages(self) -> list[tuple[list[nn.Module], list[nn.Module]]]:
        v = self.visual
        return [([], list(getattr(v, f"layer{i}"))) for i in range(1, 5)]

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        v: Any = self.visual
        stem: Callable[[torch.Tensor], torch.Tensor] | None = getattr(v, "stem", None)
        if callable(stem):
            return stem(images)
        x = images.to(v.conv1.weight.dtype)
        x = v.act1(v.bn1(v.conv1(x)))
        x = v.act2(v.bn2(v.conv2(x)))
        x = v.act3(v.bn3(v.conv3(x)))
        return v.avgpool(x)  # type: ignore[no-any-return]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.attnpool(x)  # type: ignore[no-any-return]

    def _head_modules(self) -> list[nn.Module]:
        return [self.visual.attnpool]
