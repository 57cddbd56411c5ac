"""Image preprocessing: the released stage-1 and stage-2 transforms (method.md 6, 7).

Every transform maps an RGB ``PIL.Image`` to a normalised float tensor ``[3, H, W]``.
The default for scoring is the released stage-2 test transform: the whole image resized
to 244x244 (aspect ratio not kept, bicubic), the centre 224 crop ``[10:234, 10:234]``,
ImageNet statistics. ``stats="clip"`` switches to CLIP's own statistics.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (1.0, 1.0, 1.0)

_STATS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
    "inception": (INCEPTION_MEAN, INCEPTION_STD),  # SigLIP, SigLIP2, ViTamin: [-1, 1]
    "unit": (UNIT_MEAN, UNIT_STD),  # MobileCLIP: [0, 1], no normalisation
}
_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}

Transform = Callable[[Image.Image], torch.Tensor]
#: The largest resize/crop side a :class:`PreprocessConfig` may ask for (it may come from
#: a checkpoint file): checked before any image of that size is allocated.
MAX_INPUT_SIDE = 4096


def stats_for(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std for ``"imagenet"`` (released code), ``"clip"``, ``"inception"``
    (0.5, 0.5) or ``"unit"`` (0, 1)."""
    try:
        return _STATS[name]
    except KeyError:
        raise ValueError(
            f"unknown normalisation statistics {name!r}; use one of {', '.join(_STATS)}"
        ) from None


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the model's input (stored in every checkpoint).

    Attributes:
        resize: side of the square the whole image is resized to (aspect not kept).
        crop: side of the centre crop taken from the resized image (= model input size).
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        stats: ``"imagenet"`` (released code), ``"clip"``, ``"inception"`` or ``"unit"``.
    """

    resize: int = 244
    crop: int = 224
    interpolation: str = "bicubic"
    stats: str = "imagenet"

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_INPUT_SIDE:
                raise ValueError(f"{name} must be an integer from 1 to {MAX_INPUT_SIDE}, not {v!r}")
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) larger than resize ({self.resize})")
        if self.interpolation not in _INTERP:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        stats_for(self.stats)

    @property
    def decode_min_side(self) -> int:
        """The smallest short side a decoded image needs for this preprocessing (the
        resize target): a large JPEG may decode at a reduced DCT scale down to it, the
        (antialiased) resize to ``resize x resize`` following. Measured on 12-megapixel
        photos: scores within 0.001 of the full decode (``benchmarks/score_throughput.py``).
        """
        return self.resize

    @property
    def mean(self) -> tuple[float, ...]:
        return stats_for(self.stats)[0]

    @property
    def std(self) -> tuple[float, ...]:
        return stats_for(self.stats)[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def for_backbone(cls, pre: Any) -> PreprocessConfig:
        """The released test transform (method.md 7) for a backbone's own preprocessing
        (:class:`grmpiqa.backbones.Preprocessing`): the crop is its input size and the
        resize keeps the released margin (244 for 224). Backbones trained with CLIP's
        statistics get ImageNet's, as the released code gives OpenAI CLIP (so ViT-B/16
        is exactly the released transform); the others keep their own (SigLIP's 0.5/0.5,
        MobileCLIP's 0/1)."""
        size = int(pre.size)
        resize = int(round(size * 244 / 224))
        mean = tuple(round(float(v), 4) for v in pre.mean)
        std = tuple(round(float(v), 4) for v in pre.std)
        stats = "imagenet"
        for name, (m, sd) in _STATS.items():
            if name != "clip" and (mean, std) == (
                tuple(round(v, 4) for v in m),
                tuple(round(v, 4) for v in sd),
            ):
                stats = name
        interp = str(pre.interpolation) if str(pre.interpolation) in _INTERP else "bicubic"
        return cls(resize=resize, crop=size, interpolation=interp, stats=stats)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        return cls(**{k: d[k] for k in ("resize", "crop", "interpolation", "stats") if k in d})

    def eval_transform(self) -> Transform:
        """Deterministic test transform: resize, centre crop, normalise.

        Scoring does not call it per image: :mod:`grmpiqa.pipeline` runs the same steps
        in two halves, :meth:`resize_crop` (8-bit, where the image is decoded) and
        :meth:`normalize` (on the model's device), with the same result bit for bit.
        """
        return ResizeCropNormalize(self, train=False)

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """The eval geometry on an RGB image: the whole image resized to ``resize`` x
        ``resize`` (Pillow, ``interpolation``), then the centre ``crop`` (still 8-bit)."""
        img = img.resize((self.resize, self.resize), _pil_resample(self.interpolation))
        off = (self.resize - self.crop) // 2
        return img.crop((off, off, off + self.crop, off + self.crop))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """8-bit pixels ``[..., 3, H, W]`` (uint8, any device) -> the model's float32 input:
        ``(p / 255 - mean) / std``, the arithmetic of ``to_tensor`` + ``normalize`` (so
        equal bit for bit to :meth:`eval_transform` on the same 8-bit pixels)."""
        if pixels.dtype != torch.uint8 or pixels.ndim < 3 or pixels.shape[-3] != 3:
            raise ValueError(
                f"expected uint8 pixels [..., 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}"
            )
        shape = (3, 1, 1)
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=pixels.device).view(shape)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=pixels.device).view(shape)
        return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)

    def train_transform(self) -> Transform:
        """Released stage-2 train transform: resize, random crop, random h-flip, normalise."""
        return ResizeCropNormalize(self, train=True)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the eval transform to a float batch ``[N, 3, H, W]`` in ``[0, 1]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected a float tensor [N, 3, H, W], got shape {tuple(images.shape)}"
            )
        x = TF.resize(
            images.float(),
            [self.resize, self.resize],
            interpolation=_INTERP[self.interpolation],
            antialias=True,
        )
        x = TF.center_crop(x, [self.crop, self.crop]).clamp_(0.0, 1.0)
        return TF.normalize(x, list(self.mean), list(self.std))


