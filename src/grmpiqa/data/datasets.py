"""IQA dataset adapters: one :class:`Dataset` abstraction built from a spec string.

A spec is ``KIND:PATH`` (``pyiqa:META.csv::IMAGE_ROOT`` for pyiqa meta-info files),
optionally followed by ``?key=value&key=value`` options. The API accepts the same
string, and the same options as keyword arguments::

    load_dataset("clive:/data/ChallengeDB_release")
    load_dataset("csv:/data/mine.csv?mos_range=0,100&higher_is_better=0")
    load_dataset("csv:/data/mine.csv", mos_range=(0, 100), higher_is_better=False)

Every item carries ``label`` (MOS min-max normalised to [0, 1] on the database's
documented scale, higher is better; method.md 5) and ``mos`` (the raw value from the
label file). Loading reads the label files and checks that every labelled image exists
but decodes no image: decoding errors surface when an item is loaded, as an
:class:`~grmpiqa.errors.ImageError` naming the file. Every problem with the label files
is a :class:`~grmpiqa.errors.DatasetError` whose one-line message names the file (and
row) first, then the reason. The kinds and their files are documented in
``docs/datasets.md``.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image

from grmpiqa.errors import DatasetError
from grmpiqa.images import is_image_file, load_image

__all__ = [
    "KINDS",
    "Dataset",
    "Item",
    "load_dataset",
    "parse_spec",
]


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
        name: the image's name as the label file writes it (relative to the dataset's
            ``image_root``); unique within a dataset.
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
    """

    def __init__(
        self,
        items: Iterable[Item],
        kind: str,
        root: str | os.PathLike[str],
        image_root: str | os.PathLike[str] | None = None,
        spec: str | None = None,
        name: str | None = None,
    ) -> None:
        self._items: tuple[Item, ...] = tuple(items)
        self.kind = kind
        self.root = Path(root)
        self.image_root = Path(image_root) if image_root is not None else self.root
        self.spec = spec if spec is not None else f"{kind}:{self.root}"
        self.name = name if name is not None else f"{kind}:{self.root.name or self.root}"

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
        column = _pick_split_column(self, column, str(self.spec))
        return self.subset(i for i, it in enumerate(self._items) if it.splits.get(column) == value)


# --- spec parsing ------------------------------------------------------------------------

_OPTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^&]*(&[A-Za-z_][A-Za-z0-9_]*=[^&]*)*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_spec(spec: str) -> tuple[str, str, str | None, dict[str, str]]:
    """Split ``KIND:PATH[::EXTRA][?k=v&k=v]`` into (kind, path, extra, options).

    ``EXTRA`` is the image root of ``pyiqa:META.csv::ROOT``. Option values stay strings
    here; :func:`load_dataset` converts them.
    """
    spec = str(spec)
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or not kind or not rest:
        raise DatasetError(
            f"dataset spec {spec!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)}"
        )
    if kind not in KINDS:
        raise DatasetError(
            f"dataset spec {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}"
        )
    options: dict[str, str] = {}
    head, qsep, query = rest.rpartition("?")
    if qsep and _OPTION_RE.match(query):
        rest = head
        for pair in query.split("&"):
            key, _, value = pair.partition("=")
            if key in options:
                raise DatasetError(f"dataset spec {spec!r}: option {key!r} given twice")
            options[key] = value
    path, dsep, extra = rest.partition("::")
    if not path:
        raise DatasetError(f"dataset spec {spec!r}: empty path")
    return kind, path, (extra if dsep else None), options


def _parse_bool(value: Any, key: str, spec: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | np.integer) and int(value) in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DatasetError(f"dataset spec {spec!r}: option {key}={value!r} is not a boolean (use 1/0)")


def _parse_range(value: Any, spec: str) -> tuple[float, float]:
    try:
        if isinstance(value, str):
            parts = [float(p) for p in value.replace(":", ",").split(",")]
        else:
            parts = [float(p) for p in value]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 2 or not all(math.isfinite(p) for p in parts) or parts[0] >= parts[1]:
        raise DatasetError(
            f"dataset spec {spec!r}: option mos_range={value!r} must be two finite numbers LO,HI "
            "with LO < HI"
        )
    return parts[0], parts[1]


