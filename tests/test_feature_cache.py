"""The frozen-feature cache of stage 2: exactness against the uncached path (issue 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import grmpiqa
from grmpiqa.feature_cache import (
    ImageTower,
    bank_view,
    build_feature_cache,
    encode_frozen,
    frozen_image_blocks,
    hard_prompt_features,
    quality_text_features,
)
from grmpiqa.finetune import SCENE_PROMPTS, FinetuneConfig, Stage2Step, build_teacher


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """test-tiny's ops are tiny: one thread avoids OpenMP stalls on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)
        out.append(Image.fromarray(arr).resize((244, 244), Image.Resampling.BICUBIC))
    return out


def stage2_model(visual_prompts: bool = True, dropout: float = 0.0) -> grmpiqa.QualityModel:
    cfg = grmpiqa.ModelConfig(
        vpt_tokens=4, vpt_dropout=dropout, finetune_blocks=2, visual_prompts=visual_prompts
    )
    return grmpiqa.create_model("test-tiny", pretrained=None, config=cfg)


@pytest.mark.parametrize("visual_prompts", [True, False])
def test_cached_and_uncached_losses_and_gradients_agree(visual_prompts):
    """Same augmentation, prompt dropout off: same L_q, L_s and gradients (tol 1e-5, fp32)."""
    model = stage2_model(visual_prompts)
    config = FinetuneConfig()
    teacher = build_teacher(model, config.scene_prompts)
    model.set_trainable(config.groups)
    start = frozen_image_blocks(model)
    assert start == 2  # test-tiny has 4 blocks; the last 2 train
    imgs = images(5)
    cache = build_feature_cache(
        model, imgs, start_block=start, augmentations=3, seed=7, teacher=teacher
    )
    assert cache.hidden.shape[:2] == (5, 3) and cache.teacher_logits is not None
    assert cache.teacher_logits.shape == (5, 3, len(SCENE_PROMPTS))
    y = torch.linspace(0.1, 0.9, 5)
    model.train()
    naive = Stage2Step(model, config, teacher, None)
    cached = Stage2Step(model, config, None, start)
    assert cached.fast and not naive.fast
    for view in (0, 2):
        x = torch.stack([bank_view(model, im, 7, i, view) for i, im in enumerate(imgs)])
        lq1, ls1, logits1 = naive.losses(y, pixels=x)
        h, t = cache.batch(range(5), view)
        lq2, ls2, logits2 = cached.losses(y, hidden=h, teacher_logits=t)
        assert ls1 is not None and ls2 is not None
        assert abs(float(lq1.detach()) - float(lq2.detach())) < 1e-5
        assert abs(float(ls1.detach()) - float(ls2.detach())) < 1e-5
        torch.testing.assert_close(logits1, logits2, rtol=0, atol=1e-4)
        g1q, g1s = naive.gradients(lq1, ls1)
        g2q, g2s = cached.gradients(lq2, ls2)
        assert g1s is not None and g2s is not None
        for n, a, b in zip(naive.names, g1q, g2q, strict=True):
            assert a is not None and b is not None, n
            assert float((a - b).abs().max()) < 1e-5, n
        for n, a, b in zip(naive.names, g1s, g2s, strict=True):
            assert (a is None) == (b is None), n
            if a is not None and b is not None:
                assert float((a - b).abs().max()) < 1e-5, n
    # the two views are different augmentations
    assert not torch.equal(cache.hidden[:, 0], cache.hidden[:, 2])


