"""The dataset kinds: each declared once, with :func:`register_kind`, beside its adapter.

A spec is ``KIND:PATH`` (``pyiqa:META.csv::IMAGE_ROOT`` for pyiqa meta-info files),
optionally followed by ``?key=value&key=value`` options. The API accepts the same
string, and the same options as keyword arguments::

    load_dataset("clive:/data/ChallengeDB_release")
    load_dataset("csv:/data/mine.csv?mos_range=0,100&higher_is_better=0")
    load_dataset("csv:/data/mine.csv", mos_range=(0, 100), higher_is_better=False)

The registry record of a kind (:class:`Kind`: name, files, options, documented MOS
scale and direction, path rules) is what :func:`list_kinds` returns, what
``load_dataset`` validates options against and what gives every loaded dataset its
:class:`~grmpiqa.data.datasets.Scale`. Loading reads the label files and checks that
every labelled image exists but decodes no image: decoding errors surface when an item
is loaded, as an :class:`~grmpiqa.errors.ImageError` naming the file. Every problem
with the label files is a :class:`~grmpiqa.errors.DatasetError` whose one-line message
names the file (and row) first, then the reason (docs/datasets.md).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from grmpiqa.data.datasets import Dataset, Item, Scale, pick_split_column
from grmpiqa.data.readers import (
    ImageResolver,
    load_mat,
    mat_strings,
    read_csv,
    read_xlsx,
    require_dir,
    require_file,
    show_columns,
    to_float,
    where,
)
from grmpiqa.errors import DatasetError
from grmpiqa.images import is_image_file
from grmpiqa.log import get_logger

__all__ = [
    "KINDS",
    "OPTIONS",
    "Kind",
    "LoadContext",
    "Option",
    "get_kind",
    "list_kinds",
    "load_dataset",
    "parse_spec",
    "register_kind",
]

_log = get_logger("data")

# --- options ----------------------------------------------------------------------------------

_OPTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^&]*(&[A-Za-z_][A-Za-z0-9_]*=[^&]*)*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


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


def _parse_range(value: Any, key: str, spec: str) -> tuple[float, float]:
    try:
        if isinstance(value, str):
            parts = [float(p) for p in value.replace(":", ",").split(",")]
        else:
            parts = [float(p) for p in value]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 2 or not all(math.isfinite(p) for p in parts) or parts[0] >= parts[1]:
        raise DatasetError(
            f"dataset spec {spec!r}: option {key}={value!r} must be two finite numbers LO,HI "
            "with LO < HI"
        )
    return parts[0], parts[1]


def _parse_str(value: Any, key: str, spec: str) -> str:
    text = str(value)
    if not text or "\x00" in text:
        raise DatasetError(f"dataset spec {spec!r}: option {key}={value!r} is empty or invalid")
    return text


@dataclass(frozen=True)
class Option:
    """A spec option: its name (also the :class:`LoadContext` field), parser and help."""

    name: str
    parse: Callable[[Any, str, str], Any]
    help: str


#: Every option a kind may accept; kinds list the ones they take in :func:`register_kind`.
OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        Option(
            "mos_range",
            _parse_range,
            "LO,HI: the raw scale mapped to [0, 1] (default: the documented scale, or the "
            "data's min and max where none is documented)",
        ),
        Option(
            "higher_is_better",
            _parse_bool,
            "0: the label file holds DMOS-style values (lower is better); labels are flipped",
        ),
        Option("image_dir", _parse_str, "image folder relative to the database/CSV folder"),
        Option("resolution", _parse_str, "KonIQ image folder: 1024x768 or 512x384"),
        Option("split", _parse_str, "keep only the items whose split column equals VALUE"),
        Option("split_column", _parse_str, "which split column split= reads"),
        Option("recursive", _parse_bool, "0: do not descend into sub-folders"),
        Option(
            "absolute_paths",
            _parse_bool,
            "1: accept absolute image paths in the label file (you vouch for the file)",
        ),
    )
}
#: Options every labelled kind takes.
LABEL_OPTIONS: tuple[str, ...] = ("mos_range", "higher_is_better")


@dataclass
class LoadContext:
    """What an adapter gets: the spec, its paths and the parsed options."""

    spec: str
    kind: Kind
    path: Path
    extra: Path | None
    mos_range: tuple[float, float] | None = None
    higher_is_better: bool | None = None
    image_dir: str | None = None
    resolution: str | None = None
    split: str | None = None
    split_column: str | None = None
    recursive: bool = True
    absolute_paths: bool = False

    def image_folder(self, root: Path, default: str) -> Path:
        """``root/image_dir`` (the option, else ``default``), which must be a folder."""
        return require_dir(root / (self.image_dir or default), "image folder")


# --- the registry -------------------------------------------------------------------------------

Adapter = Callable[[LoadContext], Dataset]

#: The path rule of the official layouts (documented in docs/datasets.md).
RELATIVE_ONLY = "names relative to the image folder; absolute paths and '..' escapes are refused"


@dataclass(frozen=True)
class Kind:
    """The record of a dataset kind, as :func:`register_kind` declared it.

    Attributes:
        name: the spec prefix (``clive``).
        title: the database, in words.
        path: what ``PATH`` in ``KIND:PATH`` names (a folder or a label file).
        files: the files read, as distributed.
        mos_range: the documented MOS scale ``(lo, hi)``; ``None``: from the data (or
            the ``mos_range`` option), or unlabelled.
        higher_is_better: the documented direction (``None``: unlabelled).
        mos_name: what the label file calls the score.
        options: the spec options the kind accepts.
        paths: the rule for image paths inside its label files.
        extra_root: accepts ``::IMAGE_ROOT`` after the path (pyiqa).
        adapter: the function that reads it.
    """

    name: str
    title: str
    path: str
    files: str
    mos_range: tuple[float, float] | None
    higher_is_better: bool | None
    mos_name: str | None
    options: tuple[str, ...]
    paths: str
    adapter: Adapter = field(repr=False, compare=False)
    extra_root: bool = False

    @property
    def labelled(self) -> bool:
        return self.higher_is_better is not None

    @property
    def scale(self) -> Scale | None:
        """The documented scale (``None`` when the data or an option decides it)."""
        if self.mos_range is None or self.higher_is_better is None:
            return None
        lo, hi = self.mos_range
        return Scale(lo, hi, self.higher_is_better, self.mos_name or "MOS", "documented")

    def describe_scale(self) -> str:
        """The scale in words, e.g. ``MOS 0..100, higher is better``."""
        if not self.labelled:
            return "unlabelled"
        direction = "higher" if self.higher_is_better else "lower"
        if self.mos_range is None:
            return f"{self.mos_name} on the data's min..max (or mos_range), {direction} is better"
        lo, hi = self.mos_range
        return f"{self.mos_name} {lo:g}..{hi:g}, {direction} is better"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-safe, model-card-like record of the kind."""
        return {
            "name": self.name,
            "title": self.title,
            "path": self.path,
            "files": self.files,
            "labelled": self.labelled,
            "mos_name": self.mos_name,
            "mos_range": list(self.mos_range) if self.mos_range is not None else None,
            "higher_is_better": self.higher_is_better,
            "scale": self.describe_scale(),
            "options": list(self.options),
            "paths": self.paths,
        }


