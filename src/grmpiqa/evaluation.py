"""The few-shot evaluation protocol (method.md 8) for GRMP-IQA and its baselines.

For ``k`` in ``0..splits-1``: split ``k`` of ``seed`` (80% pool / 20% test, ``shots``
drawn from the pool, :func:`grmpiqa.data.make_split`); a fresh model (a copy of one
built up front); training on the shots with the method; prediction on the test set;
metrics against the normalised labels (:mod:`grmpiqa.metrics`). The median, mean and
std over splits summarise the run.

Methods (``ProtocolConfig.method``):

* ``grmp``: stage-2 fine-tuning with QGR (method.md 7) from a stage-1 checkpoint
  (``init``). Without ``init`` the prompts start random (ablation "no meta init");
  ``finetune.lam = 0`` removes the gradient rule (ablation "no QGR").
* ``coop``: only the text context trains; no visual prompts, no distillation, no QGR.
* ``clipiqa``: zero-shot antonym prompts, no training.
* ``linear-probe``: ridge on frozen CLIP image embeddings, alpha by CV on the shots.

Selection (``ProtocolConfig.selection``):

* ``final`` (default): predict once, at the end of the schedule fixed in advance (the
  plateau schedule watches a training figure, never the test set).
* ``best-on-test``: the released code's behaviour: the test set is scored at every
  evaluation, the plateau schedule watches that test SRCC and the best test predictions
  are kept. Reported as ``"optimistic": true``.

Example:
    >>> from grmpiqa.evaluation import ProtocolConfig, run_protocol
    >>> cfg = ProtocolConfig(method="clipiqa", splits=2, shots=10)
    >>> spec = "clive:/data/ChallengeDB_release"
    >>> result = run_protocol(spec, cfg, report_dir="rep")  # doctest: +SKIP
    >>> result.summary["srcc"]["median"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from grmpiqa._version import __version__
from grmpiqa.baselines import (
    DEFAULT_ALPHAS,
    RidgeProbe,
    clipiqa_config,
    coop_finetune_config,
    coop_model_config,
    image_features,
)
from grmpiqa.config import METHODS, SELECTIONS
from grmpiqa.data import Dataset, Split, load_dataset, make_splits, write_splits
from grmpiqa.distributed import Context, current, local
from grmpiqa.errors import DatasetError, GrmpiqaError
from grmpiqa.factory import DEFAULT, create_model
from grmpiqa.feature_cache import FrozenPool, frozen_image_blocks
from grmpiqa.log import get_logger
from grmpiqa.metrics import METRICS, evaluate_predictions, srcc, summarize_metrics
from grmpiqa.model import ModelConfig, QualityModel
from grmpiqa.pipeline import describe_device, model_input
from grmpiqa.precision import autocast
from grmpiqa.prompts import l2_normalize
from grmpiqa.results import ComparisonResult, ProtocolResult, SplitResult
from grmpiqa.runs import DEFAULT_SAVE_EVERY, RunFiles, stop_signals
from grmpiqa.scoring.api import score as score_images
from grmpiqa.scoring.engine import BatchScorer, text_features
from grmpiqa.utils import load_json

if TYPE_CHECKING:
    from grmpiqa.finetune import FinetuneConfig

__all__ = [
    "COMPARED_METRICS",
    "METHODS",
    "SELECTIONS",
    "ProtocolConfig",
    "ProtocolResult",
    "SplitResult",
    "ablation_name",
    "build_model",
    "format_comparison",
    "format_summary",
    "run_comparison",
    "run_protocol",
]

logger = get_logger("evaluate")

_TRAINED = ("grmp", "coop")
# Test tensors kept in memory for best-on-test scoring up to this size; beyond it the
# test images are decoded again at every evaluation.
_TEST_TENSOR_BUDGET = 1 << 30


def _default_finetune() -> FinetuneConfig:
    from grmpiqa.finetune import FinetuneConfig

    return FinetuneConfig()


@dataclass
class ProtocolConfig:
    """Everything that defines a protocol run (recorded in report.json).

    Attributes:
        method: one of :data:`METHODS`.
        shots: training images per split (drawn from the 80% pool).
        splits: number of random splits (method.md 8: 10).
        seed: split seed; split ``k`` is a pure function of (dataset, seed, k), and every
            random choice of training in split ``k`` derives from (seed, k).
        test_fraction: share of the images (references for synthetic sets) held out.
        selection: ``"final"`` or ``"best-on-test"`` (optimistic, released behaviour).
        init: stage-1 checkpoint for ``grmp`` (None: random prompts, an ablation).
        finetune: stage-2 hyper-parameters for ``grmp``/``coop`` (``coop`` overrides its
            groups, distillation and lambda; its ``seed`` is replaced per split).
        backbone, pretrained, device: as :func:`grmpiqa.create_model`; with ``init``
            they default to the checkpoint's.
        model_config: architecture of the adapted parts for ``grmp`` without ``init``
            and for ``coop`` (e.g. fewer VPT tokens); None = the defaults.
        logistic: ``"4"`` or ``"5"``: the logistic of PLCC (logistic) and RMSE.
        batch_size: scoring / feature batch size.
        precision: ``"fp32"`` or ``"bf16"`` for scoring and features (training uses
            ``finetune.precision``).
        probe_alphas, probe_folds: linear-probe ridge strengths and CV folds.
    """

    method: str = "grmp"
    shots: int = 50
    splits: int = 10
    seed: int = 0
    test_fraction: float = 0.2
    selection: str = "final"
    init: str | None = None
    finetune: FinetuneConfig | None = None
    backbone: str | None = None
    pretrained: Any = DEFAULT
    device: str = "cpu"
    model_config: ModelConfig | None = None
    logistic: str = "4"
    batch_size: int = 32
    precision: str = "fp32"
    probe_alphas: tuple[float, ...] = DEFAULT_ALPHAS
    probe_folds: int = 5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise GrmpiqaError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.selection not in SELECTIONS:
            raise GrmpiqaError(
                f"unknown selection {self.selection!r}; use one of {', '.join(SELECTIONS)}"
            )
        if self.splits < 1:
            raise GrmpiqaError(f"splits must be at least 1, got {self.splits}")
        if not 0.0 < self.test_fraction < 1.0:
            raise GrmpiqaError(
                f"test fraction must be in (0, 1) for the protocol, got {self.test_fraction}"
            )
        if self.shots < 2:
            raise GrmpiqaError(f"shots must be at least 2, got {self.shots}")
        if self.seed < 0:
            raise GrmpiqaError(f"seed must be non-negative, got {self.seed}")
        if str(self.logistic) not in ("4", "5"):
            raise GrmpiqaError(f"logistic must be 4 or 5, got {self.logistic!r}")
        self.logistic = str(self.logistic)
        if self.init is not None and self.method != "grmp":
            raise GrmpiqaError(f"--init is a stage-1 checkpoint for method grmp, not {self.method}")
        if self.selection == "best-on-test" and self.method not in _TRAINED:
            raise GrmpiqaError(
                f"--selection best-on-test needs a trained method (grmp, coop), not {self.method}"
            )
        if self.finetune is None and self.method in _TRAINED:
            self.finetune = _default_finetune()
        if (
            self.finetune is not None
            and self.selection == "final"
            and "test" in str(self.finetune.monitor)
        ):
            raise GrmpiqaError(
                f"monitor {self.finetune.monitor!r} watches the test set; that is "
                "--selection best-on-test (optimistic)"
            )


def ablation_name(config: ProtocolConfig) -> str | None:
    """The GRMP ablation a config runs: "no meta init", "no QGR", both, or None."""
    if config.method != "grmp":
        return None
    parts = []
    if config.init is None:
        parts.append("no meta init")
    if config.finetune is not None and float(config.finetune.lam) == 0.0:
        parts.append("no QGR")
    return ", ".join(parts) or None


def split_seed(seed: int, index: int) -> int:
    """The training seed of split ``index``: a hash of (seed, index), < 2**31."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] % (2**31))


