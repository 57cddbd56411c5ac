"""Flags and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from grmpiqa.config import (
    COMPILE_MODES,
    DEFAULT_BACKBONE,
    DEFAULT_PRETRAINED,
    DEFAULT_SAVE_EVERY,
    PRECISIONS,
    FinetuneConfig,
)
from grmpiqa.errors import GrmpiqaError
from grmpiqa.log import get_logger

if TYPE_CHECKING:
    import torch

    from grmpiqa.distributed import Context
    from grmpiqa.model import QualityModel


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
        "--device",
        default="auto",
        help="torch device: auto (CUDA if present, else MPS, else the CPU; the default), cpu, "
        "cuda, cuda:1, mps",
    )
    add_tokenizer_arg(g)
    if with_seed:
        g.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")


#: Help of ``--checkpoint`` where a command scores with a trained model.
CHECKPOINT_HELP = (
    "trained model: a grmpiqa .safetensors checkpoint, an authors' released .pt file "
    "(converted once into the cache), or hf-hub:OWNER/REPO/FILE for either, e.g. "
    "hf-hub:zzhowe/GRMP-IQA/clive_50_prompt_lda_5.0.pt (default: none, zero-shot CLIP-IQA "
    "prompts)"
)


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """``--untrained-prompts``: what a scoring command uses without a checkpoint."""
    parser.add_argument(
        "--untrained-prompts",
        action="store_true",
        help="without --checkpoint, score with learned prompts at their random init instead "
        "of the zero-shot CLIP-IQA prompts (meaningless scores; for tests of the pipeline)",
    )


def scoring_config(args: argparse.Namespace, has_checkpoint: bool) -> Any:
    """The :class:`ModelConfig` a scoring command asks for: None (the checkpoint's, else
    zero-shot CLIP-IQA), or learned prompts at their random init (``--untrained-prompts``,
    announced)."""
    if not getattr(args, "untrained_prompts", False):
        return None
    if has_checkpoint:
        raise GrmpiqaError("--untrained-prompts goes without --checkpoint")
    import warnings

    from grmpiqa.log import GrmpiqaWarning
    from grmpiqa.model import ModelConfig

    warnings.warn(
        "UNTRAINED learned prompts (random init, --untrained-prompts): the scores carry no "
        "quality knowledge",
        GrmpiqaWarning,
        stacklevel=2,
    )
    return ModelConfig()


def add_progress_args(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress``; by default bars show only on a terminal."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument(
        "--progress",
        action="store_true",
        help="progress bars on stderr even when it is not a terminal (default: only on one)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def want_progress(args: argparse.Namespace) -> bool:
    """Progress bars: as asked, else when stderr is a terminal."""
    if getattr(args, "progress", False):
        return True
    if getattr(args, "no_progress", False):
        return False
    return sys.stderr.isatty()


def add_tokenizer_arg(group: Any) -> None:
    """``--tokenizer DIR``: a saved Hugging Face tokenizer (SigLIP, SigLIP2) used when the
    backbone's own is not in the local cache (sets GRMPIQA_TOKENIZER for the command)."""
    group.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="folder of a saved Hugging Face tokenizer, for backbones whose tokenizer is not "
        "in the local cache (SigLIP, SigLIP2; needs grmpiqa[hf]); default: the checkpoint's",
    )


def pretrained_arg(value: str | None) -> Any:
    """CLI value of ``--pretrained`` -> create_model's argument."""
    from grmpiqa.factory import DEFAULT

    if value is None:
        return DEFAULT
    if value.lower() in ("random", "none"):
        return None
    return value


#: ``--precision`` help shared by the commands (the default is ``auto``).
PRECISION_HELP = (
    "fp32, bf16 (matrix products in bf16) or auto: bf16 on CUDA and on CPUs with fast bf16 "
    "(AMX or AVX512-BF16), fp32 elsewhere (default: auto; bf16 moves scores by about 1e-3, "
    "docs/gpu.md)"
)


def add_precision_arg(parser: Any, default: str = "auto", help: str = PRECISION_HELP) -> None:
    """``--precision {fp32,bf16,auto}`` (default ``auto``)."""
    parser.add_argument("--precision", choices=PRECISIONS, default=default, help=help)


def device_arg(value: str) -> torch.device:
    """``--device`` -> a torch device that exists here (``auto`` resolved; one-line error
    otherwise)."""
    from grmpiqa.pipeline import resolve_device

    try:
        return resolve_device(value)
    except GrmpiqaError as err:
        raise GrmpiqaError(f"--{err}") from None


def describe_run(device: Any, precision: str | None = None) -> str:
    """``device cuda:0 (NVIDIA H200), precision bf16 (auto: CUDA bf16)``: what a command
    announces once on stderr (``precision`` as the user asked for it)."""
    from grmpiqa.pipeline import describe_device
    from grmpiqa.precision import describe_choice

    text = f"device {describe_device(device)}"
    if precision is not None:
        text += f", precision {describe_choice(precision, device)}"
    return text


