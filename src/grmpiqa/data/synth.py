"""KADID-style distortion synthesis: stage-1 tasks from any pristine photos (method.md 6).

The 25 distortion types of KADID-10k, in KADID's order (type ids 01..25), each at 5
increasing severities, written in KADID-10k's own layout so that ``kadid:OUT`` reads it
unchanged::

    OUT/images/I{ref:02d}.png                 the pristine references (re-encoded PNG)
    OUT/images/I{ref:02d}_{type:02d}_{level:02d}.png
    OUT/dmos.csv                              dist_img,ref_img,dmos,var
    OUT/synth.json                            what produced it (seed, types, parameters)

The implementations follow the KADID-10k descriptions with library primitives (Pillow
codecs, filters and colour conversions, scipy.ndimage/scipy.signal, numpy); they are
KADID-*style*, not bit-exact reproductions of the original MATLAB code.

Label formula (documented in docs/datasets.md): ``dmos = 5 - 4 * level / levels`` on
KADID's 1..5 scale (higher is better): the pristine image would be 5, level 1 of 5 is
4.2, level 5 is 1.0. ``var`` is left empty (there are no opinion scores).

Severity is monotonic: for every type, PSNR against the reference falls strictly from
level 1 to level 5, averaged over the Kodak images (tested). Randomness is drawn from
``numpy.random.default_rng([seed, ref, type_id])``, the *same* stream for every level of
an (image, type) pair ("common random numbers"): a level-3 noise field is the level-2
field scaled up, a level-3 patch set contains the level-2 patches. That makes severity
monotonic per image, not just on average, and the output a pure function of
(seed, image, type, level): independent of ``workers`` and of the run order.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from scipy import ndimage, signal

from grmpiqa.errors import GrmpiqaError, ImageError
from grmpiqa.images import is_image_file, load_image
from grmpiqa.utils import atomic_open, atomic_path

__all__ = [
    "DISTORTIONS",
    "TYPE_IDS",
    "TYPE_NAMES",
    "SynthResult",
    "apply_distortion",
    "dmos_for_level",
    "psnr",
    "resolve_types",
    "synthesize",
]

Array = np.ndarray


class Distortion(Protocol):
    """``fn(img_uint8 [H, W, 3], level, rng, levels=5) -> uint8 [H, W, 3]``."""

    def __call__(
        self, img: Array, level: int, rng: np.random.Generator, levels: int = 5
    ) -> Array: ...


#: The 25 KADID-10k types in KADID's order; type id = position + 1.
TYPE_NAMES: tuple[str, ...] = (
    "gaussian_blur",
    "lens_blur",
    "motion_blur",
    "color_diffusion",
    "color_shift",
    "color_quantization",
    "color_saturation_1",
    "color_saturation_2",
    "jpeg2000",
    "jpeg",
    "white_noise",
    "white_noise_color_component",
    "impulse_noise",
    "multiplicative_noise",
    "denoise",
    "brighten",
    "darken",
    "mean_shift",
    "jitter",
    "non_eccentricity_patch",
    "pixelate",
    "quantization",
    "color_block",
    "high_sharpen",
    "contrast_change",
)
TYPE_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(TYPE_NAMES)}

#: Severity parameters at levels 1..5 (the unit is given where each is used).
PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_blur": (0.6, 1.0, 1.6, 2.6, 4.5),  # sigma, px
    "lens_blur": (1, 2, 3, 5, 8),  # disk radius, px
    "motion_blur": (1, 2, 4, 6, 10),  # half length, px
    "color_diffusion": (1, 3, 6, 9, 14),  # sigma of the a*/b* blur, px
    "color_shift": (1, 3, 6, 9, 13),  # green-channel shift, px
    "color_quantization": (64, 48, 32, 16, 8),  # palette size
    "color_saturation_1": (0.6, 0.4, 0.25, 0.1, 0.0),  # HSV saturation factor
    "color_saturation_2": (1.5, 2.0, 2.7, 3.6, 5.0),  # a*/b* factor
    "jpeg2000": (16, 32, 45, 120, 170),  # compression ratio
    "jpeg": (43, 36, 24, 7, 4),  # quality
    "white_noise": (0.001, 0.002, 0.003, 0.005, 0.01),  # variance, [0, 1] scale
    "white_noise_color_component": (0.001, 0.003, 0.006, 0.012, 0.025),  # Cb/Cr variance
    "impulse_noise": (0.001, 0.005, 0.01, 0.02, 0.03),  # density
    "multiplicative_noise": (0.001, 0.005, 0.01, 0.02, 0.05),  # speckle variance
    "denoise": (0.001, 0.002, 0.004, 0.008, 0.016),  # variance of the noise removed
    "brighten": (0.1, 0.2, 0.4, 0.7, 1.1),  # L* curve strength
    "darken": (0.1, 0.2, 0.4, 0.7, 1.1),  # L* curve strength
    "mean_shift": (0.04, 0.07, 0.1, 0.13, 0.17),  # shift, [0, 1] scale, random sign
    "jitter": (0.4, 0.7, 1.1, 1.7, 2.6),  # displacement std, px
    "non_eccentricity_patch": (20, 40, 60, 80, 100),  # patches of side min(H, W) / 16
    "pixelate": (2, 3, 4, 6, 9),  # block side, px
    "quantization": (20, 15, 11, 8, 5),  # grey levels per channel
    "color_block": (2, 4, 6, 8, 10),  # blocks of side min(H, W) / 16
    "high_sharpen": (1, 2, 3, 6, 12),  # unsharp-mask amount
    "contrast_change": (0.15, 0.3, 0.45, 0.6, 0.8),  # |log contrast factor|, random sign
}


def _param(name: str, level: int, levels: int = 5) -> float:
    """Parameter of ``name`` at ``level`` of ``levels`` (5 anchors, linear in between)."""
    anchors = PARAMS[name]
    if not 1 <= level <= levels:
        raise ValueError(f"level {level} outside 1..{levels}")
    if levels == len(anchors):
        return float(anchors[level - 1])
    t = 2.0 if levels == 1 else (level - 1) * (len(anchors) - 1) / (levels - 1)
    lo = int(math.floor(t))
    hi = min(lo + 1, len(anchors) - 1)
    return float(anchors[lo] + (t - lo) * (anchors[hi] - anchors[lo]))


# --- array helpers --------------------------------------------------------------------------


def _f32(img: Array) -> Array:
    return img.astype(np.float32) * np.float32(1.0 / 255.0)


def _u8(x: Array) -> Array:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _pil(img: Array) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(img), mode="RGB")


def _srgb_to_linear(x: Array) -> Array:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _linear_to_srgb(x: Array) -> Array:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055).astype(np.float32)


# Lookup tables: exact for uint8 input; 16-bit nearest (< 0.03 code values) for output.
_LIN_OF_U8 = _srgb_to_linear(np.arange(256, dtype=np.float32) / 255.0)
_SRGB_OF_U16 = _linear_to_srgb(np.arange(65536, dtype=np.float32) / 65535.0)


def _linear_to_srgb_lut(x: Array) -> Array:
    idx = np.clip(x * 65535.0 + 0.5, 0.0, 65535.0).astype(np.intp)
    return _SRGB_OF_U16[idx]


_RGB2XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
     [0.0193339, 0.1191920, 0.9503041]],
    dtype=np.float32,
)  # fmt: skip
_XYZ2RGB = np.linalg.inv(_RGB2XYZ).astype(np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)  # D65
_EPS, _KAPPA = 216 / 24389, 24389 / 27


def rgb_to_lab(img: Array) -> Array:
    """uint8 sRGB ``[H, W, 3]`` -> CIE L*a*b* (D65), float32."""
    xyz = (_LIN_OF_U8[img] @ _RGB2XYZ.T) / _WHITE
    f = np.where(xyz > _EPS, np.cbrt(xyz), (_KAPPA * xyz + 16) / 116).astype(np.float32)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )


def lab_to_rgb(lab: Array) -> Array:
    """CIE L*a*b* (D65) -> uint8 sRGB, clipping out-of-gamut colours."""
    fy = (lab[..., 0] + 16) / 116
    fx = fy + lab[..., 1] / 500
    fz = fy - lab[..., 2] / 200
    f = np.stack([fx, fy, fz], axis=-1)
    f3 = f * f * f
    xyz = np.where(f3 > _EPS, f3, (116 * f - 16) / _KAPPA) * _WHITE
    return _u8(_linear_to_srgb_lut((xyz @ _XYZ2RGB.T).astype(np.float32)))


# BT.601 full-range YCbCr (JPEG's), [0, 1] scale.
_RGB2YCC = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
    dtype=np.float32,
)
_YCC2RGB = np.linalg.inv(_RGB2YCC).astype(np.float32)


def _reflect_convolve(x: Array, kernel: Array) -> Array:
    """Convolve each channel of float ``[H, W, C]`` with a 2-D kernel (reflect borders)."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    padded = np.pad(x, ((ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)), mode="reflect")
    out = signal.fftconvolve(padded, kernel[:, :, None], mode="valid", axes=(0, 1))
    return np.asarray(out, dtype=np.float32)