# --- shared helpers for adapters ------------------------------------------------------------


@dataclass
class _Ctx:
    """What an adapter needs: the spec, its paths and the validated options."""

    spec: str
    kind: str
    path: Path
    extra: Path | None
    mos_range: tuple[float, float] | None = None
    higher_is_better: bool | None = None
    image_dir: str | None = None
    resolution: str | None = None
    split: str | None = None
    split_column: str | None = None
    recursive: bool = True


def _where(file: Path, row: int | None) -> str:
    return f"{file}, row {row}" if row is not None else str(file)


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        if path.exists():
            raise DatasetError(f"{path}: {what} is not a regular file")
        raise DatasetError(f"{path}: {what} not found")
    return path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} not found (not a directory)")
    return path


def _to_float(value: Any, file: Path, row: int | None, column: str) -> float:
    text = value.strip() if isinstance(value, str) else value
    if text is None or text == "":
        raise DatasetError(f"{_where(file, row)}: {column} is empty")
    try:
        x = float(text)
    except (TypeError, ValueError):
        raise DatasetError(f"{_where(file, row)}: {column} {value!r} is not a number") from None
    if not math.isfinite(x):
        raise DatasetError(f"{_where(file, row)}: {column} {value!r} is not a finite number")
    return x


def _read_csv(
    path: Path, required: Sequence[str], what: str = "label file", delimiter: str | None = None
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Rows of a CSV with a header as (line number, {column: value})."""
    _require_file(path, what)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
    except UnicodeDecodeError:
        with open(path, newline="", encoding="latin-1") as fh:
            text = fh.read()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DatasetError(f"{path}: {what} is empty (no header row)")
    if delimiter is None:
        delimiter = "\t" if "\t" in lines[0] and "," not in lines[0] else ","
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(
                f"{path}: missing column {', '.join(repr(c) for c in missing)} "
                f"(columns: {', '.join(header)})"
            )
        rows: list[tuple[int, dict[str, str]]] = []
        for values in reader:
            if not values or all(not v.strip() for v in values):
                continue
            line = reader.line_num
            if len(values) > len(header):
                raise DatasetError(
                    f"{path}, row {line}: {len(values)} fields but the header has {len(header)}"
                )
            rows.append((line, {h: v.strip() for h, v in zip(header, values, strict=False)}))
    except csv.Error as err:
        raise DatasetError(f"{path}, row {reader.line_num}: malformed CSV ({err})") from None
    return header, rows


class _Resolver:
    """Finds image files under a folder, falling back to a case-insensitive match."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lower: dict[str, Path] | None = None

    def find(self, name: str) -> Path | None:
        rel = name.replace("\\", "/")
        p = Path(rel)
        cand = p if p.is_absolute() else self.folder / rel
        if cand.is_file():
            return cand
        if p.is_absolute():
            return None
        if self._lower is None:
            self._lower = {}
            if self.folder.is_dir():
                for dirpath, _dirs, files in os.walk(self.folder):
                    for f in files:
                        full = Path(dirpath) / f
                        key = full.relative_to(self.folder).as_posix().lower()
                        self._lower.setdefault(key, full)
        return self._lower.get(p.as_posix().lower())


class _Builder:
    """Accumulates items, rejecting duplicates, missing images and bad numbers."""

    def __init__(self, ctx: _Ctx, label_file: Path, image_root: Path) -> None:
        self.ctx = ctx
        self.label_file = label_file
        self.image_root = image_root
        self.resolver = _Resolver(image_root)
        self.rows: list[tuple[int | None, Item]] = []
        self._seen: dict[str, int | None] = {}

    def add(
        self,
        row: int | None,
        name: str,
        mos: float,
        *,
        std: float | None = None,
        ref: str | None = None,
        dist_type: str | None = None,
        dist_level: int | None = None,
        splits: Mapping[str, str] | None = None,
        resolver: _Resolver | None = None,
    ) -> None:
        where = _where(self.label_file, row)
        if not name:
            raise DatasetError(f"{where}: empty image name")
        key = name.replace("\\", "/")
        if key in self._seen:
            first = self._seen[key]
            at = f" (first at row {first})" if first is not None else ""
            raise DatasetError(f"{where}: duplicate image name {name!r}{at}")
        self._seen[key] = row
        path = (resolver or self.resolver).find(name)
        if path is None:
            folder = (resolver or self.resolver).folder
            raise DatasetError(f"{where}: image {name!r} not found in {folder}")
        if std is not None and std < 0:
            raise DatasetError(f"{where}: negative standard deviation {std}")
        item = Item(
            path=path,
            label=float("nan"),
            mos=mos,
            std=std,
            ref=ref,
            dist_type=dist_type,
            dist_level=dist_level,
            name=key,
            splits=dict(splits or {}),
        )
        self.rows.append((row, item))

    def build(
        self, scale: tuple[float, float] | None, higher_is_better: bool, root: Path | None = None
    ) -> Dataset:
        """Normalise labels (``scale`` = documented range, or the option) into a Dataset."""
        ctx = self.ctx
        if not self.rows:
            raise DatasetError(f"{self.label_file}: no rated images (empty dataset)")
        if ctx.mos_range is not None:
            scale = ctx.mos_range
        if ctx.higher_is_better is not None:
            higher_is_better = ctx.higher_is_better
        if scale is None:
            values = [it.mos for _, it in self.rows]
            lo, hi = min(values), max(values)
            if hi <= lo:
                raise DatasetError(
                    f"{self.label_file}: all MOS values are equal ({lo}); pass mos_range=LO,HI"
                )
        else:
            lo, hi = scale
            tol = 1e-6 * (hi - lo)
            for row, it in self.rows:
                if not lo - tol <= it.mos <= hi + tol:
                    raise DatasetError(
                        f"{_where(self.label_file, row)}: MOS {it.mos:g} outside the scale "
                        f"{lo:g}..{hi:g} of {ctx.kind} (pass mos_range=LO,HI to override)"
                    )
        items = []
        for _, it in self.rows:
            x = min(1.0, max(0.0, (it.mos - lo) / (hi - lo)))
            items.append(replace(it, label=x if higher_is_better else 1.0 - x))
        if ctx.split is not None:
            probe = Dataset(items, ctx.kind, root or ctx.path, self.image_root, spec=ctx.spec)
            column = _pick_split_column(probe, ctx.split_column, str(self.label_file))
            items = [it for it in items if it.splits.get(column) == ctx.split]
            if not items:
                raise DatasetError(
                    f"{self.label_file}: no item has {column}={ctx.split!r} (empty dataset)"
                )
        return Dataset(items, ctx.kind, root or ctx.path, self.image_root, spec=ctx.spec)


def _pick_split_column(dataset: Dataset, column: str | None, where: str) -> str:
    cols = dataset.split_columns
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


def _image_dir(ctx: _Ctx, root: Path, default: str) -> Path:
    return _require_dir(root / (ctx.image_dir or default), "image folder")


# --- adapters --------------------------------------------------------------------------------

_CLIVE_PRACTICE = 7


def _load_mat(path: Path, key: str) -> np.ndarray:
    import scipy.io

    _require_file(path, "label file")
    try:
        data = scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise DatasetError(f"{path}: MATLAB v7.3 files are not supported; save as -v7") from None
    except (OSError, ValueError, TypeError) as err:
        raise DatasetError(f"{path}: cannot read MATLAB file ({err})") from None
    if key not in data:
        keys = ", ".join(k for k in data if not k.startswith("__"))
        raise DatasetError(f"{path}: missing variable {key!r} (variables: {keys})")
    return np.asarray(data[key])


def _mat_strings(arr: np.ndarray, path: Path) -> list[str]:
    out = []
    for i, cell in enumerate(arr.ravel()):
        v = cell
        while isinstance(v, np.ndarray):
            if v.size != 1:
                if v.dtype.kind == "U" and v.size == 0:
                    v = ""
                    break
                raise DatasetError(f"{path}, row {i + 1}: image name is not a string")
            v = v.ravel()[0]
        out.append(str(v).strip())
    return out


def _adapt_clive(ctx: _Ctx) -> Dataset:
    """LIVE In the Wild Challenge: ``Data/*.mat`` + ``Images/``; practice images dropped."""
    root = _require_dir(ctx.path, "CLIVE folder")
    data = root / "Data"
    f_names = data / "AllImages_release.mat"
    f_mos = data / "AllMOS_release.mat"
    f_std = data / "AllStdDev_release.mat"
    names = _mat_strings(_load_mat(f_names, "AllImages_release"), f_names)
    mos = _load_mat(f_mos, "AllMOS_release").ravel()
    std: np.ndarray | None = None
    if f_std.exists():
        std = _load_mat(f_std, "AllStdDev_release").ravel()
    if mos.size != len(names):
        raise DatasetError(f"{f_mos}: {mos.size} MOS values but {f_names.name} lists {len(names)}")
    if std is not None and std.size != len(names):
        raise DatasetError(f"{f_std}: {std.size} values but {f_names.name} lists {len(names)}")
    b = _Builder(ctx, f_names, _image_dir(ctx, root, "Images"))
    for i in range(_CLIVE_PRACTICE, len(names)):
        row = i + 1  # 1-based entry of the .mat arrays
        m = _to_float(mos[i], f_mos, row, "MOS")
        s = _to_float(std[i], f_std, row, "std") if std is not None else None
        b.add(row, names[i], m, std=s)
    return b.build((0.0, 100.0), True, root)


def _adapt_koniq(ctx: _Ctx) -> Dataset:
    """KonIQ-10k: ``koniq10k_scores_and_distributions.csv`` + ``1024x768/`` (or 512x384)."""
    root = _require_dir(ctx.path, "KonIQ-10k folder")
    label_file = root / "koniq10k_scores_and_distributions.csv"
    _, rows = _read_csv(label_file, ["image_name", "MOS"])
    if ctx.image_dir is None:
        res = ctx.resolution
        if res is None:
            res = "1024x768" if (root / "1024x768").is_dir() else "512x384"
        if res not in ("1024x768", "512x384"):
            raise DatasetError(f"{ctx.spec}: resolution must be 1024x768 or 512x384, not {res!r}")
        ctx.image_dir = res
    b = _Builder(ctx, label_file, _image_dir(ctx, root, "1024x768"))
    for line, r in rows:
        std = _to_float(r["SD"], label_file, line, "SD") if r.get("SD") else None
        b.add(line, r["image_name"], _to_float(r["MOS"], label_file, line, "MOS"), std=std)
    return b.build((1.0, 5.0), True, root)


_KADID_RE = re.compile(r"^I(\d+)_(\d+)_(\d+)\.[A-Za-z0-9]+$", re.IGNORECASE)


def _adapt_kadid(ctx: _Ctx) -> Dataset:
    """KADID-10k (and ``grmpiqa synth`` output): ``dmos.csv`` + ``images/``."""
    root = _require_dir(ctx.path, "KADID folder")
    label_file = root / "dmos.csv"
    _, rows = _read_csv(label_file, ["dist_img", "ref_img", "dmos"])
    b = _Builder(ctx, label_file, _image_dir(ctx, root, "images"))
    for line, r in rows:
        name = r["dist_img"]
        m = _KADID_RE.match(Path(name).name)
        if m is None:
            raise DatasetError(
                f"{label_file}, row {line}: dist_img {name!r} is not named I<ref>_<type>_<level>"
            )
        var = _to_float(r["var"], label_file, line, "var") if r.get("var") else None
        if var is not None and var < 0:
            raise DatasetError(f"{label_file}, row {line}: negative var {var}")
        b.add(
            line,
            name,
            _to_float(r["dmos"], label_file, line, "dmos"),
            std=math.sqrt(var) if var is not None else None,
            ref=m.group(1),
            dist_type=m.group(2),
            dist_level=int(m.group(3)),
        )
    return b.build((1.0, 5.0), True, root)


_TID_RE = re.compile(r"^i(\d+)_(\d+)_(\d+)\.[A-Za-z0-9]+$", re.IGNORECASE)


def _adapt_tid2013(ctx: _Ctx) -> Dataset:
    """TID2013: ``mos_with_names.txt`` (``MOS NAME`` lines) + ``distorted_images/``."""
    root = _require_dir(ctx.path, "TID2013 folder")
    label_file = _require_file(root / "mos_with_names.txt", "label file")
    try:
        text = label_file.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as err:
        raise DatasetError(f"{label_file}: cannot read label file ({err.strerror})") from None
    b = _Builder(ctx, label_file, _image_dir(ctx, root, "distorted_images"))
    for line, raw in enumerate(text.splitlines(), start=1):
        parts = raw.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DatasetError(
                f"{label_file}, row {line}: expected 'MOS NAME', got {raw.strip()!r}"
            )
        mos = _to_float(parts[0], label_file, line, "MOS")
        m = _TID_RE.match(parts[1])
        if m is None:
            raise DatasetError(
                f"{label_file}, row {line}: {parts[1]!r} is not named i<ref>_<type>_<level>"
            )
        b.add(
            line,
            parts[1],
            mos,
            ref=m.group(1),
            dist_type=m.group(2),
            dist_level=int(m.group(3)),
        )
    return b.build((0.0, 9.0), True, root)


_SPAQ_LABELS = Path("Annotations") / "MOS and Image attribute scores.xlsx"


def _read_xlsx(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    _require_file(path, "label file")
    try:
        import openpyxl
    except ImportError:
        raise DatasetError(
            f"{path}: reading .xlsx needs openpyxl (pip install 'grmpiqa[xlsx]')"
        ) from None
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # openpyxl raises many types for corrupt files
        raise DatasetError(f"{path}: cannot read spreadsheet ({err})") from None
    try:
        ws = wb.worksheets[0]
        it = ws.iter_rows(values_only=True)
        header = [str(h).strip() if h is not None else "" for h in next(it, ())]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(
                f"{path}: missing column {', '.join(repr(c) for c in missing)} "
                f"(columns: {', '.join(h for h in header if h)})"
            )
        rows = []
        for line, values in enumerate(it, start=2):
            if values is None or all(v is None or str(v).strip() == "" for v in values):
                continue
            rows.append((line, dict(zip(header, values, strict=False))))
        return rows
    finally:
        wb.close()


def _adapt_spaq(ctx: _Ctx) -> Dataset:
    """SPAQ: ``Annotations/MOS and Image attribute scores.xlsx`` + ``TestImage/``."""
    root = _require_dir(ctx.path, "SPAQ folder")
    label_file = root / _SPAQ_LABELS
    rows = _read_xlsx(label_file, ["Image name", "MOS"])
    b = _Builder(ctx, label_file, _image_dir(ctx, root, "TestImage"))
    for line, r in rows:
        name = "" if r["Image name"] is None else str(r["Image name"]).strip()
        b.add(line, name, _to_float(r["MOS"], label_file, line, "MOS"))
    return b.build((0.0, 100.0), True, root)


def _adapt_agiqa3k(ctx: _Ctx) -> Dataset:
    """AGIQA-3K: ``data.csv`` (``name``, ``mos_quality``, ``std_quality``) + images."""
    root = _require_dir(ctx.path, "AGIQA-3K folder")
    label_file = root / "data.csv"
    _, rows = _read_csv(label_file, ["name", "mos_quality"])
    if ctx.image_dir is not None:
        image_root = _image_dir(ctx, root, ctx.image_dir)
    else:
        image_root = root
        first = rows[0][1]["name"] if rows else ""
        if (root / "images").is_dir() and not (root / first).is_file():
            image_root = root / "images"
    b = _Builder(ctx, label_file, image_root)
    for line, r in rows:
        std = (
            _to_float(r["std_quality"], label_file, line, "std_quality")
            if r.get("std_quality")
            else None
        )
        mos = _to_float(r["mos_quality"], label_file, line, "mos_quality")
        b.add(line, r["name"], mos, std=std)
    return b.build((0.0, 5.0), True, root)


_PYIQA_NAME_COLS = ("img_name", "dist_name", "image_name", "name", "img_path")
_PYIQA_MOS_COLS = ("mos", "MOS", "dmos", "DMOS", "mos_quality")


def _split_cols(header: Sequence[str]) -> list[str]:
    return [h for h in header if "split" in h.lower()]


def _adapt_pyiqa(ctx: _Ctx) -> Dataset:
    """pyiqa meta-info CSV (``img_name, mos[, std][, split...]``) + an image root."""
    label_file = ctx.path
    header, rows = _read_csv(label_file, [], what="meta-info file")
    name_col = next((c for c in _PYIQA_NAME_COLS if c in header), None)
    mos_col = next((c for c in _PYIQA_MOS_COLS if c in header), None)
    if name_col is None or mos_col is None:
        need = "img_name" if name_col is None else "mos"
        raise DatasetError(f"{label_file}: missing column {need!r} (columns: {', '.join(header)})")
    image_root = ctx.extra if ctx.extra is not None else label_file.parent
    _require_dir(image_root, "image root")
    split_cols = _split_cols(header)
    b = _Builder(ctx, label_file, image_root)
    for line, r in rows:
        std = _to_float(r["std"], label_file, line, "std") if r.get("std") else None
        ref = None
        if r.get("ref_name"):
            ref = Path(r["ref_name"]).stem
        elif r.get("ref"):
            ref = r["ref"]
        b.add(
            line,
            r[name_col],
            _to_float(r[mos_col], label_file, line, mos_col),
            std=std,
            ref=ref,
            dist_type=r.get("dist_type") or None,
            dist_level=_opt_int(r.get("dist_level"), label_file, line),
            splits={c: r.get(c, "") for c in split_cols},
        )
    return b.build(None, True)


def _opt_int(value: str | None, file: Path, row: int) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(float(value))
    except ValueError:
        raise DatasetError(f"{file}, row {row}: dist_level {value!r} is not a number") from None


def _adapt_csv(ctx: _Ctx) -> Dataset:
    """Generic CSV: ``path, mos[, std][, split...][, ref, dist_type, dist_level]``."""
    label_file = ctx.path
    header, rows = _read_csv(label_file, ["path", "mos"])
    image_root = label_file.parent
    if ctx.image_dir is not None:
        image_root = _require_dir(image_root / ctx.image_dir, "image folder")
    split_cols = _split_cols(header)
    b = _Builder(ctx, label_file, image_root)
    for line, r in rows:
        std = _to_float(r["std"], label_file, line, "std") if r.get("std") else None
        b.add(
            line,
            r["path"],
            _to_float(r["mos"], label_file, line, "mos"),
            std=std,
            ref=r.get("ref") or None,
            dist_type=r.get("dist_type") or None,
            dist_level=_opt_int(r.get("dist_level"), label_file, line),
            splits={c: r.get(c, "") for c in split_cols},
        )
    return b.build(None, True)


def _adapt_folder(ctx: _Ctx) -> Dataset:
    """A folder of images without labels (for scoring); sorted by relative path."""
    root = _require_dir(ctx.path, "image folder")
    files: list[Path] = []
    if ctx.recursive:
        for dirpath, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(Path(dirpath) / n for n in names)
    else:
        files = [p for p in root.iterdir() if p.is_file()]
    rel = sorted(
        p.relative_to(root).as_posix()
        for p in files
        if is_image_file(p) and not p.name.startswith(".")
    )
    if not rel:
        raise DatasetError(f"{root}: no image files (empty dataset)")
    nan = float("nan")
    items = [Item(path=root / r, label=nan, mos=nan, name=r) for r in rel]
    return Dataset(items, "folder", root, root, spec=ctx.spec)


Adapter = Callable[[_Ctx], Dataset]

#: kind -> adapter; the kinds are documented in docs/datasets.md.
ADAPTERS: dict[str, Adapter] = {
    "clive": _adapt_clive,
    "koniq": _adapt_koniq,
    "kadid": _adapt_kadid,
    "tid2013": _adapt_tid2013,
    "spaq": _adapt_spaq,
    "agiqa3k": _adapt_agiqa3k,
    "pyiqa": _adapt_pyiqa,
    "csv": _adapt_csv,
    "folder": _adapt_folder,
}
KINDS: tuple[str, ...] = tuple(ADAPTERS)

_COMMON_OPTIONS = {"mos_range", "higher_is_better"}
_OPTIONS: dict[str, set[str]] = {
    "clive": _COMMON_OPTIONS | {"image_dir"},
    "koniq": _COMMON_OPTIONS | {"image_dir", "resolution"},
    "kadid": _COMMON_OPTIONS | {"image_dir"},
    "tid2013": _COMMON_OPTIONS | {"image_dir"},
    "spaq": _COMMON_OPTIONS | {"image_dir"},
    "agiqa3k": _COMMON_OPTIONS | {"image_dir"},
    "pyiqa": _COMMON_OPTIONS | {"split", "split_column"},
    "csv": _COMMON_OPTIONS | {"image_dir", "split", "split_column"},
    "folder": {"recursive"},
}


def load_dataset(spec: str | os.PathLike[str], **options: Any) -> Dataset:
    """Load a dataset from ``KIND:PATH[?k=v&...]`` (see ``docs/datasets.md``).

    Keyword options (also accepted in the spec's query part, same names):
        mos_range: ``(lo, hi)`` or ``"lo,hi"``, the MOS scale mapped to [0, 1]
            (default: the database's documented scale; for ``csv``/``pyiqa`` the data's
            min and max).
        higher_is_better: ``False`` flips DMOS-style labels (default ``True``).
        image_dir: image folder relative to the database folder (or the CSV's folder).
        resolution: KonIQ image folder, ``"1024x768"`` or ``"512x384"``.
        split, split_column: keep only items whose split column equals ``split``.
        recursive: ``folder`` kind, descend into sub-folders (default ``True``).

    Raises:
        DatasetError: unknown kind or option, missing label file or column, bad MOS,
            duplicate names, labels naming missing images, an empty dataset.
    """
    spec_text = os.fspath(spec)
    kind, path, extra, query = parse_spec(spec_text)
    merged: dict[str, Any] = dict(query)
    merged.update({k: v for k, v in options.items() if v is not None})
    allowed = _OPTIONS[kind]
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise DatasetError(
            f"dataset spec {spec_text!r}: unknown option {', '.join(unknown)} for kind {kind} "
            f"(options: {', '.join(sorted(allowed))})"
        )
    if extra is not None and kind != "pyiqa":
        raise DatasetError(f"dataset spec {spec_text!r}: '::IMAGE_ROOT' is only for pyiqa")
    ctx = _Ctx(
        spec=spec_text,
        kind=kind,
        path=Path(path).expanduser(),
        extra=Path(extra).expanduser() if extra else None,
    )
    if "mos_range" in merged:
        ctx.mos_range = _parse_range(merged["mos_range"], spec_text)
    if "higher_is_better" in merged:
        hib = merged["higher_is_better"]
        ctx.higher_is_better = _parse_bool(hib, "higher_is_better", spec_text)
    if "recursive" in merged:
        ctx.recursive = _parse_bool(merged["recursive"], "recursive", spec_text)
    for key in ("image_dir", "resolution", "split", "split_column"):
        if key in merged:
            setattr(ctx, key, str(merged[key]))
    if kind in ("pyiqa", "csv"):
        _require_file(ctx.path, "label file" if kind == "csv" else "meta-info file")
    return ADAPTERS[kind](ctx)
