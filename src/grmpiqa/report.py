"""Evaluation reports: report.json, report.md, predictions.csv and figures (method.md 8).

Layout of a report folder::

    DIR/report.json       config, per-split metrics, summary (median/mean/std)
    DIR/report.md         a short human-readable summary table
    DIR/predictions.csv   split,path,mos,label,prediction (every test image of every split)
    DIR/scatter.png       predictions vs. MOS of the median-SRCC split, with the logistic fit
    DIR/curves.png        training curves from the fine-tuning history (trained methods)
    DIR/cv.png            linear probe: cross-validated MSE against the ridge strength
    DIR/splits/split_K.json  each finished split (what ``--resume`` reads)

Every file is written atomically. Figures use matplotlib's Agg canvas directly (no
pyplot, no global backend switch).
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grmpiqa.metrics import METRICS, fit_monotone
from grmpiqa.utils import atomic_open, atomic_path, json_safe

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from grmpiqa.results import ProtocolResult, SplitResult

__all__ = ["REPORT_FORMAT", "median_split", "read_report", "write_report"]

REPORT_FORMAT = "grmpiqa-report/1"

_METRIC_TITLES = {
    "srcc": "SRCC",
    "plcc": "PLCC (raw)",
    "plcc_logistic": "PLCC (logistic)",
    "krcc": "KRCC",
    "rmse": "RMSE (logistic, label units)",
    "seconds": "seconds",
}


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (NaN written as null)."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(json_safe(obj), fh, indent=2, allow_nan=False)
        fh.write("\n")
    return Path(path)


def median_split(splits: Sequence[SplitResult]) -> SplitResult | None:
    """The split with the median SRCC (lower middle for an even count); NaN ones last."""
    if not splits:
        return None
    key = [
        (s.metrics["srcc"] if math.isfinite(s.metrics["srcc"]) else math.inf, s.index)
        for s in splits
    ]
    order = sorted(range(len(splits)), key=lambda i: key[i])
    finite = [i for i in order if math.isfinite(key[i][0])]
    pick = finite[(len(finite) - 1) // 2] if finite else order[0]
    return splits[pick]


def report_dict(result: ProtocolResult) -> dict[str, Any]:
    """The content of report.json."""
    cfg = result.config
    med = median_split(result.splits)
    return {
        "format": REPORT_FORMAT,
        "config": cfg,
        "selection": cfg["selection"],
        "optimistic": bool(cfg["optimistic"]),
        "random_backbone": bool(cfg["random_backbone"]),
        "metric_definitions": metric_definitions(cfg.get("logistic", "4")),
        "splits": [s.summary_dict() for s in result.splits],
        "summary": result.summary,
        "median_split": None if med is None else med.index,
        "warnings": list(result.warnings),
        "files": result.files,
    }


def metric_definitions(logistic: str) -> dict[str, str]:
    """One line per metric, as recorded in report.json."""
    fit = (
        "4-parameter logistic b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))"
        if str(logistic) == "4"
        else "5-parameter logistic b1 (0.5 - 1 / (1 + exp(b2 (x - b3)))) + b4 x + b5"
    )
    return {
        "target": "normalised labels: MOS min-max normalised to [0, 1], higher is better",
        "srcc": "Spearman rank correlation of raw predictions (scipy.stats.spearmanr)",
        "plcc": "Pearson correlation of raw predictions (as the released code)",
        "plcc_logistic": f"Pearson correlation after fitting the {fit} (scipy curve_fit); "
        "where that fit is degenerate (a step, as for nearly constant predictions) the raw "
        "PLCC, said so under warnings",
        "krcc": "Kendall tau-b (scipy.stats.kendalltau)",
        "rmse": "RMSE between logistic-mapped predictions and normalised labels (a linear "
        "map where the logistic fit is degenerate)",
        "summary": "median, mean and population std (ddof 0) over splits; NaN splits left out",
    }


def write_report(result: ProtocolResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write report.json, report.md, predictions.csv and the figures; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"predictions": write_predictions(result, out / "predictions.csv")}
    med = median_split(result.splits)
    if med is not None:
        files["scatter"] = write_scatter(result, med, out / "scatter.png")
    if any(s.history for s in result.splits):
        files["curves"] = write_curves(result.splits, out / "curves.png")
    if any(s.info.get("cv_mse") for s in result.splits):
        files["cv"] = write_cv(result.splits, out / "cv.png")
    result.files = {k: v.name for k, v in files.items()} | {
        "json": "report.json",
        "md": "report.md",
    }
    files["json"] = write_json(out / "report.json", report_dict(result))
    files["md"] = write_markdown(result, out / "report.md")
    return files


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a report.json (a folder or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    return dict(json.loads(p.read_text(encoding="utf-8")))


def write_predictions(result: ProtocolResult, path: Path) -> Path:
    """predictions.csv: one row per (split, test image)."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["split", "path", "mos", "label", "prediction"])
        for s in result.splits:
            for i, p in zip(s.test_indices, s.predictions, strict=True):
                it = result.dataset[i]
                w.writerow(
                    [
                        s.index,
                        str(it.path),
                        repr(float(it.mos)),
                        repr(float(it.label)),
                        repr(float(p)),
                    ]
                )
    return path


