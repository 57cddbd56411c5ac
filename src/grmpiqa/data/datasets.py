"""The dataset abstraction: :class:`Item`, :class:`Dataset` and its MOS :class:`Scale`.

Datasets are built by :func:`grmpiqa.data.load_dataset` from a spec string (the kinds
are registered in :mod:`grmpiqa.data.kinds`); this module holds only the types, so
every layer above (splits, training, evaluation) depends on them and nothing else.

Every item carries ``label`` (MOS min-max normalised to [0, 1] on the dataset's scale,
higher is better; method.md 5) and ``mos`` (the raw value from the label file). The
dataset's :class:`Scale` says what 0 and 1 mean in the user's units (``lo``, ``hi``,
direction, the label file's name for the score, and where the range came from), so a
score can be mapped back with :meth:`Scale.to_mos`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from PIL import Image

from grmpiqa.errors import DatasetError
from grmpiqa.images import load_image

__all__ = ["SCALE_SOURCES", "Dataset", "Item", "Scale", "pick_split_column"]

#: Where a scale's range came from: the database's documentation, an option
#: (``mos_range=``), the data's min and max, or the labels themselves (0..1).
SCALE_SOURCES: tuple[str, ...] = ("documented", "option", "data", "labels")
ScaleSource = Literal["documented", "option", "data", "labels"]


@dataclass(frozen=True)
class Scale:
    """The MOS scale of a dataset: which raw values labels 0 and 1 stand for (method.md 5).

    ``label = (mos - lo) / (hi - lo)`` (clipped to [0, 1]), flipped when lower raw values
    are better, so a label (and a model's score) is always higher-is-better.

    Attributes:
        lo, hi: the raw values mapped to the ends of [0, 1] (``lo < hi``).
        higher_is_better: ``False`` for DMOS-style scores (lower raw value = better).
        name: what the label file calls the score (``"MOS"``, ``"dmos"``, ...).
        source: where ``lo``/``hi`` came from: ``"documented"`` (the database's
            published scale), ``"option"`` (``mos_range=``), ``"data"`` (the min and max
            of the loaded values: inferred, said so) or ``"labels"`` (already in 0..1).
    """

    lo: float
    hi: float
    higher_is_better: bool = True
    name: str = "MOS"
    source: ScaleSource = "documented"

    def __post_init__(self) -> None:
        lo, hi = float(self.lo), float(self.hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise DatasetError(f"MOS scale {self.lo!r}..{self.hi!r}: need finite LO < HI")
        if self.source not in SCALE_SOURCES:
            raise DatasetError(f"MOS scale source {self.source!r} not one of {SCALE_SOURCES}")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    @overload
    def to_label(self, mos: float) -> float: ...

    @overload
    def to_label(self, mos: np.ndarray) -> np.ndarray: ...

    def to_label(self, mos: float | np.ndarray) -> float | np.ndarray:
        """Raw value(s) -> label(s) in [0, 1], higher is better."""
        x = np.clip((np.asarray(mos, dtype=np.float64) - self.lo) / (self.hi - self.lo), 0, 1)
        out = x if self.higher_is_better else 1.0 - x
        return float(out) if out.ndim == 0 else out

    @overload
    def to_mos(self, label: float) -> float: ...

    @overload
    def to_mos(self, label: np.ndarray) -> np.ndarray: ...

    def to_mos(self, label: float | np.ndarray) -> float | np.ndarray:
        """Label(s) or score(s) in [0, 1] -> the user's units (inverse of :meth:`to_label`)."""
        x = np.asarray(label, dtype=np.float64)
        if not self.higher_is_better:
            x = 1.0 - x
        out = self.lo + x * (self.hi - self.lo)
        return float(out) if out.ndim == 0 else out

    def describe(self) -> str:
        """One line, e.g. ``MOS 0..100, higher is better (documented scale)``."""
        direction = "higher" if self.higher_is_better else "lower"
        origin = {
            "documented": "documented scale",
            "option": "mos_range option",
            "data": "inferred from the data's min and max",
            "labels": "labels already in 0..1",
        }[self.source]
        return f"{self.name} {self.lo:g}..{self.hi:g}, {direction} is better ({origin})"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-safe record (for checkpoints and reports); :meth:`from_dict` reads it."""
        return {
            "lo": self.lo,
            "hi": self.hi,
            "higher_is_better": self.higher_is_better,
            "name": self.name,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Scale:
        """Rebuild a scale from :meth:`as_dict`; :class:`DatasetError` on a bad record."""
        try:
            lo, hi = float(record["lo"]), float(record["hi"])
            hib = record.get("higher_is_better", True)
            if not isinstance(hib, bool):
                raise TypeError("higher_is_better is not a boolean")
            return cls(
                lo,
                hi,
                hib,
                str(record.get("name", "MOS")),
                record.get("source", "documented"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DatasetError(f"bad MOS scale record {dict(record)!r} ({err})") from None

    @classmethod
    def identity(cls) -> Scale:
        """Labels already in 0..1, higher is better (hand-built datasets)."""
        return cls(0.0, 1.0, True, "label", "labels")


@dataclass(frozen=True)
class Item:
    """One rated (or, for ``folder``, unrated) image.

    Attributes:
        path: the image file.
        label: MOS normalised to [0, 1], higher is better (NaN when unlabelled).
        mos: the raw value from the label file (NaN when unlabelled).
        std: standard deviation of the opinion scores, where the database gives it.
        ref: reference (content) id, e.g. ``"01"`` for KADID ``I01_05_03.png``.
        dist_type: distortion type id as written in the file name (``"05"``).
        dist_level: distortion level (1 = mildest).
        name: the image's name as the label file writes it, normalised (``/``
            separators, no ``.`` or empty components), relative to the dataset's
            ``image_root``; unique within a dataset, as is the file it names.
        splits: split columns of the label file (pyiqa/csv kinds): column -> value.
    """

    path: Path
    label: float
    mos: float
    std: float | None = None
    ref: str | None = None
    dist_type: str | None = None
    dist_level: int | None = None
    name: str = ""
    splits: Mapping[str, str] = field(default_factory=dict, hash=False)

    def load(self) -> Image.Image:
        """Decode the image (RGB); :class:`~grmpiqa.errors.ImageError` names the file."""
        return load_image(self.path)


class Dataset(Sequence[Item]):
    """A sized, indexable, iterable collection of :class:`Item`.

    Attributes:
        kind: the adapter that read it (``"clive"``, ``"kadid"``, ...).
        root: the path given in the spec (the database folder or label file).
        image_root: the folder that item names are relative to.
        spec: the spec string it was loaded from (for reports and checkpoints).
        name: a short display name (``kind:folder``).
        scale: the MOS :class:`Scale` labels were normalised on; every labelled kind
            sets it, ``None`` only for unlabelled data (``folder``). A dataset built by
            hand from items with labels gets :meth:`Scale.identity` (0..1).
    """

    def __init__(
        self,
        items: Iterable[Item],
        kind: str,
        root: str | os.PathLike[str],
        image_root: str | os.PathLike[str] | None = None,
        spec: str | None = None,
        name: str | None = None,
        scale: Scale | None = None,
    ) -> None:
        self._items: tuple[Item, ...] = tuple(items)
        self.kind = kind
        self.root = Path(root)
        self.image_root = Path(image_root) if image_root is not None else self.root
        self.spec = spec if spec is not None else f"{kind}:{self.root}"
        self.name = name if name is not None else f"{kind}:{self.root.name or self.root}"
        if scale is None and self._items and self.has_labels:
            scale = Scale.identity()
        self.scale: Scale | None = scale

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Item: ...

    @overload
    def __getitem__(self, index: slice) -> Dataset: ...

    def __getitem__(self, index: int | slice) -> Item | Dataset:
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        return self._items[index]

    def __iter__(self) -> Iterator[Item]:
        return iter(self._items)

    def __repr__(self) -> str:
        return f"Dataset({self.spec!r}, {len(self)} items)"

    @property
    def items(self) -> tuple[Item, ...]:
        return self._items

    @property
    def labels(self) -> np.ndarray:
        """Normalised labels, float64 array of shape ``[N]`` (NaN when unlabelled)."""
        return np.array([it.label for it in self._items], dtype=np.float64)

    @property
    def mos(self) -> np.ndarray:
        """Raw MOS values as in the label file, float64 array of shape ``[N]``."""
        return np.array([it.mos for it in self._items], dtype=np.float64)

    @property
    def names(self) -> list[str]:
        return [it.name for it in self._items]

    @property
    def paths(self) -> list[Path]:
        return [it.path for it in self._items]

    @property
    def has_labels(self) -> bool:
        return all(math.isfinite(it.label) for it in self._items)

    @property
    def has_refs(self) -> bool:
        """True when every item names its reference (content) image."""
        return len(self._items) > 0 and all(it.ref is not None for it in self._items)

    @property
    def split_columns(self) -> list[str]:
        """Names of the split columns read from the label file (pyiqa/csv kinds)."""
        cols: dict[str, None] = {}
        for it in self._items:
            cols.update(dict.fromkeys(it.splits))
        return list(cols)

    def load(self, index: int) -> Image.Image:
        """Decode item ``index`` as an RGB ``PIL.Image``."""
        return self._items[index].load()

    def subset(self, indices: Iterable[int]) -> Dataset:
        """A new dataset of the given items, in the given order."""
        idx = [int(i) for i in indices]
        n = len(self._items)
        for i in idx:
            if not -n <= i < n:
                raise IndexError(f"{self.name}: index {i} out of range for {n} items")
        return Dataset(
            (self._items[i] for i in idx),
            self.kind,
            self.root,
            self.image_root,
            spec=self.spec,
            name=self.name,
            scale=self.scale,
        )

    def groups(self) -> dict[str, list[int]]:
        """Distortion type -> item indices (the stage-1 tasks, method.md 6).

        Raises:
            DatasetError: when the items carry no distortion type (authentic databases).
        """
        out: dict[str, list[int]] = {}
        for i, it in enumerate(self._items):
            if it.dist_type is None:
                raise DatasetError(
                    f"{self.spec}: item {it.name!r} has no distortion type; stage-1 tasks "
                    "need kadid, tid2013, synthetic data or a csv with a dist_type column"
                )
            out.setdefault(it.dist_type, []).append(i)
        return dict(sorted(out.items()))

    def refs(self) -> dict[str, list[int]]:
        """Reference id -> item indices (empty when the items have no references)."""
        out: dict[str, list[int]] = {}
        for i, it in enumerate(self._items):
            if it.ref is not None:
                out.setdefault(it.ref, []).append(i)
        return out

    def where_split(self, value: str, column: str | None = None) -> Dataset:
        """The items whose split column (``column``, or the only one) equals ``value``."""
        column = pick_split_column(self.split_columns, column, str(self.spec))
        return self.subset(i for i, it in enumerate(self._items) if it.splits.get(column) == value)


def pick_split_column(columns: Sequence[str], column: str | None, where: str) -> str:
    """``column`` if it is one of ``columns``, else the only split column; else an error."""
    cols = list(columns)
    if column is not None:
        if column not in cols:
            raise DatasetError(
                f"{where}: no split column {column!r} (split columns: {', '.join(cols) or 'none'})"
            )
        return column
    if len(cols) != 1:
        raise DatasetError(
            f"{where}: {len(cols)} split columns ({', '.join(cols) or 'none'}); "
            "choose one with split_column=NAME"
        )
    return cols[0]
