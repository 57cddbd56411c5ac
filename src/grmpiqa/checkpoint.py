"""grmpiqa checkpoints: safetensors tensors + JSON metadata (read, write, apply).

A checkpoint is one ``.safetensors`` file holding only the adapted tensors (prompts and
any fine-tuned backbone tensor) under the :class:`~grmpiqa.model.QualityModel`
state-dict names, with JSON metadata in the safetensors header (key ``"grmpiqa"``):
grmpiqa version, backbone name, pretrained identity (tag, file or random seed), the
architecture config, the backbone adapter's family and configuration (a checkpoint is
refused, in one line, on a backbone of another family), the model config and the
preprocessing.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from grmpiqa._version import __version__
from grmpiqa.errors import CheckpointError
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
        "backbone": _backbone_record(model),
        "model_config": model.config.to_dict(),
        "preprocess": model.preprocess.to_dict(),
        "extra": extra or {},
    }


def _backbone_record(model: QualityModel) -> dict[str, Any]:
    """Name, weights identity, architecture config, and the adapter's family and
    configuration (:meth:`grmpiqa.backbones.BackboneAdapter.config`)."""
    rec: dict[str, Any] = {
        "name": model.backbone_name,
        "pretrained": model.backbone_pretrained,
        "model_cfg": model.backbone_model_cfg,
    }
    adapter = getattr(model, "adapter", None)
    if adapter is not None:
        rec["adapter"] = adapter.config()
        if adapter.extra.get("tokenizer"):
            rec["tokenizer"] = adapter.extra["tokenizer"]
    return rec


def save_checkpoint(
    model: QualityModel, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s adapted tensors and metadata to ``path`` atomically."""
    path = Path(path)
    meta = checkpoint_metadata(model, extra)
    tensors = model.adapted_state()
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"{path}: not written, tensors with NaN or inf values: {bad[:3]}")
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
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"{path}: tensors with NaN or inf values, e.g. {bad[:3]}")
    return tensors, meta


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf values."""
    return sorted(
        k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    )


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
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt grmpiqa metadata (not a JSON object)")
    if not str(meta.get("format", "")).startswith("grmpiqa-checkpoint/"):
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    _check_metadata(meta, path)
    return dict(meta)


def _check_metadata(meta: dict[str, Any], path: Path) -> None:
    """The shape of the metadata record (values are checked where they are used)."""
    expect = {
        "backbone": dict,
        "model_config": dict,
        "preprocess": dict,
        "extra": dict,
    }
    for key, kind in expect.items():
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"{path}: invalid metadata: {key!r} is not a JSON object")
    bb = meta.get("backbone", {})
    if "name" in bb and not isinstance(bb["name"], str):
        raise CheckpointError(f"{path}: invalid metadata: backbone name is not a string")
    for key in ("pretrained", "model_cfg", "adapter"):
        if key in bb and not isinstance(bb[key], dict):
            raise CheckpointError(f"{path}: invalid metadata: backbone {key} is not a JSON object")


def apply_checkpoint(
    model: QualityModel,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    source: str = "checkpoint",
) -> None:
    """Copy checkpoint tensors into ``model`` after checking they belong to its backbone."""
    family = (meta.get("backbone", {}).get("adapter") or {}).get("family")
    own_family = model.adapter.family
    if family and family != own_family:
        raise CheckpointError(
            f"{source}: trained on a {family} backbone ({meta['backbone'].get('name')}); "
            f"{model.backbone_name} is a {own_family} backbone"
        )
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
        if v.is_floating_point() != own[k].is_floating_point():
            raise CheckpointError(f"{source}: tensor {k} has dtype {v.dtype}, not {own[k].dtype}")
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{source}: tensor {k} has shape {tuple(v.shape)}, the model expects "
                f"{tuple(own[k].shape)} (different backbone or model config)"
            )
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v.to(own[k].dtype))
        if "clip.logit_scale" in tensors:  # s = exp(logit_scale) of these weights
            model.logit_scale.fill_(model.adapter.logit_scale)
    model.adapted_keys |= set(tensors)


def _canonical(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)
