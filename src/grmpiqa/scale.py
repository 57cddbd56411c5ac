"""Scores in the user's units: the label scale of the training data and a monotone map
from p(high quality) to it (method.md 5, 8).

The model's score is ``p`` in (0, 1), higher is better. Fine-tuning records in the
checkpoint (``extra["scale"]``) the scale its labels came on (e.g. CLIVE MOS 0-100,
higher is better; KADID DMOS 1-5) and a map ``p -> MOS`` fitted on the shots: the
4-parameter logistic of the evaluation protocol (:func:`grmpiqa.metrics.fit_monotone`),
or a linear map when that fit is degenerate. ``model.score(..., scale="mos")`` and
``grmpiqa score --scale mos`` apply it.

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
from typing import TYPE_CHECKING, Any

import numpy as np

from grmpiqa.errors import CheckpointError, GrmpiqaError
from grmpiqa.metrics import MonotoneFit, fit_monotone

if TYPE_CHECKING:
    import torch

    from grmpiqa.data.datasets import Dataset
    from grmpiqa.model import QualityModel

#: Values of ``scale`` that :meth:`QualityModel.score` and ``--scale`` accept.
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


@dataclass(frozen=True)
class ScoreScale:
    """A monotone map from p(high quality) to a :class:`LabelScale`.

    Attributes:
        label: the target scale; mapped values are clipped to ``[label.lo, label.hi]``.
        map: the fitted :class:`~grmpiqa.metrics.MonotoneFit` (``logistic4``, or
            ``linear`` with params ``(slope, intercept)``).
        fit: what it was fitted on: ``n`` shots, ``rmse`` on them (label units), and
            ``fallback``, the reason a linear map replaced the logistic (or None).
    """

    label: LabelScale
    map: MonotoneFit
    fit: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def method(self) -> str:
        return self.map.kind

    @property
    def params(self) -> tuple[float, ...]:
        return self.map.params

    def to_mos(self, p: Any) -> np.ndarray:
        """Map scores ``p`` in (0, 1) to the label scale (float64 array, same shape)."""
        return np.clip(self.map(np.asarray(p, dtype=np.float64)), self.label.lo, self.label.hi)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCALE_FORMAT,
            **self.label.to_dict(),
            "map": self.map.to_dict(),
            "fit": dict(self.fit),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreScale:
        try:
            return cls(
                label=LabelScale.from_dict(d),
                map=MonotoneFit.from_dict(d["map"]),
                fit=dict(d.get("fit") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise GrmpiqaError(f"score scale record is malformed ({err})") from None

    def describe(self) -> str:
        return f"{self.label.describe()} ({self.method} map fitted on {self.fit.get('n')} shots)"


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
) -> ScoreScale:
    """Fit the monotone map ``p -> MOS`` on the shots' predictions and raw MOS.

    :func:`grmpiqa.metrics.fit_monotone`: the 4-parameter logistic of the evaluation
    protocol, or the least-squares line when that fit fails or is a step. A map that runs
    against the scale's direction (or no map at all: constant predictions, fewer than 3
    shots) is replaced by the range map ``p = 0 -> worst end, p = 1 -> best end``, which
    assumes nothing about the shots.
    """
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(mos, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predictions but {t.size} MOS values")
    ok = np.isfinite(p) & np.isfinite(t)
    p, t = p[ok], t[ok]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = fit_monotone(p, t, "4") if p.size >= 3 else None
    reason = None if fitted is None else fitted.note
    if fitted is not None:
        ends = fitted(np.array([0.0, 1.0]))
        sign = 1.0 if label.higher_is_better else -1.0
        if sign * (ends[1] - ends[0]) > 0:
            s = ScoreScale(label, fitted)
            return ScoreScale(label, fitted, _fit_record(s, p, t, reason))
        reason = f"the fitted {fitted.kind} map runs against the scale's direction"
    else:
        reason = "no map can be fitted (fewer than 3 shots or constant values)"
    width = label.hi - label.lo
    line = (width, label.lo) if label.higher_is_better else (-width, label.hi)
    s = ScoreScale(label, MonotoneFit("linear", line, f"{reason}; range map"))
    return ScoreScale(label, s.map, _fit_record(s, p, t, s.map.note))


def _fit_record(
    s: ScoreScale, p: np.ndarray, t: np.ndarray, fallback: str | None
) -> dict[str, Any]:
    rmse = float(np.sqrt(np.mean((s.to_mos(p) - t) ** 2))) if p.size else math.nan
    return {"n": int(p.size), "rmse": rmse if math.isfinite(rmse) else None, "fallback": fallback}


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


def require_score_scale(model: QualityModel, source: str | None = None) -> ScoreScale:
    """The model's recorded scale, or a clear error saying why MOS is not available."""
    s = getattr(model, "score_scale", None)
    if s is None:
        what = source or "this model"
        raise GrmpiqaError(
            f"{what}: no MOS scale recorded (only checkpoints written by `grmpiqa finetune` "
            "carry one); score with the default scale (p in (0, 1)) or fine-tune first"
        )
    return s  # type: ignore[no-any-return]


def apply_scale(model: QualityModel, scores: torch.Tensor, scale: str) -> torch.Tensor:
    """``scores`` (p) in the units ``scale`` names: unchanged for ``"prob"``, MOS for
    ``"mos"``; the same dtype either way."""
    import torch

    if check_scale(scale) == "prob":
        return scores
    s = require_score_scale(model)
    return torch.from_numpy(s.to_mos(scores.detach().cpu().numpy())).to(scores.dtype)
