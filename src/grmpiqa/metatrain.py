"""Meta-prompt pre-training, stage 1 of GRMP-IQA (method.md 6).

Tasks are the distortion types of synthetic-distortion databases (``kadid:``,
``tid2013:``, ``grmpiqa synth`` output). Every epoch each task is split again into
support (80%) and query (20%) sets, the databases are run in the order given and, after
all tasks of a database, the prompts are moved towards the task-adapted ones (Reptile,
first order)::

    theta <- theta + outer_lr * mean_i(phi_i - theta)

Only the prompt parameters train (``STAGE1_GROUPS``); every CLIP weight stays frozen and
bit-identical. Two variants:

* ``reptile`` (default, textbook): for every task phi starts from theta with a fresh
  inner Adam; the model ends each epoch holding theta. Its step sizes are its own
  (``VARIANT_DEFAULTS``, chosen by measurement, docs/pretraining.md): with the
  authors' values (inner Adam 1e-4, one step per batch of 75, outer 0.01) a reset inner
  model moves theta by about 1e-6 per epoch and nothing is learned (method.md 6).
* ``released``: what the authors' ``pretrain.py`` does. A separate inner model phi is
  never reset to theta: it trains on sequentially across all tasks and epochs. The
  tasks of the *first* database share one inner Adam, carried over from the last Adam
  used (across epochs too); every later database creates a fresh Adam for each of its
  tasks, which then carries on into the next epoch's first database. theta (the saved
  prompts) follows the same outer interpolation towards the snapshots phi_i. Its
  defaults are the authors' hyper-parameters.

Every random choice (split, task order, augmentation, prompt dropout) is derived from
``(seed, epoch, database, task)``, so a run stopped after epoch k and resumed from its
state file ends with exactly the prompts of an uninterrupted run.

Under torchrun (:mod:`grmpiqa.distributed`) ``reptile`` shares each meta-step's tasks
out over the ranks and ends with the prompts of one process, bit for bit; ``released``
runs its sequential chain on every rank (docs/distributed.md). Rank 0 writes the files.

Example:
    >>> import grmpiqa
    >>> config = grmpiqa.ModelConfig()  # learned prompts (without it: zero-shot)
    >>> model = grmpiqa.create_model("test-tiny", None, config=config)  # doctest: +SKIP
    >>> cfg = grmpiqa.PretrainConfig(epochs=2)
    >>> cfg.inner_lr, cfg.outer_lr, cfg.inner_passes, cfg.support_batch, cfg.query_batch
    (0.001, 1.0, 3, 16, 4)
    >>> grmpiqa.PretrainConfig(variant="released").outer_lr
    0.01
    >>> grmpiqa.pretrain(model, ["kadid:synth"], cfg, "stage1.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from grmpiqa.checkpoint import save_checkpoint
from grmpiqa.config import (
    GPU_TASK_BATCH,
    OUTER_SCHEDULES,
    VARIANT_DEFAULTS,
    VARIANTS,
    PretrainConfig,
)
from grmpiqa.data import Dataset, Item, load_dataset
from grmpiqa.distributed import Context, current
from grmpiqa.errors import DatasetError, GrmpiqaError, TrainingError
from grmpiqa.gradient import first_nonfinite
from grmpiqa.log import get_logger
from grmpiqa.losses import quality_loss
from grmpiqa.model import STAGE1_GROUPS, QualityModel
from grmpiqa.pipeline import describe_device
from grmpiqa.precision import autocast
from grmpiqa.runs import (
    DEFAULT_SAVE_EVERY,
    RunFiles,
    RunState,
    SaveClock,
    optimizer_from_state,
    optimizer_to_state,
    rng_from_state,
    rng_to_state,
    stop_signals,
)
from grmpiqa.scoring.api import score as score_images
from grmpiqa.task_batch import StackedQualityModel, stacked_logits_autocast, task_quality_losses
from grmpiqa.transforms import normalize_uint8, stage1_stats, stats_for

__all__ = [
    "OUTER_SCHEDULES",
    "VARIANTS",
    "VARIANT_DEFAULTS",
    "GPU_TASK_BATCH",
    "PretrainConfig",
    "PretrainResult",
    "Task",
    "TaskDatabase",
    "build_tasks",
    "evaluate",
    "outer_lr_at",
    "pretrain",
    "log_path_for",
    "state_path_for",
]

#: The resume-state fields :func:`pretrain` reads, with their JSON types.
STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "fingerprint": dict,
    "epochs_done": int,
    "history": list,
    "best": dict,
    "rng": dict,
}

logger = get_logger("pretrain")

# Purposes mixed into the derived seeds, so no two random streams coincide.
_SPLIT, _AUGMENT, _DROPOUT, _ORDER, _SUBSAMPLE, _PASS = range(6)


@dataclass(frozen=True)
class _Steps:
    """The variant-dependent fields of a :class:`PretrainConfig`, resolved and typed."""

    inner_lr: float
    outer_lr: float
    outer_schedule: str
    inner_passes: int
    support_batch: int
    query_batch: int


def _steps(cfg: PretrainConfig) -> _Steps:
    return _Steps(**{f.name: getattr(cfg, f.name) for f in fields(_Steps)})


# Fields that may change when a run is resumed (they do not change the prompts; the task
# batch changes them only by float rounding).
_RESUMABLE_FIELDS = {"epochs", "cache_images", "task_batch"}


# -- tasks --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One stage-1 task: the images of one distortion type of one database."""

    database: str
    name: str
    items: tuple[Item, ...]

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class TaskDatabase:
    """A database's tasks (labels already normalised per database, method.md 6)."""

    spec: str
    tasks: tuple[Task, ...]

    @property
    def n_images(self) -> int:
        return sum(len(t) for t in self.tasks)


