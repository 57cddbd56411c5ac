"""bf16 vs fp32 on the three hot paths, measured in one process (issue 9, item 3).

ViT-B-16-quickgelu with RANDOM weights (speed does not depend on the values):

1. scoring: the prompted forward of a preprocessed batch (default 32) in eval mode;
2. a stage-1 inner step: forward, backward and an Adam step on a support batch with the
   prompts trainable (method.md 6);
3. a cached stage-2 epoch: 50 shots from the frozen-feature cache (blocks 8..11 and the
   head), two backward passes, the gradient rule and an SGD step (method.md 7).

fp32 and bf16 repetitions alternate, so both see the same machine load; the fastest
repetition of each is reported (the least disturbed one), medians too. bf16 means the
policy of grmpiqa.precision: matmuls in bf16 under autocast, fp32 residual stream.

Usage:
    python benchmarks/precision_speed.py [--reps 3] [--batch 32] [--support-batch 16]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from _timing import matmul_tflops

import grmpiqa
from grmpiqa.feature_cache import frozen_image_blocks
from grmpiqa.finetune import CachedShots, FinetuneConfig, Stage2Step
from grmpiqa.losses import quality_loss
from grmpiqa.precision import autocast, fast_bf16

BACKBONE = "ViT-B-16-quickgelu"


def interleave(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, calls alternating, after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="scoring batch")
    ap.add_argument("--support-batch", type=int, default=16, help="stage-1 support batch")
    ap.add_argument("--shots", type=int, default=50, help="stage-2 shots (one step per epoch)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=["score", "stage1", "stage2"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    gen = torch.Generator().manual_seed(0)
    model = grmpiqa.create_model(BACKBONE, pretrained=None, config=grmpiqa.ModelConfig())
    results: dict[str, dict[str, float]] = {}

    if "score" in args.only:
        model.eval()
        x = torch.randn(args.batch, 3, 224, 224, generator=gen)
        text = model.quality_text_features().detach()

        def score(precision: str) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode(), autocast(model.device, precision):
                    model.logits_from_features(model.encode_image(x), text)

            return run

        t = interleave({"fp32": score("fp32"), "bf16": score("bf16")}, args.reps)
        results["score"] = summarise(t, args.batch, "img/s")

    if "stage1" in args.only:
        model.set_trainable(grmpiqa.STAGE1_GROUPS)
        params = list(model.trainable_parameters().values())
        opt = torch.optim.Adam(params, lr=1e-4)
        xs = torch.randn(args.support_batch, 3, 224, 224, generator=gen)
        ys = torch.rand(args.support_batch, generator=gen)
        model.train()

        def inner(precision: str) -> Callable[[], None]:
            def run() -> None:
                opt.zero_grad(set_to_none=True)
                with autocast(model.device, precision):
                    logits = model(xs)
                quality_loss(logits, ys).backward()
                opt.step()

            return run

        t = interleave({"fp32": inner("fp32"), "bf16": inner("bf16")}, args.reps)
        results["stage1_inner_step"] = summarise(t, args.support_batch, "img/s")
        model.set_trainable(())

    if "stage2" in args.only:
        from PIL import Image

        imgs = [
            Image.fromarray(
                torch.randint(0, 256, (244, 244, 3), generator=gen, dtype=torch.uint8).numpy()
            )
            for _ in range(args.shots)
        ]
        y = torch.rand(args.shots, generator=gen)
        model.set_trainable(FinetuneConfig().groups)
        start = frozen_image_blocks(model)
        assert start is not None
        sources = {}
        for precision in ("fp32", "bf16"):
            cfg = FinetuneConfig(precision=precision, cache_augmentations=1, distill=True)
            # the teacher's logits only need to exist; the cost measured is the step
            teacher_logits = torch.randn(args.shots, 9, generator=gen)
            src = CachedShots(model, imgs, y, cfg, start, teacher=None)
            src.cache.teacher_logits = teacher_logits.unsqueeze(1)
            sources[precision] = (src, Stage2Step(model, cfg))
        opt = torch.optim.SGD(sources["fp32"][1].params, lr=1e-3, weight_decay=1e-4)
        model.train()
        everyone = list(range(args.shots))

        def epoch(precision: str) -> Callable[[], None]:
            src, step = sources[precision]

            def run() -> None:
                lq, ls, _ = step.losses(src.batch(everyone, 1))
                step.step(opt, lq, ls)

            return run

        t = interleave({"fp32": epoch("fp32"), "bf16": epoch("bf16")}, args.reps)
        results["stage2_cached_epoch"] = summarise(t, 1, "epochs/s")
        results["stage2_cached_epoch"]["fp32_s_per_epoch"] = min(t["fp32"])
        results["stage2_cached_epoch"]["bf16_s_per_epoch"] = min(t["bf16"])

    rate32, rate16 = matmul_tflops(torch.float32, 2048), matmul_tflops(torch.bfloat16, 2048)
    print(
        f"bf16 available: {fast_bf16('cpu')[1]}; matmul 2048^3: fp32 {rate32:.2f} TFLOP/s, "
        f"bf16 {rate16:.2f} TFLOP/s; threads {torch.get_num_threads()}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'path':22s} {'fp32':>10s} {'bf16':>10s} {'bf16/fp32':>10s}  unit")
    for name, r in results.items():
        print(f"{name:22s} {r['fp32']:10.3f} {r['bf16']:10.3f} {r['speedup']:10.2f}  {r['unit']}")
    summary = {
        "results": results,
        "matmul_tflops": {"fp32": rate32, "bf16": rate16},
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(summary))


def summarise(t: dict[str, list[float]], items: int, unit: str) -> dict[str, float | str]:
    fp32, bf16 = items / min(t["fp32"]), items / min(t["bf16"])
    return {
        "fp32": fp32,
        "bf16": bf16,
        "speedup": bf16 / fp32,
        "median_speedup": statistics.median(
            a / b for a, b in zip(t["fp32"], t["bf16"], strict=True)
        ),
        "unit": unit,
    }


if __name__ == "__main__":
    main()
