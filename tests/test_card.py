"""``grmpiqa info CKPT``: the model card of a checkpoint (issue 20, item 10)."""

from __future__ import annotations

import json

from grmpiqa.cli import main


def test_info_prints_the_model_card_of_a_finetuned_checkpoint(finetuned_ckpt, capsys):
    assert main(["info", str(finetuned_ckpt)]) == 0
    out = capsys.readouterr().out
    for expected in (
        "backbone    test-tiny",
        "RANDOM (seed 0)",
        "4 learned context vectors",
        "stage 2 (few-shot fine-tuning, method.md 7) on 18 shots of csv:",
        "6 held out",
        "MOS map     p -> mos map:",
        "held out    6 images never trained on: SRCC",
        "grmpiqa-checkpoint/1, written by grmpiqa",
        "centre crop 224",
    ):
        assert expected in out, expected
    assert main(["info", str(finetuned_ckpt), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["extra"]["stage"] == "finetune"


def test_info_on_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint not found" in err[0]


def test_info_on_hub_references_and_released_files(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    from test_hub import FILE, REF, REPO, _released_bytes, hub_cache_add

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GRMPIQA_CACHE", str(tmp_path / "conv"))
    hub_cache_add(cache, REPO, {FILE: _released_bytes(tmp_path)}, "9" * 40)
    # without the base weights: described from its tensors, with what conversion needs
    assert main(["info", REF]) == 0
    out = capsys.readouterr().out
    assert "released GRMP-IQA state dict (not converted here)" in out
    assert "--pretrained FILE" in out and f"hf-hub:{REPO}/{FILE}" in out
    # converted onto the tiny backbone: the card of the conversion
    assert main(["info", REF, "--backbone", "test-tiny", "--pretrained", "random"]) == 0
    out = capsys.readouterr().out
    assert "by the authors' code (released file hf-hub:zzhowe/GRMP-IQA/" in out
    assert "trained from ViT-B-16-quickgelu 'openai'" in out