# --- figures --------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _subtitle(result: ProtocolResult) -> str:
    cfg = result.config
    bits = [f"{cfg['method']}", cfg.get("dataset", "")]
    if cfg.get("random_backbone"):
        bits.append("RANDOM backbone")
    if cfg.get("optimistic"):
        bits.append("best-on-test (OPTIMISTIC)")
    return " | ".join(b for b in bits if b)


def write_scatter(result: ProtocolResult, split: SplitResult, path: Path) -> Path:
    """Predictions vs. MOS of one split, with the fitted logistic curve."""
    pred = np.asarray(split.predictions, dtype=np.float64)
    mos = np.array([result.dataset[i].mos for i in split.test_indices], dtype=np.float64)
    fig = _figure(5.5, 4.5)
    ax = fig.add_subplot()
    ax.scatter(pred, mos, s=14, alpha=0.7, edgecolors="none")
    with warnings.catch_warnings():  # a failed fit only means no curve on the plot
        warnings.simplefilter("ignore")
        f = fit_monotone(pred, mos, result.config.get("logistic", "4")) if pred.size > 5 else None
    if f is not None:
        xs = np.linspace(pred.min(), pred.max(), 200)
        if f.kind == "linear":  # a degenerate logistic is not drawn as if it were a fit
            label = "linear fit (logistic degenerate: raw PLCC reported)"
        else:
            label = f"{result.config.get('logistic', '4')}-param logistic"
        ax.plot(xs, f(xs), color="C3", lw=1.5, label=label)
        ax.legend(loc="best", fontsize=8)
    m = split.metrics
    ax.set_xlabel("prediction")
    ax.set_ylabel("MOS")
    ax.set_title(
        f"split {split.index} (median SRCC): SRCC {m['srcc']:.3f}, PLCC {m['plcc']:.3f}",
        fontsize=10,
    )
    fig.suptitle(_subtitle(result), fontsize=8)
    return _save(fig, path)


