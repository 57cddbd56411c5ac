"""grmpiqa checkpoints, and import of the authors' released files (method.md 10).

A checkpoint is one ``.safetensors`` file holding only the adapted tensors (prompts and
any fine-tuned backbone tensor) under the :class:`~grmpiqa.model.QualityModel`
state-dict names, with JSON metadata in the safetensors header (key ``"grmpiqa"``):
grmpiqa version, backbone name, pretrained identity (tag, file or random seed), the
architecture config, the model config and the preprocessing.
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from grmpiqa._version import __version__
from grmpiqa.errors import CheckpointError, GrmpiqaError
from grmpiqa.utils import atomic_path

if TYPE_CHECKING:
    from grmpiqa.model import QualityModel

FORMAT = "grmpiqa-checkpoint/1"
_META_KEY = "grmpiqa"


def checkpoint_metadata(model: QualityModel, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata record written with a model's tensors."""
    return {
        "format": FORMAT,
        "grmpiqa_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": {
            "name": model.backbone_name,
            "pretrained": model.backbone_pretrained,
            "model_cfg": model.backbone_model_cfg,
        },
        "model_config": model.config.to_dict(),
        "preprocess": model.preprocess.to_dict(),
        "extra": extra or {},
    }


def save_checkpoint(
    model: QualityModel, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s adapted tensors and metadata to ``path`` atomically."""
    path = Path(path)
    meta = checkpoint_metadata(model, extra)
    tensors = model.adapted_state()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    return path


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a grmpiqa checkpoint; :class:`CheckpointError` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read checkpoint tensors ({err})") from None
    return tensors, meta


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of a grmpiqa checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from None
    if raw is None:
        raise CheckpointError(
            f"{path}: a safetensors file without grmpiqa metadata (to use the authors' "
            "released .pt files, convert them with `grmpiqa import-released`)"
        )
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise CheckpointError(f"{path}: corrupt grmpiqa metadata ({err})") from None
    if not str(meta.get("format", "")).startswith("grmpiqa-checkpoint/"):
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return dict(meta)


def apply_checkpoint(
    model: QualityModel,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    source: str = "checkpoint",
) -> None:
    """Copy checkpoint tensors into ``model`` after checking they belong to its backbone."""
    arch = meta.get("backbone", {}).get("model_cfg")
    if arch is not None and _canonical(arch) != _canonical(model.backbone_model_cfg):
        raise CheckpointError(
            f"{source}: trained on backbone {meta['backbone'].get('name')!r}, whose architecture "
            f"differs from {model.backbone_name!r}; load it with --backbone "
            f"{meta['backbone'].get('name')}"
        )
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(f"{source}: tensors this model does not have, e.g. {unknown[:3]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{source}: tensor {k} has shape {tuple(v.shape)}, the model expects "
                f"{tuple(own[k].shape)} (different backbone or model config)"
            )
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].dtype))
    model.adapted_keys |= set(tensors)


def _canonical(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)


# -- import of the authors' released files (method.md 10) ------------------------------

_RELEASED_PROMPTS = {
    "image_encoder.prompt_embeddings": "visual.prompt_embeddings",
    "image_encoder.deep_prompt_embeddings": "visual.deep_prompt_embeddings",
    "image_encoder.prompt_proj.weight": "visual.prompt_proj.weight",
    "image_encoder.prompt_proj.bias": "visual.prompt_proj.bias",
    "image_encoder.prompt_norm.weight": "visual.prompt_norm.weight",
    "image_encoder.prompt_norm.bias": "visual.prompt_norm.bias",
}
_CTX = re.compile(r"^prompt_learner\d*\.ctx$")
_IGNORED = re.compile(r"(token_prefix|token_suffix)$|^logit_scale$")


def map_released_key(key: str) -> str | None:
    """Our state-dict name for a key of the authors' files; None for ignored buffers."""
    if key in _RELEASED_PROMPTS:
        return _RELEASED_PROMPTS[key]
    if _CTX.match(key):
        return "prompt_learner.ctx"
    if _IGNORED.search(key):
        return None
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
    (their fine-tuned blocks). Keys may be nested under ``state_dict`` and prefixed
    ``module.``.

    Example:
        >>> import_released("livec_best.pt", "livec.safetensors")  # doctest: +SKIP
    """
    from grmpiqa.backbone import read_state_dict
    from grmpiqa.model import ModelConfig, create_model

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
    own = model.state_dict()
    unknown = sorted(k for k in mapped if k not in own)
    if unknown:
        raise CheckpointError(f"{src}: keys that do not fit {backbone}, e.g. {unknown[:3]}")
    keep: dict[str, torch.Tensor] = {}
    for k, v in mapped.items():
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
        print(
            f"grmpiqa: ignored {len(skipped)} buffers of {src.name}: {', '.join(skipped[:4])}",
            file=sys.stderr,
        )
    return save_checkpoint(
        model, out, extra={"imported_from": src.name, "released_keys": len(released)}
    )
