"""The few-shot split protocol (method.md 8): disjoint, reproducible, shots in the pool."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest

from grmpiqa.data import (
    Dataset,
    Item,
    load_dataset,
    make_split,
    make_splits,
    read_splits,
    write_splits,
)
from grmpiqa.errors import DatasetError


def _shared_data() -> Path:
    env = os.environ.get("GRMPIQA_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


CLIVE_REAL = _shared_data() / "clive-dev" / "ChallengeDB_release"


def synthetic(n: int, refs: int | None = None, root: Path = Path("/nowhere")) -> Dataset:
    """A dataset of ``n`` items (not backed by files), optionally with ``refs`` contents."""
    items = []
    for i in range(n):
        ref = f"{i % refs:02d}" if refs else None
        items.append(
            Item(
                path=root / f"img{i:04d}.png",
                label=i / max(1, n - 1),
                mos=float(i),
                ref=ref,
                dist_type=f"{i % 5:02d}" if refs else None,
                dist_level=1 + i % 5 if refs else None,
                name=f"img{i:04d}.png",
            )
        )
    return Dataset(items, "csv" if refs is None else "kadid", root)


def test_pool_test_disjoint_and_sizes() -> None:
    ds = synthetic(400)
    s = make_split(ds, seed=0, index=3, shots=50)
    assert len(s.pool) == 320 and len(s.test) == 80 and len(s.shots) == 50
    assert not set(s.pool) & set(s.test)
    assert sorted(s.pool + s.test) == list(range(400))
    assert set(s.shots) <= set(s.pool)
    assert s.pool == sorted(s.pool) and s.shots == sorted(s.shots)
    assert (s.seed, s.index, s.column) == (0, 3, "split_seed0_k3")


def test_reproducible_and_pure() -> None:
    ds = synthetic(200)
    a = make_split(ds, 7, 2, shots=20)
    np.random.seed(123)  # global state must not matter
    _ = np.random.random(10)
    b = make_split(ds, 7, 2, shots=20)
    assert a == b
    assert make_split(ds, 7, 3, shots=20) != a
    assert make_split(ds, 8, 2, shots=20) != a


def test_independent_of_item_order() -> None:
    ds = synthetic(100)
    rev = ds.subset(range(99, -1, -1))
    a = make_split(ds, 1, 0, shots=10)
    b = make_split(rev, 1, 0, shots=10)
    assert {ds[i].name for i in a.test} == {rev[i].name for i in b.test}
    assert {ds[i].name for i in a.shots} == {rev[i].name for i in b.shots}


def test_ten_splits_differ() -> None:
    splits = make_splits(synthetic(100), seed=0, count=10, shots=10)
    assert len({tuple(s.test) for s in splits}) == 10
    assert [s.index for s in splits] == list(range(10))


def test_reference_disjoint() -> None:
    ds = synthetic(250, refs=10)  # 10 contents x 25 distorted versions
    for k in range(5):
        s = make_split(ds, 0, k, shots=30)
        assert s.grouped_by_ref
        pool_refs = {ds[i].ref for i in s.pool}
        test_refs = {ds[i].ref for i in s.test}
        assert not pool_refs & test_refs
        assert len(test_refs) == 2 and len(pool_refs) == 8
        assert set(s.shots) <= set(s.pool)
    s = make_split(ds, 0, 0, shots=None, group_by_ref=False)
    assert not s.grouped_by_ref and len(s.test) == 50 and s.shots == s.pool


def test_errors() -> None:
    ds = synthetic(20)
    with pytest.raises(DatasetError, match="50 shots requested but the pool .* holds 16"):
        make_split(ds, 0, 0, shots=50)
    with pytest.raises(DatasetError, match="at least 2"):
        make_split(synthetic(1), 0, 0, shots=1)
    with pytest.raises(DatasetError, match="seed"):
        make_split(ds, -1, 0, shots=1)
    with pytest.raises(DatasetError, match="group_by_ref"):
        make_split(ds, 0, 0, shots=1, group_by_ref=True)


def test_write_and_read_split_columns(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    lines = ["path,mos"]
    for i in range(30):
        (root / f"{i:02d}.png").write_bytes(b"")  # existence is all loading checks
        lines.append(f"imgs/{i:02d}.png,{i}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(f"csv:{tmp_path / 'labels.csv'}")
    splits = make_splits(ds, seed=2, count=3, shots=5)
    out = write_splits(ds, splits, tmp_path / "splits.csv")
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [
        "img_name",
        "mos",
        "split_seed2_k0",
        "split_seed2_k1",
        "split_seed2_k2",
    ]
    assert sum(r["split_seed2_k1"] == "train" for r in rows) == 5
    assert sum(r["split_seed2_k1"] == "test" for r in rows) == 6
    back = read_splits(ds, out)
    assert back == splits
    # the file is a pyiqa meta-info CSV: it loads as a dataset and carries its splits
    again = load_dataset(f"pyiqa:{out}::{tmp_path}")
    assert again.names == ds.names
    assert read_splits(again) == splits
    assert again.where_split("train", "split_seed2_k0").names == [
        ds[i].name for i in splits[0].shots
    ]


def test_read_splits_errors(tmp_path: Path) -> None:
    ds = synthetic(5)
    f = tmp_path / "s.csv"
    f.write_text("img_name,mos,split\n" + "".join(f"img{i:04d}.png,{i},test\n" for i in range(4)))
    with pytest.raises(DatasetError, match="1 items .* not listed"):
        read_splits(ds, f)
    f.write_text("img_name,split\nimg0000.png,test\nother.png,train\n")
    with pytest.raises(DatasetError, match=r"s\.csv, row 3: 'other.png' is not an item"):
        read_splits(ds, f)
    f.write_text("img_name,split\n" + "".join(f"img{i:04d}.png,maybe\n" for i in range(5)))
    with pytest.raises(DatasetError, match="value 'maybe'"):
        read_splits(ds, f)


@pytest.mark.skipif(not CLIVE_REAL.is_dir(), reason="../shared/data/clive-dev absent")
def test_real_clive_splits() -> None:
    ds = load_dataset(f"clive:{CLIVE_REAL}")
    splits = make_splits(ds, seed=0, count=10, shots=50)
    for s in splits:
        assert len(s.pool) == 320 and len(s.test) == 80 and len(s.shots) == 50
        assert not set(s.pool) & set(s.test) and set(s.shots) <= set(s.pool)
    assert all(math.isfinite(x) for x in ds.subset(splits[0].shots).labels)
