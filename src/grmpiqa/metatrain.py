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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from grmpiqa.checkpoint import save_checkpoint
from grmpiqa.config import OUTER_SCHEDULES, VARIANT_DEFAULTS, VARIANTS, PretrainConfig
from grmpiqa.data import Dataset, Item, load_dataset
from grmpiqa.distributed import Context, current
from grmpiqa.errors import DatasetError, GrmpiqaError, TrainingError
from grmpiqa.log import get_logger
from grmpiqa.losses import quality_loss
from grmpiqa.model import STAGE1_GROUPS, QualityModel
from grmpiqa.pipeline import describe_device
from grmpiqa.precision import autocast
from grmpiqa.runs import (
    RunFiles,
    RunState,
    optimizer_from_state,
    optimizer_to_state,
    rng_from_state,
    rng_to_state,
)
from grmpiqa.scoring.api import score as score_images
from grmpiqa.transforms import stage1_query_transform, stage1_stats, stage1_support_transform

__all__ = [
    "OUTER_SCHEDULES",
    "VARIANTS",
    "VARIANT_DEFAULTS",
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


# Fields that may change when a run is resumed (they do not change the prompts).
_RESUMABLE_FIELDS = {"epochs", "cache_images"}


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
    """Decoded images at the two stage-1 input sizes (the transforms' first resize).

    Resizing here and again (a no-op) in the transform gives the same pixels as the
    transform alone, so caching never changes results.
    """

    SUPPORT, QUERY = 256, 224

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._store: dict[tuple[Path, int], Image.Image] = {}

    def get(self, item: Item, size: int) -> Image.Image:
        key = (item.path, size)
        img = self._store.get(key)
        if img is None:
            img = item.load().resize((size, size), Image.Resampling.BILINEAR)
            if self.enabled:
                self._store[key] = img
        return img


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
) -> PretrainResult:
    """Meta-prompt pre-training (method.md 6); the model ends holding the written prompts.

    Args:
        model: the quality model to adapt (its prompts are the initial theta).
        task_datasets: datasets or specs with distortion types; run in this order.
        config: hyper-parameters (default :class:`PretrainConfig`).
        out: the ``.safetensors`` checkpoint, rewritten after every epoch; the resume
            state goes beside it (``stage1.safetensors`` -> ``stage1.state.safetensors``).
        resume: continue after the last completed epoch recorded in the state file
            (which must come from the same tasks, seed, variant and hyper-parameters;
            ``config.epochs`` may be larger). Without a state file it starts afresh.
        val: optional validation set: SRCC/PLCC logged every epoch (never a test set).
        log: JSON-lines log (default ``stage1.log.jsonl`` beside ``out``; appended to
            on resume).
        overwrite: allow replacing the state of an earlier run without ``resume``.
        progress: tqdm bars (epochs, tasks) on stderr.
    """
    cfg = config or PretrainConfig()
    out = Path(out)
    ctx = current()
    progress = progress and ctx.is_main
    if cfg.keep_best_val and val is None:
        raise GrmpiqaError("keep_best_val needs a validation set (--val SPEC)")
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
        inner_opt = torch.optim.Adam(plist, lr=_steps(cfg).inner_lr)
    start_epoch = 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "srcc": None, "theta": None}
    rng_states: RunState | None = None

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
        theta = {n: v.to(device) for n, v in state.take("theta").items()}
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
        run.trim_log(lambda r: int(r.get("epoch", 0)) <= start_epoch)
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

    cache = _ImageCache(cfg.cache_images)
    query_tf = stage1_query_transform(
        stage1_stats(cfg.stats, model.preprocess.stats), model.preprocess.crop
    )
    n_tasks = sum(len(db.tasks) for db in databases)
    fork_devices: list[int] = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    model.train()
    sharded = ctx.is_distributed and cfg.variant == "reptile"
    if ctx.is_distributed:
        _log_sharding(ctx, run, cfg, start_epoch)
    with torch.random.fork_rng(devices=fork_devices), contextlib.ExitStack() as stack:
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
            t_epoch = time.perf_counter()
            tbar = tqdm(
                total=n_tasks,
                desc=f"epoch {epoch + 1}",
                unit="task",
                leave=False,
                disable=not progress,
                dynamic_ncols=True,
            )
            epoch_records: list[dict[str, Any]] = []
            theta_start = _to_cpu(theta)
            for d_index, db in enumerate(databases):
                order = list(range(len(db.tasks)))
                if cfg.shuffle_tasks:
                    rng = np.random.default_rng(_seed_seq(cfg.seed, _ORDER, epoch, d_index))
                    order = rng.permutation(len(order)).tolist()
                delta = {n: torch.zeros_like(v) for n, v in theta.items()}
                if sharded:  # the tasks over the ranks, delta as in one process
                    epoch_records += _share_tasks(
                        ctx, run, model, params, theta, delta, db, d_index, order, cfg, cache,
                        query_tf, epoch, tbar,
                    )  # fmt: skip
                for t_index in order if not sharded else ():
                    opt: torch.optim.Optimizer
                    if cfg.variant == "reptile":
                        opt = _reptile_start(params, theta, cfg)
                    else:  # released: no reset; fresh Adam only after the first database
                        if d_index > 0 or inner_opt is None:
                            inner_opt = torch.optim.Adam(plist, lr=_steps(cfg).inner_lr)
                        opt = inner_opt
                    moved, rec = _adapt(
                        model, params, theta, opt, db, d_index, t_index, cfg, cache, query_tf, epoch
                    )
                    with torch.no_grad():
                        for n in delta:
                            delta[n] += moved[n]
                    epoch_records.append(rec)
                    run.append_log(rec)
                    tbar.set_postfix(
                        task=f"{Path(db.spec).name}/{rec['task']}", q=f"{rec['query_loss']:.3f}"
                    )
                    tbar.update(1)
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

            extra = _metadata(cfg, databases, epoch + 1, history, val_ds, best)
            extra.update(ctx.describe())  # world_size (and backend)
            extra["device"] = describe_device(model.device)
            if (not cfg.keep_best_val or improved) and ctx.is_main:
                with _holding(params, theta):
                    save_checkpoint(model, out, extra=extra)
            _save_run_state(
                run, fingerprint, cfg, epoch + 1, theta, params, inner_opt, history, best, theta0
            )
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
    model.eval()
    # The model ends holding what the checkpoint holds.
    _assign(params, best["theta"] if cfg.keep_best_val and best.get("theta") else theta)
    result.history = history
    return result


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
    query_tf: Any,
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
        out = _adapt(model, params, theta, opt, db, d_index, t_index, cfg, cache, query_tf, epoch)
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
    return torch.optim.Adam(list(params.values()), lr=_steps(cfg).inner_lr)


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
    query_tf: Any,
    epoch: int,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run one task's inner loop from the prompts the model holds: ``phi_i - theta``
    and the task's log record (losses, sizes, inner displacement, seconds)."""
    task = db.tasks[t_index]
    t0 = time.perf_counter()
    s_loss, q_loss, n_s, n_q = _run_task(
        model, opt, task, cfg, cache, query_tf, epoch, d_index, t_index
    )
    with torch.no_grad():
        moved = {n: p.detach() - theta[n] for n, p in params.items()}
    return moved, {
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
    query_tf: Any,
    epoch: int,
    d_index: int,
    t_index: int,
) -> tuple[float, float, int, int]:
    """Inner loop (method.md 6): per support batch one Adam step on it, then one on the
    next query batch (query batches cycle). Returns mean support/query losses."""
    support, query = split_task(task, cfg.support_fraction, cfg.seed, epoch, d_index, t_index)
    aug = random.Random(_derive_seed(cfg.seed, _AUGMENT, epoch, d_index, t_index))
    support_tf = stage1_support_transform(
        stage1_stats(cfg.stats, model.preprocess.stats), aug, model.preprocess.crop
    )
    torch.manual_seed(_derive_seed(cfg.seed, _DROPOUT, epoch, d_index, t_index))
    device = model.device
    labels = torch.tensor([it.label for it in task.items], dtype=torch.float32)
    st = _steps(cfg)
    sb, qbs = st.support_batch, st.query_batch
    q_batches = [query[i : i + qbs] for i in range(0, len(query), qbs)]
    q_tensors: dict[int, torch.Tensor] = {}
    s_losses: list[float] = []
    q_losses: list[float] = []
    b = 0
    for p in range(st.inner_passes):
        order = support
        if p > 0:  # later passes: a fresh seeded order (and fresh augmentation)
            rng = np.random.default_rng(_seed_seq(cfg.seed, _PASS, epoch, d_index, t_index, p))
            order = [support[i] for i in rng.permutation(len(support))]
        for start in range(0, len(order), sb):
            idx = order[start : start + sb]
            x = torch.stack(
                [support_tf(cache.get(task.items[i], _ImageCache.SUPPORT)) for i in idx]
            )
            s_losses.append(_step(model, opt, x.to(device), labels[idx].to(device), cfg.precision))
            qb = b % len(q_batches)
            b += 1
            if qb not in q_tensors:
                q_tensors[qb] = torch.stack(
                    [query_tf(cache.get(task.items[i], _ImageCache.QUERY)) for i in q_batches[qb]]
                )
            qy = labels[q_batches[qb]]
            q_losses.append(
                _step(model, opt, q_tensors[qb].to(device), qy.to(device), cfg.precision)
            )
    return _mean(s_losses), _mean(q_losses), len(support), len(query)


def _step(
    model: QualityModel,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    precision: str,
) -> float:
    opt.zero_grad(set_to_none=True)
    with autocast(model.device, precision):
        logits = model(x)
    loss = quality_loss(logits, y)
    if not torch.isfinite(loss):
        raise TrainingError(f"the stage-1 loss became {loss.item()}; lower --inner-lr")
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    if any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params):
        raise TrainingError("a stage-1 gradient became NaN or infinite; lower --inner-lr")
    opt.step()
    if any(not bool(torch.isfinite(p).all()) for p in params):
        raise TrainingError("the stage-1 prompts became NaN or infinite; lower --inner-lr")
    return float(loss.detach())


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
) -> None:
    """The resume state after ``epochs_done`` epochs (tensors + JSON, see grmpiqa.runs)."""
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
    }
    if inner_opt is not None:
        opt_tensors, record["inner_optimizer"] = optimizer_to_state(inner_opt, "inner_optimizer")
        tensors.update(opt_tensors)
    rng_tensors, record["rng"] = rng_to_state()
    tensors.update(rng_tensors)
    run.save_state(tensors, record)
