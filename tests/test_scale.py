"""Scores in the user's units (grmpiqa.scale): label scale, p -> MOS map, checkpoint record."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG
from PIL import Image, ImageFilter

import grmpiqa
from grmpiqa.checkpoint import read_metadata
from grmpiqa.cli import main
from grmpiqa.data import load_dataset
from grmpiqa.errors import GrmpiqaError
from grmpiqa.finetune import FinetuneConfig, finetune
from grmpiqa.metrics import fit_logistic
from grmpiqa.scale import (
    LabelScale,
    ScoreScale,
    fit_score_scale,
    label_scale_of,
    scale_from_metadata,
)

CLIVE_LIKE = LabelScale(lo=0.0, hi=100.0, higher_is_better=True, name="MOS")
DMOS_1_5 = LabelScale(lo=1.0, hi=5.0, higher_is_better=False, name="DMOS")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_logistic_map_is_bounded_to_the_shots_range_and_round_trips_through_json():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.1, 0.9, 40)
    mos = 100 / (1 + np.exp(-(p - 0.5) / 0.1)) + rng.normal(0, 2, 40)
    s = fit_score_scale(p, mos, CLIVE_LIKE)
    assert s.method == "logistic4" and s.fit["n"] == 40 and s.fit["fallback"] is None
    assert s.fit["quality"] == "good" and s.fit["r2"] > 0.95 and s.warning() is None
    # inside the shots' range widened by 5 % of it (and inside the 0-100 scale)
    lo, hi = s.bounds
    w = np.ptp(mos)
    assert lo == pytest.approx(max(0.0, mos.min() - 0.05 * w))
    assert hi == pytest.approx(min(100.0, mos.max() + 0.05 * w))
    b1, b2 = s.params[:2]
    assert lo <= b2 < b1 <= hi  # both asymptotes inside: no values beyond the shots
    grid = s.to_mos(np.linspace(0, 1, 101))
    assert np.all(np.diff(grid) >= 0) and lo <= grid.min() and grid.max() <= hi
    # in the shots' interior it is the evaluation protocol's logistic fit
    f = fit_logistic(p, mos, "4")
    assert f is not None
    x = np.linspace(0.3, 0.7, 9)
    np.testing.assert_allclose(s.to_mos(x), f(x), atol=1.0)
    assert s.fit["rmse"] < 4.0  # noise std is 2
    back = ScoreScale.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    np.testing.assert_array_equal(back.to_mos(x), s.to_mos(x))


def test_dmos_scale_maps_good_images_to_low_dmos():
    p = np.linspace(0.1, 0.9, 12)
    dmos = 5.0 - 4.0 * p + 0.05 * np.sin(7 * p)
    s = fit_score_scale(p, dmos, DMOS_1_5)
    grid = s.to_mos(np.linspace(0, 1, 51))
    assert np.all(np.diff(grid) <= 0) and grid[0] > grid[-1]
    assert np.all((grid >= 1.0) & (grid <= 5.0))


def test_degenerate_fits_fall_back_to_a_linear_map():
    # constant predictions: no fit possible -> the range map (p=1 is the best end)
    s = fit_score_scale([0.5] * 6, [10, 20, 30, 40, 50, 60], CLIVE_LIKE)
    assert s.method == "linear" and "range map" in s.fit["fallback"]
    np.testing.assert_allclose(s.to_mos([0.0, 0.25, 1.0]), [0.0, 25.0, 100.0])
    # three shots: too few for four parameters -> least-squares line
    s = fit_score_scale([0.2, 0.5, 0.8], [20, 50, 80], CLIVE_LIKE)
    assert s.method == "linear" and s.fit["fallback"]
    np.testing.assert_allclose(s.to_mos([0.2, 0.5, 0.8]), [20, 50, 80], atol=1e-9)
    # predictions anti-correlated with MOS: no map against the scale's direction; the
    # isotonic fit is then flat at the mean, and said to be poor
    s = fit_score_scale(np.linspace(0.1, 0.9, 10), np.linspace(90, 10, 10), CLIVE_LIKE)
    assert s.method == "isotonic" and "direction" in s.fit["fallback"]
    assert s.to_mos([1.0])[0] >= s.to_mos([0.0])[0]
    np.testing.assert_allclose(s.to_mos([0.0, 0.5, 1.0]), [50.0] * 3)
    assert s.fit["quality"] == "poor" and "explains 0%" in s.warning()
    # the DMOS range map puts p=1 at the scale's low (best) end
    s = fit_score_scale([0.3] * 5, [1, 2, 3, 4, 5], DMOS_1_5)
    np.testing.assert_allclose(s.to_mos([0.0, 1.0]), [5.0, 1.0])


def test_the_issue_case_a_map_that_explains_little_falls_back_and_is_flagged():
    """Issue 20: a 50-shot run on MOS 6.5-86.6 stored the logistic [104196.9, 52.03,
    0.5622, 0.0010]: values only in 52-100 and two images both at 52.0. Predictions that
    explain little of the MOS give an unbounded logistic running far outside the labels;
    the map must stay monotone, inside the shots' range, and say it is poor."""
    from grmpiqa.metrics import fit_monotone

    rng = np.random.default_rng(3)
    p = rng.normal(0.55, 0.02, 50)
    mos = np.clip(46 + 6 * (p - 0.55) / 0.02 + rng.normal(0, 20, 50), 6.5, 86.6)
    label = LabelScale(6.5, 86.6)
    old = fit_monotone(p, mos, "4")
    assert old is not None and old.kind == "logistic4"
    assert min(old.params[:2]) < -1000  # the unbounded fit: asymptotes far off the scale
    s = fit_score_scale(p, mos, label)
    assert s.method == "linear" and "explains little" in s.fit["fallback"]
    grid = s.to_mos(np.linspace(0, 1, 201))
    assert np.all(np.diff(grid) >= 0)
    assert mos.min() - 0.05 * np.ptp(mos) <= grid.min() and grid.max() <= 86.6
    assert s.fit["quality"] == "poor" and s.fit["r2"] < 0.2
    assert "rough" in s.warning()
    # different shots get different MOS (no collapse onto an asymptote)
    assert len(np.unique(np.round(s.to_mos(p), 3))) > 40
    back = ScoreScale.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.fit == s.fit