# --- models -------------------------------------------------------------------------------


def build_model(config: ProtocolConfig) -> QualityModel:
    """The base model of a method (copied afresh for every split)."""
    m = config.method
    kw: dict[str, Any] = {"device": config.device, "seed": config.seed}
    if m == "grmp" and config.init is not None:
        # the checkpoint records its backbone (and a random backbone's seed)
        return create_model(
            config.backbone, config.pretrained, checkpoint=config.init, device=config.device
        )
    if m == "clipiqa":
        cfg = clipiqa_config()
    elif m in ("coop", "linear-probe"):
        cfg = coop_model_config(config.model_config)
    else:
        cfg = config.model_config or ModelConfig()
    return create_model(config.backbone, config.pretrained, config=cfg, **kw)


def _config_record(config: ProtocolConfig, dataset: Dataset, model: QualityModel) -> dict[str, Any]:
    ft = config.finetune
    if config.method == "coop" and ft is not None:
        ft = coop_finetune_config(ft)
    ft_dict = None
    if ft is not None:
        ft_dict = {k: v for k, v in ft.to_dict().items() if k != "seed"}
        if config.selection == "best-on-test":
            ft_dict["monitor"] = "test_srcc"
    init_meta = None
    if config.init is not None:
        from grmpiqa.checkpoint import read_metadata

        meta = read_metadata(config.init)
        init_meta = {
            "path": str(config.init),
            "created": meta.get("created"),
            "extra": meta.get("extra"),
        }
    pre = model.backbone_pretrained
    return {
        "method": config.method,
        "ablation": ablation_name(config),
        "dataset": dataset.spec,
        "n_images": len(dataset),
        "shots": config.shots,
        "splits": config.splits,
        "seed": config.seed,
        "test_fraction": config.test_fraction,
        "selection": config.selection,
        "optimistic": config.selection == "best-on-test",
        "init": init_meta,
        "finetune": ft_dict,
        "logistic": config.logistic,
        "batch_size": config.batch_size,
        "precision": config.precision,
        "linear_probe": {"alphas": list(config.probe_alphas), "folds": config.probe_folds}
        if config.method == "linear-probe"
        else None,
        "backbone": model.backbone_name,
        "pretrained": pre,
        "random_backbone": pre.get("kind") == "random",
        "backbone_description": model.describe_backbone(),
        "model_config": model.config.to_dict(),
        "preprocess": model.preprocess.to_dict(),
        "device": describe_device(config.device),
        "grmpiqa_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }


def _fingerprint(record: dict[str, Any]) -> str:
    keep = {k: v for k, v in record.items() if k not in ("device", "batch_size", "python")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- prediction ---------------------------------------------------------------------------


class _TestScorer:
    """Scores the test images with the eval transform; tensors cached when they fit."""

    def __init__(self, model: QualityModel, test: Dataset, batch_size: int, precision: str) -> None:
        self.paths = test.paths
        self.batch_size = batch_size
        self.precision = precision
        crop = model.preprocess.crop
        self.x: torch.Tensor | None = None
        if len(test) * 3 * crop * crop * 4 <= _TEST_TENSOR_BUDGET:
            self.x = (
                model_input([it.load() for it in test], model.preprocess) if len(test) else None
            )

    @torch.inference_mode()
    def __call__(self, model: QualityModel) -> np.ndarray:
        if self.x is None:
            s = score_images(model, self.paths, self.batch_size, precision=self.precision)
            return s.double().numpy()
        was_training = model.training
        try:
            scorer = BatchScorer(model, precision=self.precision)
            out = [
                scorer.score_tensor(self.x[i : i + self.batch_size])[:, 0]
                for i in range(0, len(self.x), self.batch_size)
            ]
        finally:
            model.train(was_training)
        return torch.cat(out).double().numpy()


class _PoolScorer:
    """Scores test images from the pool's frozen part (issue 21): the hidden state of
    every image's eval view entering the first trained block is computed once for the
    whole protocol (in fp32, as the full forward pass keeps its residual stream), and a
    split only runs the trained blocks and the head on it - the numbers of
    :class:`_TestScorer`, whose first blocks compute the same state."""

    def __init__(
        self,
        pool: FrozenPool,
        test: Dataset,
        start_block: int,
        batch_size: int,
        precision: str,
    ) -> None:
        self.pool = pool
        self.test = test
        self.start_block = start_block
        self.batch_size = batch_size
        self.precision = precision

    @torch.inference_mode()
    def __call__(self, model: QualityModel) -> np.ndarray:
        if len(self.test) == 0:
            return np.zeros(0)
        was_training = model.training
        model.eval()
        out = []
        try:
            hidden = self.pool.eval_hidden(
                model, self.test, self.start_block, self.precision, dtype=torch.float32
            )
            text = text_features(model, self.precision)  # as BatchScorer does
            for i in range(0, len(hidden), self.batch_size):
                h = hidden[i : i + self.batch_size].to(model.device)
                with autocast(model.device, self.precision):
                    v = l2_normalize(model.image_tower.forward_from(h, self.start_block))
                    out.append(model.probabilities(v, text).cpu())
        finally:
            model.train(was_training)
        return torch.cat(out).double().numpy()


# --- one split ----------------------------------------------------------------------------


def _run_split(
    base: QualityModel,
    dataset: Dataset,
    split: Split,
    config: ProtocolConfig,
    index: int,
    progress: bool,
    checkpoint: Path | None = None,
    resume: bool = False,
    *,
    keep: bool = True,
    pool: FrozenPool | None = None,
    save_every: float = DEFAULT_SAVE_EVERY,
) -> SplitResult:
    """Train and score split ``index``. ``checkpoint``: the split's run files (state and
    log on the save clock; the checkpoint itself only with ``keep``); ``pool``: frozen
    features shared by the protocol's splits."""
    t0 = time.perf_counter()
    train = split.train(dataset)
    test = split.test_set(dataset)
    seed = split_seed(config.seed, index)
    info: dict[str, Any] = {"train_seed": seed}
    history: list[dict[str, Any]] = []
    precision = config.precision
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config.method == "clipiqa":

            def zero_shot(d: Dataset) -> np.ndarray:
                s = score_images(base, d.paths, config.batch_size, precision=precision)
                return s.double().numpy()

            pred = pool.memo("clipiqa", test, zero_shot) if pool else zero_shot(test)
        elif config.method == "linear-probe":

            def embed(d: Dataset) -> np.ndarray:
                return image_features(base, d.paths, config.batch_size, precision=precision)

            f_train = pool.memo("features", train, embed) if pool else embed(train)
            f_test = pool.memo("features", test, embed) if pool else embed(test)
            probe = RidgeProbe.fit(
                f_train, train.labels, config.probe_alphas, config.probe_folds, seed
            )
            pred = probe.predict(f_test)
            info.update(
                alpha=probe.alpha, alphas=probe.alphas, cv_mse=probe.cv_mse, folds=probe.folds
            )
        else:
            pred, history, train_info = _train_and_predict(
                base, train, test, config, seed, progress, checkpoint, resume,
                keep=keep, pool=pool, save_every=save_every,
            )  # fmt: skip
            info.update(train_info)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = evaluate_predictions(pred, test.labels, config.logistic)
    info["metric_warnings"] = [str(w.message) for w in caught]
    return SplitResult(
        index=index,
        metrics=metrics,
        seconds=time.perf_counter() - t0,
        n_train=len(train),
        n_test=len(test),
        test_indices=list(split.test),
        predictions=[float(p) for p in pred],
        history=history,
        info=info,
    )


def _frozen_blocks_for(model: QualityModel, groups: Sequence[str]) -> int | None:
    """:func:`frozen_image_blocks` once ``groups`` train, leaving ``model`` as it was
    (what trains, and what it records as adapted, which decides how its teacher is
    built)."""
    adapted = set(model.adapted_keys)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        model.set_trainable(groups)
        return frozen_image_blocks(model)
    finally:
        model.adapted_keys = adapted
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def _train_and_predict(
    base: QualityModel,
    train: Dataset,
    test: Dataset,
    config: ProtocolConfig,
    seed: int,
    progress: bool,
    checkpoint: Path | None = None,
    resume: bool = False,
    *,
    keep: bool = True,
    pool: FrozenPool | None = None,
    save_every: float = DEFAULT_SAVE_EVERY,
) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    from grmpiqa.finetune import finetune

    assert config.finetune is not None
    ft = replace(config.finetune, seed=seed)
    if config.method == "coop":
        ft = coop_finetune_config(ft)
    model = copy.deepcopy(base)
    scorer: Callable[[QualityModel], np.ndarray]
    start_block = _frozen_blocks_for(model, ft.groups)
    if pool is not None and start_block is not None:
        scorer = _PoolScorer(pool, test, start_block, config.batch_size, config.precision)
    else:
        scorer = _TestScorer(model, test, config.batch_size, config.precision)
    best: dict[str, Any] = {"srcc": -math.inf, "pred": None, "epoch": None}
    on_eval: Callable[[int, QualityModel], dict[str, float]] | None = None
    if config.selection == "best-on-test":
        ft = replace(ft, monitor="test_srcc")
        labels = test.labels

        def on_eval(epoch: int, m: QualityModel) -> dict[str, float]:
            p = scorer(m)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = srcc(p, labels)
            if math.isfinite(s) and s > best["srcc"]:
                best.update(srcc=s, pred=p, epoch=epoch)
            return {"test_srcc": s}

    result = finetune(
        model,
        train,
        ft,
        on_eval=on_eval,
        progress=progress,
        out=checkpoint,
        resume=resume,
        overwrite=not resume,
        save_every=save_every,
        checkpoint=keep,
        pool=pool,
    )
    info: dict[str, Any] = {
        "epochs": int(result.epochs),
        "stopped": str(result.stopped),
        "train_seconds": float(result.seconds),
    }
    final = scorer(model)
    if checkpoint is not None and keep:
        info["checkpoint"] = checkpoint.name
    if config.selection == "best-on-test" and best["pred"] is not None:
        pred = best["pred"]
        info["best_epoch"] = best["epoch"]
        info["final_test_srcc"] = float(srcc(final, test.labels))
    else:
        pred = final
    return np.asarray(pred, dtype=np.float64), list(result.history), info


# --- the protocol -------------------------------------------------------------------------


def _split_file(report_dir: Path, index: int) -> Path:
    return report_dir / "splits" / f"split_{index}.json"


def _load_finished(path: Path, fingerprint: str, split: Split) -> SplitResult | None:
    if not path.is_file():
        return None
    try:
        d = load_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise GrmpiqaError(
            f"{path}: unreadable split record ({err}); delete it to rerun the split"
        ) from None
    if d.get("fingerprint") != fingerprint:
        raise GrmpiqaError(
            f"{path}: written by a run with a different configuration; use another --report "
            "folder or drop --resume"
        )
    res = SplitResult.from_dict(d["result"])
    if res.test_indices != list(split.test):
        raise GrmpiqaError(
            f"{path}: its test set differs from split {split.index}; the dataset changed"
        )
    return res


def run_protocol(
    data: Dataset | str,
    config: ProtocolConfig | None = None,
    *,
    report_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    model: QualityModel | None = None,
    keep_checkpoints: bool = False,
    save_every: float = DEFAULT_SAVE_EVERY,
) -> ProtocolResult:
    """Run the 10-split few-shot protocol (method.md 8); write a report if asked.

    Args:
        data: a dataset or a ``KIND:PATH`` spec (labels required).
        config: the run (default :class:`ProtocolConfig`: grmp, 50 shots, 10 splits).
        report_dir: write report.json, report.md, predictions.csv, figures and
            ``splits/split_K.json`` (each split as soon as it finishes) there.
        resume: reuse the finished ``splits/split_K.json`` of an interrupted run with the
            same configuration (needs ``report_dir``).
        progress: tqdm bars on stderr.
        model: the base model to copy for every split, instead of building it from the
            config (its backbone identity is recorded as usual).
        keep_checkpoints: trained methods: write each split's final model to
            ``report_dir/splits/split_K.safetensors`` (loadable by ``grmpiqa score
            --checkpoint``), and keep its resume state and log. Off by default: a
            ViT-B/16 split checkpoint is ~170 MB.
        save_every: seconds between writes of a split's resume state
            (``report_dir/splits/split_K.state.safetensors``; also written when SIGINT or
            SIGTERM stops the run, which raises :class:`~grmpiqa.runs.RunInterrupted`).
            With ``resume`` an interrupted split continues from it, with or without
            ``keep_checkpoints``; without them it is deleted once the split is done.

    The splits run back to back on one base model, and what fine-tuning keeps frozen
    is computed once for the whole dataset and shared by every split
    (:class:`~grmpiqa.feature_cache.FrozenPool`: decoded images, the eval views' frozen
    hidden states - the test images' too -, the teacher; zero-shot scores and probe
    features), with the numbers a split computing them itself gets.

    Launched on several ranks (torchrun, :mod:`grmpiqa.distributed`), the splits are
    shared out, one per rank at a time, each trained by its rank alone; rank 0 writes
    the report (identical to one process's but for timings), every rank returns the
    result. Split checkpoints (``keep_checkpoints``) are written by the rank that trains
    the split.

    Raises:
        DatasetError: unlabelled data, or too few images for the shots.
        GrmpiqaError: bad options, or a resume record from another configuration.
    """
    config = config or ProtocolConfig()
    dataset = load_dataset(data) if isinstance(data, str) else data
    if not dataset.has_labels:
        raise DatasetError(f"{dataset.spec}: the protocol needs labelled images (MOS)")
    if resume and report_dir is None:
        raise GrmpiqaError("resume needs a report folder (--report DIR)")
    if keep_checkpoints and report_dir is None:
        raise GrmpiqaError("keeping split checkpoints needs a report folder (--report DIR)")
    splits = make_splits(dataset, config.seed, config.splits, config.shots, config.test_fraction)
    base = model if model is not None else build_model(config)
    record = _config_record(config, dataset, base)
    fingerprint = _fingerprint(record)
    record["fingerprint"] = fingerprint
    out = Path(report_dir) if report_dir is not None else None
    ctx = current()
    if out is not None and ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    from grmpiqa.report import write_json, write_report

    results: list[SplitResult] = []
    notes: list[str] = []
    if record["random_backbone"]:
        notes.append(f"RANDOM backbone ({record['backbone_description']}): numbers are meaningless")
    if record["optimistic"]:
        notes.append("best-on-test selection: the test set chose the reported epoch (OPTIMISTIC)")
    bar = tqdm(
        splits,
        desc=f"{config.method} splits",
        unit="split",
        disable=not (progress and ctx.is_main),
        file=sys.stderr,
    )
    if ctx.is_distributed:  # the splits over the ranks; the loop below then has nothing to do
        results = _share_splits(
            ctx, base, dataset, splits, config, out, fingerprint, resume, keep_checkpoints, bar,
            save_every,
        )  # fmt: skip
        for r in results:
            notes.extend(f"split {r.index}: {w}" for w in r.info.get("metric_warnings", []))
    pool = FrozenPool(max_bytes=_POOL_BUDGET)
    with stop_signals(enabled=out is not None) as stop:
        for k, split in enumerate(bar if not ctx.is_distributed else ()):
            res = None
            if out is not None and resume:
                res = _load_finished(_split_file(out, k), fingerprint, split)
            if res is None:
                run_path = _split_run(out, k, config)
                res = _run_split(
                    base, dataset, split, config, k, progress, run_path, resume,
                    keep=keep_checkpoints, pool=pool, save_every=save_every,
                )  # fmt: skip
                if out is not None:
                    write_json(
                        _split_file(out, k), {"fingerprint": fingerprint, "result": res.to_dict()}
                    )
                if run_path is not None and not keep_checkpoints:
                    _remove_split_run(run_path)
            for w in res.info.get("metric_warnings", []):
                notes.append(f"split {k}: {w}")
            results.append(res)
            bar.set_postfix(srcc=f"{res.metrics['srcc']:.3f}")
            if stop.requested and k + 1 < len(splits):
                raise stop.interrupted(f"splits 0-{k} are finished in {out}")
    bar.close()
    summary = summarize_metrics([{**r.metrics, "seconds": r.seconds} for r in results])
    result = ProtocolResult(record, dataset, results, summary, notes)
    if out is not None and ctx.is_main:
        write_splits(dataset, splits, out / "splits.csv")
        write_report(result, out)
    return result


# Memory the protocol's shared frozen features may take (FrozenPool).
_POOL_BUDGET = 2 * 1024**3


def _split_run(out: Path | None, index: int, config: ProtocolConfig) -> Path | None:
    """The run files of a trained split (``DIR/splits/split_K.safetensors`` and its
    state and log), or None."""
    if out is None or config.method not in _TRAINED:
        return None
    path = out / "splits" / f"split_{index}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _remove_split_run(path: Path) -> None:
    """A finished split's resume state and log, once its record is written."""
    run = RunFiles(path, "finetune")
    for p in (run.state, run.log):
        if p.is_file():
            p.unlink()


def _share_splits(
    ctx: Context,
    base: QualityModel,
    dataset: Dataset,
    splits: Sequence[Split],
    config: ProtocolConfig,
    out: Path | None,
    fingerprint: str,
    resume: bool,
    keep_checkpoints: bool,
    bar: Any,
    save_every: float = DEFAULT_SAVE_EVERY,
) -> list[SplitResult]:
    """The splits over the ranks, one per rank at a time (:mod:`grmpiqa.distributed`).

    Rank 0 reads the finished splits of a resumed run and writes each round's split
    records; the splits left run in rounds of ``world_size``, the round's i-th split on
    rank i, each in its process alone (the seeds and numbers of one process). A rank's
    error stops every rank at the end of the round.
    """
    from grmpiqa.report import write_json

    def finished() -> dict[str, Any]:
        done: dict[str, Any] = {}
        if out is not None and resume:
            for k, split in enumerate(splits):
                res = _load_finished(_split_file(out, k), fingerprint, split)
                if res is not None:
                    done[str(k)] = res.to_dict()
        return done

    results = {int(k): SplitResult.from_dict(d) for k, d in ctx.from_main(finished).items()}
    pool = FrozenPool(max_bytes=_POOL_BUDGET)
    bar.update(len(results))
    todo = [k for k in range(len(splits)) if k not in results]
    if ctx.is_main:
        logger.info(
            "evaluate on %d ranks (%s): %d split(s) to run, one per rank at a time",
            ctx.world_size,
            ctx.backend,
            len(todo),
        )
    for start in range(0, len(todo), ctx.world_size):
        round_ = todo[start : start + ctx.world_size]
        own: SplitResult | None = None
        error: BaseException | None = None
        if ctx.rank < len(round_):
            k = round_[ctx.rank]
            ckpt = _split_run(out, k, config)
            try:
                with local():  # this split is this rank's alone
                    own = _run_split(
                        base, dataset, splits[k], config, k, False, ckpt, resume,
                        keep=keep_checkpoints, pool=pool, save_every=save_every,
                    )  # fmt: skip
            except Exception as err:
                error = err
        gathered = ctx.gather(own.to_dict() if own is not None else None, error)
        for d in gathered:
            if d is None:
                continue
            res = own if own is not None and own.index == d["index"] else SplitResult.from_dict(d)
            results[res.index] = res
            if out is not None and ctx.is_main:
                record = {"fingerprint": fingerprint, "result": res.to_dict()}
                write_json(_split_file(out, res.index), record)
        if own is not None and not keep_checkpoints:
            run_path = _split_run(out, own.index, config)
            if run_path is not None:
                _remove_split_run(run_path)
        bar.update(len(round_))
    return [results[k] for k in range(len(splits))]


#: Metrics whose paired differences a comparison reports (with bootstrap intervals).
COMPARED_METRICS: tuple[str, ...] = ("srcc", "plcc")
#: Bootstrap replicates of a comparison's confidence intervals.
N_BOOT = 2000


def run_comparison(
    data: Dataset | str,
    configs: Sequence[ProtocolConfig],
    *,
    report_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    keep_checkpoints: bool = False,
    n_boot: int = N_BOOT,
    save_every: float = DEFAULT_SAVE_EVERY,
) -> ComparisonResult:
    """Several methods on the same splits, combined into one comparison (method.md 8).

    Each method runs the protocol (:func:`run_protocol`, its own report in
    ``report_dir/METHOD/``) on the splits of the shared seed, so split ``k`` has the same
    shots and test images for every method. The comparison reports each method's
    medians and, against the reference method (``grmp`` when it is among them, else the
    first), the paired differences per split with two-level bootstrap 95 % intervals
    (:func:`grmpiqa.metrics.paired_bootstrap`, seeded by the split seed); with
    ``report_dir`` it writes ``report.json``, ``report.md`` and ``comparison.png`` there.

    Raises:
        GrmpiqaError: fewer than two methods, a method twice, or configs that do not share
            the splits (seed, splits, shots, test fraction).
    """
    from grmpiqa.metrics import paired_bootstrap

    configs = list(configs)
    names = [c.method for c in configs]
    if len(configs) < 2:
        raise GrmpiqaError("a comparison needs at least two methods")
    if len(set(names)) != len(names):
        raise GrmpiqaError(f"a method is named twice: {', '.join(names)}")
    shared = {(c.seed, c.splits, c.shots, c.test_fraction) for c in configs}
    if len(shared) != 1:
        raise GrmpiqaError(
            "the methods of a comparison must share seed, splits, shots and test fraction "
            "(the same splits for every method)"
        )
    dataset = load_dataset(data) if isinstance(data, str) else data
    out = Path(report_dir) if report_dir is not None else None
    results: dict[str, ProtocolResult] = {}
    for cfg in configs:
        logger.info("comparison: method %s (%d of %d)", cfg.method, len(results) + 1, len(configs))
        results[cfg.method] = run_protocol(
            dataset,
            cfg,
            report_dir=None if out is None else out / cfg.method,
            resume=resume,
            progress=progress,
            keep_checkpoints=keep_checkpoints,
            save_every=save_every,
        )
    first = next(iter(results.values()))
    for name, res in results.items():
        if [s.test_indices for s in res.splits] != [s.test_indices for s in first.splits]:
            raise GrmpiqaError(f"method {name} ran on other test sets than {names[0]}")
    reference = "grmp" if "grmp" in results else names[0]
    labels = np.asarray(dataset.labels, dtype=np.float64)
    targets = [labels[s.test_indices] for s in first.splits]
    ref_pred = [np.asarray(s.predictions) for s in results[reference].splits]
    differences = {
        name: {
            metric: paired_bootstrap(
                [np.asarray(s.predictions) for s in res.splits],
                ref_pred,
                targets,
                metric,
                n_boot=n_boot,
                seed=configs[0].seed,
            )
            for metric in COMPARED_METRICS
        }
        for name, res in results.items()
        if name != reference
    }
    keys = ("dataset", "n_images", "shots", "splits", "seed", "test_fraction", "selection",
            "optimistic", "backbone", "pretrained", "random_backbone", "backbone_description",
            "logistic", "grmpiqa_version", "torch_version")  # fmt: skip
    record: dict[str, Any] = {k: first.config.get(k) for k in keys}
    record["optimistic"] = any(bool(r.config.get("optimistic")) for r in results.values())
    record["selection"] = ", ".join(sorted({str(r.config["selection"]) for r in results.values()}))
    record["methods"] = {name: res.config for name, res in results.items()}
    record["reference"] = reference
    record["bootstrap"] = {
        "replicates": n_boot,
        "seed": configs[0].seed,
        "level": 0.95,
        "how": "two-level: splits drawn with replacement, then each drawn split's test "
        "images with replacement (the same images for both methods)",
    }
    result = ComparisonResult(record, dataset, results, reference, differences)
    if out is not None and current().is_main:
        from grmpiqa.report import write_comparison

        write_comparison(result, out)
    return result


def format_comparison(result: ComparisonResult) -> str:
    """A few lines for the terminal: each method's median SRCC/PLCC, and the paired
    differences against the reference with their intervals."""
    cfg = result.config
    lines = [
        f"{', '.join(result.methods)} on {cfg['dataset']}: {cfg['splits']} splits, "
        f"{cfg['shots']} shots" + (" [RANDOM backbone]" if cfg.get("random_backbone") else "")
    ]
    for name, res in result.methods.items():
        s = res.summary
        lines.append(
            f"  {name:<13} median SRCC {s['srcc']['median']:.4f}  PLCC {s['plcc']['median']:.4f}"
        )
    for name, diff in result.differences.items():
        d = diff["srcc"]
        lines.append(
            f"  {name} - {result.reference}: SRCC {d['mean']:+.4f} "
            f"[{d['lo']:+.4f}, {d['hi']:+.4f}] (95 % bootstrap CI)"
        )
    return "\n".join(lines)


def format_summary(result: ProtocolResult, keys: Sequence[str] = METRICS) -> str:
    """A few lines for the terminal: median and mean ± std of each metric."""
    cfg = result.config
    head = f"{cfg['method']} on {cfg['dataset']}: {len(result.splits)} splits, {cfg['shots']} shots"
    if cfg.get("ablation"):
        head += f" (ablation: {cfg['ablation']})"
    if cfg.get("optimistic"):
        head += " [best-on-test: OPTIMISTIC]"
    if cfg.get("random_backbone"):
        head += " [RANDOM backbone]"
    lines = [head]
    for k in keys:
        s = result.summary[k]
        lines.append(f"  {k:<14} median {s['median']:.4f}  mean {s['mean']:.4f} ± {s['std']:.4f}")
    return "\n".join(lines)
