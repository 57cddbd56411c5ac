"""Stage 1 at GPU speed (issue 21): several tasks' prompt copies in one forward pass
(grmpiqa.task_batch), and the device-side image views of both stages."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import make_image
from PIL import Image
from test_metatrain import _make_kadid

import grmpiqa
from grmpiqa.checkpoint import read_checkpoint
from grmpiqa.errors import GrmpiqaError
from grmpiqa.feature_cache import bank_view, bank_view_tensor, eval_view_tensor
from grmpiqa.losses import quality_loss
from grmpiqa.metatrain import PretrainConfig, _query_view, _support_view, _ViewSpec, pretrain
from grmpiqa.task_batch import StackedQualityModel, task_quality_losses
from grmpiqa.transforms import stage1_query_transform, stage1_support_transform

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = grmpiqa.ModelConfig(vpt_tokens=4)


def _model() -> grmpiqa.QualityModel:
    return grmpiqa.create_model("test-tiny", pretrained=None, config=TINY)


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1)


def test_device_views_are_the_pil_transforms_bit_for_bit(tmp_path):
    """The crops, flips and normalisation cut from uint8 tensors (stage-2 bank, eval view,
    stage-1 support/query) equal the PIL transforms exactly, draw for draw."""
    img = Image.open(make_image(tmp_path / "a.png", size=(300, 260), seed=4)).convert("RGB")
    model = _model()
    c = model.preprocess
    resized = img.resize((c.resize, c.resize), Image.Resampling.BICUBIC)
    px = _pixels(resized)
    for view in range(6):
        assert torch.equal(
            bank_view_tensor(c, px, 3, 7, view), bank_view(model, resized, 3, 7, view)
        )
    assert torch.equal(eval_view_tensor(c, px), c.eval_transform()(resized))
    for size in (224, 192):  # ViT-B/16's input, and another backbone's
        spec = _ViewSpec([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], size)
        big = img.resize((spec.big, spec.big), Image.Resampling.BILINEAR)
        small = img.resize((size, size), Image.Resampling.BILINEAR)
        for seed in range(4):
            pil = stage1_support_transform("imagenet", random.Random(seed), size)(big)
            assert torch.equal(_support_view(_pixels(big), random.Random(seed), spec), pil)
        query = stage1_query_transform("imagenet", size)(small)
        assert torch.equal(_query_view(_pixels(small), spec), query)


def test_stacked_forward_equals_each_tasks_serial_forward():
    """Three different prompt copies, train-mode dropout: the stacked logits and losses
    are each copy's serial ones (same dropout masks on the CPU), to float rounding."""
    model = _model()
    model.set_trainable(grmpiqa.STAGE1_GROUPS)
    params = model.trainable_parameters()
    g = torch.Generator().manual_seed(0)
    copies = [
        {n: p.detach() + 0.05 * k * torch.randn(p.shape, generator=g) for n, p in params.items()}
        for k in range(3)
    ]
    stacked = {n: torch.stack([c[n] for c in copies]) for n in params}
    x = torch.randn(3 * 4, 3, 224, 224, generator=g)
    y = torch.rand(3, 4, generator=g)
    seeds = [11, 12, 13]
    model.train()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        logits = StackedQualityModel(model).logits(stacked, x, gens)
        losses = task_quality_losses(logits, y)
    for k in range(3):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(copies[k][n])
        torch.manual_seed(seeds[k])
        with torch.no_grad():
            serial = model(x[4 * k : 4 * (k + 1)])
        torch.testing.assert_close(logits[k], serial, rtol=1e-5, atol=1e-5)
        assert float(losses[k]) == pytest.approx(float(quality_loss(serial, y[k])), abs=1e-6)
    assert not torch.allclose(logits[0], logits[1])  # the copies really differ


def test_batched_stage1_equals_the_serial_loop_within_tolerance(tmp_path):
    """Two epochs of the default reptile on 4 task types, their tasks adapted 4 at once
    vs one by one: the saved prompts agree to 1e-3 of how far they moved (measured
    1.5e-5: matrix products over 4x the rows round differently), the logged task losses
    to 1e-5. The released chain refuses to be batched."""
    spec = "kadid:" + str(_make_kadid(tmp_path / "k", refs=2, types=4))
    saved = {}
    logs = {}
    for tb in (1, 4):
        cfg = PretrainConfig(epochs=2, task_batch=tb, support_batch=4, query_batch=2)
        out = tmp_path / f"tb{tb}.safetensors"
        r = pretrain(_model(), [spec], cfg, out, progress=False)
        saved[tb], logs[tb] = read_checkpoint(out)[0], r.history
    start = _model().state_dict()
    for n, serial in saved[1].items():
        moved = float((serial - start[n]).norm())
        assert moved > 0, n
        assert float((saved[4][n] - serial).norm()) <= 1e-3 * moved, n
    for a, b in zip(logs[1], logs[4], strict=True):
        assert a["support_loss"] == pytest.approx(b["support_loss"], abs=1e-5)
        assert a["query_loss"] == pytest.approx(b["query_loss"], abs=1e-5)
    with pytest.raises(GrmpiqaError, match="released.*--task-batch 1"):
        pretrain(
            _model(), [spec], PretrainConfig(variant="released", task_batch=2),
            tmp_path / "r.safetensors", progress=False,
        )  # fmt: skip
    assert Path(tmp_path / "r.safetensors").exists() is False
