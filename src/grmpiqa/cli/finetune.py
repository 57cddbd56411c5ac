"""``grmpiqa finetune``: stage 2, few-shot fine-tuning with QGR (method.md 7)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from grmpiqa.cli.common import (
    add_backbone_args,
    add_finetune_args,
    add_progress_args,
    finetune_config_from_args,
    join_job,
    model_from_args,
    want_progress,
)
from grmpiqa.errors import GrmpiqaError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "finetune",
        help="few-shot fine-tuning with quality-aware gradient regularization (stage 2)",
        description="Fine-tune a stage-1 checkpoint on N shots of a dataset split (method.md 7): "
        "text context, the last 4 blocks of both towers, ln_final and ln_post train; a frozen CLIP "
        "teacher keeps scene knowledge through the gradient rule. Writes OUT (a checkpoint for "
        "`grmpiqa score --checkpoint`), OUT.state.safetensors (resume), OUT.log.jsonl (history) "
        "and OUT.splits.csv (the split used). --test-fraction of the images (default 0.2) is held "
        "out: never trained on, scored at every evaluation and reported at the end (SRCC, PLCC, "
        "RMSE of the MOS map), in the log and in the checkpoint; 0 trains on every image. The "
        "p -> MOS map and its fit are printed at the end. An existing run at OUT is refused "
        "unless --resume or --overwrite is given.",
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
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="share of the images held out of training and reported at the end (default 0.2; "
        "0 trains on every labelled image, e.g. 50 rated images with --shots 50)",
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
    add_progress_args(p)
    add_backbone_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grmpiqa.data import load_dataset, make_split, write_splits
    from grmpiqa.finetune import check_monitor, finetune
    from grmpiqa.runs import RunFiles

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
    _check_shots(dataset, args.shots, args.test_fraction)
    split = make_split(dataset, args.split_seed, args.split_index, args.shots, args.test_fraction)
    train = split.train(dataset)
    held_out = split.test_set(dataset) if split.test else None
    config = finetune_config_from_args(args, monitor=args.monitor)
    val = load_dataset(args.val) if args.val else None
    if args.init is not None:
        model = model_from_args(args, checkpoint=args.init)
    else:  # learned prompts from their random init: the "no meta init" ablation
        from grmpiqa.model import ModelConfig

        model = model_from_args(args, config=ModelConfig())
    progress = want_progress(args)
    if ctx.is_main:
        init = args.init or "random prompts (no meta init)"
        kept = (
            f", {len(split.test)} held out ({args.test_fraction:g})"
            if split.test
            else ", none held out"
        )
        print(
            f"grmpiqa: fine-tuning {model.describe()} from {init} on {len(train)} shots of "
            f"{dataset.spec} (split {split.column}{kept}), lambda {config.lam}",
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
            "test_fraction": args.test_fraction,
            "file": splits_csv.name,
        },
    }
    result = finetune(
        model,
        train,
        config,
        val=val,
        held_out=held_out,
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
    _report(out)
    return 0


def _check_shots(dataset: Any, shots: int, test_fraction: float) -> None:
    """Enough images for the shots after holding out ``test_fraction`` (one line if not)."""
    if not 0.0 <= test_fraction < 1.0:
        raise GrmpiqaError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    n = len(dataset)
    n_test = 0 if test_fraction == 0 else min(n - 1, max(1, round(test_fraction * n)))
    if not dataset.has_refs and shots > n - n_test:
        raise GrmpiqaError(
            f"{dataset.spec}: {shots} shots requested but {n - n_test} of its {n} images are "
            f"left for training after holding out {n_test} (--test-fraction {test_fraction:g}); "
            "pass --test-fraction 0 to train on every image, or fewer --shots"
        )


def _report(out: Path) -> None:
    """The held-out figures and the p -> MOS map's fit, as the checkpoint records them."""
    from grmpiqa.checkpoint import read_metadata
    from grmpiqa.log import get_logger
    from grmpiqa.scale import scale_from_metadata

    meta = read_metadata(out)
    held = (meta.get("extra") or {}).get("held_out")
    if held:
        mos = f", MOS-map RMSE {held['mos_rmse']:.3g}" if held.get("mos_rmse") is not None else ""
        print(
            f"grmpiqa: held out ({held['n']} images, never trained on): SRCC "
            f"{_num(held.get('srcc'))}, PLCC {_num(held.get('plcc'))}{mos}",
            file=sys.stderr,
        )
    scale = scale_from_metadata(meta, str(out))
    if scale is not None:
        print(f"grmpiqa: {scale.quality_line()}", file=sys.stderr)
        warning = scale.warning()
        if warning:
            get_logger().warning("%s", warning)


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "n/a"
