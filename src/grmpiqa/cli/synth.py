"""``grmpiqa synth``: KADID-style distortions of pristine photos (stage-1 tasks, method.md 6).

The defaults come from :class:`grmpiqa.data.synth.SynthConfig`; the type list from the
distortion registry (:mod:`grmpiqa.data.distortions`).
"""

from __future__ import annotations

import argparse
import sys

from grmpiqa.data.distortions import list_distortions
from grmpiqa.data.synth import SynthConfig


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = SynthConfig()
    types = list_distortions()
    p = subparsers.add_parser(
        "synth",
        help="synthesise KADID-10k-style distortions of pristine images",
        description=(
            f"Write the {len(types)} KADID-10k distortion types at increasing severities, in "
            "KADID-10k's layout (images/, dmos.csv), readable as the dataset 'kadid:OUT'. "
            "Labels: dmos = 5 - 4 * level / levels. Nothing is half-written: the inputs are "
            "checked first and the output is moved into place at the end. Types: "
            + ", ".join(f"{t.id:02d} {t.name}" for t in types)
            + "."
        ),
    )
    p.add_argument("--pristine", required=True, metavar="DIR", help="folder of pristine images")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--types",
        nargs="+",
        metavar="TYPE",
        default=d.types,
        help=f"distortion types by name or id (1..{len(types)}), space or comma separated; "
        "default all",
    )
    p.add_argument(
        "--levels",
        type=int,
        default=d.levels,
        help=f"severity levels per type (default {d.levels})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help=f"worker processes (0: every CPU; default {d.workers})",
    )
    p.add_argument(
        "--compress-level",
        type=int,
        default=d.compress_level,
        choices=range(10),
        metavar="0-9",
        help=f"PNG (zlib) compression level (default {d.compress_level}: fast, larger files)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--progress",
        action="store_true",
        help="progress bar on stderr even when it is not a terminal (default: only on one)",
    )
    g.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grmpiqa.data.synth import synthesize

    result = synthesize(
        args.pristine,
        args.out,
        types=args.types,
        levels=args.levels,
        seed=args.seed,
        workers=args.workers,
        progress=args.progress or (not args.quiet and sys.stderr.isatty()),
        compress_level=args.compress_level,
    )
    print(
        f"wrote {result.images} distorted images of {result.references} references to "
        f"{result.out_dir} in {result.seconds:.1f} s (dataset spec: {result.spec})"
    )
    return 0
