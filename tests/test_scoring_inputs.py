"""scoring.inputs: folders, lists, tables, tar shards, brace patterns, parts."""

from __future__ import annotations

import os
import tarfile

import pytest
from conftest import make_image
from shard_utils import add_member, make_shards

from grmpiqa.errors import GrmpiqaError, ImageError
from grmpiqa.scoring import inputs
from grmpiqa.scoring.inputs import (
    ImageSource,
    InputOptions,
    collect,
    decode_source,
    expand_braces,
    list_shard,
    plan_parts,
    read_list,
    walk_images,
)


@pytest.fixture(autouse=True)
def _propagate(monkeypatch):
    """caplog listens at the root; the CLI handler (installed by other tests) stops
    propagation of the grmpiqa logger."""
    import logging

    monkeypatch.setattr(logging.getLogger("grmpiqa"), "propagate", True)


def test_brace_expansion_ranges_padding_and_lists():
    assert expand_braces("d/shard-{0000..0003}.tar") == [f"d/shard-{i:04d}.tar" for i in range(4)]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("x{a,b{1..2}}y") == ["xay", "xb1y", "xb2y"]
    assert expand_braces("plain{}.tar") == ["plain{}.tar"]  # not a pattern
    with pytest.raises(GrmpiqaError, match="more than"):
        expand_braces("{0..99999999}")


def test_fifo_in_a_folder_is_skipped_not_opened(tmp_path, caplog):
    make_image(tmp_path / "a.png")
    os.mkfifo(tmp_path / "stuck.jpg")
    assert walk_images(str(tmp_path)) == [str(tmp_path / "a.png")]
    assert "stuck.jpg: not a regular file" in caplog.text
    # given by name (or through a list) it is an error, never a blocking open()
    with pytest.raises(GrmpiqaError, match="not a regular file"):
        collect([str(tmp_path / "stuck.jpg")])
    with pytest.raises(ImageError, match="stuck.jpg: not a regular file"):
        decode_source(ImageSource(str(tmp_path / "stuck.jpg")))


def _deny(monkeypatch, bad_dir):
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(bad_dir):
            raise PermissionError(13, "Permission denied", str(bad_dir))
        return real(path)

    monkeypatch.setattr(inputs.os, "scandir", scandir)


def test_unreadable_subfolder_is_an_error_or_a_warning_with_skip_bad(tmp_path, monkeypatch, caplog):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "locked" / "b.png")
    _deny(monkeypatch, tmp_path / "locked")
    with pytest.raises(GrmpiqaError, match="locked: cannot read folder .*Permission denied"):
        collect([str(tmp_path)])
    groups = collect([str(tmp_path)], InputOptions(skip_bad=True))
    assert [s.path for s in groups[0].items] == [str(tmp_path / "a.png")]
    assert "locked: cannot read folder" in caplog.text and "skipped" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_unreadable_subfolder_for_real(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "locked" / "b.png")
    os.chmod(tmp_path / "locked", 0)
    try:
        with pytest.raises(GrmpiqaError, match="locked"):
            collect([str(tmp_path)])
    finally:
        os.chmod(tmp_path / "locked", 0o755)


def test_csv_list_without_path_column_names_the_file(tmp_path):
    lst = tmp_path / "scores.csv"
    lst.write_text("mos,std\n3.2,0.4\n")
    with pytest.raises(GrmpiqaError, match=r"scores\.csv: no path column .*--path-column"):
        read_list(lst)
    blank = tmp_path / "blank.csv"
    blank.write_text("path,mos\na.png,1\n,2\n")
    with pytest.raises(GrmpiqaError, match=r"blank\.csv row 3: no path"):
        read_list(blank)


def test_csv_and_text_lists_resolve_relative_paths_and_name_their_rows(tmp_path):
    (tmp_path / "l.txt").write_text("# comment\nimgs/a.png\n\n/abs/b.png\n")
    got = read_list(tmp_path / "l.txt")
    assert [s.path for s in got] == [str(tmp_path / "imgs/a.png"), "/abs/b.png"]
    assert got[0].origin.endswith("l.txt line 2")
    (tmp_path / "t.csv").write_text("file_id,where,mos\nx1,imgs/a.png,3\nx2,imgs/b.png,4\n")
    got = read_list(tmp_path / "t.csv", path_column="where", id_column="file_id")
    assert [(s.id, s.path) for s in got] == [
        ("x1", str(tmp_path / "imgs/a.png")),
        ("x2", str(tmp_path / "imgs/b.png")),
    ]
    with pytest.raises(GrmpiqaError, match="no column 'nope'"):
        read_list(tmp_path / "t.csv", path_column="nope")
    (tmp_path / "nohead.csv").write_text("a.png,1\nb.png,2\n")
    assert [s.path for s in read_list(tmp_path / "nohead.csv")] == [
        str(tmp_path / "a.png"),
        str(tmp_path / "b.png"),
    ]
    # a missing file is reported with the list file and row it came from
    with pytest.raises(ImageError, match=r"t\.csv row 2: .*imgs/a\.png: no such file"):
        decode_source(read_list(tmp_path / "t.csv", path_column="where")[0])