_REGISTRY: dict[str, Kind] = {}


def register_kind(
    name: str,
    *,
    title: str,
    files: str,
    mos_range: tuple[float, float] | None,
    higher_is_better: bool | None = True,
    mos_name: str | None = "MOS",
    options: tuple[str, ...] = (),
    path: str = "database folder",
    paths: str = RELATIVE_ONLY,
    extra_root: bool = False,
) -> Callable[[Adapter], Adapter]:
    """Declare a dataset kind; decorates its adapter ``fn(LoadContext) -> Dataset``.

    Labelled kinds (``higher_is_better`` not ``None``) take ``mos_range`` and
    ``higher_is_better`` besides ``options``.
    """

    def decorate(fn: Adapter) -> Adapter:
        if name in _REGISTRY:
            raise ValueError(f"dataset kind {name!r} registered twice")
        opts = (*(LABEL_OPTIONS if higher_is_better is not None else ()), *options)
        unknown = [o for o in opts if o not in OPTIONS]
        if unknown:
            raise ValueError(f"dataset kind {name!r}: unknown options {unknown}")
        _REGISTRY[name] = Kind(
            name=name,
            title=title,
            path=path,
            files=files,
            mos_range=mos_range,
            higher_is_better=higher_is_better,
            mos_name=mos_name if higher_is_better is not None else None,
            options=opts,
            paths=paths,
            extra_root=extra_root,
            adapter=fn,
        )
        return fn

    return decorate


