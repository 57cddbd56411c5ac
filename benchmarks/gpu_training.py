"""Training figures for the GPU suite (issue 21): stage 2 to its stop, the protocol, stage 1.

What is timed (each in this process unless said; times include what a user waits for):

1. **One 50-shot split to its stop**: :func:`grmpiqa.finetune` on the shots of split 0
   (seed 0) with the released schedule (up to 2000 epochs, stopping when the plateau rule
   takes the learning rate below 5e-7), writing its checkpoint and resume state as the
   command does (``--save-every`` default). On CUDA once per ``--compile`` mode (``off``,
   ``default``, ``reduce-overhead`` = CUDA graphs), so the faster can be kept.
2. **``grmpiqa evaluate --splits 3``** as a user runs it (a child process: start-up,
   backbone, three splits, report), extrapolated to the paper's 10 splits as
   ``start-up + 10/3 x (run - start-up)``; ``--full-protocol`` also runs the 10.
3. **One stage-1 meta-epoch** (``reptile`` defaults) at 25 tasks x 20 images, tasks one
   by one (``task_batch`` 1) and stacked (:data:`grmpiqa.metatrain.GPU_TASK_BATCH` on a
   GPU; 4 on the CPU).
4. **Peak memory**: CUDA ``max_memory_allocated`` per part; the process's peak RSS.
5. **Host synchronisations per stage-2 epoch** (CUDA): epochs of the training step run
   under ``torch.cuda.set_sync_debug_mode("warn")``; the goal is none.

Backbone: ``ViT-B-16-quickgelu`` with RANDOM weights (speed and memory do not depend on
the values), ``--precision auto``; ``--small``: ``test-tiny`` (a pipeline check, e.g. on
the CPU). Data: CLIVE from ``../shared/data`` (or ``$GRMPIQA_SHARED_DATA``), else a
synthetic KADID-layout set (announced); the stage-1 tasks are synthesised from Kodak
photos, else from generated images (``pretrain_speed.build_task_set``).

Usage::

    python benchmarks/gpu_training.py --device cuda                 # the GPU figures
    python benchmarks/gpu_training.py --device cpu --small          # a CPU check
    python benchmarks/gpu_training.py --device cuda --full-protocol # also 10 splits

Prints a table, then as the LAST stdout line one JSON object. ``training_figures(device, small)``
returns the same figures as a dict for ``benchmarks/gpu_suite.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GOALS = {  # issue 21, on one H200
    "split_to_stop_s": 10.0,
    "evaluate10_s": 120.0,
    "stage1_epoch_s": 6.0,
}
FULL, SMALL = "ViT-B-16-quickgelu", "test-tiny"


def _shared_data() -> Path:
    env = os.environ.get("GRMPIQA_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gib(device: str, reset: bool = False) -> float:
    import torch

    if not device.startswith("cuda"):
        return float("nan")
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    return torch.cuda.max_memory_allocated() / 2**30


def _data(work: Path) -> tuple[str, str]:
    """The 50-shot data: CLIVE if present, else the synthetic task set's images."""
    clive = _shared_data() / "clive-dev" / "ChallengeDB_release"
    if clive.is_dir():
        return f"clive:{clive}", "CLIVE (shared data)"
    from pretrain_speed import build_task_set

    spec, how = build_task_set(work / "target", 25, 20, seed=1)
    return spec, f"SYNTHETIC stand-in for CLIVE ({how})"


def _split_to_stop(
    device: str, backbone: str, precision: str, spec: str, compile_mode: str, work: Path
) -> dict[str, float]:
    import grmpiqa
    from grmpiqa.data import load_dataset, make_split

    data = load_dataset(spec)
    train = make_split(data, 0, 0, 50).train(data)
    _peak_gib(device, reset=True)
    t0 = time.perf_counter()
    model = grmpiqa.create_model(
        backbone, pretrained=None, config=grmpiqa.ModelConfig(), device=device
    )
    _sync(device)
    load = time.perf_counter() - t0
    cfg = grmpiqa.FinetuneConfig(precision=precision, compile=compile_mode)
    out = work / f"split-{compile_mode}.safetensors"
    t1 = time.perf_counter()
    result = grmpiqa.finetune(model, train, cfg, out=out, progress=False, overwrite=True)
    _sync(device)
    wall = time.perf_counter() - t1
    train_s = wall - result.cache_build_s
    return {
        "split_to_stop_s": wall,
        "split_epochs": float(result.epochs),
        "split_s_per_epoch": train_s / max(result.epochs, 1),
        "split_cache_s": result.cache_build_s,
        "split_model_load_s": load,
        "split_peak_gib": _peak_gib(device),
    }


