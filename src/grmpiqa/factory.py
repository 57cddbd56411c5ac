"""``create_model``: backbone + config + checkpoint -> a ready quality model.

The one entry point that turns names and files into a model (as open_clip's factory):
it resolves the backbone (:mod:`grmpiqa.backbone`), finds the checkpoint (a grmpiqa
``.safetensors`` file, an authors' released ``.pt`` file converted once into the cache
(:mod:`grmpiqa.released`), or either on the Hugging Face Hub as ``hf-hub:OWNER/REPO/FILE``,
:mod:`grmpiqa.hub`), reads it (:mod:`grmpiqa.checkpoint`) and builds the model
(:mod:`grmpiqa.model`).

Without a checkpoint (and without a ``config``), the model is zero-shot CLIP-IQA: the
prompts "Good photo." / "Bad photo." and no visual prompts (method.md 9), announced once
on the ``grmpiqa`` logger; learned prompts at their random init score nothing meaningful
and are built only when asked for with ``config=ModelConfig(...)`` (or ``visual_prompts=``).

Example:
    >>> model = create_model("test-tiny", pretrained=None, visual_prompts=False)
    >>> model.score(torch.rand(2, 3, 224, 224)).shape
    torch.Size([2])
    >>> create_model("test-tiny", pretrained=None).describe_prompts()
    "zero-shot CLIP-IQA prompts 'Good photo.' / 'Bad photo.'"
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
from grmpiqa.config import CLIPIQA_PROMPTS, DEFAULT_PRETRAINED
from grmpiqa.errors import BackboneError, CheckpointError, GrmpiqaError
from grmpiqa.log import GrmpiqaWarning, get_logger
from grmpiqa.model import ModelConfig
from grmpiqa.pipeline import resolve_device
from grmpiqa.scale import scale_from_metadata
from grmpiqa.scoring.api import ScoringModel
from grmpiqa.transforms import PreprocessConfig

__all__ = [
    "DEFAULT",
    "ZERO_SHOT",
    "create_model",
    "pretrained_from_identity",
    "resolve_checkpoint",
    "resolve_device",
]

logger = get_logger()

#: Zero-shot CLIP-IQA (method.md 9): antonym hand prompts, no visual prompts. What a
#: model without a checkpoint scores with.
ZERO_SHOT = ModelConfig(hand_prompts=CLIPIQA_PROMPTS, visual_prompts=False)

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
        head = f"{source}: trained on weights from the file {shown}" + (
            f" (sha256 of its first MiB {digest}...)" if digest else ""
        )
        tail = " (a checkpoint never makes grmpiqa open a path it records)"
        raise CheckpointError(
            f"{head}; name those weights with --pretrained FILE{tail}",
            api=f"{head}; name those weights with pretrained='FILE'{tail}",
        )
    return default_pretrained(name)


def resolve_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    backbone: str | None = None,
    pretrained: Any = DEFAULT,
    seed: int | None = None,
) -> Path:
    """The local grmpiqa checkpoint file that ``checkpoint`` names.

    ``checkpoint``: a grmpiqa ``.safetensors`` file; an authors' released ``.pt`` file
    (converted once into grmpiqa's cache with ``backbone``/``pretrained`` as its base
    weights, default ViT-B-16-quickgelu/openai, :func:`grmpiqa.released.converted_checkpoint`);
    or either of them on the Hub as ``hf-hub:OWNER/REPO/FILE`` (fetched into the Hugging
    Face cache, :func:`grmpiqa.hub.download`).
    """
    from grmpiqa.hub import fetch, is_hub_ref
    from grmpiqa.released import converted_checkpoint, is_released_file

    ref = os.fspath(checkpoint)
    source: dict[str, Any] = {}
    if is_hub_ref(ref):
        path, source = fetch(ref)
    else:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{ref}: checkpoint not found")
    if is_released_file(path):
        path = converted_checkpoint(
            path,
            backbone=backbone,
            pretrained=DEFAULT_PRETRAINED if pretrained is DEFAULT else pretrained,
            seed=seed or 0,
            source=source or None,
        )
    return path


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
        checkpoint: a grmpiqa ``.safetensors`` checkpoint (prompts and adapted tensors),
            an authors' released ``.pt`` file, or ``hf-hub:OWNER/REPO/FILE`` for either
            (:func:`resolve_checkpoint`). None: zero-shot CLIP-IQA prompts unless
            ``config`` or ``visual_prompts`` ask for learned ones (then UNTRAINED).
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
    path: Path | None = None
    if checkpoint is not None:
        path = resolve_checkpoint(checkpoint, backbone=backbone, pretrained=pretrained, seed=seed)
        tensors, meta = read_checkpoint(path)
    source = os.fspath(checkpoint) if checkpoint is not None else "None"
    zero_shot = checkpoint is None and config is None and visual_prompts is None
    bmeta = meta.get("backbone", {})
    name = backbone or bmeta.get("name") or DEFAULT_BACKBONE
    if backbone is None and name.startswith(LOCAL_DIR_PREFIX):
        head = f"{source}: trained on a local-dir backbone ({name}); name its folder with "
        why = " (a checkpoint never makes grmpiqa open a path it records)"
        raise CheckpointError(
            f"{head}--backbone local-dir:PATH{why}", api=f"{head}backbone='local-dir:PATH'{why}"
        )
    ident = bmeta.get("pretrained", {}) if name == bmeta.get("name") else {}
    try:
        if seed is None:
            seed = int(ident.get("seed", meta.get("seed", 0)))
        if pretrained is DEFAULT:
            pretrained = pretrained_from_identity(ident, name, source)
        if config is None:
            if zero_shot:
                config = ZERO_SHOT
            elif "model_config" in meta:
                config = ModelConfig.from_dict(meta["model_config"])
            else:
                config = ModelConfig()
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
        model.prompt_origin = "checkpoint"
        model.checkpoint_ref = source
        model.checkpoint_file = path
    elif zero_shot:
        logger.info(
            "no checkpoint: scoring with the zero-shot CLIP-IQA prompts %s (no visual "
            "prompts, nothing trained); give a checkpoint for a trained scorer, e.g. "
            "hf-hub:zzhowe/GRMP-IQA/clive_50_prompt_lda_5.0.pt",
            " / ".join(repr(t) for t in CLIPIQA_PROMPTS),
        )
    return model.to(dev).eval()
