"""Scoring speed against the hardware limit, in one process (issue 12, item 1).

ViT-B-16-quickgelu with RANDOM weights (speed does not depend on the values):

1. the machine's matmul rate (4096^3, fp32 and bf16), the reference for everything else;
2. model only, one batch (default 32), configurations measured interleaved (the fastest
   repetition of each is kept): plain open_clip ``encode_image`` in fp32, under bf16
   autocast and with bf16 weights (optionally ``torch.compile``), and the prompted model
   (grmpiqa's image tower with 100 VPT tokens) in fp32, in its bf16 policy, and as
   scoring runs it (the policy on frozen bf16 matrix weights, bit-identical);
   throughput, GFLOP/s and the fraction of the bf16 matmul rate, counting both the
   issue's nominal 53.9 GFLOP per image (297 tokens, every row) and the 36.2 GFLOP the
   exact fast path executes (prompt rows as keys/values only, CLS-only last block);
3. the configuration ``--precision auto`` picks here, and bf16 vs fp32 scores on CLIVE;
4. end to end (decode, resize, model: ``BatchScorer`` with DataLoader workers, the
   engine of ``grmpiqa score``) against model only on the same images, for CLIVE (500 px
   JPEG/BMP) and for generated 12-megapixel JPEGs, with the reduced-scale JPEG decode
   and without; and how far the reduced decode moves the scores.

Usage:
    python benchmarks/score_throughput.py [--batch 32] [--reps 2] [--workers 1]
        [--clive-images 64] [--big-images 16] [--compile] [--threads N]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _timing import matmul_tflops
from PIL import Image

import grmpiqa
from grmpiqa.pipeline import load_pixels
from grmpiqa.precision import autocast, describe_choice, resolve_precision
from grmpiqa.scoring import BatchScorer

CLIVE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "clive-dev" / "ChallengeDB_release"
)
KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "pristine" / "kodak"
BACKBONE = "ViT-B-16-quickgelu"
W, HEADS, MLP, BLOCKS, PATCHES, PROMPTS = 768, 12, 3072, 12, 196, 100


def vit_gflop(q_rows: list[int], kv_rows: int) -> float:
    """GFLOP of the patch embedding and the blocks (queries on ``q_rows[i]`` rows of block
    i, keys/values on ``kv_rows``); 2 FLOP per multiply-add."""
    f = 2.0 * PATCHES * 3 * 16 * 16 * W
    for q in q_rows:
        f += 2 * q * W * W + 2 * kv_rows * W * 2 * W  # Q; K and V
        f += 2 * 2 * q * kv_rows * W  # scores and weighted values
        f += 2 * q * W * W + 2 * 2 * q * W * MLP  # output projection; MLP
    return f / 1e9


PLAIN_GFLOP = vit_gflop([197] * BLOCKS, 197)
NOMINAL_GFLOP = vit_gflop([197 + PROMPTS] * BLOCKS, 197 + PROMPTS)  # every row computed
FAST_GFLOP = vit_gflop([197] * (BLOCKS - 1) + [1], 197 + PROMPTS)  # what the tower runs


def interleave(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Fastest seconds per call of each function, calls alternating, after a warm-up."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def big_jpegs(folder: Path, n: int) -> list[Path]:
    """``n`` 4000x3000 JPEGs (12 MP) upscaled from Kodak photos (or from noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(KODAK.glob("*.png")) if KODAK.is_dir() else []
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if sources:
            img = Image.open(sources[i % len(sources)]).convert("RGB")
        else:
            img = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
        if img.height > img.width:
            img = img.rotate(90, expand=True)
        path = folder / f"big{i:03d}.jpg"
        img.resize((4000, 3000), Image.Resampling.BICUBIC).save(path, quality=92)
        out.append(path)
    return out


def end_to_end(
    model: grmpiqa.QualityModel,
    paths: list[Path],
    precision: str,
    batch: int,
    workers: int,
    reduced: bool,
) -> dict[str, float]:
    """img/s of decode + preprocess + model through the engine, and of the model alone on
    the same preprocessed images; plus the scores."""
    scorer = BatchScorer(model, precision=precision, reduced_decode=reduced)
    t0 = time.perf_counter()
    scores = torch.cat(
        [b.scores[:, 0] for b in scorer.iter_batches(paths, batch, num_workers=workers)]
    )
    e2e = time.perf_counter() - t0
    x = load_pixels(paths, model.preprocess, reduced_decode=reduced)
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        scorer.score_tensor(x[s : s + batch])
    model_only = time.perf_counter() - t0
    return {
        "e2e_img_s": len(paths) / e2e,
        "model_img_s": len(paths) / model_only,
        "ratio": model_only / e2e,
        "scores": scores,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=max(0, min(4, (os.cpu_count() or 1) - 1)))
    ap.add_argument("--clive-images", type=int, default=64)
    ap.add_argument("--big-images", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="also try torch.compile (plain)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    summary: dict[str, object] = {"threads": torch.get_num_threads(), "batch": args.batch}

    rate = {"fp32": matmul_tflops(torch.float32), "bf16": matmul_tflops(torch.bfloat16)}
    summary["matmul_tflops"] = rate
    print(
        f"matmul 4096^3: fp32 {rate['fp32']:.3f}, bf16 {rate['bf16']:.3f} TFLOP/s; "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}"
    )

    # the GRMP-IQA model (learned context, 100 VPT tokens), not the zero-shot default
    model = grmpiqa.create_model(BACKBONE, pretrained=None, config=grmpiqa.ModelConfig()).eval()
    clip = model.clip
    clip_bf16 = copy.deepcopy(clip).to(torch.bfloat16)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    xb = x.to(torch.bfloat16)
    tower = model.image_tower
    frozen = BatchScorer(model, precision="bf16")

    def under(precision: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode(), autocast(model.device, precision):
                return fn()

        return run

    configs: dict[str, Callable[[], object]] = {
        "plain fp32": under("fp32", lambda: clip.encode_image(x)),
        "plain bf16 autocast": under("bf16", lambda: clip.encode_image(x)),
        "plain bf16 weights": under("fp32", lambda: clip_bf16.encode_image(xb)),
        "prompted fp32": under("fp32", lambda: tower(x)),
        "prompted bf16 (grmpiqa policy)": under("bf16", lambda: tower(x)),
        # what scoring runs: the same policy on a copy whose matrix weights are stored in
        # bf16 (bit-identical scores, no per-batch casts of frozen weights; issue 19)
        "prompted bf16, frozen bf16 weights (scoring)": lambda: frozen.score_tensor(x),
    }
    if args.compile:
        compiled = torch.compile(clip_bf16.visual)
        configs["plain bf16 weights + torch.compile"] = under("fp32", lambda: compiled(xb))
    seconds = interleave(configs, args.reps)
    rows = {k: args.batch / v for k, v in seconds.items()}
    best_plain = max((v, k) for k, v in rows.items() if k.startswith("plain"))
    prompted = rows["prompted bf16, frozen bf16 weights (scoring)"]
    print(f"\nmodel only, batch {args.batch}:")
    print(f"{'configuration':46s} {'img/s':>7s} {'GFLOP/s':>8s} {'of bf16 peak':>13s}")
    for k, v in rows.items():
        gflop = PLAIN_GFLOP if k.startswith("plain") else NOMINAL_GFLOP
        print(f"{k:46s} {v:7.2f} {v * gflop:8.0f} {v * gflop / (rate['bf16'] * 1e3):13.2f}")
    summary["model_only_img_s"] = rows
    summary["gflop_per_image"] = {
        "plain": PLAIN_GFLOP,
        "prompted_nominal": NOMINAL_GFLOP,
        "prompted_executed": FAST_GFLOP,
    }
    summary["prompted_over_fastest_plain"] = prompted / best_plain[0]
    summary["fastest_plain"] = best_plain[1]
    summary["flop_fraction_nominal"] = prompted * NOMINAL_GFLOP / (rate["bf16"] * 1e3)
    summary["flop_fraction_executed"] = prompted * FAST_GFLOP / (rate["bf16"] * 1e3)
    chosen = resolve_precision("auto", "cpu")
    summary["auto_precision"] = describe_choice("auto", "cpu")
    print(
        f"prompted bf16 as scored / fastest plain ({best_plain[1]}): "
        f"{summary['prompted_over_fastest_plain']:.2f}; fraction of the bf16 matmul rate: "
        f"{summary['flop_fraction_nominal']:.2f} at the nominal {NOMINAL_GFLOP:.1f} GFLOP/img, "
        f"{summary['flop_fraction_executed']:.2f} at the executed {FAST_GFLOP:.1f}"
    )
    print(f"--precision auto picks: {summary['auto_precision']}")

    e2e: dict[str, dict[str, float]] = {}
    if CLIVE.is_dir() and args.clive_images:
        paths = sorted((CLIVE / "Images").glob("*.*"))[: args.clive_images]
        fp32 = model.score(paths, args.batch, precision="fp32")
        bf16 = model.score(paths, args.batch, precision="bf16")
        summary["clive_bf16_vs_fp32_max_abs"] = float((fp32 - bf16).abs().max())
        r = end_to_end(model, paths, chosen, args.batch, args.workers, reduced=True)
        e2e["clive"] = {k: v for k, v in r.items() if k != "scores"}
        print(
            f"CLIVE ({len(paths)} images): bf16 vs fp32 scores max |diff| "
            f"{summary['clive_bf16_vs_fp32_max_abs']:.4f}"
        )
    if args.big_images:
        with tempfile.TemporaryDirectory() as tmp:
            paths = big_jpegs(Path(tmp), args.big_images)
            red = end_to_end(model, paths, chosen, args.batch, args.workers, reduced=True)
            full = end_to_end(model, paths, chosen, args.batch, args.workers, reduced=False)
            dx = max(
                float(
                    (
                        load_pixels([p], model.preprocess)
                        - load_pixels([p], model.preprocess, reduced_decode=True)
                    )
                    .abs()
                    .mean()
                )
                for p in paths
            )
        e2e["12mp_reduced_decode"] = {k: v for k, v in red.items() if k != "scores"}
        e2e["12mp_full_decode"] = {k: v for k, v in full.items() if k != "scores"}
        summary["12mp_reduced_vs_full_max_abs_score"] = float(
            (red["scores"] - full["scores"]).abs().max()
        )
        summary["12mp_reduced_vs_full_mean_abs_input"] = dx
    summary["end_to_end"] = e2e
    if e2e:
        print(f"\nend to end ({args.workers} DataLoader worker(s), precision {chosen}):")
        print(f"{'images':24s} {'e2e img/s':>10s} {'model img/s':>12s} {'ratio':>6s}")
        for k, r in e2e.items():
            print(f"{k:24s} {r['e2e_img_s']:10.2f} {r['model_img_s']:12.2f} {r['ratio']:6.2f}")
    if "12mp_reduced_vs_full_max_abs_score" in summary:
        print(
            "12 MP JPEGs, reduced vs full decode: max |score diff| "
            f"{summary['12mp_reduced_vs_full_max_abs_score']:.5f}, mean |input diff| "
            f"{summary['12mp_reduced_vs_full_mean_abs_input']:.4f} (normalised units)"
        )
    summary["loadavg"] = os.getloadavg()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
