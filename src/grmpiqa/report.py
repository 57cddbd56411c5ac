"""Evaluation reports: report.json, report.md, predictions.csv and figures (method.md 8).

Layout of a report folder::

    DIR/report.json       config, per-split metrics, summary (median/mean/std)
    DIR/report.md         a short human-readable summary table
    DIR/predictions.csv   split,path,mos,label,prediction (every test image of every split)
    DIR/scatter.png       predictions vs. MOS of the median-SRCC split, with the logistic fit
    DIR/curves.png        training curves (trained methods): one axis per loss and one for
                          the correlations, one named line per split, lr drops marked
    DIR/cv.png            linear probe: cross-validated MSE against the ridge strength
    DIR/splits/split_K.json  each finished split (what ``--resume`` reads)

A comparison of several methods on the same splits (:func:`write_comparison`) writes
``DIR/report.json``, ``DIR/report.md`` and ``DIR/comparison.png`` beside one such report
per method in ``DIR/METHOD/``.

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

    from grmpiqa.results import ComparisonResult, ProtocolResult, SplitResult

__all__ = [
    "COMPARISON_FORMAT",
    "REPORT_FORMAT",
    "median_split",
    "read_report",
    "write_comparison",
    "write_report",
]

REPORT_FORMAT = "grmpiqa-report/1"
COMPARISON_FORMAT = "grmpiqa-comparison/1"

#: What each stop reason of a trained split means (report.md).
STOP_REASONS = {
    "min_lr": "the plateau schedule ended (lr fell below its floor)",
    "max_epochs": "the epoch cap came first (the schedule had not ended)",
}

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


def _lr_drops(history: Sequence[dict[str, Any]]) -> list[float]:
    """Epochs after which the lr fell (rows whose ``next_lr`` is below their ``lr``)."""
    out = []
    for r in history:
        lr, nxt = r.get("lr"), r.get("next_lr")
        if isinstance(lr, int | float) and isinstance(nxt, int | float) and nxt < lr:
            out.append(float(r["epoch"]))
    return out


def write_curves(splits: Sequence[SplitResult], path: Path) -> Path:
    """curves.png (:func:`curves_figure`)."""
    return _save(curves_figure(splits), path)


def curves_figure(splits: Sequence[SplitResult]) -> Figure:
    """Training curves: one axis per loss (each on its own scale) and one for the
    correlations, one line per split (named in the legends); dotted vertical lines mark
    where the lr fell."""
    rows = {
        s.index: [r for r in s.history if isinstance(r.get("epoch"), int | float)] for s in splits
    }
    numeric = {
        k
        for h in rows.values()
        for r in h
        for k, v in r.items()
        if isinstance(v, int | float) and math.isfinite(v)
    }
    losses = sorted(k for k in numeric if k.startswith("loss"))
    corrs = sorted(k for k in numeric if k.endswith(("_srcc", "_plcc")) and "srcc" in k)
    panels = [*losses, "srcc"] if corrs else losses
    fig = _figure(4.2 * max(1, len(panels)), 4)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    titles = {
        "loss_q": "quality loss L_q",
        "loss_s": "scene distillation L_s (not minimised)",
        "srcc": "SRCC during training ("
        + ", ".join(k.replace("_srcc", "").replace("_", "-") for k in corrs)
        + ")",
    }
    styles = ["-", "--", ":", "-."]
    for ax, panel in zip(axes, panels, strict=False):
        keys = corrs if panel == "srcc" else [panel]
        for n, (index, h) in enumerate(rows.items()):
            color = f"C{n % 10}"
            for m, k in enumerate(keys):
                pts = [
                    (r["epoch"], r[k])
                    for r in h
                    if isinstance(r.get(k), int | float) and math.isfinite(r[k])
                ]
                if pts:
                    x, y = zip(*pts, strict=True)
                    name = f"split {index}" + (
                        f" {k.replace('_srcc', '')}" if len(keys) > 1 else ""
                    )
                    ax.plot(x, y, styles[m % 4], color=color, lw=1.2, label=name)
            for e in _lr_drops(h):
                ax.axvline(e, color=color, ls=":", lw=0.8, alpha=0.7)
        ax.set_xlabel("epoch")
        ax.set_ylabel(panel if panel != "srcc" else "SRCC")
        ax.set_title(titles.get(panel, panel), fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, title="dotted verticals: lr drops", title_fontsize=7)
    return fig


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
        *settings_lines(cfg),
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
    trained = any("stopped" in sp.info for sp in result.splits)
    extra_cols = " epochs | stopped |" if trained else ""
    lines += [
        "",
        "## Splits",
        "",
        "| split | " + " | ".join(METRICS) + " | seconds |" + extra_cols,
        "|---" * (7 + (2 if trained else 0)) + "|",
    ]
    for sp in result.splits:
        row = " | ".join(_fmt(sp.metrics[k]) for k in METRICS)
        tail = ""
        if trained:
            tail = f" {sp.info.get('epochs', '')} | {sp.info.get('stopped', '')} |"
        lines.append(f"| {sp.index} | {row} | {_fmt(sp.seconds, 1)} |{tail}")
    if trained:
        seen = sorted({str(sp.info.get("stopped")) for sp in result.splits if "stopped" in sp.info})
        lines += [""] + [f"- `{r}`: {STOP_REASONS.get(r, r)}" for r in seen]
    if result.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in result.warnings]
    figs = [f for f in ("scatter.png", "curves.png", "cv.png") if f in result.files.values()]
    if figs:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


# --- settings -------------------------------------------------------------------------


def settings_lines(cfg: dict[str, Any]) -> list[str]:
    """The settings a reader needs to judge the numbers, as markdown lines."""
    lines = ["## Settings", ""]
    ft = cfg.get("finetune")
    if ft:
        lines.append(
            f"- stage 2: lambda {ft.get('lam')}, SGD lr {ft.get('lr')}, weight decay "
            f"{ft.get('weight_decay')}, epoch cap {ft.get('max_epochs')}, evaluated every "
            f"{ft.get('eval_every')} epochs; lr x {ft.get('lr_decay')} after more than "
            f"{ft.get('patience')} evaluations without improvement of `{ft.get('monitor')}`; "
            f"stops when lr < {ft.get('min_lr')}"
        )
        groups = ", ".join(ft.get("groups") or [])
        lines.append(
            f"- trained groups: {groups}; distillation {'on' if ft.get('distill') else 'off'}; "
            f"batch {ft.get('batch_size') or 'all shots'}; precision {ft.get('precision')}; "
            f"frozen-feature cache {'on' if ft.get('cache') else 'off'}"
        )
    init = cfg.get("init")
    if cfg.get("method") == "grmp":
        lines.append(f"- init: {Path(str(init['path'])).name if init else 'none (random prompts)'}")
    probe = cfg.get("linear_probe")
    if probe:
        a = probe.get("alphas") or []
        lines.append(
            f"- ridge alpha chosen by {probe.get('folds')}-fold CV on the shots among "
            f"{len(a)} values {min(a):g}..{max(a):g}"
            if a
            else "- ridge probe"
        )
    mc = cfg.get("model_config") or {}
    if cfg.get("method") == "linear-probe":
        mc = {}  # the probe reads image embeddings; no prompts
    if mc.get("hand_prompts"):
        lines.append("- prompts: " + " / ".join(f"'{t}'" for t in mc["hand_prompts"]))
    elif mc:
        vpt = f"VPT {mc.get('vpt_tokens')} tokens" if mc.get("visual_prompts") else "no VPT"
        lines.append(f"- prompts: {mc.get('n_ctx')} learned context vectors, {vpt}")
    lines.append(
        f"- seed {cfg.get('seed')}, precision {cfg.get('precision')}, device {cfg.get('device')}, "
        f"grmpiqa {cfg.get('grmpiqa_version')}, torch {cfg.get('torch_version')}"
    )
    return lines


# --- comparisons ------------------------------------------------------------------------


def comparison_dict(result: ComparisonResult) -> dict[str, Any]:
    """The content of a comparison's report.json."""
    return {
        "format": COMPARISON_FORMAT,
        "config": result.config,
        "reference": result.reference,
        "methods": {
            name: {
                "summary": res.summary,
                "splits": [s.summary_dict() for s in res.splits],
                "report": f"{name}/report.json",
                "warnings": list(res.warnings),
            }
            for name, res in result.methods.items()
        },
        "differences": result.differences,
        "files": result.files,
    }


