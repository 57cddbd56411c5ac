"""Test helpers: webdataset-style tar shards of small generated images."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from conftest import make_image


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_shards(
    folder: Path, n_shards: int = 4, per_shard: int = 3, bad: dict[int, int] | None = None
) -> list[Path]:
    """``folder/shard-0000.tar``...: samples ``sNNNNN`` with a .jpg/.png image and a .json.

    ``bad`` maps a shard index to the sample index (in it) whose image is garbage bytes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / "_scratch"
    out = []
    k = 0
    for s in range(n_shards):
        path = folder / f"shard-{s:04d}.tar"
        with tarfile.open(path, "w") as tf:
            for j in range(per_shard):
                ext = "jpg" if k % 2 == 0 else "png"
                img = make_image(scratch / f"{k}.{ext}", size=(64 + 8 * (k % 3), 48), seed=k)
                data = img.read_bytes()
                if bad and bad.get(s) == j:
                    data = b"\xff\xd8\xff\xe0 not really a jpeg"
                add_member(tf, f"s{k:05d}.{ext}", data)
                add_member(tf, f"s{k:05d}.json", b'{"caption": "x"}')
                k += 1
        out.append(path)
    for p in scratch.iterdir():
        p.unlink()
    scratch.rmdir()
    return out