def _syncs_per_epoch(device: str, backbone: str, precision: str, spec: str) -> float:
    """Host synchronisations per stage-2 epoch (CUDA's sync debug mode counts them): the
    epochs of :func:`grmpiqa.finetune` between two evaluations should have none."""
    import warnings

    import torch

    import grmpiqa
    from grmpiqa.data import load_dataset, make_split
    from grmpiqa.feature_cache import frozen_image_blocks
    from grmpiqa.finetune import CachedShots, Stage2Step, _load_resized, _sgd, build_teacher

    if not device.startswith("cuda"):
        return float("nan")
    data = load_dataset(spec)
    train = make_split(data, 0, 0, 50).train(data)
    model = grmpiqa.create_model(
        backbone, pretrained=None, config=grmpiqa.ModelConfig(), device=device
    )
    cfg = grmpiqa.FinetuneConfig(precision=precision)
    teacher = build_teacher(model, cfg.scene_prompts)
    model.set_trainable(cfg.groups)
    start = frozen_image_blocks(model)
    assert start is not None
    labels = torch.tensor(train.labels, dtype=torch.float32)
    source = CachedShots(model, _load_resized(model, train), labels, cfg, start, teacher)
    step = Stage2Step(model, cfg)
    opt = _sgd(step.params, cfg)
    everyone = list(range(len(train)))
    model.train()
    for epoch in (1, 2):  # warm-up (first-call work, e.g. cached lengths)
        lq, ls, _ = step.losses(source.batch(everyone, epoch))
        step.step_async(opt, lq, ls)
    torch.cuda.synchronize()
    epochs = 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for epoch in range(3, 3 + epochs):
                lq, ls, _ = step.losses(source.batch(everyone, epoch))
                step.step_async(opt, lq, ls)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    for w in syncs[:5]:
        print(f"# sync inside an epoch: {w.filename}:{w.lineno}: {w.message}", file=sys.stderr)
    return len(syncs) / epochs


