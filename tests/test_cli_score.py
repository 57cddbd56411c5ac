"""``grmpiqa score`` end to end: inputs, outputs, bad files, real CLIVE images."""

from __future__ import annotations

import csv
import io
import json
import os
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
    doc = json.loads(out.read_text())
    data = doc["rows"]
    assert [r["path"].split("/")[-1] for r in data] == [
        f"img{i}.png" for i in (0, 1, 2, 3, 0, 1, 2, 3)
    ]
    assert data[0]["score"] == data[4]["score"]  # same image, same score
    # how the scores were computed: device and precision as resolved, the decoder
    from grmpiqa.precision import resolve_precision

    meta = doc["metadata"]["run"]
    assert doc["metadata"]["columns"] == ["score"]  # the fingerprint, and the run:
    assert meta["device"] == "cpu" and meta["decode"] == "pil"
    assert meta["precision"] == resolve_precision("auto", "cpu")
    assert meta["precision_requested"] == "auto"
    err = capsys.readouterr().err
    assert f"on cpu, precision {meta['precision']}" in err and "decode pil" in err


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


# -- reliability (issue 10) ---------------------------------------------------------------------


def test_negative_workers_is_a_clear_error(image_dir, capsys):
    assert main(["score", str(image_dir), *TINY[:-2], "--workers", "-1"]) == 1
    err = capsys.readouterr().err
    assert "--workers must be 0" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["folder", "parent-is-file"])