def resolve_run(args: argparse.Namespace, *, announce: bool = True) -> torch.device:
    """Resolve ``args.device`` (``auto``) and ``args.precision`` (``auto``) in place, to
    what they are on this machine, and announce both once on stderr."""
    from grmpiqa.precision import resolve_precision

    dev = device_arg(args.device)
    args.device = str(dev)
    requested = getattr(args, "precision", None)
    if requested is not None:
        args.precision_requested = requested
        args.precision = resolve_precision(requested, dev)
    if announce:
        print(f"grmpiqa: {describe_run(dev, requested)}", file=sys.stderr)
    return dev


def announce(args: argparse.Namespace) -> None:
    """Say once on stderr which device and precision the command runs with (after its
    inputs were checked: a bad input stays a one-line error)."""
    if getattr(args, "announce_pending", False):
        args.announce_pending = False
        requested = getattr(args, "precision_requested", None)
        print(f"grmpiqa: {describe_run(args.device, requested)}", file=sys.stderr)


def join_job(args: argparse.Namespace) -> Context:
    """Join the torchrun job the environment describes, if any (docs/distributed.md).

    Resolves ``--device auto`` and ``--precision auto`` (:func:`resolve_run`), sets
    ``args.device`` to this rank's device (``cuda`` -> ``cuda:LOCAL_RANK``) and keeps
    ranks other than 0 to warnings and errors; rank 0 announces device and precision
    when the model is built (:func:`model_from_args`) or :func:`announce` is called.
    """
    from grmpiqa.distributed import init_from_env

    ctx, dev = init_from_env(resolve_run(args, announce=False))
    args.device = str(dev)
    if ctx.is_distributed and not ctx.is_main:
        get_logger().setLevel(logging.WARNING)
    args.announce_pending = ctx.is_main
    return ctx


def model_from_args(
    args: argparse.Namespace, checkpoint: str | None = None, **kwargs: Any
) -> QualityModel:
    """Build the model the backbone flags (and an optional checkpoint) describe."""
    from grmpiqa.factory import create_model

    announce(args)
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
    a user sets (``--lambda``, ``--lr``, ``--max-epochs``, ...), defaults taken from the
    dataclass; read them back with :func:`finetune_config_from_args`."""
    d = FinetuneConfig()
    g = parser.add_argument_group("fine-tuning (stage 2)")
    g.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=d.lam,
        help=f"QGR lambda (default {d.lam:g}; 0 = plain fine-tuning)",
    )
    g.add_argument("--no-distill", action="store_true", help="no teacher and no L_s at all")
    g.add_argument("--lr", type=float, default=d.lr, help=f"SGD learning rate (default {d.lr:g})")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help=f"SGD weight decay (default {d.weight_decay:g})",
    )
    g.add_argument(
        "--max-epochs", type=int, default=d.max_epochs, help=f"epoch limit (default {d.max_epochs})"
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help=f"epochs between evaluations (default {d.eval_every})",
    )
    g.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help=f"evaluations without improvement before lr decays (default {d.patience})",
    )
    g.add_argument(
        "--lr-decay",
        type=float,
        default=d.lr_decay,
        help=f"lr factor on a plateau (default {d.lr_decay:g})",
    )
    g.add_argument(
        "--min-lr",
        type=float,
        default=d.min_lr,
        help=f"stop once lr falls below (default {d.min_lr:g})",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="shots per step (default: all in one batch)",
    )
    add_precision_arg(g)
    g.add_argument(
        "--no-cache",
        action="store_true",
        help="run the exact released path (no frozen-feature cache; prompt dropout in all layers)",
    )
    g.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default=d.compile,
        metavar="MODE",
        help="torch.compile the step's forward pass: off (default), default, "
        "reduce-overhead (CUDA graphs) or max-autotune; for GPUs (numbers differ from "
        "eager: the compiled dropout draws its own masks)",
    )
    g.add_argument(
        "--cache-augmentations",
        type=int,
        default=d.cache_augmentations,
        metavar="K",
        help=f"augmented views per image in the cache's bank (default {d.cache_augmentations})",
    )


def finetune_config_from_args(args: argparse.Namespace, **overrides: Any) -> Any:
    """The :class:`~grmpiqa.finetune.FinetuneConfig` that :func:`add_finetune_args` flags give."""
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
        "compile": args.compile,
        "seed": args.seed if getattr(args, "seed", None) is not None else 0,
    }
    kw.update(overrides)
    config = FinetuneConfig(**kw)
    config.validate()
    return config


def add_save_every_arg(parser: argparse.ArgumentParser) -> None:
    """``--save-every SECONDS``: how often a training run writes its resume state."""
    parser.add_argument(
        "--save-every",
        type=float,
        default=DEFAULT_SAVE_EVERY,
        metavar="SECONDS",
        help=f"write the resume state every SECONDS (default {DEFAULT_SAVE_EVERY:g}), at "
        "the end and when stopped by SIGINT/SIGTERM (then exit 128+signal; --resume "
        "continues); 0 = at every safe point (every epoch; in pretrain every task)",
    )


def save_every_from_args(args: argparse.Namespace) -> float:
    value = float(args.save_every)
    if not value >= 0 or value == float("inf"):
        raise GrmpiqaError(f"--save-every must be a number of seconds >= 0, not {args.save_every}")
    return value
