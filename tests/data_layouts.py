"""Fixture trees of the dataset kinds in their official layouts (shared by the data tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def _img(path: Path, seed: int = 0, size: tuple[int, int] = (12, 10)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


# --- fixture trees in the official layouts ---------------------------------------------------


def make_clive(root: Path, mos: list[float] | None = None) -> Path:
    names = [f"t{i}.bmp" for i in range(1, 8)] + ["100.bmp", "101.JPG", "102.bmp"]
    mos = mos or [50.0] * 7 + [10.0, 55.5, 90.0]
    for i, n in enumerate(names):
        sub = "trainingImages/" if n.startswith("t") else ""
        _img(root / "Images" / f"{sub}{n}", seed=i)
    cells = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        cells[i, 0] = np.array([n])
    (root / "Data").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cells})
    scipy.io.savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([mos])})
    std = np.array([[10.0 + i for i in range(len(names))]])
    scipy.io.savemat(root / "Data" / "AllStdDev_release.mat", {"AllStdDev_release": std})
    return root


def make_koniq(root: Path) -> Path:
    rows = [("a.jpg", 1.5, 0.4), ("b.jpg", 3.25, 0.6), ("c.jpg", 4.9, 0.3)]
    lines = ['"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"']
    for i, (n, m, s) in enumerate(rows):
        _img(root / "1024x768" / n, seed=i)
        lines.append(f'"{n}",1,2,3,4,5,15,{m},{s},{m * 10}')
    (root / "koniq10k_scores_and_distributions.csv").write_text("\n".join(lines) + "\n")
    return root


def make_kadid(root: Path) -> Path:
    lines = ["dist_img,ref_img,dmos,var"]
    for ref in (1, 2, 3):
        _img(root / "images" / f"I{ref:02d}.png", seed=ref)
        for t in (1, 5):
            for lv in (1, 2):
                n = f"I{ref:02d}_{t:02d}_{lv:02d}.png"
                _img(root / "images" / n, seed=ref * 100 + t * 10 + lv)
                lines.append(f"{n},I{ref:02d}.png,{5 - lv - t / 5:.2f},0.25")
    (root / "dmos.csv").write_text("\n".join(lines) + "\n")
    return root


def make_tid(root: Path) -> Path:
    entries = [("i01_01_1.bmp", 5.51429), ("i01_01_2.bmp", 4.1), ("i02_07_5.bmp", 0.5)]
    lines = []
    for i, (n, m) in enumerate(entries):
        disk_name = n.upper() if i == 2 else n  # TID2013 mixes the case of its file names
        _img(root / "distorted_images" / disk_name, seed=i)
        lines.append(f"{m} {n}")
    (root / "mos_with_names.txt").write_text("\r\n".join(lines) + "\r\n")
    return root


def make_agiqa(root: Path, in_images: bool = True) -> Path:
    lines = ["name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align"]
    for i, m in enumerate((0.5, 2.5, 4.75)):
        n = f"AttnGAN_normal_{i:03d}.jpg"
        _img(root / ("images" if in_images else "") / n, seed=i)
        lines.append(f'{n},"a cat, sitting",nice,,baroque,{m},0.7,3.0,0.5')
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root
