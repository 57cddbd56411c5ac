"""Where the images to score come from, and how they are split into parts.

Accepted inputs (``grmpiqa score PATH...``):

* an image file; a folder (walked recursively, regular files with an image extension);
* a glob (``'photos/**/*.jpg'``);
* a list of paths: ``.txt``/``.lst``/``.list`` (one per line, ``#`` comments) or ``.csv``
  (a path column; relative paths are relative to the list's folder);
* a table: ``.parquet`` or ``.csv`` with a path column (``--path-column``, default: the
  first of :data:`PATH_COLUMNS` present) and an optional ``--id-column``;
* webdataset-style tar shards (``'data/shard-{0000..0099}.tar'``, brace expansion; each
  sample's image is the first member with an image extension, keyed by ``__key__``).

Every image becomes an :class:`ImageSource` (a file, or a byte range of a tar shard).
:func:`plan_parts` groups them into :class:`Part` s: one per tar shard, and runs of at
most ``part_size`` images for everything else. Parts are the unit of output and resume.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
import posixpath
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from grmpiqa.errors import GrmpiqaError, ImageError
from grmpiqa.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageInfo,
    check_encoded_size,
    check_regular_file,
    is_image_file,
    load_image,
    probe_image,
)
from grmpiqa.log import get_logger

log = get_logger("scoring")

LIST_SUFFIXES = (".txt", ".csv", ".lst", ".list")
TABLE_SUFFIXES = (".parquet", ".pq")
SHARD_SUFFIXES = (".tar",)
#: Column names recognised as the image path of a .csv list or a table (first match wins).
PATH_COLUMNS = ("path", "img_name", "image", "image_name", "file", "filename", "name")
#: Most names one brace pattern may expand to.
MAX_EXPANSION = 1_000_000


@dataclass(frozen=True)
class ImageSource:
    """One image: a file, or ``size`` bytes at ``offset`` inside the tar shard ``path``.

    ``key`` is the webdataset ``__key__`` of a tar sample; ``id`` the ``--id-column``
    value of a table row; ``origin`` where the path was read from (``LIST row N``), for
    error messages; ``name``, when set, replaces the label errors use.
    """

    path: str
    key: str = ""
    offset: int = -1
    size: int = 0
    member: str = ""
    id: str = ""
    origin: str = ""
    name: str = ""

    @property
    def in_tar(self) -> bool:
        return self.offset >= 0

    @property
    def label(self) -> str:
        """How errors name this image (``name`` when set)."""
        if self.name:
            return self.name
        where = f"{self.path}:{self.member}" if self.in_tar else self.path
        return f"{self.origin}: {where}" if self.origin else where

    @property
    def ident(self) -> str:
        """Identity used by resume (same image, same ident)."""
        return f"{self.path}\0{self.member}" if self.in_tar else self.path

    def read_bytes(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
        """The encoded image (the image pipeline's torch decoders read these); a tar
        member or file larger than any image within ``max_pixels`` is refused unread."""
        if self.in_tar:
            return _member_bytes(self, max_pixels)
        from grmpiqa.pipeline import read_file

        return read_file(self.path, self.label, max_pixels)

    def decode(
        self,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int | None = None,
        max_decoded_bytes: int | None = None,
    ) -> Image.Image:
        """:func:`decode_source` of this source."""
        return decode_source(self, max_pixels, min_side, max_decoded_bytes)


def decode_source(
    src: ImageSource | str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
    max_decoded_bytes: int | None = None,
) -> Image.Image:
    """Decode one image source into an RGB ``PIL.Image`` (or raise :class:`ImageError`).

    Plain files must be regular files (a FIFO named ``x.jpg`` would block forever).
    A tar member larger than any image within ``max_pixels`` could be
    (:func:`grmpiqa.images.check_encoded_size`) is refused before it is read.
    ``min_side``: a large JPEG may decode at a reduced DCT scale down to this short side
    (:func:`grmpiqa.images.load_image`); ``max_decoded_bytes``: refuse larger images.
    """
    if isinstance(src, str):
        src = ImageSource(src)
    if src.in_tar:
        data = _member_bytes(src, max_pixels)
        return load_image(
            data,
            max_pixels,
            name=src.label,
            min_side=min_side,
            max_decoded_bytes=max_decoded_bytes,
        )
    check_regular_file(src.path, src.label)
    return load_image(
        src.path, max_pixels, name=src.label, min_side=min_side, max_decoded_bytes=max_decoded_bytes
    )


def probe_source(
    src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> ImageInfo:
    """The header of one image source (:func:`grmpiqa.images.probe_image`), no pixels."""
    if src.in_tar:
        return probe_image(_member_bytes(src, max_pixels), src.label, max_pixels, min_side=min_side)
    check_regular_file(src.path, src.label)
    return probe_image(src.path, src.label, max_pixels, min_side=min_side)


def _member_bytes(src: ImageSource, max_pixels: int) -> bytes:
    """The bytes of a tar member, after checking its declared size against the limit."""
    check_encoded_size(src.size, max_pixels, src.label)
    try:
        with open(src.path, "rb") as fh:
            fh.seek(src.offset)
            data = fh.read(src.size)
    except OSError as err:
        raise ImageError(f"{src.label}: cannot read shard ({err.strerror or err})") from None
    if len(data) != src.size:
        raise ImageError(f"{src.label}: shard is truncated")
    return data


# -- brace expansion ----------------------------------------------------------------------

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def has_braces(pattern: str) -> bool:
    return _find_group(pattern) is not None


def _find_group(s: str) -> tuple[int, int] | None:
    """(start, end) of the first top-level ``{...}`` group holding ``,`` or ``..``."""
    i = 0
    while i < len(s):
        if s[i] == "{":
            depth = 0
            for j in range(i, len(s)):
                depth += {"{": 1, "}": -1}.get(s[j], 0)
                if depth == 0:
                    body = s[i + 1 : j]
                    if _RANGE.match(body) or _top_level_commas(body):
                        return i, j
                    break
        i += 1
    return None


def _top_level_commas(body: str) -> list[int]:
    depth, out = 0, []
    for k, c in enumerate(body):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            out.append(k)
    return out


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``a{0..2}`` -> a0 a1 a2; ``{00..10}`` keeps the padding;
    ``{x,y}`` -> x y.

    Example:
        >>> expand_braces("shard-{000..002}.tar")
        ['shard-000.tar', 'shard-001.tar', 'shard-002.tar']
        >>> expand_braces("{a,b}{1..2}")
        ['a1', 'a2', 'b1', 'b2']
    """
    group = _find_group(pattern)
    if group is None:
        return [pattern]
    i, j = group
    body = pattern[i + 1 : j]
    m = _RANGE.match(body)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if abs(b - a) + 1 > MAX_EXPANSION:
            raise GrmpiqaError(f"{pattern}: brace range expands to more than {MAX_EXPANSION} names")
        padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-").startswith("0") for t in m.groups())
        width = max(len(m.group(1)), len(m.group(2))) if padded else 0
        step = 1 if b >= a else -1
        alts = [str(n).zfill(width) for n in range(a, b + step, step)]
    else:
        cuts = [-1, *_top_level_commas(body), len(body)]
        alts = [body[cuts[k] + 1 : cuts[k + 1]] for k in range(len(cuts) - 1)]
    out: list[str] = []
    for alt in alts:
        out.extend(expand_braces(pattern[:i] + alt + pattern[j + 1 :]))
        if len(out) > MAX_EXPANSION:
            raise GrmpiqaError(
                f"{pattern}: brace pattern expands to more than {MAX_EXPANSION} names"
            )
    return out


# -- collecting sources ---------------------------------------------------------------------


@dataclass
class InputOptions:
    """How inputs are read (the ``score`` flags of the same names)."""

    path_column: str | None = None
    id_column: str | None = None
    skip_bad: bool = False


@dataclass
class Group:
    """Images of one argument; ``shard`` groups are their own part."""

    source: str
    items: list[ImageSource]
    shard: bool = False


def collect(args: Sequence[str], options: InputOptions | None = None) -> list[Group]:
    """Expand the ``score`` arguments into groups of image sources, in order."""
    opts = options or InputOptions()
    groups: list[Group] = []
    for arg in args:
        if has_braces(arg):
            names = expand_braces(arg)
            for name in names:
                if not Path(name).exists():
                    raise GrmpiqaError(f"{name}: no such file (from the pattern {arg})")
            for name in names:
                groups.extend(_collect_one(name, opts))
        else:
            groups.extend(_collect_one(arg, opts))
    return groups


def collect_paths(args: Sequence[str], options: InputOptions | None = None) -> list[str]:
    """The image paths the arguments name (tar members as ``SHARD:MEMBER``)."""
    return [
        s.path if not s.in_tar else f"{s.path}:{s.member}"
        for g in collect(args, options)
        for s in g.items
    ]


def _collect_one(arg: str, opts: InputOptions) -> list[Group]:
    path = Path(arg)
    if path.is_dir():
        found = walk_images(str(path), skip_bad=opts.skip_bad)
        if not found:
            raise GrmpiqaError(f"{arg}: no image files in this folder")
        return [Group(arg, [ImageSource(p) for p in found])]
    if path.is_file():
        return [_file_group(path, opts)]
    if path.exists() or path.is_symlink():
        if path.exists():
            raise GrmpiqaError(f"{arg}: not a regular file or folder")
        raise GrmpiqaError(f"{arg}: broken symbolic link")
    if glob.has_magic(arg):
        found = sorted(p for p in glob.glob(arg, recursive=True) if Path(p).is_file())
        if not found:
            raise GrmpiqaError(f"{arg}: no files match this pattern")
        groups: list[Group] = []
        plain: list[ImageSource] = []
        for p in found:
            if p.lower().endswith(SHARD_SUFFIXES):
                if plain:
                    groups.append(Group(arg, plain))
                    plain = []
                groups.append(Group(p, list_shard(p, skip_bad=opts.skip_bad), shard=True))
            else:
                plain.append(ImageSource(p))
        if plain:
            groups.append(Group(arg, plain))
        return groups
    raise GrmpiqaError(f"{arg}: no such file or folder")


def _file_group(path: Path, opts: InputOptions) -> Group:
    suffix = path.suffix.lower()
    if suffix in SHARD_SUFFIXES:
        return Group(str(path), list_shard(str(path), skip_bad=opts.skip_bad), shard=True)
    if suffix in TABLE_SUFFIXES:
        return Group(str(path), read_parquet(path, opts.path_column, opts.id_column))
    if suffix in LIST_SUFFIXES:
        return Group(str(path), read_list(path, opts.path_column, opts.id_column))
    return Group(str(path), [ImageSource(str(path))])


def walk_images(root: str, skip_bad: bool = False) -> list[str]:
    """Regular image files under ``root`` (recursively, symlinked folders not followed).

    A sub-folder that cannot be read is an error, or a warning with ``skip_bad``; files
    with an image extension that are not regular files (FIFOs, sockets) are skipped with
    a warning.
    """
    out: list[str] = []

    def visit(folder: str) -> None:
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as err:
            msg = f"{folder}: cannot read folder ({err.strerror or err})"
            if folder == root or not skip_bad:
                extra = "" if folder == root else "; --skip-bad skips it"
                raise GrmpiqaError(msg + extra) from None
            log.warning("%s; skipped (--skip-bad)", msg)
            return
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    visit(e.path)
                elif is_image_file(e.name):
                    if e.is_file():
                        out.append(e.path)
                    else:
                        log.warning("%s: not a regular file, skipped", e.path)
            except OSError as err:
                msg = f"{e.path}: cannot read ({err.strerror or err})"
                if not skip_bad:
                    raise GrmpiqaError(msg) from None
                log.warning("%s; skipped (--skip-bad)", msg)

    visit(root)
    return sorted(out)


def list_shard(path: str, skip_bad: bool = False) -> list[ImageSource]:
    """Samples of an uncompressed webdataset tar shard, in order, one image each.

    A sample is the members sharing a ``__key__`` (the member name up to the first dot of
    its base name); its image is its first member with an image extension. Samples without
    an image are not images to score (counted in a log line).
    """
    samples: dict[str, ImageSource] = {}
    other: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tf:
            try:
                for m in tf:
                    if not m.isfile():
                        continue
                    folder, base = posixpath.split(m.name)
                    stem, dot, ext = base.partition(".")
                    key = posixpath.join(folder, stem) if folder else stem
                    if dot and ("." + ext.lower()) in IMAGE_EXTENSIONS:
                        if key not in samples:
                            samples[key] = ImageSource(
                                path, key=key, offset=m.offset_data, size=m.size, member=m.name
                            )
                    else:
                        other.add(key)
            except (tarfile.TarError, OSError) as err:
                msg = f"{path}: corrupt tar shard after {len(samples)} images ({err})"
                if not skip_bad:
                    raise GrmpiqaError(msg) from None
                log.warning("%s; scoring the images before the damage (--skip-bad)", msg)
    except tarfile.ReadError as err:
        raise GrmpiqaError(f"{path}: not an uncompressed tar shard ({err})") from None
    except (tarfile.TarError, OSError) as err:
        raise GrmpiqaError(f"{path}: cannot read tar shard ({err})") from None
    without = len(other - set(samples))
    if without:
        log.info("%s: %d samples without an image member ignored", path, without)
    if not samples:
        raise GrmpiqaError(f"{path}: no image members in this tar shard")
    return list(samples.values())


def _resolve(base: Path, cell: str) -> str:
    return cell if Path(cell).is_absolute() else str(base / cell)


def read_list(
    path: Path, path_column: str | None = None, id_column: str | None = None
) -> list[ImageSource]:
    """Images of a text list (one path per line) or of a CSV list/table.

    A CSV uses ``path_column`` (or the first of :data:`PATH_COLUMNS` in its header);
    a CSV without a header must start with an image path in its first column.
    Relative paths are relative to the list's folder.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise GrmpiqaError(f"{path}: cannot read list of paths ({err})") from None
    base = path.parent
    out: list[ImageSource] = []
    if path.suffix.lower() != ".csv":
        if id_column:
            raise GrmpiqaError(f"{path}: --id-column needs a .csv or .parquet table")
        for n, ln in enumerate(text.splitlines(), 1):
            cell = ln.strip()
            if cell and not cell.startswith("#"):
                out.append(ImageSource(_resolve(base, cell), origin=f"{path} line {n}"))
        if not out:
            raise GrmpiqaError(f"{path}: empty list of paths")
        return out
    try:
        table = [
            (n, r)
            for n, r in enumerate(csv.reader(io.StringIO(text)), 1)
            if any(c.strip() for c in r)
        ]
    except csv.Error as err:
        raise GrmpiqaError(f"{path}: malformed CSV ({err})") from None
    if not table:
        raise GrmpiqaError(f"{path}: empty list of paths")
    header = [c.strip() for c in table[0][1]]
    lower = [c.lower() for c in header]
    id_col: int | None = None
    if path_column is not None:
        if path_column not in header:
            raise GrmpiqaError(
                f"{path}: no column '{path_column}' (--path-column); columns: {', '.join(header)}"
            )
        col, body = header.index(path_column), table[1:]
    else:
        found = next((lower.index(c) for c in PATH_COLUMNS if c in lower), None)
        if found is not None:
            col, body = found, table[1:]
        elif is_image_file(header[0]) and not id_column:
            col, body = 0, table  # no header: the first column holds the paths
        else:
            raise GrmpiqaError(
                f"{path}: no path column (looked for {', '.join(PATH_COLUMNS)} in the header "
                f"row {', '.join(header)}); name it with --path-column"
            )
    if id_column is not None:
        if id_column not in header:
            raise GrmpiqaError(
                f"{path}: no column '{id_column}' (--id-column); columns: {', '.join(header)}"
            )
        id_col = header.index(id_column)
    for n, row in body:
        cell = row[col].strip() if len(row) > col else ""
        if not cell:
            raise GrmpiqaError(f"{path} row {n}: no path in column '{header[col]}'")
        ident = ""
        if id_col is not None:
            ident = row[id_col].strip() if len(row) > id_col else ""
        out.append(ImageSource(_resolve(base, cell), id=ident, origin=f"{path} row {n}"))
    if not out:
        raise GrmpiqaError(f"{path}: empty list of paths")
    return out


def read_parquet(
    path: Path, path_column: str | None = None, id_column: str | None = None
) -> list[ImageSource]:
    """Images of a Parquet table with a path column (needs pyarrow: ``grmpiqa[parquet]``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GrmpiqaError(
            f"{path}: reading Parquet needs pyarrow (pip install 'grmpiqa[parquet]')"
        ) from None
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise GrmpiqaError(f"{path}: not a readable Parquet file ({err})") from None
    names = list(schema.names)
    if path_column is None:
        path_column = next((n for c in PATH_COLUMNS for n in names if n.lower() == c), None)
        if path_column is None:
            raise GrmpiqaError(
                f"{path}: no path column (looked for {', '.join(PATH_COLUMNS)}; columns: "
                f"{', '.join(names)}); name it with --path-column"
            )
    for col, flag in ((path_column, "--path-column"), (id_column, "--id-column")):
        if col is not None and col not in names:
            raise GrmpiqaError(f"{path}: no column '{col}' ({flag}); columns: {', '.join(names)}")
    _check_path_column_type(path, path_column, schema.field(path_column).type)
    cols = [path_column] + ([id_column] if id_column else [])
    try:
        table = pq.read_table(path, columns=cols)
    except Exception as err:
        raise GrmpiqaError(f"{path}: cannot read Parquet table ({err})") from None
    paths = table.column(path_column).to_pylist()
    ids = table.column(id_column).to_pylist() if id_column else [None] * len(paths)
    base = path.parent
    out: list[ImageSource] = []
    for n, (p, i) in enumerate(zip(paths, ids, strict=True)):
        if p is not None and not isinstance(p, str):
            raise GrmpiqaError(
                f"{path} row {n}: column '{path_column}' holds a {type(p).__name__}, not a path"
            )
        if p is None or not p.strip():
            raise GrmpiqaError(f"{path} row {n}: no path in column '{path_column}'")
        out.append(
            ImageSource(
                _resolve(base, p.strip()), id="" if i is None else str(i), origin=f"{path} row {n}"
            )
        )
    if not out:
        raise GrmpiqaError(f"{path}: empty table")
    return out


def _check_path_column_type(path: Path, column: str, typ: Any) -> None:
    """A Parquet path column must hold text (string, large_string, or a dictionary of them)."""
    import pyarrow as pa

    value_type = typ.value_type if pa.types.is_dictionary(typ) else typ
    if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)):
        raise GrmpiqaError(
            f"{path}: column '{column}' holds {typ} values, not text paths (--path-column "
            "names the column of image paths)"
        )