def list_kinds() -> tuple[Kind, ...]:
    """Every registered kind, in registration order (``kind.as_dict()`` for JSON)."""
    return tuple(_REGISTRY.values())


def get_kind(name: str) -> Kind:
    """The record of kind ``name``; DatasetError for an unknown kind."""
    kind = _REGISTRY.get(name.strip().lower())
    if kind is None:
        raise DatasetError(f"unknown dataset kind {name!r}; known kinds: {', '.join(_REGISTRY)}")
    return kind


# --- building a dataset -------------------------------------------------------------------------


class _Builder:
    """Accumulates items (paths claimed through an :class:`ImageResolver`), then
    normalises the labels on the kind's scale."""

    def __init__(
        self,
        ctx: LoadContext,
        label_file: Path,
        image_root: Path,
        resolver: ImageResolver | None = None,
    ) -> None:
        self.ctx = ctx
        self.label_file = label_file
        self.image_root = image_root
        self.resolver = resolver or ImageResolver(image_root, label_file)
        self.rows: list[tuple[int | None, Item]] = []

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
    ) -> None:
        key, path = self.resolver.claim(name, row)
        if std is not None and std < 0:
            raise DatasetError(f"{where(self.label_file, row)}: negative standard deviation {std}")
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

    def _scale(self, mos_name: str | None) -> Scale:
        ctx, kind = self.ctx, self.ctx.kind
        name = mos_name or kind.mos_name or "MOS"
        hib = kind.higher_is_better if ctx.higher_is_better is None else ctx.higher_is_better
        hib = True if hib is None else hib
        if ctx.mos_range is not None:
            scale = Scale(*ctx.mos_range, hib, name, "option")
        elif kind.mos_range is not None:
            scale = Scale(*kind.mos_range, hib, name, "documented")
        else:
            values = [it.mos for _, it in self.rows]
            lo, hi = min(values), max(values)
            if hi <= lo:
                raise DatasetError(
                    f"{self.label_file}: all MOS values are equal ({lo:g}); pass mos_range=LO,HI"
                )
            return Scale(lo, hi, hib, name, "data")
        tol = 1e-6 * (scale.hi - scale.lo)
        for row, it in self.rows:
            if not scale.lo - tol <= it.mos <= scale.hi + tol:
                raise DatasetError(
                    f"{where(self.label_file, row)}: MOS {it.mos:g} outside the scale "
                    f"{scale.lo:g}..{scale.hi:g} of {kind.name} (pass mos_range=LO,HI to override)"
                )
        return scale

    def build(self, root: Path | None = None, mos_name: str | None = None) -> Dataset:
        """The dataset: labels normalised on the scale, then the ``split`` filter."""
        ctx = self.ctx
        if not self.rows:
            raise DatasetError(f"{self.label_file}: no rated images (empty dataset)")
        scale = self._scale(mos_name)
        items = [replace(it, label=scale.to_label(it.mos)) for _, it in self.rows]
        if ctx.split is not None:
            cols: dict[str, None] = {}
            for it in items:
                cols.update(dict.fromkeys(it.splits))
            column = pick_split_column(list(cols), ctx.split_column, str(self.label_file))
            items = [it for it in items if it.splits.get(column) == ctx.split]
            if not items:
                raise DatasetError(
                    f"{self.label_file}: no item has {column}={ctx.split!r} (empty dataset)"
                )
        if scale.source == "data":
            _log.info(
                "%s: no documented MOS scale; labels use the data's range (%s); pass "
                "mos_range=LO,HI to fix it",
                ctx.spec,
                scale.describe(),
            )
        return Dataset(
            items, ctx.kind.name, root or ctx.path, self.image_root, spec=ctx.spec, scale=scale
        )


def _opt_int(value: str | None, file: Path, row: int, column: str = "dist_level") -> int | None:
    if value is None or value == "":
        return None
    x = to_float(value, file, row, column)
    if x != int(x):
        raise DatasetError(f"{file}, row {row}: {column} {value!r} is not an integer")
    return int(x)


