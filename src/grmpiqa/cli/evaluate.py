"""``grmpiqa evaluate``: the 10-split few-shot protocol and its report (method.md 8)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from grmpiqa.cli.common import (
    add_backbone_args,
    add_finetune_args,
    add_progress_args,
    add_save_every_arg,
    announce,
    device_arg,
    finetune_config_from_args,
    join_job,
    pretrained_arg,
    save_every_from_args,
    want_progress,
)
from grmpiqa.config import LOGISTIC_MODELS, METHODS, SELECTIONS
from grmpiqa.errors import GrmpiqaError
from grmpiqa.utils import write_problem

if TYPE_CHECKING:
    from grmpiqa.evaluation import ProtocolConfig


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "evaluate",
        help="run the few-shot protocol (10 random splits) and write a report",
        description="For each of --splits random splits (80% pool / 20% test, --shots drawn "
        "from the pool), train the method on the shots and score the test set; write "
        "DIR/report.json (config, per-split SRCC/PLCC/PLCC-logistic/KRCC/RMSE/seconds, "
        "median/mean/std), report.md, predictions.csv, scatter.png and curves.png. "
        "Methods: grmp (stage 2 with QGR from --init; without --init = 'no meta init' "
        "ablation, --lambda 0 = 'no QGR' ablation), coop (text context only), clipiqa "
        "(zero-shot antonym prompts), linear-probe (ridge on frozen CLIP embeddings). Several "
        "methods (--method grmp,clipiqa,linear-probe) run on the same splits, each with its own "
        "report in DIR/METHOD/, and DIR/report.md, report.json and comparison.png compare them: "
        "per-method medians and paired differences against grmp with bootstrap 95% CIs.",
    )
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset spec KIND:PATH")
    p.add_argument("--report", required=True, metavar="DIR", help="report folder")
    p.add_argument(
        "--method",
        default="grmp",
        metavar="METHOD[,METHOD...]",
        help=f"one of {', '.join(METHODS)}, or several separated by commas to compare them on "
        "the same splits (default grmp)",
    )
    p.add_argument("--shots", type=int, default=50, help="training images per split (default 50)")
    p.add_argument("--splits", type=int, default=10, help="number of random splits (default 10)")
    p.add_argument(
        "--test-fraction", type=float, default=0.2, help="share held out for testing (default 0.2)"
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="grmp: stage-1 checkpoint from `grmpiqa pretrain` (default: random prompts, the "
        "'no meta init' ablation)",
    )
    p.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="final",
        help="final (default): the end of the fixed schedule; best-on-test: the released "
        "code's per-split best test figure (OPTIMISTIC, labelled so in the report)",
    )
    p.add_argument(
        "--monitor",
        default="train_srcc",
        help="figure the lr schedule watches with --selection final (default train_srcc)",
    )
    p.add_argument(
        "--logistic",
        choices=LOGISTIC_MODELS,
        default="4",
        help="parameters of the logistic fitted for PLCC (logistic) and RMSE (default 4)",
    )
    p.add_argument(
        "--vpt-tokens",
        type=int,
        default=None,
        help="grmp without --init: visual prompt tokens (default 100)",
    )
    p.add_argument(
        "--score-batch-size", type=int, default=32, help="images per forward pass when scoring"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip splits finished in DIR/splits/ and continue an interrupted one from its "
        "DIR/splits/split_K.state.safetensors",
    )
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="grmp/coop: keep each split's model as DIR/splits/split_K.safetensors with its "
        "resume state and log (~170 MB each for ViT-B/16)",
    )
    add_save_every_arg(p)
    add_progress_args(p)
    add_finetune_args(p)
    add_backbone_args(p)
    p.set_defaults(func=run)


def methods_from_args(args: argparse.Namespace) -> list[str]:
    """The methods ``--method`` names (one, or several separated by commas)."""
    names = [m.strip() for m in str(args.method).split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise GrmpiqaError(
            f"--method {args.method}: unknown method {', '.join(bad) or '(none)'}; use "
            f"{', '.join(METHODS)} or several of them separated by commas"
        )
    if len(set(names)) != len(names):
        raise GrmpiqaError(f"--method {args.method}: a method is named twice")
    if args.init is not None and "grmp" not in names:
        raise GrmpiqaError("--init is a stage-1 checkpoint for method grmp")
    return names


def config_from_args(args: argparse.Namespace, method: str | None = None) -> ProtocolConfig:
    """The :class:`ProtocolConfig` the flags describe (for ``method``, one of several)."""
    from grmpiqa.evaluation import ProtocolConfig
    from grmpiqa.model import ModelConfig

    seed = args.seed if args.seed is not None else 0
    method = method or args.method
    if args.init is not None and not Path(args.init).is_file():
        raise GrmpiqaError(f"{args.init}: --init checkpoint not found")
    trained = method in ("grmp", "coop")
    ft = None
    if trained:
        ft = finetune_config_from_args(args, seed=seed, monitor=args.monitor)
    model_config = None
    if args.vpt_tokens is not None:
        if args.vpt_tokens < 1:
            raise GrmpiqaError(f"--vpt-tokens must be at least 1, got {args.vpt_tokens}")
        if args.init is not None and method == "grmp":
            raise GrmpiqaError("--vpt-tokens comes from the --init checkpoint; drop one of them")
        model_config = replace(ModelConfig(), vpt_tokens=args.vpt_tokens)
    if args.score_batch_size < 1:
        raise GrmpiqaError(f"--score-batch-size must be at least 1, got {args.score_batch_size}")
    return ProtocolConfig(
        method=method,
        shots=args.shots,
        splits=args.splits,
        seed=seed,
        test_fraction=args.test_fraction,
        selection=args.selection if trained else "final",
        init=args.init if method == "grmp" else None,
        finetune=ft,
        backbone=args.backbone,
        pretrained=pretrained_arg(args.pretrained),
        device=str(device_arg(args.device)),
        model_config=model_config,
        logistic=args.logistic,
        batch_size=args.score_batch_size,
        precision=args.precision,
    )


def run(args: argparse.Namespace) -> int:
    problem = write_problem(args.report, folder=True)
    if problem:  # before any data is read or any split computed
        raise GrmpiqaError(f"{args.report}: {problem} (--report)")
    from grmpiqa.data import load_dataset
    from grmpiqa.evaluation import format_comparison, format_summary, run_comparison, run_protocol

    ctx = join_job(args)  # torchrun: splits over the ranks; one process: nothing changes
    methods = methods_from_args(args)
    progress = want_progress(args)
    save_every = save_every_from_args(args)
    dataset = load_dataset(args.data)  # a bad data spec stays a one-line error
    announce(args)
    common = {
        "report_dir": args.report,
        "resume": args.resume,
        "progress": progress,
        "keep_checkpoints": args.keep_checkpoints,
        "save_every": save_every,
    }
    if len(methods) > 1:
        comparison = run_comparison(dataset, [config_from_args(args, m) for m in methods], **common)
        summary, report, config = format_comparison(comparison), "report.md", comparison.config
    else:
        result = run_protocol(dataset, config_from_args(args), **common)
        summary, report, config = format_summary(result), "report.json", result.config
    if not ctx.is_main:
        return 0
    print(summary)
    print(f"report: {Path(args.report) / report}")
    if config.get("random_backbone"):
        print(
            "grmpiqa: WARNING: these numbers come from a RANDOM backbone, not pretrained CLIP",
            file=sys.stderr,
        )
    return 0