def test_bad_scale_records_are_refused():
    with pytest.raises(GrmpiqaError, match="lo < hi"):
        LabelScale(lo=5, hi=1)
    with pytest.raises(GrmpiqaError, match="malformed"):
        ScoreScale.from_dict({"lo": 0, "hi": 1})
    bad = {"lo": 0, "hi": 1, "map": {"kind": "logistic4", "params": [1, float("nan"), 0, 1]}}
    with pytest.raises(GrmpiqaError, match="malformed"):
        ScoreScale.from_dict(bad)


def _write_csv(path: Path, rows: list[tuple[str, float]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "mos"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def blur_csv(tmp_path_factory) -> Path:
    """12 images whose MOS (0-100 scale) falls with their blur."""
    d = tmp_path_factory.mktemp("scale_blur")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(12):
        arr = rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)
        Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.4 * i)).save(d / f"im{i}.png")
        rows.append((f"im{i}.png", 92.0 - 7.0 * i))
    return _write_csv(d / "labels.csv", rows)


def test_label_scale_is_recovered_from_the_data_layer(blur_csv):
    ds = load_dataset(f"csv:{blur_csv}?mos_range=0,100")
    s = label_scale_of(ds)
    assert (s.lo, s.hi, s.higher_is_better, s.name.upper()) == (0.0, 100.0, True, "MOS")
    ds = load_dataset(f"csv:{blur_csv}?mos_range=0,100&higher_is_better=0")
    s = label_scale_of(ds)
    assert (s.lo, s.hi, s.higher_is_better) == (0.0, 100.0, False)
    ds = load_dataset(f"csv:{blur_csv}")  # default: the data's min and max
    s = label_scale_of(ds)
    assert s.lo == pytest.approx(92.0 - 77.0) and s.hi == pytest.approx(92.0)


