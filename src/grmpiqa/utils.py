"""Small shared helpers: atomic file writes and seeding."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
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


def write_problem(target: str | os.PathLike[str], folder: bool = False) -> str | None:
    """Why grmpiqa could not write ``target`` (a file, or with ``folder`` a folder to fill),
    or None when it can; checked before any work, without creating anything.

    Files are written atomically (a temporary beside the target, then a rename), so what
    must be writable is the target's folder, or the nearest folder above it that exists
    (the rest is created). It is tried for real, with a temporary file created and
    removed at once: permission bits alone do not tell (root, read-only mounts, ACLs).
    """
    t = Path(target).absolute()
    if not folder and t.is_dir():
        return "is a folder, not a file name"
    if folder and t.exists() and not t.is_dir():
        return "exists and is not a folder"
    anc = t if folder else t.parent
    while not anc.exists() and not anc.is_symlink() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return f"cannot be created, {anc} is not a folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".grmpiqa-write-check.", suffix=".tmp", dir=anc)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        return f"cannot write in {anc} ({err.strerror or err})"
    return None


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


#: The deepest nesting grmpiqa reads from a JSON document (checkpoint metadata, resume
#: states, score manifests, service requests); what grmpiqa writes stays under 10.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_depth(text: str | bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest (brackets inside strings do
    not count); linear time and no recursion, so it is safe on any input.

    >>> json_depth('{"a": [1, {"b": "]]]"}]}')
    3
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    arr = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    opens = (arr == ord("[")) | (arr == ord("{"))
    closes = (arr == ord("]")) | (arr == ord("}"))
    where = np.flatnonzero(opens | closes)
    if where.size == 0:
        return 0
    steps = np.where(opens[where], 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def load_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` after checking the nesting (:func:`json_depth`) against
    ``max_depth``; every problem is a ``ValueError`` with a one-line reason."""
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep, more than the limit of {max_depth}")
    try:
        return json.loads(text)
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise ValueError(f"JSON nested more than {max_depth} levels deep") from None
