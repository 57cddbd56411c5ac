"""Stage-1 meta-epoch speed and peak memory (method.md 6), fp32 vs bf16 autocast.

Builds a task set of ``--tasks`` distortion types x ``--images`` images (``grmpiqa
synth`` from Kodak photos when /work/shared/data is present, else generated images in
KADID-10k's layout), then times one meta-epoch of :func:`grmpiqa.pretrain` with a
randomly initialised ``ViT-B-16-quickgelu`` (announced; no pretrained weights are used
or needed: speed does not depend on the weights' values). Every precision runs in a
fresh subprocess so its peak RSS (``ru_maxrss``) is its own.

Usage::

    python benchmarks/pretrain_speed.py                       # 25 tasks x 20 images
    python benchmarks/pretrain_speed.py --tasks 3 --images 10 # a shrunk run
    python benchmarks/pretrain_speed.py --variant released    # the authors' step sizes

Batch sizes and inner passes are the variant's defaults (``VARIANT_DEFAULTS``) unless
given: ``reptile`` makes 3 passes with batches 16/4, ``released`` one with 75/50, so a
``reptile`` meta-epoch does three times the image passes of a ``released`` one.

Prints a table, then as the LAST stdout line one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FULL_TASKS, FULL_IMAGES = 25, 20


def _shared_data() -> Path:
    env = os.environ.get("GRMPIQA_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def build_task_set(out: Path, n_tasks: int, n_images: int, seed: int = 0) -> tuple[str, str]:
    """A KADID-layout set with ``n_tasks`` types of at least ``n_images`` images each."""
    kodak = _shared_data() / "pristine" / "kodak"
    levels = 5
    refs = max(1, math.ceil(n_images / levels))
    if kodak.is_dir() and n_tasks <= 25 and len(list(kodak.glob("*.png"))) >= refs:
        from grmpiqa.data.synth import synthesize

        pristine = out / "pristine"
        pristine.mkdir(parents=True)
        for p in sorted(kodak.glob("*.png"))[:refs]:
            os.symlink(p, pristine / p.name)
        synthesize(
            pristine,
            out / "set",
            types=[str(t) for t in range(1, n_tasks + 1)],
            levels=levels,
            seed=seed,
            progress=False,
        )
        return f"kadid:{out / 'set'}", f"grmpiqa synth, {refs} Kodak images x {levels} levels"
    rng = np.random.default_rng(seed)
    img_dir = out / "set" / "images"
    img_dir.mkdir(parents=True)
    rows = ["dist_img,ref_img,dmos,var"]
    for t in range(1, n_tasks + 1):
        for i in range(n_images):
            r, lv = i // levels + 1, i % levels + 1
            arr = rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)
            name = f"I{r:02d}_{t:02d}_{lv:02d}.png"
            Image.fromarray(arr).save(img_dir / name, compress_level=1)
            rows.append(f"{name},I{r:02d}.png,{5 - 4 * lv / levels:.2f},")
    (out / "set" / "dmos.csv").write_text("\n".join(rows) + "\n")
    return f"kadid:{out / 'set'}", "random 512x384 images (Kodak absent)"


def child(args: argparse.Namespace) -> None:
    """One configuration in this process; prints one JSON line."""
    import torch

    import grmpiqa

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = grmpiqa.create_model(
        args.backbone, pretrained=None, config=grmpiqa.ModelConfig(), seed=0
    )
    load_s = time.perf_counter() - t0
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_train = sum(p.numel() for p in model.set_trainable(grmpiqa.STAGE1_GROUPS))
    cfg = grmpiqa.PretrainConfig(
        epochs=1,
        variant=args.variant,
        inner_passes=args.inner_passes,
        support_batch=args.support_batch,
        query_batch=args.query_batch,
        precision=args.precision,
        images_per_task=args.images,
        max_tasks=args.tasks,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        result = grmpiqa.pretrain(
            model, [args.spec], cfg, Path(tmp) / "b.safetensors", progress=False
        )
        wall = time.perf_counter() - t1
    epoch = result.history[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "precision": args.precision,
                "seconds_per_epoch": round(epoch["seconds"], 2),
                "wall_seconds": round(wall, 2),
                "seconds_per_task": round(epoch["seconds"] / args.tasks, 2),
                "peak_rss_mib": round(peak, 1),
                "rss_after_model_mib": round(rss_model, 1),
                "model_load_seconds": round(load_s, 2),
                "query_loss": epoch["query_loss"],
                "trainable_params": n_train,
                "config": cfg.to_dict(),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=25, help="distortion types (default 25)")
    ap.add_argument("--images", type=int, default=20, help="images per task (default 20)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--backbone", default="ViT-B-16-quickgelu")
    ap.add_argument("--variant", default="reptile", choices=["reptile", "released"])
    ap.add_argument("--inner-passes", type=int, default=None, help="default: the variant's")
    ap.add_argument("--support-batch", type=int, default=None, help="default: the variant's")
    ap.add_argument("--query-batch", type=int, default=None, help="default: the variant's")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    rows = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        spec, source = build_task_set(Path(tmp), args.tasks, args.images)
        build_s = time.perf_counter() - t0
        for prec in args.precisions:
            cmd = [
                sys.executable, __file__, "--child", "--spec", spec, "--precision", prec,
                "--tasks", str(args.tasks), "--images", str(args.images),
                "--backbone", args.backbone, "--threads", str(args.threads),
                "--variant", args.variant,
            ]  # fmt: skip
            for flag, value in (
                ("--inner-passes", args.inner_passes),
                ("--support-batch", args.support_batch),
                ("--query-batch", args.query_batch),
            ):
                if value is not None:
                    cmd += [flag, str(value)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"benchmark child ({prec}) failed with exit {proc.returncode}")
            sys.stderr.write("".join(ln + "\n" for ln in proc.stderr.splitlines() if "WARN" in ln))
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            # A full-size epoch is 25 identical-shaped tasks of 20 images; from a shrunk
            # run, scale the per-task time (exact shapes when --images is 20).
            row["full_epoch_estimate_seconds"] = round(
                row["seconds_per_task"] * FULL_TASKS * FULL_IMAGES / args.images, 1
            )
            rows.append(row)

    n_s = math.floor(0.8 * args.images)
    conf = rows[0]["config"]
    print(
        f"Stage-1 meta-epoch, {args.backbone} (RANDOM weights), variant {args.variant}, "
        f"{args.tasks} tasks x {args.images} images ({n_s} support / {args.images - n_s} "
        f"query per task), {conf['inner_passes']} inner pass(es), batches "
        f"{conf['support_batch']}/{conf['query_batch']}; data: {source}"
    )
    full = args.tasks == FULL_TASKS and args.images == FULL_IMAGES
    print(
        f"{'precision':<10}{'s/epoch':>10}{'s/task':>9}{'25x20 s/epoch':>15}"
        f"{'peak RSS MiB':>14}{'threads':>9}"
    )
    for r in rows:
        est = f"{r['full_epoch_estimate_seconds']:.0f}" + ("" if full else " (est.)")
        print(
            f"{r['precision']:<10}{r['seconds_per_epoch']:>10.1f}{r['seconds_per_task']:>9.2f}"
            f"{est:>15}{r['peak_rss_mib']:>14.0f}{r['torch_threads']:>9}"
        )
    print(
        json.dumps(
            {
                "benchmark": "pretrain_speed",
                "backbone": args.backbone,
                "weights": "random",
                "tasks": args.tasks,
                "images_per_task": args.images,
                "variant": args.variant,
                "inner_passes": conf["inner_passes"],
                "support_batch": conf["support_batch"],
                "query_batch": conf["query_batch"],
                "data": source,
                "data_build_seconds": round(build_s, 1),
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "full_size_run": full,
                "load_average_before": load_before,
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
