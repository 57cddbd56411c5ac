"""Import of the authors' released GRMP-IQA files into grmpiqa checkpoints (method.md 10).

The released state dicts use the OpenAI CLIP layout under ``image_encoder.`` and
``text_encoder.``, the text context at ``prompt_learner2.ctx`` and the visual prompts at
``image_encoder.prompt_*``; keys may carry a ``module.`` prefix (DataParallel).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from grmpiqa.backbone import read_state_dict
from grmpiqa.checkpoint import apply_checkpoint, save_checkpoint
from grmpiqa.errors import CheckpointError, GrmpiqaError
from grmpiqa.factory import create_model
from grmpiqa.log import get_logger
from grmpiqa.model import ModelConfig

__all__ = ["import_released", "map_released_key"]

logger = get_logger("released")


_RELEASED_PROMPTS = {
    "image_encoder.prompt_embeddings": "visual.prompt_embeddings",
    "image_encoder.deep_prompt_embeddings": "visual.deep_prompt_embeddings",
    "image_encoder.prompt_proj.weight": "visual.prompt_proj.weight",
    "image_encoder.prompt_proj.bias": "visual.prompt_proj.bias",
    "image_encoder.prompt_norm.weight": "visual.prompt_norm.weight",
    "image_encoder.prompt_norm.bias": "visual.prompt_norm.bias",
}
_CTX = re.compile(r"^prompt_learner\d*\.ctx$")
_IGNORED = re.compile(r"(token_prefix|token_suffix)$")


def map_released_key(key: str) -> str | None:
    """Our state-dict name for a key of the authors' files; None for ignored buffers."""
    if key in _RELEASED_PROMPTS:
        return _RELEASED_PROMPTS[key]
    if _CTX.match(key):
        return "prompt_learner.ctx"
    if _IGNORED.search(key):
        return None
    if key == "logit_scale":  # the CLIP temperature their forward pass uses (log space)
        return "clip.logit_scale"
    if key.startswith("image_encoder."):
        return "clip.visual." + key[len("image_encoder.") :]
    if key.startswith("text_encoder."):
        return "clip." + key[len("text_encoder.") :]
    return None


def import_released(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    backbone: str = "ViT-B-16-quickgelu",
    pretrained: str | os.PathLike[str] | None = "openai",
    *,
    seed: int = 0,
) -> Path:
    """Convert a state dict saved by the authors' GRMP-IQA code into a grmpiqa checkpoint.

    Keeps the prompts and every backbone tensor that differs from the base weights
    (their fine-tuned blocks, and ``logit_scale`` when it differs: their forward pass
    uses it). Keys may be nested under ``state_dict`` and prefixed
    ``module.``.

    Example:
        >>> import_released("livec_best.pt", "livec.safetensors")  # doctest: +SKIP
    """
    src = Path(path)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    try:
        released = read_state_dict(src)
    except GrmpiqaError as err:
        raise CheckpointError(str(err)) from None
    mapped: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in released.items():
        ours = map_released_key(key)
        if ours is None:
            skipped.append(key)
        else:
            mapped[ours] = value
    if "prompt_learner.ctx" not in mapped:
        raise CheckpointError(f"{src}: no text context (prompt_learner2.ctx); not a GRMP-IQA file")
    visual = "visual.prompt_embeddings" in mapped
    n_ctx = int(mapped["prompt_learner.ctx"].shape[0])
    cfg_kw: dict[str, Any] = {"visual_prompts": visual, "n_ctx": n_ctx}
    if visual:
        cfg_kw["vpt_tokens"] = int(mapped["visual.prompt_embeddings"].shape[1])
        if "visual.deep_prompt_embeddings" in mapped:
            cfg_kw["vpt_deep_layers"] = int(mapped["visual.deep_prompt_embeddings"].shape[0])
    model = create_model(backbone, pretrained, config=ModelConfig(**cfg_kw), seed=seed)
    if (model.adapter.family, model.adapter.text.kind) != ("openclip-vit", "clip-text"):
        raise CheckpointError(
            f"{src}: the authors' files use the OpenAI CLIP ViT layout; {backbone} is a "
            f"{model.adapter.family} backbone (use ViT-B-16-quickgelu)"
        )
    own = model.state_dict()
    unknown = sorted(k for k in mapped if k not in own)
    if unknown:
        raise CheckpointError(f"{src}: keys that do not fit {backbone}, e.g. {unknown[:3]}")
    keep: dict[str, torch.Tensor] = {}
    for k, v in mapped.items():
        if k == "clip.logit_scale" and v.numel() == 1:
            v = v.reshape(own[k].shape)
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{src}: {k} has shape {tuple(v.shape)}, {backbone} expects {tuple(own[k].shape)}"
            )
        v = v.to(own[k].dtype)
        if k in model.adapted_keys or not torch.equal(v, own[k]):
            keep[k] = v
    apply_checkpoint(model, keep, {}, source=str(src))
    model.adapted_keys = set(keep)
    if skipped:
        logger.info("ignored %d buffers of %s: %s", len(skipped), src.name, ", ".join(skipped[:4]))
    return save_checkpoint(
        model, out, extra={"imported_from": src.name, "released_keys": len(released)}
    )
