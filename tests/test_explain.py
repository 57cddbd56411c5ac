"""Quality maps (grmpiqa.explain): read-out, API, CLI, and a fine-tuned model that finds
a locally noised region."""

from __future__ import annotations

import csv
import doctest

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, make_image
from PIL import Image

import grmpiqa
import grmpiqa.explain
from grmpiqa.cli import main
from grmpiqa.data import load_dataset
from grmpiqa.explain import grid_box, map_tensor, overlay
from grmpiqa.finetune import FinetuneConfig, finetune

S = 224


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_docstring_example():
    assert doctest.testmod(grmpiqa.explain).failed == 0


def test_map_read_out_matches_the_global_score(tiny_model, image_dir):
    paths = sorted(image_dir.glob("*.png"))
    maps = grmpiqa.explain.quality_maps(tiny_model, paths, batch_size=2)
    scores = tiny_model.score(paths)
    for qm, s in zip(maps, scores.tolist(), strict=True):
        assert qm.grid.shape == (7, 7) and qm.grid.dtype == np.float32
        assert np.all((qm.grid > 0) & (qm.grid < 1))
        assert qm.score == pytest.approx(s, abs=1e-5)  # token 0 of the read-out is the score
        assert qm.mean == pytest.approx(float(qm.grid.mean()))
        assert qm.mos_grid is None  # no scale recorded
    # batch-size invariant, and the model-level API gives the same map
    single = tiny_model.quality_map(paths[1])
    np.testing.assert_allclose(single.grid, maps[1].grid, atol=1e-6)
    # without visual prompts the read-out is plain CLIP's
    plain = grmpiqa.create_model("test-tiny", pretrained=None, visual_prompts=False)
    qm = plain.quality_map(paths[0])
    assert qm.score == pytest.approx(float(plain.score([paths[0]])[0]), abs=1e-5)


def test_grid_box_is_the_centre_crop_of_the_eval_transform(tiny_model):
    x0, y0, x1, y1 = grid_box(tiny_model)
    assert x0 == pytest.approx(10 / 244) and x1 == pytest.approx(234 / 244) and x0 == y0


def _scene(rng: np.random.Generator) -> np.ndarray:
    """A clean synthetic scene: smooth sums of sinusoids, float RGB in 25..225."""
    yy, xx = np.mgrid[0:S, 0:S] / S
    img = np.zeros((S, S, 3))
    for c in range(3):
        for _ in range(3):
            f = rng.uniform(1, 4, 2)
            img[..., c] += np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + rng.uniform(0, 2 * np.pi))
    return (img - img.min()) / (np.ptp(img) + 1e-9) * 200 + 25


