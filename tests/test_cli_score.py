"""``grmpiqa score`` end to end: inputs, outputs, bad files, real CLIVE images."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from conftest import CLIVE_ROOT, make_image, needs_clive

from grmpiqa.cli import main

TINY = ["--backbone", "test-tiny", "--pretrained", "random", "--no-progress", "--workers", "0"]


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_folder_is_walked_recursively_to_stdout(image_dir, capsys):
    assert main(["score", str(image_dir), *TINY]) == 0
    out = capsys.readouterr()
    rows = _rows(out.out)
    assert len(rows) == 5 and any(r["path"].endswith("sub/deep.jpg") for r in rows)
    assert all(0 < float(r["score"]) < 1 for r in rows)
    assert "RANDOM weights" in out.err


def test_glob_list_files_and_json_output(image_dir, tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text("imgs/img0.png\nimgs/img1.png\n")
    table = tmp_path / "table.csv"
    table.write_text("path,mos\nimgs/img2.png,3\nimgs/img3.png,4\n")
    out = tmp_path / "scores.json"
    pattern = str(image_dir / "img*.png")
    assert main(["score", pattern, str(lst), str(table), *TINY, "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["path"].split("/")[-1] for r in data] == [
        f"img{i}.png" for i in (0, 1, 2, 3, 0, 1, 2, 3)
    ]
    assert data[0]["score"] == data[4]["score"]  # same image, same score
    capsys.readouterr()


def test_scores_do_not_depend_on_batch_size(image_dir, capsys):
    main(["score", str(image_dir), *TINY, "--batch-size", "1"])
    a = _rows(capsys.readouterr().out)
    main(["score", str(image_dir), *TINY, "--batch-size", "4", "--workers", "1"])
    b = _rows(capsys.readouterr().out)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert abs(float(ra["score"]) - float(rb["score"])) <= 2e-6


def _with_bad_files(image_dir):
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (image_dir / "text.png").write_text("not an image")
    good = (image_dir / "img0.png").read_bytes()
    (image_dir / "trunc.png").write_bytes(good[: len(good) // 3])


def test_bad_file_stops_with_one_line_and_writes_nothing(image_dir, tmp_path):
    _with_bad_files(image_dir)
    out = tmp_path / "scores.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "grmpiqa", "score", str(image_dir), *TINY, "--output", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("grmpiqa: error:")]
    assert len(errors) == 1 and (
        "broken.jpg" in errors[0] or "text.png" in errors[0] or "trunc.png" in errors[0]
    )
    assert not out.exists() and not list(tmp_path.glob(".scores.csv*"))
    assert proc.stdout == ""


def test_skip_bad_scores_the_rest(image_dir, capsys):
    _with_bad_files(image_dir)
    assert main(["score", str(image_dir), *TINY, "--skip-bad"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 8
    bad = {r["path"].split("/")[-1]: r for r in rows if r["error"]}
    assert set(bad) == {"broken.jpg", "text.png", "trunc.png"}
    assert all(r["score"] == "" and r["path"].split("/")[-1] in r["error"] for r in bad.values())
    assert all(0 < float(r["score"]) < 1 for r in rows if not r["error"])


@pytest.mark.parametrize(
    "args,msg",
    [
        (["/no/such/place"], "no such file or folder"),
        (["{d}/*.tiff"], "no files match"),
        (["{d}", "--output", "{d}/x.txt"], "must end in .csv, .json or .parquet"),
        (["{d}", "--batch-size", "0"], "--batch-size"),
        (["{d}", "--checkpoint", "{d}/img0.png"], "img0.png"),
        (["{e}"], "no image files"),
    ],
)
def test_bad_arguments(image_dir, tmp_path, capsys, args, msg):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["score", *[a.format(d=image_dir, e=empty) for a in args], *TINY]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert msg in err and err.count("grmpiqa: error") == 1


def test_image_modes_are_scored(tmp_path, capsys):
    for mode in ("L", "RGBA", "CMYK", "P"):
        make_image(tmp_path / f"m_{mode}.{'jpg' if mode == 'CMYK' else 'png'}", mode=mode)
    assert main(["score", str(tmp_path), *TINY]) == 0
    assert len(_rows(capsys.readouterr().out)) == 4


@needs_clive
def test_cli_on_real_clive_images(tmp_path):
    images = sorted((CLIVE_ROOT / "Images").glob("10*.JPG"))[:12]
    assert images
    out = tmp_path / "clive.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grmpiqa",
            "score",
            *map(str, images),
            *TINY[:-2],
            "--workers",
            "1",
            "--batch-size",
            "5",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out.read_text())
    assert [r["path"] for r in rows] == [str(p) for p in images]
    assert all(0 < float(r["score"]) < 1 for r in rows)
