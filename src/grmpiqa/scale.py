"""Scores in the user's units: the label scale of the training data and a monotone map
from p(high quality) to it (method.md 5, 8).

The model's score is ``p`` in (0, 1), higher is better. Fine-tuning records in the
checkpoint (``extra["scale"]``) the scale its labels came on (e.g. CLIVE MOS 0-100,
higher is better; KADID DMOS 1-5) and a monotone map ``p -> MOS`` fitted on the shots
(:func:`fit_score_scale`): the 4-parameter logistic of the evaluation protocol with its
asymptotes kept inside the shots' MOS range (widened by :data:`MARGIN` of it on each
side), or, when the logistic explains little (R2 < :data:`R2_LOGISTIC`) or is a step, the
least-squares line, or isotonic regression when even the line runs the wrong way. Mapped
values never leave that range. The fit's quality (RMSE against the label std, R2, the
range it gives) is recorded with the map, printed at the end of fine-tuning and shown by
``grmpiqa info``; a map explaining less than :data:`R2_POOR` of the variance is flagged
as poor. ``model.score(..., scale="mos")`` and ``grmpiqa score --scale mos`` apply it.

Example:
    >>> label = LabelScale(lo=0.0, hi=100.0, higher_is_better=True, name="MOS")
    >>> s = fit_score_scale([0.2, 0.3, 0.5, 0.7, 0.8, 0.9], [10, 25, 50, 70, 80, 85], label)
    >>> s.method
    'logistic4'
    >>> bool(s.to_mos([0.2])[0] < s.to_mos([0.9])[0])
    True
    >>> ScoreScale.from_dict(s.to_dict()) == s
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from grmpiqa.errors import CheckpointError, GrmpiqaError
from grmpiqa.metrics import MonotoneFit, logistic_degeneracy

if TYPE_CHECKING:
    import torch

    from grmpiqa.data.datasets import Dataset

#: Values of ``scale`` that :func:`grmpiqa.scoring.api.score` and ``--scale`` accept.
SCALES: tuple[str, ...] = ("prob", "mos")
#: Version of the JSON record (``to_dict``).
SCALE_FORMAT = "grmpiqa-scale/1"


@dataclass(frozen=True)
class LabelScale:
    """The scale a dataset's labels come on.

    Attributes:
        lo, hi: the range of the scale (documented range, or the data's min and max).
        higher_is_better: False for DMOS-style labels (KADID, TID2013 distortion).
        name: what the numbers are called (``"MOS"``, ``"DMOS"``).
        source: where it came from (a dataset spec), for the model card.
    """

    lo: float
    hi: float
    higher_is_better: bool = True
    name: str = "MOS"
    source: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or self.hi <= self.lo:
            raise GrmpiqaError(f"label scale: need finite lo < hi, got {self.lo}..{self.hi}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lo": self.lo,
            "hi": self.hi,
            "higher_is_better": self.higher_is_better,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelScale:
        return cls(
            lo=float(d["lo"]),
            hi=float(d["hi"]),
            higher_is_better=bool(d.get("higher_is_better", True)),
            name=str(d.get("name", "MOS")),
            source=d.get("source"),
        )

    def describe(self) -> str:
        direction = "higher is better" if self.higher_is_better else "lower is better"
        return f"{self.name} {self.lo + 0.0:g}-{self.hi + 0.0:g}, {direction}"


#: How far the map may reach beyond the shots' MOS range, as a share of that range, on
#: each side (and never beyond the label scale itself).
MARGIN = 0.05
#: The fitted logistic is kept when it explains at least this share of the shots' MOS
#: variance (R2); below it the map falls back to the least-squares line.
R2_LOGISTIC = 0.2
#: A map explaining less than this share of the shots' MOS variance is reported as poor.
R2_POOR = 0.2


@dataclass(frozen=True)
class ScoreScale:
    """A monotone map from p(high quality) to a :class:`LabelScale`.

    Attributes:
        label: the target scale.
        map: the fitted :class:`~grmpiqa.metrics.MonotoneFit` (``logistic4``, ``linear``
            or ``isotonic``).
        fit: how well it fits the shots it was fitted on: ``n``, ``rmse`` (label
            units), ``r2`` (share of the shots' MOS variance explained), ``label_std``,
            ``output_range`` (what the map can give for p in [0, 1]), ``quality``
            (``good``, ``poor`` or ``none``), and ``fallback``, the reason a simpler map
            replaced the logistic (or None).
        bounds: mapped values are clipped to this range: the shots' MOS range widened
            by :data:`MARGIN` of it on each side, inside the label scale (None: the
            label scale, as in checkpoints written before grmpiqa 0.3).
    """

    label: LabelScale
    map: MonotoneFit
    fit: dict[str, Any] = field(default_factory=dict, compare=False)
    bounds: tuple[float, float] | None = None

    @property
    def method(self) -> str:
        return self.map.kind

    @property
    def params(self) -> tuple[float, ...]:
        return self.map.params

    @property
    def limits(self) -> tuple[float, float]:
        return self.bounds if self.bounds is not None else (self.label.lo, self.label.hi)

    def to_mos(self, p: Any) -> np.ndarray:
        """Map scores ``p`` in (0, 1) to the label scale (float64 array, same shape)."""
        lo, hi = self.limits
        return np.clip(self.map(np.asarray(p, dtype=np.float64)), lo, hi)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": SCALE_FORMAT,
            **self.label.to_dict(),
            "map": self.map.to_dict(),
            "fit": dict(self.fit),
        }
        if self.bounds is not None:
            d["bounds"] = list(self.bounds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreScale:
        try:
            bounds = d.get("bounds")
            if bounds is not None:
                lo, hi = (float(v) for v in bounds)
                if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                    raise ValueError(f"bounds {bounds}")
                bounds = (lo, hi)
            return cls(
                label=LabelScale.from_dict(d),
                map=MonotoneFit.from_dict(d["map"]),
                fit=dict(d.get("fit") or {}),
                bounds=bounds,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise GrmpiqaError(f"score scale record is malformed ({err})") from None

    def describe(self) -> str:
        return f"{self.label.describe()} ({self.method} map fitted on {self.fit.get('n')} shots)"

    def quality_line(self) -> str:
        """One line: the map, its fit on the shots (RMSE against the label std, R2) and
        the range it can give."""
        f = self.fit
        rng = f.get("output_range") or [math.nan, math.nan]
        parts = [f"p -> {self.label.name} map: {self.method}"]
        if f.get("rmse") is not None and f.get("label_std") is not None:
            parts.append(
                f"RMSE {f['rmse']:.3g} on {f.get('n')} shots (label std {f['label_std']:.3g})"
            )
        if f.get("r2") is not None:
            parts.append(f"R2 {f['r2']:.2f}")
        parts.append(f"range {rng[0]:.4g}-{rng[1]:.4g}")
        if f.get("fallback"):
            parts.append(f"fallback: {f['fallback']}")
        return ", ".join(parts)

    def warning(self) -> str | None:
        """Why the map's MOS values are rough (None when its fit is good)."""
        q = self.fit.get("quality")
        if q == "poor":
            r2 = self.fit.get("r2")
            share = f"{100 * max(r2, 0.0):.0f}%" if isinstance(r2, float) else "little"
            return (
                f"the p -> {self.label.name} map explains {share} of the shots' "
                f"{self.label.name} variance (RMSE {self.fit.get('rmse', math.nan):.3g} vs "
                f"label std {self.fit.get('label_std', math.nan):.3g}): its values are rough; "
                "rank with p, or fine-tune on more or better shots"
            )
        if q == "none":
            return (
                f"no p -> {self.label.name} map could be fitted on the shots "
                f"({self.fit.get('fallback')}); the recorded range map only spreads p over "
                "the scale"
            )
        return None


def label_scale_of(dataset: Dataset) -> LabelScale:
    """The label scale of ``dataset``.

    Uses ``dataset.scale`` (lo, hi, higher_is_better) where the data layer records one;
    otherwise recovers the exact affine map the data layer applied (label = (mos - lo) /
    (hi - lo), flipped for lower-is-better kinds) from the (mos, label) pairs.
    """
    rec = getattr(dataset, "scale", None)
    if rec is not None:

        def get(key: str, default: Any = None) -> Any:
            return rec.get(key, default) if isinstance(rec, dict) else getattr(rec, key, default)

        hib = bool(get("higher_is_better", True))
        return LabelScale(
            lo=float(get("lo", math.nan)),
            hi=float(get("hi", math.nan)),
            higher_is_better=hib,
            name=str(get("name", None) or ("MOS" if hib else "DMOS")),
            source=getattr(dataset, "spec", None),
        )
    mos = np.asarray(dataset.mos, dtype=np.float64)
    lab = np.asarray(dataset.labels, dtype=np.float64)
    # clipped labels (values outside the documented range) would bend the line
    ok = np.isfinite(mos) & np.isfinite(lab) & (lab > 0.0) & (lab < 1.0)
    if ok.sum() < 2 or np.ptp(mos[ok]) == 0.0:
        ok = np.isfinite(mos) & np.isfinite(lab)
    if ok.sum() < 2 or np.ptp(mos[ok]) == 0.0:
        raise GrmpiqaError(
            f"{getattr(dataset, 'spec', 'dataset')}: cannot tell the label scale from fewer "
            "than two distinct MOS values"
        )
    slope, icpt = np.polyfit(mos[ok], lab[ok], 1)
    higher = bool(slope > 0)
    # label = (mos - lo) / (hi - lo)  or  1 - (mos - lo) / (hi - lo)
    if higher:
        lo, hi = -icpt / slope, (1.0 - icpt) / slope
    else:
        lo, hi = (1.0 - icpt) / slope, -icpt / slope
    lo, hi = _tidy(lo), _tidy(hi)
    return LabelScale(
        lo=lo,
        hi=hi,
        higher_is_better=higher,
        name="MOS" if higher else "DMOS",
        source=getattr(dataset, "spec", None),
    )


def _tidy(v: float) -> float:
    """Round away float noise of the recovered range (100.00000000001 -> 100)."""
    r = round(float(v), 6)
    return (float(r) if abs(r - v) < 1e-7 * max(1.0, abs(v)) else float(v)) + 0.0  # no -0.0


def fit_score_scale(
    pred: Sequence[float] | np.ndarray,
    mos: Sequence[float] | np.ndarray,
    label: LabelScale,
    margin: float = MARGIN,
) -> ScoreScale:
    """Fit the monotone map ``p -> MOS`` on the shots' predictions and raw MOS.

    1. The 4-parameter logistic of the evaluation protocol, its asymptotes bounded to the
       shots' MOS range widened by ``margin`` of it on each side (inside the label
       scale), kept when it runs with the scale's direction, is no step between two shots
       and explains at least :data:`R2_LOGISTIC` of the shots' MOS variance;
    2. else the least-squares line (clipped to the same range) when it runs with the
       scale's direction;
    3. else isotonic regression (monotone, interpolated between the shots, flat beyond).

    With fewer than 3 shots or constant predictions nothing can be fitted: the range map
    ``p = 0 -> worst end, p = 1 -> best end`` is recorded, which assumes nothing about the
    shots. Every map is monotone in the scale's direction; ``fit`` records its quality.
    """
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(mos, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predictions but {t.size} MOS values")
    ok = np.isfinite(p) & np.isfinite(t)
    p, t = p[ok], t[ok]
    sign = 1.0 if label.higher_is_better else -1.0
    if p.size < 3 or np.ptp(p) == 0.0 or np.ptp(t) == 0.0:
        reason = "no map can be fitted (fewer than 3 shots or constant values)"
        width = label.hi - label.lo
        line = (width, label.lo) if label.higher_is_better else (-width, label.hi)
        s = ScoreScale(label, MonotoneFit("linear", line, f"{reason}; range map"))
        return ScoreScale(label, s.map, _fit_record(s, p, t, s.map.note, "none"))
    w = float(np.ptp(t))
    bounds = (
        max(label.lo, float(t.min()) - margin * w),
        min(label.hi, float(t.max()) + margin * w),
    )
    fallback = None
    logistic = _bounded_logistic(p, t, bounds, sign) if p.size > 4 else None
    if p.size <= 4:
        fallback = f"{p.size} shots are too few for the 4-parameter logistic"
    elif logistic is None:
        fallback = "the 4-parameter logistic fit failed or runs against the scale's direction"
    else:
        step = logistic_degeneracy(logistic, p)
        r2 = _r2(np.clip(logistic(p), *bounds), t)
        if step is not None:
            fallback = f"the 4-parameter logistic is degenerate ({step})"
        elif r2 < R2_LOGISTIC:
            fallback = f"the 4-parameter logistic explains little (R2 {r2:.2f} < {R2_LOGISTIC})"
        else:
            return _scale(label, logistic, bounds, p, t, None)
    slope, icpt = np.polyfit(p, t, 1)
    if sign * slope > 0:
        lsq = MonotoneFit("linear", (float(slope), float(icpt)), f"{fallback}; linear map")
        return _scale(label, lsq, bounds, p, t, lsq.note)
    iso = _isotonic(p, t, sign, f"{fallback}; the line runs against the scale's direction")
    return _scale(label, iso, bounds, p, t, iso.note)


def _bounded_logistic(
    p: np.ndarray, t: np.ndarray, bounds: tuple[float, float], sign: float
) -> MonotoneFit | None:
    """The 4-parameter logistic with both asymptotes inside ``bounds`` and a slope width
    of at least 1/100 of the predictions' spread; None when it fails or runs against
    ``sign``."""
    from scipy import optimize

    lo, hi = bounds
    pmin, span = float(p.min()), float(np.ptp(p))
    # fitted in unit coordinates (x, y in [0, 1]): well scaled, so it converges quickly
    x = (p - pmin) / span
    y = (t - lo) / (hi - lo)

    def f(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
        s = 1.0 / (1.0 + np.exp(np.clip(-(x - b3) / b4, -500.0, 500.0)))
        return np.asarray(b2 + (b1 - b2) * s)

    def jac(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
        s = 1.0 / (1.0 + np.exp(np.clip(-(x - b3) / b4, -500.0, 500.0)))
        g = (b1 - b2) * s * (1.0 - s) / b4
        return np.stack([s, 1.0 - s, -g, -g * (x - b3) / b4], axis=1)

    inset = 1e-6
    p0 = [1.0 - inset, inset] if sign > 0 else [inset, 1.0 - inset]
    p0 += [float(np.median(x)), float(np.clip(np.std(x), 0.02, 5.0))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(
                f,
                x,
                y,
                p0=p0,
                jac=jac,
                bounds=([0.0, 0.0, -1.0, 0.01], [1.0, 1.0, 2.0, 10.0]),
                max_nfev=2000,
            )
    except (RuntimeError, ValueError, optimize.OptimizeWarning, FloatingPointError):
        return None
    b1, b2, b3, b4 = (float(v) for v in params)
    if not np.all(np.isfinite(params)) or sign * (b1 - b2) <= 0:
        return None
    w = hi - lo
    return MonotoneFit("logistic4", (lo + b1 * w, lo + b2 * w, pmin + b3 * span, b4 * span))


def _isotonic(p: np.ndarray, t: np.ndarray, sign: float, note: str) -> MonotoneFit:
    """Isotonic regression of ``t`` on ``p`` (monotone in ``sign``), as knots at the
    distinct predictions (tied predictions averaged), interpolated linearly."""
    from scipy.optimize import isotonic_regression

    xs, inv = np.unique(p, return_inverse=True)
    sums = np.bincount(inv, weights=t)
    counts = np.bincount(inv).astype(np.float64)
    fitted = isotonic_regression(sums / counts, weights=counts, increasing=sign > 0).x
    return MonotoneFit("isotonic", tuple(float(v) for v in (*xs, *fitted)), f"{note}; isotonic map")


def _r2(fitted: np.ndarray, t: np.ndarray) -> float:
    sst = float(np.sum((t - t.mean()) ** 2))
    return 1.0 - float(np.sum((fitted - t) ** 2)) / sst if sst > 0 else math.nan


def _scale(
    label: LabelScale,
    fitted: MonotoneFit,
    bounds: tuple[float, float],
    p: np.ndarray,
    t: np.ndarray,
    fallback: str | None,
) -> ScoreScale:
    s = ScoreScale(label, fitted, bounds=bounds)
    r2 = _r2(s.to_mos(p), t)
    quality = "good" if math.isfinite(r2) and r2 >= R2_POOR else "poor"
    return ScoreScale(label, fitted, _fit_record(s, p, t, fallback, quality), bounds)


def _fit_record(
    s: ScoreScale, p: np.ndarray, t: np.ndarray, fallback: str | None, quality: str
) -> dict[str, Any]:
    rmse = float(np.sqrt(np.mean((s.to_mos(p) - t) ** 2))) if p.size else math.nan
    r2 = _r2(s.to_mos(p), t) if p.size > 1 else math.nan
    ends = s.to_mos(np.linspace(0.0, 1.0, 201))
    return {
        "n": int(p.size),
        "rmse": rmse if math.isfinite(rmse) else None,
        "r2": r2 if math.isfinite(r2) else None,
        "label_std": float(np.std(t)) if p.size else None,
        "output_range": [float(ends.min()), float(ends.max())],
        "margin": MARGIN,
        "quality": quality,
        "fallback": fallback,
    }


def scale_from_metadata(meta: dict[str, Any], source: str = "checkpoint") -> ScoreScale | None:
    """The :class:`ScoreScale` a checkpoint's metadata records, or None."""
    extra = meta.get("extra") or {}
    rec = extra.get("scale") if isinstance(extra, dict) else None
    if not rec:
        return None
    try:
        return ScoreScale.from_dict(rec)
    except GrmpiqaError as err:
        raise CheckpointError(f"{source}: {err}") from None


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise GrmpiqaError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    return scale


class HasScoreScale(Protocol):
    """Anything carrying the scale its fine-tuning recorded (a quality model)."""

    score_scale: ScoreScale | None


def require_score_scale(model: HasScoreScale, source: str | None = None) -> ScoreScale:
    """The model's recorded scale, or a clear error saying why MOS is not available."""
    s: ScoreScale | None = getattr(model, "score_scale", None)
    if s is None:
        what = source or "this model"
        raise GrmpiqaError(
            f"{what}: no MOS scale recorded (only checkpoints written by `grmpiqa finetune` "
            "carry one); score with the default scale (p in (0, 1)) or fine-tune first"
        )
    return s


def apply_scale(model: HasScoreScale, scores: torch.Tensor, scale: str) -> torch.Tensor:
    """``scores`` (p) in the units ``scale`` names: unchanged for ``"prob"``, MOS for
    ``"mos"``; the same dtype either way."""
    import torch

    if check_scale(scale) == "prob":
        return scores
    s = require_score_scale(model)
    return torch.from_numpy(s.to_mos(scores.detach().cpu().numpy())).to(scores.dtype)