# -- parts ----------------------------------------------------------------------------------


@dataclass
class Part:
    """A unit of output and resume: ``part-NNNNN`` with its images, in order."""

    index: int
    source: str
    items: list[ImageSource] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    def items_hash(self) -> str:
        """Fingerprint of exactly which images this part holds (resume checks it)."""
        h = hashlib.sha256()
        for s in self.items:
            h.update(s.ident.encode("utf-8", "surrogateescape"))
            h.update(b"\0" + s.id.encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()[:32]


def plan_parts(groups: Sequence[Group], part_size: int = 10_000) -> list[Part]:
    """One part per tar shard; runs of other images cut every ``part_size`` images."""
    if part_size < 1:
        raise GrmpiqaError(f"--part-size must be at least 1, got {part_size}")
    parts: list[Part] = []
    run: list[ImageSource] = []
    run_sources: list[str] = []

    def flush() -> None:
        for start in range(0, len(run), part_size):
            chunk = run[start : start + part_size]
            parts.append(Part(len(parts), _describe(run_sources), chunk))
        run.clear()
        run_sources.clear()

    for g in groups:
        if g.shard:
            flush()
            parts.append(Part(len(parts), g.source, list(g.items)))
        else:
            run.extend(g.items)
            if g.source not in run_sources:
                run_sources.append(g.source)
    flush()
    return parts


def _describe(sources: list[str]) -> str:
    return sources[0] if len(sources) == 1 else f"{sources[0]} (+{len(sources) - 1} more)"
