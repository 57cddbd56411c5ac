"""grmpiqa checkpoints: safetensors tensors + JSON metadata (read, write, apply).

A checkpoint is one ``.safetensors`` file holding only the adapted tensors (prompts and
any fine-tuned backbone tensor) under the :class:`~grmpiqa.model.QualityModel`
state-dict names, with JSON metadata in the safetensors header (key ``"grmpiqa"``):
grmpiqa version, backbone name, pretrained identity (a tag, a weights file's name and
hash, or a random seed: never a path of the machine that wrote it), the architecture
config, the backbone adapter's family and configuration (a checkpoint is refused, in one
line, on a backbone of another family), the model config, the preprocessing and the
names of the stored tensors.

Reading one is checked before anything is allocated or opened (docs/reliability.md):
the format version (:func:`check_format`), the JSON nesting
(:data:`~grmpiqa.utils.MAX_JSON_DEPTH`), the sizes the metadata declares
(:class:`~grmpiqa.model.ModelConfig` and
:class:`~grmpiqa.transforms.PreprocessConfig` limits), and that every tensor the
metadata says was trained is present (:func:`check_trained_tensors`).
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
from grmpiqa.utils import atomic_path, load_json

if TYPE_CHECKING:
    from grmpiqa.model import QualityModel

#: The checkpoint format this version writes; it reads every version up to it.
FORMAT_VERSION = 1
FORMAT_PREFIX = "grmpiqa-checkpoint/"
FORMAT = f"{FORMAT_PREFIX}{FORMAT_VERSION}"
_META_KEY = "grmpiqa"


def portable_identity(ident: dict[str, Any]) -> dict[str, Any]:
    """A weights identity as a checkpoint records it: tags, seeds, file names and hashes,
    never a path of this machine (a reader must name the file itself)."""
    out = dict(ident)
    path = out.pop("path", None)
    if path is not None and out.get("kind") == "file":
        out.setdefault("file", Path(str(path)).name)
    elif path is not None and out.get("kind") == "local-dir":
        out.setdefault("folder", Path(str(path)).name)
    return out


def portable_backbone_name(name: str) -> str:
    """``local-dir:/home/me/models/x`` is recorded as ``local-dir:x`` (no host path)."""
    from grmpiqa.backbone import LOCAL_DIR_PREFIX

    if name.startswith(LOCAL_DIR_PREFIX):
        return LOCAL_DIR_PREFIX + Path(name[len(LOCAL_DIR_PREFIX) :]).name
    return name


def checkpoint_metadata(model: QualityModel, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata record written with a model's tensors."""
    return {
        "format": FORMAT,
        "grmpiqa_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": _backbone_record(model),
        "model_config": model.config.to_dict(),
        "preprocess": model.preprocess.to_dict(),
        "tensors": sorted(model.adapted_state()),
        "extra": extra or {},
    }


def _backbone_record(model: QualityModel) -> dict[str, Any]:
    """Name, weights identity, architecture config, and the adapter's family and
    configuration (:meth:`grmpiqa.backbones.BackboneAdapter.config`)."""
    rec: dict[str, Any] = {
        "name": portable_backbone_name(model.backbone_name),
        "pretrained": portable_identity(model.backbone_pretrained),
        "model_cfg": model.backbone_model_cfg,
    }
    adapter = getattr(model, "adapter", None)
    if adapter is not None:
        rec["adapter"] = adapter.config()
        if adapter.extra.get("tokenizer"):  # the folder's name: never a path to open
            rec["tokenizer"] = Path(str(adapter.extra["tokenizer"])).name
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
        meta = load_json(raw)
    except ValueError as err:
        raise CheckpointError(f"{path}: corrupt grmpiqa metadata ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt grmpiqa metadata (not a JSON object)")
    check_format(meta, path)
    _check_metadata(meta, path)
    return dict(meta)


def check_format(meta: dict[str, Any], path: str | os.PathLike[str]) -> int:
    """The format version of a checkpoint's metadata; newer than this code reads, or not a
    grmpiqa checkpoint at all, is a :class:`CheckpointError`."""
    fmt = meta.get("format")
    version = None
    if isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX):
        tail = fmt[len(FORMAT_PREFIX) :]
        if tail.isdigit() and len(tail) < 6:
            version = int(tail)
    if version is None or version < 1:
        raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in checkpoint format {fmt}, newer than this grmpiqa "
            f"{__version__} reads (up to {FORMAT}); upgrade grmpiqa to load it"
        )
    return version


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
    names = meta.get("tensors")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) and len(n) < 512 for n in names)
    ):
        raise CheckpointError(f"{path}: invalid metadata: 'tensors' is not a list of names")


def check_trained_tensors(
    model: QualityModel, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str
) -> None:
    """Every tensor the metadata says was trained must be in the file: the names it lists
    (``tensors``, written since 0.3) and the prompts its model config implies (text
    context, visual prompts). A missing one would silently keep its random init."""
    listed = meta.get("tensors")
    required = set(listed) if isinstance(listed, list) else set()
    required |= set(model.parameter_names(("text_context", "visual_prompts")))
    missing = sorted(required - set(tensors))
    if missing:
        raise CheckpointError(
            f"{source}: the trained tensor {missing[0]} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; the file is damaged or was edited (a model with it left at its random "
            "initialisation would score differently)"
        )


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
        raise _architecture_error(meta["backbone"], model, arch, source)
    if meta:
        check_trained_tensors(model, tensors, meta, source)
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


def _architecture_error(
    bmeta: dict[str, Any], model: QualityModel, arch: dict[str, Any], source: str
) -> CheckpointError:
    """Why a checkpoint's recorded architecture does not fit ``model``, in one line."""
    from grmpiqa.runs import diff_records

    saved = str(bmeta.get("name"))
    diffs = diff_records(
        json.loads(_canonical(arch)), json.loads(_canonical(model.backbone_model_cfg))
    )
    shown = "; ".join(diffs[:3]) + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")
    if saved == model.backbone_name or saved == portable_backbone_name(model.backbone_name):
        return CheckpointError(
            f"{source}: its recorded architecture of {saved!r} differs from this build of it "
            f"({shown}): written by another version of the backbone, or edited"
        )
    head = (
        f"{source}: trained on backbone {saved!r}, whose architecture differs from "
        f"{model.backbone_name!r} ({shown}); load it with "
    )
    return CheckpointError(f"{head}--backbone {saved}", api=f"{head}backbone={saved!r}")


def _canonical(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)