def build_tasks(
    datasets: Sequence[Dataset | str],
    max_tasks: int | None = None,
    images_per_task: int | None = None,
    seed: int = 0,
) -> list[TaskDatabase]:
    """One task per distortion type (``Dataset.groups()``) of every dataset, in order.

    Tasks with fewer than two images cannot be split and are skipped (with a note on
    stderr). Raises :class:`DatasetError` for unlabelled data or a database left with
    no task.
    """
    out: list[TaskDatabase] = []
    for d_index, ds_or_spec in enumerate(datasets):
        ds = load_dataset(ds_or_spec) if isinstance(ds_or_spec, str) else ds_or_spec
        if not ds.has_labels:
            raise DatasetError(f"{ds.spec}: stage-1 tasks need labelled images (MOS)")
        groups = ds.groups()
        names = sorted(groups)
        if max_tasks is not None:
            names = names[:max_tasks]
        tasks: list[Task] = []
        for t_index, name in enumerate(names):
            idx = list(groups[name])
            if images_per_task is not None and len(idx) > images_per_task:
                rng = np.random.default_rng(_seed_seq(seed, _SUBSAMPLE, d_index, t_index))
                idx = sorted(rng.choice(idx, size=images_per_task, replace=False).tolist())
            if len(idx) < 2:
                logger.warning(
                    "%s: distortion type %r has %d image; skipped (a task needs at least 2)",
                    ds.spec,
                    name,
                    len(idx),
                )
                continue
            tasks.append(Task(ds.spec, name, tuple(ds[i] for i in idx)))
        if not tasks:
            raise DatasetError(f"{ds.spec}: no distortion type with at least 2 images")
        out.append(TaskDatabase(ds.spec, tuple(tasks)))
    if not out:
        raise DatasetError("no task datasets given")
    return out


def _seed_seq(seed: int, *keys: int) -> list[int]:
    return [int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(k) for k in keys)]


def _derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``keys``."""
    state = np.random.SeedSequence(_seed_seq(seed, *keys)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def split_task(
    task: Task, fraction: float, seed: int, epoch: int, d_index: int, t_index: int
) -> tuple[list[int], list[int]]:
    """This epoch's (support, query) indices into ``task.items``, both in shuffled order."""
    n = len(task)
    n_support = min(n - 1, max(1, math.floor(fraction * n)))
    perm = np.random.default_rng(_seed_seq(seed, _SPLIT, epoch, d_index, t_index)).permutation(n)
    return perm[:n_support].tolist(), perm[n_support:].tolist()


# -- results and state ----------------------------------------------------------------------


@dataclass
class PretrainResult:
    """What :func:`pretrain` wrote and measured."""

    checkpoint: Path
    state: Path
    log: Path
    epochs_done: int
    history: list[dict[str, Any]] = field(default_factory=list)
    selection: str = "final"
    best_epoch: int | None = None


def state_path_for(out: str | os.PathLike[str]) -> Path:
    """The resume sidecar of a checkpoint: ``OUT`` with suffix ``.state.safetensors``."""
    return RunFiles(Path(out), "pretrain").state


def log_path_for(out: str | os.PathLike[str]) -> Path:
    """The default JSON-lines log of a run: ``OUT`` with suffix ``.log.jsonl``."""
    return RunFiles(Path(out), "pretrain").log


def _fingerprint(
    model: QualityModel, databases: Sequence[TaskDatabase], cfg: PretrainConfig, val: Dataset | None
) -> dict[str, Any]:
    """Everything that must match for ``--resume`` to continue the same run."""
    resumable = set(_RESUMABLE_FIELDS)
    if cfg.outer_schedule == "linear":  # the annealing horizon is --epochs: it must not change
        resumable.discard("epochs")
    conf = {k: v for k, v in cfg.to_dict().items() if k not in resumable}
    return {
        "config": conf,
        "tasks": [
            {"spec": db.spec, "tasks": {t.name: len(t) for t in db.tasks}} for db in databases
        ],
        "backbone": {"name": model.backbone_name, "pretrained": model.backbone_pretrained},
        "model_config": model.config.to_dict(),
        "val": val.spec if (val is not None and cfg.keep_best_val) else None,
    }


# -- the loop -----------------------------------------------------------------------------


class _ImageCache:
    """Decoded images at the two stage-1 input sizes (the transforms' first resize:
    256 and 224 for a 224-pixel backbone), as
    uint8 ``[3, S, S]`` tensors on the model's device; the support transform's flip and
    crop and both transforms' normalisation then run on the device (:func:`_support_view`,
    :func:`_query_view`), by the operations of the PIL transforms
    (:func:`~grmpiqa.transforms.stage1_support_transform`), hence the same numbers.

    Resizing here and again (a no-op) in the transform gives the same pixels as the
    transform alone, so caching never changes results.
    """

    def __init__(self, enabled: bool, device: torch.device | str = "cpu") -> None:
        self.enabled = enabled
        self.device = torch.device(device)
        self._store: dict[tuple[Path, int], torch.Tensor] = {}

    def get(self, item: Item, size: int) -> torch.Tensor:
        key = (item.path, size)
        px = self._store.get(key)
        if px is None:
            img = item.load().resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
            px = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().to(self.device)
            if self.enabled:
                self._store[key] = px
        return px


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (labels) on ``device`` without waiting for the GPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class _ViewSpec:
    """Stage 1's input views for a backbone (method.md 6): normalisation statistics
    (:func:`~grmpiqa.transforms.stage1_stats`) and input size (224 for ViT-B/16; the
    support images are first resized to 256 / 224 of it)."""

    mean: list[float]
    std: list[float]
    size: int = 224

    @property
    def big(self) -> int:
        return int(round(self.size * 256 / 224))

    @classmethod
    def of(cls, cfg: PretrainConfig, model: QualityModel) -> _ViewSpec:
        mean, std = stats_for(stage1_stats(cfg.stats, model.preprocess.stats))
        return cls(list(mean), list(std), int(model.preprocess.crop))


def _normalized(px: torch.Tensor, spec: _ViewSpec) -> torch.Tensor:
    """``to_tensor`` (float, / 255) then ``normalize``, as the PIL transforms do (on the
    pixels' device, one image or a batch)."""
    return normalize_uint8(px, spec.mean, spec.std)


