"""``grmpiqa finetune``: stage 2, few-shot fine-tuning with QGR (method.md 7)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grmpiqa.cli.common import (
    add_backbone_args,
    add_finetune_args,
    finetune_config_from_args,
    join_job,
    model_from_args,
)
from grmpiqa.data import load_dataset, make_split, write_splits
from grmpiqa.errors import GrmpiqaError
from grmpiqa.runs import RunFiles


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "finetune",
        help="few-shot fine-tuning with quality-aware gradient regularization (stage 2)",
        description="Fine-tune a stage-1 checkpoint on N shots of a dataset split (method.md 7): "
        "text context, the last 4 blocks of both towers, ln_final and ln_post train; a frozen CLIP "
        "teacher keeps scene knowledge through the gradient rule. Writes OUT (a checkpoint for "
        "`grmpiqa score --checkpoint`), OUT.state.safetensors (resume), OUT.log.jsonl (history) "
        "and OUT.splits.csv (the split used). An existing run at OUT is refused unless --resume "
        "or --overwrite is given.",
    )
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset spec KIND:PATH")
    p.add_argument("--out", required=True, metavar="CKPT", help="output checkpoint (.safetensors)")
    p.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="stage-1 checkpoint from `grmpiqa pretrain` (default: randomly initialised "
        "prompts on the --backbone, the 'no meta init' ablation)",
    )
    p.add_argument(
        "--shots", type=int, default=50, help="training images drawn from the pool (default 50)"
    )
    p.add_argument("--split-seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--split-index", type=int, default=0, help="split index (default 0)")
    add_finetune_args(p)
    p.add_argument(
        "--val",
        default=None,
        metavar="SPEC",
        help="a separate rated validation set; its SRCC becomes the default monitor",
    )
    p.add_argument(
        "--monitor",
        default="train_srcc",
        help="figure the lr schedule watches (default: SRCC on the shots, or on --val)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from OUT.state.safetensors if present"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run at OUT (state, log)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_backbone_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grmpiqa.finetune import check_monitor, finetune

    monitor = args.monitor
    if monitor == "train_srcc" and args.val:
        monitor = "val_srcc"
    check_monitor(monitor, with_val=bool(args.val))
    RunFiles(Path(args.out), "finetune").check_output_path()  # writable, before any work
    ctx = join_job(args)  # torchrun: this rank's device; one process: nothing changes
    out = Path(args.out)
    dataset = load_dataset(args.data)
    if not dataset.has_labels:
        raise GrmpiqaError(f"{args.data}: fine-tuning needs rated images")
    split = make_split(dataset, args.split_seed, args.split_index, args.shots)
    train = split.train(dataset)
    config = finetune_config_from_args(args, monitor=args.monitor)
    val = load_dataset(args.val) if args.val else None
    model = model_from_args(args, checkpoint=args.init)
    progress = not args.no_progress
    if progress and ctx.is_main:
        init = args.init or "random prompts (no meta init)"
        print(
            f"grmpiqa: fine-tuning {model.describe()} from {init} on {len(train)} shots of "
            f"{dataset.spec} (split {split.column}), lambda {config.lam}",
            file=sys.stderr,
        )
    splits_csv = out.with_suffix(".splits.csv")
    extra = {
        "init": str(args.init) if args.init else None,
        "data": dataset.spec,
        "val": val.spec if val is not None else None,
        "split": {
            "column": split.column,
            "seed": split.seed,
            "index": split.index,
            "shots": len(split.shots),
            "pool": len(split.pool),
            "test": len(split.test),
            "file": splits_csv.name,
        },
    }
    result = finetune(
        model,
        train,
        config,
        val=val,
        out=out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=progress,
        extra=extra,
    )
    if not ctx.is_main:
        return 0
    write_splits(dataset, [split], splits_csv)  # after training: a failed run leaves no split
    last = result.history[-1] if result.history else {}
    srcc = last.get("train_srcc")
    figure = f", train SRCC {srcc:.4f}" if isinstance(srcc, float) else ""
    print(
        f"grmpiqa: wrote {out} after {result.epochs} epochs ({result.stopped}, "
        f"{result.seconds:.1f} s{figure})",
        file=sys.stderr,
    )
    return 0