def test_bad_output_path_is_refused_before_scoring(image_dir, tmp_path, capsys, kind):
    if kind == "folder":
        (tmp_path / "out.csv").mkdir()
        target = tmp_path / "out.csv"
    else:
        (tmp_path / "afile").write_text("x")
        target = tmp_path / "afile" / "out.csv"
    assert main(["score", str(image_dir), *TINY, "-o", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("grmpiqa: error") == 1 and "scoring" not in err  # before the model loads
    assert ("is a folder" in err) if kind == "folder" else ("afile is not a folder" in err)


def test_fifo_in_a_scored_folder_does_not_hang(image_dir):
    os.mkfifo(image_dir / "pipe.jpg")
    proc = subprocess.run(
        [sys.executable, "-m", "grmpiqa", "score", str(image_dir), *TINY],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = _rows(proc.stdout)
    assert len(rows) == 5 and not any("pipe.jpg" in r["path"] for r in rows)
    assert "pipe.jpg: not a regular file" in proc.stderr


def test_unreadable_subfolder_is_reported(image_dir, monkeypatch, capsys):
    from grmpiqa.scoring import inputs

    real = os.scandir
    locked = str(image_dir / "sub")

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(path)

    monkeypatch.setattr(inputs.os, "scandir", scandir)
    assert main(["score", str(image_dir), *TINY]) == 1
    assert "sub: cannot read folder" in capsys.readouterr().err
    assert main(["score", str(image_dir), *TINY, "--skip-bad"]) == 0
    out = capsys.readouterr()
    assert len(_rows(out.out)) == 4
    assert "WARNING" in out.err and "sub: cannot read folder" in out.err


def test_csv_list_without_a_path_column_names_the_list(image_dir, tmp_path, capsys):
    lst = tmp_path / "labels.csv"
    lst.write_text("mos,std\n3.1,0.2\n")
    assert main(["score", str(lst), *TINY]) == 1
    err = capsys.readouterr().err
    assert "labels.csv: no path column" in err and "--path-column" in err


def test_interrupted_run_keeps_its_rows_and_resumes(image_dir, tmp_path, monkeypatch, capsys):
    from grmpiqa.scoring import engine

    clean = tmp_path / "clean.csv"
    assert main(["score", str(image_dir), *TINY, "--batch-size", "2", "-o", str(clean)]) == 0
    real = engine.BatchScorer.score_tensor
    calls: list[int] = []

    def dying(scorer, x, *a, **k):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while the second batch runs
        return real(scorer, x, *a, **k)

    monkeypatch.setattr(engine.BatchScorer, "score_tensor", dying)
    out = tmp_path / "scores.csv"
    assert main(["score", str(image_dir), *TINY, "--batch-size", "2", "-o", str(out)]) == 130
    assert not out.exists()
    journal = tmp_path / "scores.csv.partial"
    assert len(journal.read_text().splitlines()) == 1 + 2  # header + the first batch
    assert "--resume" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(
        engine.BatchScorer,
        "score_tensor",
        lambda scorer, x, *a, **k: calls.append(len(x)) or real(scorer, x, *a, **k),
    )
    assert (
        main(["score", str(image_dir), *TINY, "--batch-size", "2", "-o", str(out), "--resume"]) == 0
    )
    assert sum(calls) == 3  # only the 3 images not yet scored
    assert out.read_text() == clean.read_text()
    assert not journal.exists()


def test_resume_refuses_a_journal_of_other_settings(image_dir, tmp_path, capsys):
    out = tmp_path / "s.csv"
    (tmp_path / "s.csv.partial").write_text(
        '{"journal": "grmpiqa-score-journal/1", "fingerprint": {"precision": "bf16"}}\n'
    )
    assert main(["score", str(image_dir), *TINY, "-o", str(out), "--resume"]) == 1
    assert "other settings" in capsys.readouterr().err


# -- shards, parts, tables, several checkpoints (issue 12) -------------------------------------


def _part_rows(folder, fmt="csv"):
    from grmpiqa.scoring.outputs import read_rows

    files = sorted(folder.glob(f"part-*.{fmt}"))
    return [r for f in files for r in read_rows(f, fmt)]


def test_tar_shards_to_parts_with_a_manifest(tmp_path, capsys):
    from shard_utils import make_shards

    make_shards(tmp_path / "shards", n_shards=3, per_shard=3, bad={1: 2})
    pattern = str(tmp_path / "shards" / "shard-{0000..0002}.tar")
    out = tmp_path / "out"
    assert main(["score", pattern, *TINY, "--out-dir", str(out)]) == 1  # a bad image stops...
    assert "shard-0001.tar:s00005.png" in capsys.readouterr().err
    assert main(["score", pattern, *TINY, "--out-dir", str(out), "--resume", "--skip-bad"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and [p["images"] for p in manifest["parts"]] == [3, 3, 3]
    assert all(p["done"] for p in manifest["parts"])
    rows = _part_rows(out)
    assert [r["key"] for r in rows] == [f"s{k:05d}" for k in range(9)]
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["key"] == "s00005" and bad[0]["score"] is None
    # the same rows as one file
    single = tmp_path / "all.csv"
    assert main(["score", pattern, *TINY, "-o", str(single), "--skip-bad"]) == 0
    one = _rows(single.read_text())
    assert [(r["path"], r["key"], r["score"]) for r in one] == [
        (r["path"], r["key"], "" if r["score"] is None else f"{r['score']:.6f}") for r in rows
    ]
    capsys.readouterr()


def test_parts_resume_skips_complete_parts(image_dir, tmp_path, capsys):
    for i in range(4, 9):
        make_image(image_dir / f"more{i}.png", seed=i)
    out = tmp_path / "out"
    args = ["score", str(image_dir), *TINY, "--out-dir", str(out), "--part-size", "3"]
    assert main(args) == 0
    first = _part_rows(out)
    assert len(first) == 10 and len(list(out.glob("part-*.csv"))) == 4
    assert main(args) == 1
    assert "--resume" in capsys.readouterr().err
    # a kill: part 1 never written, part 2 cut short, an atomic write's temporary left over
    (out / "part-00001.csv").unlink()
    text = (out / "part-00002.csv").read_text()
    (out / "part-00002.csv").write_text(text[: len(text) // 2])
    (out / ".part-00003.csv.abc.tmp").write_text("half")
    kept = {p: (out / p).stat().st_mtime_ns for p in ("part-00000.csv", "part-00003.csv")}
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "2 of 4 parts already complete" in err
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept
    assert _part_rows(out) == first
    assert not list(out.glob(".*.tmp"))
    # other settings: refused, unless --overwrite
    from grmpiqa.precision import resolve_precision

    other = "fp32" if resolve_precision("auto", "cpu") == "bf16" else "bf16"
    assert main([*args, "--resume", "--precision", other]) == 1
    assert "other settings" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--part-size", "5"]) == 0
    assert len(list(out.glob("part-*.csv"))) == 2


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_json_and_parquet_outputs(image_dir, tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    from grmpiqa.scoring.outputs import read_rows

    ref = tmp_path / "ref.json"
    assert main(["score", str(image_dir), *TINY, "-o", str(ref)]) == 0
    f = tmp_path / f"s.{fmt}"
    assert main(["score", str(image_dir), *TINY, "-o", str(f)]) == 0
    assert read_rows(f, fmt) == read_rows(ref, "json")
    d = tmp_path / "d"
    assert (
        main(
            [
                "score",
                str(image_dir),
                *TINY,
                "--out-dir",
                str(d),
                "--format",
                fmt,
                "--part-size",
                "2",
            ]
        )
        == 0
    )
    rows = _part_rows(d, fmt)
    ref_rows = read_rows(ref, "json")
    assert [r["path"] for r in rows] == [r["path"] for r in ref_rows]
    for a, b in zip(rows, ref_rows, strict=True):  # other batches: equal to float rounding
        assert abs(a["score"] - b["score"]) <= 2e-6


def test_table_with_path_and_id_columns(image_dir, tmp_path, capsys):
    table = tmp_path / "index.csv"
    table.write_text("uid,location\nu1,imgs/img1.png\nu2,imgs/img3.png\n")
    assert (
        main(["score", str(table), *TINY, "--path-column", "location", "--id-column", "uid"]) == 0
    )
    rows = _rows(capsys.readouterr().out)
    assert [(r["id"], r["path"].split("/")[-1]) for r in rows] == [
        ("u1", "img1.png"),
        ("u2", "img3.png"),
    ]


def test_several_checkpoints_give_one_column_each(image_dir, tmp_path, capsys):
    import torch

    import grmpiqa

    cfg = grmpiqa.ModelConfig(vpt_tokens=4, finetune_blocks=2)
    ckpts = []
    for s in (1, 2):
        m = grmpiqa.create_model("test-tiny", pretrained=None, config=cfg)
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in m.set_trainable(grmpiqa.STAGE2_GROUPS):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        ckpts.append(grmpiqa.save_checkpoint(m, tmp_path / f"ft{s}.safetensors"))
    base = ["score", str(image_dir), "--no-progress", "--workers", "0"]
    assert main([*base, "--checkpoint", str(ckpts[0]), "--checkpoint", str(ckpts[1])]) == 0
    out = capsys.readouterr()
    assert "share image blocks 0-1" in out.err
    both = _rows(out.out)
    assert list(both[0]) == ["path", "score_ft1", "score_ft2"]
    for c, col in zip(ckpts, ("score_ft1", "score_ft2"), strict=True):
        assert main([*base, "--checkpoint", str(c)]) == 0
        alone = _rows(capsys.readouterr().out)
        for a, b in zip(alone, both, strict=True):
            assert abs(float(a["score"]) - float(b[col])) <= 1e-5
