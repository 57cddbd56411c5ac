"""``grmpiqa demo``: the whole GRMP-IQA pipeline on a fresh, offline machine.

1. Pristine photos: scikit-image's bundled sample images (public-domain / CC0 images
   that ship inside its wheel, so nothing is downloaded), or ``pristine=DIR``. They are
   split by content: five become stage-1 task references, the four colour photographs
   (astronaut, chelsea, coffee, rocket) the target set.
2. Synthesis (:mod:`grmpiqa.data.synth`): KADID-style distortions of both groups, with
   different distortion types for the target (partly unseen in stage 1).
3. Stage 1, meta-prompt pre-training (:func:`grmpiqa.pretrain`, method.md 6), short.
4. The few-shot protocol (:func:`grmpiqa.evaluation.run_protocol`, method.md 7-8):
   ``grmp`` from the stage-1 prompts, a few splits, N shots, report in ``OUT/report``.
5. Scores of held-out target images (one content never seen in training) with split 0's
   fine-tuned model, per distortion type and level.

The real backbone (ViT-B-16-quickgelu, OpenAI weights) is used when its weights are
available (local cache, or downloadable); otherwise the built-in ``test-tiny`` random
backbone runs the same pipeline with a LOUD announcement: its numbers are meaningless.
Budgets are sized to take a few minutes on a 2-core CPU; ``quick`` is a seconds-long
smoke run.
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from grmpiqa.errors import BackboneError, GrmpiqaError
from grmpiqa.factory import DEFAULT, create_model
from grmpiqa.images import is_image_file, load_image
from grmpiqa.log import get_logger
from grmpiqa.model import ModelConfig, QualityModel
from grmpiqa.utils import atomic_open, atomic_path

__all__ = ["DemoPlan", "DemoResult", "demo_images", "plan_for", "run_demo"]

logger = get_logger("demo")

# scikit-image sample photos bundled in its wheel (public domain or CC0, per their
# docstrings): name -> skimage.data loader. Task and target contents never overlap; the
# target set is the four colour photographs.
_TASK_IMAGES: tuple[str, ...] = (
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
_TARGET_IMAGES: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket")

_TASK_TYPES = (
    "gaussian_blur",
    "motion_blur",
    "jpeg",
    "jpeg2000",
    "white_noise",
    "impulse_noise",
    "brighten",
    "contrast_change",
)
_TARGET_TYPES = ("lens_blur", "jpeg", "white_noise_color_component", "darken", "pixelate")

TINY = "test-tiny"

#: The fewest pristine photos ``pristine=DIR`` accepts: 2 task and 2 target contents (one
#: target content for the test set, one for the pool the shots come from).
MIN_PRISTINE = 4


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (chosen by :func:`plan_for`; recorded in OUT/demo.json)."""

    image_side: int
    task_types: tuple[str, ...]
    target_types: tuple[str, ...]
    pretrain_epochs: int
    images_per_task: int | None
    support_batch: int
    query_batch: int
    max_epochs: int
    eval_every: int
    cache_augmentations: int
    shots: int
    splits: int
    vpt_tokens: int
    levels: int = 5
    extra: dict[str, Any] = field(default_factory=dict)


def plan_for(quick: bool, tiny: bool) -> DemoPlan:
    """The budgets: ``quick`` smoke run, or the few-minute demo (smaller on ViT-B/16)."""
    if quick:
        return DemoPlan(
            image_side=128,
            task_types=_TASK_TYPES[:4],
            target_types=_TARGET_TYPES[:3],
            pretrain_epochs=1,
            images_per_task=10,
            support_batch=8,
            query_batch=4,
            max_epochs=4,
            eval_every=2,
            cache_augmentations=1,
            shots=20,
            splits=2,
            vpt_tokens=4 if tiny else 100,
        )
    if tiny:
        return DemoPlan(
            image_side=256,
            task_types=_TASK_TYPES,
            target_types=_TARGET_TYPES,
            pretrain_epochs=3,
            images_per_task=None,
            support_batch=16,
            query_batch=8,
            max_epochs=40,
            eval_every=5,
            cache_augmentations=4,
            shots=50,
            splits=2,
            vpt_tokens=100,
        )
    # ViT-B/16 on a 2-core CPU (measured): stage 1 ~23 s; stage 2 ~34 s per epoch of 50
    # shots with the frozen-feature cache (the cache ~0.25 s per view): ~3.5 min in all.
    return DemoPlan(
        image_side=256,
        task_types=_TASK_TYPES[:4],
        target_types=_TARGET_TYPES,
        pretrain_epochs=1,
        images_per_task=6,
        support_batch=5,
        query_batch=1,
        max_epochs=4,
        eval_every=2,
        cache_augmentations=1,
        shots=50,
        splits=1,
        vpt_tokens=100,
    )


