"""``grmpiqa finetune``: --test-fraction, held-out figures, the calibration report, the
progress bar's stop-rule text (issue 20, items 3-5)."""

from __future__ import annotations

import json

import pytest
from conftest import write_rated_images

import grmpiqa
from grmpiqa.cli import main
from grmpiqa.config import FinetuneConfig
from grmpiqa.finetune import PlateauSchedule, _bar_text

FLAGS = ["--backbone", "test-tiny", "--pretrained", "random", "--no-progress"]


def test_held_out_figures_are_reported_logged_and_stored(finetuned_ckpt):
    meta = grmpiqa.read_metadata(finetuned_ckpt)
    extra = meta["extra"]
    assert extra["split"]["test"] == 6 and extra["split"]["test_fraction"] == 0.25
    held = extra["held_out"]
    assert held["n"] == 6 and -1 <= held["srcc"] <= 1 and held["mos_rmse"] > 0
    assert extra["figures"]["epoch"] == extra["epoch"] == 10
    log = [json.loads(x) for x in finetuned_ckpt.with_suffix(".log.jsonl").read_text().splitlines()]
    assert all("held_out_srcc" in row for row in log if "train_srcc" in row)
    assert log[-1]["held_out_srcc"] == pytest.approx(held["srcc"])
    fit = extra["scale"]["fit"]
    assert {"rmse", "r2", "label_std", "output_range", "quality"} <= set(fit)
    lo, hi = extra["scale"]["bounds"]
    assert lo <= fit["output_range"][0] <= fit["output_range"][1] <= hi


def test_test_fraction_zero_trains_on_a_50_row_csv_with_50_shots(tmp_path, capsys):
    labels = write_rated_images(tmp_path / "imgs", 50, seed=1)
    out = tmp_path / "all.safetensors"
    common = ["finetune", "--data", f"csv:{labels}", "--shots", "50", "--out", str(out)]
    quick = ["--max-epochs", "5", "--cache-augmentations", "1", *FLAGS]
    # the default holds 20 % out: one line says why 50 shots do not fit, and what to do
    assert main([*common, *quick]) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(err) == 1 and "--test-fraction 0 to train on every image" in err[0]
    assert "40 of its 50 images are left for training after holding out 10" in err[0]
    assert main([*common, "--test-fraction", "0", *quick]) == 0
    err = capsys.readouterr().err
    assert "none held out" in err and "held out (" not in err
    assert "p -> mos map:" in err and "R2" in err  # the calibration is printed at the end
    meta = grmpiqa.read_metadata(out)
    assert meta["extra"]["split"]["shots"] == 50 and meta["extra"]["split"]["test"] == 0
    assert "held_out" not in meta["extra"]
    assert main([*common, "--test-fraction", "1.5", "--overwrite", *quick]) == 1
    assert "--test-fraction must be in [0, 1)" in capsys.readouterr().err


def test_progress_text_shows_the_stop_rule_not_an_epoch_cap():
    schedule = PlateauSchedule(lr=1e-3, patience=5, decay=0.3, min_lr=5e-7)
    text = _bar_text(schedule, FinetuneConfig(), 0.5, {"train": "0.812", "held-out": "0.701"})
    assert text.startswith("lr 1.0e-03 (7 decays to stop; plateau 0/6 evals)")
    assert "train SRCC 0.812, held-out SRCC 0.701" in text and "cap" not in text
    schedule.lr = 4e-7 / 0.3  # one decay from the floor
    assert "(1 decay to stop" in _bar_text(schedule, FinetuneConfig(max_epochs=40), 0.5, {})
    assert "cap 40 epochs" in _bar_text(schedule, FinetuneConfig(max_epochs=40), 0.5, {})
