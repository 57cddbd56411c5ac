"""The 25 KADID-10k distortion types, each declared once with :func:`register_distortion`.

A type's record (:class:`DistortionType`: KADID id, name, parameter at levels 1..5, the
parameter's unit, the implementation in words) sits on the decorator of the function
that implements it; :data:`DISTORTIONS` (name -> record, in KADID order) is the
registry, and everything else (``TYPE_NAMES``, ``TYPE_IDS``, ``PARAMS``, the CLI help,
``synth.json``) is read from it. A record is callable as
``fn(img_uint8 [H, W, 3], level, rng, levels=5) -> uint8 [H, W, 3]``.

The implementations follow the KADID-10k descriptions with library primitives (Pillow
codecs, filters and colour conversions, scipy.ndimage/scipy.signal, numpy); they are
KADID-*style*, not bit-exact reproductions of the original MATLAB code (method.md 6).

Randomness comes from :func:`rng_for` ``(seed, ref, type_id)``: the *same* stream for
every level of an (image, type) pair ("common random numbers"), so a level-3 noise field
is the level-2 field scaled up and a level-3 patch set contains the level-2 patches;
severity is monotonic per image, and the output is a pure function of
(seed, image, type, level).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from grmpiqa.errors import GrmpiqaError

__all__ = [
    "DISTORTIONS",
    "PARAMS",
    "TYPE_IDS",
    "TYPE_NAMES",
    "DistortionType",
    "apply_distortion",
    "list_distortions",
    "psnr",
    "register_distortion",
    "resolve_types",
    "rng_for",
]

Array = np.ndarray
Impl = Callable[[Array, float, np.random.Generator], Array]


@dataclass(frozen=True)
class DistortionType:
    """One distortion type, as its :func:`register_distortion` decorator declared it.

    Attributes:
        id: KADID-10k's type id (1..25), the ``TT`` of ``I01_TT_LL.png``.
        name: the type's name (``"gaussian_blur"``).
        params: the parameter at levels 1..5 (increasing severity).
        unit: what the parameter is (``"sigma, px"``).
        what: the implementation, in words.
        impl: ``impl(img_uint8, p, rng) -> uint8``, ``p`` the parameter of a level.
    """

    id: int
    name: str
    params: tuple[float, ...]
    unit: str
    what: str
    impl: Impl = field(repr=False, compare=False)

    def param(self, level: int, levels: int = 5) -> float:
        """The parameter at ``level`` of ``levels`` (the 5 anchors, linear in between)."""
        anchors = self.params
        if not 1 <= level <= levels:
            raise GrmpiqaError(f"level {level} outside 1..{levels}")
        if levels == len(anchors):
            return float(anchors[level - 1])
        t = 2.0 if levels == 1 else (level - 1) * (len(anchors) - 1) / (levels - 1)
        lo = int(math.floor(t))
        hi = min(lo + 1, len(anchors) - 1)
        return float(anchors[lo] + (t - lo) * (anchors[hi] - anchors[lo]))

    def __call__(self, img: Array, level: int, rng: np.random.Generator, levels: int = 5) -> Array:
        """Distort ``img`` (uint8 RGB) at ``level`` of ``levels`` with the stream ``rng``."""
        return self.impl(img, self.param(level, levels), rng)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-safe record (``synth.json``, docs)."""
        return {
            "id": self.id,
            "name": self.name,
            "params": list(self.params),
            "unit": self.unit,
            "what": self.what,
        }


#: The registry: name -> :class:`DistortionType`, in KADID order (by id).
DISTORTIONS: dict[str, DistortionType] = {}


