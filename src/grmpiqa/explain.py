"""Quality maps: where in an image the model sees good or bad quality (docs/quality-maps.md).

The global score reads the CLS token of the image tower's last layer through the head
(prompt norm, ``ln_post``, projection), compares it with the two quality prompts
``[t_hq, t_lq]`` and takes ``softmax(s * [v.t_hq, v.t_lq])[0]`` (method.md 1-5). The
quality map reads every *patch* token of the same last layer through the same head and
the same text features: one p(high quality) per patch, on the patch grid of the model's
input (7x7 for test-tiny, 14x14 for ViT-B/16). Token 0 of the same read-out is the
global score itself, so the two are comparable number for number.

What the map is: the model's own quality read-out of each patch's final token, which
mixes the patch with context through attention. What it is not: a calibrated local MOS,
or a segmentation of distortions; fine-tuning supervises only the CLS token, so patch
values are an indirect read-out whose contrast depends on the model (see the docs).

Example:
    >>> import torch, grmpiqa
    >>> from PIL import Image
    >>> model = grmpiqa.create_model("test-tiny", pretrained=None)
    >>> qm = quality_maps(model, [Image.new("RGB", (64, 48), "gray")])[0]
    >>> qm.grid.shape, 0.0 < qm.mean < 1.0
    ((7, 7), True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from grmpiqa.errors import GrmpiqaError, ImageError
from grmpiqa.images import DEFAULT_MAX_PIXELS, to_rgb
from grmpiqa.pipeline import ImageLoader
from grmpiqa.precision import autocast
from grmpiqa.prompts import l2_normalize

if TYPE_CHECKING:
    from grmpiqa.model import QualityModel

ImageInput = str | os.PathLike[str] | Image.Image


@dataclass
class QualityMap:
    """The quality map of one image.

    Attributes:
        grid: p(high quality) per patch, float32 ``[rows, cols]`` (row 0 = top).
        score: the global score p of the same forward pass (CLS token).
        box: the part of the image the grid covers, relative ``(x0, y0, x1, y1)``: the
            eval transform resizes the whole image to a square and centre-crops it.
        mos_grid, mos_score: the same in the label scale recorded by fine-tuning (or None).
    """

    grid: np.ndarray
    score: float
    box: tuple[float, float, float, float]
    mos_grid: np.ndarray | None = None
    mos_score: float | None = None

    @property
    def mean(self) -> float:
        """Mean of the map (p units), reported beside the global score."""
        return float(self.grid.mean())

    @property
    def mos_mean(self) -> float | None:
        return None if self.mos_grid is None else float(self.mos_grid.mean())

    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        """JSON form (the service's ``map`` field)."""
        d: dict[str, Any] = {
            "rows": int(self.grid.shape[0]),
            "cols": int(self.grid.shape[1]),
            "grid": np.round(self.grid.astype(np.float64), digits).tolist(),
            "box": [round(v, 6) for v in self.box],
            "mean": round(self.mean, 6),
            "min": round(float(self.grid.min()), 6),
            "max": round(float(self.grid.max()), 6),
        }
        if self.mos_grid is not None:
            d["mos_grid"] = np.round(self.mos_grid.astype(np.float64), digits).tolist()
            d["mos_mean"] = self.mos_mean
        return d


def grid_box(model: QualityModel) -> tuple[float, float, float, float]:
    """Relative box of the image that the model input (and so the map) covers."""
    c = model.preprocess
    off = (c.resize - c.crop) // 2
    return (off / c.resize, off / c.resize, (off + c.crop) / c.resize, (off + c.crop) / c.resize)


def grid_shape(model: QualityModel) -> tuple[int, int]:
    """Patch grid ``(rows, cols)`` of the model's input."""
    rows, cols = model.image_tower.grid_size
    return int(rows), int(cols)


def _token_embeddings(
    model: QualityModel, pixels: torch.Tensor
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """Every token of the image tower's last layer through the head: ``[N, T, D]``
    (not normalised), the number of prefix tokens (the trunk's own CLS/registers + visual
    prompts) before the patches, and the pooled embedding ``[N, D]`` when the trunk does
    not pool its first token (MAP or average pooling: SigLIP, PE-Core, ...); with CLS
    pooling token 0 of the read-out is the global embedding itself
    (:class:`~grmpiqa.towers.PromptedVisionTower`, reference path)."""
    tower = model.image_tower
    if tower.trunk.visual_prompts_problem is not None and not tower.trunk.pooled_rows:
        raise GrmpiqaError(
            f"{model.backbone_name}: no quality maps for {tower.trunk.family} backbones "
            f"({tower.trunk.visual_prompts_problem})"
        )
    feats = tower.forward_features(pixels)
    try:
        tokens = tower.forward_head(feats, pool=False)
    except NotImplementedError as err:
        raise GrmpiqaError(f"{model.backbone_name}: no quality maps ({err})") from None
    pooled = None if tower.trunk.pooled_rows == 1 else tower.forward_head(feats, pool=True)
    return tokens, tower.num_prefix_tokens, pooled


@torch.inference_mode()
def map_tensor(
    model: QualityModel, pixels: torch.Tensor, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global scores ``[N]`` and maps ``[N, rows, cols]`` of preprocessed images."""
    was_training = model.training
    model.eval()
    try:
        x = pixels.to(model.device)
        with autocast(model.device, precision):
            text = model.quality_text_features().float()
            tokens, prefix, pooled = _token_embeddings(model, x)
            p = model.probabilities(l2_normalize(tokens.float()), text).cpu()
            glob = None
            if pooled is not None:
                glob = model.probabilities(l2_normalize(pooled.float()), text).cpu()
    finally:
        model.train(was_training)
    rows, cols = grid_shape(model)
    patches = p[:, prefix:]
    if patches.shape[1] != rows * cols:
        raise GrmpiqaError(
            f"{model.backbone_name}: {patches.shape[1]} patch tokens, expected {rows}x{cols}"
        )
    score = p[:, 0] if glob is None else glob
    return score, patches.reshape(-1, rows, cols)


def quality_maps(
    model: QualityModel,
    images: Sequence[ImageInput],
    *,
    batch_size: int = 16,
    precision: str = "fp32",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[QualityMap]:
    """Quality maps of paths or PIL images (eval transform; unreadable files raise
    :class:`~grmpiqa.errors.ImageError`)."""
    if batch_size < 1:
        raise GrmpiqaError(f"batch size must be at least 1, got {batch_size}")
    out: list[QualityMap] = []
    loader = ImageLoader(
        images,
        model.preprocess,
        model.device,
        batch_size,
        decode="pil",
        max_pixels=max_pixels,
        reduced_decode=False,
    )
    for b in loader:  # the image pipeline; the reference decoder, in this process
        if b.errors:
            raise ImageError(b.errors[0][1])
        out.extend(maps_from_pixels(model, b.pixels, precision))
    return out


def maps_from_pixels(
    model: QualityModel, pixels: torch.Tensor, precision: str = "fp32"
) -> list[QualityMap]:
    """:class:`QualityMap` of each preprocessed image ``[N, 3, H, W]``."""
    box = grid_box(model)
    scale = model.score_scale
    scores, maps = map_tensor(model, pixels, precision)
    out = []
    for score, grid in zip(scores.tolist(), maps.numpy(), strict=True):
        qm = QualityMap(grid=grid.astype(np.float32), score=float(score), box=box)
        if scale is not None:
            qm.mos_grid = scale.to_mos(grid).astype(np.float32)
            qm.mos_score = float(scale.to_mos(score))
        out.append(qm)
    return out


# -- rendering -------------------------------------------------------------------------


#: The colour map of quality maps: matplotlib's ``cividis``, dark blue (low) to yellow
#: (high), readable with every common colour-vision deficiency and in greyscale (its
#: lightness rises monotonically). The page (serve/static) uses the same stops.
COLORMAP = "cividis"


def colorize(grid: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """RGB uint8 ``[rows, cols, 3]``: dark blue (low quality) .. grey .. yellow (high),
    with ``lo``..``hi`` spanning the colour map (:data:`COLORMAP`)."""
    from matplotlib import colormaps

    span = hi - lo if hi > lo else 1.0
    t = np.clip((grid - lo) / span, 0.0, 1.0)
    rgba = colormaps[COLORMAP](t)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(
    image: Image.Image, qm: QualityMap, *, alpha: float = 0.5, max_side: int = 1024
) -> Image.Image:
    """The image with the map blended over the part it covers, and a legend strip.

    Colours span the map's own min..max (stated in the legend), so small differences
    show; compare values, not colours, across images.
    """
    img = to_rgb(image)
    if max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))))
    w, h = img.size
    lo, hi = float(qm.grid.min()), float(qm.grid.max())
    colors = Image.fromarray(colorize(qm.grid, lo, hi), "RGB")
    bx0, by0 = round(qm.box[0] * w), round(qm.box[1] * h)
    bx1, by1 = round(qm.box[2] * w), round(qm.box[3] * h)
    layer = colors.resize((max(1, bx1 - bx0), max(1, by1 - by0)), Image.Resampling.BILINEAR)
    region = img.crop((bx0, by0, bx1, by1))
    img.paste(Image.blend(region, layer, alpha), (bx0, by0))
    # legend: "low <ramp> high", the values at its ends, the map mean and the score
    bar_h = 36
    canvas = Image.new("RGB", (w, h + bar_h), "white")
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 4
    draw.text((x, h + 4), "low", fill="black")
    x += int(draw.textlength("low ")) + 2
    ramp = colorize(np.linspace(lo, hi, 64)[None, :], lo, hi)
    ramp_img = Image.fromarray(ramp, "RGB").resize((max(24, min(120, w // 3)), 12))
    canvas.paste(ramp_img, (x, h + 5))
    x += ramp_img.width + 4
    draw.text((x, h + 4), "high", fill="black")
    text = f"p {lo:.3f} .. {hi:.3f} (this image)  map mean {qm.mean:.3f}  score {qm.score:.3f}"
    draw.text((4, h + 20), text, fill="black")
    return canvas


def write_map_files(
    image: Image.Image, qm: QualityMap, out_dir: Path, stem: str
) -> tuple[Path, Path]:
    """``STEM.map.png`` (overlay) and ``STEM.map.npy`` (the p grid) in ``out_dir``,
    written atomically."""
    from grmpiqa.utils import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    png, npy = out_dir / f"{stem}.map.png", out_dir / f"{stem}.map.npy"
    with atomic_path(png) as tmp:
        overlay(image, qm).save(tmp, format="PNG")
    with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
        np.save(fh, qm.grid, allow_pickle=False)
    return png, npy