def _support_crop(px: torch.Tensor, rng: random.Random, spec: _ViewSpec) -> torch.Tensor:
    """The stage-1 support transform's flip and crop of a ``big`` x ``big`` uint8 image:
    flip half of the time, then a random ``size`` crop, the draws of the PIL transform
    in its order."""
    if rng.random() < 0.5:
        px = px.flip(-1)
    span = px.shape[-1] - spec.size
    top, left = rng.randint(0, span), rng.randint(0, span)
    return px[:, top : top + spec.size, left : left + spec.size]


def _support_view(px: torch.Tensor, rng: random.Random, spec: _ViewSpec) -> torch.Tensor:
    """The stage-1 support transform of one image (:func:`_support_crop`, normalised)."""
    return _normalized(_support_crop(px, rng, spec), spec)


def _query_view(px: torch.Tensor, spec: _ViewSpec) -> torch.Tensor:
    """The stage-1 query transform of a ``size`` x ``size`` image (no randomness)."""
    return _normalized(px, spec)


@contextlib.contextmanager
def _holding(
    params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Temporarily copy ``values`` into ``params`` (e.g. theta while phi trains)."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    _assign(params, values)
    try:
        yield
    finally:
        _assign(params, saved)


def _assign(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])


def _snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def _to_cpu(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: v.detach().cpu().clone() for n, v in t.items()}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def evaluate(
    model: QualityModel, dataset: Dataset, precision: str = "fp32", batch_size: int = 32
) -> dict[str, float | None]:
    """SRCC and PLCC (raw, no logistic fit) of the model's scores against the labels."""
    from scipy.stats import pearsonr, spearmanr

    if not dataset.has_labels:
        raise DatasetError(f"{dataset.spec}: the validation set needs labels (MOS)")
    if len(dataset) < 3:
        raise DatasetError(f"{dataset.spec}: the validation set needs at least 3 images")
    scores = score_images(model, dataset.paths, batch_size, precision=precision).numpy()
    labels = dataset.labels
    if np.ptp(scores) == 0 or np.ptp(labels) == 0:
        return {"srcc": None, "plcc": None}
    return {
        "srcc": _finite(float(spearmanr(scores, labels)[0])),
        "plcc": _finite(float(pearsonr(scores, labels)[0])),
    }


