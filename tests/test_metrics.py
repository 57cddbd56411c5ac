"""Metrics of the evaluation protocol (method.md 8) and the linear-probe ridge."""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pytest
from scipy import stats

import grmpiqa.metrics as M


def _sigmoid_data(n: int = 60, seed: int = 0, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.sort(rng.random(n))
    y = 1.0 / (1.0 + np.exp(-10 * (x - 0.5))) + noise * rng.standard_normal(n)
    return x, y


def test_perfect_monotone_prediction():
    x, y = _sigmoid_data()
    m = M.evaluate_predictions(x, y)
    assert set(m) == set(M.METRICS)
    assert m["srcc"] == pytest.approx(1.0)
    assert m["krcc"] == pytest.approx(1.0)
    # a monotone but non-linear relation: raw PLCC < 1, the logistic fit recovers it
    assert m["plcc"] < 0.99
    assert m["plcc_logistic"] == pytest.approx(1.0, abs=1e-6)
    assert m["rmse"] == pytest.approx(0.0, abs=1e-4)


def test_reversed_ranking_and_known_values():
    pred = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    target = [0.3, 0.1, 0.6, 0.5, 0.9, 0.8]
    assert M.srcc(pred, target) == pytest.approx(stats.spearmanr(pred, target)[0])
    # hand-computed: rank differences d = (-1, 1, -1, 1, -1, 1): 1 - 6*6/(6*35) = 0.828571...
    assert M.srcc(pred, target) == pytest.approx(1 - 6 * 6 / (6 * 35))
    # Kendall: 15 pairs, 3 discordant -> (12 - 3) / 15
    assert M.krcc(pred, target) == pytest.approx(9 / 15)
    assert M.plcc(pred, target) == pytest.approx(np.corrcoef(pred, target)[0, 1])
    assert M.srcc(pred[::-1], target) == pytest.approx(-M.srcc(pred, target))


@pytest.mark.parametrize("logistic", ["4", "5"])
def test_logistic_metrics_invariant_to_monotone_rescaling(logistic):
    x, y = _sigmoid_data(80, seed=1, noise=0.03)
    a = M.evaluate_predictions(x, y, logistic)
    b = M.evaluate_predictions(3.0 * x + 7.0, y, logistic)
    assert a["plcc_logistic"] > 0.95
    for k in ("srcc", "plcc", "plcc_logistic", "krcc", "rmse"):
        assert a[k] == pytest.approx(b[k], abs=1e-4)
    # RMSE is in target units: about the noise std (0.03)
    assert 0.015 < a["rmse"] < 0.05


def test_rmse_scales_with_target_units():
    x, y = _sigmoid_data(50, seed=2, noise=0.02)
    r1 = M.rmse(x, y)
    r100 = M.rmse(x, 100 * y)
    assert r100 == pytest.approx(100 * r1, rel=1e-3)


@pytest.mark.parametrize("fn", [M.srcc, M.plcc, M.krcc, M.plcc_logistic, M.rmse])
def test_constant_predictions_give_nan_and_warning(fn):
    with pytest.warns(M.MetricWarning, match="constant"):
        assert math.isnan(fn([0.5] * 10, np.linspace(0, 1, 10)))


def test_evaluate_predictions_constant_warns_once_and_all_nan():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = M.evaluate_predictions(np.full(20, 0.3), np.linspace(0, 1, 20))
    assert all(math.isnan(v) for v in m.values())
    msgs = [str(w.message) for w in caught if issubclass(w.category, M.MetricWarning)]
    assert len(msgs) == 1 and "constant" in msgs[0]


def test_constant_targets_and_too_few_points():
    with pytest.warns(M.MetricWarning, match="targets are constant"):
        assert math.isnan(M.srcc([1, 2, 3, 4], [2, 2, 2, 2]))
    with pytest.warns(M.MetricWarning, match="valid pairs"):
        assert math.isnan(M.plcc([1, 2], [1, 2]))
    # 4 points cannot fit a 4-parameter logistic: NaN, correlations still defined
    with pytest.warns(M.MetricWarning, match="logistic"):
        m = M.evaluate_predictions([0.1, 0.4, 0.35, 0.9], [0.0, 0.5, 0.3, 1.0])
    assert m["srcc"] == pytest.approx(1.0) and m["krcc"] == pytest.approx(1.0)
    assert math.isnan(m["plcc_logistic"]) and math.isnan(m["rmse"])


def test_non_finite_pairs_are_dropped_with_warning():
    x, y = _sigmoid_data(30)
    xp = x.copy()
    xp[3] = np.nan
    with pytest.warns(M.MetricWarning, match="non-finite"):
        s = M.srcc(xp, y)
    assert s == pytest.approx(1.0)


def test_length_mismatch_and_bad_logistic_raise():
    with pytest.raises(ValueError, match="differ in length"):
        M.srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="logistic"):
        M.plcc_logistic([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], logistic="3")


def test_failed_logistic_fit_gives_nan_and_warning(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("Optimal parameters not found")

    monkeypatch.setattr(M.optimize, "curve_fit", boom)
    x, y = _sigmoid_data(20)
    with pytest.warns(M.MetricWarning, match="fit failed"):
        m = M.evaluate_predictions(x, y)
    assert math.isnan(m["plcc_logistic"]) and math.isnan(m["rmse"])
    assert m["srcc"] == pytest.approx(1.0)


def test_summarize_median_mean_population_std_and_nan():
    s = M.summarize([0.1, 0.4, 0.2, float("nan")])
    assert s["n"] == 3
    assert s["median"] == pytest.approx(0.2)
    assert s["mean"] == pytest.approx(0.7 / 3)
    assert s["std"] == pytest.approx(np.std([0.1, 0.4, 0.2]))
    empty = M.summarize([float("nan")])
    assert empty["n"] == 0 and math.isnan(empty["median"])
    both = M.summarize_metrics([{"srcc": 0.5, "seconds": 2.0}, {"srcc": 0.7, "seconds": 4.0}])
    assert both["srcc"]["median"] == pytest.approx(0.6)
    assert both["seconds"]["mean"] == pytest.approx(3.0)


def test_module_doctest():
    assert doctest.testmod(M).failed == 0
