"""``grmpiqa synth``: KADID-style distortions of pristine photos (stage-1 tasks, method.md 6)."""

from __future__ import annotations

import argparse

from grmpiqa.errors import GrmpiqaError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from grmpiqa.data.synth import TYPE_NAMES

    p = subparsers.add_parser(
        "synth",
        help="synthesise KADID-10k-style distortions of pristine images",
        description=(
            "Write the 25 KADID-10k distortion types at increasing severities, in "
            "KADID-10k's layout (images/, dmos.csv), readable as the dataset 'kadid:OUT'. "
            "Labels: dmos = 5 - 4 * level / levels. Types: "
            + ", ".join(f"{i + 1:02d} {n}" for i, n in enumerate(TYPE_NAMES))
            + "."
        ),
    )
    p.add_argument("--pristine", required=True, metavar="DIR", help="folder of pristine images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--types",
        nargs="+",
        metavar="TYPE",
        help="distortion types by name or id (1..25), space or comma separated; default all",
    )
    p.add_argument("--levels", type=int, default=5, help="severity levels per type (default 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes (0: every CPU; default 1)"
    )
    p.add_argument(
        "--compress-level",
        type=int,
        default=1,
        choices=range(10),
        metavar="0-9",
        help="PNG (zlib) compression level (default 1: fast, larger files)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grmpiqa.data.synth import synthesize

    if args.levels < 1:
        raise GrmpiqaError(f"--levels must be at least 1, not {args.levels}")
    result = synthesize(
        args.pristine,
        args.out,
        types=args.types,
        levels=args.levels,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
        compress_level=args.compress_level,
    )
    print(
        f"wrote {result.images} distorted images of {result.references} references to "
        f"{result.out_dir} in {result.seconds:.1f} s (dataset spec: {result.spec})"
    )
    return 0