def write_comparison(result: ComparisonResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """report.json, report.md and comparison.png of a comparison (the methods' own
    reports are in their sub-folders already)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"figure": write_comparison_figure(result, out / "comparison.png")}
    result.files = {"figure": "comparison.png", "json": "report.json", "md": "report.md"}
    files["json"] = write_json(out / "report.json", comparison_dict(result))
    files["md"] = write_comparison_markdown(result, out / "report.md")
    return files


def write_comparison_figure(result: ComparisonResult, path: Path) -> Path:
    """Left: each split's SRCC per method, the same split joined across methods (paired),
    medians as bars. Right: the paired differences against the reference with their
    95 % bootstrap intervals."""
    names = list(result.methods)
    fig = _figure(11, 4.2)
    ax_l, ax_r = fig.subplots(1, 2)
    n_splits = len(next(iter(result.methods.values())).splits)
    for k in range(n_splits):
        ys = [result.methods[m].splits[k].metrics["srcc"] for m in names]
        ax_l.plot(range(len(names)), ys, "-o", color="0.6", lw=0.8, ms=4, zorder=1)
    for i, m in enumerate(names):
        med = result.methods[m].summary["srcc"]["median"]
        ax_l.hlines(med, i - 0.3, i + 0.3, color=f"C{i}", lw=3, label=f"{m}: median {med:.3f}")
    ax_l.set_xticks(range(len(names)), names)
    ax_l.set_ylabel("test SRCC")
    ax_l.set_title(f"SRCC per split (grey: one split, {n_splits} splits)", fontsize=10)
    ax_l.legend(fontsize=8)
    others = [m for m in names if m != result.reference]
    for j, metric in enumerate(("srcc", "plcc")):
        means = [result.differences[m][metric]["mean"] for m in others]
        lo = [result.differences[m][metric]["lo"] for m in others]
        hi = [result.differences[m][metric]["hi"] for m in others]
        y = np.arange(len(others)) + (0.15 if j else -0.15)
        err = np.array([[mu - a for mu, a in zip(means, lo, strict=True)],
                        [b - mu for mu, b in zip(means, hi, strict=True)]])  # fmt: skip
        ax_r.errorbar(means, y, xerr=err, fmt="o", color=f"C{j}", capsize=3,
                      label=f"{metric.upper()} difference")  # fmt: skip
    ax_r.axvline(0.0, color="black", lw=0.8)
    ax_r.set_yticks(range(len(others)), [f"{m} - {result.reference}" for m in others])
    ax_r.set_xlabel("paired difference (mean over splits)")
    ax_r.set_title("against the reference, 95 % bootstrap CI", fontsize=10)
    ax_r.legend(fontsize=8)
    if result.config.get("random_backbone"):
        fig.suptitle("RANDOM backbone: these numbers say nothing about quality", fontsize=9)
    return _save(fig, path)


def write_comparison_markdown(result: ComparisonResult, path: Path) -> Path:
    cfg = result.config
    names = list(result.methods)
    lines = [f"# grmpiqa comparison: {', '.join(names)} on {cfg.get('dataset', '?')}", ""]
    if cfg.get("random_backbone"):
        lines += [
            f"> **RANDOM BACKBONE**: {cfg.get('backbone_description', '')}. These numbers say "
            "nothing about the methods' quality; they only exercise the pipeline.",
            "",
        ]
    if cfg.get("optimistic"):
        lines += ["> **OPTIMISTIC**: best-on-test selection for the trained methods.", ""]
    boot = cfg.get("bootstrap", {})
    lines += [
        f"- the same {cfg['splits']} splits (seed {cfg['seed']}) for every method: "
        f"{cfg['shots']} shots from the pool, test fraction {cfg['test_fraction']}, "
        f"selection `{cfg['selection']}`",
        f"- backbone: {cfg.get('backbone_description', '')}",
        f"- differences are `method - {result.reference}` per split, averaged over splits; "
        f"95 % intervals from {boot.get('replicates')} bootstrap replicates (seed "
        f"{boot.get('seed')}; {boot.get('how')})",
        "",
        "## Medians over splits",
        "",
        "| method | " + " | ".join(_METRIC_TITLES[k] for k in (*METRICS, "seconds")) + " |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    for m in names:
        s = result.methods[m].summary
        cells = [
            f"{_fmt(s[k]['median'], 1 if k == 'seconds' else 4)}"
            + (f" ± {_fmt(s[k]['std'], 3)}" if k != "seconds" else "")
            for k in (*METRICS, "seconds")
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "(median, ± the std over splits)",
        "",
        f"## Paired differences against {result.reference}",
        "",
    ]
    lines += [
        "| method | SRCC diff [95 % CI] | PLCC diff [95 % CI] | per-split SRCC diffs |",
        "|---|---|---|---|",
    ]
    for m, d in result.differences.items():
        cells = [
            f"{_sgn(d[k]['mean'])} [{_sgn(d[k]['lo'])}, {_sgn(d[k]['hi'])}]"
            for k in ("srcc", "plcc")
        ]
        per = ", ".join(_sgn(v) for v in d["srcc"]["per_split"])
        lines.append(f"| {m} - {result.reference} | {cells[0]} | {cells[1]} | {per} |")
    lines += [
        "",
        "## SRCC per split",
        "",
        "| split | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    first = result.methods[names[0]]
    for k, sp in enumerate(first.splits):
        row = " | ".join(_fmt(result.methods[m].splits[k].metrics["srcc"]) for m in names)
        lines.append(f"| {sp.index} | {row} |")
    lines += ["", "## Settings per method", ""]
    for m in names:
        mcfg = result.methods[m].config
        stops = [sp.info.get("stopped") for sp in result.methods[m].splits if "stopped" in sp.info]
        lines += [f"### {m} ([report]({m}/report.md))", ""]
        lines += [ln for ln in settings_lines(mcfg)[2:]]
        if stops:
            lines.append(
                "- stop per split: "
                + ", ".join(
                    f"{sp.index}: {sp.info.get('stopped')} after {sp.info.get('epochs')} epochs"
                    for sp in result.methods[m].splits
                )
            )
        lines.append("")
    lines += ["## Figure", "", "![comparison.png](comparison.png)"]
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _sgn(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "NaN"
    return f"{float(x):+.4f}"