def test_cache_holds_frozen_hidden_states_teacher_logits_and_eval_view():
    model = stage2_model()
    teacher = build_teacher(model)
    model.set_trainable(grmpiqa.STAGE2_GROUPS)
    imgs = images(3, seed=1)
    cache = build_feature_cache(
        model, imgs, start_block=2, augmentations=2, seed=0, teacher=teacher
    )
    x = torch.stack([bank_view(model, im, 0, i, 1) for i, im in enumerate(imgs)])
    torch.testing.assert_close(cache.hidden[:, 1], encode_frozen(model, x, 2))
    assert cache.teacher_logits is not None
    torch.testing.assert_close(cache.teacher_logits[:, 1], teacher(x))
    ev = torch.stack([model.preprocess.eval_transform()(im) for im in imgs])
    torch.testing.assert_close(cache.eval_hidden, encode_frozen(model, ev, 2))
    # scoring from the cached eval view equals the model's own scores
    tower = ImageTower(model)
    with torch.no_grad():
        feats = tower.features_from_hidden(cache.eval_hidden, 2)
        p = torch.softmax(model.logits_from_features(feats, model.quality_text_features()), -1)
        direct = torch.softmax(model.eval()(ev), -1)
    torch.testing.assert_close(p, direct, rtol=0, atol=1e-5)
    assert cache.view_index(1) == 0 and cache.view_index(2) == 1 and cache.view_index(3) == 0
    assert cache.nbytes == 4 * (cache.hidden.numel() + cache.eval_hidden.numel()) + 4 * 3 * 2 * 9
    # the bank is a pure function of (seed, image, view)
    again = build_feature_cache(model, imgs, start_block=2, augmentations=2, seed=0)
    assert torch.equal(again.hidden, cache.hidden) and again.teacher_logits is None
    other = build_feature_cache(model, imgs, start_block=2, augmentations=2, seed=1)
    assert not torch.equal(other.hidden, cache.hidden)


def test_bf16_cache_is_stored_in_bf16():
    model = stage2_model()
    model.set_trainable(grmpiqa.STAGE2_GROUPS)
    cache = build_feature_cache(
        model, images(2), start_block=2, augmentations=2, seed=0, precision="bf16"
    )
    assert cache.hidden.dtype == torch.bfloat16 and cache.eval_hidden.dtype == torch.bfloat16
    full = build_feature_cache(model, images(2), start_block=2, augmentations=2, seed=0)
    assert cache.nbytes * 2 == full.nbytes
    torch.testing.assert_close(cache.hidden.float(), full.hidden, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("deep_layers", [None, 1])
def test_fast_path_equals_the_plain_blocks_and_text_tower(deep_layers):
    """Compact hidden states, CLS-only last block, direct attention, truncated text."""
    cfg = grmpiqa.ModelConfig(vpt_tokens=4, finetune_blocks=2, vpt_deep_layers=deep_layers)
    model = grmpiqa.create_model("test-tiny", pretrained=None, config=cfg)
    tower = ImageTower(model)
    assert tower.fast_ok(1)
    # VPT-deep in every block: prompt rows are dropped from the cache (49 patches + CLS)
    assert tower.is_compact(1) == (deep_layers is None)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        for start in (1, 3):
            h = encode_frozen(model, x, start)
            assert h.shape[1] == (50 if deep_layers is None else 54)
            plain = tower.features_from_hidden(h, start, fast=False)
            fast = tower.features_from_hidden(h, start, fast=True)
            torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)
            torch.testing.assert_close(plain, model.encode_image(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            quality_text_features(model), model.quality_text_features(), rtol=0, atol=1e-6
        )
        tokens = model.tokenizer(list(SCENE_PROMPTS))
        torch.testing.assert_close(
            hard_prompt_features(model, tokens), model.encode_text(SCENE_PROMPTS), rtol=0, atol=1e-6
        )
    plain_model = stage2_model(visual_prompts=False)
    with torch.no_grad():
        h = encode_frozen(plain_model, x, 3)
        torch.testing.assert_close(
            ImageTower(plain_model).features_from_hidden(h, 3),
            plain_model.encode_image(x),
            rtol=0,
            atol=1e-6,
        )


def test_frozen_boundary_follows_the_trainable_groups():
    model = stage2_model()
    assert frozen_image_blocks(model) == 4  # nothing trains: the whole tower is frozen
    model.set_trainable(("text_context",))  # CoOp
    assert frozen_image_blocks(model) == 4
    model.set_trainable(grmpiqa.STAGE2_GROUPS)
    assert frozen_image_blocks(model) == 2
    model.set_trainable(grmpiqa.STAGE1_GROUPS)  # visual prompts train: nothing cacheable
    assert frozen_image_blocks(model) is None
