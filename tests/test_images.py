"""Image decoding: modes, EXIF orientation, size limit, corrupt files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from grmpiqa.errors import ImageError
from grmpiqa.images import load_image


def _save(tmp_path, name, img, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


def test_grayscale_and_palette_become_rgb(tmp_path):
    g = _save(tmp_path, "g.png", Image.new("L", (8, 6), 100))
    out = load_image(g)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (100, 100, 100)
    p = _save(tmp_path, "p.gif", Image.new("RGB", (8, 6), (10, 200, 30)).convert("P"))
    assert load_image(p).mode == "RGB"


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    out = load_image(_save(tmp_path, "a.png", img))
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((1, 1)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    p = _save(tmp_path, "c.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    r, g, b = load_image(p).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_scaled_to_8_bit(tmp_path):
    arr = np.full((6, 5), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    arr[1, 1] = 32896  # 128 * 257
    p = _save(tmp_path, "d.png", Image.fromarray(arr))
    assert Image.open(p).mode.startswith("I")
    out = load_image(p)
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((1, 1)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = _save(tmp_path, "o.jpg", img, exif=exif)
    assert load_image(p).size == (10, 20)


def test_pixel_limit(tmp_path):
    p = _save(tmp_path, "big.png", Image.new("RGB", (200, 100)))
    with pytest.raises(ImageError, match=r"big.png: image too large \(200x100"):
        load_image(p, max_pixels=10_000)


def test_truncated_and_non_image_files(tmp_path):
    good = _save(
        tmp_path,
        "t.jpg",
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)),
    )
    data = good.read_bytes()
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="trunc.jpg: cannot decode image"):
        load_image(trunc)
    txt = tmp_path / "notes.jpg"
    txt.write_text("hello")
    with pytest.raises(ImageError, match="notes.jpg: not an image file"):
        load_image(txt)
    with pytest.raises(ImageError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")


def test_large_jpeg_decodes_at_reduced_scale_when_allowed(tmp_path):
    from grmpiqa.transforms import PreprocessConfig

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    big = small.resize((2400, 1800), Image.Resampling.BICUBIC)
    path = tmp_path / "big.jpg"
    big.save(path, quality=95)
    full = load_image(path)
    reduced = load_image(path, min_side=488)
    assert full.size == (2400, 1800)
    assert min(reduced.size) >= 488 and reduced.size[0] < 2400  # the DCT scaled it down
    # after the eval transform the inputs barely differ (both are resized to 244 px)
    tf = PreprocessConfig().eval_transform()
    diff = (tf(full) - tf(reduced)).abs()
    assert float(diff.mean()) < 0.02
    # PNGs and small JPEGs decode in full
    png = tmp_path / "big.png"
    big.save(png)
    assert load_image(png, min_side=488).size == (2400, 1800)
    assert load_image(path, min_side=1000).size == (2400, 1800)