def pretrain(
    model: QualityModel,
    task_datasets: Sequence[Dataset | str],
    config: PretrainConfig | None = None,
    out: str | os.PathLike[str] = "pretrain.safetensors",
    resume: bool = False,
    val: Dataset | str | None = None,
    *,
    log: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    save_every: float = DEFAULT_SAVE_EVERY,
) -> PretrainResult:
    """Meta-prompt pre-training (method.md 6); the model ends holding the written prompts.

    Args:
        model: the quality model to adapt (its prompts are the initial theta).
        task_datasets: datasets or specs with distortion types; run in this order.
        config: hyper-parameters (default :class:`PretrainConfig`).
        out: the ``.safetensors`` checkpoint, written when the run ends (with
            ``keep_best_val``: whenever the best validation epoch changes); the resume
            state goes beside it (``stage1.safetensors`` -> ``stage1.state.safetensors``).
        resume: continue from the last saved state (which must come from the same
            tasks, seed, variant and hyper-parameters; ``config.epochs`` may be larger).
            Without a state file it starts afresh.
        val: optional validation set: SRCC/PLCC logged every epoch (never a test set).
        log: JSON-lines log (default ``stage1.log.jsonl`` beside ``out``; appended to
            on resume).
        overwrite: allow replacing the state of an earlier run without ``resume``.
        progress: tqdm bars (epochs, tasks) on stderr.
        save_every: seconds between writes of the resume state (issue 21), checked after
            every task (or task batch) and epoch; the state is also written at the end
            and when SIGINT or SIGTERM stops the run (which then raises
            :class:`~grmpiqa.runs.RunInterrupted`). ``0``: at every such point.
    """
    cfg = config or PretrainConfig()
    out = Path(out)
    ctx = current()
    progress = progress and ctx.is_main
    if cfg.keep_best_val and val is None:
        raise GrmpiqaError("keep_best_val needs a validation set (--val SPEC)")
    cfg = _resolve_task_batch(cfg, model.device, ctx)
    databases = build_tasks(task_datasets, cfg.max_tasks, cfg.images_per_task, cfg.seed)
    val_ds = load_dataset(val) if isinstance(val, str) else val
    if val_ds is not None and not val_ds.has_labels:
        raise DatasetError(f"{val_ds.spec}: the validation set needs labels (MOS)")
    fingerprint = _fingerprint(model, databases, cfg, val_ds)

    model.set_trainable(STAGE1_GROUPS)
    params = model.trainable_parameters()
    if not params:
        raise GrmpiqaError(
            "the model has no prompt parameters to pre-train (hand prompts, such as the "
            "zero-shot model create_model builds without a checkpoint); build it with "
            "config=ModelConfig()"
        )
    plist = list(params.values())
    device = model.device

    theta = _snapshot(params)
    theta0 = _to_cpu(theta)  # the initial prompts: displacements are measured from here
    groups = _group_names(model, params)
    inner_opt: torch.optim.Optimizer | None = None
    if cfg.variant == "released":
        inner_opt = _adam(plist, _steps(cfg).inner_lr)
    start_epoch = 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "srcc": None, "theta": None}
    rng_states: RunState | None = None
    partial: _Partial | None = None

    run = ctx.run_files(RunFiles(out, "pretrain", log=Path(log) if log is not None else Path()))
    state_path, log_path = run.state, run.log
    if ctx.start_run(run, resume, overwrite):
        state = run.load_state(expect=STATE_FIELDS)
        run.check_resume(
            state.record.get("fingerprint", {}),
            fingerprint,
            "resume with the same tasks and settings (only --epochs may grow) or start again "
            "with --overwrite",
            first=("config.variant",),
        )
        start_epoch = int(state.record["epochs_done"])
        saved_theta = state.take("theta")  # in the parameters' order (sums over them)
        theta = {n: saved_theta[n].to(device) for n in params if n in saved_theta}
        _assign(params, {n: v.to(device) for n, v in state.take("phi").items()})
        if inner_opt is not None and state.record.get("inner_optimizer") is not None:
            optimizer_from_state(
                inner_opt, state.tensors, state.record["inner_optimizer"], "inner_optimizer"
            )
        history = list(state.record.get("history", []))
        best = dict(state.record.get("best", best))
        best_theta = state.take("best_theta")
        best["theta"] = best_theta or None
        theta0 = state.take("theta0") or theta0  # states written before 0.2 lack it
        rng_states = state
        partial = _Partial.from_state(state, device)
        run.trim_log(lambda r: int(r.get("epoch", 0)) <= start_epoch)
        if partial is not None:  # the tasks of the interrupted epoch that the state holds
            for rec in partial.records:
                run.append_log(rec)
    else:
        if resume:
            logger.info("%s not found; starting from epoch 1", state_path)
        run.trim_log(lambda r: False)
    ctx.barrier()  # every rank has read the state before rank 0 rewrites it

    result = PretrainResult(out, state_path, log_path, start_epoch, history)
    result.selection = "best-val" if cfg.keep_best_val else "final"
    result.best_epoch = best.get("epoch")
    if start_epoch >= cfg.epochs:
        logger.info("%s: %d epochs already done (asked for %d)", out, start_epoch, cfg.epochs)
        _assign(params, best["theta"] if cfg.keep_best_val and best.get("theta") else theta)
        return result

    cache = _ImageCache(cfg.cache_images, device)
    stats = _ViewSpec.of(cfg, model)
    n_tasks = sum(len(db.tasks) for db in databases)
    fork_devices: list[int] = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    model.train()
    sharded = ctx.is_distributed and cfg.variant == "reptile"
    task_batch = int(cfg.task_batch or 1)
    stacked = StackedQualityModel(model) if task_batch > 1 else None
    if ctx.is_distributed:
        _log_sharding(ctx, run, cfg, start_epoch)
    clock = SaveClock(save_every)

    def save(epochs_done: int, where: _Partial | None = None) -> None:
        _save_run_state(
            run, fingerprint, cfg, epochs_done, theta, params, inner_opt, history, best,
            theta0, where,
        )  # fmt: skip
        clock.saved()

    with torch.random.fork_rng(devices=fork_devices), contextlib.ExitStack() as stack:
        stop = stack.enter_context(stop_signals())
        if rng_states is not None:
            rng_from_state(rng_states.tensors, rng_states.record["rng"])
        ebar = stack.enter_context(
            tqdm(
                total=cfg.epochs,
                initial=start_epoch,
                desc="pretrain",
                unit="epoch",
                disable=not progress,
                dynamic_ncols=True,
            )
        )
        for epoch in range(start_epoch, cfg.epochs):
            resumed = partial if partial is not None and partial.epoch == epoch else None
            partial = None
            t_epoch = time.perf_counter() - (resumed.seconds if resumed else 0.0)
            tbar = tqdm(
                total=n_tasks,
                desc=f"epoch {epoch + 1}",
                unit="task",
                leave=False,
                disable=not progress,
                dynamic_ncols=True,
            )
            epoch_records: list[dict[str, Any]] = list(resumed.records) if resumed else []
            theta_start = dict(resumed.theta_start) if resumed else _to_cpu(theta)
            if resumed:
                tbar.update(len(epoch_records))
            for d_index, db in enumerate(databases):
                if resumed is not None and d_index < resumed.database:
                    continue
                order = list(range(len(db.tasks)))
                if cfg.shuffle_tasks:
                    rng = np.random.default_rng(_seed_seq(cfg.seed, _ORDER, epoch, d_index))
                    order = rng.permutation(len(order)).tolist()
                done = 0
                delta = {n: torch.zeros_like(v) for n, v in theta.items()}
                if resumed is not None and d_index == resumed.database:
                    done, delta = resumed.done, resumed.delta
                    resumed = None
                if sharded:  # the tasks over the ranks, delta as in one process
                    epoch_records += _share_tasks(
                        ctx, run, model, params, theta, delta, db, d_index, order, cfg, cache,
                        stats, epoch, tbar,
                    )  # fmt: skip
                    done = len(order)
                per = task_batch if stacked is not None else 1
                for group in _task_groups(db, order[done:], per) if not sharded else ():
                    if stacked is not None and len(group) > 1:
                        outcomes = _adapt_batched(
                            stacked, theta, db, d_index, group, cfg, cache, stats, epoch
                        )
                    else:
                        t_index = group[0]
                        opt: torch.optim.Optimizer
                        if cfg.variant == "reptile":
                            opt = _reptile_start(params, theta, cfg)
                        else:  # released: no reset; fresh Adam only after the first database
                            if d_index > 0 or inner_opt is None:
                                inner_opt = _adam(plist, _steps(cfg).inner_lr)
                            opt = inner_opt
                        outcomes = [
                            _adapt(
                                model,
                                params,
                                theta,
                                opt,
                                db,
                                d_index,
                                t_index,
                                cfg,
                                cache,
                                stats,
                                epoch,
                            )  # fmt: skip
                        ]
                    for moved, rec in outcomes:
                        with torch.no_grad():
                            for n in delta:
                                delta[n] += moved[n]
                        epoch_records.append(rec)
                        run.append_log(rec)
                        tbar.set_postfix(
                            task=f"{Path(db.spec).name}/{rec['task']}",
                            q=f"{rec['query_loss']:.3f}",
                        )
                        tbar.update(1)
                    done += len(group)
                    # a safe point inside the epoch (one process; torchrun: epochs only)
                    last = done == len(order) and d_index == len(databases) - 1
                    inside = not last and not ctx.is_distributed
                    if inside and (stop.requested or clock.due()):
                        where = _Partial(
                            epoch, d_index, done, delta, theta_start, epoch_records,
                            time.perf_counter() - t_epoch,
                        )  # fmt: skip
                        save(epoch, where)
                        if stop.requested:
                            tbar.close()
                            raise stop.interrupted(
                                f"{run.state} holds epoch {epoch + 1} up to task "
                                f"{len(epoch_records)} of {n_tasks}"
                            )
                with torch.no_grad():  # outer step (Reptile, first order)
                    k = float(len(order))
                    step = outer_lr_at(cfg, epoch)
                    for n in theta:
                        theta[n] = theta[n] + step * (delta[n] / k)
            tbar.close()
            if cfg.variant == "reptile":
                _assign(params, theta)

            summary: dict[str, Any] = {
                "epoch": epoch + 1,
                "event": "epoch",
                "support_loss": _mean(r["support_loss"] for r in epoch_records),
                "query_loss": _mean(r["query_loss"] for r in epoch_records),
                "inner_displacement": _mean(r["inner_displacement"] for r in epoch_records),
                "outer_lr": outer_lr_at(cfg, epoch),
                **_displacements(theta, theta_start, theta0, groups),
                "seconds": round(time.perf_counter() - t_epoch, 3),
            }
            improved = False
            if val_ds is not None:
                with _holding(params, theta):  # rank 0 scores, every rank gets its figures
                    figures = ctx.from_main(lambda: evaluate(model, val_ds, cfg.precision))
                model.train()
                summary.update(
                    {
                        "val_spec": val_ds.spec,
                        "val_srcc": figures["srcc"],
                        "val_plcc": figures["plcc"],
                    }
                )
                score = figures["srcc"] if figures["srcc"] is not None else -math.inf
                prev = best["srcc"] if best.get("srcc") is not None else -math.inf
                if best.get("epoch") is None or score > prev:
                    best = {"epoch": epoch + 1, "srcc": figures["srcc"], "theta": _to_cpu(theta)}
                    improved = True
            history.append(summary)
            run.append_log(summary)

            final = epoch + 1 == cfg.epochs
            extra = _metadata(cfg, databases, epoch + 1, history, val_ds, best)
            extra.update(ctx.describe())  # world_size (and backend)
            extra["device"] = describe_device(model.device)
            # the checkpoint: at the end (the last epoch), or with --keep-best-val when
            # the best epoch changes; written before the state that says it is done
            if ((cfg.keep_best_val and improved) or (final and not cfg.keep_best_val)) and (
                ctx.is_main
            ):
                with _holding(params, theta):
                    save_checkpoint(model, out, extra=extra)
            interrupted = ctx.any(stop.requested)
            if final or interrupted or clock.due():
                save(epoch + 1)
            result.epochs_done = epoch + 1
            result.best_epoch = best.get("epoch")
            postfix = {
                "s": f"{summary['support_loss']:.3f}",
                "q": f"{summary['query_loss']:.3f}",
                "|theta-theta0|": f"{summary['displacement']['total']:.2e}",
            }
            if val_ds is not None and summary.get("val_srcc") is not None:
                postfix["val_srcc"] = f"{summary['val_srcc']:.3f}"
            ebar.set_postfix(postfix)
            ebar.update(1)
            if interrupted and not final:
                raise stop.interrupted(f"{run.state} holds epoch {epoch + 1}")
    model.eval()
    # The model ends holding what the checkpoint holds.
    _assign(params, best["theta"] if cfg.keep_best_val and best.get("theta") else theta)
    result.history = history
    return result


