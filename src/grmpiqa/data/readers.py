"""Label-file readers and the path rules of every dataset kind.

Everything here treats a label file as untrusted text: each problem becomes a one-line
:class:`~grmpiqa.errors.DatasetError` that names the file (and row) first, then the
reason, never a traceback. The readers:

- :func:`read_csv` (header + rows; UTF-8 with or without BOM, Latin-1 fallback; comma or
  tab; strict quoting: an unterminated quote names the row where it starts; a row that
  lacks a required field names the row),
- :func:`read_xlsx` (first sheet, via openpyxl),
- :func:`load_mat` / :func:`mat_strings` (MATLAB v5 files, via scipy),

and :class:`ImageResolver`, the one place that turns an image name from a label file
into a file (docs/datasets.md, "Guarantees"):

- names are normalised (``\\`` -> ``/``, ``.`` and empty components dropped) and must
  stay inside the image folder: ``..`` escapes are refused, and so are absolute paths
  unless the kind allows them (``csv`` with ``absolute_paths=1``);
- names with control characters (NUL, newline, ...) are refused;
- when no file has the exact name, a case-insensitive match inside the folder is used
  (TID2013 mixes ``i``/``I`` and ``bmp``/``BMP``);
- two rows may not name the same file: neither the same normalised name, nor two
  spellings of one file (case-insensitive file systems, hard links, symbolic links:
  compared by device and inode after following links). Symbolic links placed inside
  the folder are followed: the folder's owner put them there; a label file alone can
  never reach outside.
"""

from __future__ import annotations

import csv
import math
import os
import posixpath
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grmpiqa.errors import DatasetError

__all__ = [
    "ImageResolver",
    "load_mat",
    "mat_strings",
    "normalize_name",
    "read_csv",
    "read_xlsx",
    "require_dir",
    "require_file",
    "show_columns",
    "to_float",
    "where",
]


def where(file: Path | str, row: int | None) -> str:
    """``FILE, row N`` (or ``FILE``): how every message starts."""
    return f"{file}, row {row}" if row is not None else str(file)


def _os_reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file; else a DatasetError naming it."""
    try:
        if path.is_file():
            return path
        exists = path.exists()
    except (OSError, ValueError) as err:
        reason = _os_reason(err) if isinstance(err, OSError) else str(err)
        raise DatasetError(f"{path}: cannot access {what} ({reason})") from None
    if exists:
        raise DatasetError(f"{path}: {what} is not a regular file")
    raise DatasetError(f"{path}: {what} not found")


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory; else a DatasetError naming it."""
    try:
        ok = path.is_dir()
    except (OSError, ValueError) as err:
        reason = _os_reason(err) if isinstance(err, OSError) else str(err)
        raise DatasetError(f"{path}: cannot access {what} ({reason})") from None
    if not ok:
        raise DatasetError(f"{path}: {what} not found (not a directory)")
    return path


def to_float(value: Any, file: Path, row: int | None, column: str) -> float:
    """A finite float from a label-file cell, or a DatasetError naming file, row, column."""
    if isinstance(value, np.generic):
        value = value.item()
    text = value.strip() if isinstance(value, str) else value
    if text is None or (isinstance(text, str) and text == ""):
        raise DatasetError(f"{where(file, row)}: {column} is empty")
    try:
        x = float(text)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{where(file, row)}: {column} {value!r} is not a number") from None
    if not math.isfinite(x):
        raise DatasetError(f"{where(file, row)}: {column} {value!r} is not a finite number")
    return x


# --- CSV ----------------------------------------------------------------------------------------

Required = Sequence[str] | Callable[[list[str]], Sequence[str]]