def _cli(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "grmpiqa", *argv], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"grmpiqa {' '.join(argv[:1])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _startup(device: str, backbone: str) -> float:
    """A child's import of grmpiqa and model build on ``device`` (what every command pays)."""
    code = (
        "import grmpiqa, torch; m = grmpiqa.create_model("
        f"{backbone!r}, pretrained=None, config=grmpiqa.ModelConfig(), device={device!r});"
        "torch.cuda.synchronize() if torch.cuda.is_available() else None"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    return time.perf_counter() - t0


def _evaluate(
    device: str, backbone: str, precision: str, spec: str, splits: int, work: Path
) -> float:
    return _cli(
        [
            "evaluate", "--data", spec, "--splits", str(splits), "--report",
            str(work / f"report-{splits}"), "--backbone", backbone, "--pretrained", "random",
            "--device", device, "--precision", precision, "--no-progress",
        ]
    )  # fmt: skip


def _stage1(
    device: str, backbone: str, precision: str, task_spec: str, task_batch: int, work: Path
) -> dict[str, float]:
    import grmpiqa

    model = grmpiqa.create_model(
        backbone, pretrained=None, config=grmpiqa.ModelConfig(), device=device
    )
    cfg = grmpiqa.PretrainConfig(
        epochs=1, precision=precision, images_per_task=20, max_tasks=25, task_batch=task_batch
    )
    _peak_gib(device, reset=True)
    t0 = time.perf_counter()
    result = grmpiqa.pretrain(
        model, [task_spec], cfg, work / f"s1-{task_batch}.safetensors", progress=False,
        overwrite=True,
    )  # fmt: skip
    _sync(device)
    return {
        "seconds": time.perf_counter() - t0,
        "epoch_seconds": float(result.history[0]["seconds"]),
        "peak_gib": _peak_gib(device),
        "query_loss": float(result.history[0]["query_loss"]),
    }


def run(
    device: str = "cuda",
    small: bool = False,
    *,
    full_protocol: bool = False,
    compile_modes: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """The training figures (seconds, GiB) on ``device`` (see the module docstring)."""
    import torch
    from pretrain_speed import build_task_set

    from grmpiqa.metatrain import GPU_TASK_BATCH

    cuda = device.startswith("cuda")
    backbone = SMALL if small else FULL
    precision = "auto" if cuda else "fp32"
    if compile_modes is None:
        compile_modes = ("off", "default", "reduce-overhead") if cuda else ("off",)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec, _ = _data(work)
        best = None
        for mode in compile_modes:
            fig = _split_to_stop(device, backbone, precision, spec, mode, work)
            for k, v in fig.items():
                figures[f"{k}[{mode}]"] = v
            if best is None or fig["split_to_stop_s"] < best[1]["split_to_stop_s"]:
                best = (mode, fig)
        assert best is not None
        figures.update(best[1])
        figures["split_best_compile_is_off"] = float(best[0] == "off")
        figures["syncs_per_epoch"] = _syncs_per_epoch(device, backbone, precision, spec)
        startup = _startup(device, backbone)
        ev3 = _evaluate(device, backbone, precision, spec, 3, work)
        figures["startup_s"] = startup
        figures["evaluate3_s"] = ev3
        figures["evaluate10_extrapolated_s"] = startup + (ev3 - startup) * 10 / 3
        if full_protocol:
            figures["evaluate10_s"] = _evaluate(device, backbone, precision, spec, 10, work)
        task_spec, _ = build_task_set(work / "tasks", 25, 20)
        serial = _stage1(device, backbone, precision, task_spec, 1, work)
        batched = _stage1(
            device, backbone, precision, task_spec, GPU_TASK_BATCH if cuda else 4, work
        )
        figures["stage1_epoch_serial_s"] = serial["epoch_seconds"]
        figures["stage1_epoch_batched_s"] = batched["epoch_seconds"]
        figures["stage1_epoch_s"] = min(serial["epoch_seconds"], batched["epoch_seconds"])
        figures["stage1_batched_query_loss_diff"] = abs(
            serial["query_loss"] - batched["query_loss"]
        )
        figures["stage1_peak_gib_serial"] = serial["peak_gib"]
        figures["stage1_peak_gib_batched"] = batched["peak_gib"]
    figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    figures["cuda"] = float(cuda)
    figures["torch_threads"] = float(torch.get_num_threads())
    return figures


def training_figures(device: str, small: bool) -> dict[str, float]:
    """The hook ``benchmarks/gpu_suite.py`` calls: :func:`run` with its defaults."""
    return run(device, small)


def _table(f: dict[str, float], device: str, small: bool) -> str:
    def s(key: str) -> str:
        v = f.get(key)
        return "-" if v is None or v != v else f"{v:.2f}"

    ev, s1 = GOALS["evaluate10_s"], GOALS["stage1_epoch_s"]
    peaks = f"{s('split_peak_gib')} / {s('stage1_peak_gib_batched')}"
    rows = [
        ("one 50-shot split to its stop (s)", s("split_to_stop_s"), GOALS["split_to_stop_s"]),
        ("  epochs / s per epoch", f"{s('split_epochs')} / {s('split_s_per_epoch')}", None),
        ("  feature cache build (s)", s("split_cache_s"), None),
        ("  host syncs per epoch (CUDA debug mode)", s("syncs_per_epoch"), 0),
        ("evaluate --splits 3 (s)", s("evaluate3_s"), None),
        ("  start-up (s)", s("startup_s"), None),
        ("evaluate, 10 splits extrapolated (s)", s("evaluate10_extrapolated_s"), ev),
        ("evaluate, 10 splits measured (s)", s("evaluate10_s"), ev),
        ("stage-1 meta-epoch 25 x 20, serial (s)", s("stage1_epoch_serial_s"), s1),
        ("stage-1 meta-epoch 25 x 20, stacked (s)", s("stage1_epoch_batched_s"), s1),
        ("peak GPU memory: split / stage 1 (GiB)", peaks, None),
        ("peak RSS (GiB)", s("peak_rss_gib"), None),
    ]
    head = f"device {device}, backbone {SMALL if small else FULL} (RANDOM weights)"
    lines = [head, f"{'figure':<44} {'value':>16}  goal (H200)"]
    for name, value, goal in rows:
        lines.append(f"{name:<44} {value:>16}  {'' if goal is None else f'<= {goal:g}'}")
    modes = sorted(k[len("split_to_stop_s[") : -1] for k in f if k.startswith("split_to_stop_s["))
    for m in modes:
        lines.append(f"  split to stop, compile={m:<16} {s(f'split_to_stop_s[{m}]'):>16}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="test-tiny instead of ViT-B/16")
    ap.add_argument("--full-protocol", action="store_true", help="also run the 10 splits")
    ap.add_argument(
        "--compile-modes",
        default=None,
        help="comma-separated FinetuneConfig.compile modes for the split (default: off, "
        "default, reduce-overhead on CUDA; off on the CPU)",
    )
    args = ap.parse_args()
    modes = tuple(args.compile_modes.split(",")) if args.compile_modes else None
    figures = run(args.device, args.small, full_protocol=args.full_protocol, compile_modes=modes)
    print(_table(figures, args.device, args.small))
    print(json.dumps({k: (round(v, 4) if v == v else None) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
