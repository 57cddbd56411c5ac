"""Stage-2 fine-tuning speed: the released (uncached) path vs. the frozen-feature cache.

ViT-B-16-quickgelu with RANDOM weights (speed does not depend on the values; announced
on stderr), 50 shots (from CLIVE split seed 0 / index 0 when ../shared/data is present,
else 50 generated 500x500 images), all shots in one batch (one step per epoch), the
default lambda = 5 (two backward passes per step). Per precision (fp32, bf16 autocast):

1. ``paired`` (one subprocess): ``max_abs_loss_diff`` / ``max_abs_grad_diff`` between
   the cached and the uncached path for the same augmented view (prompt dropout off),
   then naive and cached epochs *interleaved* (1 warm-up + ``--paired-epochs`` each), so
   both see the same machine load; the headline ``naive_s_per_epoch``,
   ``cached_s_per_epoch`` and ``speedup`` use the fastest epoch of each (the one least
   disturbed by other processes; medians and the median of the per-pair ratios are
   reported too). The naive epoch includes the fresh augmentation of the 50 images,
   as in ``finetune``.
2. ``naive`` / ``cached`` (a fresh subprocess each): the whole ``grmpiqa.finetune`` loop
   for 1 + E epochs with one evaluation at the end: ``s_per_epoch`` (median of epochs
   2..), ``eval_s`` (the released schedule evaluates every 5 epochs:
   ``s_per_epoch_with_eval = s_per_epoch + eval_s / 5``), ``cache_build_s`` (the one-off
   cache: frozen blocks 0..7 and the teacher for K = 8 views per image plus the eval
   view), ``setup_s`` (decoding, teacher copy) and ``peak_rss_mib``.

Usage:
    python benchmarks/finetune_speed.py [--epochs 2] [--paired-epochs 3]
        [--precisions fp32 bf16] [--shots 50] [--cache-augmentations 8] [--device cpu]

The last stdout line is one JSON object: the first precision's figures at the top level
(``naive_s_per_epoch``, ``cached_s_per_epoch``, ``speedup``, ``cache_build_s``,
``max_abs_loss_diff``, ``precision``, peak memory), every measurement under ``runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIVE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "clive-dev" / "ChallengeDB_release"
)
BACKBONE = os.environ.get("GRMPIQA_BENCH_BACKBONE", "ViT-B-16-quickgelu")  # test-tiny: smoke test


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shots(n: int, workdir: Path) -> Any:
    """The training shots: CLIVE split (seed 0, index 0), else generated images."""
    from grmpiqa.data import load_dataset, make_split

    if CLIVE.is_dir():
        ds = load_dataset(f"clive:{CLIVE}")
        return make_split(ds, 0, 0, n).train(ds)
    rng = np.random.default_rng(0)
    rows = ["path,mos"]
    yy, xx = np.mgrid[0:500, 0:500]
    for i in range(n):
        base = np.stack([xx / 2, yy / 2, (xx + yy) / 4], -1) + rng.normal(0, 10 + i, (500, 500, 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(workdir / f"g{i}.png")
        rows.append(f"g{i}.png,{100 - i}")
    (workdir / "labels.csv").write_text("\n".join(rows) + "\n")
    return load_dataset(f"csv:{workdir / 'labels.csv'}")


def child_train(args: argparse.Namespace) -> dict[str, Any]:
    import grmpiqa
    from grmpiqa.finetune import FinetuneConfig, finetune

    with tempfile.TemporaryDirectory() as tmp:
        train = shots(args.shots, Path(tmp))
        t0 = time.perf_counter()
        model = grmpiqa.create_model(
            BACKBONE, pretrained=None, config=grmpiqa.ModelConfig(), device=args.device, seed=0
        )
        config = FinetuneConfig(
            max_epochs=1 + args.epochs,
            eval_every=1 + args.epochs,
            precision=args.precision,
            cache=args.child == "cached",
            cache_augmentations=args.cache_augmentations,
        )
        result = finetune(model, train, config, progress=False)
        total = time.perf_counter() - t0
    epochs = result.epoch_seconds
    timed = epochs[1:] or epochs
    eval_s = float(result.history[-1]["eval_seconds"])
    s_per_epoch = statistics.median(timed)
    return {
        "path": args.child,
        "precision": args.precision,
        "s_per_epoch": s_per_epoch,
        "epoch_seconds": epochs,
        "eval_s": eval_s,
        "s_per_epoch_with_eval": s_per_epoch + eval_s / 5,
        "cache_build_s": result.cache_build_s,
        "setup_s": total - sum(epochs) - eval_s - result.cache_build_s,
        "peak_rss_mib": peak_rss_mib(),
        "loss_q": result.history[-1]["loss_q"],
    }


def child_paired(args: argparse.Namespace) -> dict[str, Any]:
    """Loss/gradient agreement, then naive and cached epochs interleaved in one process,
    so both see the same machine load (one step per epoch, as ``finetune`` runs it)."""
    import grmpiqa
    from grmpiqa.feature_cache import (
        bank_view,
        frozen_image_blocks,
    )
    from grmpiqa.finetune import (
        CachedShots,
        FinetuneConfig,
        PixelShots,
        ShotBatch,
        Stage2Step,
        build_teacher,
    )
    from grmpiqa.precision import autocast

    with tempfile.TemporaryDirectory() as tmp:
        train = shots(args.shots, Path(tmp))
        model = grmpiqa.create_model(
            BACKBONE, pretrained=None, config=grmpiqa.ModelConfig(), device=args.device, seed=0
        )
        c = model.preprocess
        resample = Image.Resampling.BICUBIC
        images = [it.load().resize((c.resize, c.resize), resample) for it in train]
    config = FinetuneConfig(precision=args.precision, cache_augmentations=1)
    teacher = build_teacher(model, config.scene_prompts)
    model.set_trainable(config.groups)
    start = frozen_image_blocks(model)
    assert start is not None and model.visual is not None
    y = torch.tensor(train.labels, dtype=torch.float32)
    cached = CachedShots(model, images, y, config, start, teacher)
    naive = PixelShots(model, images, y, config, teacher)
    step = Stage2Step(model, config)
    everyone = list(range(len(images)))
    model.train()

    # 1. agreement for the same view, prompt dropout off (the cache's exactness condition)
    p_drop = model.visual.prompt_dropout.p
    model.visual.prompt_dropout.p = 0.0
    x = torch.stack([bank_view(model, im, 0, i, 0) for i, im in enumerate(images)])
    x = x.to(model.device)
    with autocast(model.device, args.precision):
        same_view = ShotBatch(y, model.encode_image(x), teacher(x).float())
    lq1, ls1, _ = step.losses(same_view)
    g1q, g1s = step.gradients(lq1, ls1)
    lq2, ls2, _ = step.losses(cached.batch(everyone, 1))
    g2q, g2s = step.gradients(lq2, ls2)
    assert ls1 is not None and ls2 is not None and g1s is not None and g2s is not None
    gdiff, gmax = 0.0, 0.0
    for a, b in zip([*g1q, *g1s], [*g2q, *g2s], strict=True):
        if a is not None and b is not None:
            gdiff = max(gdiff, float((a - b).abs().max()))
            gmax = max(gmax, float(a.abs().max()))
    loss_diff = max(
        abs(float(lq1.detach()) - float(lq2.detach())),
        abs(float(ls1.detach()) - float(ls2.detach())),
    )
    del g1q, g1s, g2q, g2s, lq1, ls1, lq2, ls2
    model.visual.prompt_dropout.p = p_drop

    # 2. interleaved epochs (released path: fresh crops, prompt dropout everywhere)
    opt = torch.optim.SGD(step.params, lr=config.lr, weight_decay=config.weight_decay)
    times: dict[str, list[float]] = {"naive": [], "cached": []}
    for epoch in range(1, args.paired_epochs + 2):
        t0 = time.perf_counter()
        lq, ls, _ = step.losses(naive.batch(everyone, epoch))
        step.step(opt, lq, ls)
        t1 = time.perf_counter()
        lq, ls, _ = step.losses(cached.batch(everyone, epoch))
        step.step(opt, lq, ls)
        t2 = time.perf_counter()
        if epoch > 1:  # the first round warms up
            times["naive"].append(t1 - t0)
            times["cached"].append(t2 - t1)
    return {
        "precision": args.precision,
        "naive_epoch_seconds": times["naive"],
        "cached_epoch_seconds": times["cached"],
        # the fastest epoch is the one least disturbed by other load on the machine
        "naive_s_per_epoch": min(times["naive"]),
        "cached_s_per_epoch": min(times["cached"]),
        "naive_median_s_per_epoch": statistics.median(times["naive"]),
        "cached_median_s_per_epoch": statistics.median(times["cached"]),
        "median_speedup": statistics.median(
            [n / c for n, c in zip(times["naive"], times["cached"], strict=True)]
        ),
        "max_abs_loss_diff": loss_diff,
        "max_abs_grad_diff": gdiff,
        "max_abs_grad": gmax,
        "loadavg": os.getloadavg(),
    }


def run_child(kind: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--precision",
        precision,
        "--epochs",
        str(args.epochs),
        "--shots",
        str(args.shots),
        "--cache-augmentations",
        str(args.cache_augmentations),
        "--device",
        args.device,
    ]
    print(f"# running {kind} {precision} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after a warm-up epoch")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--shots", type=int, default=50)
    p.add_argument("--cache-augmentations", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--paired-epochs", type=int, default=3, help="interleaved naive/cached epochs (after one)"
    )
    p.add_argument("--child", choices=["naive", "cached", "paired"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "paired":
        print(json.dumps(child_paired(args)))
        return
    if args.child:
        print(json.dumps(child_train(args)))
        return

    load_before = os.getloadavg()
    runs: dict[str, dict[str, Any]] = {}
    for prec in args.precisions:
        paired = run_child("paired", prec, args)
        naive = run_child("naive", prec, args)
        cached = run_child("cached", prec, args)
        runs[prec] = {
            "paired": paired,
            "naive_loop": naive,
            "cached_loop": cached,
            "naive_s_per_epoch": paired["naive_s_per_epoch"],
            "cached_s_per_epoch": paired["cached_s_per_epoch"],
            "speedup": paired["naive_s_per_epoch"] / paired["cached_s_per_epoch"],
            "loop_speedup_with_eval": naive["s_per_epoch_with_eval"]
            / cached["s_per_epoch_with_eval"],
            "cache_build_s": cached["cache_build_s"],
            "max_abs_loss_diff": paired["max_abs_loss_diff"],
        }
    print(
        f"# {BACKBONE} (RANDOM weights), {args.shots} shots, one step per epoch, lambda 5, "
        f"{'CLIVE' if CLIVE.is_dir() else 'generated'} images, device {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    print("# interleaved in one process (same load): seconds per epoch, fastest (median)")
    print(
        f"{'precision':9} {'naive':>15} {'cached':>15} {'speedup':>8} {'(median)':>8} "
        f"{'|dloss|':>9} {'|dgrad|':>9}"
    )
    for prec, r in runs.items():
        pr = r["paired"]
        naive_s = f"{pr['naive_s_per_epoch']:.2f} ({pr['naive_median_s_per_epoch']:.2f})"
        cached_s = f"{pr['cached_s_per_epoch']:.2f} ({pr['cached_median_s_per_epoch']:.2f})"
        print(
            f"{prec:9} {naive_s:>15} {cached_s:>15} {r['speedup']:7.2f}x "
            f"{pr['median_speedup']:7.2f}x {pr['max_abs_loss_diff']:9.1e} "
            f"{pr['max_abs_grad_diff']:9.1e}"
        )
    print("# whole finetune() loop, one fresh process per path")
    print(
        f"{'precision':9} {'path':7} {'s/epoch':>8} {'+eval/5':>8} {'eval s':>7} "
        f"{'cache s':>8} {'setup s':>8} {'peak MiB':>9}"
    )
    for prec, r in runs.items():
        for kind in ("naive_loop", "cached_loop"):
            c = r[kind]
            print(
                f"{prec:9} {c['path']:7} {c['s_per_epoch']:8.2f} "
                f"{c['s_per_epoch_with_eval']:8.2f} {c['eval_s']:7.2f} "
                f"{c['cache_build_s']:8.1f} {c['setup_s']:8.1f} {c['peak_rss_mib']:9.0f}"
            )
    head = args.precisions[0]
    h = runs[head]
    summary = {
        "benchmark": "finetune_speed",
        "backbone": BACKBONE,
        "weights": "random",
        "shots": args.shots,
        "data": "clive" if CLIVE.is_dir() else "generated",
        "device": args.device,
        "precision": head,
        "naive_s_per_epoch": h["naive_s_per_epoch"],
        "cached_s_per_epoch": h["cached_s_per_epoch"],
        "speedup": h["speedup"],
        "cache_build_s": h["cache_build_s"],
        "max_abs_loss_diff": h["max_abs_loss_diff"],
        "naive_peak_rss_mib": h["naive_loop"]["peak_rss_mib"],
        "cached_peak_rss_mib": h["cached_loop"]["peak_rss_mib"],
        "cache_augmentations": args.cache_augmentations,
        "runs": runs,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
