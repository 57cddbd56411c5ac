"""Backbone adapters: the one place that knows how each CLIP family is laid out.

GRMP-IQA (method.md 1-4, 7) needs, from any CLIP: a token embedding with room for
visual prompts, the blocks and how to run a range of them, the pooled image embedding,
a text tower that takes learned context, what stage 2 unfreezes, the logit scale and
the input preprocessing. :class:`BackboneAdapter` is that interface; one
:class:`ImageTrunk` per family, registered by decorator (:func:`register_family`),
and one :class:`TextEncoder` per kind of text tower provide it. docs/backbones.md
lists the families and how to add one.

Example:
    >>> from grmpiqa.backbones import resolve_name
    >>> r = resolve_name("EVA02-B-16")
    >>> r.family, r.visual_prompts is None, r.ok
    ('eva', True, True)
    >>> resolve_name("convnext_base").visual_prompts is not None
    True
"""

from __future__ import annotations

from grmpiqa.backbones import eva, openclip_vit, staged, text, timm_vit  # noqa: F401 - registers
from grmpiqa.backbones.base import (
    BackboneAdapter,
    ImageTrunk,
    Preprocessing,
    PromptSlot,
    TextEncoder,
)
from grmpiqa.backbones.build import build_adapter, preprocessing_for, resolve_name
from grmpiqa.backbones.registry import (
    HF_EXTRA,
    Resolution,
    families,
    register_family,
    register_text,
    resolve,
    trunk_for_module,
)
from grmpiqa.backbones.tiny import TINY_TWINS, register_tiny_timm_models
from grmpiqa.backbones.tokenizers import load_tokenizer, placeholder_start

register_tiny_timm_models()

__all__ = [
    "HF_EXTRA",
    "TINY_TWINS",
    "BackboneAdapter",
    "ImageTrunk",
    "Preprocessing",
    "PromptSlot",
    "Resolution",
    "TextEncoder",
    "build_adapter",
    "families",
    "load_tokenizer",
    "placeholder_start",
    "preprocessing_for",
    "register_family",
    "register_text",
    "resolve",
    "resolve_name",
    "trunk_for_module",
]