@dataclass
class _Partial:
    """Where an interrupted epoch stands (a state saved between its tasks): tasks
    ``0..done-1`` of database ``database``'s order are done, ``delta`` is their summed
    ``phi_i - theta``, ``records`` the epoch's task records so far."""

    epoch: int
    database: int
    done: int
    delta: dict[str, torch.Tensor]
    theta_start: dict[str, torch.Tensor]
    records: list[dict[str, Any]]
    seconds: float

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"delta/{n}": v for n, v in self.delta.items()}
        tensors.update({f"theta_start/{n}": v for n, v in self.theta_start.items()})
        record = {
            "epoch": self.epoch,
            "database": self.database,
            "done": self.done,
            "records": self.records,
            "seconds": self.seconds,
        }
        return tensors, record

    @classmethod
    def from_state(cls, state: RunState, device: torch.device) -> _Partial | None:
        rec = state.record.get("partial")
        if not isinstance(rec, dict):
            return None
        try:
            return cls(
                int(rec["epoch"]),
                int(rec["database"]),
                int(rec["done"]),
                {n: v.to(device) for n, v in state.take("delta").items()},
                state.take("theta_start"),
                [dict(r) for r in rec["records"]],
                float(rec["seconds"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise GrmpiqaError(f"the resume state's partial epoch is unusable ({err})") from None


def _resolve_task_batch(cfg: PretrainConfig, device: torch.device, ctx: Context) -> PretrainConfig:
    """``task_batch=None`` (auto): 1 on the CPU (the serial loop, unchanged numbers), up to
    :data:`GPU_TASK_BATCH` ``reptile`` tasks at once on a GPU; ``released`` is a chain
    of tasks and always runs them one by one."""
    tb = cfg.task_batch
    if cfg.variant == "released":
        if tb is not None and tb > 1:
            raise GrmpiqaError(
                "variant released carries one inner model from task to task: its tasks "
                "cannot be batched (--task-batch 1)"
            )
        tb = 1
    elif ctx.is_distributed:
        tb = 1  # the ranks share the tasks out instead
    elif tb is None:
        tb = GPU_TASK_BATCH if device.type == "cuda" else 1
    return replace(cfg, task_batch=tb)


def _log_sharding(ctx: Context, run: RunFiles, cfg: PretrainConfig, start_epoch: int) -> None:
    """Say (stderr and the JSON-lines log) how the ranks share the work."""
    if cfg.variant == "reptile":
        how = (
            f"each meta-step's tasks over {ctx.world_size} ranks (task t on rank t mod "
            f"{ctx.world_size}); phi_i - theta of every task all-reduced and summed in task order"
        )
    else:
        how = (
            "variant released carries one inner model through the tasks in sequence: "
            f"nothing is shared out, each of the {ctx.world_size} ranks runs the whole loop"
        )
    if ctx.is_main:
        logger.info("pretrain on %d ranks (%s): %s", ctx.world_size, ctx.backend, how)
    run.append_log(
        {"event": "distributed", "epoch": start_epoch, **ctx.describe(), "sharding": how}
    )


def _share_tasks(
    ctx: Context,
    run: RunFiles,
    model: QualityModel,
    params: dict[str, torch.nn.Parameter],
    theta: dict[str, torch.Tensor],
    delta: dict[str, torch.Tensor],
    db: TaskDatabase,
    d_index: int,
    order: list[int],
    cfg: PretrainConfig,
    cache: _ImageCache,
    stats: _ViewSpec,
    epoch: int,
    tbar: Any,
) -> list[dict[str, Any]]:
    """One reptile meta-step over the ranks (:meth:`Context.share_tasks`): this rank
    runs the inner loop of its tasks from theta; every task's ``phi_i - theta`` reaches
    every rank exactly and is added to ``delta`` in ``order``, as one process adds it.
    Returns (and logs, on rank 0) the task records in ``order``."""
    ran = 0

    def one(t_index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        nonlocal ran
        opt = _reptile_start(params, theta, cfg)
        out = _adapt(model, params, theta, opt, db, d_index, t_index, cfg, cache, stats, epoch)
        ran += 1
        tbar.update(1)
        return out

    records = []
    for moved, rec in ctx.share_tasks(order, theta, one):
        with torch.no_grad():
            for n in delta:
                delta[n] += moved[n]
        records.append(rec)
        run.append_log(rec)
    tbar.update(len(order) - ran)
    return records


def outer_lr_at(cfg: PretrainConfig, epoch: int) -> float:
    """The outer step size of 0-based ``epoch``: constant, or annealed linearly towards 0
    (``outer_lr * (1 - epoch / epochs)``, Nichol et al. 2018)."""
    st = _steps(cfg)
    lr = st.outer_lr
    if st.outer_schedule == "linear":
        return lr * (1.0 - epoch / cfg.epochs)
    return lr


def _reptile_start(
    params: dict[str, torch.nn.Parameter], theta: dict[str, torch.Tensor], cfg: PretrainConfig
) -> torch.optim.Optimizer:
    """Set phi_i to theta and return the fresh inner Adam of a ``reptile`` task."""
    _assign(params, theta)
    return _adam(list(params.values()), _steps(cfg).inner_lr)


def _adam(params: Sequence[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """The inner Adam: torch's default on the CPU (the numbers of every figure and of the
    released loop), the fused kernel on a GPU (one launch per step)."""
    if params and all(p.device.type == "cuda" for p in params):
        return torch.optim.Adam(list(params), lr=lr, fused=True)
    return torch.optim.Adam(list(params), lr=lr)


@dataclass
class _Plan:
    """One task's random choices in one epoch (method.md 6): its support/query split,
    augmentation and dropout streams, labels and query batches."""

    task: Task
    support: list[int]
    query: list[int]
    aug: random.Random
    labels: torch.Tensor
    q_batches: list[list[int]]
    keys: tuple[int, int, int]  # (epoch, database, task)


def _plan(task: Task, cfg: PretrainConfig, epoch: int, d_index: int, t_index: int) -> _Plan:
    support, query = split_task(task, cfg.support_fraction, cfg.seed, epoch, d_index, t_index)
    qbs = _steps(cfg).query_batch
    return _Plan(
        task,
        support,
        query,
        random.Random(_derive_seed(cfg.seed, _AUGMENT, epoch, d_index, t_index)),
        torch.tensor([it.label for it in task.items], dtype=torch.float32),
        [query[i : i + qbs] for i in range(0, len(query), qbs)],
        (epoch, d_index, t_index),
    )


def _pass_order(plan: _Plan, cfg: PretrainConfig, p: int) -> list[int]:
    """The support order of inner pass ``p`` (later passes: a fresh seeded order)."""
    if p == 0:
        return plan.support
    epoch, d_index, t_index = plan.keys
    rng = np.random.default_rng(_seed_seq(cfg.seed, _PASS, epoch, d_index, t_index, p))
    return [plan.support[i] for i in rng.permutation(len(plan.support))]


class _Problems:
    """Non-finite losses, gradients or prompts of inner steps, recorded on the device
    and read once per task (or task batch), so no step waits for the host."""

    def __init__(self) -> None:
        self.flags: torch.Tensor | None = None  # [loss, gradient, prompts]
        self.first_loss: torch.Tensor | None = None

    def record(self, losses: torch.Tensor, grads: list[torch.Tensor | None], params: Any) -> None:
        bad_loss = ~torch.isfinite(losses.detach()).all()
        bad_grad = first_nonfinite(grads)[0]
        bad_param = first_nonfinite(list(params))[0]
        flags = torch.stack([bad_loss, bad_grad, bad_param])
        values = losses.detach().reshape(-1)
        bad_at = (~torch.isfinite(values)).int().argmax().reshape(1)
        worst = values.index_select(0, bad_at).squeeze(0).float()  # a bad one, if any
        if self.flags is None or self.first_loss is None:
            self.flags, self.first_loss = flags, worst
        else:  # keep the first bad loss's value (NaN or inf) for the message
            self.first_loss = torch.where(~self.flags[0] & bad_loss, worst, self.first_loss)
            self.flags = self.flags | flags

    def check(self) -> None:
        if self.flags is None or self.first_loss is None:
            return
        loss, grad, param = (bool(f) for f in self.flags.tolist())
        if loss:
            raise TrainingError(
                f"the stage-1 loss became {float(self.first_loss)}; lower --inner-lr"
            )
        if grad:
            raise TrainingError("a stage-1 gradient became NaN or infinite; lower --inner-lr")
        if param:
            raise TrainingError("the stage-1 prompts became NaN or infinite; lower --inner-lr")


def _adapt(
    model: QualityModel,
    params: dict[str, torch.nn.Parameter],
    theta: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer,
    db: TaskDatabase,
    d_index: int,
    t_index: int,
    cfg: PretrainConfig,
    cache: _ImageCache,
    stats: _ViewSpec,
    epoch: int,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run one task's inner loop from the prompts the model holds: ``phi_i - theta``
    and the task's log record (losses, sizes, inner displacement, seconds)."""
    task = db.tasks[t_index]
    t0 = time.perf_counter()
    s_loss, q_loss, n_s, n_q = _run_task(
        model, opt, task, cfg, cache, stats, epoch, d_index, t_index
    )
    with torch.no_grad():
        moved = {n: p.detach() - theta[n] for n, p in params.items()}
    return moved, _task_record(db, task, epoch, s_loss, q_loss, n_s, n_q, moved, t0)


def _task_record(
    db: TaskDatabase,
    task: Task,
    epoch: int,
    s_loss: float,
    q_loss: float,
    n_s: int,
    n_q: int,
    moved: dict[str, torch.Tensor],
    t0: float,
) -> dict[str, Any]:
    return {
        "epoch": epoch + 1,
        "database": db.spec,
        "task": task.name,
        "support_loss": s_loss,
        "query_loss": q_loss,
        "n_support": n_s,
        "n_query": n_q,
        "inner_displacement": _norm(moved.values()),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _run_task(
    model: QualityModel,
    opt: torch.optim.Optimizer,
    task: Task,
    cfg: PretrainConfig,
    cache: _ImageCache,
    stats: _ViewSpec,
    epoch: int,
    d_index: int,
    t_index: int,
) -> tuple[float, float, int, int]:
    """Inner loop (method.md 6): per support batch one Adam step on it, then one on the
    next query batch (query batches cycle). Returns mean support/query losses."""
    plan = _plan(task, cfg, epoch, d_index, t_index)
    torch.manual_seed(_derive_seed(cfg.seed, _DROPOUT, epoch, d_index, t_index))
    device = model.device
    st = _steps(cfg)
    labels = plan.labels
    q_tensors: dict[int, torch.Tensor] = {}
    s_losses: list[torch.Tensor] = []
    q_losses: list[torch.Tensor] = []
    problems = _Problems()
    b = 0
    for p in range(st.inner_passes):
        order = _pass_order(plan, cfg, p)
        for start in range(0, len(order), st.support_batch):
            idx = order[start : start + st.support_batch]
            crops = [
                _support_crop(cache.get(task.items[i], stats.big), plan.aug, stats) for i in idx
            ]
            x = _normalized(torch.stack(crops), stats)  # one normalisation for the batch
            y = _to_device(labels[idx], device)
            s_losses.append(_step(model, opt, x, y, cfg.precision, problems))
            qb = b % len(plan.q_batches)
            b += 1
            if qb not in q_tensors:
                pixels = [cache.get(task.items[i], stats.size) for i in plan.q_batches[qb]]
                q_tensors[qb] = _normalized(torch.stack(pixels), stats)
            qy = _to_device(labels[plan.q_batches[qb]], device)
            q_losses.append(_step(model, opt, q_tensors[qb], qy, cfg.precision, problems))
    problems.check()
    both = torch.stack(s_losses + q_losses).tolist()  # the one read of this task
    return (
        _mean(both[: len(s_losses)]),
        _mean(both[len(s_losses) :]),
        len(plan.support),
        len(plan.query),
    )


def _step(
    model: QualityModel,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str,
    problems: _Problems,
) -> torch.Tensor:
    """One inner Adam step; the loss (on the device). Nothing is read back: a
    non-finite value is recorded in ``problems``."""
    opt.zero_grad(set_to_none=True)
    with autocast(model.device, precision):
        logits = model(x.to(model.device))
    loss = quality_loss(logits, y)
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    grads = [p.grad for p in params]
    opt.step()
    problems.record(loss, grads, params)
    return loss.detach()


def _adapt_batched(
    stacked: StackedQualityModel,
    theta: dict[str, torch.Tensor],
    db: TaskDatabase,
    d_index: int,
    group: Sequence[int],
    cfg: PretrainConfig,
    cache: _ImageCache,
    stats: _ViewSpec,
    epoch: int,
) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """:func:`_adapt` of the ``reptile`` tasks ``group`` (all of one size) at once, each
    from theta with its own fresh Adam (:mod:`grmpiqa.task_batch`): every task's split,
    augmentation, pass orders and dropout masks are those of the serial loop."""
    t0 = time.perf_counter()
    model = stacked.model
    device = model.device
    st = _steps(cfg)
    plans = [_plan(db.tasks[t], cfg, epoch, d_index, t) for t in group]
    generators = [
        torch.Generator(device=device).manual_seed(
            _derive_seed(cfg.seed, _DROPOUT, epoch, d_index, t)
        )
        for t in group
    ]
    phi = {
        n: v.detach().unsqueeze(0).repeat(len(group), *([1] * v.dim())).requires_grad_(True)
        for n, v in theta.items()
    }
    opt = _adam(list(phi.values()), st.inner_lr)
    labels = [pl.labels for pl in plans]
    q_tensors: dict[int, torch.Tensor] = {}
    s_losses: list[torch.Tensor] = []
    q_losses: list[torch.Tensor] = []
    problems = _Problems()
    b = 0

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        logits = stacked_logits_autocast(stacked, phi, x, cfg.precision, generators)
        losses = task_quality_losses(logits, y)
        losses.sum().backward()  # each copy gets its own task's gradient
        grads = [v.grad for v in phi.values()]
        opt.step()
        problems.record(losses, grads, phi.values())
        return losses.detach()

    for p in range(st.inner_passes):
        orders = [_pass_order(pl, cfg, p) for pl in plans]
        for start in range(0, len(orders[0]), st.support_batch):
            views, ys = [], []
            for pl, order, lab in zip(plans, orders, labels, strict=True):
                idx = order[start : start + st.support_batch]
                views += [
                    _support_crop(cache.get(pl.task.items[i], stats.big), pl.aug, stats)
                    for i in idx
                ]
                ys.append(lab[idx])
            x = _normalized(torch.stack(views), stats)
            s_losses.append(step(x, _to_device(torch.stack(ys), device)))
            qb = b % len(plans[0].q_batches)
            b += 1
            if qb not in q_tensors:
                pixels = [
                    cache.get(pl.task.items[i], stats.size)
                    for pl in plans
                    for i in pl.q_batches[qb]
                ]
                q_tensors[qb] = _normalized(torch.stack(pixels), stats)
            qy = torch.stack([lab[pl.q_batches[qb]] for pl, lab in zip(plans, labels, strict=True)])
            q_losses.append(step(q_tensors[qb], _to_device(qy, device)))
    problems.check()
    s_read = torch.stack(s_losses).tolist()  # [steps][task]: the one read of the group
    q_read = torch.stack(q_losses).tolist()
    out = []
    for k, pl in enumerate(plans):
        with torch.no_grad():
            moved = {n: phi[n][k].detach() - theta[n] for n in theta}
        s_loss = _mean(row[k] for row in s_read)
        q_loss = _mean(row[k] for row in q_read)
        rec = _task_record(
            db, pl.task, epoch, s_loss, q_loss, len(pl.support), len(pl.query), moved, t0
        )
        out.append((moved, rec))
    return out


def _task_groups(db: TaskDatabase, order: Sequence[int], size: int) -> list[list[int]]:
    """``order`` cut into groups of at most ``size`` consecutive tasks of equal length (a
    task batch needs the same step shapes)."""
    groups: list[list[int]] = []
    for t in order:
        if groups and len(groups[-1]) < size and len(db.tasks[groups[-1][0]]) == len(db.tasks[t]):
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _norm(tensors: Any) -> float:
    """L2 norm of a collection of tensors taken together."""
    return float(math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors)))


def _group_names(
    model: QualityModel, params: dict[str, torch.nn.Parameter]
) -> dict[str, list[str]]:
    """Trained tensor names by parameter group (``STAGE1_GROUPS``)."""
    out: dict[str, list[str]] = {}
    for g in STAGE1_GROUPS:
        names = [n for n in model.parameter_names([g]) if n in params]
        if names:
            out[g] = names
    return out


def _displacements(
    theta: dict[str, torch.Tensor],
    theta_start: dict[str, torch.Tensor],
    theta0: dict[str, torch.Tensor],
    groups: dict[str, list[str]],
) -> dict[str, Any]:
    """How far theta moved: from the run's initial prompts (``displacement``) and in this
    epoch (``step``), as L2 norms in total and per parameter group, plus the largest
    change of any single prompt value from the start (``max_abs_displacement``)."""
    now = _to_cpu(theta)
    total = {n: now[n] - theta0[n].to(now[n].dtype) for n in now}
    step = {n: now[n] - theta_start[n] for n in now}

    def by_group(d: dict[str, torch.Tensor]) -> dict[str, float]:
        rec = {"total": _norm(d.values())}
        rec.update({g: _norm(d[n] for n in names) for g, names in groups.items()})
        return rec

    return {
        "displacement": by_group(total),
        "step": by_group(step),
        "max_abs_displacement": max((float(v.abs().max()) for v in total.values()), default=0.0),
    }


def _mean(values: Any) -> float:
    vals = [float(v) for v in values]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _metadata(
    cfg: PretrainConfig,
    databases: Sequence[TaskDatabase],
    epochs_done: int,
    history: list[dict[str, Any]],
    val: Dataset | None,
    best: dict[str, Any],
) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "stage": "pretrain",
        "method": "method.md 6",
        "variant": cfg.variant,
        "epochs_done": epochs_done,
        "epochs_planned": cfg.epochs,
        "seed": cfg.seed,
        "tasks": [
            {"spec": db.spec, "types": [t.name for t in db.tasks], "images": db.n_images}
            for db in databases
        ],
        "config": cfg.to_dict(),
        "selection": "best-val" if cfg.keep_best_val else "final",
        "val": None,
    }
    if val is not None:
        extra["val"] = {
            "spec": val.spec,
            "metric_for_selection": "srcc" if cfg.keep_best_val else None,
            "figures": [
                {"epoch": h["epoch"], "srcc": h.get("val_srcc"), "plcc": h.get("val_plcc")}
                for h in history
            ],
        }
    if cfg.keep_best_val:
        extra["best_epoch"] = best.get("epoch")
        extra["best_val_srcc"] = best.get("srcc")
        extra["epochs_in_checkpoint"] = best.get("epoch")
    else:
        extra["epochs_in_checkpoint"] = epochs_done
    return extra


def _save_run_state(
    run: RunFiles,
    fingerprint: dict[str, Any],
    cfg: PretrainConfig,
    epochs_done: int,
    theta: dict[str, torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    inner_opt: torch.optim.Optimizer | None,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    theta0: dict[str, torch.Tensor],
    partial: _Partial | None = None,
) -> None:
    """The resume state after ``epochs_done`` epochs and, with ``partial``, some tasks of
    the next one (tensors + JSON, see grmpiqa.runs)."""
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"theta/{n}": v for n, v in theta.items()})
    tensors.update({f"phi/{n}": p.detach() for n, p in params.items()})
    tensors.update({f"theta0/{n}": v for n, v in theta0.items()})
    if best.get("theta"):
        tensors.update({f"best_theta/{n}": v for n, v in best["theta"].items()})
    record: dict[str, Any] = {
        "fingerprint": fingerprint,
        "config": cfg.to_dict(),
        "epochs_done": epochs_done,
        "history": history,
        "best": {"epoch": best.get("epoch"), "srcc": best.get("srcc")},
        "inner_optimizer": None,
        "partial": None,
    }
    if partial is not None:
        part_tensors, record["partial"] = partial.to_state()
        tensors.update(part_tensors)
    if inner_opt is not None:
        opt_tensors, record["inner_optimizer"] = optimizer_to_state(inner_opt, "inner_optimizer")
        tensors.update(opt_tensors)
    rng_tensors, record["rng"] = rng_to_state()
    tensors.update(rng_tensors)
    run.save_state(tensors, record)
