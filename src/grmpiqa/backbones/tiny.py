"""Tiny twins: each family's real architecture at a small width and depth, for tests.

Each twin is an open_clip model config (``grmpiqa/model_configs/tiny-*.json``) whose
image tower is the family's own timm or open_clip class, built through the same code
path as the full model; only widths, depths and the input size are small. The timm
trunks are registered with timm as ``grmpiqa_tiny_*`` entry points that call the real
model's entry point with smaller arguments (where an entry point fixes its stem widths,
the same timm builder with smaller stems). Random weights only: they are for tests and
documentation examples, never for scores that mean something.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["TINY_TWINS", "register_tiny_timm_models"]

#: tiny twin name -> (family, the full-size name it stands for)
TINY_TWINS: dict[str, tuple[str, str]] = {
    "test-tiny": ("openclip-vit", "ViT-B-16-quickgelu"),
    "tiny-CoCa": ("openclip-vit", "coca_ViT-B-32"),
    "tiny-SigLIP2": ("timm-vit", "ViT-B-16-SigLIP2"),
    # the same with SigLIP2's Hugging Face tokenizer (give one with --tokenizer DIR offline)
    "tiny-SigLIP2-hf": ("timm-vit", "ViT-B-16-SigLIP2"),
    "tiny-MobileCLIP-B": ("timm-vit", "MobileCLIP-B"),
    "tiny-ViTamin": ("timm-vit", "ViTamin-S"),
    "tiny-relpos": ("timm-vit-relpos", "vit_relpos_medium_patch16_cls_224"),
    "tiny-EVA02": ("eva", "EVA02-B-16"),
    "tiny-PE-Core": ("eva", "PE-Core-B-16"),
    "tiny-convnext": ("convnext", "convnext_base"),
    "tiny-MobileCLIP2-S0": ("fastvit", "MobileCLIP2-S0"),
    "tiny-swin": ("swin", "swin_base_patch4_window7_224"),
    "tiny-RN50": ("modified-resnet", "RN50"),
}

_VIT = dict(img_size=64, embed_dim=32, depth=3, num_heads=2)

#: timm entry point -> (real entry point, smaller arguments)
_OVERRIDES: dict[str, tuple[str, dict[str, Any]]] = {
    "grmpiqa_tiny_siglip": ("vit_base_patch16_siglip_224", dict(_VIT)),
    "grmpiqa_tiny_eva02": ("eva02_base_patch16_clip_224", dict(_VIT, ref_feat_shape=(4, 4))),
    "grmpiqa_tiny_pe_core": (
        "vit_pe_core_base_patch16_224",
        dict(_VIT, ref_feat_shape=(4, 4), attn_pool_num_heads=2),
    ),
    "grmpiqa_tiny_relpos": ("vit_relpos_medium_patch16_cls_224", dict(_VIT)),
    "grmpiqa_tiny_fastvit_mci": (
        "fastvit_mci0",
        dict(layers=(1, 1, 2, 1), embed_dims=(8, 16, 32, 64)),
    ),
    "grmpiqa_tiny_convnext": ("convnext_base", dict(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64))),
    "grmpiqa_tiny_swin": (
        "swin_base_patch4_window7_224",
        dict(img_size=64, window_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)),
    ),
}


def _override_entry(name: str, real: str, small: dict[str, Any]) -> Callable[..., Any]:
    def entry(pretrained: bool = False, **kwargs: Any) -> Any:
        import timm

        return timm.create_model(real, pretrained=False, **dict(small, **kwargs))

    entry.__name__ = name
    entry.__qualname__ = name
    return entry


def _tiny_mci_vit(pretrained: bool = False, **kwargs: Any) -> Any:
    """``vit_base_mci_224`` (MobileCLIP-B): its conv stem and no-CLS-position ViT, small."""
    from timm.models.vision_transformer_hybrid import (
        ConvStem,
        _create_vision_transformer_hybrid,
    )
    from torch import nn

    stem = ConvStem(
        channels=(8, 8, 32), stride=(4, 2, 2), kernel_size=(4, 2, 2), padding=0,
        in_chans=kwargs.get("in_chans", 3), act_layer=nn.GELU,
    )  # fmt: skip
    args = dict(embed_dim=32, depth=3, num_heads=2, no_embed_class=True, img_size=64)
    return _create_vision_transformer_hybrid(
        "vit_base_mci_224", backbone=stem, embed_args=dict(proj=False), pretrained=False,
        **dict(args, **kwargs),
    )  # fmt: skip


def _tiny_vitamin(pretrained: bool = False, **kwargs: Any) -> Any:
    """``vitamin_small_224``: its MbConv stages + GeGLU ViT, small."""
    from timm.models.vitamin import GeGluMlp, VitCfg, VitConvCfg, _create_vitamin

    embed_cfg = VitCfg(
        embed_dim=(8, 16, 32), depths=(1, 1, 1), stem_width=8,
        conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d",
    )  # fmt: skip
    args = dict(
        embed_dim=32, depth=3, num_heads=2, mlp_layer=GeGluMlp, mlp_ratio=2.0,
        class_token=False, global_pool="avg", embed_cfg=embed_cfg, img_size=64,
    )  # fmt: skip
    return _create_vitamin("vitamin_small_224", pretrained=False, **dict(args, **kwargs))


def register_tiny_timm_models() -> None:
    """Register the ``grmpiqa_tiny_*`` timm entry points (idempotent)."""
    import timm
    from timm.models import register_model

    entries: list[Callable[..., Any]] = [
        _override_entry(name, real, small) for name, (real, small) in _OVERRIDES.items()
    ]
    mci = _tiny_mci_vit
    mci.__name__ = "grmpiqa_tiny_mci_vit"
    vitamin = _tiny_vitamin
    vitamin.__name__ = "grmpiqa_tiny_vitamin"
    entries += [mci, vitamin]
    for fn in entries:
        if not timm.models.is_model(fn.__name__):
            fn.__module__ = _timm_module_of(fn.__name__)
            register_model(fn)


def _timm_module_of(name: str) -> str:
    """The timm module a tiny entry point stands for (families are told by it)."""
    real = {
        "grmpiqa_tiny_mci_vit": "vision_transformer_hybrid",
        "grmpiqa_tiny_vitamin": "vitamin",
    }.get(name)
    if real is None:
        import timm

        real = str(timm.models.model_entrypoint(_OVERRIDES[name][0]).__module__).rsplit(".")[-1]
    return f"timm.models.{real}"
