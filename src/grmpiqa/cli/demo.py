"""``grmpiqa demo``: the whole pipeline on sample photos, offline, in a few minutes."""

from __future__ import annotations

import argparse
import sys

from grmpiqa.cli.common import (
    add_backbone_args,
    add_progress_args,
    pretrained_arg,
    resolve_run,
    want_progress,
)

#: Pristine photos ``--pristine`` needs at least (:data:`grmpiqa.demo.MIN_PRISTINE`).
MIN_PRISTINE = 4


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline (synthesis, pre-training, 50-shot fine-tuning, report)",
        description="Synthesise distortion tasks from sample photos that ship with "
        "scikit-image, meta-pre-train the prompts briefly, fine-tune on 50 shots of a held-out "
        "synthetic set over 2 splits, write an evaluation report and print scores of unseen "
        "images. Uses ViT-B-16-quickgelu with OpenAI weights when they are available, else the "
        "tiny RANDOM backbone 'test-tiny' (announced loudly; its numbers are meaningless).",
    )
    p.add_argument("--out", default="grmpiqa-demo", help="output folder (default grmpiqa-demo)")
    p.add_argument(
        "--quick", action="store_true", help="a smoke run of a few seconds (tiny budgets)"
    )
    p.add_argument(
        "--pristine",
        default=None,
        metavar="DIR",
        help=f"your own pristine photos (at least {MIN_PRISTINE}) instead of scikit-image's "
        "samples",
    )
    add_progress_args(p)
    add_backbone_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grmpiqa.demo import run_demo
    from grmpiqa.factory import DEFAULT

    result = run_demo(
        args.out,
        backbone=args.backbone,
        pretrained=pretrained_arg(args.pretrained) if args.pretrained is not None else DEFAULT,
        device=str(resolve_run(args)),
        seed=args.seed if args.seed is not None else 0,
        quick=args.quick,
        pristine=args.pristine,
        progress=want_progress(args),
    )
    print(result.text)
    if result.notice:
        print(result.notice, file=sys.stderr, flush=True)
    return 0
