"""``grmpiqa score PATH...``: one quality score per image, higher is better."""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
from pathlib import Path

from grmpiqa.cli.common import add_backbone_args, model_from_args
from grmpiqa.errors import GrmpiqaError, ImageError
from grmpiqa.images import DEFAULT_MAX_PIXELS, is_image_file
from grmpiqa.precision import PRECISIONS
from grmpiqa.scoring import iter_scores
from grmpiqa.utils import atomic_open

LIST_SUFFIXES = (".txt", ".csv", ".lst", ".list")
_PATH_COLUMNS = ("path", "img_name", "image", "image_name", "file", "filename", "name")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "score",
        help="score images (folders, globs, files, or a .txt/.csv list of paths)",
        description="Print one quality score in (0, 1) per image, higher is better. Folders "
        "are walked recursively; globs and .txt/.csv lists of paths are accepted.",
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="image, folder, glob, or .txt/.csv list"
    )
    p.add_argument("--checkpoint", default=None, help="grmpiqa .safetensors checkpoint (prompts)")
    add_backbone_args(p)
    p.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass (default 32)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader processes decoding images (default: min(4, CPUs - 1), 0 = in-process)",
    )
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 or bf16 autocast")
    p.add_argument(
        "--output", "-o", default=None, help="write FILE.csv or FILE.json instead of stdout"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="give unreadable files a row with an empty score and an error instead of stopping",
    )
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images (pixels)"
    )
    p.add_argument(
        "--scale",
        choices=("prob", "mos"),
        default="prob",
        help="prob: p(high quality) in (0, 1) (default); mos: the label scale the checkpoint's "
        "fine-tuning recorded (e.g. CLIVE MOS 0-100)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def collect_paths(args: list[str]) -> list[str]:
    """Expand folders (recursively), globs and list files into image paths, in order."""
    out: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(
                str(Path(root) / f)
                for root, _, files in os.walk(path)
                for f in files
                if is_image_file(f)
            )
            if not found:
                raise GrmpiqaError(f"{arg}: no image files in this folder")
            out.extend(found)
        elif path.is_file():
            if path.suffix.lower() in LIST_SUFFIXES:
                out.extend(_read_list(path))
            else:
                out.append(str(path))
        elif glob.has_magic(arg):
            found = sorted(p for p in glob.glob(arg, recursive=True) if Path(p).is_file())
            if not found:
                raise GrmpiqaError(f"{arg}: no files match this pattern")
            out.extend(found)
        else:
            raise GrmpiqaError(f"{arg}: no such file or folder")
    return out


def _read_list(path: Path) -> list[str]:
    """Paths from a text list (one per line) or a CSV with a path column.

    Relative paths are taken relative to the list file's folder.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise GrmpiqaError(f"{path}: cannot read list of paths ({err})") from None
    rows: list[str]
    if path.suffix.lower() == ".csv":
        reader = csv.reader(io.StringIO(text))
        table = [r for r in reader if r and any(c.strip() for c in r)]
        if not table:
            raise GrmpiqaError(f"{path}: empty list of paths")
        header = [c.strip().lower() for c in table[0]]
        col = next((header.index(c) for c in _PATH_COLUMNS if c in header), None)
        if col is None:
            col = 0
            body = table if not _looks_like_header(table[0][0]) else table[1:]
        else:
            body = table[1:]
        rows = [r[col].strip() for r in body if len(r) > col and r[col].strip()]
    else:
        rows = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not rows:
        raise GrmpiqaError(f"{path}: empty list of paths")
    base = path.parent
    return [r if Path(r).is_absolute() else str(base / r) for r in rows]


def _looks_like_header(cell: str) -> bool:
    return not is_image_file(cell.strip())


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise GrmpiqaError(f"--batch-size must be at least 1, got {args.batch_size}")
    out_format = "csv"
    if args.output is not None:
        suffix = Path(args.output).suffix.lower()
        if suffix not in (".csv", ".json"):
            raise GrmpiqaError(f"{args.output}: output must end in .csv or .json")
        out_format = suffix[1:]
    paths = collect_paths(args.paths)
    model = model_from_args(args, checkpoint=args.checkpoint)
    to_mos = None
    if args.scale == "mos":
        from grmpiqa.scale import require_score_scale

        mos_scale = require_score_scale(model, args.checkpoint or model.describe())
        to_mos = mos_scale.to_mos
        print(f"grmpiqa: scores on the scale {mos_scale.describe()}", file=sys.stderr)
    workers = args.workers
    if workers is None:
        workers = max(0, min(4, (os.cpu_count() or 1) - 1))
    print(f"grmpiqa: scoring {len(paths)} images with {model.describe()}", file=sys.stderr)

    scores: list[float | None] = [None] * len(paths)
    errors: list[str] = [""] * len(paths)
    for batch in iter_scores(
        model,
        paths,
        args.batch_size,
        precision=args.precision,
        num_workers=workers,
        progress=not args.no_progress,
        max_pixels=args.max_pixels,
    ):
        if batch.errors and not args.skip_bad:
            raise ImageError(batch.errors[0][1])
        values = batch.scores.tolist() if to_mos is None else to_mos(batch.scores.numpy()).tolist()
        for i, s in zip(batch.indices, values, strict=True):
            scores[i] = s
        for i, msg in batch.errors:
            errors[i] = msg
    n_bad = sum(1 for e in errors if e)
    if n_bad:
        print(f"grmpiqa: {n_bad} of {len(paths)} files could not be scored", file=sys.stderr)
    _write(paths, scores, errors, args.output, out_format, args.skip_bad)
    return 0


def _write(
    paths: list[str],
    scores: list[float | None],
    errors: list[str],
    output: str | None,
    fmt: str,
    with_errors: bool,
) -> None:
    if fmt == "json":
        rows = []
        for p, s, e in zip(paths, scores, errors, strict=True):
            row: dict[str, object] = {"path": p, "score": s}
            if with_errors:
                row["error"] = e or None
            rows.append(row)
        text = json.dumps(rows, indent=1) + "\n"
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "score", "error"] if with_errors else ["path", "score"])
        for p, s, e in zip(paths, scores, errors, strict=True):
            cell = "" if s is None else f"{s:.6f}"
            w.writerow([p, cell, e] if with_errors else [p, cell])
        text = buf.getvalue()
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with atomic_open(output, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        print(f"grmpiqa: wrote {len(paths)} rows to {output}", file=sys.stderr)