def test_score_refuses_mos_without_a_recorded_scale(tiny_model, blur_csv, capsys):
    with pytest.raises(GrmpiqaError, match="no MOS scale recorded"):
        tiny_model.score([blur_csv.parent / "im0.png"], scale="mos")
    with pytest.raises(GrmpiqaError, match="unknown scale"):
        tiny_model.score([blur_csv.parent / "im0.png"], scale="dmos")
    rc = main(
        ["score", "--backbone", "test-tiny", "--scale", "mos", str(blur_csv.parent / "im0.png")]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "no MOS scale recorded" in err and "Traceback" not in err


def test_finetune_records_the_scale_and_score_writes_mos(blur_csv, tmp_path, capsys):
    shots = load_dataset(f"csv:{blur_csv}?mos_range=0,100")
    model = grmpiqa.create_model("test-tiny", pretrained=None, config=TINY_CONFIG)
    out = tmp_path / "ft.safetensors"
    config = FinetuneConfig(lr=0.05, max_epochs=6, eval_every=3, cache_augmentations=1)
    finetune(model, shots, config, out=out, progress=False)
    rec = read_metadata(out)["extra"]["scale"]
    assert (rec["lo"], rec["hi"], rec["higher_is_better"]) == (0.0, 100.0, True)
    assert rec["fit"]["n"] == len(shots)
    assert rec["source"] == shots.spec
    # the map is fitted on the final model's predictions of the shots (eval view)
    loaded = grmpiqa.create_model(checkpoint=out)
    assert loaded.score_scale is not None
    p = loaded.score(shots.paths)
    expected = fit_score_scale(p.numpy(), shots.mos, label_scale_of(shots))
    assert loaded.score_scale.method == expected.method
    np.testing.assert_allclose(
        loaded.score_scale.to_mos(p.numpy()), expected.to_mos(p.numpy()), rtol=1e-4, atol=1e-3
    )
    mos = loaded.score(shots.paths, scale="mos")
    assert mos.dtype == p.dtype == torch.float32  # MOS and p: one dtype
    np.testing.assert_allclose(mos.numpy(), loaded.score_scale.to_mos(p.numpy()), rtol=1e-6)
    assert torch.all((mos >= 0) & (mos <= 100))
    # the CLI writes the same numbers
    csv_out = tmp_path / "mos.csv"
    rc = main(
        ["score", "--checkpoint", str(out), "--scale", "mos", "--no-progress", "-o", str(csv_out)]
        + ["--precision", "fp32"]  # the API's default, compared with below
        + [str(x) for x in shots.paths]
    )
    assert rc == 0
    assert "0-100, higher is better" in capsys.readouterr().err
    with open(csv_out) as fh:
        rows = list(csv.DictReader(fh))
    assert "score" not in rows[0]  # MOS values are written under their own name
    got = [float(r["mos"]) for r in rows]
    np.testing.assert_allclose(got, mos.numpy(), rtol=1e-6, atol=1e-5)  # float32 MOS
    assert scale_from_metadata(read_metadata(out)) == loaded.score_scale
    assert not math.isnan(sum(got))


def test_docstring_example():
    import doctest

    import grmpiqa.scale

    assert doctest.testmod(grmpiqa.scale).failed == 0


def test_a_recorded_dataset_scale_is_used_as_is(blur_csv):
    class WithScale:
        spec = "kadid:/x"
        scale = {"lo": 1.0, "hi": 5.0, "higher_is_better": False}
        mos = np.array([1.0, 2.0])
        labels = np.array([1.0, 0.75])

    s = label_scale_of(WithScale())  # type: ignore[arg-type]
    assert (s.lo, s.hi, s.higher_is_better, s.name, s.source) == (1, 5, False, "DMOS", "kadid:/x")
