"""``grmpiqa demo`` in its quick mode: the whole pipeline, offline, on test-tiny."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import grmpiqa
from grmpiqa.cli import main
from grmpiqa.demo import demo_images, plan_for


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sample_photos_ship_with_scikit_image(tmp_path):
    tasks, target = demo_images(tmp_path, side=64)
    names_t = sorted(p.stem for p in tasks.iterdir())
    names_g = sorted(p.stem for p in target.iterdir())
    assert len(names_t) >= 4 and len(names_g) >= 4
    assert not set(names_t) & set(names_g)  # task and target contents never overlap
    with grmpiqa.images.load_image(next(target.iterdir())) as im:
        assert max(im.size) == 64 and im.mode == "RGB"


def test_plans_fit_the_protocol():
    for quick in (True, False):
        for tiny in (True, False):
            p = plan_for(quick, tiny)
            # target set: 4 contents x types x levels; the pool (3 contents) holds the shots
            assert p.shots <= 3 * len(p.target_types) * p.levels
            assert p.splits >= 1 and p.max_epochs >= 2


def test_demo_quick_offline_falls_back_to_tiny(tmp_path, monkeypatch, capsys):
    # no network and no cached weights (even where they are cached): the real backbone
    # is unavailable, so the demo must fall back to test-tiny
    monkeypatch.setenv("GRMPIQA_OFFLINE", "1")
    monkeypatch.setattr("grmpiqa.backbone._cached_tag_file", lambda *a, **k: None)
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--quick", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0
    assert "NO PRETRAINED CLIP WEIGHTS" in cap.err and "MEANINGLESS" in cap.err
    demo = json.loads((out / "demo.json").read_text())
    assert demo["random_backbone"] is True and demo["quick"] is True
    assert demo["backbone"].startswith("test-tiny (RANDOM weights")
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["config"]["method"] == "grmp" and report["random_backbone"] is True
    assert report["config"]["init"]["path"].endswith("stage1.safetensors")
    assert len(report["splits"]) == 2
    assert (out / "report" / "scatter.png").is_file() and (out / "report" / "curves.png").is_file()
    # stage 1 wrote a loadable checkpoint, stage 2 a scorer for `grmpiqa score`
    meta = grmpiqa.read_metadata(out / "stage1.safetensors")
    assert meta["backbone"]["name"] == "test-tiny"
    ckpt = out / demo["checkpoint"]
    model = grmpiqa.create_model(checkpoint=ckpt)
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == report["splits"][0]["n_test"] > 0
    s = model.score([out / "target" / "images" / rows[0]["image"]])
    assert float(rows[0]["score"]) == pytest.approx(float(s[0]), abs=1e-5)
    assert "scores of a content never seen in training" in cap.out
    assert "grmp on kadid:" in cap.out


def test_demo_quick_with_the_documented_minimum_of_own_photos(tmp_path, capsys):
    """Issue 10.22: --pristine DIR works with the minimum the help documents (4 photos)."""
    from conftest import make_image

    from grmpiqa.demo import MIN_PRISTINE

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(at least {MIN_PRISTINE})" in help_text and MIN_PRISTINE == 4
    photos = tmp_path / "photos"
    for i in range(MIN_PRISTINE - 1):
        make_image(photos / f"p{i}.png", size=(80, 64), seed=i)
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--quick", "--no-progress", "--pristine", str(photos),
            "--backbone", "test-tiny", "--pretrained", "random"]  # fmt: skip
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and f"needs at least {MIN_PRISTINE} pristine photos" in err
    assert err.count("grmpiqa: error:") == 1 and "Traceback" not in err
    make_image(photos / "p3.png", size=(80, 64), seed=3)
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    demo = json.loads((out / "demo.json").read_text())
    report = json.loads((out / "report" / "report.json").read_text())
    # 2 target contents: one tested, one in the pool; the shots shrink to fit the pool
    assert "shots per split" in cap.err
    assert demo["plan"]["shots"] == report["config"]["shots"] == 15
    assert len(report["splits"]) == 2
    assert all(s["n_test"] == 15 for s in report["splits"])
