"""The few-shot split protocol (method.md 8).

Split ``index`` of seed ``seed`` is a pure function of (dataset, seed, index): 80% of
the images form the pool and 20% the test set; the N shots are drawn from the pool.
When every item names its reference (kadid, tid2013, synthetic data) the *references*
are split 80/20, so no content is in both parts. The random generator is
``numpy.random.default_rng([seed, index])``; units (references or image names) are
sorted before they are shuffled, so the result does not depend on the order of the
label file or on any global random state.

Splits are written to, and read from, pyiqa-style split columns: one column per split,
named ``split_seed{seed}_k{index}``, with the values ``train`` (a shot), ``pool`` (in
the pool, not drawn) and ``test``. The file is a valid pyiqa meta-info CSV (``img_name,
mos[, std]``), so a run is auditable.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grmpiqa.data.datasets import Dataset
from grmpiqa.data.readers import normalize_name, read_csv
from grmpiqa.errors import DatasetError
from grmpiqa.utils import atomic_open

__all__ = [
    "Split",
    "make_split",
    "make_splits",
    "read_splits",
    "split_column_name",
    "write_splits",
]

_COLUMN_RE = re.compile(r"^split_seed(\d+)_k(\d+)$")
# Values of split columns, as written and as understood when read back.
_SHOT_VALUES = {"train", "shot", "shots"}
_POOL_VALUES = {"pool", "val", "valid", "validation"}
_TEST_VALUES = {"test"}
_NONE_VALUES = {"", "none", "-", "unused"}


@dataclass(frozen=True)
class Split:
    """One few-shot split: indices into the dataset it was made from.

    Attributes:
        pool: the 80% the shots are drawn from (sorted).
        test: the 20% held out for evaluation (sorted, disjoint from ``pool``).
        shots: the training images, a subset of ``pool`` (sorted).
        seed, index: what produced it (``None`` when read from a foreign column).
        grouped_by_ref: whether references were split rather than images.
        column: the split column name used when writing it.
    """

    pool: list[int]
    test: list[int]
    shots: list[int]
    seed: int | None = None
    index: int | None = None
    grouped_by_ref: bool = False
    column: str = field(default="split")

    def train(self, dataset: Dataset) -> Dataset:
        """The shots as a dataset."""
        return dataset.subset(self.shots)

    def test_set(self, dataset: Dataset) -> Dataset:
        """The test images as a dataset."""
        return dataset.subset(self.test)

    def values(self, n: int) -> list[str]:
        """Per-item column values (``train``/``pool``/``test``/``""``) for ``n`` items."""
        out = [""] * n
        for i in self.pool:
            out[i] = "pool"
        for i in self.shots:
            out[i] = "train"
        for i in self.test:
            out[i] = "test"
        return out


def split_column_name(seed: int, index: int) -> str:
    """The split column for split ``index`` of ``seed``: ``split_seed{seed}_k{index}``."""
    return f"split_seed{seed}_k{index}"


def make_split(
    dataset: Dataset,
    seed: int,
    index: int,
    shots: int | None = 50,
    test_fraction: float = 0.2,
    group_by_ref: bool | None = None,
) -> Split:
    """Split ``index`` of seed ``seed`` (method.md 8).

    Args:
        dataset: the target dataset.
        seed, index: non-negative integers; the split is a pure function of
            (dataset, seed, index).
        shots: number of training images drawn from the pool (``None``: the whole pool).
        test_fraction: share of the images (or references) held out, default 0.2; 0
            holds out nothing (every image in the pool; ``finetune --test-fraction 0``).
        group_by_ref: split references rather than images. Default: when every item
            names its reference.

    Raises:
        DatasetError: too few images (or references) to split, or more shots than the
            pool holds.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DatasetError(
            f"{dataset.spec}: split seed must be a non-negative integer, not {seed!r}"
        )
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
        raise DatasetError(
            f"{dataset.spec}: split index must be a non-negative integer, not {index!r}"
        )
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"{dataset.spec}: test_fraction must be in [0, 1), not {test_fraction}")
    seed, index = int(seed), int(index)
    grouped = dataset.has_refs if group_by_ref is None else bool(group_by_ref)
    if grouped and not dataset.has_refs:
        raise DatasetError(f"{dataset.spec}: group_by_ref needs every item to name its reference")
    items = dataset.items
    unit_of = [str(it.ref) for it in items] if grouped else [it.name for it in items]
    units = sorted(set(unit_of))
    what = "references" if grouped else "images"
    if len(units) < (2 if test_fraction > 0 else 1):
        raise DatasetError(f"{dataset.spec}: {len(units)} {what}; a split needs at least 2")
    rng = np.random.default_rng([seed, index])
    perm = rng.permutation(len(units))
    n_test = 0
    if test_fraction > 0:
        n_test = min(len(units) - 1, max(1, int(round(test_fraction * len(units)))))
    test_units = {units[j] for j in perm[:n_test]}
    pool = [i for i, u in enumerate(unit_of) if u not in test_units]
    test = [i for i, u in enumerate(unit_of) if u in test_units]
    if shots is None:
        chosen = list(pool)
    else:
        if isinstance(shots, bool) or int(shots) != shots or shots < 1:
            raise DatasetError(f"{dataset.spec}: shots must be a positive integer, not {shots!r}")
        shots = int(shots)
        if shots > len(pool):
            raise DatasetError(
                f"{dataset.spec}: {shots} shots requested but the pool of split {index} "
                f"(seed {seed}) holds {len(pool)} images"
            )
        by_name = sorted(pool, key=lambda i: items[i].name)
        chosen = [by_name[j] for j in rng.choice(len(by_name), size=shots, replace=False)]
    return Split(
        pool=sorted(pool),
        test=sorted(test),
        shots=sorted(chosen),
        seed=seed,
        index=index,
        grouped_by_ref=grouped,
        column=split_column_name(seed, index),
    )