def _exists(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _split_cols(header: list[str]) -> list[str]:
    return [h for h in header if "split" in h.lower()]


# --- the kinds (docs/datasets.md, "Kinds") -------------------------------------------------------

_CLIVE_PRACTICE = 7


@register_kind(
    "clive",
    title="LIVE In the Wild Image Quality Challenge (CLIVE)",
    files="Data/AllImages_release.mat, Data/AllMOS_release.mat, Data/AllStdDev_release.mat "
    "(optional), images in Images/",
    mos_range=(0.0, 100.0),
    options=("image_dir",),
)
def _clive(ctx: LoadContext) -> Dataset:
    """``Data/*.mat`` + ``Images/``; the 7 practice images are dropped."""
    root = require_dir(ctx.path, "CLIVE folder")
    data = root / "Data"
    f_names = data / "AllImages_release.mat"
    f_mos = data / "AllMOS_release.mat"
    f_std = data / "AllStdDev_release.mat"
    names = mat_strings(load_mat(f_names, "AllImages_release"), f_names)
    mos = load_mat(f_mos, "AllMOS_release").ravel()
    std: np.ndarray | None = None
    if _exists(f_std):
        std = load_mat(f_std, "AllStdDev_release").ravel()
    if mos.size != len(names):
        raise DatasetError(f"{f_mos}: {mos.size} MOS values but {f_names.name} lists {len(names)}")
    if std is not None and std.size != len(names):
        raise DatasetError(f"{f_std}: {std.size} values but {f_names.name} lists {len(names)}")
    b = _Builder(ctx, f_names, ctx.image_folder(root, "Images"))
    for i in range(_CLIVE_PRACTICE, len(names)):
        row = i + 1  # 1-based entry of the .mat arrays
        m = to_float(mos[i], f_mos, row, "MOS")
        s = to_float(std[i], f_std, row, "std") if std is not None else None
        b.add(row, names[i], m, std=s)
    return b.build(root)


_KONIQ_RESOLUTIONS = ("1024x768", "512x384")


@register_kind(
    "koniq",
    title="KonIQ-10k",
    files="koniq10k_scores_and_distributions.csv (image_name, c1..c5, c_total, MOS, SD, "
    "MOS_zscore), images in 1024x768/ (or 512x384/)",
    mos_range=(1.0, 5.0),
    options=("image_dir", "resolution"),
)
def _koniq(ctx: LoadContext) -> Dataset:
    """``koniq10k_scores_and_distributions.csv`` + ``1024x768/`` (or ``512x384/``)."""
    root = require_dir(ctx.path, "KonIQ-10k folder")
    label_file = root / "koniq10k_scores_and_distributions.csv"
    _, rows = read_csv(label_file, ["image_name", "MOS"])
    if ctx.image_dir is None:
        res = ctx.resolution
        if res is None:
            res = _KONIQ_RESOLUTIONS[0] if (root / _KONIQ_RESOLUTIONS[0]).is_dir() else "512x384"
        if res not in _KONIQ_RESOLUTIONS:
            raise DatasetError(f"{ctx.spec}: resolution must be 1024x768 or 512x384, not {res!r}")
        ctx.image_dir = res
    b = _Builder(ctx, label_file, ctx.image_folder(root, _KONIQ_RESOLUTIONS[0]))
    for line, r in rows:
        std = to_float(r["SD"], label_file, line, "SD") if r.get("SD") else None
        b.add(line, r["image_name"], to_float(r["MOS"], label_file, line, "MOS"), std=std)
    return b.build(root)


_KADID_RE = re.compile(r"^I(\d+)_(\d+)_(\d+)\.[A-Za-z0-9]+$", re.IGNORECASE)


@register_kind(
    "kadid",
    title="KADID-10k (and the output of grmpiqa synth)",
    files="dmos.csv (dist_img, ref_img, dmos, var), images in images/",
    mos_range=(1.0, 5.0),
    mos_name="dmos",
    options=("image_dir",),
    paths=RELATIVE_ONLY + "; dist_img must be named I<ref>_<type>_<level>.<ext>",
)
def _kadid(ctx: LoadContext) -> Dataset:
    """``dmos.csv`` + ``images/`` (KADID's ``dmos`` is a MOS: higher is better)."""
    root = require_dir(ctx.path, "KADID folder")
    label_file = root / "dmos.csv"
    _, rows = read_csv(label_file, ["dist_img", "ref_img", "dmos"])
    b = _Builder(ctx, label_file, ctx.image_folder(root, "images"))
    for line, r in rows:
        name = r["dist_img"]
        m = _KADID_RE.match(name.replace("\\", "/").rsplit("/", 1)[-1])
        if m is None:
            raise DatasetError(
                f"{label_file}, row {line}: dist_img {name!r} is not named I<ref>_<type>_<level>"
            )
        var = to_float(r["var"], label_file, line, "var") if r.get("var") else None
        if var is not None and var < 0:
            raise DatasetError(f"{label_file}, row {line}: negative var {var}")
        b.add(
            line,
            name,
            to_float(r["dmos"], label_file, line, "dmos"),
            std=math.sqrt(var) if var is not None else None,
            ref=m.group(1),
            dist_type=m.group(2),
            dist_level=int(m.group(3)),
        )
    return b.build(root)


_TID_RE = re.compile(r"^i(\d+)_(\d+)_(\d+)\.[A-Za-z0-9]+$", re.IGNORECASE)


@register_kind(
    "tid2013",
    title="TID2013",
    files="mos_with_names.txt (lines 'MOS NAME'), images in distorted_images/",
    mos_range=(0.0, 9.0),
    options=("image_dir",),
    paths="names i<ref>_<type>_<level>.<ext> inside distorted_images/ (no folders), matched "
    "case-insensitively",
)
def _tid2013(ctx: LoadContext) -> Dataset:
    """``mos_with_names.txt`` (``MOS NAME`` lines) + ``distorted_images/``."""
    root = require_dir(ctx.path, "TID2013 folder")
    label_file = require_file(root / "mos_with_names.txt", "label file")
    try:
        text = label_file.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as err:
        raise DatasetError(f"{label_file}: cannot read label file ({err.strerror})") from None
    b = _Builder(ctx, label_file, ctx.image_folder(root, "distorted_images"))
    for line, raw in enumerate(text.splitlines(), start=1):
        parts = raw.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DatasetError(
                f"{label_file}, row {line}: expected 'MOS NAME', got {raw.strip()[:80]!r}"
            )
        mos = to_float(parts[0], label_file, line, "MOS")
        m = _TID_RE.match(parts[1])
        if m is None:
            raise DatasetError(
                f"{label_file}, row {line}: {parts[1][:80]!r} is not named i<ref>_<type>_<level>"
            )
        b.add(line, parts[1], mos, ref=m.group(1), dist_type=m.group(2), dist_level=int(m.group(3)))
    return b.build(root)


_SPAQ_LABELS = Path("Annotations") / "MOS and Image attribute scores.xlsx"


@register_kind(
    "spaq",
    title="SPAQ (smartphone photography)",
    files="Annotations/MOS and Image attribute scores.xlsx (Image name, MOS), images in TestImage/",
    mos_range=(0.0, 100.0),
    options=("image_dir",),
)
def _spaq(ctx: LoadContext) -> Dataset:
    """``Annotations/MOS and Image attribute scores.xlsx`` + ``TestImage/``."""
    root = require_dir(ctx.path, "SPAQ folder")
    label_file = root / _SPAQ_LABELS
    rows = read_xlsx(label_file, ["Image name", "MOS"])
    b = _Builder(ctx, label_file, ctx.image_folder(root, "TestImage"))
    for line, r in rows:
        name = "" if r["Image name"] is None else str(r["Image name"]).strip()
        b.add(line, name, to_float(r["MOS"], label_file, line, "MOS"))
    return b.build(root)


@register_kind(
    "agiqa3k",
    title="AGIQA-3K (AI-generated images), perceptual quality",
    files="data.csv (name, prompt, adj1, adj2, style, mos_quality, std_quality, mos_align, "
    "std_align), images beside it or in images/",
    mos_range=(0.0, 5.0),
    mos_name="mos_quality",
    options=("image_dir",),
)
def _agiqa3k(ctx: LoadContext) -> Dataset:
    """``data.csv`` (``name``, ``mos_quality``, ``std_quality``) + images."""
    root = require_dir(ctx.path, "AGIQA-3K folder")
    label_file = root / "data.csv"
    _, rows = read_csv(label_file, ["name", "mos_quality"])
    if ctx.image_dir is not None:
        image_root = ctx.image_folder(root, ctx.image_dir)
    else:
        image_root = root
        first = rows[0][1]["name"] if rows else ""
        if (root / "images").is_dir() and not _exists(root / first.replace("\\", "/")):
            image_root = root / "images"
    b = _Builder(ctx, label_file, image_root)
    for line, r in rows:
        std = (
            to_float(r["std_quality"], label_file, line, "std_quality")
            if r.get("std_quality")
            else None
        )
        mos = to_float(r["mos_quality"], label_file, line, "mos_quality")
        b.add(line, r["name"], mos, std=std)
    return b.build(root)


_PYIQA_NAME_COLS = ("img_name", "dist_name", "image_name", "name", "img_path")
_PYIQA_MOS_COLS = ("mos", "MOS", "dmos", "DMOS", "mos_quality")


def _pyiqa_columns(header: list[str], label_file: Path) -> tuple[str, str]:
    name_col = next((c for c in _PYIQA_NAME_COLS if c in header), None)
    mos_col = next((c for c in _PYIQA_MOS_COLS if c in header), None)
    if name_col is None or mos_col is None:
        need = "img_name" if name_col is None else "mos"
        raise DatasetError(
            f"{label_file}: missing column {need!r} (columns: {show_columns(header)})"
        )
    return name_col, mos_col


@register_kind(
    "pyiqa",
    title="a pyiqa meta-info CSV and an image root",
    files="META.csv (img_name, mos[, std][, ref_name][, ...split...]); images under "
    "IMAGE_ROOT (default: the CSV's folder)",
    mos_range=None,
    mos_name="mos",
    options=("split", "split_column"),
    path="meta-info file",
    extra_root=True,
)
def _pyiqa(ctx: LoadContext) -> Dataset:
    """pyiqa meta-info CSV (``img_name, mos[, std][, split...]``) + an image root."""
    label_file = require_file(ctx.path, "meta-info file")
    header, rows = read_csv(
        label_file, lambda h: _pyiqa_columns(h, label_file), what="meta-info file"
    )
    name_col, mos_col = _pyiqa_columns(header, label_file)
    image_root = ctx.extra if ctx.extra is not None else label_file.parent
    require_dir(image_root, "image root")
    split_cols = _split_cols(header)
    b = _Builder(ctx, label_file, image_root)
    for line, r in rows:
        std = to_float(r["std"], label_file, line, "std") if r.get("std") else None
        ref = None
        if r.get("ref_name"):
            ref = Path(r["ref_name"].replace("\\", "/")).stem
        elif r.get("ref"):
            ref = r["ref"]
        b.add(
            line,
            r[name_col],
            to_float(r[mos_col], label_file, line, mos_col),
            std=std,
            ref=ref,
            dist_type=r.get("dist_type") or None,
            dist_level=_opt_int(r.get("dist_level"), label_file, line),
            splits={c: r.get(c, "") for c in split_cols},
        )
    return b.build(mos_name=mos_col)


@register_kind(
    "csv",
    title="your own labelled images: a CSV",
    files="a CSV path, mos[, std][, split...][, ref, dist_type, dist_level]",
    mos_range=None,
    mos_name="mos",
    options=("image_dir", "split", "split_column", "absolute_paths"),
    path="label file",
    paths="paths relative to the CSV's folder (or image_dir); '..' escapes are refused; "
    "absolute paths only with absolute_paths=1",
)
def _csv(ctx: LoadContext) -> Dataset:
    """Generic CSV: ``path, mos[, std][, split...][, ref, dist_type, dist_level]``."""
    label_file = require_file(ctx.path, "label file")
    header, rows = read_csv(label_file, ["path", "mos"])
    image_root = label_file.parent
    if ctx.image_dir is not None:
        image_root = require_dir(image_root / ctx.image_dir, "image folder")
    split_cols = _split_cols(header)
    resolver = ImageResolver(
        image_root,
        label_file,
        absolute_ok=ctx.absolute_paths,
        absolute_hint=" (pass absolute_paths=1 to allow absolute paths)",
    )
    b = _Builder(ctx, label_file, image_root, resolver)
    for line, r in rows:
        std = to_float(r["std"], label_file, line, "std") if r.get("std") else None
        b.add(
            line,
            r["path"],
            to_float(r["mos"], label_file, line, "mos"),
            std=std,
            ref=r.get("ref") or None,
            dist_type=r.get("dist_type") or None,
            dist_level=_opt_int(r.get("dist_level"), label_file, line),
            splits={c: r.get(c, "") for c in split_cols},
        )
    return b.build()


@register_kind(
    "folder",
    title="a folder of images without labels (for scoring)",
    files="every image file under the folder, sorted by relative path",
    mos_range=None,
    higher_is_better=None,
    options=("recursive",),
    path="image folder",
    paths="files found under the folder; hidden files and folders are skipped",
)
def _folder(ctx: LoadContext) -> Dataset:
    """A folder of images without labels (for scoring); sorted by relative path."""
    root = require_dir(ctx.path, "image folder")

    def unreadable(err: OSError) -> NoReturn:
        raise DatasetError(f"{err.filename}: cannot read folder ({_reason(err)})")

    files: list[Path] = []
    try:
        if ctx.recursive:
            for dirpath, dirs, names in os.walk(root, onerror=unreadable):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(Path(dirpath) / n for n in names)
        else:
            files = list(root.iterdir())
    except OSError as err:
        unreadable(err)
    # regular files only (following links): a FIFO named .jpg would block the reader
    rel = sorted(
        p.relative_to(root).as_posix()
        for p in files
        if is_image_file(p) and not p.name.startswith(".") and _exists(p)
    )
    if not rel:
        raise DatasetError(f"{root}: no image files (empty dataset)")
    nan = float("nan")
    items = [Item(path=root / r, label=nan, mos=nan, name=r) for r in rel]
    return Dataset(items, "folder", root, root, spec=ctx.spec)


#: The registered kind names, in registration order.
KINDS: tuple[str, ...] = tuple(_REGISTRY)


# --- spec parsing and loading --------------------------------------------------------------------


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
            f"dataset spec {spec!r}: expected KIND:PATH with KIND one of {', '.join(_REGISTRY)}"
        )
    if kind not in _REGISTRY:
        raise DatasetError(
            f"dataset spec {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(_REGISTRY)}"
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


def load_dataset(spec: str | os.PathLike[str], **options: Any) -> Dataset:
    """Load a dataset from ``KIND:PATH[?k=v&...]`` (see ``docs/datasets.md``).

    Keyword options (also accepted in the spec's query part, same names; the kinds and
    the options each takes are in :func:`list_kinds`):
        mos_range: ``(lo, hi)`` or ``"lo,hi"``, the MOS scale mapped to [0, 1]
            (default: the database's documented scale; for ``csv``/``pyiqa`` the data's
            min and max, logged as inferred).
        higher_is_better: ``False`` flips DMOS-style labels (default ``True``).
        image_dir: image folder relative to the database folder (or the CSV's folder).
        resolution: KonIQ image folder, ``"1024x768"`` or ``"512x384"``.
        split, split_column: keep only items whose split column equals ``split``.
        recursive: ``folder`` kind, descend into sub-folders (default ``True``).
        absolute_paths: ``csv`` kind, accept absolute image paths (default ``False``).

    Raises:
        DatasetError: unknown kind or option, missing or malformed label file or column,
            bad MOS, image paths that leave the image folder, duplicate names or files,
            labels naming missing images, an empty dataset.
    """
    spec_text = os.fspath(spec)
    kind_name, path, extra, query = parse_spec(spec_text)
    kind = _REGISTRY[kind_name]
    merged: dict[str, Any] = dict(query)
    merged.update({k: v for k, v in options.items() if v is not None})
    unknown = sorted(set(merged) - set(kind.options))
    if unknown:
        raise DatasetError(
            f"dataset spec {spec_text!r}: unknown option {', '.join(unknown)} for kind "
            f"{kind.name} (options: {', '.join(sorted(kind.options)) or 'none'})"
        )
    if extra is not None and not kind.extra_root:
        roots = ", ".join(k.name for k in _REGISTRY.values() if k.extra_root)
        raise DatasetError(f"dataset spec {spec_text!r}: '::IMAGE_ROOT' is only for {roots}")
    if "\x00" in path or (extra and "\x00" in extra):
        raise DatasetError(f"dataset spec {spec_text!r}: the path contains a NUL character")
    ctx = LoadContext(
        spec=spec_text,
        kind=kind,
        path=Path(path).expanduser(),
        extra=Path(extra).expanduser() if extra else None,
    )
    for key, value in merged.items():
        setattr(ctx, key, OPTIONS[key].parse(value, key, spec_text))
    return kind.adapter(ctx)
