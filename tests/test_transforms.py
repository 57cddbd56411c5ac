"""The released transforms (method.md 6, 7) and the preprocessing record of checkpoints."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from grmpiqa.transforms import (
    CLIP_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    ResizeCropNormalize,
    stage1_query_transform,
    stage1_support_transform,
    stats_for,
)


def gradient_image(w: int = 300, h: int = 200) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1)
    return Image.fromarray(arr.astype(np.uint8))


def test_eval_transform_is_resize_244_centre_224_imagenet():
    img = gradient_image()
    x = PreprocessConfig().eval_transform()(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    resized = np.asarray(img.resize((244, 244), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    crop = resized[10:234, 10:234]  # the released centre crop
    expected = (crop - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-5)


def test_train_transform_is_seeded_random_crop_and_flip():
    img = gradient_image()
    cfg = PreprocessConfig()
    a = ResizeCropNormalize(cfg, train=True, generator=random.Random(3))(img)
    b = ResizeCropNormalize(cfg, train=True, generator=random.Random(3))(img)
    assert torch.equal(a, b)
    seen = {
        tuple(
            ResizeCropNormalize(cfg, train=True, generator=random.Random(s))(img)[:, 0, 0].tolist()
        )
        for s in range(12)
    }
    assert len(seen) > 3  # offsets and flips vary with the seed
    # every crop is a 224 window of the 244 resize (offsets in [0, 20))
    big = ResizeCropNormalize(cfg, train=False)(img)
    assert a.shape == big.shape == (3, 224, 224)


def test_tensor_preprocessing_matches_the_pil_path_closely():
    img = gradient_image()
    cfg = PreprocessConfig()
    pil = cfg.eval_transform()(img)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ten = cfg.preprocess_tensor(t)[0]
    # torchvision's antialiased bicubic and PIL's differ by interpolation rounding only
    assert float((ten - pil).abs().mean()) < 0.02
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        cfg.preprocess_tensor(torch.zeros(3, 10, 10))


def test_stage1_transforms_are_the_released_ones():
    img = gradient_image()
    s = stage1_support_transform("imagenet", random.Random(0))(img)
    q = stage1_query_transform("imagenet")(img)
    assert s.shape == q.shape == (3, 224, 224)
    again = stage1_support_transform("imagenet", random.Random(0))(img)
    assert torch.equal(s, again)
    resized = np.asarray(img.resize((224, 224), Image.Resampling.BILINEAR), np.float32) / 255
    expected = (resized - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(q.permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-5)


def test_config_round_trip_and_validation():
    cfg = PreprocessConfig(resize=256, crop=224, interpolation="bilinear", stats="clip")
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.mean == CLIP_MEAN and stats_for("imagenet")[0] == IMAGENET_MEAN
    with pytest.raises(ValueError, match="crop"):
        PreprocessConfig(resize=200, crop=224)
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig(interpolation="lanczos9")
    with pytest.raises(ValueError, match="statistics"):
        PreprocessConfig(stats="nonsense")
