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
        f"'random' for random weights (default: the checkpoint's, else {DEFAULT_PRETRAINED})",
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
