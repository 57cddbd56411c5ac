"""Reports a reviewer accepts: several methods on the same splits with paired bootstrap
CIs, settings and stop reasons, curves per loss, the signed raw PLCC (issue 20, item 8)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import write_rated_images

from grmpiqa.cli import main
from grmpiqa.metrics import paired_bootstrap, plcc, plcc_logistic
from grmpiqa.report import curves_figure
from grmpiqa.results import SplitResult

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    labels = write_rated_images(d / "imgs", 30, seed=4)
    out = d / "rep"
    rc = main(
        ["evaluate", "--data", f"csv:{labels}", "--method", "grmp,clipiqa,linear-probe",
         "--splits", "3", "--shots", "10", "--report", str(out), "--backbone", "test-tiny",
         "--pretrained", "random", "--max-epochs", "3", "--eval-every", "1",
         "--cache-augmentations", "1", "--vpt-tokens", "4", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    return out


def test_methods_run_on_the_same_splits_into_one_report(comparison):
    rep = json.loads((comparison / "report.json").read_text())
    assert rep["format"] == "grmpiqa-comparison/1" and rep["reference"] == "grmp"
    assert list(rep["methods"]) == ["grmp", "clipiqa", "linear-probe"]
    sub = {m: json.loads((comparison / m / "report.json").read_text()) for m in rep["methods"]}
    tests = {m: [s["n_test"] for s in r["splits"]] for m, r in sub.items()}
    assert len({tuple(v) for v in tests.values()}) == 1  # one set of splits
    for m in ("clipiqa", "linear-probe"):
        for metric in ("srcc", "plcc"):
            d = rep["differences"][m][metric]
            assert d["n_splits"] == 3 and d["n_boot"] == 2000 and d["level"] == 0.95
            assert d["lo"] <= d["mean"] <= d["hi"]
            grmp = [s[metric] for s in sub["grmp"]["splits"]]
            other = [s[metric] for s in sub[m]["splits"]]
            np.testing.assert_allclose(
                d["per_split"], np.subtract(other, grmp), rtol=1e-6, atol=1e-9
            )
        assert rep["methods"][m]["summary"]["srcc"]["median"] == pytest.approx(
            np.median([s["srcc"] for s in sub[m]["splits"]])
        )
    assert (comparison / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    md = (comparison / "report.md").read_text()
    for expected in (
        "## Medians over splits",
        "## Paired differences against grmp",
        "clipiqa - grmp",
        "95 % intervals from 2000 bootstrap replicates",
        "lambda 5.0, SGD lr 0.001",
        "epoch cap 3",
        "stop per split: 0: max_epochs after 3 epochs",
        "RANDOM BACKBONE",
    ):
        assert expected in md, expected
    grmp_md = (comparison / "grmp" / "report.md").read_text()
    assert "## Settings" in grmp_md and "| epochs | stopped |" in grmp_md
    assert "`max_epochs`: the epoch cap came first" in grmp_md


def test_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(0)
    t = [rng.normal(size=40) for _ in range(3)]
    a = [x + rng.normal(0, 0.5, 40) for x in t]
    b = [x + rng.normal(0, 2.0, 40) for x in t]
    d1 = paired_bootstrap(a, b, t, "srcc", n_boot=400, seed=7)
    d2 = paired_bootstrap(a, b, t, "srcc", n_boot=400, seed=7)
    assert d1 == d2 and 0 < d1["lo"] < d1["mean"] < d1["hi"]
    same = paired_bootstrap(a, a, t, "plcc", n_boot=200, seed=7)
    assert same["lo"] == same["hi"] == same["mean"] == 0.0  # paired: no spread


def test_degenerate_logistic_reports_the_signed_raw_plcc():
    rng = np.random.default_rng(0)
    target = rng.random(40)
    pred = 0.5 - 1e-4 * (target > 0.5) + 1e-9 * rng.random(40)  # a step, anti-correlated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = plcc_logistic(pred, target)
    assert value == pytest.approx(plcc(pred, target)) and value < 0
    assert any("signed" in str(w.message) for w in caught)


def test_curves_have_one_axis_per_loss_named_lines_and_lr_drops():
    hist = [
        {"epoch": e, "lr": 1e-3 if e <= 10 else 3e-4, "next_lr": 3e-4 if e >= 10 else 1e-3,
         "loss_q": 0.7 - e / 100, "loss_s": 2.2 + e / 100, "train_srcc": e / 20}
        for e in (5, 10, 15)
    ]  # fmt: skip
    split = SplitResult(0, {}, 1.0, 10, 5, [], [], history=hist)
    fig = curves_figure([split])
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [
        "quality loss L_q",
        "scene distillation L_s (not minimised)",
        "SRCC during training (train)",
    ]
    for ax in axes:
        assert ax.get_legend_handles_labels()[1] == ["split 0"]
        drops = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [10.0, 10.0]]
        assert len(drops) == 1  # the lr fell after epoch 10
