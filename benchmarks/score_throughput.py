"""Scoring throughput: plain open_clip ``encode_image`` vs. the prompted QualityModel.

ViT-B-16-quickgelu with RANDOM weights (speed does not depend on the values), in one
process, fp32 and bf16 autocast, batch sizes 1/8/32. Peak memory is the process's RSS
high-water mark, reset before each configuration (Linux ``/proc/self/clear_refs``).

With ../shared/data/clive-dev present it also measures end to end scoring (decode +
preprocess in DataLoader workers + model) against model-only throughput on the same
images, and the largest |bf16 - fp32| score difference over those images.

Usage:
    python benchmarks/score_throughput.py [--iters 3] [--batch-sizes 1 8 32] [--workers 2]

The last stdout line is one JSON object (the bf16 batch-32 case plus the extras).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

import grmpiqa
from grmpiqa.precision import autocast
from grmpiqa.scoring import score_inputs, text_features

CLIVE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "clive-dev" / "ChallengeDB_release"
)


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def time_fn(fn, x: torch.Tensor, iters: int) -> tuple[float, float]:
    """images/s and peak RSS (MiB) of ``fn(x)`` over ``iters`` calls after one warm-up."""
    fn(x)
    reset_peak()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    dt = time.perf_counter() - t0
    return x.shape[0] * iters / dt, peak_mib()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for end to end")
    ap.add_argument("--e2e-images", type=int, default=128, help="CLIVE images for end to end")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = grmpiqa.create_model("ViT-B-16-quickgelu", pretrained=None)
    clip = model.clip

    def plain(x: torch.Tensor, precision: str) -> torch.Tensor:
        with autocast(model.device, precision):
            return clip.encode_image(x)

    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu={os.cpu_count()}")
    print(
        f"{'precision':>9} {'batch':>5} {'plain img/s':>12} {'prompted img/s':>15} {'ratio':>6} "
        f"{'plain MiB':>10} {'prompted MiB':>13}"
    )
    for precision in ("fp32", "bf16"):
        text = text_features(model, precision)

        def prompted(
            x: torch.Tensor, precision: str = precision, text: torch.Tensor = text
        ) -> torch.Tensor:
            with autocast(model.device, precision):
                return model.logits_from_features(model.encode_image(x), text)

        for bs in args.batch_sizes:
            x = torch.randn(bs, 3, 224, 224)
            iters = max(1, args.iters if bs >= 8 else args.iters * 4)
            p_ips, p_mem = time_fn(functools.partial(plain, precision=precision), x, iters)
            q_ips, q_mem = time_fn(prompted, x, iters)
            row = {
                "precision": precision,
                "batch_size": bs,
                "plain_img_s": round(p_ips, 2),
                "prompted_img_s": round(q_ips, 2),
                "ratio": round(q_ips / p_ips, 3),
                "plain_peak_mib": round(p_mem),
                "prompted_peak_mib": round(q_mem),
            }
            results.append(row)
            print(
                f"{precision:>9} {bs:>5} {p_ips:>12.2f} {q_ips:>15.2f} {q_ips / p_ips:>6.3f} "
                f"{p_mem:>10.0f} {q_mem:>13.0f}",
                flush=True,
            )

    pick = next(
        (r for r in results if r["precision"] == "bf16" and r["batch_size"] == 32), results[-1]
    )
    summary: dict[str, object] = dict(pick)
    summary["table"] = results

    if CLIVE.is_dir():
        paths = sorted(p for p in (CLIVE / "Images").glob("*") if p.is_file())[: args.e2e_images]
        bs = 32
        for precision in ("bf16",):
            pre = torch.stack(
                [model.preprocess.eval_transform()(grmpiqa.images.load_image(p)) for p in paths]
            )
            text = text_features(model, precision)

            @torch.inference_mode()
            def model_only(
                x: torch.Tensor, precision: str = precision, text: torch.Tensor = text
            ) -> None:
                for i in range(0, len(x), bs):
                    with autocast(model.device, precision):
                        model.logits_from_features(model.encode_image(x[i : i + bs]), text)

            model_only(pre[:bs])
            t0 = time.perf_counter()
            model_only(pre)
            mo = len(paths) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.score(paths, batch_size=bs, precision=precision, num_workers=args.workers)
            e2e = len(paths) / (time.perf_counter() - t0)
            print(
                f"end to end ({precision}, batch {bs}, {args.workers} workers, "
                f"{len(paths)} CLIVE images): "
                f"{e2e:.2f} img/s vs model only {mo:.2f} img/s (ratio {e2e / mo:.3f})"
            )
            summary.update(
                e2e_img_s=round(e2e, 2),
                model_only_img_s=round(mo, 2),
                e2e_ratio=round(e2e / mo, 3),
                e2e_workers=args.workers,
                e2e_images=len(paths),
            )
        sub = paths[:64]
        s32 = score_inputs(model, sub, batch_size=bs, precision="fp32")
        s16 = score_inputs(model, sub, batch_size=bs, precision="bf16")
        diff = float((s32 - s16).abs().max())
        print(f"max |bf16 - fp32| score over {len(sub)} CLIVE images: {diff:.5f}")
        summary["bf16_max_abs_score_diff"] = round(diff, 6)
    else:
        print("../shared/data/clive-dev absent: no end-to-end figure", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
