"""Checkpoints and backbones from the Hugging Face Hub (``hf-hub:``), offline, from a local
Hub cache in the standard layout (issue 20, item 1; the real Hub is never reached)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image
from test_checkpoint import _released_state_dict

import grmpiqa
from grmpiqa.checkpoint import read_checkpoint
from grmpiqa.cli import main
from grmpiqa.hub import blob_id, parse_hub_ref, snapshot_revision

REPO = "zzhowe/GRMP-IQA"
FILE = "clive_50_prompt_lda_5.0.pt"
REF = f"hf-hub:{REPO}/{FILE}"


def hub_cache_add(
    root: Path, repo: str, files: dict[str, bytes], commit: str, ref: str = "main"
) -> Path:
    """Add a snapshot of ``repo`` to a Hub cache in the layout huggingface_hub writes:
    ``models--OWNER--NAME/{blobs/SHA256, snapshots/COMMIT/FILE -> ../../blobs/SHA256,
    refs/REF}``. Returns the snapshot folder."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        blob = base / "blobs" / sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache, the Hub offline, and grmpiqa's conversion cache in tmp."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GRMPIQA_CACHE", str(tmp_path / "grmpiqa-cache"))
    return cache


def _released_bytes(tmp_path: Path, seed: int = 0) -> bytes:
    src = tmp_path / f"released-{seed}.pt"
    sd = _released_state_dict(seed=0)
    if seed:  # another upstream version: other prompts
        key = "module.prompt_learner2.ctx"
        sd["state_dict"][key] = sd["state_dict"][key] + 0.1 * seed
    torch.save(sd, src)
    return src.read_bytes()


def _scores(path: Path) -> list[float]:
    with open(path) as fh:
        return [float(r["score"]) for r in csv.DictReader(fh)]


def test_parse_refs():
    assert parse_hub_ref(REF).repo_id == REPO and parse_hub_ref(REF).filename == FILE
    r = parse_hub_ref("hf-hub:me/x@v2/sub/m.safetensors")
    assert (r.repo_id, r.revision, r.filename) == ("me/x", "v2", "sub/m.safetensors")
    for bad in ("hf-hub:onlyowner", "hf-hub:me/x", "hf-hub:me/../x/f", "hf-hub:/x/f"):
        with pytest.raises(grmpiqa.GrmpiqaError):
            parse_hub_ref(bad)