def register_distortion(
    id: int,  # noqa: A002 - KADID's name for it
    name: str,
    *,
    params: Sequence[float],
    unit: str,
    what: str,
) -> Callable[[Impl], Impl]:
    """Declare a distortion type; decorates ``impl(img_uint8, p, rng) -> uint8``."""

    def decorate(impl: Impl) -> Impl:
        if name in DISTORTIONS or any(d.id == id for d in DISTORTIONS.values()):
            raise ValueError(f"distortion type {id} {name!r} registered twice")
        if len(params) != 5:
            raise ValueError(f"distortion type {name!r}: give the parameter at 5 levels")
        DISTORTIONS[name] = DistortionType(int(id), name, tuple(params), unit, what, impl)
        ordered = sorted(DISTORTIONS.values(), key=lambda d: d.id)
        DISTORTIONS.clear()
        DISTORTIONS.update((d.name, d) for d in ordered)
        return impl

    return decorate


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
    from scipy import signal

    out = signal.fftconvolve(padded, kernel[:, :, None], mode="valid", axes=(0, 1))
    return np.asarray(out, dtype=np.float32)


def _codec_roundtrip(img: Array, fmt: str, **save: Any) -> Array:
    buf = io.BytesIO()
    _pil(img).save(buf, fmt, **save)
    buf.seek(0)
    with Image.open(buf) as out:
        return np.asarray(out.convert("RGB"))


def _gaussian(x: Array, sigma: float, channels: Sequence[int] | None = None) -> Array:
    from scipy import ndimage

    out = x.copy()
    for c in channels if channels is not None else range(x.shape[2]):
        out[..., c] = ndimage.gaussian_filter(x[..., c], sigma, mode="reflect")
    return out


# --- the 25 distortion types (KADID-10k order) ----------------------------------------------
# Each maps (uint8 RGB [H, W, 3], the parameter p of a level, rng) -> uint8 RGB of the same
# shape; the decorator declares the type's KADID id, name and parameters at levels 1..5.


@register_distortion(
    1,
    "gaussian_blur",
    params=(0.6, 1.0, 1.6, 2.6, 4.5),
    unit="sigma, px",
    what="Gaussian filter",
)
def gaussian_blur(img: Array, p: float, rng: np.random.Generator) -> Array:
    """01 Gaussian blur (sigma in px)."""
    return _u8(_gaussian(_f32(img), p))


def _disk(radius: float) -> Array:
    r = int(math.ceil(radius))
    y, x = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    # anti-aliased disk: coverage of each pixel by the circle, by 4x supersampling
    sub = (np.arange(4, dtype=np.float32) + 0.5) / 4 - 0.5
    yy = y[..., None, None] + sub[:, None]
    xx = x[..., None, None] + sub[None, :]
    k = ((yy**2 + xx**2) <= radius**2).mean(axis=(2, 3)).astype(np.float32)
    return k / k.sum()


@register_distortion(
    2,
    "lens_blur",
    params=(1, 2, 3, 5, 8),
    unit="disk radius, px",
    what="anti-aliased disk kernel",
)
def lens_blur(img: Array, p: float, rng: np.random.Generator) -> Array:
    """02 Lens blur: convolution with a disk (radius in px)."""
    return _u8(_reflect_convolve(_f32(img), _disk(p)))


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


@register_distortion(
    3,
    "motion_blur",
    params=(1, 2, 4, 6, 10),
    unit="half length, px",
    what="line kernel at a random angle",
)
def motion_blur(img: Array, p: float, rng: np.random.Generator) -> Array:
    """03 Motion blur: a line kernel at a random angle (half length in px)."""
    angle = rng.uniform(0.0, math.pi)
    kernel = _line_kernel(p, angle)
    return _u8(_reflect_convolve(_f32(img), kernel))


@register_distortion(
    4,
    "color_diffusion",
    params=(1, 3, 6, 9, 14),
    unit="sigma of the a*/b* blur, px",
    what="Gaussian blur of CIELAB a*, b*",
)
def color_diffusion(img: Array, p: float, rng: np.random.Generator) -> Array:
    """04 Colour diffusion: Gaussian blur of the a* and b* channels of CIELAB."""
    lab = rgb_to_lab(img)
    return lab_to_rgb(_gaussian(lab, p, channels=(1, 2)))


