"""Label files are untrusted text (issue 10, items 3, 7, 8, 9; docs/datasets.md "Guarantees").

Paths stay inside their root, one file is one item whatever its spelling, and malformed
CSV / MATLAB files give one-line errors naming the file and row.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from data_layouts import _img, make_agiqa, make_clive, make_kadid, make_koniq, make_tid

from grmpiqa.data import load_dataset, make_splits
from grmpiqa.errors import DatasetError


def _one_line_error(spec: str, *fragments: str) -> str:
    with pytest.raises(DatasetError) as err:
        load_dataset(spec)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def _rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text)
    path.write_text(text.replace(old, new, 1))


# --- 3: paths in label files stay inside their root --------------------------------------------


def _clive_names(root: Path, names: list[str]) -> None:
    cells = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        cells[i, 0] = np.array([n])
    scipy.io.savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cells})


def _escape_clive(tmp: Path, bad: str) -> tuple[str, str]:
    root = make_clive(tmp / "clive")
    names = [f"t{i}.bmp" for i in range(1, 8)] + ["100.bmp", bad, "102.bmp"]
    _clive_names(root, names)
    return f"clive:{root}", f"{root / 'Data' / 'AllImages_release.mat'}, row 9"


def _escape_koniq(tmp: Path, bad: str) -> tuple[str, str]:
    root = make_koniq(tmp / "koniq")
    f = root / "koniq10k_scores_and_distributions.csv"
    _rewrite(f, '"b.jpg"', f'"{bad}"')
    return f"koniq:{root}", f"{f}, row 3"


def _escape_kadid(tmp: Path, bad: str) -> tuple[str, str]:
    root = make_kadid(tmp / "kadid")
    f = root / "dmos.csv"
    _rewrite(f, "I01_05_01.png,", f"{bad},")
    return f"kadid:{root}", f"{f}, row 4"


def _escape_tid(tmp: Path, bad: str) -> tuple[str, str]:
    root = make_tid(tmp / "tid")
    f = root / "mos_with_names.txt"
    _rewrite(f, "i01_01_2.bmp", bad)
    return f"tid2013:{root}", f"{f}, row 2"


def _escape_spaq(tmp: Path, bad: str) -> tuple[str, str]:
    openpyxl = pytest.importorskip("openpyxl")
    root = tmp / "SPAQ"
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Image name", "MOS"])
    for i, m in enumerate((20.0, 61.5, 88.0)):
        _img(root / "TestImage" / f"{i + 1:05d}.jpg", seed=i)
        ws.append([bad if i == 1 else f"{i + 1:05d}.jpg", m])
    (root / "Annotations").mkdir(parents=True)
    f = root / "Annotations" / "MOS and Image attribute scores.xlsx"
    wb.save(f)
    return f"spaq:{root}", f"{f}, row 3"


def _escape_agiqa(tmp: Path, bad: str) -> tuple[str, str]:
    root = make_agiqa(tmp / "agiqa")
    f = root / "data.csv"
    _rewrite(f, "AttnGAN_normal_001.jpg", bad)
    return f"agiqa3k:{root}", f"{f}, row 3"


def _escape_pyiqa(tmp: Path, bad: str) -> tuple[str, str]:
    root = tmp / "pyiqa" / "imgs"
    lines = ["img_name,mos"]
    for i in range(3):
        _img(root / f"x{i}.png", seed=i)
        lines.append(f"{bad if i == 1 else f'x{i}.png'},{i + 1}")
    meta = tmp / "pyiqa" / "meta.csv"
    meta.write_text("\n".join(lines) + "\n")
    return f"pyiqa:{meta}::{root}", f"{meta}, row 3"


def _escape_csv(tmp: Path, bad: str) -> tuple[str, str]:
    d = tmp / "mine"
    lines = ["path,mos"]
    for i in range(3):
        _img(d / f"{i}.png", seed=i)
        lines.append(f"{bad if i == 1 else f'{i}.png'},{i + 1}")
    f = d / "labels.csv"
    f.write_text("\n".join(lines) + "\n")
    return f"csv:{f}", f"{f}, row 3"


LAYOUTS: dict[str, Callable[[Path, str], tuple[str, str]]] = {
    "clive": _escape_clive,
    "koniq": _escape_koniq,
    "kadid": _escape_kadid,
    "tid2013": _escape_tid,
    "spaq": _escape_spaq,
    "agiqa3k": _escape_agiqa,
    "pyiqa": _escape_pyiqa,
    "csv": _escape_csv,
}


@pytest.mark.parametrize("kind", list(LAYOUTS))
@pytest.mark.parametrize("how", ["dotdot", "deep", "absolute"])
def test_every_layout_refuses_paths_that_leave_its_root(
    tmp_path: Path, kind: str, how: str
) -> None:
    # a real image outside every image folder: what an attacker would like to read
    secret = _img(tmp_path / "I09_01_01.png", seed=99)
    depth = 5
    bad = {
        "dotdot": "../" * depth + "I09_01_01.png",
        "deep": "sub/../../" + "../" * depth + "I09_01_01.png",
        "absolute": str(secret),
    }[how]
    spec, at = LAYOUTS[kind](tmp_path, bad)
    msg = _one_line_error(spec, at)
    if kind == "tid2013":  # names are bare i<ref>_<type>_<level> file names
        assert "is not named" in msg
    elif how == "absolute":
        assert "absolute image path" in msg and "refused" in msg
    else:
        assert "leaves the image folder" in msg


def test_csv_absolute_paths_only_with_the_option(tmp_path: Path) -> None:
    outside = _img(tmp_path / "elsewhere" / "far.png", seed=5)
    spec, at = _escape_csv(tmp_path, str(outside))
    msg = _one_line_error(spec, at, "absolute_paths=1")
    assert "absolute image path" in msg
    ds = load_dataset(spec + "?absolute_paths=1")
    assert ds[1].path == outside and ds[1].name == str(outside)
    assert load_dataset(spec, absolute_paths=True).names == ds.names
    # the option never allows '..' escapes
    spec2, at2 = _escape_csv(tmp_path / "two", "../elsewhere/far.png")
    _one_line_error(spec2 + "?absolute_paths=1", at2, "leaves the image folder")
    # a path that goes down and back up but stays inside is fine (and normalised)
    spec3, _ = _escape_csv(tmp_path / "three", "sub/../1.png")
    assert load_dataset(spec3).names == ["0.png", "1.png", "2.png"]


def test_image_dir_option_may_point_anywhere(tmp_path: Path) -> None:
    """The option comes from the user, not from the label file: it is not confined."""
    for i in range(3):
        _img(tmp_path / "images" / f"{i}.png", seed=i)
    labels = tmp_path / "labels" / "l.csv"
    labels.parent.mkdir()
    labels.write_text("path,mos\n0.png,1\n1.png,2\n2.png,3\n")
    ds = load_dataset(f"csv:{labels}?image_dir=../images")
    assert [p.name for p in ds.paths] == ["0.png", "1.png", "2.png"]


def test_symlinks_inside_the_root_are_followed(tmp_path: Path) -> None:
    """Documented choice: the folder's owner placed the link; only label-file text is
    confined."""
    outside = _img(tmp_path / "store" / "blob.png", seed=3)
    spec, _ = _escape_csv(tmp_path, "linked.png")
    (tmp_path / "mine" / "linked.png").symlink_to(outside)
    ds = load_dataset(spec)
    assert ds[1].name == "linked.png" and ds[1].load().size == (12, 10)


def test_control_characters_and_long_names(tmp_path: Path) -> None:
    spec, at = _escape_csv(tmp_path, "a\tb.png")
    _one_line_error(spec, at, "control characters")
    spec, at = _escape_csv(tmp_path / "long", "x" * 5000 + ".png")
    _one_line_error(spec, at, "cannot access image")


# --- 7: one file, one item ------------------------------------------------------------------------


def _csv_rows(tmp: Path, names: list[str], image: str = "imgs/106.bmp") -> tuple[str, Path]:
    _img(tmp / image, seed=1)
    _img(tmp / "imgs" / "107.bmp", seed=2)
    _img(tmp / "imgs" / "108.bmp", seed=3)
    f = tmp / "labels.csv"
    f.write_text("path,mos\n" + "".join(f"{n},{10 + i}\n" for i, n in enumerate(names)))
    return f"csv:{f}", f


@pytest.mark.parametrize(
    "alias",
    ["./imgs/106.bmp", "imgs//106.bmp", "imgs/./106.bmp", "x/../imgs/106.bmp", "imgs\\106.bmp"],
)
def test_two_spellings_of_one_name_are_a_duplicate(tmp_path: Path, alias: str) -> None:
    spec, f = _csv_rows(tmp_path, ["imgs/106.bmp", "imgs/107.bmp", alias])
    _one_line_error(spec, f"{f}, row 4", "duplicate image name", "first at row 2")


def test_case_alias_hard_link_and_symlink_are_the_same_file(tmp_path: Path) -> None:
    spec, f = _csv_rows(tmp_path, ["imgs/106.bmp", "imgs/107.bmp", "IMGS/106.BMP"])
    # case-sensitive file systems resolve the alias by the case-insensitive fallback;
    # case-insensitive ones open the same file directly: same inode either way
    _one_line_error(spec, f"{f}, row 4", "is the same file as 'imgs/106.bmp', row 2")
    os.link(tmp_path / "imgs" / "106.bmp", tmp_path / "imgs" / "hard.bmp")
    spec, f = _csv_rows(tmp_path, ["imgs/106.bmp", "imgs/107.bmp", "imgs/hard.bmp"])
    _one_line_error(spec, f"{f}, row 4", "same file as 'imgs/106.bmp'")
    (tmp_path / "imgs" / "soft.bmp").symlink_to("106.bmp")
    spec, f = _csv_rows(tmp_path, ["imgs/soft.bmp", "imgs/107.bmp", "imgs/106.bmp"])
    _one_line_error(spec, f"{f}, row 4", "same file as 'imgs/soft.bmp'")


def test_normalised_names_and_no_file_in_pool_and_test(tmp_path: Path) -> None:
    names = ["./imgs/106.bmp", "imgs//107.bmp", "imgs/108.bmp"]
    spec, _ = _csv_rows(tmp_path, names)
    ds = load_dataset(spec)
    assert ds.names == ["imgs/106.bmp", "imgs/107.bmp", "imgs/108.bmp"]
    for s in make_splits(ds, seed=0, count=10, shots=1):
        pool = {ds[i].path.resolve() for i in s.pool}
        test = {ds[i].path.resolve() for i in s.test}
        assert not pool & test


def test_kadid_and_pyiqa_refuse_aliases_too(tmp_path: Path) -> None:
    root = make_kadid(tmp_path / "k")
    f = root / "dmos.csv"
    lines = f.read_text().splitlines()
    f.write_text("\n".join([*lines, "./" + lines[1]]) + "\n")
    _one_line_error(f"kadid:{root}", f"{f}, row 14", "duplicate image name")
    spec, at = _escape_pyiqa(tmp_path, "./x0.png")
    _one_line_error(spec, at, "duplicate image name './x0.png' (first at row 2)")


# --- 8: malformed CSV rows --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv", "pyiqa"])
def test_row_without_its_mos_field(tmp_path: Path, kind: str) -> None:
    spec, at = (_escape_csv if kind == "csv" else _escape_pyiqa)(tmp_path, "1.png")
    f = Path(at.split(", row")[0])
    _rewrite(f, "1.png,2", "1.png")
    _one_line_error(spec, f"{f}, row 3", "no value for 'mos'")


@pytest.mark.parametrize("kind", ["csv", "pyiqa"])
def test_unterminated_quote(tmp_path: Path, kind: str) -> None:
    spec, at = (_escape_csv if kind == "csv" else _escape_pyiqa)(tmp_path, "1.png")
    f = Path(at.split(", row")[0])
    _rewrite(f, "1.png,2", '"1.png,2')
    _one_line_error(spec, f"{f}, row 3", "unterminated quote")


def test_quoted_fields_and_crlf_still_read(tmp_path: Path) -> None:
    spec, at = _escape_csv(tmp_path, "1.png")
    f = Path(at.split(", row")[0])
    f.write_bytes(
        b'\xef\xbb\xbfpath,mos,note\r\n0.png,1,"a, b"\r\n"1.png",2,"two\r\nlines"\r\n2.png,3,\r\n'
    )
    ds = load_dataset(spec)
    assert ds.names == ["0.png", "1.png", "2.png"]
    assert list(ds.mos) == [1.0, 2.0, 3.0]


# --- 9: unreadable CLIVE .mat files -------------------------------------------------------------


@pytest.mark.parametrize("which", ["AllImages_release", "AllMOS_release", "AllStdDev_release"])
@pytest.mark.parametrize("content", ["empty", "random", "text"])
def test_empty_or_garbage_mat(tmp_path: Path, which: str, content: str) -> None:
    root = make_clive(tmp_path / "c")
    f = root / "Data" / f"{which}.mat"
    data = {
        "empty": b"",
        "random": np.random.default_rng(7).bytes(4096),
        "text": b"MATLAB 5.0 MAT-file, but not really\n" * 20,
    }[content]
    f.write_bytes(data)
    _one_line_error(f"clive:{root}", str(f), "cannot read MATLAB file")


def test_mat_with_wrong_variables_or_types(tmp_path: Path) -> None:
    root = make_clive(tmp_path / "c")
    f = root / "Data" / "AllMOS_release.mat"
    scipy.io.savemat(f, {"Scores": np.ones((1, 10))})
    _one_line_error(
        f"clive:{root}", str(f), "missing variable 'AllMOS_release' (variables: Scores)"
    )
    names = root / "Data" / "AllImages_release.mat"
    scipy.io.savemat(names, {"AllImages_release": np.arange(10.0)})
    _one_line_error(f"clive:{root}", f"{names}, row 1", "is not a string")


def test_folder_kind_lists_regular_files_only(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    _img(tmp_path / "sub" / "b.png", seed=1)
    os.mkfifo(tmp_path / "pipe.jpg")  # reading it would block forever
    os.mkfifo(tmp_path / "sub" / "pipe2.png")
    (tmp_path / "dir.png").mkdir()
    assert load_dataset(f"folder:{tmp_path}").names == ["a.png", "sub/b.png"]
    assert load_dataset(f"folder:{tmp_path}?recursive=0").names == ["a.png"]
