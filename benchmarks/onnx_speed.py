"""Benchmark the ONNX export: onnxruntime against torch, images per second on this machine.

Usage::

    python benchmarks/onnx_speed.py [--backbone ViT-B-16-quickgelu] [--batch 8] [--iters 5]
                                    [--threads 2] [--plain]

Builds the model a GRMP-IQA checkpoint describes (learned text context, VPT-deep with 100
tokens; ``--plain``: the zero-shot model, no visual prompts) on RANDOM weights of the
backbone (the speed does not depend on the values), exports it with
``grmpiqa.export.export_onnx`` and times the same preprocessed batches through torch
(``inference_mode``, fp32, the exact fast path) and onnxruntime (CPU provider), each with
``--threads`` threads, after one warm-up batch. Prints a table and, as the last stdout
line, one JSON object (img/s for each, their ratio, max |p diff|, export seconds). On a
shared machine compare the ratio, not the absolute rates.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import grmpiqa
from grmpiqa.export import OnnxScorer, export_onnx


def _rate(fn, x: np.ndarray | torch.Tensor, iters: int) -> tuple[float, list[float]]:
    fn(x)  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return len(x) / float(np.median(times)), times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="ViT-B-16-quickgelu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plain", action="store_true", help="zero-shot model (no visual prompts)")
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    config = None if args.plain else grmpiqa.ModelConfig()
    model = grmpiqa.create_model(args.backbone, pretrained=None, config=config).eval()
    crop = model.preprocess.crop
    x = torch.randn(args.batch, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(model, path)
        export_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        scorer = OnnxScorer(model).eval()

        def run_torch(b: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return scorer(b).numpy()

        def run_ort(b: np.ndarray) -> np.ndarray:
            return session.run(["p"], {"image": b})[0]

        diff = float(np.abs(run_torch(x) - run_ort(x.numpy())).max())
        torch_rate, _ = _rate(run_torch, x, args.iters)
        ort_rate, _ = _rate(run_ort, x.numpy(), args.iters)
    kind = "zero-shot (no VPT)" if args.plain else "GRMP (VPT 100 tokens)"
    print(f"{args.backbone}, {kind}, batch {args.batch}, {args.threads} threads, fp32")
    print(f"{'engine':<14} {'img/s':>8}")
    print(f"{'torch':<14} {torch_rate:8.2f}")
    print(f"{'onnxruntime':<14} {ort_rate:8.2f}")
    print(f"onnxruntime / torch: {ort_rate / torch_rate:.2f}x; max |p diff| {diff:.2g}")
    print(
        json.dumps(
            {
                "backbone": args.backbone,
                "model": kind,
                "batch": args.batch,
                "threads": args.threads,
                "torch_img_s": round(torch_rate, 3),
                "onnxruntime_img_s": round(ort_rate, 3),
                "ratio": round(ort_rate / torch_rate, 3),
                "max_abs_diff": diff,
                "export_s": round(export_s, 1),
                "onnx_mb": round(size_mb, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