@register_distortion(
    5,
    "color_shift",
    params=(1, 3, 6, 9, 13),
    unit="green-channel shift, px",
    what="green channel shifted in a random direction",
)
def color_shift(img: Array, p: float, rng: np.random.Generator) -> Array:
    """05 Colour shift: the green channel displaced in a random direction (px)."""
    angle = rng.uniform(0.0, 2 * math.pi)
    d = p
    out = img.copy()
    from scipy import ndimage

    out[..., 1] = ndimage.shift(
        img[..., 1].astype(np.float32),
        (d * math.sin(angle), d * math.cos(angle)),
        order=1,
        mode="nearest",
    ).round()
    return out


@register_distortion(
    6,
    "color_quantization",
    params=(64, 48, 32, 16, 8),
    unit="palette size",
    what="median-cut palette, no dithering (Pillow)",
)
def color_quantization(img: Array, p: float, rng: np.random.Generator) -> Array:
    """06 Colour quantisation: a median-cut palette of N colours, no dithering."""
    n = int(round(p))
    q = _pil(img).quantize(n, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return np.asarray(q.convert("RGB"))


@register_distortion(
    7,
    "color_saturation_1",
    params=(0.6, 0.4, 0.25, 0.1, 0.0),
    unit="HSV saturation factor",
    what="HSV saturation scaled",
)
def color_saturation_1(img: Array, p: float, rng: np.random.Generator) -> Array:
    """07 Colour saturation 1: HSV saturation scaled down (desaturation)."""
    h, s, v = _pil(img).convert("HSV").split()
    factor = p
    s = s.point(lambda x: int(round(x * factor)))
    return np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB"))


@register_distortion(
    8,
    "color_saturation_2",
    params=(1.5, 2.0, 2.7, 3.6, 5.0),
    unit="a*/b* factor",
    what="CIELAB a*, b* scaled",
)
def color_saturation_2(img: Array, p: float, rng: np.random.Generator) -> Array:
    """08 Colour saturation 2: CIELAB a*/b* scaled up (over-saturation)."""
    lab = rgb_to_lab(img)
    lab[..., 1:] *= p
    return lab_to_rgb(lab)


@register_distortion(
    9,
    "jpeg2000",
    params=(16, 32, 45, 120, 170),
    unit="compression ratio",
    what="Pillow/OpenJPEG, 9/7 wavelet, colour transform",
)
def jpeg2000(img: Array, p: float, rng: np.random.Generator) -> Array:
    """09 JPEG2000 compression (Pillow/OpenJPEG, 9/7 wavelet, colour transform; ratio)."""
    ratio = p
    return _codec_roundtrip(
        img, "JPEG2000", quality_mode="rates", quality_layers=[ratio], irreversible=True, mct=1
    )


@register_distortion(
    10,
    "jpeg",
    params=(43, 36, 24, 7, 4),
    unit="quality",
    what="Pillow/libjpeg, 4:2:0",
)
def jpeg(img: Array, p: float, rng: np.random.Generator) -> Array:
    """10 JPEG compression (Pillow/libjpeg quality)."""
    q = int(round(p))
    return _codec_roundtrip(img, "JPEG", quality=q, subsampling=2)


@register_distortion(
    11,
    "white_noise",
    params=(0.001, 0.002, 0.003, 0.005, 0.01),
    unit="variance, [0, 1] scale",
    what="additive Gaussian noise in RGB",
)
def white_noise(img: Array, p: float, rng: np.random.Generator) -> Array:
    """11 White noise: additive Gaussian noise in RGB (variance on the [0, 1] scale)."""
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    return _u8(_f32(img) + math.sqrt(p) * noise)


@register_distortion(
    12,
    "white_noise_color_component",
    params=(0.001, 0.003, 0.006, 0.012, 0.025),
    unit="Cb/Cr variance",
    what="Gaussian noise on Cb, Cr (BT.601)",
)
def white_noise_color_component(img: Array, p: float, rng: np.random.Generator) -> Array:
    """12 White noise in a colour component: Gaussian noise on Cb and Cr (YCbCr)."""
    ycc = _f32(img) @ _RGB2YCC.T
    noise = rng.standard_normal((*img.shape[:2], 2), dtype=np.float32)
    ycc[..., 1:] += math.sqrt(p) * noise
    return _u8(ycc @ _YCC2RGB.T)


@register_distortion(
    13,
    "impulse_noise",
    params=(0.001, 0.005, 0.01, 0.02, 0.03),
    unit="density",
    what="salt and pepper, per sample",
)
def impulse_noise(img: Array, p: float, rng: np.random.Generator) -> Array:
    """13 Impulse (salt and pepper) noise: a share of the samples set to 0 or 255."""
    u = rng.random(img.shape, dtype=np.float32)
    salt = rng.random(img.shape, dtype=np.float32) < 0.5
    hit = u < p
    out = img.copy()
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


@register_distortion(
    14,
    "multiplicative_noise",
    params=(0.001, 0.005, 0.01, 0.02, 0.05),
    unit="speckle variance",
    what="speckle x + x n",
)
def multiplicative_noise(img: Array, p: float, rng: np.random.Generator) -> Array:
    """14 Multiplicative (speckle) noise: x + x * n, n Gaussian with the given variance."""
    x = _f32(img)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    return _u8(x + x * math.sqrt(p) * noise)


@register_distortion(
    15,
    "denoise",
    params=(0.001, 0.002, 0.004, 0.008, 0.016),
    unit="variance of the noise removed",
    what="Gaussian noise, then an adaptive Lee/Wiener 5x5 denoiser",
)
def denoise(img: Array, p: float, rng: np.random.Generator) -> Array:
    """15 Denoising artefacts: Gaussian noise, then an adaptive (Lee/Wiener) 5x5 denoiser.

    The denoiser knows the noise variance; it leaves smoothed textures and blotchy
    residual noise, the artefacts of the denoised KADID images (which used DnCNN).
    """
    var = p
    x = _f32(img) + math.sqrt(var) * rng.standard_normal(img.shape, dtype=np.float32)
    from scipy import ndimage

    mean = ndimage.uniform_filter(x, size=(5, 5, 1), mode="reflect")
    sq = ndimage.uniform_filter(x * x, size=(5, 5, 1), mode="reflect")
    local_var = np.maximum(sq - mean * mean, 0.0)
    gain = np.maximum(local_var - var, 0.0) / np.maximum(local_var, var)
    return _u8(mean + gain * (x - mean))


def _tone_l(img: Array, curve: Callable[[Array], Array]) -> Array:
    lab = rgb_to_lab(img)
    lab[..., 0] = 100.0 * curve(np.clip(lab[..., 0] / 100.0, 0.0, 1.0))
    return lab_to_rgb(lab)


@register_distortion(
    16,
    "brighten",
    params=(0.1, 0.2, 0.4, 0.7, 1.1),
    unit="L* curve strength",
    what="L* tone curve, gamma 1/(1+a)",
)
def brighten(img: Array, p: float, rng: np.random.Generator) -> Array:
    """16 Brighten: a concave tone curve on CIELAB L* (gamma 1 / (1 + a))."""
    g = 1.0 / (1.0 + p)
    return _tone_l(img, lambda x: x**g)


@register_distortion(
    17,
    "darken",
    params=(0.1, 0.2, 0.4, 0.7, 1.1),
    unit="L* curve strength",
    what="L* tone curve, gamma 1+a",
)
def darken(img: Array, p: float, rng: np.random.Generator) -> Array:
    """17 Darken: a convex tone curve on CIELAB L* (gamma 1 + a)."""
    g = 1.0 + p
    return _tone_l(img, lambda x: x**g)


@register_distortion(
    18,
    "mean_shift",
    params=(0.04, 0.07, 0.1, 0.13, 0.17),
    unit="shift, [0, 1] scale, random sign",
    what="constant added, random sign",
)
def mean_shift(img: Array, p: float, rng: np.random.Generator) -> Array:
    """18 Mean shift: a constant added to every sample ([0, 1] scale), random sign."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return _u8(_f32(img) + sign * p)


@register_distortion(
    19,
    "jitter",
    params=(0.4, 0.7, 1.1, 1.7, 2.6),
    unit="displacement std, px",
    what="each pixel from a randomly displaced position",
)
def jitter(img: Array, p: float, rng: np.random.Generator) -> Array:
    """19 Jitter: every pixel taken from a randomly displaced position (std in px)."""
    h, w = img.shape[:2]
    s = p
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


@register_distortion(
    20,
    "non_eccentricity_patch",
    params=(20, 40, 60, 80, 100),
    unit="patches of side min(H, W) / 16",
    what="patches (side min(H,W)/16) copied nearby",
)
def non_eccentricity_patch(img: Array, p: float, rng: np.random.Generator) -> Array:
    """20 Non-eccentricity patch: patches of side min(H, W)/16 copied to nearby positions."""
    h, w = img.shape[:2]
    side = max(4, round(min(h, w) / 16))
    count = round(p)
    max_count = max(count, round(DISTORTIONS["non_eccentricity_patch"].params[-1]))
    out = img.copy()
    for top, left, dy, dx in _patch_plan(img, rng, max_count, side)[:count]:
        t2 = min(max(top + dy, 0), h - side)
        l2 = min(max(left + dx, 0), w - side)
        out[t2 : t2 + side, l2 : l2 + side] = img[top : top + side, left : left + side]
    return out


@register_distortion(
    21,
    "pixelate",
    params=(2, 3, 4, 6, 9),
    unit="block side, px",
    what="box downsample, nearest upsample",
)
def pixelate(img: Array, p: float, rng: np.random.Generator) -> Array:
    """21 Pixelate: box-downsampled by the block side, nearest-neighbour upsampled."""
    b = p
    h, w = img.shape[:2]
    small = _pil(img).resize((max(1, round(w / b)), max(1, round(h / b))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST))


@register_distortion(
    22,
    "quantization",
    params=(20, 15, 11, 8, 5),
    unit="grey levels per channel",
    what="uniform per-channel quantisation",
)
def quantization(img: Array, p: float, rng: np.random.Generator) -> Array:
    """22 Quantisation: each channel quantised uniformly to N grey levels."""
    n = p
    x = _f32(img)
    q = np.clip(np.floor(x * n), 0, n - 1)
    return _u8((q + 0.5) / n)


@register_distortion(
    23,
    "color_block",
    params=(2, 4, 6, 8, 10),
    unit="blocks of side min(H, W) / 16",
    what="uniform random-colour squares (side min(H,W)/16)",
)
def color_block(img: Array, p: float, rng: np.random.Generator) -> Array:
    """23 Colour block: N uniformly coloured squares of side min(H, W)/16."""
    h, w = img.shape[:2]
    side = max(4, round(min(h, w) / 16))
    count = round(p)
    max_count = max(count, round(DISTORTIONS["color_block"].params[-1]))
    out = img.copy()
    tops = rng.integers(0, max(1, h - side), size=max_count)
    lefts = rng.integers(0, max(1, w - side), size=max_count)
    colours = rng.integers(0, 256, size=(max_count, 3))
    for top, left, colour in list(zip(tops, lefts, colours, strict=True))[:count]:
        out[top : top + side, left : left + side] = colour.astype(np.uint8)
    return out


@register_distortion(
    24,
    "high_sharpen",
    params=(1, 2, 3, 6, 12),
    unit="unsharp-mask amount",
    what="unsharp mask of L* (radius 1 px)",
)
def high_sharpen(img: Array, p: float, rng: np.random.Generator) -> Array:
    """24 High sharpen: unsharp masking (radius 1 px) of CIELAB L* with a growing amount."""
    lab = rgb_to_lab(img)
    lum = lab[..., 0]
    from scipy import ndimage

    blurred = ndimage.gaussian_filter(lum, 1.0, mode="reflect")
    lab[..., 0] = lum + p * (lum - blurred)
    return lab_to_rgb(lab)


@register_distortion(
    25,
    "contrast_change",
    params=(0.15, 0.3, 0.45, 0.6, 0.8),
    unit="|log contrast factor|, random sign",
    what="scaling about the mean by exp(+-k), random direction",
)
def contrast_change(img: Array, p: float, rng: np.random.Generator) -> Array:
    """25 Contrast change: samples scaled about the mean by exp(+-k), random direction."""
    sign = 1.0 if rng.random() < 0.5 else -1.0
    c = math.exp(sign * p)
    x = _f32(img)
    m = x.mean()
    return _u8(m + (x - m) * c)


#: The 25 KADID-10k types in KADID's order (type id = position + 1), from the registry.
TYPE_NAMES: tuple[str, ...] = tuple(DISTORTIONS)
#: name -> KADID type id.
TYPE_IDS: dict[str, int] = {d.name: d.id for d in DISTORTIONS.values()}
#: name -> the parameter at levels 1..5.
PARAMS: dict[str, tuple[float, ...]] = {d.name: d.params for d in DISTORTIONS.values()}


def list_distortions() -> tuple[DistortionType, ...]:
    """Every registered distortion type, in KADID order."""
    return tuple(DISTORTIONS.values())


def psnr(ref: Array, dist: Array) -> float:
    """PSNR in dB between two uint8 images (inf when identical)."""
    mse = float(np.mean((ref.astype(np.float64) - dist.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def rng_for(seed: int, ref: int, type_id: int) -> np.random.Generator:
    """The random stream of (seed, reference id, type id), the same for every level."""
    return np.random.default_rng([seed, ref, type_id])


def resolve_types(types: Sequence[str | int] | None) -> list[str]:
    """Type names from names or ids (``"jpeg"``, ``10``, ``"10"``), in KADID order."""
    if types is None:
        return list(DISTORTIONS)
    by_id = {d.id: d.name for d in DISTORTIONS.values()}
    chosen: set[str] = set()
    for t in types:
        for part in str(t).replace(",", " ").split():
            key = part.strip().lower().replace("-", "_")
            if key.isdigit() and int(key) in by_id:
                chosen.add(by_id[int(key)])
            elif key in DISTORTIONS:
                chosen.add(key)
            else:
                raise GrmpiqaError(
                    f"unknown distortion type {part!r}; use a name or id 1..{len(by_id)} "
                    f"({', '.join(DISTORTIONS)})"
                )
    if not chosen:
        raise GrmpiqaError("no distortion types selected")
    return [n for n in DISTORTIONS if n in chosen]


def apply_distortion(
    img: Array | Image.Image,
    name: str | int,
    level: int,
    seed: int = 0,
    ref: int = 0,
    levels: int = 5,
) -> Array:
    """Distort one image (uint8 RGB array or PIL image) exactly as ``synthesize`` does."""
    arr = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise GrmpiqaError(f"expected a uint8 RGB array [H, W, 3], got {arr.dtype} {arr.shape}")
    (tname,) = resolve_types([name])
    dt = DISTORTIONS[tname]
    out = dt(arr, level, rng_for(seed, ref, dt.id), levels)
    if out.shape != arr.shape or out.dtype != np.uint8:
        raise RuntimeError(f"distortion {tname} returned {out.dtype} {out.shape}")
    return out
