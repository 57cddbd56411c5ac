"""Flags and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from grmpiqa.backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED
from grmpiqa.errors import GrmpiqaError
from grmpiqa.model import DEFAULT, QualityModel, create_model


def add_backbone_args(parser: argparse.ArgumentParser, *, with_seed: bool = True) -> None:
    """``--backbone``, ``--pretrained``, ``--device`` (and ``--seed``)."""
    g = parser.add_argument_group("backbone")
    g.add_argument(
        "--backbone",
        default=None,
        help=f"open_clip model name, 'test-tiny', or 'local-dir:PATH' (default: the "
        f"checkpoint's, else {DEFAULT_BACKBONE})",
    )
    g.add_argument(
        "--pretrained",
        default=None,
        help=f"open_clip tag, a weights file (OpenAI .pt, open_clip .pt/.bin/.safetensors), or "
        f"'random' for random weights (default: the checkpoint's, else {DEFAULT_PRETRAINED}; "
        "random, announced, for architectures without pretrained tags such as test-tiny)",
    )
    g.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)"
    )
    if with_seed:
        g.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")


def pretrained_arg(value: str | None) -> Any:
    """CLI value of ``--pretrained`` -> create_model's argument."""
    if value is None:
        return DEFAULT
    if value.lower() in ("random", "none"):
        return None
    return value


def device_arg(value: str) -> torch.device:
    try:
        dev = torch.device(value)
    except RuntimeError as err:
        raise GrmpiqaError(f"--device {value}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GrmpiqaError(f"--device {value}: CUDA is not available on this machine")
    return dev


def model_from_args(
    args: argparse.Namespace, checkpoint: str | None = None, **kwargs: Any
) -> QualityModel:
    """Build the model the backbone flags (and an optional checkpoint) describe."""
    return create_model(
        backbone=args.backbone,
        pretrained=pretrained_arg(args.pretrained),
        checkpoint=checkpoint,
        device=device_arg(args.device),
        seed=getattr(args, "seed", None),
        **kwargs,
    )


def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    """The stage-2 settings (method.md 7) as flags: every :class:`FinetuneConfig` field
    a user sets (``--lambda``, ``--lr``, ``--max-epochs``, ...); read them back with
    :func:`finetune_config_from_args`."""
    from grmpiqa.precision import PRECISIONS

    g = parser.add_argument_group("fine-tuning (stage 2)")
    g.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=5.0,
        help="QGR lambda (default 5; 0 = plain fine-tuning)",
    )
    g.add_argument("--no-distill", action="store_true", help="no teacher and no L_s at all")
    g.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (default 1e-3)")
    g.add_argument(
        "--weight-decay", type=float, default=1e-4, help="SGD weight decay (default 1e-4)"
    )
    g.add_argument("--max-epochs", type=int, default=2000, help="epoch limit (default 2000)")
    g.add_argument(
        "--eval-every", type=int, default=5, help="epochs between evaluations (default 5)"
    )
    g.add_argument(
        "--patience",
        type=int,
        default=5,
        help="evaluations without improvement before lr decays (default 5)",
    )
    g.add_argument(
        "--lr-decay", type=float, default=0.3, help="lr factor on a plateau (default 0.3)"
    )
    g.add_argument(
        "--min-lr", type=float, default=5e-7, help="stop once lr falls below (default 5e-7)"
    )
    g.add_argument(
        "--batch-size", type=int, default=None, help="shots per step (default: all in one batch)"
    )
    g.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 or bf16 autocast")
    g.add_argument(
        "--no-cache",
        action="store_true",
        help="run the exact released path (no frozen-feature cache; prompt dropout in all layers)",
    )
    g.add_argument(
        "--cache-augmentations",
        type=int,
        default=8,
        metavar="K",
        help="augmented views per image in the cache's bank (default 8)",
    )


def finetune_config_from_args(args: argparse.Namespace, **overrides: Any) -> Any:
    """The :class:`~grmpiqa.finetune.FinetuneConfig` that :func:`add_finetune_args` flags give."""
    from grmpiqa.finetune import FinetuneConfig

    kw: dict[str, Any] = {
        "lam": args.lam,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "max_epochs": args.max_epochs,
        "eval_every": args.eval_every,
        "patience": args.patience,
        "lr_decay": args.lr_decay,
        "min_lr": args.min_lr,
        "batch_size": args.batch_size,
        "distill": not args.no_distill,
        "precision": args.precision,
        "cache": not args.no_cache,
        "cache_augmentations": args.cache_augmentations,
        "seed": args.seed if getattr(args, "seed", None) is not None else 0,
    }
    kw.update(overrides)
    config = FinetuneConfig(**kw)
    config.validate()
    return config
