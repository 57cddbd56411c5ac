"""Baselines of the protocol (method.md 8, 9): CLIP-IQA, CoOp, the linear probe's ridge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close_scaled, make_image

import grmpiqa
from grmpiqa.baselines import (
    RidgeProbe,
    clipiqa_config,
    clipiqa_model,
    coop_finetune_config,
    coop_model_config,
    image_features,
)
from grmpiqa.finetune import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clipiqa_is_antonym_hand_prompts_on_plain_clip():
    cfg = clipiqa_config()
    assert cfg.hand_prompts == ("Good photo.", "Bad photo.") and not cfg.visual_prompts
    m = clipiqa_model("test-tiny", pretrained=None)
    assert m.visual is None and m.prompt_learner is None
    assert not any(m.parameter_groups()[g] for g in ("text_context", "visual_prompts"))


def test_coop_trains_only_the_text_context_without_teacher_or_rule():
    cfg = coop_model_config(grmpiqa.ModelConfig(vpt_tokens=7, hand_prompts=("a", "b")))
    assert cfg.hand_prompts is None and not cfg.visual_prompts and cfg.vpt_tokens == 7
    ft = coop_finetune_config(FinetuneConfig(lam=5.0, lr=0.01))
    assert ft.groups == ("text_context",) and not ft.distill and ft.lam == 0.0
    assert ft.lr == 0.01  # the schedule is kept


def test_image_features_are_the_normalised_tower_embeddings(tmp_path):
    m = grmpiqa.create_model("test-tiny", pretrained=None, visual_prompts=False)
    paths = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    f = image_features(m, paths, batch_size=2)
    assert f.shape == (3, 64) and f.dtype == np.float64
    assert np.allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-6)
    tf = m.preprocess.eval_transform()
    x = torch.stack([tf(grmpiqa.images.load_image(p)) for p in paths])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(m.clip.encode_image(x), dim=-1)
    assert_close_scaled(torch.from_numpy(f), expected, 1e-5, "features")


# --- the linear probe's ridge ------------------------------------------------------------


def test_ridge_recovers_linear_map_with_small_alpha():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 8))
    w = rng.standard_normal(8)
    y = x @ w + 0.5
    probe = RidgeProbe.fit(x, y, seed=0)
    assert probe.alpha == min(probe.alphas)
    assert np.allclose(probe.weights, w, atol=0.02)
    assert probe.bias == pytest.approx(0.5, abs=0.02)
    xt = rng.standard_normal((10, 8))
    assert np.allclose(probe.predict(xt), xt @ w + 0.5, atol=0.05)
    assert len(probe.cv_mse) == 13 and probe.folds == 5


def test_ridge_prefers_strong_regularisation_on_noise_and_is_seeded():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 30))
    y = rng.standard_normal(40)  # unrelated to x
    probe = RidgeProbe.fit(x, y, seed=3)
    assert probe.alpha >= 10.0
    again = RidgeProbe.fit(x, y, seed=3)
    assert again.cv_mse == probe.cv_mse and again.alpha == probe.alpha
    # more features than samples (dual form) works too
    wide = RidgeProbe.fit(rng.standard_normal((12, 64)), rng.random(12), seed=0)
    assert np.isfinite(wide.weights).all()
