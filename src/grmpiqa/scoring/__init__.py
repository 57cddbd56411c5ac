"""Scoring images at any scale (see docs/scoring-at-scale.md).

* :mod:`~grmpiqa.scoring.engine` - :class:`BatchScorer`, the one inference loop, shared
  by the API, ``grmpiqa score`` (local and Ray engines), :class:`grmpiqa.ray.Scorer`,
  the service and evaluation;
* :mod:`~grmpiqa.scoring.api` - ``score(model, images)`` and ``quality_map(model, image)``
  (``model.score``/``model.quality_map`` on the models ``create_model`` returns);
* :mod:`~grmpiqa.scoring.inputs` - folders, globs, lists, tables, tar shards -> parts;
* :mod:`~grmpiqa.scoring.outputs` - CSV/JSON/Parquet files and parts, manifest, resume;
* :mod:`~grmpiqa.scoring.ray` - the Ray Data engine and ``Scorer`` (imported on demand).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grmpiqa.scoring.engine import (
        BatchScorer,
        ScoredBatch,
        iter_scores,
        score_inputs,
        shared_prefix_blocks,
        text_features,
    )

__all__ = [
    "BatchScorer",
    "ScoredBatch",
    "iter_scores",
    "score_inputs",
    "shared_prefix_blocks",
    "text_features",
]


def __getattr__(name: str) -> Any:
    """The engine's names, imported on first use (it needs torch; inputs and outputs,
    which the command line's parser reads, do not)."""
    if name in __all__:
        from grmpiqa.scoring import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'grmpiqa.scoring' has no attribute {name!r}")
