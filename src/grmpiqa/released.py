"""Import of the authors' released GRMP-IQA files into grmpiqa checkpoints (method.md 10).

The released state dicts use the OpenAI CLIP layout under ``image_encoder.`` and
``text_encoder.``, the text context at ``prompt_learner2.ctx`` and the visual prompts at
``image_encoder.prompt_*``; keys may carry a ``module.`` prefix (DataParallel). They were
trained from ViT-B-16-quickgelu with OpenAI weights (:data:`RELEASED_BASE`): converting
one keeps the tensors that differ from those base weights, which must be at hand.

:func:`import_released` writes a checkpoint where asked; :func:`converted_checkpoint`
converts once into grmpiqa's cache (keyed by the file's content and the base weights),
which is how ``--checkpoint FILE.pt`` and ``--checkpoint hf-hub:zzhowe/GRMP-IQA/...``
score with the authors' files. Only tensors are ever read (``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from grmpiqa.backbone import load_backbone, read_state_dict
from grmpiqa.checkpoint import apply_checkpoint, read_metadata, save_checkpoint
from grmpiqa.config import DEFAULT_BACKBONE, DEFAULT_PRETRAINED
from grmpiqa.errors import BackboneError, CheckpointError, GrmpiqaError
from grmpiqa.log import get_logger
from grmpiqa.model import ModelConfig, QualityModel

__all__ = [
    "RELEASED_BASE",
    "converted_checkpoint",
    "import_released",
    "is_released_file",
    "map_released_key",
]

#: The backbone and weights the authors' released files were trained from.
RELEASED_BASE: dict[str, str] = {"backbone": DEFAULT_BACKBONE, "pretrained": DEFAULT_PRETRAINED}
#: Version of the conversion (part of the cache key: a new one converts again).
CONVERSION = "grmpiqa-released/1"

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


def is_released_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a torch save file (zip archive or legacy pickle), not safetensors:
    what the authors' code writes."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return False
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a legacy pickle
        return True
    return zipfile.is_zipfile(p)


def import_released(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    backbone: str = DEFAULT_BACKBONE,
    pretrained: str | os.PathLike[str] | None = DEFAULT_PRETRAINED,
    *,
    seed: int = 0,
    source: dict[str, Any] | None = None,
    announce: str | None = None,
) -> Path:
    """Convert a state dict saved by the authors' GRMP-IQA code into a grmpiqa checkpoint.

    Keeps the prompts and every backbone tensor that differs from the base weights
    (their fine-tuned blocks, and ``logit_scale`` when it differs: their forward pass
    uses it). Keys may be nested under ``state_dict`` and prefixed
    ``module.``. ``source`` (e.g. the Hub repository, revision and content id) is
    recorded in the checkpoint's metadata with the file's name; never a host path.

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
    bb = _base_backbone(backbone, pretrained, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = QualityModel(bb, ModelConfig(**cfg_kw))
    if (model.adapter.family, model.adapter.text.kind) != ("openclip-vit", "clip-text"):
        raise CheckpointError(
            f"{src}: the authors' files use the OpenAI CLIP ViT layout; {backbone} is a "
            f"{model.adapter.family} backbone (use ViT-B-16-quickgelu)"
        )
    if announce:
        logger.info("%s", announce)
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
    extra: dict[str, Any] = {
        "imported_from": src.name,
        "released_keys": len(released),
        "released_for": dict(RELEASED_BASE),
    }
    if source:
        extra["source"] = dict(source)
    if bb.name != RELEASED_BASE["backbone"]:
        logger.warning(
            "%s: the authors' files were trained from %s with %s weights, not %s",
            src.name,
            RELEASED_BASE["backbone"],
            RELEASED_BASE["pretrained"],
            bb.name,
        )
    return save_checkpoint(model, out, extra=extra)


def _base_backbone(backbone: str, pretrained: Any, seed: int) -> Any:
    """The base weights the released file is compared with; a missing tag fails in one
    line saying how to pass them."""
    try:
        return load_backbone(backbone, pretrained, seed=seed)
    except BackboneError as err:
        if pretrained is None or Path(str(pretrained)).expanduser().exists():
            raise
        raise BackboneError(
            f"converting a released GRMP-IQA file needs its base weights, {backbone} "
            f"'{pretrained}', which are not available here ({_reason(err)}); download the "
            "OpenAI ViT-B/16 weights (ViT-B-16.pt) and pass them with --pretrained FILE",
            api=f"converting a released GRMP-IQA file needs its base weights, {backbone} "
            f"'{pretrained}', which are not available here ({_reason(err)}); download the "
            "OpenAI ViT-B/16 weights (ViT-B-16.pt) and pass them as pretrained='FILE'",
        ) from None


def _reason(err: GrmpiqaError) -> str:
    text = str(err)
    return text[text.find("(") + 1 : text.find(")")] if "(" in text and ")" in text else text


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weights_key(pretrained: Any, seed: int) -> str:
    """What identifies the base weights in the cache key (a file by its content)."""
    if pretrained is None:
        return f"random:{seed}"
    p = Path(str(pretrained)).expanduser()
    if p.is_file():
        from grmpiqa.backbone import _quick_hash

        return f"file:{_quick_hash(p)}"
    return f"tag:{pretrained}"


def converted_checkpoint(
    path: str | os.PathLike[str],
    *,
    backbone: str | None = None,
    pretrained: Any = DEFAULT_PRETRAINED,
    seed: int = 0,
    source: dict[str, Any] | None = None,
    cache: str | os.PathLike[str] | None = None,
) -> Path:
    """The grmpiqa checkpoint of a released file, converted once into the cache.

    The cache entry (``CACHE/released/STEM-KEY.safetensors``, :func:`grmpiqa.hub.cache_dir`)
    is keyed by the file's content (``source["content_id"]`` when the caller knows it, as
    the Hub cache's blob id; else its sha256), the backbone and the base weights, so a
    changed upstream file or other base weights convert again.
    """
    from grmpiqa.hub import cache_dir

    src = Path(path)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    name = backbone or RELEASED_BASE["backbone"]
    content = (source or {}).get("content_id") or _sha256(src)
    key_record = {
        "conversion": CONVERSION,
        "content": content,
        "backbone": name,
        "weights": _weights_key(pretrained, seed),
    }
    key = hashlib.sha256(json.dumps(key_record, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cache) if cache is not None else cache_dir() / "released"
    out = folder / f"{src.stem}-{key}.safetensors"
    if out.is_file():
        try:
            read_metadata(out)
            return out
        except CheckpointError:
            logger.warning("%s: unreadable cache entry; converting again", out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(
            f"{folder}: cannot create the conversion cache ({err.strerror or err}); set "
            "GRMPIQA_CACHE to a writable folder"
        ) from None
    record = {**(source or {}), "content_id": content}
    note = f"converting the released file {src.name} (once) into {out}"
    return import_released(src, out, name, pretrained, seed=seed, source=record, announce=note)
