"""``grmpiqa finetune``: stage 2, few-shot fine-tuning with QGR (method.md 7)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grmpiqa.cli.common import add_backbone_args, model_from_args
from grmpiqa.data import load_dataset, make_split, write_splits
from grmpiqa.errors import GrmpiqaError
from grmpiqa.scoring import PRECISIONS


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "finetune",
        help="few-shot fine-tuning with quality-aware gradient regularization (stage 2)",
        description="Fine-tune a stage-1 checkpoint on N shots of a dataset split (method.md 7): "
        "text context, the last 4 blocks of both towers, ln_final and ln_post train; a frozen CLIP "
        "teacher keeps scene knowledge through the gradient rule. Writes OUT (a checkpoint for "
        "`grmpiqa score --checkpoint`), OUT.state.pt (resume), OUT.log.jsonl (history) and "
        "OUT.splits.csv (the split used).",
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
    p.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=5.0,
        help="QGR lambda (default 5; 0 = plain fine-tuning)",
    )
    p.add_argument("--no-distill", action="store_true", help="no teacher and no L_s at all")
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (default 1e-3)")
    p.add_argument(
        "--weight-decay", type=float, default=1e-4, help="SGD weight decay (default 1e-4)"
    )
    p.add_argument("--max-epochs", type=int, default=2000, help="epoch limit (default 2000)")
    p.add_argument(
        "--eval-every", type=int, default=5, help="epochs between evaluations (default 5)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="shots per step (default: all in one batch)"
    )
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 or bf16 autocast")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="run the exact released path (no frozen-feature cache; prompt dropout in all layers)",
    )
    p.add_argument(
        "--cache-augmentations",
        type=int,
        default=8,
        metavar="K",
        help="augmented views per image in the cache's bank (default 8)",
    )
    p.add_argument(
        "--monitor",
        default="train_srcc",
        help="figure the lr schedule watches (default train_srcc: SRCC on the shots)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT.state.pt if present")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_backbone_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grmpiqa.finetune import FinetuneConfig, finetune

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise GrmpiqaError(f"{out}: the output checkpoint must end in .safetensors")
    dataset = load_dataset(args.data)
    if not dataset.has_labels:
        raise GrmpiqaError(f"{args.data}: fine-tuning needs rated images")
    split = make_split(dataset, args.split_seed, args.split_index, args.shots)
    train = split.train(dataset)
    seed = args.seed if args.seed is not None else 0
    config = FinetuneConfig(
        lam=args.lam,
        lr=args.lr,
        weight_decay=args.weight_decay,
        max_epochs=args.max_epochs,
        eval_every=args.eval_every,
        batch_size=args.batch_size,
        distill=not args.no_distill,
        precision=args.precision,
        cache=not args.no_cache,
        cache_augmentations=args.cache_augmentations,
        seed=seed,
        monitor=args.monitor,
    )
    config.validate()
    model = model_from_args(args, checkpoint=args.init)
    progress = not args.no_progress
    if progress:
        init = args.init or "random prompts (no meta init)"
        print(
            f"grmpiqa: fine-tuning {model.describe()} from {init} on {len(train)} shots of "
            f"{dataset.spec} (split {split.column}), lambda {config.lam}",
            file=sys.stderr,
        )
    splits_csv = out.with_suffix(".splits.csv")
    write_splits(dataset, [split], splits_csv)
    extra = {
        "init": str(args.init) if args.init else None,
        "data": dataset.spec,
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
        model, train, config, out=out, resume=args.resume, progress=progress, extra=extra
    )
    last = result.history[-1] if result.history else {}
    srcc = last.get("train_srcc")
    figure = f", train SRCC {srcc:.4f}" if isinstance(srcc, float) else ""
    print(
        f"grmpiqa: wrote {out} after {result.epochs} epochs ({result.stopped}, "
        f"{result.seconds:.1f} s{figure})",
        file=sys.stderr,
    )
    return 0
