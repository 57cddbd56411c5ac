"""The frozen-feature cache of stage 2: exactness against the uncached path (issue 6)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_scaled, random_pil_images

import grmpiqa
from grmpiqa.feature_cache import (
    bank_view,
    build_feature_cache,
    encode_frozen,
    frozen_image_blocks,
)
from grmpiqa.finetune import (
    SCENE_PROMPTS,
    FinetuneConfig,
    ShotBatch,
    Stage2Step,
    build_teacher,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def stage2_model(visual_prompts: bool = True, dropout: float = 0.0) -> grmpiqa.QualityModel:
    cfg = grmpiqa.ModelConfig(
        vpt_tokens=4, vpt_dropout=dropout, finetune_blocks=2, visual_prompts=visual_prompts
    )
    return grmpiqa.create_model("test-tiny", pretrained=None, config=cfg)


@pytest.mark.parametrize("visual_prompts", [True, False])
def test_cached_and_uncached_losses_and_gradients_agree(visual_prompts):
    """Same augmentation, prompt dropout off: same L_q, L_s and gradients, up to fp32
    rounding relative to each tensor's magnitude."""
    model = stage2_model(visual_prompts)
    config = FinetuneConfig()
    teacher = build_teacher(model, config.scene_prompts)
    model.set_trainable(config.groups)
    start = frozen_image_blocks(model)
    assert start == 2  # test-tiny has 4 blocks; the last 2 train
    imgs = random_pil_images(5)
    cache = build_feature_cache(
        model, imgs, start_block=start, augmentations=3, seed=7, teacher=teacher
    )
    assert cache.hidden.shape[:2] == (5, 3) and cache.teacher_logits is not None
    assert cache.teacher_logits.shape == (5, 3, len(SCENE_PROMPTS))
    y = torch.linspace(0.1, 0.9, 5)
    model.train()
    step = Stage2Step(model, config)
    for view in (0, 2):
        x = torch.stack([bank_view(model, im, 7, i, view) for i, im in enumerate(imgs)])
        naive = ShotBatch(y, model.encode_image(x), teacher(x))
        h, t = cache.batch(range(5), view)
        cached = ShotBatch(
            y, grmpiqa.prompts.l2_normalize(model.image_tower.forward_from(h, start)), t
        )
        lq1, ls1, logits1 = step.losses(naive)
        lq2, ls2, logits2 = step.losses(cached)
        assert ls1 is not None and ls2 is not None
        assert_close_scaled(lq2, lq1, 1e-5, "L_q")
        assert_close_scaled(ls2, ls1, 1e-5, "L_s")
        assert_close_scaled(logits2, logits1, 1e-5, "logits")
        g1q, g1s = step.gradients(lq1, ls1)
        g2q, g2s = step.gradients(lq2, ls2)
        assert g1s is not None and g2s is not None
        # rounding scales with the whole backward pass, not with each tensor: without
        # visual prompts the student equals the teacher and g_s is ~0 (pure rounding)
        scale = max(float(a.abs().max()) for a in [*g1q, *g1s] if a is not None)
        for g1, g2 in ((g1q, g2q), (g1s, g2s)):
            for n, a, b in zip(step.names, g1, g2, strict=True):
                assert (a is None) == (b is None), n
                if a is not None and b is not None:
                    assert_close_scaled(b, a, 1e-4, n, scale=scale)
    # the two views are different augmentations
    assert not torch.equal(cache.hidden[:, 0], cache.hidden[:, 2])


def test_cache_holds_frozen_hidden_states_teacher_logits_and_eval_view():
    model = stage2_model()
    teacher = build_teacher(model)
    model.set_trainable(grmpiqa.STAGE2_GROUPS)
    imgs = random_pil_images(3, seed=1)
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
    with torch.no_grad():
        feats = grmpiqa.prompts.l2_normalize(model.image_tower.forward_from(cache.eval_hidden, 2))
        p = torch.softmax(model.logits_from_features(feats, model.quality_text_features()), -1)
        direct = torch.softmax(model.eval()(ev), -1)
    assert_close_scaled(p, direct, 1e-5, "probabilities")
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
    imgs = random_pil_images(2)
    cache = build_feature_cache(
        model, imgs, start_block=2, augmentations=2, seed=0, precision="bf16"
    )
    assert cache.hidden.dtype == torch.bfloat16 and cache.eval_hidden.dtype == torch.bfloat16
    full = build_feature_cache(model, imgs, start_block=2, augmentations=2, seed=0)
    assert cache.nbytes * 2 == full.nbytes
    # bf16 matmuls (8-bit mantissa) and bf16 storage: a few percent of the magnitude
    assert_close_scaled(cache.hidden.float(), full.hidden, 0.05, "bf16 hidden")


def test_compact_cache_drops_the_prompt_rows():
    model = stage2_model()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    h = encode_frozen(model, x, 2)
    assert h.shape[1] == 1 + 49  # CLS + 7x7 patches: block 2 replaces the 4 prompt rows


def test_frozen_boundary_follows_the_trainable_groups():
    model = stage2_model()
    assert frozen_image_blocks(model) == 4  # nothing trains: the whole tower is frozen
    model.set_trainable(("text_context",))  # CoOp
    assert frozen_image_blocks(model) == 4
    model.set_trainable(grmpiqa.STAGE2_GROUPS)
    assert frozen_image_blocks(model) == 2
    model.set_trainable(grmpiqa.STAGE1_GROUPS)  # visual prompts train: nothing cacheable
    assert frozen_image_blocks(model) is None