def test_parquet_table_path_and_id_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    make_image(tmp_path / "imgs" / "a.png")
    pq.write_table(
        pa.table({"uid": [7, 8], "image": ["imgs/a.png", "imgs/b.png"]}), tmp_path / "t.parquet"
    )
    got = collect([str(tmp_path / "t.parquet")], InputOptions(id_column="uid"))[0].items
    assert [(s.id, s.path) for s in got] == [
        ("7", str(tmp_path / "imgs/a.png")),
        ("8", str(tmp_path / "imgs/b.png")),
    ]
    pq.write_table(pa.table({"x": ["a"]}), tmp_path / "nopath.parquet")
    with pytest.raises(GrmpiqaError, match=r"nopath\.parquet: no path column"):
        collect([str(tmp_path / "nopath.parquet")])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(GrmpiqaError, match=r"junk\.parquet: not a readable Parquet"):
        collect([str(tmp_path / "junk.parquet")])


def test_tar_shards_are_listed_by_key_and_decoded_from_their_byte_range(tmp_path):
    shards = make_shards(tmp_path / "sh", n_shards=2, per_shard=3)
    items = list_shard(str(shards[0]))
    assert [s.key for s in items] == ["s00000", "s00001", "s00002"]
    assert [s.member for s in items] == ["s00000.jpg", "s00001.png", "s00002.jpg"]
    img = decode_source(items[1])
    assert img.mode == "RGB" and img.size == (72, 48)
    groups = collect([str(tmp_path / "sh" / "shard-{0000..0001}.tar")])
    assert [g.shard for g in groups] == [True, True]
    assert sum(len(g.items) for g in groups) == 6
    with pytest.raises(GrmpiqaError, match=r"shard-0002\.tar: no such file \(from the pattern"):
        collect([str(tmp_path / "sh" / "shard-{0000..0002}.tar")])


def test_bad_shards(tmp_path):
    (tmp_path / "gz.tar").write_bytes(b"\x1f\x8b" + b"\0" * 600)
    with pytest.raises(GrmpiqaError, match=r"gz\.tar: not an uncompressed tar shard"):
        list_shard(str(tmp_path / "gz.tar"))
    with tarfile.open(tmp_path / "noimg.tar", "w") as tf:
        add_member(tf, "a.json", b"{}")
    with pytest.raises(GrmpiqaError, match="no image members"):
        list_shard(str(tmp_path / "noimg.tar"))
    good = make_shards(tmp_path / "g", n_shards=1, per_shard=3)[0]
    data = good.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    try:  # a shard cut short: an error, or the images before the damage with skip_bad
        items = list_shard(str(cut))
    except GrmpiqaError as err:
        assert "cut.tar" in str(err)
        items = list_shard(str(cut), skip_bad=True)
    for s in items:
        try:
            decode_source(s)
        except ImageError as err:
            assert "cut.tar" in str(err)


def test_parts_one_per_shard_and_runs_of_part_size(tmp_path):
    for i in range(5):
        make_image(tmp_path / "imgs" / f"{i}.png", seed=i)
    make_shards(tmp_path / "sh", n_shards=2, per_shard=2)
    groups = collect([str(tmp_path / "imgs"), str(tmp_path / "sh" / "shard-{0000..0001}.tar")])
    parts = plan_parts(groups, part_size=2)
    assert [len(p.items) for p in parts] == [2, 2, 1, 2, 2]
    assert [p.name for p in parts] == [f"part-{i:05d}" for i in range(5)]
    assert parts[3].source.endswith("shard-0000.tar")
    assert parts[0].items_hash() != parts[1].items_hash()
    with pytest.raises(GrmpiqaError, match="--part-size"):
        plan_parts(groups, part_size=0)


def test_docstring_examples():
    import doctest

    result = doctest.testmod(inputs, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0