@dataclass
class DemoResult:
    """What :func:`run_demo` produced."""

    out: Path
    backbone: str
    random_backbone: bool
    stage1: Path
    report: Path
    checkpoint: Path | None
    summary: dict[str, Any]
    scores: list[dict[str, Any]]
    seconds: dict[str, float]
    text: str = ""
    notice: str | None = None


def _say(msg: str) -> None:
    logger.info("demo: %s", msg)


def banner(lines: Sequence[str]) -> str:
    """``lines`` in a box of exclamation marks (the demo's loud notices)."""
    width = max(len(s) for s in lines) + 4
    rows = ["!" * width, *(f"! {s.ljust(width - 4)} !" for s in lines), "!" * width]
    return "\n".join(rows)


def _banner(lines: Sequence[str]) -> None:
    logger.warning("\n%s", banner(lines))


# --- images -------------------------------------------------------------------------------


def _skimage_image(name: str) -> np.ndarray:
    try:
        import skimage.data as data
    except ImportError:  # pragma: no cover - a declared dependency
        raise GrmpiqaError(
            "the demo's sample photos come from scikit-image (pip install scikit-image), "
            "or pass your own with --pristine DIR"
        ) from None
    try:
        arr = np.asarray(getattr(data, name)())
    except Exception as err:  # noqa: BLE001 - a missing sample raises pooch/OS errors
        raise GrmpiqaError(
            f"scikit-image sample image {name!r} is not available ({err}); pass your own "
            "pristine photos with --pristine DIR"
        ) from None
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return arr[..., :3].astype(np.uint8)


def _shrink(img: Image.Image, side: int) -> Image.Image:
    img = img.convert("RGB")
    scale = side / max(img.size)
    if scale < 1:
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
            Image.Resampling.LANCZOS,
        )
    return img


def demo_images(
    out: Path, side: int, pristine: str | os.PathLike[str] | None = None
) -> tuple[Path, Path]:
    """Write the task and target references (PNG, longest side ``side``) to OUT/pristine.

    From scikit-image's sample photos, or, with ``pristine``, from a folder of your own
    (sorted; the first ~55% become task references, the rest targets, at least 2 of
    each; at least :data:`MIN_PRISTINE` photos).
    """
    files: list[Path] = []
    if pristine is not None:
        src = Path(pristine)
        if not src.is_dir():
            raise GrmpiqaError(f"{src}: --pristine folder not found")
        files = sorted(p for p in src.iterdir() if p.is_file() and is_image_file(p))
        files = [p for p in files if not p.name.startswith(".")]
        if len(files) < MIN_PRISTINE:
            raise GrmpiqaError(
                f"{src}: {len(files)} images; the demo needs at least {MIN_PRISTINE} pristine "
                "photos (2 for stage-1 tasks, 2 for the target set)"
            )
    task_dir, target_dir = out / "pristine" / "tasks", out / "pristine" / "target"
    for d in (task_dir, target_dir):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            if old.is_file():
                old.unlink()
    if pristine is None:
        groups = [(task_dir, _TASK_IMAGES), (target_dir, _TARGET_IMAGES)]
        for folder, names in groups:
            for name in names:
                img = _shrink(Image.fromarray(_skimage_image(name)), side)
                with atomic_path(folder / f"{name}.png") as tmp:
                    img.save(tmp, format="PNG")
        return task_dir, target_dir
    n_task = max(2, round(0.55 * len(files)))
    n_task = min(n_task, len(files) - 2)
    for i, f in enumerate(files):
        folder = task_dir if i < n_task else target_dir
        img = _shrink(load_image(f), side)
        with atomic_path(folder / f"{f.stem}.png") as tmp:
            img.save(tmp, format="PNG")
    return task_dir, target_dir


# --- backbone -------------------------------------------------------------------------------


