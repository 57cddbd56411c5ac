"""``create_model``: backbone + config + checkpoint -> a ready quality model.

The one entry point that turns names and files into a model (as open_clip's factory):
it resolves the backbone (:mod:`grmpiqa.backbone`), reads a checkpoint
(:mod:`grmpiqa.checkpoint`) and builds the model (:mod:`grmpiqa.model`).

Example:
    >>> model = create_model("test-tiny", pretrained=None, visual_prompts=False)
    >>> model.score(torch.rand(2, 3, 224, 224)).shape
    torch.Size([2])
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from grmpiqa.backbone import DEFAULT_BACKBONE, LOCAL_DIR_PREFIX, default_pretrained, load_backbone
from grmpiqa.backbones.tokenizers import TOKENIZER_ENV
from grmpiqa.checkpoint import apply_checkpoint, portable_identity, read_checkpoint
from grmpiqa.errors import BackboneError, CheckpointError, GrmpiqaError
from grmpiqa.log import GrmpiqaWarning, get_logger
from grmpiqa.model import ModelConfig
from grmpiqa.pipeline import resolve_device
from grmpiqa.scale import scale_from_metadata
from grmpiqa.scoring.api import ScoringModel
from grmpiqa.transforms import PreprocessConfig

__all__ = ["DEFAULT", "create_model", "resolve_device", "pretrained_from_identity"]

logger = get_logger("factory")


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


#: Sentinel: "take it from the checkpoint, else the library default".
DEFAULT: Any = _Default()


def pretrained_from_identity(
    ident: dict[str, Any], name: str, source: str = "", *, loaded_here: bool = False
) -> Any:
    """The ``pretrained`` argument that reproduces a weights identity.

    A checkpoint's identity names weights (a tag, a seed, a file's name and hash), never
    a path to open: weights from a file must be named again by the user
    (``--pretrained FILE``). ``loaded_here``: the identity is the one this process built
    from a file the user named, whose path may be opened again (the stage-2 teacher).
    """
    kind = ident.get("kind")
    if kind == "random":
        return None
    if kind == "tag":
        return str(ident["tag"])
    if kind == "file":
        if loaded_here and ident.get("path"):
            return str(ident["path"])
        shown = ident.get("file") or Path(str(ident.get("path", "?"))).name
        digest = str(ident.get("sha256_1mb", ""))[:12]
        raise CheckpointError(
            f"{source}: trained on weights from the file {shown}"
            + (f" (sha256 of its first MiB {digest}...)" if digest else "")
            + "; name those weights with --pretrained FILE (a checkpoint never makes "
            "grmpiqa open a path it records)"
        )
    return default_pretrained(name)


def create_model(
    backbone: str | None = None,
    pretrained: str | os.PathLike[str] | None = DEFAULT,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    visual_prompts: bool | None = None,
    *,
    seed: int | None = None,
    config: ModelConfig | None = None,
    preprocess: PreprocessConfig | None = None,
    cache_dir: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> ScoringModel:
    """Build a quality model, optionally restoring a grmpiqa checkpoint.

    It is a :class:`~grmpiqa.model.QualityModel` with ``score``/``quality_map`` methods
    (:class:`~grmpiqa.scoring.api.ScoringModel`).

    Args:
        backbone: open_clip model name, ``"test-tiny"`` or ``"local-dir:PATH"``; default:
            the checkpoint's, else ``"ViT-B-16-quickgelu"``.
        pretrained: open_clip tag, a weights file, or ``None`` for random weights
            (announced with a :class:`~grmpiqa.log.RandomWeightsWarning`); default: the
            checkpoint's, else ``"openai"`` (random for architectures without tags).
        checkpoint: a grmpiqa ``.safetensors`` checkpoint (prompts and adapted tensors).
        device: torch device, or ``"auto"``: CUDA if present, else MPS where torch has
            it, else the CPU.
        visual_prompts: use VPT-deep; default: the checkpoint's, else True where the
            backbone's trunk has tokens (token-free trunks such as ConvNeXt adapt the
            text prompts and their last blocks only; docs/backbones.md).
        seed: seed of a random backbone and of the prompts' init; default: the
            checkpoint's, else 0.
        config: full :class:`ModelConfig` (``visual_prompts`` overrides its field).
        preprocess: preprocessing; default: the checkpoint's, else the released test
            transform at the backbone's input size (:meth:`PreprocessConfig.for_backbone`).
        tokenizer: a saved Hugging Face tokenizer folder, for backbones whose tokenizer
            is not in the local cache (default: the checkpoint's, if that folder exists).
    """
    dev = resolve_device(device)
    tensors: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = {}
    if checkpoint is not None:
        tensors, meta = read_checkpoint(checkpoint)
    source = str(checkpoint)
    bmeta = meta.get("backbone", {})
    name = backbone or bmeta.get("name") or DEFAULT_BACKBONE
    if backbone is None and name.startswith(LOCAL_DIR_PREFIX):
        raise CheckpointError(
            f"{source}: trained on a local-dir backbone ({name}); name its folder with "
            "--backbone local-dir:PATH (a checkpoint never makes grmpiqa open a path it records)"
        )
    ident = bmeta.get("pretrained", {}) if name == bmeta.get("name") else {}
    try:
        if seed is None:
            seed = int(ident.get("seed", meta.get("seed", 0)))
        if pretrained is DEFAULT:
            pretrained = pretrained_from_identity(ident, name, source)
        if config is None:
            config = (
                ModelConfig.from_dict(meta["model_config"])
                if "model_config" in meta
                else ModelConfig()
            )
        if preprocess is None and "preprocess" in meta:
            preprocess = PreprocessConfig.from_dict(meta["preprocess"])
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{source}: invalid metadata ({err})") from None
    if visual_prompts is not None and visual_prompts != config.visual_prompts:
        if checkpoint is not None:
            raise CheckpointError(
                f"{checkpoint}: was trained with visual_prompts={config.visual_prompts}; "
                f"cannot load it with visual_prompts={visual_prompts}"
            )
        config = replace(config, visual_prompts=visual_prompts)

    try:
        bb = load_backbone(name, pretrained, seed=seed, cache_dir=cache_dir, tokenizer=tokenizer)
    except BackboneError as err:
        recorded = bmeta.get("tokenizer")
        if tokenizer is None and recorded and not os.environ.get(TOKENIZER_ENV):
            raise CheckpointError(
                f"{source}: trained with the tokenizer folder {Path(str(recorded)).name}; name "
                f"it with --tokenizer DIR (a checkpoint never makes grmpiqa open a path it "
                f"records): {err}"
            ) from None
        raise
    assert bb.adapter is not None
    family = (bmeta.get("adapter") or {}).get("family")
    if checkpoint is not None and family and family != bb.adapter.family:
        raise CheckpointError(
            f"{checkpoint}: trained on a {family} backbone ({bmeta.get('name')}); "
            f"{name} is a {bb.adapter.family} backbone"
        )
    problem = bb.adapter.visual_prompts_problem
    if config.visual_prompts and problem is not None:
        if visual_prompts:
            raise GrmpiqaError(f"{name}: no visual prompts ({problem})")
        logger.info("%s: no visual prompts (%s)", name, problem)
        config = replace(config, visual_prompts=False)
    if preprocess is None:
        preprocess = PreprocessConfig.for_backbone(bb.adapter.preprocessing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = ScoringModel(bb, config, preprocess)
    if checkpoint is not None and tensors is not None:
        if bmeta.get("pretrained") and portable_identity(bmeta["pretrained"]) != portable_identity(
            bb.pretrained
        ):
            warnings.warn(
                f"{checkpoint} was trained on {bmeta.get('pretrained')}, loading it onto "
                f"{bb.pretrained}",
                GrmpiqaWarning,
                stacklevel=2,
            )
        apply_checkpoint(model, tensors, meta, source=source)
        model.score_scale = scale_from_metadata(meta, source)
    return model.to(dev).eval()
