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


# -- issue 18: the format allowlist, content sniffing, decoded-size budgets ------------------

_PS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (_PS, "PostScript"),
        (b"\xc5\xd0\xd3\xc6" + bytes(40), "EPS"),
        (b"%PDF-1.4\n", "PDF"),
        (b"8BPS\x00\x01" + bytes(30), "Photoshop PSD"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(20), "JPEG 2000"),
        (b"\x00\x00\x01\x00\x01\x00" + bytes(40), "unrecognised format"),  # an ICO
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
    ],
)
def test_content_outside_the_allowlist_is_refused_whatever_its_name(tmp_path, content, what):
    from grmpiqa.errors import NotAnImageError
    from grmpiqa.images import load_image_bytes, probe_image

    for name in ("x.jpg", "x.png", "x.eps"):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(NotAnImageError, match=f"{name}: not an image file .*{what}"):
            load_image(p)
        with pytest.raises(NotAnImageError, match=what):
            probe_image(p)
    with pytest.raises(NotAnImageError, match="accepted: JPEG, PNG"):
        load_image_bytes(content, "upload")


def test_every_allowed_format_is_sniffed_and_decoded(tmp_path):
    from grmpiqa.images import ALLOWED_FORMATS, sniff_format

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), np.uint8))
    for fmt in ALLOWED_FORMATS:
        p = tmp_path / "wrong-name.jpg"  # the name does not matter, the content does
        img.save(p, format=fmt)
        assert sniff_format(p.read_bytes()[:16]) == fmt
        assert load_image(p).size == (16, 12)


def test_allowlisted_decode_never_reaches_another_plugin(tmp_path, monkeypatch):
    """Even a file starting like PNG is opened by the PNG plugin only (formats=[...])."""
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: calls.append(1) or True)
    p = tmp_path / "a.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _PS)
    with pytest.raises(ImageError):
        load_image(p)
    p.write_bytes(_PS)
    with pytest.raises(ImageError):
        load_image(p)
    assert calls == []


def test_decoded_bytes_counts_bit_depth_and_channels():
    import io
    import zlib

    from grmpiqa.images import probe_image

    def png(arr, mode=None):
        buf = io.BytesIO()
        Image.fromarray(arr, mode).save(buf, "PNG") if mode else Image.fromarray(arr).save(
            buf, "PNG"
        )
        return buf.getvalue()

    assert probe_image(png(np.zeros((10, 20), np.uint8))).decoded_bytes == 200
    assert probe_image(png(np.zeros((10, 20, 3), np.uint8))).decoded_bytes == 600
    assert probe_image(png(np.zeros((10, 20, 4), np.uint8))).decoded_bytes == 800
    assert probe_image(png(np.zeros((10, 20), np.uint16))).decoded_bytes == 400
    # a 16-bit RGB PNG (Pillow reads it as RGB;16B): 2 bytes a sample
    ihdr = (20).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    rows = zlib.compress(bytes(10 * (1 + 20 * 6)))
    raw = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows)
    raw += _chunk(b"IEND", b"")
    assert probe_image(raw).decoded_bytes == 20 * 10 * 3 * 2


def _chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def test_max_decoded_bytes_refuses_before_decoding(tmp_path):
    from grmpiqa.errors import ImageTooLargeError

    p = _save(tmp_path, "d16.png", Image.fromarray(np.zeros((100, 100), np.uint16)))
    assert load_image(p, max_decoded_bytes=20_000).size == (100, 100)
    with pytest.raises(ImageTooLargeError, match=r"d16.png: image too large to decode .*I;16"):
        load_image(p, max_decoded_bytes=19_999)


def test_split_by_budget_keeps_order_and_budget():
    from grmpiqa.images import split_by_budget

    costs = [5, 1, 4, 10, 2, 2, 7]
    groups = split_by_budget(costs, 6)
    assert [i for g in groups for i in g] == list(range(len(costs)))
    for g in groups:
        assert len(g) == 1 or sum(costs[i] for i in g) <= 6
    assert split_by_budget([], 6) == []


def test_16_bit_to_8_bit_is_exact_rounding():
    arr = np.arange(0, 65536, dtype=np.uint16).reshape(256, 256)
    out = np.asarray(load_image_from(arr))[..., 0]
    expect = np.clip(np.round(arr.astype(np.float64) * (255.0 / 65535.0)), 0, 255)
    assert np.array_equal(out, expect.astype(np.uint8))


def load_image_from(arr):
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    from grmpiqa.images import load_image_bytes

    return load_image_bytes(buf.getvalue(), "x")
