"""``grmpiqa synth``'s writer: KADID-style distortions of any pristine photos (method.md 6).

The distortion types are declared in :mod:`grmpiqa.data.distortions`; this module writes
them, for every reference and level, in KADID-10k's own layout so that ``kadid:OUT``
reads the output unchanged::

    OUT/images/I{ref:02d}.png                 the pristine references (re-encoded PNG)
    OUT/images/I{ref:02d}_{type:02d}_{level:02d}.png
    OUT/dmos.csv                              dist_img,ref_img,dmos,var
    OUT/synth.json                            what produced it (seed, types, parameters)

Label formula (documented in docs/datasets.md): ``dmos = 5 - 4 * level / levels`` on
KADID's 1..5 scale (higher is better): the pristine image would be 5, level 1 of 5 is
4.2, level 5 is 1.0. ``var`` is left empty (there are no opinion scores).

Nothing is half-written: every pristine image is decoded (and checked) before anything
is written; the output is built in a hidden folder beside OUT (``.OUT.synth-XXXX``) and
moved into place at the end, ``dmos.csv`` last. A failed or interrupted run leaves an
existing OUT as it was (a later run removes a staging folder a killed run left).
Severity is monotonic and the output a pure function of (seed, image, type, level),
independent of ``workers`` and of the run order (see :mod:`~grmpiqa.data.distortions`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grmpiqa.data.distortions import (
    DISTORTIONS,
    PARAMS,
    TYPE_IDS,
    TYPE_NAMES,
    apply_distortion,
    psnr,
    resolve_types,
    rng_for,
)
from grmpiqa.errors import GrmpiqaError, ImageError
from grmpiqa.images import is_image_file, load_image

__all__ = [
    "DISTORTIONS",
    "PARAMS",
    "TYPE_IDS",
    "TYPE_NAMES",
    "SynthConfig",
    "SynthResult",
    "apply_distortion",
    "dmos_for_level",
    "encode_png",
    "psnr",
    "resolve_types",
    "synthesize",
]

Array = np.ndarray

#: The smallest side a pristine image may have.
MIN_SIDE = 16
_MARKER = ".grmpiqa-synth-staging"


@dataclass(frozen=True)
class SynthConfig:
    """The settings of :func:`synthesize` (and the defaults of ``grmpiqa synth``).

    Attributes:
        types: distortion types by name or id (``None``: all 25).
        levels: severity levels per type (1..99; 5 = KADID's).
        seed: random seed (non-negative).
        workers: worker processes (0: every CPU).
        compress_level: PNG (zlib) compression level 0..9 (1: fast, larger files).
        progress: show a progress bar on stderr.
    """

    types: tuple[str, ...] | None = None
    levels: int = 5
    seed: int = 0
    workers: int = 1
    compress_level: int = 1
    progress: bool = True

    def validate(self) -> list[str]:
        """Check every field; return the resolved type names (KADID order)."""
        names = resolve_types(self.types)
        if not _is_int(self.levels) or not 1 <= self.levels <= 99:
            raise GrmpiqaError(f"levels must be an integer in 1..99, not {self.levels!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise GrmpiqaError(f"seed must be a non-negative integer, not {self.seed!r}")
        if not _is_int(self.workers) or self.workers < 0:
            raise GrmpiqaError(f"workers must be an integer >= 0, not {self.workers!r}")
        if not _is_int(self.compress_level) or not 0 <= self.compress_level <= 9:
            raise GrmpiqaError(
                f"compress_level must be an integer in 0..9, not {self.compress_level!r}"
            )
        return names


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


_DEFAULT = SynthConfig()


def dmos_for_level(level: int, levels: int = _DEFAULT.levels) -> float:
    """The synthetic label: ``5 - 4 * level / levels`` (KADID's 1..5 scale, higher is better)."""
    return 5.0 - 4.0 * level / levels


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
    # Written inside the staging folder: the whole folder is moved into place at the end.
    path.write_bytes(encode_png(np.ascontiguousarray(arr), compress_level))


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
        dt = DISTORTIONS[tname]
        for level in range(1, task.levels + 1):
            out = dt(arr, level, rng_for(task.seed, task.ref, dt.id), task.levels)
            name = f"I{task.ref:02d}_{dt.id:02d}_{level:02d}.png"
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
    types: Sequence[str | int] | None = _DEFAULT.types,
    levels: int = _DEFAULT.levels,
    seed: int = _DEFAULT.seed,
    workers: int = _DEFAULT.workers,
    progress: bool = _DEFAULT.progress,
    compress_level: int = _DEFAULT.compress_level,
) -> SynthResult:
    """Write KADID-style distortions of every image in ``pristine_dir`` to ``out_dir``.

    References are numbered 1..N in file-name order. The output is identical for any
    ``workers`` (``0`` uses every CPU). Nothing is half-written: the inputs are checked
    first, the output is built beside ``out_dir`` and moved into place at the end; an
    existing ``out_dir`` is left as it was when the run fails. A re-run replaces the
    ``images/``, ``dmos.csv`` and ``synth.json`` of an earlier run and leaves other
    files alone. See the module docstring for the layout and the label formula.

    Raises:
        GrmpiqaError: no pristine images, bad arguments, an output folder that holds an
            ``images/`` folder not written by synth; ImageError: an unreadable image.
    """
    start = time.perf_counter()
    config = SynthConfig(
        tuple(str(t) for t in types) if types is not None else None,
        levels,
        seed,
        workers,
        compress_level,
        progress,
    )
    names = config.validate()
    src = Path(pristine_dir)
    if not src.is_dir():
        raise GrmpiqaError(f"{src}: pristine folder not found")
    try:
        files = sorted(p for p in src.iterdir() if p.is_file() and is_image_file(p))
    except OSError as err:
        raise GrmpiqaError(f"{src}: cannot list pristine folder ({err.strerror})") from None
    files = [p for p in files if not p.name.startswith(".")]
    if not files:
        raise GrmpiqaError(f"{src}: no image files to distort")
    out = _check_out(Path(out_dir), src)

    # Decode every reference first: an unreadable image fails before anything is written.
    for path in files:
        arr = np.asarray(load_image(path))
        if min(arr.shape[:2]) < MIN_SIDE:
            raise ImageError(f"{path}: too small to distort ({arr.shape[1]}x{arr.shape[0]})")

    staging, made = _make_staging(out)
    try:
        images = staging / "images"
        images.mkdir()
        for ref, path in enumerate(files, start=1):
            arr = np.asarray(load_image(path))
            _save_png(arr, images / f"I{ref:02d}.png", config.compress_level)
        tasks = [
            _Task(ref, str(path), (t,), int(levels), int(seed), str(images), compress_level)
            for ref, path in enumerate(files, start=1)
            for t in names
        ]
        total = len(files) * len(names) * int(levels)
        rows: list[tuple[str, str, float]] = []
        bar = _progress(total, progress)
        try:
            for chunk in _iter_results(tasks, workers or (os.cpu_count() or 1)):
                rows.extend(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
        rows.sort()
        with open(staging / "dmos.csv", "w", newline="", encoding="utf-8") as fh:
            fh.write("dist_img,ref_img,dmos,var\n")
            for name, ref_name, dmos in rows:
                fh.write(f"{name},{ref_name},{dmos:.10g},\n")
        info = {
            "generator": "grmpiqa synth",
            "seed": int(seed),
            "levels": int(levels),
            "types": {n: DISTORTIONS[n].id for n in names},
            "parameters": {n: list(DISTORTIONS[n].params) for n in names},
            "references": {f"I{i:02d}": p.name for i, p in enumerate(files, start=1)},
            "dmos": "5 - 4 * level / levels",
        }
        with open(staging / "synth.json", "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
            fh.write("\n")
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for d in reversed(made):
            _rmdir_quiet(d)
        raise
    return SynthResult(out, len(files), len(rows), time.perf_counter() - start)


_OUTPUTS = ("images", "synth.json", "dmos.csv")


def _check_out(out: Path, src: Path) -> Path:
    """Refuse an output folder synth must not write to; follow a symbolic link."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise GrmpiqaError(f"{out}: output exists and is not a folder")
        out = out.resolve()
        theirs = [n for n in ("images", "dmos.csv") if (out / n).exists() or (out / n).is_symlink()]
        if theirs and not (out / "synth.json").is_file():
            what = "an images/ folder" if theirs[0] == "images" else "a dmos.csv"
            raise GrmpiqaError(
                f"{out}: holds {what} that grmpiqa synth did not write (no synth.json); "
                "choose another --out or remove it"
            )
    if out.resolve() == src.resolve():
        raise GrmpiqaError(f"{out}: the output folder must differ from the pristine folder")
    return out


def _make_staging(out: Path) -> tuple[Path, list[Path]]:
    """A fresh hidden folder beside ``out`` (same file system: the final moves are
    renames), after removing any a killed run left; plus the parent folders created."""
    made: list[Path] = []
    missing = []
    parent = out.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        for old in out.parent.glob(f".{out.name}.synth-*"):
            if (old / _MARKER).is_file():
                shutil.rmtree(old, ignore_errors=True)
        staging = out.parent / f".{out.name}.synth-{secrets.token_hex(4)}"
        staging.mkdir()
        (staging / _MARKER).touch()
    except OSError as err:
        for d in reversed(made):
            _rmdir_quiet(d)
        raise GrmpiqaError(
            f"{out}: cannot create the output folder ({err.strerror or err})"
        ) from None
    return staging, made


def _commit(staging: Path, out: Path) -> None:
    """Move the finished output into place, ``dmos.csv`` last."""
    if not out.exists():
        (staging / _MARKER).unlink()
        os.replace(staging, out)
        return
    old = staging / ".old"
    old.mkdir()
    # The label file goes first and comes back last: no moment has a dmos.csv that
    # names images which are not there.
    for name in ("dmos.csv", "images", "synth.json"):
        if (out / name).exists() or (out / name).is_symlink():
            os.replace(out / name, old / name)
    for name in _OUTPUTS:
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


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