def _noise(img: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator) -> np.ndarray:
    x0, y0, x1, y1 = box
    out = img.copy()
    out[y0:y1, x0:x1] += rng.normal(0, 60, (y1 - y0, x1 - x0, 3))
    return out


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def noise_model(tmp_path_factory) -> grmpiqa.QualityModel:
    """test-tiny fine-tuned on 48 scenes whose MOS is the clean fraction of the image
    (a random rectangle is noised in 3 of 4)."""
    d = tmp_path_factory.mktemp("explain_shots")
    rng = np.random.default_rng(0)
    rows = ["path,mos"]
    for i in range(48):
        img, frac = _scene(rng), 0.0
        if i % 4:
            w, h = int(rng.integers(32, S + 1)), int(rng.integers(32, S + 1))
            x0, y0 = int(rng.integers(0, S - w + 1)), int(rng.integers(0, S - h + 1))
            img = _noise(img, (x0, y0, x0 + w, y0 + h), rng)
            frac = w * h / S / S
        _pil(img).save(d / f"im{i}.png")
        rows.append(f"im{i}.png,{100 * (1 - frac):.4f}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    shots = load_dataset(f"csv:{d / 'labels.csv'}?mos_range=0,100")
    model = grmpiqa.create_model("test-tiny", pretrained=None, config=TINY_CONFIG)
    config = FinetuneConfig(
        lr=0.1, max_epochs=200, eval_every=50, cache_augmentations=2, lam=0.0, distill=False
    )
    finetune(model, shots, config, progress=False)
    return model.eval()


def test_fine_tuned_map_is_lower_where_the_image_is_noised(noise_model):
    """A clean scene with one region noised: the map is lower inside that region."""
    rng = np.random.default_rng(123)
    tf = noise_model.preprocess.eval_transform()
    half, full = S // 2, S
    boxes = [
        (0, 0, half, full),  # left half
        (half, 0, full, full),  # right half
        (0, 0, full, half),  # top half
        (0, half, full, full),  # bottom half
        (0, 0, half, half),  # top-left quarter
        (half, half, full, full),  # bottom-right quarter
    ]
    gaps = []
    for box in boxes:
        img = _pil(_noise(_scene(rng), box, rng))
        _, maps = map_tensor(noise_model, tf(img)[None])
        grid = maps[0].numpy()
        # which grid cells lie inside the noised box (cell centres in image coordinates)
        x0, y0, x1, y1 = grid_box(noise_model)
        centres = x0 + (np.arange(7) + 0.5) / 7 * (x1 - x0)
        cx = centres[None, :] * S
        cy = centres[:, None] * S
        inside = (cx >= box[0]) & (cx < box[2]) & (cy >= box[1]) & (cy < box[3])
        gaps.append(float(grid[~inside].mean() - grid[inside].mean()))
    assert all(g > 0 for g in gaps), gaps
    assert np.mean(gaps) > 0.02, gaps


def test_explain_cli_writes_overlay_grid_and_summary(tmp_path, capsys):
    imgs = [make_image(tmp_path / "in" / "a.png", (120, 80), seed=1)]
    imgs.append(make_image(tmp_path / "in" / "sub" / "a.jpg", (64, 96), seed=2))  # same stem
    out = tmp_path / "maps"
    argv = ["explain", str(imgs[0]), str(imgs[1]), "--out", str(out), "--backbone", "test-tiny"]
    rc = main([*argv, "--precision", "fp32"])  # compared with model.score's fp32 below
    assert rc == 0
    printed = capsys.readouterr()
    assert "map mean" in printed.out and "RANDOM" in printed.err
    with open(out / "maps.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["png"] for r in rows] == ["a.map.png", "a_2.map.png"]
    model = grmpiqa.create_model("test-tiny", pretrained=None)
    for r, path in zip(rows, imgs, strict=True):
        grid = np.load(out / r["npy"], allow_pickle=False)
        assert grid.shape == (7, 7)
        assert float(r["map_mean"]) == pytest.approx(float(grid.mean()), abs=1e-5)
        assert float(r["score"]) == pytest.approx(float(model.score([path])[0]), abs=1e-5)
        with Image.open(out / r["png"]) as png:
            w, h = Image.open(path).size
            assert png.size[0] == w and png.size[1] > h  # image + legend strip
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_explain_cli_reports_bad_files_in_one_line(tmp_path, capsys):
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    rc = main(["explain", str(bad), "--out", str(tmp_path / "o"), "--backbone", "test-tiny"])
    err = capsys.readouterr().err
    assert rc == 1 and "x.png: not an image file" in err and "Traceback" not in err


def test_overlay_covers_only_the_crop_box(tiny_model):
    img = Image.new("RGB", (244, 244), (0, 0, 255))
    qm = tiny_model.quality_map(img)
    ov = np.asarray(overlay(img, qm, alpha=1.0))
    assert tuple(ov[2, 2]) == (0, 0, 255)  # outside the box: the image
    assert tuple(ov[122, 122]) != (0, 0, 255)  # inside: the map
    assert ov.shape[0] > 244  # legend strip below


def test_mos_maps_with_a_recorded_scale(tmp_path):
    model = grmpiqa.create_model("test-tiny", pretrained=None, config=TINY_CONFIG)
    from grmpiqa.metrics import MonotoneFit
    from grmpiqa.scale import LabelScale, ScoreScale

    model.score_scale = ScoreScale(LabelScale(0, 100), MonotoneFit("linear", (100.0, 0.0)))
    qm = model.quality_map(Image.new("RGB", (50, 50), "white"))
    assert qm.mos_grid is not None and qm.mos_score == pytest.approx(100 * qm.score, rel=1e-5)
    np.testing.assert_allclose(qm.mos_grid, 100 * qm.grid, rtol=1e-5)


def test_maps_and_page_use_a_colour_blind_safe_scale_with_a_legend(tiny_model):
    """Issue 20, item 9: cividis (dark blue -> yellow, lightness rising), not red-green,
    in the PNG overlays and on the page, with a legend."""
    from pathlib import Path

    from matplotlib import colormaps

    from grmpiqa.explain import COLORMAP, colorize, overlay

    assert COLORMAP == "cividis"
    ramp = colorize(np.linspace(0.0, 1.0, 9)[None, :], 0.0, 1.0)[0].astype(float)
    lightness = ramp @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(lightness) > 0)  # readable in greyscale and without red/green
    assert ramp[0, 2] > ramp[0, 0] and ramp[-1, 0] > ramp[-1, 2]  # blue low, yellow high
    qm = tiny_model.quality_map(Image.new("RGB", (120, 90), "gray"))
    png = np.asarray(overlay(Image.new("RGB", (120, 90), "gray"), qm))
    assert png.shape[0] > 90 + 30  # image + legend strip ("low [ramp] high", values)
    static = Path(__file__).resolve().parents[1] / "src" / "grmpiqa" / "serve" / "static"
    stops = colormaps["cividis"](np.linspace(0, 1, 9))[:, :3]
    hexes = ["#" + "".join(f"{int(round(v * 255)):02x}" for v in c) for c in stops]
    css = (static / "style.css").read_text()
    assert all(h in css for h in hexes) and "#1a9850" not in css and "#d73027" not in css
    js = (static / "app.js").read_text()
    assert "CIVIDIS" in js and "[215, 48, 39]" not in js
    html = (static / "index.html").read_text()
    assert "dark blue = the lowest, yellow = the highest" in html and 'class="ramp"' in html