def _resolve_backbone(
    backbone: str | None, pretrained: Any, device: str, seed: int, quick: bool
) -> tuple[QualityModel, DemoPlan]:
    """The stage-1 model and its plan; test-tiny when the default weights are missing."""
    if backbone is not None or pretrained is not DEFAULT:
        plan = plan_for(quick, tiny=backbone == TINY)
        cfg = ModelConfig(vpt_tokens=plan.vpt_tokens)
        return create_model(backbone, pretrained, device=device, seed=seed, config=cfg), plan
    plan = plan_for(quick, tiny=False)
    try:
        cfg = ModelConfig(vpt_tokens=plan.vpt_tokens)
        return create_model(device=device, seed=seed, config=cfg), plan
    except BackboneError as err:
        _banner(
            [
                "NO PRETRAINED CLIP WEIGHTS ON THIS MACHINE:",
                *textwrap.wrap(str(err), 76),
                "The demo runs the whole pipeline on the built-in 'test-tiny' backbone",
                "with RANDOM weights. Every number it prints is MEANINGLESS: it only",
                "shows that the pipeline works. For real results pass --pretrained FILE",
                "(OpenAI ViT-B-16.pt) or run where the weights are cached.",
            ]
        )
    plan = plan_for(quick, tiny=True)
    cfg = ModelConfig(vpt_tokens=plan.vpt_tokens)
    return create_model(TINY, None, device=device, seed=seed, config=cfg), plan


# --- the pipeline -------------------------------------------------------------------------


