"""create_model without a checkpoint: zero-shot CLIP-IQA prompts, announced; untrained
learned prompts only when asked for (issue 20, item 2)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_image

import grmpiqa
from grmpiqa.baselines import clipiqa_model
from grmpiqa.cli import main
from grmpiqa.factory import ZERO_SHOT


def test_no_checkpoint_means_zero_shot_clipiqa():
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("grmpiqa")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        model = grmpiqa.create_model("test-tiny", pretrained=None)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert model.config == ZERO_SHOT and model.visual is None and model.prompt_learner is None
    assert model.prompt_origin == "zero-shot" and not model.untrained
    assert "zero-shot CLIP-IQA prompts 'Good photo.' / 'Bad photo.'" in model.describe()
    assert sum("zero-shot CLIP-IQA" in r.getMessage() for r in records) == 1
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.score(x), clipiqa_model("test-tiny", None).score(x))
    # learned prompts are built only when asked for, and are announced as untrained
    learned = grmpiqa.create_model("test-tiny", pretrained=None, config=grmpiqa.ModelConfig())
    assert learned.untrained and "UNTRAINED learned prompts" in learned.describe()
    assert grmpiqa.create_model("test-tiny", pretrained=None, visual_prompts=True).untrained


def test_score_cli_announces_zero_shot_and_records_it(tmp_path, capsys):
    img = make_image(tmp_path / "a.png")
    flags = ["--backbone", "test-tiny", "--pretrained", "random", "--no-progress"]
    out = tmp_path / "parts"
    assert main(["score", *flags, "--out-dir", str(out), str(img)]) == 0
    err = capsys.readouterr().err
    assert "no checkpoint: scoring with the zero-shot CLIP-IQA prompts" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert "zero-shot CLIP-IQA" in manifest["fingerprint"]["models"][0]["prompts"]
    # --untrained-prompts: the random learned prompts, loudly; never with a checkpoint
    assert main(["score", *flags, "--untrained-prompts", str(img)]) == 0
    err = capsys.readouterr().err
    assert "WARNING: UNTRAINED learned prompts" in err
    assert "zero-shot" not in err
    ckpt = grmpiqa.save_checkpoint(
        grmpiqa.create_model("test-tiny", pretrained=None), tmp_path / "c.safetensors"
    )
    rc = main(["score", *flags, "--untrained-prompts", "--checkpoint", str(ckpt), str(img)])
    assert rc == 1
    assert capsys.readouterr().err.strip().endswith("--untrained-prompts goes without --checkpoint")


def test_parquet_output_carries_the_model_record(tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    img = make_image(tmp_path / "a.png")
    out = tmp_path / "s.parquet"
    flags = ["--backbone", "test-tiny", "--pretrained", "random", "--no-progress"]
    assert main(["score", *flags, "-o", str(out), str(img)]) == 0
    meta = json.loads(pq.read_schema(out).metadata[b"grmpiqa"])
    assert "zero-shot CLIP-IQA" in meta["models"][0]["prompts"]


def test_service_card_says_zero_shot():
    from grmpiqa.serve.engine import ScoringEngine

    card = ScoringEngine(grmpiqa.create_model("test-tiny", pretrained=None), "m").card()
    assert card["prompts"]["origin"] == "zero-shot"
    assert "zero-shot CLIP-IQA" in card["note"] and "zero-shot" in card["description"]
    untrained = grmpiqa.create_model("test-tiny", pretrained=None, config=grmpiqa.ModelConfig())
    card = ScoringEngine(untrained, "u").card()
    assert card["prompts"]["origin"] is None and "warning" in card
