"""``grmpiqa explain IMAGE... --out DIR``: quality maps (PNG overlay + .npy grid) per image."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from grmpiqa.cli.common import (
    CHECKPOINT_HELP,
    add_backbone_args,
    add_precision_arg,
    add_prompt_args,
    model_from_args,
    resolve_run,
    scoring_config,
)
from grmpiqa.errors import GrmpiqaError
from grmpiqa.images import DEFAULT_MAX_PIXELS
from grmpiqa.utils import write_problem

SUMMARY = "maps.csv"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "explain",
        help="quality maps: where in each image the model sees good or bad quality",
        description="For each image write OUT/NAME.map.png (the map as an overlay on the "
        "image) and OUT/NAME.map.npy (p(high quality) per patch, rows x cols), and "
        f"OUT/{SUMMARY} with the global score and the map's mean side by side. The map "
        "reads each patch token through the same head and quality prompts as the score "
        "(docs/quality-maps.md).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image, folder, glob or list")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    add_prompt_args(p)
    add_backbone_args(p)
    add_precision_arg(p)
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images (pixels)"
    )
    p.set_defaults(func=run)


def _unique_stems(paths: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = Path(p).stem or "image"
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        out.append(stem if n == 1 else f"{stem}_{n}")
    return out


def run(args: argparse.Namespace) -> int:
    from grmpiqa.explain import quality_maps, write_map_files
    from grmpiqa.images import load_image
    from grmpiqa.scoring.inputs import collect_paths
    from grmpiqa.utils import atomic_open

    if args.batch_size < 1:
        raise GrmpiqaError(f"--batch-size must be at least 1, got {args.batch_size}")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise GrmpiqaError(f"{out_dir}: --out must be a folder")
    problem = write_problem(out_dir, folder=True)
    if problem:
        raise GrmpiqaError(f"{out_dir}: {problem} (--out)")
    paths = collect_paths(args.images)
    config = scoring_config(args, args.checkpoint is not None)
    resolve_run(args)
    model = model_from_args(args, checkpoint=args.checkpoint, config=config)
    print(f"grmpiqa: quality maps of {len(paths)} images with {model.describe()}", file=sys.stderr)
    scale = model.score_scale
    rows: list[dict[str, object]] = []
    stems = _unique_stems(paths)
    for s in range(0, len(paths), args.batch_size):
        chunk = paths[s : s + args.batch_size]
        images = [load_image(p, args.max_pixels) for p in chunk]
        maps = quality_maps(model, images, batch_size=args.batch_size, precision=args.precision)
        for path, stem, img, qm in zip(chunk, stems[s : s + len(chunk)], images, maps, strict=True):
            png, npy = write_map_files(img, qm, out_dir, stem)
            row: dict[str, object] = {
                "path": path,
                "score": f"{qm.score:.6f}",
                "map_mean": f"{qm.mean:.6f}",
                "map_min": f"{float(qm.grid.min()):.6f}",
                "map_max": f"{float(qm.grid.max()):.6f}",
            }
            if scale is not None and qm.mos_score is not None:
                row["mos"] = f"{qm.mos_score:.4f}"
                row["map_mean_mos"] = f"{qm.mos_mean:.4f}"
            row["png"] = png.name
            row["npy"] = npy.name
            rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    with atomic_open(out_dir / SUMMARY, "w", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())
    print(f"{'image':40s} {'score':>8s} {'map mean':>9s}")
    for r in rows:
        print(f"{Path(str(r['path'])).name[:40]:40s} {r['score']:>8s} {r['map_mean']:>9s}")
    print(f"grmpiqa: wrote {2 * len(rows)} map files and {SUMMARY} to {out_dir}", file=sys.stderr)
    return 0
