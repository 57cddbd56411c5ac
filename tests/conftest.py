"""Shared fixtures: a tiny random CLIP, small generated images, the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import grmpiqa


def shared_data_dir() -> Path:
    """../shared/data beside the repository, or $GRMPIQA_SHARED_DATA."""
    env = os.environ.get("GRMPIQA_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


CLIVE_ROOT = shared_data_dir() / "clive-dev" / "ChallengeDB_release"
KODAK_ROOT = shared_data_dir() / "pristine" / "kodak"

needs_clive = pytest.mark.skipif(not CLIVE_ROOT.is_dir(), reason="../shared/data/clive-dev absent")
needs_kodak = pytest.mark.skipif(
    not KODAK_ROOT.is_dir(), reason="../shared/data/pristine/kodak absent"
)

#: A small model config that keeps test-tiny fast (few visual prompt tokens).
TINY_CONFIG = grmpiqa.ModelConfig(vpt_tokens=4)


@pytest.fixture(scope="session")
def tiny_model() -> grmpiqa.QualityModel:
    """test-tiny with random weights (seed 0); do not modify it in tests."""
    return grmpiqa.create_model("test-tiny", pretrained=None, config=TINY_CONFIG)


def make_image(
    path: Path, size: tuple[int, int] = (96, 80), seed: int = 0, mode: str = "RGB"
) -> Path:
    """Write a smooth random image (gradients + noise) to ``path``."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1) + rng.normal(
        0, 20, (h, w, 3)
    )
    arr = np.clip(base, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A folder with 5 small images (one in a subfolder)."""
    d = tmp_path / "imgs"
    for i in range(4):
        make_image(d / f"img{i}.png", seed=i)
    make_image(d / "sub" / "deep.jpg", seed=9)
    return d


def assert_close_scaled(
    actual, expected, rel: float = 1e-5, what: str = "", scale: float | None = None
) -> None:
    """``max|actual - expected| <= rel * scale``, ``scale`` defaulting to ``max|expected|``:
    a tolerance relative to the magnitude of the computation, as float rounding errors are
    (for a family of gradients pass the largest magnitude of the family as ``scale``)."""
    import torch

    a = torch.as_tensor(actual).detach().double()
    e = torch.as_tensor(expected).detach().double()
    assert a.shape == e.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(e.shape)}"
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= rel * max(scale, 1e-12), f"{what}: max error {err:.3g} > {rel} x {scale:.3g}"


@pytest.fixture(scope="module")
def one_thread():
    """test-tiny's ops are tiny: one thread avoids OpenMP stalls on a busy 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_pil_images(n: int, seed: int = 0, size: tuple[int, int] = (70, 60)) -> list[Image.Image]:
    """``n`` random RGB images resized to the 244 px square of the transforms."""
    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append(Image.fromarray(arr).resize((244, 244), Image.Resampling.BICUBIC))
    return out


def write_rated_images(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` generated images whose MOS (0-100 style, 6.5..86.6) falls with their blur and
    noise, and ``labels.csv`` (``path,mos``) listing them; returns the CSV."""
    from PIL import ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["path,mos"]
    for i in range(n):
        q = i / max(1, n - 1)
        base = make_image(folder / f"r{i:03d}.png", size=(64, 56), seed=seed * 1000 + i)
        img = Image.open(base).filter(ImageFilter.GaussianBlur(2.5 * (1 - q)))
        img.save(base)
        rows.append(f"r{i:03d}.png,{6.5 + 80.1 * q + rng.normal(0, 3):.3f}")
    csv_path = folder / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


@pytest.fixture(scope="session")
def finetuned_ckpt(tmp_path_factory) -> Path:
    """A quick CLI fine-tune of test-tiny on 24 generated rated images, 6 held out."""
    from grmpiqa.cli import main

    d = tmp_path_factory.mktemp("finetuned")
    labels = write_rated_images(d / "imgs", 24)
    out = d / "ft.safetensors"
    rc = main(
        ["finetune", "--data", f"csv:{labels}", "--shots", "18", "--test-fraction", "0.25",
         "--out", str(out), "--backbone", "test-tiny", "--pretrained", "random",
         "--max-epochs", "10", "--cache-augmentations", "1", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    return out