def run_demo(
    out: str | os.PathLike[str] = "grmpiqa-demo",
    *,
    backbone: str | None = None,
    pretrained: Any = DEFAULT,
    device: str = "cpu",
    seed: int = 0,
    quick: bool = False,
    pristine: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run the demo pipeline into ``out`` (see the module docstring); return its results.

    ``backbone``/``pretrained`` choose the CLIP explicitly; by default the real backbone
    is tried and ``test-tiny`` (random, announced) used when its weights are missing.
    """
    threads = torch.get_num_threads()
    try:
        return _run_demo(out, backbone, pretrained, device, seed, quick, pristine, progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    out: str | os.PathLike[str],
    backbone: str | None,
    pretrained: Any,
    device: str,
    seed: int,
    quick: bool,
    pristine: str | os.PathLike[str] | None,
    progress: bool,
) -> DemoResult:
    from grmpiqa.data import load_dataset
    from grmpiqa.data.synth import synthesize
    from grmpiqa.evaluation import ProtocolConfig, format_summary, run_protocol
    from grmpiqa.finetune import FinetuneConfig
    from grmpiqa.metatrain import PretrainConfig, pretrain
    from grmpiqa.report import write_json

    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)

    _say("[1/5] loading the CLIP backbone")
    t = time.perf_counter()
    model, plan = _resolve_backbone(backbone, pretrained, device, seed, quick)
    random_bb = model.backbone_pretrained.get("kind") == "random"
    _say(f"      backbone: {model.describe_backbone()}")
    if model.backbone_name == TINY:
        # The tiny model's matrices are too small to gain from several threads, and on a
        # busy machine oversubscribed threads make it many times slower.
        torch.set_num_threads(1)
    seconds["backbone"] = time.perf_counter() - t

    _say("[2/5] synthesising distortions of the sample photos")
    t = time.perf_counter()
    task_src, target_src = demo_images(root, plan.image_side, pristine)
    for src, dst, types in (
        (task_src, "tasks", plan.task_types),
        (target_src, "target", plan.target_types),
    ):
        synthesize(
            src, root / dst, types=list(types), levels=plan.levels, seed=seed, progress=progress
        )
    tasks = load_dataset(f"kadid:{root / 'tasks'}")
    target = load_dataset(f"kadid:{root / 'target'}")
    plan = _fit_shots(plan, target, seed)
    _say(
        f"      {len(tasks)} task images ({len(plan.task_types)} distortion types), "
        f"{len(target)} target images ({len(plan.target_types)} types, other contents)"
    )
    seconds["synthesis"] = time.perf_counter() - t

    _say(f"[3/5] stage 1: meta-prompt pre-training, {plan.pretrain_epochs} epoch(s)")
    t = time.perf_counter()
    stage1 = root / "stage1.safetensors"
    pcfg = PretrainConfig(
        epochs=plan.pretrain_epochs,
        support_batch=plan.support_batch,
        query_batch=plan.query_batch,
        images_per_task=plan.images_per_task,
        seed=seed,
    )
    pretrain(model, [tasks], pcfg, stage1, overwrite=True, progress=progress)
    del model
    seconds["pretrain"] = time.perf_counter() - t

    _say(
        f"[4/5] stage 2 + evaluation: {plan.splits} splits, {plan.shots} shots, "
        f"up to {plan.max_epochs} epochs each"
    )
    t = time.perf_counter()
    report_dir = root / "report"
    ft = FinetuneConfig(
        max_epochs=plan.max_epochs,
        eval_every=plan.eval_every,
        cache_augmentations=plan.cache_augmentations,
        seed=seed,
    )
    pc = ProtocolConfig(
        method="grmp",
        shots=plan.shots,
        splits=plan.splits,
        seed=seed,
        init=str(stage1),
        finetune=ft,
        device=device,
    )
    result = run_protocol(
        target, pc, report_dir=report_dir, progress=progress, keep_checkpoints=True
    )
    seconds["finetune_evaluate"] = time.perf_counter() - t

    _say("[5/5] scoring held-out target images with split 0's model")
    t = time.perf_counter()
    ckpt = report_dir / "splits" / "split_0.safetensors"
    scores = _score_heldout(ckpt, target, result.splits[0].test_indices, device)
    seconds["score"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_all

    write_json(
        root / "demo.json",
        {
            "backbone": result.config["backbone_description"],
            "random_backbone": random_bb,
            "quick": quick,
            "plan": plan.__dict__,
            "stage1": stage1.name,
            "report": "report/report.json",
            "checkpoint": str(ckpt.relative_to(root)),
            "summary": result.summary,
            "scores": scores,
            "seconds": seconds,
        },
    )
    _write_scores_csv(root / "scores.csv", scores)
    text = "\n".join(
        [
            format_summary(result),
            _scores_table(scores),
            f"report:     {report_dir / 'report.md'}",
            f"checkpoint: {ckpt}  (grmpiqa score --checkpoint {ckpt} PHOTOS...)",
            f"total time: {seconds['total']:.0f} s",
        ]
    )
    notice = None
    if random_bb:
        notice = banner(
            [
                "These numbers come from a RANDOM backbone: the pipeline ran, the",
                "scores mean nothing.",
            ]
        )
    return DemoResult(
        out=root,
        backbone=result.config["backbone_description"],
        random_backbone=random_bb,
        stage1=stage1,
        report=report_dir,
        checkpoint=ckpt,
        summary=result.summary,
        scores=scores,
        seconds=seconds,
        text=text,
        notice=notice,
    )


def _fit_shots(plan: DemoPlan, target: Any, seed: int) -> DemoPlan:
    """The plan with at most as many shots as the smallest pool of its splits holds.

    With few target contents (a small ``pristine=DIR``) the pool of a split is one or two
    contents; the shots shrink to fit, and the demo says so.
    """
    from grmpiqa.data import make_splits

    pools = [len(s.pool) for s in make_splits(target, seed, plan.splits, shots=None)]
    if plan.shots <= min(pools):
        return plan
    _say(
        f"      only {len(target.refs())} target contents: {min(pools)} shots per split "
        f"(the plan's {plan.shots} do not fit in the pool)"
    )
    return replace(plan, shots=min(pools))


def _score_heldout(
    checkpoint: Path, target: Any, test_indices: Sequence[int], device: str
) -> list[dict[str, Any]]:
    """Scores of split 0's test images, ordered by distortion type and level."""
    model = create_model(checkpoint=checkpoint, device=device)
    items = [target[i] for i in test_indices]
    pred = model.score([it.path for it in items]).tolist()
    rows = [
        {
            "image": it.name,
            "ref": it.ref,
            "type": it.dist_type,
            "level": it.dist_level,
            "label": it.label,
            "score": s,
        }
        for it, s in zip(items, pred, strict=True)
    ]
    rows.sort(key=lambda r: (str(r["type"]), int(r["level"] or 0)))
    return rows


def _scores_table(rows: list[dict[str, Any]]) -> str:
    """One line per distortion type: scores at levels 1..5 (should fall with the level)."""
    from grmpiqa.data.distortions import list_distortions

    type_names = {d.id: d.name for d in list_distortions()}
    by_type: dict[str, dict[int, float]] = {}
    for r in rows:
        by_type.setdefault(str(r["type"]), {})[int(r["level"] or 0)] = float(r["score"])
    levels = sorted({lv for d in by_type.values() for lv in d})
    head = f"{'held-out image, distortion':<38}" + "".join(f"  level {lv}" for lv in levels)
    lines = ["scores of a content never seen in training (higher = better quality):", head]
    for t, d in sorted(by_type.items()):
        name = type_names.get(int(t), t) if t.isdigit() else t
        ref = next(r["ref"] for r in rows if str(r["type"]) == t)
        label = f"I{ref} {name}"
        lines.append(f"{label:<38}" + "".join(f"  {d.get(lv, float('nan')):7.4f}" for lv in levels))
    return "\n".join(lines)


def _write_scores_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "ref", "type", "level", "label", "score"])
        for r in rows:
            w.writerow(
                [r["image"], r["ref"], r["type"], r["level"], r["label"], repr(float(r["score"]))]
            )
