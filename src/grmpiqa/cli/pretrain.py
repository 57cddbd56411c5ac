"""``grmpiqa pretrain``: meta-prompt pre-training over distortion tasks (method.md 6)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from grmpiqa.cli.common import (
    add_backbone_args,
    add_precision_arg,
    add_progress_args,
    add_save_every_arg,
    join_job,
    model_from_args,
    save_every_from_args,
    want_progress,
)
from grmpiqa.errors import GrmpiqaError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from grmpiqa.config import (
        GPU_TASK_BATCH,
        OUTER_SCHEDULES,
        VARIANT_DEFAULTS,
        VARIANTS,
        PretrainConfig,
    )

    d = PretrainConfig()

    def by_variant(name: str) -> str:
        """'default: reptile X, released Y' from the config's per-variant defaults."""
        vals = ", ".join(f"{v} {VARIANT_DEFAULTS[v][name]}" for v in VARIANTS)
        return f"default: {vals}"

    p = subparsers.add_parser(
        "pretrain",
        help="stage 1: meta-learn quality prompts over distortion tasks (Reptile)",
        description=(
            "Meta-prompt pre-training (method.md 6): one task per distortion type of each "
            "--tasks dataset (kadid:, tid2013:, or a 'grmpiqa synth' folder as kadid:DIR). "
            "Only the prompts train; CLIP stays frozen. OUT (.safetensors) is written when the "
            "run ends (with --keep-best-val: whenever the best epoch changes); its resume state "
            "(stage1.safetensors -> stage1.state.safetensors), from which --resume continues, "
            "every --save-every seconds (between tasks too), at the end and on SIGINT/SIGTERM; "
            "a JSON-lines log (stage1.log.jsonl) gets a line per task and per epoch."
        ),
    )
    p.add_argument(
        "--tasks", nargs="+", required=True, metavar="SPEC", help="task datasets, run in order"
    )
    p.add_argument("--out", required=True, metavar="CKPT", help="output .safetensors checkpoint")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"meta-epochs (default {d.epochs})")
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default=d.variant,
        help="reptile: phi reset to theta and a fresh Adam per task (default); released: the "
        "authors' code (inner model and Adam carried across tasks and epochs)",
    )
    p.add_argument(
        "--inner-lr", type=float, default=None, help=f"inner Adam lr ({by_variant('inner_lr')})"
    )
    p.add_argument(
        "--outer-lr",
        type=float,
        default=None,
        help=f"outer (Reptile) step size ({by_variant('outer_lr')})",
    )
    p.add_argument(
        "--outer-schedule",
        choices=OUTER_SCHEDULES,
        default=None,
        help="outer step size constant, or annealed linearly to 0 over --epochs "
        f"({by_variant('outer_schedule')})",
    )
    p.add_argument(
        "--inner-passes",
        type=int,
        default=None,
        metavar="N",
        help=f"passes over each task's support set per epoch ({by_variant('inner_passes')})",
    )
    p.add_argument("--support-batch", type=int, default=None, help=f"{by_variant('support_batch')}")
    p.add_argument("--query-batch", type=int, default=None, help=f"{by_variant('query_batch')}")
    p.add_argument(
        "--support-fraction",
        type=float,
        default=d.support_fraction,
        help="share of each task in its support set, redrawn every epoch (default 0.8)",
    )
    add_precision_arg(p)
    p.add_argument(
        "--stats", choices=("imagenet", "clip"), default=d.stats, help="normalisation statistics"
    )
    p.add_argument(
        "--max-tasks",
        type=int,
        default=None,
        metavar="N",
        help="use the first N distortion types of each dataset (smoke runs; 24 = released KADID)",
    )
    p.add_argument(
        "--images-per-task",
        type=int,
        default=None,
        metavar="N",
        help="use a seeded subsample of at most N images per task (smoke runs)",
    )
    p.add_argument(
        "--no-shuffle-tasks", action="store_true", help="run tasks in id order every epoch"
    )
    p.add_argument(
        "--val",
        default=None,
        metavar="SPEC",
        help="validation set: SRCC/PLCC logged each epoch (never pass a test set)",
    )
    p.add_argument(
        "--keep-best-val",
        action="store_true",
        help="write the epoch with the best --val SRCC instead of the last (recorded in metadata)",
    )
    p.add_argument(
        "--vpt-tokens", type=int, default=None, help="visual prompt tokens (default 100)"
    )
    p.add_argument(
        "--log",
        default=None,
        metavar="FILE",
        help="JSON-lines log (default: OUT with suffix .log.jsonl)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT's .state.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's state")
    p.add_argument("--no-cache", action="store_true", help="decode images again every epoch")
    p.add_argument(
        "--task-batch",
        type=int,
        default=None,
        metavar="N",
        help="reptile: adapt N tasks at once, their prompt copies stacked in one forward pass "
        "(equal to one by one up to float rounding; default: 1 on the CPU, "
        f"{GPU_TASK_BATCH} on a GPU; released: always 1)",
    )
    add_save_every_arg(p)
    add_progress_args(p)
    add_backbone_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grmpiqa.data import load_dataset
    from grmpiqa.metatrain import PretrainConfig, build_tasks, pretrain
    from grmpiqa.model import ModelConfig

    ctx = join_job(args)  # torchrun: this rank's device; one process: nothing changes
    cfg = PretrainConfig(
        epochs=args.epochs,
        variant=args.variant,
        inner_lr=args.inner_lr,
        outer_lr=args.outer_lr,
        outer_schedule=args.outer_schedule,
        inner_passes=args.inner_passes,
        support_batch=args.support_batch,
        query_batch=args.query_batch,
        support_fraction=args.support_fraction,
        seed=args.seed if args.seed is not None else 0,
        precision=args.precision,
        stats=args.stats,
        max_tasks=args.max_tasks,
        images_per_task=args.images_per_task,
        shuffle_tasks=not args.no_shuffle_tasks,
        keep_best_val=args.keep_best_val,
        cache_images=not args.no_cache,
        task_batch=args.task_batch,
    )
    save_every = save_every_from_args(args)
    if args.keep_best_val and args.val is None:
        raise GrmpiqaError("--keep-best-val needs --val SPEC")
    # The output must be writable before any data is read or any model built.
    from grmpiqa.runs import RunFiles

    RunFiles(
        Path(args.out), "pretrain", log=Path(args.log) if args.log else Path()
    ).check_output_path()
    # Load the data (and fail on bad specs) before building the model.
    datasets = [load_dataset(spec) for spec in args.tasks]
    val = load_dataset(args.val) if args.val is not None else None
    databases = build_tasks(datasets, cfg.max_tasks, cfg.images_per_task, cfg.seed)
    n_tasks = sum(len(db.tasks) for db in databases)
    config = None
    if args.vpt_tokens is not None:
        if args.vpt_tokens < 1:
            raise GrmpiqaError(f"--vpt-tokens must be at least 1, not {args.vpt_tokens}")
        config = replace(ModelConfig(), vpt_tokens=args.vpt_tokens)
    model = model_from_args(args, config=config)
    if ctx.is_main:
        print(
            f"grmpiqa: pre-training {model.describe()} on {n_tasks} tasks of "
            f"{len(databases)} dataset(s), {cfg.epochs} epochs, variant {cfg.variant} (inner lr "
            f"{cfg.inner_lr}, {cfg.inner_passes} pass(es), batches {cfg.support_batch}/"
            f"{cfg.query_batch}; outer lr {cfg.outer_lr}, {cfg.outer_schedule})",
            file=sys.stderr,
        )
    result = pretrain(
        model,
        datasets,
        cfg,
        args.out,
        resume=args.resume,
        val=val,
        log=args.log,
        overwrite=args.overwrite,
        progress=want_progress(args),
        save_every=save_every,
    )
    if not ctx.is_main:
        return 0
    last = result.history[-1] if result.history else {}
    msg = f"wrote {result.checkpoint} ({result.epochs_done} epochs"
    if result.selection == "best-val":
        msg += f", best validation epoch {result.best_epoch}"
    if last.get("val_srcc") is not None:
        msg += f", last val SRCC {last['val_srcc']:.4f}"
    print(msg + f"); log {result.log}")
    return 0
