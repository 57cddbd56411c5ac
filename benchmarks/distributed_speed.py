"""Training over 1 and 2 processes (torch.distributed): speed-up and equality.

For each backbone (default: test-tiny and ViT-B-16-quickgelu, both with RANDOM weights,
announced on stderr; speed does not depend on the values) the same two jobs run once in
one process and once in ``--world`` processes (gloo on 127.0.0.1, ``torch.set_num_threads
(--threads)`` each, 1 by default), every run in fresh processes started with
``torch.multiprocessing`` (so both sides pay the same start-up):

* stage 1: one ``reptile`` meta-step, i.e. ``grmpiqa.pretrain`` for one epoch over one
  database of ``--tasks`` distortion types of generated KADID-style images
  (``--images-per-task`` each, support batch 4, query batch 4). Timed: the epoch's
  ``seconds`` from the run log (tasks, the all-reduce, the outer step; rank 0).
* stage 2: ``grmpiqa.finetune`` with the frozen-feature cache (K = 2 views), ``--shots``
  shots in one batch, lambda 5, ``--epochs`` epochs. Timed: the cache build (shared out
  over the ranks) and the median training epoch (rank 0, evaluations excluded).

Equality: ``s1_max_abs_diff`` is the largest difference between the two stage-1
checkpoints (0 means the same bits); ``s2_max_rel_diff`` the largest difference between
the two stage-2 checkpoints relative to their largest weight. Speed-up = time of 1
process / time of ``--world`` processes. On a machine shared with other jobs the wall
times are noisy and the processes may not get a core each: compare the ratios within
one run, and see the ``CPU s`` rows (CPU seconds of the whole ``pretrain`` / ``finetune``
call, set-up included, on the busiest rank), which measure how the work was divided
whatever the load.

``--device cuda`` runs the same with ``cpu:gloo,cuda:nccl`` and one GPU per process
(needs ``--world`` GPUs).

Usage:
    python benchmarks/distributed_speed.py [--backbones test-tiny ViT-B-16-quickgelu]
        [--world 2] [--threads 1] [--tasks 4] [--images-per-task 5] [--shots 8]
        [--epochs 3] [--device cpu]

The last stdout line is one JSON object: per backbone the times, speed-ups and
equality figures, plus the conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_data(root: Path, types: int) -> str:
    """A KADID-style set: 6 generated 256 px references x ``types`` distortions x 5 levels."""
    from grmpiqa.data.synth import synthesize

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    for i in range(6):
        f = rng.uniform(1, 4, 3)
        waves = np.stack(
            [np.sin(f[0] * xx / 40), np.cos(f[1] * yy / 40), np.sin(f[2] * (xx + yy) / 60)], -1
        )
        arr = (waves * 0.4 + 0.5) * 255 + rng.normal(0, 8, (256, 256, 3))
        (root / "pristine").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / "pristine" / f"{i}.png")
    names = ["gaussian_blur", "white_noise", "darken", "jpeg", "brighten", "pixelate"][:types]
    synthesize(root / "pristine", root / "kadid", types=names, progress=False)
    return f"kadid:{root / 'kadid'}"


def worker(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """One rank: a stage-1 meta-step and stage-2 epochs; rank 0 writes the figures."""
    torch.set_num_threads(job["threads"])
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import warnings

    import grmpiqa
    from grmpiqa.data import load_dataset, make_split
    from grmpiqa.finetune import FinetuneConfig, finetune
    from grmpiqa.log import RandomWeightsWarning
    from grmpiqa.metatrain import PretrainConfig, pretrain

    warnings.filterwarnings("ignore", category=RandomWeightsWarning)
    device = torch.device(job["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    if world > 1:
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=1800),
        )
    out = Path(job["out"])
    try:
        model = grmpiqa.create_model(
            job["backbone"], pretrained=None, config=grmpiqa.ModelConfig(), device=device
        )
        cfg = PretrainConfig(
            epochs=1,
            support_batch=4,
            query_batch=4,
            images_per_task=job["images_per_task"],
            max_tasks=job["tasks"],
        )
        s1 = out / "stage1.safetensors"
        cpu0 = time.process_time()
        pretrain(model, [job["spec"]], cfg, s1, progress=False, overwrite=True)
        cpu1 = time.process_time()
        ds = load_dataset(job["spec"])
        shots = make_split(ds, 0, 0, job["shots"]).train(ds)
        model = grmpiqa.create_model(
            job["backbone"], pretrained=None, config=grmpiqa.ModelConfig(), device=device
        )
        ft = FinetuneConfig(max_epochs=job["epochs"], eval_every=1000, cache_augmentations=2)
        cpu2 = time.process_time()
        res = finetune(model, shots, ft, out=out / "stage2.safetensors", progress=False)
        cpu3 = time.process_time()
        (out / f"cpu_{rank}.json").write_text(json.dumps({"s1": cpu1 - cpu0, "s2": cpu3 - cpu2}))
        if rank == 0:
            log = [json.loads(x) for x in s1.with_suffix(".log.jsonl").read_text().splitlines()]
            (out / "times.json").write_text(
                json.dumps(
                    {
                        "meta_step_s": [r for r in log if r.get("event") == "epoch"][0]["seconds"],
                        "cache_build_s": res.cache_build_s,
                        "epoch_s": res.epoch_seconds,
                    }
                )
            )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(job: dict[str, Any], world: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    mp.spawn(worker, args=(world, free_port(), job), nprocs=world, join=True)
    times = json.loads((Path(job["out"]) / "times.json").read_text())
    times["wall_s"] = time.perf_counter() - t0
    cpu = [json.loads((Path(job["out"]) / f"cpu_{r}.json").read_text()) for r in range(world)]
    times["cpu_s1"] = max(c["s1"] for c in cpu)  # the busiest rank
    times["cpu_s2"] = max(c["s2"] for c in cpu)
    return dict(times)


def compare(one: Path, two: Path) -> dict[str, float]:
    from grmpiqa.checkpoint import read_checkpoint

    a1, _ = read_checkpoint(one / "stage1.safetensors")
    b1, _ = read_checkpoint(two / "stage1.safetensors")
    a2, _ = read_checkpoint(one / "stage2.safetensors")
    b2, _ = read_checkpoint(two / "stage2.safetensors")
    scale = max(float(v.abs().max()) for v in a2.values())
    return {
        "s1_max_abs_diff": max(float((a1[k] - b1[k]).abs().max()) for k in a1),
        "s2_max_rel_diff": max(float((a2[k] - b2[k]).abs().max()) for k in a2) / scale,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["test-tiny", "ViT-B-16-quickgelu"])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--images-per-task", type=int, default=5)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    print(
        f"distributed_speed: 1 vs {args.world} processes, {args.threads} thread(s) each, "
        f"device {args.device}; RANDOM-weight backbones {', '.join(args.backbones)}",
        file=sys.stderr,
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_data(Path(tmp) / "data", args.tasks)
        for backbone in args.backbones:
            runs: dict[int, dict[str, Any]] = {}
            for world in (1, args.world):
                out = Path(tmp) / f"{backbone}-{world}"
                out.mkdir()
                job = {
                    "backbone": backbone,
                    "spec": spec,
                    "out": str(out),
                    "threads": args.threads,
                    "device": args.device,
                    "tasks": args.tasks,
                    "images_per_task": args.images_per_task,
                    "shots": args.shots,
                    "epochs": args.epochs,
                }
                runs[world] = run(job, world)
            eq = compare(Path(tmp) / f"{backbone}-1", Path(tmp) / f"{backbone}-{args.world}")
            one, many = runs[1], runs[args.world]
            # the first epoch warms up allocators; the median of the rest when there are any
            e1 = statistics.median(one["epoch_s"][1:] or one["epoch_s"])
            eN = statistics.median(many["epoch_s"][1:] or many["epoch_s"])
            results[backbone] = {
                "meta_step_s": {"1": one["meta_step_s"], str(args.world): many["meta_step_s"]},
                "meta_step_speedup": one["meta_step_s"] / many["meta_step_s"],
                "cache_build_s": {
                    "1": one["cache_build_s"],
                    str(args.world): many["cache_build_s"],
                },
                "cache_build_speedup": one["cache_build_s"] / many["cache_build_s"],
                "epoch_s": {"1": e1, str(args.world): eN},
                "epoch_speedup": e1 / eN,
                # CPU seconds of the whole call on the busiest rank (contention-proof)
                "cpu_s": {
                    "pretrain": {"1": one["cpu_s1"], str(args.world): many["cpu_s1"]},
                    "finetune": {"1": one["cpu_s2"], str(args.world): many["cpu_s2"]},
                },
                "cpu_speedup": {
                    "pretrain": one["cpu_s1"] / many["cpu_s1"],
                    "finetune": one["cpu_s2"] / many["cpu_s2"],
                },
                **eq,
            }
    print(
        f"{'backbone':<22} {'stage':<16} {'1 proc (s)':>11} {f'{args.world} procs (s)':>12} "
        f"{'speed-up':>9}"
    )
    for backbone, r in results.items():
        for stage, key in (
            ("s1 meta-step", "meta_step"),
            ("s2 cache build", "cache_build"),
            ("s2 epoch", "epoch"),
        ):
            t = r[f"{key}_s"]
            print(
                f"{backbone:<22} {stage:<16} {t['1']:>11.3f} {t[str(args.world)]:>12.3f} "
                f"{r[f'{key}_speedup']:>8.2f}x"
            )
        for call in ("pretrain", "finetune"):
            c = r["cpu_s"][call]
            print(
                f"{backbone:<22} {call + ' CPU s':<16} {c['1']:>11.3f} {c[str(args.world)]:>12.3f} "
                f"{r['cpu_speedup'][call]:>8.2f}x"
            )
        print(
            f"{backbone:<22} equality: stage 1 max |diff| {r['s1_max_abs_diff']:.3g}, "
            f"stage 2 max |diff| / max |w| {r['s2_max_rel_diff']:.3g}"
        )
    conditions = {
        "world": args.world,
        "threads_per_process": args.threads,
        "device": args.device,
        "backend": "cpu:gloo,cuda:nccl" if args.device.startswith("cuda") else "gloo",
        "tasks": args.tasks,
        "images_per_task": args.images_per_task,
        "shots": args.shots,
        "epochs": args.epochs,
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "random_weights": True,
    }
    print(json.dumps({"results": results, "conditions": conditions}))


if __name__ == "__main__":
    main()
