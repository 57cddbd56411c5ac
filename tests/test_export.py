"""``grmpiqa export CKPT --format onnx``: the whole scorer in onnxruntime (issue 20, item 11)."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest
import torch

import grmpiqa
from grmpiqa.cli import main

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_file(finetuned_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(finetuned_ckpt), "--format", "onnx", "--out", str(out)]) == 0
    return out


def test_onnx_scorer_matches_torch_with_a_dynamic_batch(finetuned_ckpt, onnx_file):
    from grmpiqa.export import check_onnx

    out = onnx_file
    model = grmpiqa.create_model(checkpoint=finetuned_ckpt)
    assert check_onnx(model, out) <= 1e-4  # what the CLI prints after exporting
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    # real images through the documented preprocessing, any batch size
    images = torch.rand(5, 3, 300, 260, generator=torch.Generator().manual_seed(2))
    x = model.preprocess.preprocess_tensor(images)
    want = model.score(images).numpy()
    for n in (1, 5):
        got = session.run(["p"], {"image": x[:n].numpy()})[0]
        assert got.shape == (n,) and got.dtype == np.float32
        assert np.abs(got - want[:n]).max() <= 1e-4
    meta = session.get_modelmeta().custom_metadata_map
    pre = json.loads(meta["grmpiqa.preprocess"])
    assert (pre["resize"], pre["crop"]) == (244, 224) and len(pre["mean"]) == 3
    assert json.loads(meta["grmpiqa.scale"])["map"]["kind"]
    assert json.loads(meta["grmpiqa.weights"]) == {"kind": "random", "seed": 0}


def test_export_without_onnx_is_one_line_naming_the_extra(
    finetuned_ckpt, tmp_path, monkeypatch, capsys
):
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxscript"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    rc = main(["export", str(finetuned_ckpt), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert "pip install 'grmpiqa[onnx]'" in err[0]
    assert not (tmp_path / "m.onnx").exists()


def test_the_documented_onnxruntime_scorer_gives_grmpiqas_scores(
    finetuned_ckpt, onnx_file, tmp_path, monkeypatch
):
    """docs/export.md's 10-line scorer, run as written, on two image files."""
    import re
    from pathlib import Path

    from conftest import make_image

    doc = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    block = doc.split("## A 10-line onnxruntime scorer", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    files = [
        make_image(tmp_path / n, size=(120, 90), seed=i) for i, n in enumerate(("a.png", "b.png"))
    ]
    (tmp_path / "model.onnx").write_bytes(onnx_file.read_bytes())
    scope: dict = {}
    exec(compile(code, "docs/export.md", "exec"), scope)
    want = grmpiqa.create_model(checkpoint=finetuned_ckpt).score([str(f) for f in files])
    assert np.abs(scope["p"] - want.numpy()).max() <= 1e-4
