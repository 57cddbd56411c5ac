"""The accelerator suite of issue 19: one command, at most 5 minutes on one GPU.

    python benchmarks/gpu_suite.py                          # the device auto picks (a GPU)
    python benchmarks/gpu_suite.py --device cpu --small     # CI-sized, on the CPU

ViT-B-16-quickgelu with RANDOM weights (speed does not depend on the values), in one
process unless stated:

1. the machine: device, GPU, torch/torchvision versions; the dense matmul rate (bf16,
   and fp32/TF32), the reference for the model figures;
2. model only, one batch (256; 8 with ``--small``): plain open_clip ``encode_image`` in
   fp32, under bf16 autocast and with bf16 weights (+ ``torch.compile`` with
   ``--compile``, on by default on CUDA), and the prompted model (grmpiqa's tower, 100
   VPT tokens) in fp32, in the bf16 policy with autocast over fp32 weights, and as
   scoring runs it (bf16 frozen weights; + ``torch.compile``): img/s, TFLOP/s at the
   executed 36.2 GFLOP per image, the fraction of the bf16 matmul rate and prompted /
   fastest plain (goals on an H200-class GPU: >= 0.9 and >= 0.45);
3. end to end (``BatchScorer.iter_batches``: the image pipeline with DataLoader workers,
   then the model) per decoder (``pil``, ``torch``: nvJPEG on CUDA) on generated 500-px
   JPEGs, on CLIVE's JPEGs (../shared/data) and on generated 12-megapixel JPEGs, against
   model only at the same batch size (goal on a GPU: >= 0.75); peak GPU memory;
4. worker scaling with the tiny backbone (decoding dominates), on 500-px and 12-MP
   JPEGs: end to end with 1 and 2 (CPU; one torch thread in the main process) or 1, 4,
   8, 16 (GPU) workers, best of interleaved repetitions, and the CPU milliseconds per
   image in the workers (W) and the main process (M), with the speed-up 2 idle cores
   allow, 2W / (W + M) (goal on the 2-core CPU: 2 workers >= 1.7x 1);
5. the decoders agree: max |score difference| torch vs pil on CLIVE (all images; a
   subset with ``--small``), and the torch path's batch-size invariance;
6. ``grmpiqa score DIR`` wall time on N images in a fresh process (start, model load,
   scoring; what a user waits for), with the device and precision it announced;
7. the training figures of the companion issue (21), when ``benchmarks/gpu_training.py``
   exists: its ``training_figures(device: str, small: bool) -> dict`` is called and its
   numbers (a flat dict of figures) are printed and kept in the JSON.

Sections 5, 6 and 4 run in that order after 3; whatever would start past 85% of
``--max-seconds`` (300 on a GPU, 1800 on the CPU) is skipped and says so, and a section
that fails records its error instead of stopping the suite. The last stdout line is one
JSON object (``--json FILE`` also writes it to FILE).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import grmpiqa
from grmpiqa.pipeline import describe_device, resolve_device
from grmpiqa.precision import autocast
from grmpiqa.scoring import BatchScorer

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
CLIVE = DATA / "clive-dev" / "ChallengeDB_release" / "Images"
KODAK = DATA / "pristine" / "kodak"
BACKBONE = "ViT-B-16-quickgelu"
#: the GRMP-IQA model: learned text context and 100 VPT tokens (without a config and a
#: checkpoint create_model gives the zero-shot CLIP-IQA prompts, no visual prompts)
PROMPTED = grmpiqa.ModelConfig()
W, MLP, BLOCKS, PATCHES, PROMPTS = 768, 3072, 12, 196, 100


def vit_gflop(q_rows: list[int], kv_rows: int) -> float:
    """GFLOP of the patch embedding and the blocks of ViT-B/16 (2 FLOP a multiply-add)."""
    f = 2.0 * PATCHES * 3 * 16 * 16 * W
    for q in q_rows:
        f += 2 * q * W * W + 2 * kv_rows * W * 2 * W + 2 * 2 * q * kv_rows * W
        f += 2 * q * W * W + 2 * 2 * q * W * MLP
    return f / 1e9


PLAIN_GFLOP = vit_gflop([197] * BLOCKS, 197)
PROMPTED_GFLOP = vit_gflop([197] * (BLOCKS - 1) + [1], 197 + PROMPTS)  # the exact fast path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(dtype: torch.dtype, n: int, device: torch.device, reps: int = 5) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def rates(
    fns: dict[str, Callable[[], object]], batch: int, device: torch.device, min_s: float
) -> dict[str, float]:
    """img/s of each function (one call = one batch): warm-up, then rounds of calls
    interleaved across the functions; the best round of each is kept."""
    for fn in fns.values():
        fn()
        fn()
    sync(device)
    best = dict.fromkeys(fns, 0.0)
    for _ in range(2):
        for k, fn in fns.items():
            calls, t0 = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                sync(device)
                dt = time.perf_counter() - t0
                if dt >= min_s:
                    break
            best[k] = max(best[k], calls * batch / dt)
    return best


# -- images -----------------------------------------------------------------------------------


def _write_jpeg(job: tuple[str, int, int, int]) -> str:
    path, w, h, seed = job
    sources = sorted(KODAK.glob("*.png")) if KODAK.is_dir() else []
    if sources:
        img = Image.open(sources[seed % len(sources)]).convert("RGB")
        if (img.width > img.height) != (w > h):
            img = img.rotate(90, expand=True)
    else:
        rng = np.random.default_rng(seed)
        img = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    img.resize((w, h), Image.Resampling.BICUBIC).save(path, quality=90)
    return path


def make_jpegs(folder: Path, n: int, size: tuple[int, int], workers: int) -> list[Path]:
    """``n`` distinct JPEGs of ``size`` (Kodak photos resized; noise without the data)."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"{i:05d}.jpg"), size[0], size[1], i) for i in range(n)]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        return [Path(p) for p in pool.map(_write_jpeg, jobs)]


