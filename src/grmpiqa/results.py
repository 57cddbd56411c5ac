"""Result types of the evaluation protocol (method.md 8), apart from the report writer.

:class:`SplitResult` is one split's metrics, predictions and training history;
:class:`ProtocolResult` the whole run. :mod:`grmpiqa.evaluation` produces them and
:mod:`grmpiqa.report` writes them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from grmpiqa.data import Dataset
from grmpiqa.metrics import METRICS

__all__ = ["ComparisonResult", "ProtocolResult", "SplitResult"]


@dataclass
class SplitResult:
    """One split's outcome.

    Attributes:
        index: split number ``k``.
        metrics: :data:`grmpiqa.metrics.METRICS` on the test set.
        seconds: wall time of the split (model copy, training, prediction).
        n_train, n_test: numbers of shots and test images.
        test_indices: dataset indices of the test images, in prediction order.
        predictions: the method's score for each test image.
        history: the fine-tuning history (one dict per evaluation); empty if untrained.
        info: method details (epochs, stopped, best_epoch, ridge alpha, ...).
    """

    index: int
    metrics: dict[str, float]
    seconds: float
    n_train: int
    n_test: int
    test_indices: list[int]
    predictions: list[float]
    history: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def summary_dict(self) -> dict[str, Any]:
        """The per-split entry of report.json: metrics, seconds and scalar details."""
        d: dict[str, Any] = {"index": self.index, **self.metrics, "seconds": self.seconds}
        d["n_train"], d["n_test"] = self.n_train, self.n_test
        for k, v in self.info.items():
            if isinstance(v, str | int | float | bool) or v is None:
                d[k] = v
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitResult:
        m = {
            k: (math.nan if d["metrics"].get(k) is None else float(d["metrics"][k]))
            for k in METRICS
        }
        return cls(
            index=int(d["index"]),
            metrics=m,
            seconds=float(d["seconds"]),
            n_train=int(d["n_train"]),
            n_test=int(d["n_test"]),
            test_indices=[int(i) for i in d["test_indices"]],
            predictions=[math.nan if p is None else float(p) for p in d["predictions"]],
            history=list(d.get("history", [])),
            info=dict(d.get("info", {})),
        )


@dataclass
class ProtocolResult:
    """The outcome of :func:`run_protocol`: config record, splits, summary."""

    config: dict[str, Any]
    dataset: Dataset
    splits: list[SplitResult]
    summary: dict[str, dict[str, float | int]]
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class ComparisonResult:
    """Several methods on the same splits (``grmpiqa evaluate --method a,b,c``).

    Attributes:
        config: the shared settings (dataset, splits, seed, shots, ...) and, under
            ``methods``, each method's own record.
        dataset: the target dataset.
        methods: each method's :class:`ProtocolResult`, in the order asked for.
        reference: the method the others are compared with (``grmp`` when present).
        differences: ``differences[method][metric]``: the paired difference
            ``method - reference`` over the splits, with its bootstrap confidence interval
            (:func:`grmpiqa.metrics.paired_bootstrap`).
    """

    config: dict[str, Any]
    dataset: Dataset
    methods: dict[str, ProtocolResult]
    reference: str
    differences: dict[str, dict[str, dict[str, Any]]]
    files: dict[str, str] = field(default_factory=dict)
