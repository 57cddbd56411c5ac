"""Scoring speed and cost of one full-size backbone per family (issue 22), RANDOM weights.

For each backbone: the prompted image forward of GRMP-IQA (visual prompts where the
family has them, 100 tokens as the paper; token-free trunks without), in eval mode, on a
batch of preprocessed images at the backbone's own input size, in fp32 and under the
bf16 policy of grmpiqa.precision (matmuls in bf16, fp32 residual stream); and GFLOP per
image of the plain image tower (2 FLOPs per multiply-add, counted on the meta device,
grmpiqa.backbones.catalog). Speed does not depend on the weights' values. fp32 and bf16
repetitions alternate so both see the same machine load; the fastest repetition is
reported (medians in the JSON).

Usage:
    python benchmarks/backbones.py [--reps 3] [--batch 8] [--threads N] [--only NAME ...]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import grmpiqa
from grmpiqa.backbones.catalog import gflops
from grmpiqa.precision import autocast

#: one full-size backbone per family (the paper's ViT-B/16 first)
BACKBONES = [
    "ViT-B-16-quickgelu",
    "ViT-B-16-SigLIP2",
    "vit_relpos_medium_patch16_cls_224",
    "EVA02-B-16",
    "convnext_base",
    "MobileCLIP2-S0",
    "swin_base_patch4_window7_224",
    "RN50",
]


def interleave(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def tokenizer_folder() -> str | None:
    """SigLIP's tokenizer is on the hub; offline a word-level stand-in saved locally is
    enough for speed (the text tower runs once per model)."""
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    import tempfile

    words = ["<pad>", "</s>", "<unk>", "x", "y", "high", "low", "quality", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    folder = tempfile.mkdtemp(prefix="grmpiqa-bench-tok-")
    fast.save_pretrained(folder)
    return folder


def measure(name: str, tok: str | None, args: argparse.Namespace) -> dict[str, object]:
    """One backbone: its prompted scoring forward in fp32 and bf16, and its GFLOP/img."""
    model = grmpiqa.create_model(name, pretrained=None, config=grmpiqa.ModelConfig(), tokenizer=tok)
    model.eval()
    s = model.preprocess.crop
    x = torch.randn(args.batch, 3, s, s, generator=torch.Generator().manual_seed(0))
    text = model.quality_text_features().detach()

    def run(precision: str) -> Callable[[], None]:
        def f() -> None:
            with torch.inference_mode(), autocast(model.device, precision):
                model.probabilities(model.encode_image(x), text)

        return f

    t = interleave({"fp32": run("fp32"), "bf16": run("bf16")}, args.reps)
    best = {k: args.batch / min(v) for k, v in t.items()}
    med = {k: args.batch / statistics.median(v) for k, v in t.items()}
    return {
        "backbone": name,
        "family": model.adapter.family,
        "visual_prompts": model.visual is not None,
        "vpt_tokens": model.image_tower.num_prompts,
        "input_size": s,
        "gflop_per_image": gflops(name),
        "fp32_img_s": round(best["fp32"], 2),
        "bf16_img_s": round(best["bf16"], 2),
        "fp32_img_s_median": round(med["fp32"], 2),
        "bf16_img_s_median": round(med["bf16"], 2),
        "bf16_over_fp32": round(best["bf16"] / best["fp32"], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="backbone names (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    tok = tokenizer_folder()
    rows = []
    print(
        f"{'backbone':34s} {'family':16s} {'VPT':>4s} {'size':>4s} {'GFLOP':>7s} "
        f"{'fp32 img/s':>10s} {'bf16 img/s':>10s} {'bf16/fp32':>9s}",
        flush=True,
    )
    for name in args.only or BACKBONES:
        if name not in grmpiqa.list_backbones():
            print(f"{name:34s} skipped (not available here)", flush=True)
            continue
        row = measure(name, tok if name.startswith("ViT-B-16-SigLIP") else None, args)
        rows.append(row)
        g = row["gflop_per_image"]
        print(
            f"{name:34s} {row['family']:16s} {row['vpt_tokens']:4d} {row['input_size']:4d} "
            f"{(f'{g:.1f}' if g is not None else '?'):>7s} {row['fp32_img_s']:10.2f} "
            f"{row['bf16_img_s']:10.2f} {row['bf16_over_fp32']:9.2f}",
            flush=True,
        )
    out = {
        "benchmark": "backbones",
        "batch": args.batch,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "weights": "random",
        "rows": rows,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