@dataclass
class ResizeCropNormalize:
    """Whole-image resize to a square, then a centre (eval) or random (train) crop.

    The random crop draws its offsets in ``[0, resize - crop)`` like the released code,
    and flips horizontally half of the time. ``generator`` makes it reproducible.
    """

    config: PreprocessConfig
    train: bool = False
    flip: bool = True
    generator: random.Random | None = field(default=None, repr=False)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        c = self.config
        if self.train:
            img = img.resize((c.resize, c.resize), _pil_resample(c.interpolation))
            rng = self.generator or random
            span = c.resize - c.crop
            top = rng.randrange(span) if span > 0 else 0
            left = rng.randrange(span) if span > 0 else 0
            img = img.crop((left, top, left + c.crop, top + c.crop))
            if self.flip and rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return TF.normalize(TF.to_tensor(img), list(c.mean), list(c.std))
        return TF.normalize(TF.to_tensor(c.resize_crop(img)), list(c.mean), list(c.std))


def _pil_resample(name: str) -> Image.Resampling:
    return {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
    }[name]


# --- the released transforms, by stage (method.md 6 and 7) ------------------------------


def stage2_train_transform(stats: str = "imagenet") -> Transform:
    """Stage 2 train: resize 244x244 bicubic, random 224 crop (offsets in [0, 20)), h-flip."""
    return PreprocessConfig(stats=stats).train_transform()


def stage2_test_transform(stats: str = "imagenet") -> Transform:
    """Stage 2 test (also the scoring default): resize 244x244, centre crop [10:234]."""
    return PreprocessConfig(stats=stats).eval_transform()


@dataclass
class _Stage1Support:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    generator: random.Random | None = None
    size: int = 224

    def __call__(self, img: Image.Image) -> torch.Tensor:
        rng = self.generator or random
        big = int(round(self.size * 256 / 224))
        img = img.resize((big, big), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top, left = rng.randint(0, big - self.size), rng.randint(0, big - self.size)
        img = img.crop((left, top, left + self.size, top + self.size))
        return TF.normalize(TF.to_tensor(img), list(self.mean), list(self.std))


@dataclass
class _Stage1Query:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int = 224

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return TF.normalize(TF.to_tensor(img), list(self.mean), list(self.std))


def stage1_support_transform(
    stats: str = "imagenet", generator: random.Random | None = None, size: int = 224
) -> Transform:
    """Stage 1 support: resize 256x256, random horizontal flip, random 224 crop (for a
    backbone of another input size ``size``, the same in proportion)."""
    mean, std = stats_for(stats)
    return _Stage1Support(mean, std, generator, size)


def stage1_query_transform(stats: str = "imagenet", size: int = 224) -> Transform:
    """Stage 1 query: resize to 224x224 (``size`` x ``size``)."""
    mean, std = stats_for(stats)
    return _Stage1Query(mean, std, size)


def stage1_stats(requested: str, model_stats: str) -> str:
    """Statistics of stage 1: the requested ones (ImageNet, as released, or CLIP's) for
    backbones trained with CLIP's statistics; a backbone's own for the others (SigLIP's
    0.5/0.5, MobileCLIP's 0/1), which its weights expect."""
    return requested if model_stats in ("imagenet", "clip") else model_stats


_STAT_TENSORS: dict[tuple[tuple[float, ...], tuple[float, ...], str], tuple[torch.Tensor, ...]] = {}


def normalize_uint8(
    pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``to_tensor`` and ``normalize`` of uint8 pixels ``[..., 3, H, W]`` on their own
    device: float, / 255, - mean, / std - the operations of the PIL transforms, so the
    same numbers, without the host round trips of ``TF.normalize`` (which checks the
    std on the host and copies the statistics to the device at every call)."""
    key = (tuple(mean), tuple(std), str(pixels.device))
    stats = _STAT_TENSORS.get(key)
    if stats is None:
        m = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        s = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        stats = _STAT_TENSORS[key] = (m.to(pixels.device), s.to(pixels.device))
    return pixels.to(torch.float32).div(255).sub_(stats[0]).div_(stats[1])