def make_splits(
    dataset: Dataset,
    seed: int = 0,
    count: int = 10,
    shots: int | None = 50,
    test_fraction: float = 0.2,
    group_by_ref: bool | None = None,
) -> list[Split]:
    """Splits ``0..count-1`` of ``seed`` (the protocol uses 10)."""
    return [make_split(dataset, seed, k, shots, test_fraction, group_by_ref) for k in range(count)]


def write_splits(dataset: Dataset, splits: Sequence[Split], path: str | os.PathLike[str]) -> Path:
    """Write a pyiqa-style meta-info CSV with one split column per split (atomically).

    Columns: ``img_name`` (relative to ``dataset.image_root``), ``mos``, ``std`` and
    ``ref``/``dist_type``/``dist_level`` where known, then the split columns.
    """
    out = Path(path)
    n = len(dataset)
    columns = [s.column for s in splits]
    if len(set(columns)) != len(columns):
        raise DatasetError(f"{out}: two splits share the column name; give them distinct columns")
    for s in splits:
        for i in (*s.pool, *s.test, *s.shots):
            if not 0 <= i < n:
                raise DatasetError(f"{out}: split {s.column} has index {i} outside 0..{n - 1}")
    has_std = any(it.std is not None for it in dataset)
    extra = [
        c
        for c, attr in (("ref", "ref"), ("dist_type", "dist_type"), ("dist_level", "dist_level"))
        if any(getattr(it, attr) is not None for it in dataset)
    ]
    values = [s.values(n) for s in splits]
    header = ["img_name", "mos", *(["std"] if has_std else []), *extra, *columns]
    with atomic_open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i, it in enumerate(dataset):
            row: list[object] = [it.name, repr(float(it.mos))]
            if has_std:
                row.append("" if it.std is None else repr(float(it.std)))
            for c in extra:
                v = getattr(it, c)
                row.append("" if v is None else v)
            row.extend(v[i] for v in values)
            w.writerow(row)
    return out


def read_splits(
    dataset: Dataset,
    path: str | os.PathLike[str] | None = None,
    columns: Iterable[str] | None = None,
) -> list[Split]:
    """Read splits from pyiqa-style split columns.

    With ``path``, its ``img_name`` column is matched to the dataset's item names;
    without, the split columns the dataset's own label file carried (pyiqa/csv kinds)
    are used. Values ``train``/``shot`` mark shots (also in the pool), ``pool``/``val``
    the rest of the pool, ``test`` the test set, an empty value an unused image.
    ``columns`` defaults to every column whose name contains ``split``.
    """
    n = len(dataset)
    if path is None:
        where = dataset.spec
        available = dataset.split_columns
        table = [dict(it.splits) for it in dataset]
    else:
        file = Path(path)
        where = str(file)
        header, rows = read_csv(file, ["img_name"], what="split file")
        available = [h for h in header if "split" in h.lower()]
        index_of = {name: i for i, name in enumerate(dataset.names)}
        table_opt: list[dict[str, str] | None] = [None] * n
        for line, r in rows:
            name = normalize_name(r["img_name"])
            i = index_of.get(name)
            if i is None:
                raise DatasetError(f"{file}, row {line}: {name!r} is not an item of {dataset.spec}")
            if table_opt[i] is not None:
                raise DatasetError(f"{file}, row {line}: duplicate image name {name!r}")
            table_opt[i] = r
        missing = [dataset[i].name for i, r in enumerate(table_opt) if r is None]
        if missing:
            raise DatasetError(
                f"{file}: {len(missing)} items of {dataset.spec} not listed (first: {missing[0]!r})"
            )
        table = [r or {} for r in table_opt]
    cols = list(columns) if columns is not None else available
    if not cols:
        raise DatasetError(f"{where}: no split columns")
    out = []
    for col in cols:
        if col not in available:
            raise DatasetError(f"{where}: no split column {col!r}")
        pool, test, shots = [], [], []
        for i, r in enumerate(table):
            v = r.get(col, "").strip().lower()
            if v in _SHOT_VALUES:
                shots.append(i)
                pool.append(i)
            elif v in _POOL_VALUES:
                pool.append(i)
            elif v in _TEST_VALUES:
                test.append(i)
            elif v not in _NONE_VALUES:
                raise DatasetError(
                    f"{where}: split column {col!r} has value {v!r} for {dataset[i].name!r} "
                    "(expected train, pool, val or test)"
                )
        m = _COLUMN_RE.match(col)
        out.append(
            Split(
                pool=pool,
                test=test,
                shots=shots,
                seed=int(m.group(1)) if m else None,
                index=int(m.group(2)) if m else None,
                grouped_by_ref=bool(dataset.has_refs)
                and not {dataset[i].ref for i in pool} & {dataset[i].ref for i in test},
                column=col,
            )
        )
    return out
