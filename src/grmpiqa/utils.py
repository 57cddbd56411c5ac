"""Small shared helpers: atomic file writes and seeding."""

from __future__ import annotations

import contextlib
import math
import os
import random
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it over ``path`` only on success.

    Readers never see a half-written file: on an exception the temporary file is removed
    and ``path`` is left as it was. The file gets the mode a plain ``open()`` would give
    it: an existing file keeps its mode, a new one gets ``0o666 & ~umask``. A temporary
    left behind by a killed process is named ``.NAME.*.tmp``
    (see :func:`remove_stale_temporaries`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            mode = stat.S_IMODE(target.stat().st_mode)
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporaries of ``path`` that an interrupted :func:`atomic_path` left behind.

    Only call it when no other process is writing ``path``. Returns what was removed.
    """
    target = Path(path)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    prefix = _temporary_prefix(target)
    for candidate in target.parent.iterdir():
        if candidate.name.startswith(prefix) and candidate.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                if candidate.is_file() and not candidate.is_symlink():
                    candidate.unlink()
                    removed.append(candidate)
    return removed


def json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON values: non-finite floats -> None, NumPy and torch scalars
    -> Python numbers, arrays and tuples -> lists, paths -> strings (recursively).

    >>> json_safe({"a": (1.5, float("nan")), "b": np.float32(2.0)})
    {'a': [1.5, None], 'b': 2.0}
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    torch = sys.modules.get("torch")  # a torch tensor exists only where torch is loaded
    scalar = isinstance(obj, np.generic) or (torch is not None and isinstance(obj, torch.Tensor))
    if scalar and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