def _codec_roundtrip(img: Array, fmt: str, **save: Any) -> Array:
    buf = io.BytesIO()
    _pil(img).save(buf, fmt, **save)
    buf.seek(0)
    with Image.open(buf) as out:
        return np.asarray(out.convert("RGB"))


def _gaussian(x: Array, sigma: float, channels: Sequence[int] | None = None) -> Array:
    out = x.copy()
    for c in channels if channels is not None else range(x.shape[2]):
        out[..., c] = ndimage.gaussian_filter(x[..., c], sigma, mode="reflect")
    return out


# --- the 25 distortions (KADID-10k order) ---------------------------------------------------
# Each maps (uint8 RGB [H, W, 3], level 1..levels, rng) -> uint8 RGB of the same shape.


def gaussian_blur(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """01 Gaussian blur (sigma in px)."""
    sigma = _param("gaussian_blur", level, levels)
    return _u8(_gaussian(_f32(img), sigma))


def _disk(radius: float) -> Array:
    r = int(math.ceil(radius))
    y, x = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    # anti-aliased disk: coverage of each pixel by the circle, by 4x supersampling
    sub = (np.arange(4, dtype=np.float32) + 0.5) / 4 - 0.5
    yy = y[..., None, None] + sub[:, None]
    xx = x[..., None, None] + sub[None, :]
    k = ((yy**2 + xx**2) <= radius**2).mean(axis=(2, 3)).astype(np.float32)
    return k / k.sum()


def lens_blur(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """02 Lens blur: convolution with a disk (radius in px)."""
    return _u8(_reflect_convolve(_f32(img), _disk(_param("lens_blur", level, levels))))


def _line_kernel(half: float, angle: float) -> Array:
    r = int(math.ceil(half))
    k = np.zeros((2 * r + 1, 2 * r + 1), np.float32)
    t = np.linspace(-half, half, max(8, int(16 * half)) + 1)
    ys, xs = r + t * math.sin(angle), r + t * math.cos(angle)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    wy, wx = ys - y0, xs - x0
    for dy, dx, w in (
        (0, 0, (1 - wy) * (1 - wx)),
        (0, 1, (1 - wy) * wx),
        (1, 0, wy * (1 - wx)),
        (1, 1, wy * wx),
    ):
        yi, xi = np.clip(y0 + dy, 0, 2 * r), np.clip(x0 + dx, 0, 2 * r)
        np.add.at(k, (yi, xi), w.astype(np.float32))
    return k / k.sum()


def motion_blur(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """03 Motion blur: a line kernel at a random angle (half length in px)."""
    angle = rng.uniform(0.0, math.pi)
    kernel = _line_kernel(_param("motion_blur", level, levels), angle)
    return _u8(_reflect_convolve(_f32(img), kernel))


def color_diffusion(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """04 Colour diffusion: Gaussian blur of the a* and b* channels of CIELAB."""
    lab = rgb_to_lab(img)
    return lab_to_rgb(_gaussian(lab, _param("color_diffusion", level, levels), channels=(1, 2)))


def color_shift(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """05 Colour shift: the green channel displaced in a random direction (px)."""
    angle = rng.uniform(0.0, 2 * math.pi)
    d = _param("color_shift", level, levels)
    out = img.copy()
    out[..., 1] = ndimage.shift(
        img[..., 1].astype(np.float32),
        (d * math.sin(angle), d * math.cos(angle)),
        order=1,
        mode="nearest",
    ).round()
    return out


def color_quantization(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """06 Colour quantisation: a median-cut palette of N colours, no dithering."""
    n = int(round(_param("color_quantization", level, levels)))
    q = _pil(img).quantize(n, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return np.asarray(q.convert("RGB"))


def color_saturation_1(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """07 Colour saturation 1: HSV saturation scaled down (desaturation)."""
    h, s, v = _pil(img).convert("HSV").split()
    factor = _param("color_saturation_1", level, levels)
    s = s.point(lambda x: int(round(x * factor)))
    return np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB"))


def color_saturation_2(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """08 Colour saturation 2: CIELAB a*/b* scaled up (over-saturation)."""
    lab = rgb_to_lab(img)
    lab[..., 1:] *= _param("color_saturation_2", level, levels)
    return lab_to_rgb(lab)


def jpeg2000(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """09 JPEG2000 compression (Pillow/OpenJPEG, 9/7 wavelet, colour transform; ratio)."""
    ratio = _param("jpeg2000", level, levels)
    return _codec_roundtrip(
        img, "JPEG2000", quality_mode="rates", quality_layers=[ratio], irreversible=True, mct=1
    )


def jpeg(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """10 JPEG compression (Pillow/libjpeg quality)."""
    q = int(round(_param("jpeg", level, levels)))
    return _codec_roundtrip(img, "JPEG", quality=q, subsampling=2)


def white_noise(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """11 White noise: additive Gaussian noise in RGB (variance on the [0, 1] scale)."""
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    return _u8(_f32(img) + math.sqrt(_param("white_noise", level, levels)) * noise)


def white_noise_color_component(
    img: Array, level: int, rng: np.random.Generator, levels: int = 5
) -> Array:
    """12 White noise in a colour component: Gaussian noise on Cb and Cr (YCbCr)."""
    ycc = _f32(img) @ _RGB2YCC.T
    noise = rng.standard_normal((*img.shape[:2], 2), dtype=np.float32)
    ycc[..., 1:] += math.sqrt(_param("white_noise_color_component", level, levels)) * noise
    return _u8(ycc @ _YCC2RGB.T)


def impulse_noise(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """13 Impulse (salt and pepper) noise: a share of the samples set to 0 or 255."""
    u = rng.random(img.shape, dtype=np.float32)
    salt = rng.random(img.shape, dtype=np.float32) < 0.5
    hit = u < _param("impulse_noise", level, levels)
    out = img.copy()
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


def multiplicative_noise(
    img: Array, level: int, rng: np.random.Generator, levels: int = 5
) -> Array:
    """14 Multiplicative (speckle) noise: x + x * n, n Gaussian with the given variance."""
    x = _f32(img)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    return _u8(x + x * math.sqrt(_param("multiplicative_noise", level, levels)) * noise)


def denoise(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """15 Denoising artefacts: Gaussian noise, then an adaptive (Lee/Wiener) 5x5 denoiser.

    The denoiser knows the noise variance; it leaves smoothed textures and blotchy
    residual noise, the artefacts of the denoised KADID images (which used DnCNN).
    """
    var = _param("denoise", level, levels)
    x = _f32(img) + math.sqrt(var) * rng.standard_normal(img.shape, dtype=np.float32)
    mean = ndimage.uniform_filter(x, size=(5, 5, 1), mode="reflect")
    sq = ndimage.uniform_filter(x * x, size=(5, 5, 1), mode="reflect")
    local_var = np.maximum(sq - mean * mean, 0.0)
    gain = np.maximum(local_var - var, 0.0) / np.maximum(local_var, var)
    return _u8(mean + gain * (x - mean))


def _tone_l(img: Array, curve: Callable[[Array], Array]) -> Array:
    lab = rgb_to_lab(img)
    lab[..., 0] = 100.0 * curve(np.clip(lab[..., 0] / 100.0, 0.0, 1.0))
    return lab_to_rgb(lab)


def brighten(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """16 Brighten: a concave tone curve on CIELAB L* (gamma 1 / (1 + a))."""
    g = 1.0 / (1.0 + _param("brighten", level, levels))
    return _tone_l(img, lambda x: x**g)


def darken(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """17 Darken: a convex tone curve on CIELAB L* (gamma 1 + a)."""
    g = 1.0 + _param("darken", level, levels)
    return _tone_l(img, lambda x: x**g)


def mean_shift(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """18 Mean shift: a constant added to every sample ([0, 1] scale), random sign."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return _u8(_f32(img) + sign * _param("mean_shift", level, levels))


def jitter(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """19 Jitter: every pixel taken from a randomly displaced position (std in px)."""
    h, w = img.shape[:2]
    s = _param("jitter", level, levels)
    dy, dx = rng.standard_normal((2, h, w), dtype=np.float32)
    yy = np.clip(np.rint(np.arange(h)[:, None] + s * dy), 0, h - 1).astype(np.intp)
    xx = np.clip(np.rint(np.arange(w)[None, :] + s * dx), 0, w - 1).astype(np.intp)
    return img[yy, xx]


def _patch_plan(
    img: Array, rng: np.random.Generator, max_count: int, side: int
) -> list[tuple[int, int, int, int]]:
    """(top, left, dy, dx) for ``max_count`` patches; a level uses a prefix of the list."""
    h, w = img.shape[:2]
    plan = []
    for _ in range(max_count):
        top = int(rng.integers(0, max(1, h - side)))
        left = int(rng.integers(0, max(1, w - side)))
        dy, dx = (int(v) for v in rng.integers(-side, side + 1, size=2))
        plan.append((top, left, dy, dx))
    return plan


def non_eccentricity_patch(
    img: Array, level: int, rng: np.random.Generator, levels: int = 5
) -> Array:
    """20 Non-eccentricity patch: patches of side min(H, W)/16 copied to nearby positions."""
    h, w = img.shape[:2]
    side = max(4, round(min(h, w) / 16))
    count = round(_param("non_eccentricity_patch", level, levels))
    max_count = max(count, round(PARAMS["non_eccentricity_patch"][-1]))
    out = img.copy()
    for top, left, dy, dx in _patch_plan(img, rng, max_count, side)[:count]:
        t2 = min(max(top + dy, 0), h - side)
        l2 = min(max(left + dx, 0), w - side)
        out[t2 : t2 + side, l2 : l2 + side] = img[top : top + side, left : left + side]
    return out


def pixelate(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """21 Pixelate: box-downsampled by the block side, nearest-neighbour upsampled."""
    b = _param("pixelate", level, levels)
    h, w = img.shape[:2]
    small = _pil(img).resize((max(1, round(w / b)), max(1, round(h / b))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST))


def quantization(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """22 Quantisation: each channel quantised uniformly to N grey levels."""
    n = _param("quantization", level, levels)
    x = _f32(img)
    q = np.clip(np.floor(x * n), 0, n - 1)
    return _u8((q + 0.5) / n)


def color_block(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """23 Colour block: N uniformly coloured squares of side min(H, W)/16."""
    h, w = img.shape[:2]
    side = max(4, round(min(h, w) / 16))
    count = round(_param("color_block", level, levels))
    max_count = max(count, round(PARAMS["color_block"][-1]))
    out = img.copy()
    tops = rng.integers(0, max(1, h - side), size=max_count)
    lefts = rng.integers(0, max(1, w - side), size=max_count)
    colours = rng.integers(0, 256, size=(max_count, 3))
    for top, left, colour in list(zip(tops, lefts, colours, strict=True))[:count]:
        out[top : top + side, left : left + side] = colour.astype(np.uint8)
    return out


def high_sharpen(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """24 High sharpen: unsharp masking (radius 1 px) of CIELAB L* with a growing amount."""
    lab = rgb_to_lab(img)
    lum = lab[..., 0]
    blurred = ndimage.gaussian_filter(lum, 1.0, mode="reflect")
    lab[..., 0] = lum + _param("high_sharpen", level, levels) * (lum - blurred)
    return lab_to_rgb(lab)


def contrast_change(img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
    """25 Contrast change: samples scaled about the mean by exp(+-k), random direction."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    c = math.exp(sign * _param("contrast_change", level, levels))
    x = _f32(img)
    m = x.mean()
    return _u8(m + (x - m) * c)


#: name -> function(img_uint8 [H, W, 3], level, rng, levels=5) -> uint8 [H, W, 3]
DISTORTIONS: dict[str, Distortion] = {
    "gaussian_blur": gaussian_blur,
    "lens_blur": lens_blur,
    "motion_blur": motion_blur,
    "color_diffusion": color_diffusion,
    "color_shift": color_shift,
    "color_quantization": color_quantization,
    "color_saturation_1": color_saturation_1,
    "color_saturation_2": color_saturation_2,
    "jpeg2000": jpeg2000,
    "jpeg": jpeg,
    "white_noise": white_noise,
    "white_noise_color_component": white_noise_color_component,
    "impulse_noise": impulse_noise,
    "multiplicative_noise": multiplicative_noise,
    "denoise": denoise,
    "brighten": brighten,
    "darken": darken,
    "mean_shift": mean_shift,
    "jitter": jitter,
    "non_eccentricity_patch": non_eccentricity_patch,
    "pixelate": pixelate,
    "quantization": quantization,
    "color_block": color_block,
    "high_sharpen": high_sharpen,
    "contrast_change": contrast_change,
}
assert tuple(DISTORTIONS) == TYPE_NAMES


# --- public helpers -------------------------------------------------------------------------


def dmos_for_level(level: int, levels: int = 5) -> float:
    """The synthetic label: ``5 - 4 * level / levels`` (KADID's 1..5 scale, higher is better)."""
    return 5.0 - 4.0 * level / levels


def psnr(ref: Array, dist: Array) -> float:
    """PSNR in dB between two uint8 images (inf when identical)."""
    mse = float(np.mean((ref.astype(np.float64) - dist.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def rng_for(seed: int, ref: int, type_id: int) -> np.random.Generator:
    """The random stream of (seed, reference id, type id), the same for every level."""
    return np.random.default_rng([seed, ref, type_id])


def apply_distortion(
    img: Array | Image.Image,
    name: str | int,
    level: int,
    seed: int = 0,
    ref: int = 0,
    levels: int = 5,
) -> Array:
    """Distort one image (uint8 RGB array or PIL image) exactly as :func:`synthesize` does."""
    arr = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB array [H, W, 3], got {arr.dtype} {arr.shape}")
    (tname,) = resolve_types([name])
    if not 1 <= level <= levels:
        raise GrmpiqaError(f"level {level} outside 1..{levels}")
    out = DISTORTIONS[tname](arr, level, rng_for(seed, ref, TYPE_IDS[tname]), levels)
    assert out.shape == arr.shape and out.dtype == np.uint8, tname
    return out


def resolve_types(types: Sequence[str | int] | None) -> list[str]:
    """Type names from names or ids (``"jpeg"``, ``10``, ``"10"``), in KADID order."""
    if types is None:
        return list(TYPE_NAMES)
    chosen: set[str] = set()
    for t in types:
        for part in str(t).replace(",", " ").split():
            key = part.strip().lower().replace("-", "_")
            if key.isdigit() and 1 <= int(key) <= len(TYPE_NAMES):
                chosen.add(TYPE_NAMES[int(key) - 1])
            elif key in TYPE_IDS:
                chosen.add(key)
            else:
                raise GrmpiqaError(
                    f"unknown distortion type {part!r}; use a name or id 1..25 "
                    f"({', '.join(TYPE_NAMES)})"
                )
    if not chosen:
        raise GrmpiqaError("no distortion types selected")
    return [n for n in TYPE_NAMES if n in chosen]


# --- the generator --------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthResult:
    """What :func:`synthesize` wrote."""

    out_dir: Path
    references: int
    images: int
    seconds: float

    @property
    def spec(self) -> str:
        """The dataset spec that reads the output: ``kadid:OUT``."""
        return f"kadid:{self.out_dir}"


@dataclass(frozen=True)
class _Task:
    ref: int
    path: str
    types: tuple[str, ...]
    levels: int
    seed: int
    images_dir: str
    compress_level: int


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(arr: Array, compress_level: int = 1) -> bytes:
    """8-bit RGB PNG bytes with the 'Sub' filter on every row and zlib at ``compress_level``.

    About twice as fast as Pillow's adaptive-filter encoder at ``compress_level=1`` for
    the same file size; the images decode (with Pillow or anything else) bit-exactly.
    """
    h, w, c = arr.shape
    if arr.dtype != np.uint8 or c != 3:
        raise ValueError(f"expected uint8 RGB [H, W, 3], got {arr.dtype} {arr.shape}")
    rows = np.empty((h, 1 + 3 * w), dtype=np.uint8)
    rows[:, 0] = 1  # filter type Sub: each byte minus the byte one pixel to the left
    flat = arr.reshape(h, 3 * w)
    rows[:, 1:4] = flat[:, :3]
    np.subtract(flat[:, 3:], flat[:, :-3], out=rows[:, 4:])
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)),
            _png_chunk(b"IEND", b""),
        )
    )


def _save_png(arr: Array, path: Path, compress_level: int) -> None:
    data = encode_png(np.ascontiguousarray(arr), compress_level)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


_CACHE: dict[str, Array] = {}


def _run_task(task: _Task) -> list[tuple[str, str, float]]:
    """Distort one reference with some types; returns dmos.csv rows."""
    arr = _CACHE.get(task.path)
    if arr is None:
        _CACHE.clear()
        arr = np.asarray(load_image(task.path))
        _CACHE[task.path] = arr
    images = Path(task.images_dir)
    ref_name = f"I{task.ref:02d}.png"
    rows = []
    for tname in task.types:
        tid = TYPE_IDS[tname]
        fn = DISTORTIONS[tname]
        for level in range(1, task.levels + 1):
            out = fn(arr, level, rng_for(task.seed, task.ref, tid), task.levels)
            name = f"I{task.ref:02d}_{tid:02d}_{level:02d}.png"
            _save_png(out, images / name, task.compress_level)
            rows.append((name, ref_name, dmos_for_level(level, task.levels)))
    return rows


def _iter_results(tasks: list[_Task], workers: int) -> Iterator[list[tuple[str, str, float]]]:
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield _run_task(t)
        return
    import multiprocessing as mp

    # fork on Linux (workers inherit the imported modules: no re-import of torch);
    # spawn elsewhere, where fork is unavailable or unsafe.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(_run_task, tasks, chunksize=1)


def synthesize(
    pristine_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    types: Sequence[str | int] | None = None,
    levels: int = 5,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    compress_level: int = 1,
) -> SynthResult:
    """Write KADID-style distortions of every image in ``pristine_dir`` to ``out_dir``.

    References are numbered 1..N in file-name order. ``dmos.csv`` is written last and
    atomically (an interrupted run leaves none); the output is identical for any
    ``workers``. ``workers=0`` uses every CPU. See the module docstring for the layout
    and the label formula.

    Raises:
        GrmpiqaError: no pristine images, bad arguments; ImageError: an unreadable image.
    """
    import time

    start = time.perf_counter()
    src = Path(pristine_dir)
    if not src.is_dir():
        raise GrmpiqaError(f"{src}: pristine folder not found")
    files = sorted(p for p in src.iterdir() if p.is_file() and is_image_file(p))
    files = [p for p in files if not p.name.startswith(".")]
    if not files:
        raise GrmpiqaError(f"{src}: no image files to distort")
    names = resolve_types(types)
    if isinstance(levels, bool) or int(levels) != levels or not 1 <= levels <= 99:
        raise GrmpiqaError(f"levels must be an integer in 1..99, not {levels!r}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise GrmpiqaError(f"seed must be a non-negative integer, not {seed!r}")
    if workers < 0:
        raise GrmpiqaError(f"workers must be >= 0, not {workers}")
    workers = workers or (os.cpu_count() or 1)
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise GrmpiqaError(f"{out}: the output folder must differ from the pristine folder")
    images = out / "images"
    try:
        images.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GrmpiqaError(f"{images}: cannot create output folder ({err.strerror})") from None
    (out / "dmos.csv").unlink(missing_ok=True)  # never leave a stale label file

    # Decode every reference first: an unreadable image fails before any work is done.
    for ref, path in enumerate(files, start=1):
        arr = np.asarray(load_image(path))
        if min(arr.shape[:2]) < 16:
            raise ImageError(f"{path}: too small to distort ({arr.shape[1]}x{arr.shape[0]})")
        _save_png(arr, images / f"I{ref:02d}.png", compress_level)

    tasks = [
        _Task(ref, str(path), (t,), int(levels), int(seed), str(images), compress_level)
        for ref, path in enumerate(files, start=1)
        for t in names
    ]
    total = len(files) * len(names) * int(levels)
    rows: list[tuple[str, str, float]] = []
    bar = _progress(total, progress)
    try:
        for chunk in _iter_results(tasks, workers):
            rows.extend(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
    rows.sort()
    with atomic_open(out / "dmos.csv", "w", newline="", encoding="utf-8") as fh:
        fh.write("dist_img,ref_img,dmos,var\n")
        for name, ref_name, dmos in rows:
            fh.write(f"{name},{ref_name},{dmos:.10g},\n")
    info = {
        "generator": "grmpiqa synth",
        "seed": int(seed),
        "levels": int(levels),
        "types": {n: TYPE_IDS[n] for n in names},
        "parameters": {n: list(PARAMS[n]) for n in names},
        "references": {f"I{i:02d}": p.name for i, p in enumerate(files, start=1)},
        "dmos": "5 - 4 * level / levels",
    }
    with atomic_open(out / "synth.json", "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
    return SynthResult(out, len(files), len(rows), time.perf_counter() - start)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="synth", file=sys.stderr, dynamic_ncols=True)