def test_released_file_on_the_hub_scores_offline_and_converts_once(tmp_path, offline_hub, capsys):
    data = _released_bytes(tmp_path)
    snap = hub_cache_add(offline_hub, REPO, {FILE: data}, "a" * 40)
    assert blob_id(snap / FILE) == hashlib.sha256(data).hexdigest()
    assert snapshot_revision(snap / FILE) == "a" * 40
    images = [make_image(tmp_path / "imgs" / f"{i}.png", seed=i) for i in range(3)]
    flags = ["--backbone", "test-tiny", "--pretrained", "random", "--no-progress"]
    flags += ["--precision", "fp32"]  # compared with the API's fp32 scores below
    out = tmp_path / "s.csv"
    rc = main(["score", "--checkpoint", REF, *flags, "-o", str(out), *map(str, images)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "converting the released file" in err
    got = _scores(out)
    # the same numbers as converting the file by hand and scoring it
    ref_ckpt = grmpiqa.import_released(
        snap / FILE, tmp_path / "by-hand.safetensors", backbone="test-tiny", pretrained=None
    )
    want = grmpiqa.create_model(checkpoint=ref_ckpt).score([str(p) for p in images])
    np.testing.assert_allclose(got, want.numpy(), atol=2e-6)
    # converted once: the cache entry records where it came from, never a host path
    entries = list((tmp_path / "grmpiqa-cache" / "released").glob("*.safetensors"))
    assert len(entries) == 1
    meta = grmpiqa.read_metadata(entries[0])
    src = meta["extra"]["source"]
    assert src["hf_hub"] == REPO and src["filename"] == FILE and src["revision"] == "a" * 40
    assert src["content_id"] == hashlib.sha256(data).hexdigest()
    assert meta["extra"]["released_for"] == {
        "backbone": "ViT-B-16-quickgelu",
        "pretrained": "openai",
    }
    assert str(tmp_path) not in json.dumps(meta)
    rc = main(["score", "--checkpoint", REF, *flags, "-o", str(out), *map(str, images)])
    assert rc == 0
    assert "converting" not in capsys.readouterr().err  # the cached conversion is reused
    # a changed upstream file (a new commit on main) is converted again
    hub_cache_add(offline_hub, REPO, {FILE: _released_bytes(tmp_path, seed=1)}, "b" * 40)
    rc = main(["score", "--checkpoint", REF, *flags, "-o", str(out), *map(str, images)])
    assert rc == 0 and "converting the released file" in capsys.readouterr().err
    entries2 = list((tmp_path / "grmpiqa-cache" / "released").glob("*.safetensors"))
    assert len(entries2) == 2
    (new,) = set(entries2) - set(entries)
    assert grmpiqa.read_metadata(new)["extra"]["source"]["revision"] == "b" * 40
    ctx = "prompt_learner.ctx"
    diff = read_checkpoint(new)[0][ctx] - read_checkpoint(entries[0])[0][ctx]
    torch.testing.assert_close(diff, torch.full_like(diff, 0.1))  # the new upstream prompts
    # the model card names the reference
    model = grmpiqa.create_model(checkpoint=REF, backbone="test-tiny", pretrained=None)
    assert model.checkpoint_ref == REF and REF in model.describe()


def test_missing_from_the_cache_offline_is_one_line(tmp_path, offline_hub, capsys):
    img = make_image(tmp_path / "a.png")
    rc = main(["score", "--checkpoint", REF, "--no-progress", str(img)])
    err = capsys.readouterr().err
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"grmpiqa: error: {REF}: not in the Hugging Face cache")
    assert f"https://huggingface.co/{REPO}/resolve/main/{FILE}" in lines[0]
    assert "--checkpoint FILE" in lines[0] and str(offline_hub) in lines[0]
    with pytest.raises(grmpiqa.GrmpiqaError, match="checkpoint='FILE'") as info:
        grmpiqa.create_model(checkpoint=REF)
    assert "--checkpoint" not in str(info.value)  # API errors name API arguments


def test_released_file_without_its_base_weights_is_one_line(tmp_path, offline_hub, capsys):
    hub_cache_add(offline_hub, REPO, {FILE: _released_bytes(tmp_path)}, "c" * 40)
    img = make_image(tmp_path / "a.png")
    rc = main(["score", "--checkpoint", REF, "--no-progress", str(img)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "needs its base weights, ViT-B-16-quickgelu 'openai'" in err[0]
    assert "--pretrained FILE" in err[0]
    with pytest.raises(grmpiqa.GrmpiqaError, match="pretrained='FILE'"):
        grmpiqa.create_model(checkpoint=REF)


def test_grmpiqa_checkpoint_on_the_hub_and_import_released(tmp_path, offline_hub, capsys):
    from conftest import TINY_CONFIG

    model = grmpiqa.create_model("test-tiny", pretrained=None, config=TINY_CONFIG, seed=3)
    ckpt = grmpiqa.save_checkpoint(model, tmp_path / "mine.safetensors")
    hub_cache_add(offline_hub, "me/scorer", {"model.safetensors": ckpt.read_bytes()}, "d" * 40)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    loaded = grmpiqa.create_model(checkpoint="hf-hub:me/scorer/model.safetensors")
    torch.testing.assert_close(loaded.score(x), model.score(x))
    assert loaded.prompt_origin == "checkpoint"
    # import-released reads hf-hub: references too
    hub_cache_add(offline_hub, REPO, {FILE: _released_bytes(tmp_path)}, "e" * 40)
    out = tmp_path / "imp.safetensors"
    rc = main(
        [
            "import-released",
            REF,
            "--out",
            str(out),
            "--backbone",
            "test-tiny",
            "--pretrained",
            "random",
        ]
    )
    assert rc == 0 and out.is_file()
    assert grmpiqa.read_metadata(out)["extra"]["source"]["hf_hub"] == REPO


def test_hf_hub_backbone_from_the_cache_and_offline_error(tmp_path, offline_hub, capsys):
    from safetensors.torch import save_file

    from grmpiqa.backbone import load_backbone, model_config

    img = make_image(tmp_path / "a.png")
    rc = main(["score", "--backbone", "hf-hub:me/tiny-clip", "--no-progress", str(img)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "open_clip_config.json" in err[0] and "--backbone local-dir:FOLDER" in err[0]
    # an open_clip repository in the cache loads offline (as a local-dir: folder, which
    # open_clip reads from 3.x on; CI also runs these tests against the lowest open_clip)
    import open_clip

    if not hasattr(open_clip.factory, "LOCAL_DIR_PREFIX"):
        pytest.skip(f"open_clip {open_clip.__version__} has no local-dir: models")
    tiny = load_backbone("test-tiny", None, seed=5)
    cfg = json.dumps({"model_cfg": model_config("test-tiny")}).encode()
    save_file(tiny.clip.state_dict(), str(tmp_path / "w.safetensors"))
    hub_cache_add(
        offline_hub,
        "me/tiny-clip",
        {
            "open_clip_config.json": cfg,
            "open_clip_model.safetensors": (tmp_path / "w.safetensors").read_bytes(),
        },
        "f" * 40,
    )
    bb = load_backbone("hf-hub:me/tiny-clip")
    assert bb.pretrained == {"kind": "hf-hub", "repo": "me/tiny-clip", "revision": "f" * 40}
    for k, v in tiny.clip.state_dict().items():
        torch.testing.assert_close(bb.clip.state_dict()[k], v)
