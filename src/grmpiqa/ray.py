"""``grmpiqa.ray.Scorer``: grmpiqa scoring inside Ray Data pipelines.

Example (needs ``pip install 'grmpiqa[ray]'``)::

    ds = ray.data.read_parquet("index.parquet")  # a "path" column
    ds = ds.map_batches(
        grmpiqa.ray.Scorer,
        fn_constructor_kwargs={"checkpoint": "ckpt.safetensors"},
        concurrency=4, num_gpus=1, batch_size=64,
    )

See :mod:`grmpiqa.scoring.ray` and docs/scoring-at-scale.md. Importing this module does
not import Ray.
"""

from grmpiqa.scoring.ray import Scorer

__all__ = ["Scorer"]