def _read_text(path: Path, what: str) -> str:
    require_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read {what} ({_os_reason(err)})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_csv(
    path: Path, required: Required, what: str = "label file", delimiter: str | None = None
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Rows of a CSV with a header as ``(row number, {column: value})``.

    The row number is the 1-based line where the record starts (the header is row 1).
    ``required`` lists columns every row must have a field for (or computes them from
    the header); missing trailing fields of other columns read as ``""``. Blank lines
    are skipped.
    """
    text = _read_text(path, what)
    lines = text.splitlines(keepends=True)
    if not lines or not lines[0].strip():
        raise DatasetError(f"{path}: {what} is empty (no header row)")
    if delimiter is None:
        delimiter = "\t" if "\t" in lines[0] and "," not in lines[0] else ","
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    start = 1
    try:
        header = [h.strip() for h in next(reader)]
        need = list(required(header) if callable(required) else required)
        twice = [c for c in need if header.count(c) > 1]
        if twice:
            raise DatasetError(f"{path}: column {twice[0]!r} appears twice in the header")
        missing = [c for c in need if c not in header]
        if missing:
            raise DatasetError(
                f"{path}: missing column {', '.join(repr(c) for c in missing)} "
                f"(columns: {show_columns(header)})"
            )
        rows: list[tuple[int, dict[str, str]]] = []
        start = reader.line_num + 1
        for values in reader:
            row, start = start, reader.line_num + 1
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) > len(header):
                raise DatasetError(
                    f"{path}, row {row}: {len(values)} fields but the header has {len(header)}"
                )
            record = {h: v.strip() for h, v in zip(header, values, strict=False)}
            absent = [c for c in need if c not in record]
            if absent:
                raise DatasetError(
                    f"{path}, row {row}: {len(values)} field(s) but the header has "
                    f"{len(header)}; no value for {', '.join(repr(c) for c in absent)}"
                )
            for h in header[len(values) :]:
                record[h] = ""
            rows.append((row, record))
    except csv.Error as err:
        reason = f"malformed CSV ({err})"
        if "unexpected end of data" in str(err):
            reason = "unterminated quote (the quoted field runs to the end of the file)"
        raise DatasetError(f"{path}, row {start}: {reason}") from None
    return header, rows


def show_columns(header: Sequence[str], limit: int = 300) -> str:
    """The header for a message: printable, one line, at most ``limit`` characters."""
    text = ", ".join(h if h.isprintable() else repr(h) for h in header if h)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- spreadsheets and MATLAB files -------------------------------------------------------------


def read_xlsx(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """Rows of the first sheet of an ``.xlsx`` file as ``(row number, {column: value})``."""
    require_file(path, "label file")
    try:
        import openpyxl
    except ImportError:
        raise DatasetError(
            f"{path}: reading .xlsx needs openpyxl (pip install 'grmpiqa[xlsx]')"
        ) from None
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # noqa: BLE001 - openpyxl raises many types for corrupt files
        raise DatasetError(f"{path}: cannot read spreadsheet ({type(err).__name__})") from None
    try:
        if not wb.worksheets:
            raise DatasetError(f"{path}: spreadsheet has no sheet")
        ws = wb.worksheets[0]
        it = ws.iter_rows(values_only=True)
        header = [str(h).strip() if h is not None else "" for h in next(it, ())]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(
                f"{path}: missing column {', '.join(repr(c) for c in missing)} "
                f"(columns: {show_columns(header)})"
            )
        rows = []
        for line, values in enumerate(it, start=2):
            if values is None or all(v is None or str(v).strip() == "" for v in values):
                continue
            rows.append((line, dict(zip(header, values, strict=False))))
        return rows
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt sheets fail lazily while iterating
        raise DatasetError(f"{path}: cannot read spreadsheet ({type(err).__name__})") from None
    finally:
        wb.close()


def load_mat(path: Path, key: str) -> np.ndarray:
    """Variable ``key`` of a MATLAB v5 file; any unreadable file is a one-line error."""
    import scipy.io

    require_file(path, "label file")
    try:
        data = scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise DatasetError(f"{path}: MATLAB v7.3 files are not supported; save as -v7") from None
    except Exception as err:  # noqa: BLE001 - scipy raises many types on corrupt files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DatasetError(f"{path}: cannot read MATLAB file ({reason[:200]})") from None
    if key not in data:
        keys = ", ".join(k for k in data if not k.startswith("__")) or "none"
        raise DatasetError(f"{path}: missing variable {key!r} (variables: {keys})")
    return np.asarray(data[key])


def mat_strings(arr: np.ndarray, path: Path) -> list[str]:
    """The strings of a MATLAB cell array (or char matrix rows) as Python strings."""
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
        if not isinstance(v, str | np.str_):
            shown = v.item() if isinstance(v, np.generic) else v
            raise DatasetError(f"{path}, row {i + 1}: image name {shown!r} is not a string")
        out.append(str(v).strip())
    return out


# --- image paths -------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:/")


def normalize_name(name: str) -> str:
    """The canonical spelling of a relative image name: ``/`` separators, no ``.`` or
    empty components, ``a/../b`` collapsed (``./imgs//1.bmp`` -> ``imgs/1.bmp``)."""
    text = name.strip().replace("\\", "/")
    norm = posixpath.normpath(text) if text else ""
    return "" if norm == "." else norm


def _is_absolute(text: str) -> bool:
    return text.startswith("/") or bool(_DRIVE.match(text))


class ImageResolver:
    """Turns image names of one label file into files under ``folder`` (see module doc).

    Args:
        folder: the image folder names are relative to.
        label_file: the file the names come from (for messages).
        absolute_ok: accept absolute paths (``csv`` with ``absolute_paths=1``).
        absolute_hint: added to the message refusing an absolute path.
    """

    def __init__(
        self,
        folder: Path,
        label_file: Path,
        *,
        absolute_ok: bool = False,
        absolute_hint: str = "",
    ) -> None:
        self.folder = folder
        self.label_file = label_file
        self.absolute_ok = absolute_ok
        self.absolute_hint = absolute_hint
        self._lower: dict[str, Path] | None = None
        self._names: dict[str, int | None] = {}
        self._files: dict[tuple[int, int], tuple[str, int | None]] = {}

    def claim(self, name: str, row: int | None) -> tuple[str, Path]:
        """``(normalised name, file)`` for the image ``name`` of row ``row``.

        Raises:
            DatasetError: empty name, control characters, an absolute path or a ``..``
                escape, a missing file, or a name (or file) an earlier row already used.
        """
        at = where(self.label_file, row)
        if not name or not name.strip():
            raise DatasetError(f"{at}: empty image name")
        if _CONTROL.search(name):
            raise DatasetError(f"{at}: image name {name!r} contains control characters")
        text = name.strip().replace("\\", "/")
        if _is_absolute(text):
            if not self.absolute_ok:
                raise DatasetError(
                    f"{at}: absolute image path {name!r} refused; names are relative to "
                    f"{self.folder}{self.absolute_hint}"
                )
            key = posixpath.normpath(text)
            path: Path | None = self._probe(Path(key), at, name)
        else:
            key = normalize_name(text)
            if not key:
                raise DatasetError(f"{at}: image path {name!r} names the image folder, not a file")
            if key == ".." or key.startswith("../"):
                raise DatasetError(
                    f"{at}: image path {name!r} leaves the image folder {self.folder}"
                )
            path = self._find(key, at, name)
        if key in self._names:
            first = self._names[key]
            at_first = f" (first at row {first})" if first is not None else ""
            raise DatasetError(f"{at}: duplicate image name {name!r}{at_first}")
        if path is None:
            raise DatasetError(f"{at}: image {name!r} not found in {self.folder}")
        try:
            st = path.stat()
        except OSError as err:
            raise DatasetError(f"{at}: cannot access image {name!r} ({_os_reason(err)})") from None
        ident = (st.st_dev, st.st_ino)
        if ident in self._files:
            other, first = self._files[ident]
            at_first = f", row {first}" if first is not None else ""
            raise DatasetError(
                f"{at}: image {name!r} is the same file as {other!r}{at_first} "
                "(one image may be listed once)"
            )
        self._names[key] = row
        self._files[ident] = (key, row)
        return key, path

    def _probe(self, cand: Path, at: str, name: str) -> Path | None:
        try:
            return cand if cand.is_file() else None
        except (OSError, ValueError) as err:
            reason = _os_reason(err) if isinstance(err, OSError) else str(err)
            raise DatasetError(f"{at}: cannot access image {name!r} ({reason})") from None

    def _find(self, rel: str, at: str, name: str) -> Path | None:
        hit = self._probe(self.folder / rel, at, name)
        if hit is not None:
            return hit
        if self._lower is None:
            self._lower = {}
            for dirpath, _dirs, files in os.walk(self.folder):
                for f in files:
                    full = Path(dirpath) / f
                    key = full.relative_to(self.folder).as_posix().lower()
                    self._lower.setdefault(key, full)
        found = self._lower.get(rel.lower())
        return found if found is not None and self._probe(found, at, name) else None