def write_curves(splits: Sequence[SplitResult], path: Path) -> Path:
    """Training loss (left) and SRCC figures (right) against the epoch, one line per split."""
    fig = _figure(10, 4)
    ax_l, ax_r = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    for n, s in enumerate(splits):
        h = [r for r in s.history if isinstance(r.get("epoch"), int | float)]
        numeric = {k for r in h for k, v in r.items() if isinstance(v, int | float)}
        losses = sorted(k for k in numeric if "loss" in k)
        corrs = sorted(k for k in numeric if "srcc" in k or "plcc" in k)
        for ax, keys in ((ax_l, losses), (ax_r, corrs)):
            for m, k in enumerate(keys):
                pts = [
                    (r["epoch"], r[k])
                    for r in h
                    if isinstance(r.get(k), int | float) and math.isfinite(r[k])
                ]
                if pts:
                    x, y = zip(*pts, strict=True)
                    ax.plot(
                        x,
                        y,
                        styles[m % 4],
                        color=f"C{n % 10}",
                        lw=1,
                        label=f"{k} (split {s.index})",
                    )
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    ax_l.set_title("training loss")
    ax_r.set_xlabel("epoch")
    ax_r.set_ylabel("correlation")
    ax_r.set_title("correlations during training")
    for ax in (ax_l, ax_r):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def write_cv(splits: Sequence[SplitResult], path: Path) -> Path:
    """Linear probe: cross-validated MSE against the ridge strength, one line per split."""
    fig = _figure(5.5, 4)
    ax = fig.add_subplot()
    for s in splits:
        a, e = s.info.get("alphas"), s.info.get("cv_mse")
        if a and e:
            ax.plot(
                a, e, marker="o", ms=3, lw=1, label=f"split {s.index} (alpha {s.info['alpha']:.3g})"
            )
    ax.set_xscale("log")
    ax.set_xlabel("ridge alpha")
    ax.set_ylabel("cross-validated MSE (on the shots)")
    ax.legend(fontsize=6)
    return _save(fig, path)


# --- markdown -------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "NaN"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def write_markdown(result: ProtocolResult, path: Path) -> Path:
    """report.md: banners, the summary table, the per-split table and the figures."""
    cfg = result.config
    lines = [f"# grmpiqa evaluation: {cfg['method']} on {cfg.get('dataset', '?')}", ""]
    if cfg.get("random_backbone"):
        lines += [
            f"> **RANDOM BACKBONE**: {cfg.get('backbone_description', '')}. These numbers say "
            "nothing about the method's quality; they only exercise the pipeline.",
            "",
        ]
    if cfg.get("optimistic"):
        lines += [
            "> **OPTIMISTIC**: `--selection best-on-test` keeps, per split, the best test "
            "figure seen during training (the released code's behaviour). Selection on the "
            "test set inflates every number below.",
            "",
        ]
    lines += [
        f"- method: `{cfg['method']}`"
        + (f" (ablation: {cfg['ablation']})" if cfg.get("ablation") else ""),
        f"- backbone: {cfg.get('backbone_description', '')}",
        f"- splits: {len(result.splits)} of seed {cfg['seed']}, {cfg['shots']} shots, "
        f"test fraction {cfg['test_fraction']}",
        f"- selection: `{cfg['selection']}`",
        f"- PLCC (logistic) and RMSE use the {cfg.get('logistic', '4')}-parameter logistic; "
        "RMSE is in normalised-label units ([0, 1]).",
        "",
        "| metric | median | mean ± std | n |",
        "|---|---|---|---|",
    ]
    for k in (*METRICS, "seconds"):
        s = result.summary.get(k)
        if not s:
            continue
        d = 1 if k == "seconds" else 4
        lines.append(
            f"| {_METRIC_TITLES[k]} | {_fmt(s['median'], d)} | {_fmt(s['mean'], d)} ± "
            f"{_fmt(s['std'], d)} | {s['n']} |"
        )
    lines += [
        "",
        "## Splits",
        "",
        "| split | " + " | ".join(METRICS) + " | seconds |",
        "|---" * 7 + "|",
    ]
    for sp in result.splits:
        row = " | ".join(_fmt(sp.metrics[k]) for k in METRICS)
        lines.append(f"| {sp.index} | {row} | {_fmt(sp.seconds, 1)} |")
    if result.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in result.warnings]
    figs = [f for f in ("scatter.png", "curves.png", "cv.png") if f in result.files.values()]
    if figs:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
