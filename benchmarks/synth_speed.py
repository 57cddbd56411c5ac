"""Benchmark ``grmpiqa synth``: 24 Kodak images x 25 types x 5 levels (3,000 images).

Usage::

    python benchmarks/synth_speed.py [--pristine DIR] [--workers 2] [--types ...] [--keep OUT]

Prints a per-type table (ms per image for the distortion alone, single process, on the
first reference) and, as the last stdout line, one JSON object with ``seconds``,
``images`` and ``images_per_s`` of the full run (distortion + PNG writing, ``workers``
processes), plus ``cpu_seconds`` (all processes: on a busy machine wall time overstates
the cost). The output goes to a temporary folder that is deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from grmpiqa.data import distortions, synth
from grmpiqa.images import is_image_file, load_image


def _default_pristine() -> Path:
    env = os.environ.get("GRMPIQA_SHARED_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return base / "pristine" / "kodak"


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pristine", type=Path, default=_default_pristine())
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--levels", type=int, default=5)
    ap.add_argument("--types", nargs="+", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write here and keep the output")
    ap.add_argument("--no-table", action="store_true", help="skip the per-type table")
    ap.add_argument("--progress", action="store_true", help="show the progress bar")
    args = ap.parse_args()
    if not args.pristine.is_dir():
        print(f"{args.pristine}: pristine folder not found", file=sys.stderr)
        return 1
    names = distortions.resolve_types(args.types)
    files = sorted(p for p in args.pristine.iterdir() if is_image_file(p))

    if not args.no_table:
        img = np.asarray(load_image(files[0]))
        print(f"per-type distortion time on {files[0].name} ({img.shape[1]}x{img.shape[0]}):")
        print(f"{'id':>2}  {'type':<28} {'ms/img':>7}")
        for name in names:
            t0 = time.perf_counter()
            for level in range(1, args.levels + 1):
                distortions.apply_distortion(
                    img, name, level, seed=args.seed, ref=1, levels=args.levels
                )
            ms = (time.perf_counter() - t0) / args.levels * 1000
            print(f"{distortions.DISTORTIONS[name].id:>2}  {name:<28} {ms:7.1f}")

    tmp = None
    out = args.keep
    if out is None:
        tmp = tempfile.mkdtemp(prefix="grmpiqa-synth-bench-")
        out = Path(tmp)
    load_before = os.getloadavg()[0]
    try:
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        res = synth.synthesize(
            args.pristine,
            out,
            types=names,
            levels=args.levels,
            seed=args.seed,
            workers=args.workers,
            progress=args.progress,
        )
        seconds = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
        size = sum(p.stat().st_size for p in (out / "images").iterdir())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{res.images} images from {res.references} references, {len(names)} types x "
        f"{args.levels} levels, workers={args.workers}, cpus={os.cpu_count()}: "
        f"{seconds:.1f} s, {res.images / seconds:.1f} images/s, {size / 2**20:.0f} MiB written; "
        f"CPU {cpu:.1f} s (all processes); load average before/after "
        f"{load_before:.1f}/{os.getloadavg()[0]:.1f}"
    )
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "images": res.images,
                "images_per_s": round(res.images / seconds, 2),
                "cpu_seconds": round(cpu, 2),
                "workers": args.workers,
                "references": res.references,
                "types": len(names),
                "levels": args.levels,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
