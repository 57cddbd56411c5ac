"""From a backbone name to its adapter: config lookup, preprocessing, tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from grmpiqa.backbones.base import BackboneAdapter, Preprocessing
from grmpiqa.backbones.registry import Resolution, adapt, resolve
from grmpiqa.backbones.tokenizers import TOKENIZER_ENV, load_tokenizer
from grmpiqa.errors import BackboneError

__all__ = ["build_adapter", "model_config_of", "preprocessing_for", "resolve_name"]

LOCAL_DIR_PREFIX = "local-dir:"

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def model_config_of(name: str) -> dict[str, Any] | None:
    """open_clip's config of a registry name or a ``local-dir:`` folder (None: unknown)."""
    if name.startswith(LOCAL_DIR_PREFIX):
        path = Path(name[len(LOCAL_DIR_PREFIX) :]).expanduser() / "open_clip_config.json"
        try:
            return dict(json.loads(path.read_text(encoding="utf-8"))["model_cfg"])
        except (OSError, ValueError, KeyError):
            return None
    import open_clip

    cfg = open_clip.get_model_config(name)
    return None if cfg is None else dict(cfg)


def resolve_name(name: str) -> Resolution:
    """:func:`~grmpiqa.backbones.registry.resolve` for a backbone name."""
    cfg = model_config_of(name)
    if cfg is None:
        return Resolution(None, None, "?", "unknown", f"unknown backbone {name!r}")
    return resolve(cfg, name)


def _tag_preprocess(name: str, tag: str | None) -> dict[str, Any]:
    import open_clip

    if name.startswith(LOCAL_DIR_PREFIX):
        path = Path(name[len(LOCAL_DIR_PREFIX) :]).expanduser() / "open_clip_config.json"
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")).get("preprocess_cfg", {}))
        except (OSError, ValueError):
            return {}
    tags = [tag] if tag else [str(t) for t in open_clip.list_pretrained_tags_by_model(name)]
    cfgs = [open_clip.get_pretrained_cfg(name, t) or {} for t in tags]
    keys = ("mean", "std", "interpolation")
    seen = {tuple(str(c.get(k)) for k in keys) for c in cfgs}
    if len(seen) == 1 and cfgs:  # one preprocessing across the known weights
        return {k: cfgs[0][k] for k in keys if cfgs[0].get(k) is not None}
    return {}


def preprocessing_for(
    name: str, model_cfg: dict[str, Any], tag: str | None = None
) -> Preprocessing:
    """The backbone's own preprocessing: input size from the config; statistics and
    interpolation from the pretrained tag in use, else the one all its tags share, else
    the config's ``preprocess_cfg``, else OpenAI CLIP's."""
    vis = model_cfg.get("vision_cfg", {})
    size = vis.get("image_size", 224)
    size = int(size[0] if isinstance(size, list | tuple) else size)
    pre: dict[str, Any] = dict(model_cfg.get("preprocess_cfg") or {})
    pre.update(_tag_preprocess(name, tag))
    mean = tuple(float(v) for v in pre.get("mean", _OPENAI_MEAN))
    std = tuple(float(v) for v in pre.get("std", _OPENAI_STD))
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    interp = str(pre.get("interpolation", "bicubic"))
    return Preprocessing(size, mean, std, interp)  # type: ignore[arg-type]


def build_adapter(
    clip: Any,
    model_cfg: dict[str, Any],
    name: str,
    *,
    tag: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    cache_dir: str | None = None,
) -> BackboneAdapter:
    """The adapter of a built open_clip model (:class:`BackboneError` when none fits)."""
    local_dir = None
    if name.startswith(LOCAL_DIR_PREFIX):
        local_dir = str(Path(name[len(LOCAL_DIR_PREFIX) :]).expanduser())
    env = os.environ.get(TOKENIZER_ENV, "")
    if tokenizer is None and env and model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        tokenizer = env  # --tokenizer DIR of the command line (every process of a command)
    tok = load_tokenizer(
        model_cfg, name, local_dir=local_dir, override=tokenizer, cache_dir=cache_dir
    )
    adapter = adapt(
        clip, model_cfg, name, preprocessing=preprocessing_for(name, model_cfg, tag), tokenizer=tok
    )
    if tokenizer is not None:
        adapter.extra["tokenizer"] = str(Path(tokenizer).expanduser().resolve())
    _check_instance(adapter)
    return adapter


def _check_instance(adapter: BackboneAdapter) -> None:
    """The built model has the classes the family expects (a config that lies fails
    here, in one line, not deep inside a forward pass)."""
    if not type(adapter.image).accepts(adapter.image.visual):
        raise BackboneError(
            f"{adapter.name}: the built image tower ({type(adapter.image.visual).__name__}) "
            f"is not of the {adapter.family} family"
        )
    try:
        adapter.image.unit_modules()
        adapter.text.unit_modules()
        _ = adapter.text.width
    except (AttributeError, TypeError) as err:
        raise BackboneError(
            f"{adapter.name}: the built model does not have the {adapter.family} layout ({err})"
        ) from None
