"""Dataset adapters against fixture trees in the official layouts, plus the real CLIVE subset."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from data_layouts import _img, make_agiqa, make_clive, make_kadid, make_koniq, make_tid

from grmpiqa.data import KINDS, Dataset, load_dataset, parse_spec
from grmpiqa.errors import DatasetError, GrmpiqaError, ImageError


def _shared_data() -> Path:
    env = os.environ.get("GRMPIQA_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


CLIVE_REAL = _shared_data() / "clive-dev" / "ChallengeDB_release"


# --- adapters ----------------------------------------------------------------------------------


def test_clive_drops_practice_images(tmp_path: Path) -> None:
    ds = load_dataset(f"clive:{make_clive(tmp_path / 'ChallengeDB_release')}")
    assert isinstance(ds, Dataset) and ds.kind == "clive"
    assert len(ds) == 3
    assert ds.names == ["100.bmp", "101.JPG", "102.bmp"]
    np.testing.assert_allclose(ds.mos, [10.0, 55.5, 90.0])
    np.testing.assert_allclose(ds.labels, [0.1, 0.555, 0.9])
    assert [it.std for it in ds] == [17.0, 18.0, 19.0]
    assert ds[0].ref is None and ds[0].dist_type is None
    assert ds[1].load().size == (12, 10)
    assert [it.name for it in ds] == ds.names  # iterable


def test_koniq(tmp_path: Path) -> None:
    ds = load_dataset(f"koniq:{make_koniq(tmp_path / 'koniq')}")
    assert len(ds) == 3
    np.testing.assert_allclose(ds.labels, [(1.5 - 1) / 4, (3.25 - 1) / 4, (4.9 - 1) / 4])
    assert ds[1].std == 0.6 and ds[1].path.parent.name == "1024x768"
    with pytest.raises(DatasetError, match="512x384"):
        load_dataset(f"koniq:{tmp_path / 'koniq'}", resolution="512x384")


def test_kadid(tmp_path: Path) -> None:
    ds = load_dataset(f"kadid:{make_kadid(tmp_path / 'kadid10k')}")
    assert len(ds) == 12
    it = ds[0]
    assert (it.name, it.ref, it.dist_type, it.dist_level) == ("I01_01_01.png", "01", "01", 1)
    assert it.std == pytest.approx(0.5)
    assert it.label == pytest.approx((it.mos - 1) / 4)
    assert set(ds.groups()) == {"01", "05"} and len(ds.groups()["05"]) == 6
    assert ds.has_refs and sorted(ds.refs()) == ["01", "02", "03"]


def test_tid2013_case_insensitive_names(tmp_path: Path) -> None:
    ds = load_dataset(f"tid2013:{make_tid(tmp_path / 'tid2013')}")
    assert len(ds) == 3
    assert ds[2].path.name == "I02_07_5.BMP"
    assert (ds[2].ref, ds[2].dist_type, ds[2].dist_level) == ("02", "07", 5)
    np.testing.assert_allclose(ds.labels, np.array([5.51429, 4.1, 0.5]) / 9)


def test_spaq_xlsx(tmp_path: Path) -> None:
    openpyxl = pytest.importorskip("openpyxl")
    root = tmp_path / "SPAQ"
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Image name", "MOS", "Brightness", "Colorfulness"])
    for i, m in enumerate((20.0, 61.5, 88.0)):
        _img(root / "TestImage" / f"{i + 1:05d}.jpg", seed=i)
        ws.append([f"{i + 1:05d}.jpg", m, 50, 50])
    (root / "Annotations").mkdir(parents=True)
    wb.save(root / "Annotations" / "MOS and Image attribute scores.xlsx")
    ds = load_dataset(f"spaq:{root}")
    np.testing.assert_allclose(ds.labels, [0.2, 0.615, 0.88])
    ws.append(["00001.jpg", 30.0, 1, 1])
    wb.save(root / "Annotations" / "MOS and Image attribute scores.xlsx")
    with pytest.raises(DatasetError, match=r"row 5: duplicate image name '00001.jpg'"):
        load_dataset(f"spaq:{root}")


@pytest.mark.parametrize("in_images", [True, False])
def test_agiqa3k(tmp_path: Path, in_images: bool) -> None:
    ds = load_dataset(f"agiqa3k:{make_agiqa(tmp_path / 'AGIQA-3K', in_images)}")
    np.testing.assert_allclose(ds.labels, [0.1, 0.5, 0.95])
    assert ds[0].std == 0.7


def test_pyiqa_with_split_columns(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    lines = ["img_name,mos,std,split,official_split"]
    for i in range(6):
        _img(root / f"x{i}.png", seed=i)
        lines.append(f"x{i}.png,{1 + i},0.5,{'train' if i < 4 else 'test'},{'val' if i else ''}")
    meta = tmp_path / "meta_info_Mine.csv"
    meta.write_text("\n".join(lines) + "\n")
    ds = load_dataset(f"pyiqa:{meta}::{root}")
    assert len(ds) == 6 and ds.image_root == root
    np.testing.assert_allclose(ds.labels, np.arange(6) / 5)
    assert ds.split_columns == ["split", "official_split"]
    assert ds[0].splits == {"split": "train", "official_split": ""}
    test = load_dataset(f"pyiqa:{meta}::{root}?split=test&split_column=split")
    assert test.names == ["x4.png", "x5.png"]
    assert ds.where_split("train", "split").names == [f"x{i}.png" for i in range(4)]
    with pytest.raises(DatasetError, match="2 split columns"):
        load_dataset(f"pyiqa:{meta}::{root}?split=test")
    with pytest.raises(DatasetError, match="image root"):
        load_dataset(f"pyiqa:{meta}::{tmp_path / 'nope'}")


def test_csv_range_and_direction_same_in_spec_and_kwargs(tmp_path: Path) -> None:
    lines = ["path,mos,std,split"]
    for i, m in enumerate((10, 40, 70)):
        _img(tmp_path / "sub" / f"{i}.png", seed=i)
        lines.append(f"sub/{i}.png,{m},1.0,{'test' if i == 2 else 'train'}")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    ds = load_dataset(f"csv:{csv}")
    np.testing.assert_allclose(ds.labels, [0.0, 0.5, 1.0])  # data min/max by default
    a = load_dataset(f"csv:{csv}?mos_range=0,100&higher_is_better=0")
    b = load_dataset(f"csv:{csv}", mos_range=(0, 100), higher_is_better=False)
    np.testing.assert_allclose(a.labels, [0.9, 0.6, 0.3])
    np.testing.assert_allclose(a.labels, b.labels)
    np.testing.assert_allclose(a.mos, [10, 40, 70])
    assert a[0].path == tmp_path / "sub" / "0.png"
    assert load_dataset(f"csv:{csv}?split=test").names == ["sub/2.png"]
    with pytest.raises(DatasetError, match="outside the scale 0..50"):
        load_dataset(f"csv:{csv}?mos_range=0,50")


def test_folder(tmp_path: Path) -> None:
    _img(tmp_path / "b.png")
    _img(tmp_path / "a" / "c.jpg")
    (tmp_path / "notes.txt").write_text("x")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.names == ["a/c.jpg", "b.png"]
    assert not ds.has_labels and math.isnan(ds[0].label)
    assert load_dataset(f"folder:{tmp_path}?recursive=0").names == ["b.png"]


def test_subset_and_slicing(tmp_path: Path) -> None:
    ds = load_dataset(f"kadid:{make_kadid(tmp_path / 'k')}")
    sub = ds.subset([3, 1])
    assert sub.names == [ds[3].name, ds[1].name] and sub.spec == ds.spec
    assert ds[2:4].names == ds.names[2:4]
    with pytest.raises(IndexError):
        ds.subset([99])


# --- bad input -------------------------------------------------------------------------------


def test_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown kind 'live'"):
        load_dataset(f"live:{tmp_path}")
    with pytest.raises(DatasetError, match="expected KIND:PATH"):
        load_dataset(str(tmp_path.name))
    with pytest.raises(DatasetError, match="unknown option bogus"):
        load_dataset(f"folder:{tmp_path}?bogus=1")
    with pytest.raises(DatasetError, match="mos_range"):
        load_dataset(f"csv:{tmp_path}/x.csv?mos_range=5")
    assert parse_spec("pyiqa:/a/m.csv::/imgs?split=test") == (
        "pyiqa",
        "/a/m.csv",
        "/imgs",
        {"split": "test"},
    )
    assert parse_spec("csv:C:/data/what?.csv") == ("csv", "C:/data/what?.csv", None, {})
    assert set(KINDS) >= {"clive", "koniq", "kadid", "tid2013", "spaq", "agiqa3k", "pyiqa"}
    assert issubclass(DatasetError, GrmpiqaError)


def test_missing_label_file_and_column(tmp_path: Path) -> None:
    root = make_kadid(tmp_path / "k")
    os.rename(root / "dmos.csv", root / "other.csv")
    with pytest.raises(DatasetError, match=r"dmos\.csv: label file not found"):
        load_dataset(f"kadid:{root}")
    (root / "dmos.csv").write_text("dist_img,ref_img,score\nI01_01_01.png,I01.png,3\n")
    with pytest.raises(DatasetError, match=r"dmos\.csv: missing column 'dmos'"):
        load_dataset(f"kadid:{root}")
    clive = make_clive(tmp_path / "c")
    (clive / "Data" / "AllMOS_release.mat").unlink()
    with pytest.raises(DatasetError, match=r"AllMOS_release\.mat: label file not found"):
        load_dataset(f"clive:{clive}")


@pytest.mark.parametrize(
    ("value", "reason"),
    [("nan", "not a finite number"), ("inf", "not a finite number"), ("good", "not a number")],
)
def test_bad_mos_names_file_and_row(tmp_path: Path, value: str, reason: str) -> None:
    root = make_koniq(tmp_path / "koniq")
    f = root / "koniq10k_scores_and_distributions.csv"
    lines = f.read_text().splitlines()
    lines[2] = lines[2].replace(",3.25,", f",{value},")
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as err:
        load_dataset(f"koniq:{root}")
    msg = str(err.value)
    assert msg.startswith(f"{f}, row 3: MOS")
    assert reason in msg and "\n" not in msg


def test_nan_in_mat(tmp_path: Path) -> None:
    root = make_clive(tmp_path / "c", mos=[50.0] * 7 + [10.0, float("nan"), 90.0])
    with pytest.raises(DatasetError, match=r"AllMOS_release\.mat, row 9: MOS .* not a finite"):
        load_dataset(f"clive:{root}")


def test_duplicate_and_missing_images(tmp_path: Path) -> None:
    root = make_kadid(tmp_path / "k")
    f = root / "dmos.csv"
    lines = f.read_text().splitlines()
    f.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(DatasetError, match=r"row 14: duplicate image name 'I01_01_01.png'"):
        load_dataset(f"kadid:{root}")
    f.write_text("\n".join(lines) + "\n")
    (root / "images" / "I02_05_02.png").unlink()
    with pytest.raises(DatasetError, match=r"dmos\.csv, row 9: image 'I02_05_02.png' not found"):
        load_dataset(f"kadid:{root}")


def test_empty_dataset(tmp_path: Path) -> None:
    root = tmp_path / "k"
    (root / "images").mkdir(parents=True)
    (root / "dmos.csv").write_text("dist_img,ref_img,dmos,var\n")
    with pytest.raises(DatasetError, match="empty dataset"):
        load_dataset(f"kadid:{root}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        load_dataset(f"folder:{tmp_path / 'empty'}")


def test_unreadable_image_fails_when_loaded(tmp_path: Path) -> None:
    root = make_kadid(tmp_path / "k")
    bad = root / "images" / "I01_05_02.png"
    bad.write_bytes(b"this is not a png")
    ds = load_dataset(f"kadid:{root}")  # lazy: labels and existence only
    i = ds.names.index("I01_05_02.png")
    with pytest.raises(ImageError, match=str(bad)):
        ds.load(i)


def test_out_of_scale_mos(tmp_path: Path) -> None:
    root = make_tid(tmp_path / "t")
    f = root / "mos_with_names.txt"
    f.write_text(f.read_text().replace("4.1 ", "12 "))
    with pytest.raises(DatasetError, match=r"row 2: MOS 12 outside the scale 0..9"):
        load_dataset(f"tid2013:{root}")
    assert load_dataset(f"tid2013:{root}?mos_range=0,12")[1].label == 1.0


def test_groups_needs_distortion_types(tmp_path: Path) -> None:
    ds = load_dataset(f"clive:{make_clive(tmp_path / 'c')}")
    with pytest.raises(DatasetError, match="no distortion type"):
        ds.groups()


# --- the real CLIVE subset -------------------------------------------------------------------


@pytest.mark.skipif(not CLIVE_REAL.is_dir(), reason="../shared/data/clive-dev absent")
def test_real_clive_subset() -> None:
    ds = load_dataset(f"clive:{CLIVE_REAL}")
    assert len(ds) == 400
    names = scipy.io.loadmat(CLIVE_REAL / "Data" / "AllImages_release.mat")["AllImages_release"]
    mos = scipy.io.loadmat(CLIVE_REAL / "Data" / "AllMOS_release.mat")["AllMOS_release"].ravel()
    assert len(names) == 407  # 7 practice images first, then the 400 rated ones
    np.testing.assert_array_equal(ds.mos, mos[7:])
    np.testing.assert_allclose(ds.labels, mos[7:] / 100)
    assert not any(n.startswith("t") for n in ds.names)
    assert all(0 <= x <= 1 for x in ds.labels) and len(set(ds.names)) == 400
    assert ds[0].load().mode == "RGB"


# --- the kind registry and the MOS scale (issue 9.6, issue 13) -------------------------------


def test_kind_registry_records() -> None:
    from grmpiqa.data import get_kind, list_kinds

    kinds = {k.name: k for k in list_kinds()}
    assert tuple(kinds) == KINDS
    documented = {
        "clive": (0.0, 100.0),
        "koniq": (1.0, 5.0),
        "kadid": (1.0, 5.0),
        "tid2013": (0.0, 9.0),
        "spaq": (0.0, 100.0),
        "agiqa3k": (0.0, 5.0),
        "pyiqa": None,
        "csv": None,
    }
    for name, rng in documented.items():
        k = kinds[name]
        assert k.mos_range == rng and k.higher_is_better is True and k.labelled, name
        assert {"mos_range", "higher_is_better"} <= set(k.options)
        record = k.as_dict()
        assert record["name"] == name and "adapter" not in record and record["paths"]
    assert not kinds["folder"].labelled and kinds["folder"].options == ("recursive",)
    assert kinds["csv"].scale is None and kinds["clive"].scale is not None
    assert (
        "absolute_paths" in kinds["csv"].options and "absolute_paths" not in kinds["pyiqa"].options
    )
    assert get_kind("KADID").mos_name == "dmos"
    with pytest.raises(DatasetError, match="unknown dataset kind 'live'"):
        get_kind("live")


def test_docs_list_every_kind_with_its_registered_scale() -> None:
    from grmpiqa.data import list_kinds

    docs = (Path(__file__).resolve().parents[1] / "docs" / "datasets.md").read_text()
    for k in list_kinds():
        row = next((ln for ln in docs.splitlines() if ln.startswith(f"| `{k.name}` |")), None)
        assert row is not None, k.name
        if k.mos_range is not None:
            lo, hi = k.mos_range
            assert f"{lo:g}..{hi:g}" in row, (k.name, row)


def test_every_labelled_dataset_has_a_scale(tmp_path: Path) -> None:
    from grmpiqa.data import Scale

    specs = {
        "clive": f"clive:{make_clive(tmp_path / 'c')}",
        "koniq": f"koniq:{make_koniq(tmp_path / 'q')}",
        "kadid": f"kadid:{make_kadid(tmp_path / 'k')}",
        "tid2013": f"tid2013:{make_tid(tmp_path / 't')}",
        "agiqa3k": f"agiqa3k:{make_agiqa(tmp_path / 'a')}",
    }
    expected = {
        "clive": Scale(0, 100, True, "MOS", "documented"),
        "koniq": Scale(1, 5, True, "MOS", "documented"),
        "kadid": Scale(1, 5, True, "dmos", "documented"),
        "tid2013": Scale(0, 9, True, "MOS", "documented"),
        "agiqa3k": Scale(0, 5, True, "mos_quality", "documented"),
    }
    for kind, spec in specs.items():
        ds = load_dataset(spec)
        assert ds.scale == expected[kind], kind
        np.testing.assert_allclose(ds.scale.to_mos(ds.labels), ds.mos, rtol=1e-12)
        assert ds.subset([0]).scale == ds.scale and ds[1:].scale == ds.scale
    over = load_dataset(specs["tid2013"] + "?mos_range=0,10&higher_is_better=0")
    assert over.scale == Scale(0, 10, False, "MOS", "option")
    np.testing.assert_allclose(over.labels, 1 - over.mos / 10)
    assert not load_dataset(f"folder:{tmp_path / 'k' / 'images'}").scale


def test_csv_scale_inferred_from_the_data_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from grmpiqa.data import Scale

    # the CLI handler (installed by other tests) stops propagation: listen on the logger
    log = logging.getLogger("grmpiqa.data")
    monkeypatch.setattr(log, "propagate", False)
    monkeypatch.setattr(log, "handlers", [caplog.handler])

    lines = ["path,mos"]
    for i, m in enumerate((12, 40, 70)):
        _img(tmp_path / f"{i}.png", seed=i)
        lines.append(f"{i}.png,{m}")
    f = tmp_path / "labels.csv"
    f.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="grmpiqa.data"):
        ds = load_dataset(f"csv:{f}")
    assert ds.scale == Scale(12, 70, True, "mos", "data")
    assert "inferred from the data" in ds.scale.describe()
    assert any("no documented MOS scale" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="grmpiqa.data"):
        fixed = load_dataset(f"csv:{f}?mos_range=0,100&higher_is_better=0")
    assert not caplog.records
    assert fixed.scale == Scale(0, 100, False, "mos", "option")
    assert fixed.scale.to_mos(0.88) == pytest.approx(12.0)


def test_scale_record_roundtrip_and_validation() -> None:
    from grmpiqa.data import Scale

    s = Scale(1, 5, False, "DMOS", "option")
    assert Scale.from_dict(s.as_dict()) == s
    assert s.to_label(1.0) == 1.0 and s.to_label(5.0) == 0.0 and s.to_mos(0.25) == 4.0
    np.testing.assert_allclose(s.to_label(np.array([0.0, 3.0, 9.0])), [1.0, 0.5, 0.0])
    for bad in ({"lo": 1, "hi": 1}, {"lo": "x", "hi": 2}, {"hi": 2}, {"lo": 0, "hi": float("nan")}):
        with pytest.raises(DatasetError):
            Scale.from_dict(bad)
    with pytest.raises(DatasetError):
        Scale.from_dict({"lo": 0, "hi": 1, "higher_is_better": "no"})
    hand = Dataset([], "csv", "/x")
    assert hand.scale is None
