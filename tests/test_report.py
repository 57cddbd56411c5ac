"""The report writer (report.json, report.md, predictions.csv, figures), from result
objects built here, without training anything."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from grmpiqa.data import Dataset, Item
from grmpiqa.metrics import evaluate_predictions, summarize_metrics
from grmpiqa.report import REPORT_FORMAT, median_split, read_report, write_report
from grmpiqa.results import ProtocolResult, SplitResult


def dataset(n: int = 20) -> Dataset:
    items = [
        Item(path=Path(f"/data/img{i}.png"), mos=float(i), label=i / (n - 1), name=f"img{i}.png")
        for i in range(n)
    ]
    return Dataset(items, kind="csv", root="/data", spec="csv:/data/labels.csv")


def split(index: int, dataset: Dataset, pred: np.ndarray, test: list[int]) -> SplitResult:
    labels = np.array([dataset[i].label for i in test])
    return SplitResult(
        index=index,
        metrics=evaluate_predictions(pred, labels),
        seconds=1.5 + index,
        n_train=5,
        n_test=len(test),
        test_indices=test,
        predictions=[float(p) for p in pred],
        history=[{"epoch": e, "loss_q": 1.0 / e, "train_srcc": 0.1 * e} for e in (1, 2, 3)],
        info={"epochs": 3},
    )


def result(ds: Dataset, splits: list[SplitResult], **config) -> ProtocolResult:
    cfg = {"method": "grmp", "dataset": ds.spec, "seed": 0, "shots": 5, "test_fraction": 0.2,
           "selection": "final", "logistic": "4", "backbone_description": "test-tiny",
           "random_backbone": False, "optimistic": False, **config}  # fmt: skip
    summary = summarize_metrics([{**s.metrics, "seconds": s.seconds} for s in splits])
    return ProtocolResult(cfg, ds, splits, summary)


def test_report_files_schema_and_median_split(tmp_path):
    ds = dataset()
    rng = np.random.default_rng(0)
    tests = [list(range(k, 20, 3))[:6] for k in range(3)]
    splits = [
        split(k, ds, np.array([ds[i].label for i in t]) + 0.2 * k * rng.random(len(t)), t)
        for k, t in enumerate(tests)
    ]
    files = write_report(result(ds, splits), tmp_path)
    written = {Path(str(p)).name for p in files.values()}
    assert {"report.json", "report.md", "predictions.csv", "scatter.png", "curves.png"} <= written
    rep = read_report(tmp_path / "report.json")
    assert rep["format"] == REPORT_FORMAT
    assert [s["index"] for s in rep["splits"]] == [0, 1, 2]
    assert rep["summary"]["srcc"]["n"] == 3
    med = median_split(splits)
    assert med is not None and rep["median_split"] == med.index
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(len(t) for t in tests)
    assert {"split", "path", "mos", "label", "prediction"} <= set(rows[0])
    md = (tmp_path / "report.md").read_text()
    assert "| SRCC |" in md and "RANDOM" not in md and "OPTIMISTIC" not in md


def test_banners_for_random_backbone_and_test_set_selection(tmp_path):
    ds = dataset()
    t = list(range(0, 20, 4))
    s = split(0, ds, np.linspace(0, 1, len(t)), t)
    write_report(result(ds, [s], random_backbone=True, optimistic=True), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "RANDOM BACKBONE" in md and "OPTIMISTIC" in md


def test_nan_metrics_are_written_as_null(tmp_path):
    ds = dataset()
    t = list(range(5))
    with pytest.warns(UserWarning):
        s = split(0, ds, np.full(5, 0.5), t)  # constant predictions
    assert all(math.isnan(v) for v in s.metrics.values())
    write_report(result(ds, [s]), tmp_path)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["splits"][0]["srcc"] is None
    assert "NaN" in (tmp_path / "report.md").read_text()
