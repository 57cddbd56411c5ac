"""Scoring at scale on one machine: local vs Ray engine, resume cost, several adapters.

1. **Local vs Ray.** The same images (written as webdataset tar shards) scored by the
   local engine (DataLoader workers + the model in this process) and by the Ray Data
   engine (one actor with every CPU, a local Ray on 127.0.0.1), through the same plan of
   parts and batches. Throughput counts the scoring loop only (model already loaded
   here; Ray's start and the actor's model load are reported apart), steady state =
   from the first finished batch to the last. Ray overhead = Ray / local img/s.
2. **Resume.** ``--out-dir`` parts: the cost of a ``--resume`` that finds everything
   complete (plan + reading every part back), and of one that finds half the parts
   missing, relative to the full run.
3. **Several adapters in one pass.** K stage-2 checkpoints fine-tuned from one stage-1
   model (last ``finetune_blocks`` image blocks, ln_post, text context changed): one
   BatchScorer with K columns (frozen blocks once) vs K separate scorers, model only,
   on the same preprocessed batch; max |difference| of the scores.

ViT-B-16-quickgelu with RANDOM weights by default (speed does not depend on values).

Usage:
    python benchmarks/scale_scoring.py [--images 64] [--shards 4] [--batch-size 16]
        [--backbone ViT-B-16-quickgelu] [--adapters 4] [--skip-ray]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import grmpiqa
from grmpiqa.scoring.engine import BatchScorer, score_pending
from grmpiqa.scoring.inputs import collect, plan_parts
from grmpiqa.scoring.outputs import Columns, PartsSink

CLIVE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "clive-dev" / "ChallengeDB_release"
)


def make_shards(folder: Path, n_images: int, n_shards: int) -> str:
    """CLIVE images (500x500 JPEGs) when present, else generated 500x375 photos-like JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    clive = sorted((CLIVE / "Images").glob("*.JPG"))[:n_images] if CLIVE.is_dir() else []
    rng = np.random.default_rng(0)
    per = -(-n_images // n_shards)
    k = 0
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tf:
            for _ in range(per):
                if k >= n_images:
                    break
                if k < len(clive):
                    data = clive[k].read_bytes()
                else:
                    yy, xx = np.mgrid[0:375, 0:500]
                    base = np.stack([xx / 2, yy / 1.5, (xx + yy) / 3.5], -1)
                    arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(arr).save(buf, "JPEG", quality=90)
                    data = buf.getvalue()
                info = tarfile.TarInfo(f"img{k:06d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                k += 1
    return str(folder / f"shard-{{0000..{n_shards - 1:04d}}}.tar")


def timed_loop(results) -> dict[str, float]:
    t0 = time.perf_counter()
    n = sum(len(batch) for batch in results)
    wall = time.perf_counter() - t0
    return {"images": n, "wall_s": wall, "img_s": n / wall}


def bench_engines(args: argparse.Namespace, work: Path) -> dict[str, object]:
    pattern = make_shards(work / "shards", args.images, args.shards)
    parts = plan_parts(collect([pattern]))
    pending = [(p, list(range(len(p.items)))) for p in parts]
    t = time.perf_counter()
    model = grmpiqa.create_model(args.backbone, pretrained=None, config=grmpiqa.ModelConfig())
    load_s = time.perf_counter() - t
    scorer = BatchScorer(model, precision=args.precision)
    workers = max(0, min(4, (os.cpu_count() or 1) - 1))
    out: dict[str, object] = {"model_load_s": load_s, "workers": workers}
    # warm-up (one batch), then the measured local run (again after Ray: the mean counts)
    one = [(parts[0], list(range(min(args.batch_size, len(parts[0].items)))))]
    local_one = timed_loop(score_pending(scorer, one, args.batch_size, num_workers=0))
    local_runs = [timed_loop(score_pending(scorer, pending, args.batch_size, num_workers=workers))]
    # resume cost with the local engine and --out-dir parts
    cols = Columns(("score",), key=True, error=True)
    fp = {"bench": 1}
    t = time.perf_counter()
    sink = PartsSink(work / "out", "csv", parts, cols, fp)
    for batch in score_pending(scorer, sink.pending(), args.batch_size, num_workers=workers):
        sink.add(batch)
    sink.finish()
    full_s = time.perf_counter() - t
    t = time.perf_counter()
    sink = PartsSink(work / "out", "csv", plan_parts(collect([pattern])), cols, fp, resume=True)
    assert sink.pending() == []
    sink.finish()
    noop_s = time.perf_counter() - t
    for p in parts[::2]:
        (work / "out" / f"{p.name}.csv").unlink()
    t = time.perf_counter()
    sink = PartsSink(work / "out", "csv", plan_parts(collect([pattern])), cols, fp, resume=True)
    todo = sink.pending()
    for batch in score_pending(scorer, todo, args.batch_size, num_workers=workers):
        sink.add(batch)
    sink.finish()
    half_s = time.perf_counter() - t
    out["resume"] = {
        "full_run_s": full_s,
        "resume_nothing_left_s": noop_s,
        "resume_nothing_left_fraction": noop_s / full_s,
        "parts_rescored": len(todo),
        "parts": len(parts),
        "resume_half_missing_s": half_s,
        "resume_half_missing_fraction": half_s / full_s,
    }
    if not args.skip_ray:
        from grmpiqa.scoring.ray import RaySession, score_pending_ray

        t = time.perf_counter()
        session = RaySession(None)
        out["ray_start_s"] = time.perf_counter() - t
        try:
            kw = {"backbone": args.backbone, "pretrained": "random", "precision": args.precision}
            # one batch: the actor's fixed cost (process, imports, model load) + one batch
            ray_one = timed_loop(score_pending_ray(one, kw, args.batch_size))
            ray_all = timed_loop(score_pending_ray(pending, kw, args.batch_size))
        finally:
            session.close()
        fixed = max(0.0, ray_one["wall_s"] - local_one["wall_s"])
        out["ray"] = {**ray_all, "actor_fixed_s": fixed}
        out["ray_over_local_with_start"] = (
            np.mean([r["wall_s"] for r in local_runs]) + load_s
        ) / ray_all["wall_s"]
        out["ray_over_local_marginal"] = np.mean([r["wall_s"] for r in local_runs]) / (
            ray_all["wall_s"] - fixed
        )
        local_runs.append(
            timed_loop(score_pending(scorer, pending, args.batch_size, num_workers=workers))
        )
    out["local"] = {
        "images": local_runs[0]["images"],
        "wall_s": float(np.mean([r["wall_s"] for r in local_runs])),
        "img_s": float(np.mean([r["img_s"] for r in local_runs])),
        "runs_wall_s": [r["wall_s"] for r in local_runs],
    }
    return out


def bench_adapters(args: argparse.Namespace, work: Path) -> dict[str, object]:
    cfg = grmpiqa.ModelConfig()
    base = grmpiqa.create_model(args.backbone, pretrained=None, config=cfg)
    ckpts = []
    for k in range(args.adapters):
        m = base if k == 0 else grmpiqa.create_model(args.backbone, pretrained=None, config=cfg)
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for p in m.set_trainable(grmpiqa.STAGE2_GROUPS):
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        ckpts.append(grmpiqa.save_checkpoint(m, work / f"adapter{k}.safetensors"))
        if k:
            del m
    del base
    models = [grmpiqa.create_model(checkpoint=c) for c in ckpts]
    x = torch.rand(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    x = models[0].preprocess.preprocess_tensor(x)
    together = BatchScorer(models, precision=args.precision)
    alone = [BatchScorer(m, precision=args.precision) for m in models]
    together.score_tensor(x[:2])
    for s in alone:
        s.score_tensor(x[:2])
    res: dict[str, list[float]] = {"together": [], "separate": []}
    diff = 0.0
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        t = time.perf_counter()
        a = together.score_tensor(x)
        res["together"].append(time.perf_counter() - t)
        t = time.perf_counter()
        b = torch.cat([s.score_tensor(x) for s in alone], 1)
        res["separate"].append(time.perf_counter() - t)
        diff = max(diff, float((a - b).abs().max()))
    best_t, best_s = min(res["together"]), min(res["separate"])
    return {
        "adapters": args.adapters,
        "shared_blocks": together.split,
        "blocks": models[0].image_tower.n_blocks,
        "together_s": best_t,
        "separate_s": best_s,
        "speedup": best_s / best_t,
        "max_abs_diff": diff,
        "images": args.batch_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--backbone", default="ViT-B-16-quickgelu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-adapters", action="store_true")
    ap.add_argument("--only-adapters", action="store_true", help="skip engines and resume")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grmpiqa-scale-"))
    result: dict[str, object] = {
        "backbone": args.backbone,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    try:
        if not args.only_adapters:
            result.update(bench_engines(args, work))
        if not args.skip_adapters:
            result["adapters"] = bench_adapters(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'configuration':<36} {'img/s':>8} {'wall s':>8}")
    for name in ("local", "ray"):
        r = result.get(name)
        if isinstance(r, dict):
            label = name + " engine"
            print(f"{label:<36} {r['img_s']:8.2f} {r['wall_s']:8.1f}")
    if "ray_over_local_marginal" in result:
        ray_r = result["ray"]
        assert isinstance(ray_r, dict)
        print(
            f"Ray / local throughput: {result['ray_over_local_marginal']:.2f} past the actor's "
            f"fixed {ray_r['actor_fixed_s']:.1f} s; {result['ray_over_local_with_start']:.2f} "
            f"counting actor start and model loads (Ray start {result['ray_start_s']:.1f} s)"
        )
    rs = result.get("resume")
    if isinstance(rs, dict):
        print(
            f"resume, nothing left: {rs['resume_nothing_left_s']:.2f} s "
            f"({rs['resume_nothing_left_fraction']:.3f} of a full run); half the parts "
            f"missing: {rs['resume_half_missing_fraction']:.2f} of a full run"
        )
    ad = result.get("adapters")
    if isinstance(ad, dict):
        print(
            f"{ad['adapters']} adapters, blocks 0-{(ad['shared_blocks'] or 0) - 1} shared: "
            f"{ad['together_s']:.2f} s in one pass vs {ad['separate_s']:.2f} s separately = "
            f"{ad['speedup']:.2f}x, max |diff| {ad['max_abs_diff']:.1e}"
        )
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
