"""scoring.outputs: output checks, row files, the -o journal, parts."""

from __future__ import annotations

import json

import pytest

from grmpiqa.errors import GrmpiqaError
from grmpiqa.scoring.inputs import ImageSource, Part
from grmpiqa.scoring.outputs import (
    Columns,
    FileSink,
    PartsSink,
    check_output_dir,
    check_output_file,
    make_row,
    read_rows,
    write_rows,
)

FP = {"models": ["m"], "precision": "fp32"}


def _parts(n_parts: int = 2, per: int = 3) -> list[Part]:
    return [
        Part(p, f"src{p}", [ImageSource(f"img/{p}_{i}.png") for i in range(per)])
        for p in range(n_parts)
    ]


def test_output_checks(tmp_path):
    assert check_output_file(tmp_path / "new" / "deeper" / "s.csv") == "csv"
    with pytest.raises(GrmpiqaError, match="is a folder"):
        check_output_file(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(GrmpiqaError, match="is not a folder"):
        check_output_file(tmp_path / "f" / "s.json")
    with pytest.raises(GrmpiqaError, match=r"\.csv, \.json or \.parquet"):
        check_output_file(tmp_path / "s.txt")
    with pytest.raises(GrmpiqaError, match="not a folder"):
        check_output_dir(tmp_path / "f", "csv")
    with pytest.raises(GrmpiqaError, match="is not a folder"):
        check_output_dir(tmp_path / "f" / "sub", "csv")


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_rows_round_trip(tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    cols = Columns(("score_a", "score_b"), key=True, id=True, error=True)
    rows = [
        make_row(cols, ImageSource("s.tar", key="k1", id="7"), [0.25, 0.5], None),
        make_row(cols, ImageSource("s.tar", key="k2", id="8"), None, "s.tar:k2.jpg: broken"),
        make_row(cols, ImageSource("s.tar", key="k3"), [float("nan"), 0.125], None),
    ]
    write_rows(tmp_path / f"r.{fmt}", fmt, cols, rows)
    back = read_rows(tmp_path / f"r.{fmt}", fmt)
    assert [list(r) for r in back] == [cols.names()] * 3
    assert back[0]["score_a"] == 0.25 and back[0]["error"] is None and back[0]["id"] == "7"
    assert back[1]["score_a"] is None and back[1]["error"] == "s.tar:k2.jpg: broken"
    assert back[2]["score_a"] is None and back[2]["score_b"] == 0.125


def test_journal_survives_a_cut_short_last_line_and_resumes(tmp_path):
    parts = _parts(1, 4)
    cols = Columns(("score",))
    out = tmp_path / "s.csv"
    sink = FileSink(out, "csv", parts, cols, FP)
    sink.add([(0, 0, [0.1], None), (0, 1, [0.2], None)])
    # a SIGKILL: no finish(), and the last line cut in the middle of a write
    with open(tmp_path / "s.csv.partial", "a", encoding="utf-8") as fh:
        fh.write('{"s": "img/0_2.png", "v": [0.')
    assert not out.exists()
    again = FileSink(out, "csv", parts, cols, FP, resume=True)
    assert again.pending() == [(parts[0], [2, 3])]
    again.add([(0, 2, [0.3], None), (0, 3, [0.4], None)])
    again.finish()
    assert [r["score"] for r in read_rows(out, "csv")] == [0.1, 0.2, 0.3, 0.4]
    assert not (tmp_path / "s.csv.partial").exists()


def test_a_new_run_without_resume_starts_over(tmp_path):
    parts = _parts(1, 2)
    sink = FileSink(tmp_path / "s.json", "json", parts, Columns(), FP)
    sink.add([(0, 0, [0.5], None)])
    fresh = FileSink(tmp_path / "s.json", "json", parts, Columns(), FP)
    assert fresh.pending() == [(parts[0], [0, 1])]


def test_parts_are_written_when_complete_with_a_manifest(tmp_path):
    parts = _parts(2, 2)
    cols = Columns(error=True)
    sink = PartsSink(tmp_path / "o", "csv", parts, cols, FP)
    sink.add([(1, 1, [0.5], None), (0, 0, [0.25], None)])
    assert not list((tmp_path / "o").glob("part-*"))  # nothing complete yet
    sink.add([(1, 0, None, "bad")])
    assert [p.name for p in (tmp_path / "o").glob("part-*")] == ["part-00001.csv"]
    sink.add([(0, 1, [0.75], None)])
    sink.finish()
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["complete"] and [p["done"] for p in manifest["parts"]] == [True, True]
    assert manifest["fingerprint"] == FP
    assert read_rows(tmp_path / "o" / "part-00001.csv", "csv")[0]["error"] == "bad"
    with pytest.raises(GrmpiqaError, match="--resume"):
        PartsSink(tmp_path / "o", "csv", parts, cols, FP)
    resumed = PartsSink(tmp_path / "o", "csv", parts, cols, FP, resume=True)
    assert resumed.pending() == []
    other = [Part(0, "x", [ImageSource("other.png"), ImageSource("img/0_1.png")]), parts[1]]
    assert [
        p.index for p, _ in PartsSink(tmp_path / "o", "csv", other, cols, FP, resume=True).pending()
    ] == [0]
    with pytest.raises(GrmpiqaError, match="other settings"):
        PartsSink(tmp_path / "o", "csv", parts, cols, {**FP, "precision": "bf16"}, resume=True)
