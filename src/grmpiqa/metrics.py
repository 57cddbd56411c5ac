"""Correlation and error metrics of the evaluation protocol (method.md 8).

All functions take predictions and ground truth as 1-D array-likes of equal length and
return a Python float. Ground truth is normally the *normalised label* (MOS min-max
normalised to [0, 1], higher is better, method.md 5): SRCC, KRCC and PLCC are invariant
to that affine map (and its sign flip makes lower-is-better scales agree in sign), and
RMSE is then in label units.

* ``srcc``: Spearman rank correlation (``scipy.stats.spearmanr``).
* ``krcc``: Kendall rank correlation, tau-b (``scipy.stats.kendalltau``).
* ``plcc``: Pearson correlation of the raw predictions (what the released code reports).
* ``plcc_logistic``: Pearson correlation after a monotonic logistic mapping of the
  predictions onto the ground truth, fitted with ``scipy.optimize.curve_fit`` (the usual
  IQA practice, VQEG). ``logistic="4"`` (default) is the 4-parameter logistic
  ``b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))``; ``logistic="5"`` is the 5-parameter
  one of Sheikh et al. (2006), ``b1 * (0.5 - 1 / (1 + exp(b2 (x - b3)))) + b4 x + b5``.
* ``rmse``: root-mean-square error between the *logistic-mapped* predictions and the
  ground truth (in label units, [0, 1] for normalised labels), the same fit as
  ``plcc_logistic``. Raw scores in (0, 1) are not calibrated to any label scale, so an
  RMSE of raw scores would measure calibration, not quality prediction.

Degenerate input never crashes: a constant vector, fewer than 3 finite pairs, or a
logistic fit that does not converge gives ``nan`` and a :class:`MetricWarning`
(a ``UserWarning``). Non-finite pairs are dropped with a warning.

Example:
    >>> m = evaluate_predictions([0.1, 0.4, 0.35, 0.9, 0.6, 0.2], [0, 5, 3, 10, 7, 1])
    >>> round(m["srcc"], 6), round(m["krcc"], 6)
    (1.0, 1.0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats

from grmpiqa.config import LOGISTIC_MODELS

__all__ = [
    "LOGISTIC_MODELS",
    "METRICS",
    "MetricWarning",
    "MonotoneFit",
    "evaluate_predictions",
    "fit_logistic",
    "fit_monotone",
    "logistic_degeneracy",
    "krcc",
    "paired_bootstrap",
    "plcc",
    "plcc_logistic",
    "rmse",
    "srcc",
    "summarize",
    "summarize_metrics",
]

#: Metric names in report order.
METRICS: tuple[str, ...] = ("srcc", "plcc", "plcc_logistic", "krcc", "rmse")

ArrayLike = Sequence[float] | np.ndarray | Any


class MetricWarning(UserWarning):
    """A metric could not be computed (constant input, failed fit) and is NaN."""


def _warn(msg: str) -> None:
    warnings.warn(msg, MetricWarning, stacklevel=4)


def _pairs(
    pred: ArrayLike, target: ArrayLike, name: str, minimum: int = 3
) -> tuple[np.ndarray, np.ndarray] | None:
    """Finite (pred, target) pairs as float64 arrays, or None (after a warning)."""
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"{name}: predictions ({p.size}) and targets ({t.size}) differ in length")
    ok = np.isfinite(p) & np.isfinite(t)
    if not ok.all():
        _warn(f"{name}: dropped {int((~ok).sum())} non-finite prediction/target pairs")
        p, t = p[ok], t[ok]
    if p.size < minimum:
        _warn(f"{name}: {p.size} valid pairs (need at least {minimum}); returning NaN")
        return None
    if np.ptp(p) == 0.0:
        _warn(f"{name}: predictions are constant; returning NaN")
        return None
    if np.ptp(t) == 0.0:
        _warn(f"{name}: targets are constant; returning NaN")
        return None
    return p, t


def _corr(kind: str, p: np.ndarray, t: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "srcc":
            return float(stats.spearmanr(p, t)[0])
        if kind == "krcc":
            return float(stats.kendalltau(p, t)[0])
        return float(stats.pearsonr(p, t)[0])


def srcc(pred: ArrayLike, target: ArrayLike) -> float:
    """Spearman rank-order correlation coefficient."""
    pt = _pairs(pred, target, "srcc")
    return math.nan if pt is None else _corr("srcc", *pt)


def krcc(pred: ArrayLike, target: ArrayLike) -> float:
    """Kendall rank-order correlation coefficient (tau-b)."""
    pt = _pairs(pred, target, "krcc")
    return math.nan if pt is None else _corr("krcc", *pt)


def plcc(pred: ArrayLike, target: ArrayLike) -> float:
    """Pearson linear correlation of the raw predictions (the released code's PLCC)."""
    pt = _pairs(pred, target, "plcc")
    return math.nan if pt is None else _corr("plcc", *pt)


# --- logistic mapping ---------------------------------------------------------------------


def _logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    z = np.clip(-(x - b3) / (abs(b4) + 1e-12), -500.0, 500.0)
    return b2 + (b1 - b2) / (1.0 + np.exp(z))


def _logistic5(x: np.ndarray, b1: float, b2: float, b3: float, b4: float, b5: float) -> np.ndarray:
    z = np.clip(b2 * (x - b3), -500.0, 500.0)
    return b1 * (0.5 - 1.0 / (1.0 + np.exp(z))) + b4 * x + b5


def fit_logistic(
    pred: ArrayLike, target: ArrayLike, logistic: str = "4"
) -> Callable[[np.ndarray], np.ndarray] | None:
    """Fit the ``logistic``-parameter map predictions -> targets; None (+ warning) on failure.

    Initial guesses follow the VQEG practice: the targets' range for the asymptotes, the
    predictions' mean for the midpoint and their std for the slope. A fit that converges
    to a *step* is returned as it is (see :func:`logistic_degeneracy`);
    :func:`fit_monotone` replaces such a fit by a linear map.
    """
    fitted = _fit_logistic_params(pred, target, logistic)
    if fitted is None:
        return None
    return MonotoneFit(f"logistic{logistic}", fitted)


def _fit_logistic_params(
    pred: ArrayLike, target: ArrayLike, logistic: str
) -> tuple[float, ...] | None:
    logistic = str(logistic)
    if logistic not in LOGISTIC_MODELS:
        raise ValueError(f"unknown logistic model {logistic!r}; use one of {LOGISTIC_MODELS}")
    pt = _pairs(pred, target, f"{logistic}-parameter logistic fit", minimum=int(logistic) + 1)
    if pt is None:
        return None
    p, t = pt
    sign = 1.0 if stats.spearmanr(p, t)[0] >= 0 else -1.0
    std = float(np.std(p)) or 1.0
    func: Callable[..., np.ndarray]
    if logistic == "4":
        func = _logistic4
        hi, lo = (t.max(), t.min()) if sign > 0 else (t.min(), t.max())
        p0: list[float] = [hi, lo, float(np.mean(p)), std]
    else:
        func = _logistic5
        p0 = [sign * float(np.ptp(t)), 1.0 / std, float(np.mean(p)), 0.0, float(np.mean(t))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(func, p, t, p0=p0, maxfev=20000)
    except (RuntimeError, ValueError, optimize.OptimizeWarning, FloatingPointError) as err:
        _warn(f"{logistic}-parameter logistic fit failed ({err}); returning NaN")
        return None
    if not np.all(np.isfinite(params)):
        _warn(f"{logistic}-parameter logistic fit gave non-finite parameters; returning NaN")
        return None
    return tuple(float(v) for v in params)


#: A fitted map whose largest jump between neighbouring (sorted) predictions exceeds this
#: share of its whole range is a step, not a fit.
STEP_SHARE = 0.5


def logistic_degeneracy(f: Callable[[np.ndarray], np.ndarray], pred: ArrayLike) -> str | None:
    """Why the fitted map ``f`` is degenerate on ``pred`` (None: it is a real fit).

    Degenerate: it maps every prediction to (nearly) one value, or it is a step: one jump
    between two neighbouring predictions carries more than :data:`STEP_SHARE` of its range
    (typical of nearly constant predictions, where the fitted slope runs away).
    """
    x = np.sort(np.asarray(pred, dtype=np.float64).reshape(-1))
    x = x[np.isfinite(x)]
    m = np.asarray(f(x), dtype=np.float64)
    if not np.all(np.isfinite(m)):
        return "it gives non-finite values"
    span = float(np.ptp(m)) if m.size else 0.0
    if span <= 1e-12 * max(1.0, float(np.abs(m).max()) if m.size else 1.0):
        return "it maps every prediction to one value"
    jump = float(np.abs(np.diff(m)).max()) if m.size > 1 else span
    if jump > STEP_SHARE * span:
        return f"it is a step ({100 * jump / span:.0f}% of its range between two neighbours)"
    return None


@dataclass(frozen=True)
class MonotoneFit:
    """A fitted monotone map predictions -> targets: a logistic, or a simpler fallback.

    Attributes:
        kind: ``"logistic4"``, ``"logistic5"``, ``"linear"`` or ``"isotonic"``.
        params: the fitted parameters (for ``linear``: slope, intercept; for
            ``isotonic``: the knots' x values, ascending, then their y values; the map
            interpolates linearly between knots and is flat beyond them).
        note: why a logistic was replaced by a simpler map (None when it was not).
    """

    kind: str
    params: tuple[float, ...]
    note: str | None = None

    def __call__(self, x: ArrayLike) -> np.ndarray:
        xs = np.asarray(x, dtype=np.float64)
        if self.kind == "linear":
            return np.asarray(self.params[0] * xs + self.params[1], dtype=np.float64)
        if self.kind == "isotonic":
            k = len(self.params) // 2
            return np.asarray(np.interp(xs, self.params[:k], self.params[k:]), dtype=np.float64)
        func = _logistic4 if self.kind == "logistic4" else _logistic5
        return np.asarray(func(xs, *self.params), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": list(self.params), "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MonotoneFit:
        """The map a :meth:`to_dict` record describes; ValueError for a bad record."""
        expected = {"logistic4": 4, "logistic5": 5, "linear": 2}
        try:
            kind = str(d["kind"])
            params = tuple(float(v) for v in d["params"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a monotone fit record ({err})") from None
        if kind == "isotonic":
            k = len(params) // 2
            if len(params) < 2 or len(params) % 2 or any(np.diff(params[:k]) < 0):
                raise ValueError("not a monotone fit record: isotonic knots")
        elif kind not in expected or len(params) != expected[kind]:
            raise ValueError(f"not a monotone fit record: kind {kind!r}, {len(params)} params")
        if not all(math.isfinite(v) for v in params):
            raise ValueError("non-finite parameters in a monotone fit record")
        note = d.get("note")
        return cls(kind, params, str(note) if note is not None else None)


def _linear_fit(p: np.ndarray, t: np.ndarray, note: str) -> MonotoneFit:
    slope, intercept = np.polyfit(p, t, 1)
    return MonotoneFit("linear", (float(slope), float(intercept)), note)


def fit_monotone(pred: ArrayLike, target: ArrayLike, logistic: str = "4") -> MonotoneFit | None:
    """The ``logistic``-parameter logistic from predictions to targets, or a linear map
    (least squares) when the logistic fit is degenerate or fails; every fallback warns.
    None when no map can be fitted at all (fewer than 3 pairs, constant input).

    Example:
        >>> f = fit_monotone([0.1, 0.2, 0.4, 0.5, 0.7, 0.9], [10, 18, 41, 52, 70, 88])
        >>> f.kind, round(float(f(0.5)), 1)
        ('logistic4', 51.2)
    """
    pt = _pairs(pred, target, "monotone fit")
    if pt is None:
        return None
    p, t = pt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = _fit_logistic_params(p, t, logistic)
    if params is None:
        why = str(caught[-1].message) if caught else "fit failed"
        note = f"{logistic}-parameter logistic unavailable ({why}); linear map instead"
        _warn(note)
        return _linear_fit(p, t, note)
    f = MonotoneFit(f"logistic{logistic}", params)
    problem = logistic_degeneracy(f, p)
    if problem is not None:
        note = f"{logistic}-parameter logistic fit is degenerate ({problem}); linear map instead"
        _warn(note)
        return _linear_fit(p, t, note)
    return f


def _mapped_pairs(
    pred: ArrayLike, target: ArrayLike, logistic: str, name: str
) -> tuple[np.ndarray, np.ndarray, float | None] | None:
    """(mapped predictions, targets, None) through the logistic; when that fit is a step,
    (linearly mapped predictions, targets, the signed raw PLCC), with a warning: PLCC
    (logistic) then falls back to the raw PLCC, sign included (a least-squares line would
    report its absolute value)."""
    pt = _pairs(pred, target, name)
    if pt is None:
        return None
    f = fit_logistic(pt[0], pt[1], logistic)
    if f is None:
        return None
    problem = logistic_degeneracy(f, pt[0])
    if problem is not None:
        raw = _corr("plcc", *pt)
        _warn(
            f"{name}: the {logistic}-parameter logistic fit is degenerate ({problem}); "
            f"reporting the raw PLCC ({raw:+.4f}, signed) and the RMSE after a linear fit "
            "instead"
        )
        return _linear_fit(pt[0], pt[1], problem)(pt[0]), pt[1], raw
    m = f(pt[0])
    return m, pt[1], None


def _plcc_of(mt: tuple[np.ndarray, np.ndarray, float | None]) -> float:
    return mt[2] if mt[2] is not None else float(np.corrcoef(mt[0], mt[1])[0, 1])


def plcc_logistic(pred: ArrayLike, target: ArrayLike, logistic: str = "4") -> float:
    """Pearson correlation after the fitted ``logistic``-parameter mapping (the signed
    raw PLCC where that fit is degenerate)."""
    mt = _mapped_pairs(pred, target, logistic, "plcc_logistic")
    if mt is None:
        return math.nan
    return _plcc_of(mt)


def rmse(pred: ArrayLike, target: ArrayLike, logistic: str = "4") -> float:
    """RMSE between the logistic-mapped predictions and the targets (target units)."""
    mt = _mapped_pairs(pred, target, logistic, "rmse")
    if mt is None:
        return math.nan
    return float(np.sqrt(np.mean((mt[0] - mt[1]) ** 2)))


def evaluate_predictions(
    pred: ArrayLike, target: ArrayLike, logistic: str = "4"
) -> dict[str, float]:
    """All of :data:`METRICS` for one set of predictions (one logistic fit shared).

    ``target`` should be the normalised labels in [0, 1] (higher is better), so that RMSE
    is in label units; any affine rescaling of MOS gives the same correlations. Degenerate
    input gives one :class:`MetricWarning` and NaN for every metric it makes undefined.
    """
    out = dict.fromkeys(METRICS, math.nan)
    pt = _pairs(pred, target, "metrics")
    if pt is None:
        return out
    for k in ("srcc", "plcc", "krcc"):
        out[k] = _corr(k, *pt)
    mt = _mapped_pairs(pt[0], pt[1], logistic, "plcc_logistic/rmse")
    if mt is not None:
        out["plcc_logistic"] = _plcc_of(mt)
        out["rmse"] = float(np.sqrt(np.mean((mt[0] - mt[1]) ** 2)))
    return out


def summarize(values: Iterable[float]) -> dict[str, float | int]:
    """``median``, ``mean``, ``std`` (population, ddof 0) over the finite values, and ``n``.

    NaN entries (a split whose metric was undefined) are left out and counted out of
    ``n``; with no finite value every statistic is NaN.
    """
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"median": math.nan, "mean": math.nan, "std": math.nan, "n": 0}
    return {
        "median": float(np.median(v)),
        "mean": float(np.mean(v)),
        "std": float(np.std(v)),
        "n": int(v.size),
    }


def summarize_metrics(
    per_split: Sequence[dict[str, float]], keys: Sequence[str] = (*METRICS, "seconds")
) -> dict[str, dict[str, float | int]]:
    """:func:`summarize` of each key over a list of per-split metric dicts."""
    return {k: summarize(s[k] for s in per_split if k in s) for k in keys}


#: Metrics :func:`paired_bootstrap` can resample.
BOOTSTRAP_METRICS: tuple[str, ...] = ("srcc", "plcc")


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / den, np.nan)


def _rowwise(metric: str, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    if metric == "srcc":
        return _rowwise_pearson(stats.rankdata(pred, axis=1), stats.rankdata(target, axis=1))
    return _rowwise_pearson(pred, target)


def paired_bootstrap(
    pred_a: Sequence[ArrayLike],
    pred_b: Sequence[ArrayLike],
    targets: Sequence[ArrayLike],
    metric: str = "srcc",
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """``metric(a) - metric(b)`` over paired splits, with a bootstrap confidence interval.

    ``pred_a[k]``, ``pred_b[k]`` and ``targets[k]`` are split ``k``'s test predictions of
    the two methods and its targets (the same images in the same order). The estimate is
    the mean over splits of the per-split differences (``median`` too). The interval is
    the percentile interval of a two-level bootstrap (seeded by ``seed``): each replicate
    draws the splits with replacement and, within each drawn split, its test images with
    replacement, the same images for both methods (paired), so it covers both the
    split-to-split spread and the sampling of the test images.

    Example:
        >>> t = [np.arange(20.0)] * 3
        >>> a = [x + np.random.default_rng(i).normal(0, 2, 20) for i, x in enumerate(t)]
        >>> b = [x + np.random.default_rng(9 + i).normal(0, 8, 20) for i, x in enumerate(t)]
        >>> d = paired_bootstrap(a, b, t, "srcc", n_boot=500)
        >>> bool(d["lo"] < d["mean"] < d["hi"]) and d["n_splits"] == 3
        True
    """
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"paired_bootstrap: metric must be one of {BOOTSTRAP_METRICS}")
    if not (len(pred_a) == len(pred_b) == len(targets)) or not targets:
        raise ValueError("paired_bootstrap: one prediction list per split for each method")
    rng = np.random.default_rng(seed)
    per_split: list[float] = []
    boots: list[np.ndarray] = []
    for pa, pb, tt in zip(pred_a, pred_b, targets, strict=True):
        a = np.asarray(pa, dtype=np.float64).reshape(-1)
        b = np.asarray(pb, dtype=np.float64).reshape(-1)
        t = np.asarray(tt, dtype=np.float64).reshape(-1)
        if not a.shape == b.shape == t.shape:
            raise ValueError("paired_bootstrap: the methods' predictions of a split differ")
        ok = np.isfinite(a) & np.isfinite(b) & np.isfinite(t)
        a, b, t = a[ok], b[ok], t[ok]
        n = a.size
        if n < 3:
            per_split.append(math.nan)
            boots.append(np.full(n_boot, np.nan))
            continue
        d = _rowwise(metric, a[None], t[None]) - _rowwise(metric, b[None], t[None])
        per_split.append(float(d[0]))
        idx = rng.integers(0, n, size=(n_boot, n))
        boots.append(_rowwise(metric, a[idx], t[idx]) - _rowwise(metric, b[idx], t[idx]))
    k = len(per_split)
    table = np.stack(boots)  # [splits, n_boot]
    pick = rng.integers(0, k, size=(n_boot, k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reps = np.nanmean(table[pick, np.arange(n_boot)[:, None]], axis=1)
        est = np.asarray(per_split, dtype=np.float64)
        mean = float(np.nanmean(est)) if np.isfinite(est).any() else math.nan
        median = float(np.nanmedian(est)) if np.isfinite(est).any() else math.nan
    reps = reps[np.isfinite(reps)]
    alpha = (1.0 - level) / 2.0
    lo, hi = (
        (float(np.quantile(reps, alpha)), float(np.quantile(reps, 1.0 - alpha)))
        if reps.size
        else (math.nan, math.nan)
    )
    return {
        "metric": metric,
        "mean": mean,
        "median": median,
        "lo": lo,
        "hi": hi,
        "level": level,
        "n_splits": k,
        "n_boot": n_boot,
        "per_split": per_split,
    }