# -- sections ---------------------------------------------------------------------------------


def model_only(
    device: torch.device, batch: int, min_s: float, compile_: bool
) -> tuple[dict[str, float], dict[str, Any]]:
    model = grmpiqa.create_model(BACKBONE, pretrained=None, device=device, config=PROMPTED)
    visual = model.clip.visual
    visual_bf16 = copy.deepcopy(visual).to(torch.bfloat16)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=gen).to(device)
    xb = x.to(torch.bfloat16)
    fp32 = BatchScorer(model, precision="fp32")
    policy = BatchScorer(model, precision="bf16", frozen_bf16=False)
    scoring = BatchScorer(model, precision="bf16")

    def under(precision: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode(), autocast(device, precision):
                return fn()

        return run

    configs: dict[str, Callable[[], object]] = {
        "plain fp32": under("fp32", lambda: visual(x)),
        "plain bf16 autocast": under("bf16", lambda: visual(x)),
        "plain bf16 weights": under("fp32", lambda: visual_bf16(xb)),
        "prompted fp32": lambda: fp32.score_tensor(x),
        "prompted bf16 autocast (fp32 weights)": lambda: policy.score_tensor(x),
        "prompted bf16 frozen weights (scoring)": lambda: scoring.score_tensor(x),
    }
    notes: dict[str, Any] = {}
    if compile_:
        try:
            plain_c = torch.compile(visual_bf16)
            tower_c = torch.compile(scoring.towers[0])
            text = scoring.texts[0]

            def prompted_compiled() -> object:
                with torch.inference_mode(), autocast(device, "bf16"):
                    feats = torch.nn.functional.normalize(tower_c(x), dim=-1)
                    return model.probabilities(feats, text).cpu()

            configs["plain bf16 weights + torch.compile"] = under("fp32", lambda: plain_c(xb))
            configs["prompted bf16 frozen weights + torch.compile"] = prompted_compiled
        except Exception as err:  # noqa: BLE001 - recorded, the suite goes on
            notes["compile_error"] = f"{type(err).__name__}: {err}"
    try:
        out = rates(configs, batch, device, min_s)
    except Exception as err:  # a compiled configuration can fail at its first call
        if not compile_:
            raise
        notes["compile_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        configs = {k: v for k, v in configs.items() if "compile" not in k}
        out = rates(configs, batch, device, min_s)
    return out, notes


LAST_CPU: dict[str, float] = {}


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def end_to_end(
    scorer: BatchScorer,
    items: list[Any],
    batch: int,
    workers: int,
) -> tuple[float, torch.Tensor, float]:
    """img/s through the pipeline and the model, scores in item order, CPU s per image
    (this process and its finished children: the DataLoader workers; split in
    ``LAST_CPU``: ``main`` and ``workers``)."""
    before = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    scores = torch.full((len(items), len(scorer.models)), float("nan"))
    sync(scorer.device)
    t0 = time.perf_counter()
    for b in scorer.iter_batches(items, batch, num_workers=workers):
        scores[b.indices] = b.scores
    sync(scorer.device)
    dt = time.perf_counter() - t0
    main = (_cpu(resource.RUSAGE_SELF) - before[0]) / len(items)
    children = (_cpu(resource.RUSAGE_CHILDREN) - before[1]) / len(items)
    LAST_CPU.update(main=main, workers=children)
    return len(items) / dt, scores[:, 0], main + children


def worker_scaling(
    scorer: BatchScorer, items: list[Any], counts: list[int], batch: int, label: str
) -> dict[str, Any]:
    """End to end with each worker count (best of 3 interleaved runs) and the CPU each
    image costs in the workers (W) and the main process (M). With the main process on a
    core of its own, 1 worker runs at 1/W; on 2 idle cores, 2 workers and the main
    process share both: 2 / (W + M), so 2W / (W + M) is the speed-up the hardware allows
    (``predicted_2_over_1``)."""
    scorer_items = items[:batch]
    end_to_end(scorer, scorer_items, batch, counts[0])  # warm-up
    best = dict.fromkeys(counts, 0.0)
    cpu: dict[int, dict[str, float]] = {}
    for _ in range(3):
        for w in counts:
            r, _, _ = end_to_end(scorer, items, batch, w)
            if r > best[w]:
                best[w], cpu[w] = r, dict(LAST_CPU)
    out: dict[str, Any] = {
        str(w): {
            "img_s": best[w],
            "speedup": best[w] / best[counts[0]],
            "main_cpu_ms_per_img": cpu[w]["main"] * 1e3,
            "worker_cpu_ms_per_img": cpu[w]["workers"] * 1e3,
        }
        for w in counts
    }
    print(
        f"\nworker scaling (test-tiny, {len(items)} {label} JPEGs, Pillow decoder, best of 3 "
        f"interleaved runs, {torch.get_num_threads()} torch thread(s) in the main process):"
    )
    for w in counts:
        print(
            f"  {w:2d} worker(s): {best[w]:8.1f} img/s ({best[w] / best[counts[0]]:.2f}x); CPU "
            f"ms/img: main {cpu[w]['main'] * 1e3:.2f}, workers {cpu[w]['workers'] * 1e3:.2f}"
        )
    if 1 in cpu:
        w1, m1 = cpu[1]["workers"], cpu[1]["main"]
        out["predicted_2_over_1"] = 2 * w1 / (w1 + m1)
        print(
            f"  on 2 idle cores: 2W/(W+M) = {out['predicted_2_over_1']:.2f}x (W {w1 * 1e3:.2f}, "
            f"M {m1 * 1e3:.2f} CPU ms/img)"
        )
    return out


def score_command(folder: Path, device: str, batch: int) -> dict[str, Any]:
    """``grmpiqa score FOLDER`` in a fresh process: wall time and what it announced."""
    out = folder.parent / "scores.csv"
    cmd = [
        sys.executable,
        "-m",
        "grmpiqa",
        "score",
        str(folder),
        "--backbone",
        BACKBONE,
        "--pretrained",
        "random",
        "--batch-size",
        str(batch),
        "-o",
        str(out),
        "--no-progress",
    ]
    if device != "auto":
        cmd += ["--device", device]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    said = [ln for ln in proc.stderr.splitlines() if "scoring" in ln and "images" in ln]
    rows = max(0, len(out.read_text().splitlines()) - 1) if out.exists() else 0
    return {
        "returncode": proc.returncode,
        "wall_s": wall,
        "images": rows,
        "img_s_including_start": rows / wall if wall else 0.0,
        "announced": said[0] if said else proc.stderr.strip().splitlines()[-1:],
    }


def training_figures(device: torch.device, small: bool) -> dict[str, Any] | None:
    """The companion issue's figures (benchmarks/gpu_training.py), when it exists."""
    if not (HERE / "gpu_training.py").exists():
        return None
    sys.path.insert(0, str(HERE))
    module = importlib.import_module("gpu_training")
    fn = getattr(module, "training_figures", None)
    if fn is None:
        return {"error": "benchmarks/gpu_training.py has no training_figures(device, small)"}
    return dict(fn(str(device), small))


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="auto", help="auto (default), cuda, cuda:1 or cpu")
    ap.add_argument("--small", action="store_true", help="CI-sized: a few images, batch 8")
    ap.add_argument("--batch", type=int, default=None, help="batch size (256; 8 with --small)")
    ap.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default: as grmpiqa score)"
    )
    ap.add_argument("--images", type=int, default=None, help="500-px JPEGs end to end")
    ap.add_argument("--big-images", type=int, default=None, help="12 MP JPEGs end to end")
    ap.add_argument("--clive", type=int, default=None, help="CLIVE images compared (all: 0)")
    ap.add_argument("--score-images", type=int, default=None, help="images for grmpiqa score")
    ap.add_argument(
        "--scaling-images", type=int, default=None, help="images per worker-scaling run"
    )
    ap.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile configurations (auto: on CUDA only)",
    )
    ap.add_argument("--no-training", action="store_true", help="skip the training figures")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--json", default=None, help="also write the JSON summary to this file")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="time budget: sections that would start past 85%% of it are skipped (default "
        "300 on a GPU, 1800 on the CPU)",
    )
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.max_seconds is None:
        args.max_seconds = 300.0 if cuda else 1800.0
    small = args.small
    batch = args.batch or (8 if small else 256)
    from grmpiqa.pipeline import default_workers

    workers = args.workers if args.workers is not None else default_workers(device)
    n_images = args.images or (24 if small else 8192)
    n_big = args.big_images if args.big_images is not None else (2 if small else 64)
    n_clive = args.clive if args.clive is not None else (24 if small else 0)
    n_score = args.score_images or (16 if small else 4096)
    n_scaling = args.scaling_images or (192 if small else 4096)
    compile_ = args.compile == "on" or (args.compile == "auto" and cuda and not small)

    def over_budget() -> bool:
        """Past 85% of --max-seconds: the optional sections that remain are skipped."""
        return time.perf_counter() - t_start > 0.85 * args.max_seconds

    min_s = 0.3 if small else 1.5
    cpus = os.cpu_count() or 1

    import torchvision

    summary: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe_device(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpus": cpus,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "workers": workers,
        "small": small,
        "loadavg_start": os.getloadavg()[0],
    }
    print(
        f"device {summary['device']}; torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}; {cpus} CPUs, {torch.get_num_threads()} torch threads; "
        f"load average {summary['loadavg_start']:.1f}"
    )

    # 1. matmul
    n = 8192 if cuda else (1024 if small else 4096)
    mm = {"bf16": matmul_tflops(torch.bfloat16, n, device)}
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        mm["tf32"] = matmul_tflops(torch.float32, n, device)
        torch.backends.cuda.matmul.allow_tf32 = False
    mm["fp32"] = matmul_tflops(torch.float32, n, device)
    summary["matmul_tflops"] = mm
    summary["matmul_n"] = n
    print(f"\nmatmul {n}^3: " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in mm.items()))

    # 2. model only
    rows, notes = model_only(device, batch, min_s, compile_)
    summary["model_only_img_s"] = rows
    summary.update(notes)
    best_plain = max((v, k) for k, v in rows.items() if k.startswith("plain"))
    scoring_rate = rows["prompted bf16 frozen weights (scoring)"]
    best_prompted = max((v, k) for k, v in rows.items() if k.startswith("prompted"))
    peak = mm["bf16"] * 1e3
    print(f"\nmodel only, batch {batch} ({BACKBONE}, random weights):")
    print(f"{'configuration':46s} {'img/s':>9s} {'TFLOP/s':>8s} {'of bf16 matmul':>15s}")
    for k, v in rows.items():
        g = PLAIN_GFLOP if k.startswith("plain") else PROMPTED_GFLOP
        print(f"{k:46s} {v:9.1f} {v * g / 1e3:8.2f} {v * g / peak:15.2f}")
    summary["prompted_scoring_over_fastest_plain"] = scoring_rate / best_plain[0]
    summary["best_prompted_over_fastest_plain"] = best_prompted[0] / best_plain[0]
    summary["fastest_plain"] = best_plain[1]
    summary["fastest_prompted"] = best_prompted[1]
    summary["prompted_scoring_flop_fraction"] = scoring_rate * PROMPTED_GFLOP / peak
    print(
        f"prompted as scored / fastest plain ({best_plain[1]}): "
        f"{summary['prompted_scoring_over_fastest_plain']:.2f} (goal >= 0.9); fastest prompted "
        f"({best_prompted[1]}): {summary['best_prompted_over_fastest_plain']:.2f}; "
        f"fraction of the bf16 matmul rate at {PROMPTED_GFLOP:.1f} GFLOP/img: "
        f"{summary['prompted_scoring_flop_fraction']:.2f} (goal >= 0.45)"
    )
    if "compile_error" in notes:
        print(f"torch.compile: {notes['compile_error']}")

    model = grmpiqa.create_model(BACKBONE, pretrained=None, device=device, config=PROMPTED)
    tiny = grmpiqa.create_model(
        "test-tiny", pretrained=None, device=device, config=grmpiqa.ModelConfig(vpt_tokens=4)
    )
    e2e: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        distinct = min(n_images, 256)
        gen = make_jpegs(root / "jpeg500", distinct, (500, 375), cpus)
        items500 = [gen[i % distinct] for i in range(n_images)]
        sets: dict[str, list[Path]] = {"500px generated": items500}
        clive_all = sorted(p for p in CLIVE.glob("*") if p.is_file()) if CLIVE.is_dir() else []
        clive_jpegs = [p for p in clive_all if p.suffix.lower() == ".jpg"]
        if clive_jpegs:
            reps = max(1, n_images // len(clive_jpegs)) if not small else 1
            sets["CLIVE JPEGs"] = (clive_jpegs * reps)[: max(len(clive_jpegs), n_images // 2)]
            if small:
                sets["CLIVE JPEGs"] = clive_jpegs[:n_images]
        if n_big:
            sets["12 MP generated"] = make_jpegs(root / "jpeg12mp", n_big, (4000, 3000), cpus)

        # 3. end to end per decoder
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        print(f"\nend to end, batch {batch}, {workers} DataLoader worker(s), bf16:")
        print(
            f"{'images':18s} {'decode':6s} {'n':>6s} {'e2e img/s':>10s} {'of model only':>14s} "
            f"{'CPU ms/img':>11s}"
        )
        for name, items in sets.items():
            for decode in ("pil", "torch"):
                if over_budget():
                    e2e[f"{name} / {decode}"] = {"skipped": "time budget"}
                    continue
                scorer = BatchScorer(model, precision="bf16", decode=decode)
                try:
                    end_to_end(scorer, items[: batch * 2], batch, workers)  # warm-up
                    r, _, cpu = end_to_end(scorer, items, batch, workers)
                except Exception as err:  # noqa: BLE001 - recorded, the suite goes on
                    e2e[f"{name} / {decode}"] = {"error": f"{type(err).__name__}: {err}"}
                    print(f"{name:18s} {decode:6s} error: {type(err).__name__}: {err}")
                    continue
                row = {
                    "images": len(items),
                    "e2e_img_s": r,
                    "ratio": r / scoring_rate,
                    "cpu_ms_per_img": cpu * 1e3,
                }
                if cuda:
                    row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                e2e[f"{name} / {decode}"] = row
                print(
                    f"{name:18s} {decode:6s} {len(items):6d} {r:10.1f} {row['ratio']:14.2f} "
                    f"{cpu * 1e3:11.2f}"
                )
        summary["end_to_end"] = e2e
        if cuda:
            summary["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            print(f"peak GPU memory: {summary['peak_gpu_mib']:.0f} MiB")

        # 5. the decoders agree; batch-size invariance of the torch path
        def agreement() -> dict[str, Any]:
            clive_cmp = clive_all[:n_clive] if n_clive else clive_all
            agree: dict[str, Any] = {}
            if clive_cmp:
                s = {
                    d: model.score(clive_cmp, batch, precision="bf16", decode=d)
                    for d in ("pil", "torch")
                }
                diff = (s["pil"] - s["torch"]).abs()
                agree["clive_images"] = len(clive_cmp)
                agree["clive_max_abs_score_diff"] = float(diff.max())
                agree["clive_mean_abs_score_diff"] = float(diff.mean())
            few = items500[: min(16, len(items500))]
            one = model.score(few, 1, precision="bf16", decode="torch")
            many = model.score(few, len(few), precision="bf16", decode="torch")
            agree["torch_batch1_vs_batchN_max_abs"] = float((one - many).abs().max())
            print(
                "\ndecoders: "
                + ", ".join(
                    f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in agree.items()
                )
            )
            return agree

        # 6. grmpiqa score in a fresh process
        def command() -> dict[str, Any]:
            folder = root / "score_dir"
            folder.mkdir(exist_ok=True)
            for i in range(n_score):
                os.link(gen[i % distinct], folder / f"{i:06d}.jpg")
            cmd = score_command(folder, args.device, batch)
            print(
                f"\ngrmpiqa score on {n_score} images (fresh process): {cmd['wall_s']:.1f} s, "
                f"{cmd['img_s_including_start']:.1f} img/s including start and model load; "
                f"rc {cmd['returncode']}; said: {cmd['announced']}"
            )
            return cmd

        # 4. worker scaling, tiny backbone (one main torch thread on the CPU)
        def scaling() -> dict[str, Any]:
            counts = [1, 2] if not cuda else [w for w in (1, 4, 8, 16) if w <= max(1, cpus - 1)]
            tiny_scorer = BatchScorer(tiny, precision="auto", decode="pil")
            scaling_sets = {"500px": [gen[i % distinct] for i in range(n_scaling)]}
            if "12 MP generated" in sets:
                big = sets["12 MP generated"]
                scaling_sets["12MP"] = [big[i % len(big)] for i in range(max(8, n_scaling // 32))]
            out: dict[str, Any] = {}
            threads = torch.get_num_threads()
            if not cuda:  # the tiny model needs one thread; more only contend with workers
                torch.set_num_threads(1)
            try:
                for label, scal_items in scaling_sets.items():
                    out[label] = worker_scaling(
                        tiny_scorer, scal_items, counts, 32 if small else batch, label
                    )
            finally:
                torch.set_num_threads(threads)
            if "2" in out["500px"]:
                summary["two_workers_over_one"] = (
                    out["500px"]["2"]["img_s"] / out["500px"]["1"]["img_s"]
                )
            return out

        sections: list[tuple[str, Callable[[], Any]]] = [
            ("decoders_agree", agreement),
            ("grmpiqa_score", command),
            ("worker_scaling", scaling),
        ]
        for key, fn in sections:
            if over_budget():
                summary[key] = {"skipped": "time budget"}
                print(f"\n{key}: skipped (time budget, --max-seconds)")
                continue
            try:
                summary[key] = fn()
            except Exception as err:  # noqa: BLE001 - recorded, the suite goes on
                summary[key] = {"error": f"{type(err).__name__}: {err}"}
                print(f"\n{key}: error: {type(err).__name__}: {err}")

    # 7. training figures of the companion issue
    if not args.no_training:
        try:
            tf = training_figures(device, small)
        except Exception as err:  # noqa: BLE001 - recorded, the suite goes on
            tf = {"error": f"{type(err).__name__}: {err}"}
        summary["training"] = tf
        if tf is None:
            print("\ntraining figures: benchmarks/gpu_training.py not present (issue 21)")
        else:
            print("\ntraining figures: " + json.dumps(tf))

    summary["seconds"] = time.perf_counter() - t_start
    summary["loadavg_end"] = os.getloadavg()[0]
    print(f"\nsuite: {summary['seconds']:.0f} s")
    line = json.dumps(summary)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
