"""Registries of image families and text kinds, filled by decorators (as timm's models).

:func:`resolve` reads an open_clip model config (no model is built) and says which
family and text kind handle it, or why it cannot run here, in one line.
:func:`adapt` wraps a built model in a :class:`~grmpiqa.backbones.base.BackboneAdapter`.

Adding a family: write an :class:`~grmpiqa.backbones.base.ImageTrunk` subclass in a
module of this package, decorate it with ``@register_family("name")`` and import the
module in ``grmpiqa/backbones/__init__.py`` (docs/backbones.md).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from grmpiqa.backbones.base import BackboneAdapter, ImageTrunk, Preprocessing, TextEncoder
from grmpiqa.errors import BackboneError

__all__ = [
    "Resolution",
    "adapt",
    "families",
    "register_family",
    "register_text",
    "resolve",
    "timm_module",
    "trunk_for_module",
]

_FAMILIES: dict[str, type[ImageTrunk]] = {}
_TEXTS: dict[str, type[TextEncoder]] = {}

ImageT = TypeVar("ImageT", bound=type[ImageTrunk])
T = TypeVar("T", bound=type[TextEncoder])

#: the optional extra that brings Hugging Face tokenizers and text towers
HF_EXTRA = "pip install 'grmpiqa[hf]'"


def register_family(name: str) -> Callable[[ImageT], ImageT]:
    """Class decorator: register an :class:`ImageTrunk` subclass as family ``name``
    (first registered, first asked)."""

    def deco(cls: ImageT) -> ImageT:
        if name in _FAMILIES and _FAMILIES[name] is not cls:
            raise ValueError(f"image family {name!r} is already registered")
        cls.family = name
        _FAMILIES[name] = cls
        return cls

    return deco


def register_text(name: str) -> Callable[[T], T]:
    """Class decorator: register a :class:`TextEncoder` subclass as text kind ``name``."""

    def deco(cls: T) -> T:
        cls.kind = name
        _TEXTS[name] = cls
        return cls

    return deco


def families() -> dict[str, type[ImageTrunk]]:
    """Registered image families, in the order they are asked."""
    return dict(_FAMILIES)


def trunk_for_module(visual: Any) -> ImageTrunk:
    """The image trunk of a built image tower, found by its classes (TypeError: none)."""
    for cls in _FAMILIES.values():
        if cls.accepts(visual):
            return cls(visual)
    raise TypeError(f"no backbone family for an image tower of type {type(visual).__name__}")


def timm_module(model_cfg: dict[str, Any]) -> str | None:
    """The timm module defining the config's image trunk (``"eva"``,
    ``"vision_transformer"``, ...), None for open_clip's own towers."""
    name = model_cfg.get("vision_cfg", {}).get("timm_model_name")
    if not name:
        return None
    import timm

    try:
        fn = timm.models.model_entrypoint(name)
    except (RuntimeError, KeyError):
        return "?"
    return str(fn.__module__).rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Resolution:
    """What :func:`resolve` found for one model config.

    Attributes:
        family: image family key (None when no family claims it).
        text: text kind key (None when none claims it).
        label: a human name of the architecture.
        visual_prompts: why visual prompts do not apply (None: they do).
        refusal: why the name cannot run here (None: it can), one line.
    """

    family: str | None
    text: str | None
    label: str
    visual_prompts: str | None
    refusal: str | None

    @property
    def ok(self) -> bool:
        return self.refusal is None


def resolve(model_cfg: dict[str, Any], name: str = "") -> Resolution:
    """Which family and text kind handle ``model_cfg``, or why none can (one line)."""
    who = f"{name}: " if name else ""
    fam = next((c for c in _FAMILIES.values() if c.claims(model_cfg)), None)
    txt = next((c for c in _TEXTS.values() if c.claims(model_cfg)), None)
    if fam is None:
        vis = model_cfg.get("vision_cfg", {})
        what = vis.get("timm_model_name") or "this image tower"
        return Resolution(None, None, "?", "no family", f"{who}no backbone adapter for {what}")
    label = fam.label(model_cfg)
    vp = fam.config_visual_prompts(model_cfg)
    refusal = fam.refusal(model_cfg)
    if refusal is None and txt is None:
        refusal = "no adapter for its text tower"
    if refusal is None and txt is not None:
        refusal = txt.refusal(model_cfg)
    if refusal is None:
        refusal = tokenizer_refusal(model_cfg)
    return Resolution(
        fam.family,
        txt.kind if txt is not None else None,
        label,
        vp,
        None if refusal is None else f"{who}{refusal}",
    )


def tokenizer_refusal(model_cfg: dict[str, Any]) -> str | None:
    """Why the config's tokenizer cannot be used in this environment (None: it can)."""
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name") and not has_transformers():
        return f"its tokenizer is a Hugging Face tokenizer; {HF_EXTRA}"
    return None


def has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def adapt(
    clip: Any,
    model_cfg: dict[str, Any],
    name: str,
    *,
    preprocessing: Preprocessing,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
) -> BackboneAdapter:
    """Wrap a built open_clip model in the adapter of its family (BackboneError: none)."""
    res = resolve(model_cfg, name)
    if res.refusal is not None or res.family is None or res.text is None:
        raise BackboneError(res.refusal or f"{name}: no backbone adapter")
    image = _FAMILIES[res.family](clip.visual)
    text = _TEXTS[res.text](clip)
    return BackboneAdapter(name, clip, image, text, preprocessing, tokenizer)
