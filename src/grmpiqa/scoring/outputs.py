"""Where scores go: stdout, one CSV/JSON/Parquet file, or parts in a folder; resume.

Rows have the columns ``path`` (the image file, or the tar shard), ``key`` (the tar
sample's ``__key__``; only when a shard is scored), ``id`` (with ``--id-column``), one
score column per checkpoint (``score``, or ``score_<name>``; ``mos``/``mos_<name>`` with
``--scale mos``) and ``error`` (empty for a
scored image; present with ``--skip-bad`` and always in parts).

* :class:`StdoutSink` streams CSV rows in input order as batches finish.
* :class:`FileSink` (``-o FILE``) appends each finished batch to ``FILE.partial`` (a
  JSON-lines journal, flushed per batch) and writes ``FILE`` atomically at the end from
  all rows in input order, then removes the journal. ``--resume`` skips the images
  already in the journal.
* :class:`PartsSink` (``--out-dir DIR``) writes ``DIR/part-NNNNN.EXT`` atomically as
  each part completes and keeps ``DIR/manifest.json`` (the plan, what is done, the run's
  fingerprint). ``--resume`` keeps every part file whose rows are exactly its planned
  images (read back and compared), so a kill loses at most the parts in flight.

The run's record (its fingerprint: models, prompts, settings; and under ``run`` the
grmpiqa version, engine, device, precision and decoder: how a score was computed) goes
into the manifest, into JSON files (``{"metadata": ..., "rows": [...]}``) and into
Parquet files (schema metadata ``grmpiqa``); CSV has no place for it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grmpiqa.errors import GrmpiqaError
from grmpiqa.log import get_logger
from grmpiqa.scoring.inputs import ImageSource, Part
from grmpiqa.utils import atomic_open, atomic_path, load_json, write_problem

log = get_logger("scoring")

#: Output file suffix -> format.
FORMATS = {".csv": "csv", ".json": "json", ".parquet": "parquet"}
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "grmpiqa-score-manifest/1"
JOURNAL_FORMAT = "grmpiqa-score-journal/1"

#: One result: (part index, item index in the part, scores or None, error or None).
Result = tuple[int, int, list[float] | None, str | None]


def output_format(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise GrmpiqaError(f"{path}: output must end in .csv, .json or .parquet")
    return FORMATS[suffix]


def require_pyarrow(what: str) -> Any:
    try:
        import pyarrow

        return pyarrow
    except ImportError:
        raise GrmpiqaError(f"{what} needs pyarrow (pip install 'grmpiqa[parquet]')") from None


def _first_existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def check_output_file(path: str | os.PathLike[str]) -> str:
    """The format of ``-o PATH``, after checking it can be written (before any scoring)."""
    p = Path(path)
    if p.is_dir():
        raise GrmpiqaError(f"{path}: is a folder; -o needs a file name (or use --out-dir)")
    fmt = output_format(path)
    if p.exists() and not p.is_file():
        raise GrmpiqaError(f"{path}: exists and is not a regular file")
    _check_parent(p.parent, path)
    if fmt == "parquet":
        require_pyarrow(f"{path}: writing Parquet")
    return fmt


def check_output_dir(path: str | os.PathLike[str], fmt: str) -> None:
    """Check ``--out-dir PATH`` can be a folder of parts (before any scoring)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise GrmpiqaError(f"{path}: exists and is not a folder (--out-dir)")
    problem = write_problem(p, folder=True)
    if problem:
        raise GrmpiqaError(f"{path}: {problem} (--out-dir)")
    if fmt == "parquet":
        require_pyarrow(f"{path}: writing Parquet parts")


def _check_parent(parent: Path, target: str | os.PathLike[str]) -> None:
    anc = _first_existing_ancestor(parent)
    if not anc.is_dir():
        raise GrmpiqaError(f"{target}: cannot be created, {anc} is not a folder")
    problem = write_problem(anc, folder=True)
    if problem:
        raise GrmpiqaError(f"{target}: cannot be created, {anc} is not writable ({problem})")


# -- rows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """Which columns rows have."""

    scores: tuple[str, ...] = ("score",)
    key: bool = False
    id: bool = False
    error: bool = False

    def names(self) -> list[str]:
        return (
            ["path"]
            + (["key"] if self.key else [])
            + (["id"] if self.id else [])
            + list(self.scores)
            + (["error"] if self.error else [])
        )


def make_row(
    cols: Columns, src: ImageSource, scores: Sequence[float] | None, error: str | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"path": src.path}
    if cols.key:
        row["key"] = src.key
    if cols.id:
        row["id"] = src.id
    for i, name in enumerate(cols.scores):
        v = None if scores is None else float(scores[i])
        row[name] = None if v is None or math.isnan(v) else v
    if cols.error:
        row["error"] = error or None
    return row


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def rows_to_csv(cols: Columns, rows: Sequence[dict[str, Any]], header: bool = True) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = cols.names()
    if header:
        w.writerow(names)
    for r in rows:
        w.writerow([_csv_cell(r.get(n)) for n in names])
    return buf.getvalue()


def write_rows(
    path: str | os.PathLike[str],
    fmt: str,
    cols: Columns,
    rows: Sequence[dict[str, Any]],
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``rows`` to ``path`` atomically (CSV, JSON or Parquet). ``metadata`` (the
    run's models, prompts and settings, and under ``run`` the device, precision and
    decoder) goes into a JSON file (``{"metadata": ..., "rows": [...]}``; a bare list of
    rows without metadata) and a Parquet file's key-value metadata under ``grmpiqa``; CSV
    has no place for it (the manifest or journal does)."""
    if fmt == "csv":
        with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
            fh.write(rows_to_csv(cols, rows))
    elif fmt == "json":
        data: Any = [{n: r.get(n) for n in cols.names()} for r in rows]
        if metadata is not None:
            data = {"metadata": json.loads(json.dumps(metadata, default=str)), "rows": data}
        with atomic_open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
    elif fmt == "parquet":
        pa = require_pyarrow(f"{path}: writing Parquet")
        import pyarrow.parquet as pq

        fields = []
        for n in cols.names():
            typ = pa.float64() if n in cols.scores else pa.string()
            fields.append(pa.field(n, typ))
        schema = pa.schema(fields)
        if metadata is not None:
            schema = schema.with_metadata({"grmpiqa": json.dumps(metadata, default=str)})
        table = pa.table({n: [r.get(n) for r in rows] for n in cols.names()}, schema=schema)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    else:  # pragma: no cover - formats are checked first
        raise GrmpiqaError(f"unknown output format {fmt!r}")


def read_rows(path: str | os.PathLike[str], fmt: str) -> list[dict[str, Any]]:
    """Rows of a file written by :func:`write_rows` (scores as floats or None)."""
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as fh:
            rows: list[dict[str, Any]] = list(csv.DictReader(fh))
        for r in rows:
            for k, v in r.items():
                if k in ("score", "mos") or k.startswith(("score_", "mos_")):
                    r[k] = float(v) if v != "" else None
                elif v == "" and k == "error":
                    r[k] = None
        return rows
    if fmt == "json":
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            data = data["rows"]
        if not isinstance(data, list):
            raise ValueError("not a list of rows")
        return data
    require_pyarrow(f"{path}: reading Parquet")
    import pyarrow.parquet as pq

    return list(pq.read_table(path).to_pylist())


def read_output_metadata(path: str | os.PathLike[str], fmt: str) -> dict[str, Any] | None:
    """The run metadata of a JSON or Parquet file written by :func:`write_rows` (None
    for CSV, or a file without it)."""
    if fmt == "json":
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        meta = data.get("metadata") if isinstance(data, dict) else None
        return meta if isinstance(meta, dict) else None
    if fmt == "parquet":
        require_pyarrow(f"{path}: reading Parquet")
        import pyarrow.parquet as pq

        raw = (pq.read_schema(path).metadata or {}).get(b"grmpiqa")
        return json.loads(raw) if raw else None
    return None


def cleanup_temporaries(folder: Path, prefix: str) -> None:
    """Remove ``.PREFIX*.tmp`` files a killed atomic write left in ``folder``."""
    if not folder.is_dir():
        return
    for p in folder.glob(f".{prefix}*.tmp"):
        try:
            p.unlink()
            log.info("removed the leftover temporary file %s", p)
        except OSError:
            pass


# -- sinks ----------------------------------------------------------------------------------


class Sink:
    """Receives results (in any order) for the parts of a plan."""

    def __init__(self, parts: Sequence[Part], cols: Columns) -> None:
        self.parts = list(parts)
        self.cols = cols
        self.results: dict[tuple[int, int], tuple[list[float] | None, str | None]] = {}
        self.n_errors = 0

    def pending(self) -> list[tuple[Part, list[int]]]:
        """(part, item indices) still to score."""
        return [(p, list(range(len(p.items)))) for p in self.parts]

    def add(self, results: Sequence[Result]) -> None:
        for part, item, scores, error in results:
            if (part, item) in self.results:
                raise RuntimeError(f"duplicate result for part {part} item {item}")
            self.results[(part, item)] = (scores, error)
            if error:
                self.n_errors += 1
        self._on_added(results)

    def _on_added(self, results: Sequence[Result]) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def row(self, part: Part, i: int) -> dict[str, Any]:
        scores, error = self.results[(part.index, i)]
        return make_row(self.cols, part.items[i], scores, error)


class StdoutSink(Sink):
    """CSV on stdout, each row as soon as every row before it is known."""

    def __init__(self, parts: Sequence[Part], cols: Columns) -> None:
        super().__init__(parts, cols)
        self._order = [(p, i) for p in self.parts for i in range(len(p.items))]
        self._next = 0
        sys.stdout.write(rows_to_csv(cols, []))
        sys.stdout.flush()

    def _on_added(self, results: Sequence[Result]) -> None:
        rows = []
        while self._next < len(self._order):
            p, i = self._order[self._next]
            if (p.index, i) not in self.results:
                break
            rows.append(self.row(p, i))
            del self.results[(p.index, i)]
            self._next += 1
        if rows:
            sys.stdout.write(rows_to_csv(self.cols, rows, header=False))
            sys.stdout.flush()


class FileSink(Sink):
    """``-o FILE``: a journal flushed per batch, the file itself written atomically at the end."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        fmt: str,
        parts: Sequence[Part],
        cols: Columns,
        fingerprint: dict[str, Any],
        resume: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(parts, cols)
        self.metadata = metadata
        self.path = Path(path)
        self.fmt = fmt
        self.journal = self.path.with_name(self.path.name + ".partial")
        self.fingerprint = fingerprint
        cleanup_temporaries(self.path.parent, self.path.name + ".")
        self.done: dict[str, tuple[list[float] | None, str | None]] = {}
        if resume and self.journal.exists():
            self.done = self._read_journal()
            log.info("resuming: %d images already scored in %s", len(self.done), self.journal)
        elif resume:
            log.info("nothing to resume (%s does not exist): scoring everything", self.journal)
        self._fh = open(self.journal, "w" if not self.done else "a", encoding="utf-8")  # noqa: SIM115
        if not self.done:
            self._fh.write(
                json.dumps({"journal": JOURNAL_FORMAT, "fingerprint": fingerprint}) + "\n"
            )
            self._fh.flush()
        self._new = 0

    def _read_journal(self) -> dict[str, tuple[list[float] | None, str | None]]:
        done: dict[str, tuple[list[float] | None, str | None]] = {}
        with open(self.journal, "rb") as fh:
            lines = fh.read().split(b"\n")
        try:
            head = load_json(lines[0])
        except ValueError:
            raise GrmpiqaError(f"{self.journal}: not a grmpiqa score journal") from None
        if not isinstance(head, dict) or head.get("journal") != JOURNAL_FORMAT:
            raise GrmpiqaError(f"{self.journal}: not a grmpiqa score journal")
        if head.get("fingerprint") != self.fingerprint:
            diff = _diff(head.get("fingerprint"), self.fingerprint)
            raise GrmpiqaError(
                f"{self.journal}: written by a run with other settings ({diff}); "
                "run without --resume to start over"
            )
        good = len(lines[0]) + 1
        for ln in lines[1:]:
            if not ln.endswith(b"}"):
                break  # the last line of a killed run may be cut short
            try:
                rec = load_json(ln)
                done[str(rec["s"])] = (rec["v"], rec["e"])
            except (ValueError, KeyError, TypeError):
                break  # what follows a damaged line is scored again
            good += len(ln) + 1
        with open(self.journal, "r+b") as fh:  # drop a cut-short last line before appending
            fh.truncate(good)
        return done

    def pending(self) -> list[tuple[Part, list[int]]]:
        out = []
        for p in self.parts:
            todo = []
            for i, s in enumerate(p.items):
                if s.ident in self.done:
                    self.results[(p.index, i)] = self.done[s.ident]
                else:
                    todo.append(i)
            if todo:
                out.append((p, todo))
        return out

    def _on_added(self, results: Sequence[Result]) -> None:
        lines = []
        for part, item, scores, error in results:
            src = self.parts[part].items[item]
            lines.append(json.dumps({"s": src.ident, "v": scores, "e": error}) + "\n")
        self._fh.write("".join(lines))
        self._fh.flush()
        self._new += len(results)

    def finish(self) -> None:
        rows = [self.row(p, i) for p in self.parts for i in range(len(p.items))]
        write_rows(self.path, self.fmt, self.cols, rows, _file_metadata(self))
        self._fh.close()
        self.journal.unlink(missing_ok=True)
        log.info("wrote %d rows to %s", len(rows), self.path)

    def abort(self) -> None:
        self._fh.close()
        if not self.done and self._new == 0:
            self.journal.unlink(missing_ok=True)
        else:
            log.info(
                "kept %d scored images in %s: rerun the same command with --resume to go on",
                len(self.done) + self._new,
                self.journal,
            )


def _file_metadata(sink: Any) -> dict[str, Any]:
    """What an output file records: the run's fingerprint (models, prompts, settings)
    and, under ``run``, how the scores were computed (device, precision, decoder)."""
    meta = dict(sink.fingerprint)
    if sink.metadata is not None:
        meta["run"] = sink.metadata
    return meta


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return "differ in " + ", ".join(keys)
    return "different run"


class PartsSink(Sink):
    """``--out-dir DIR``: one file per part, written atomically, and ``manifest.json``."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        fmt: str,
        parts: Sequence[Part],
        cols: Columns,
        fingerprint: dict[str, Any],
        resume: bool = False,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(parts, cols)
        self.metadata = metadata
        self.dir = Path(out_dir)
        self.fmt = fmt
        self.fingerprint = fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        cleanup_temporaries(self.dir, "part-")
        cleanup_temporaries(self.dir, MANIFEST + ".")
        self.manifest_path = self.dir / MANIFEST
        self.done: set[int] = set()
        self._counts = {p.index: 0 for p in self.parts}
        self._hashes = {p.index: p.items_hash() for p in self.parts}
        old = self._read_manifest()
        if old is not None and not resume and not overwrite:
            raise GrmpiqaError(
                f"{self.dir}: holds the parts of an earlier run ({MANIFEST}); pass --resume to "
                "go on with it or --overwrite to start over"
            )
        if old is not None and overwrite and not resume:
            for f in self.dir.glob("part-*"):
                f.unlink()
        elif old is not None and resume:
            if old.get("fingerprint") != fingerprint:
                raise GrmpiqaError(
                    f"{self.dir}: written by a run with other settings "
                    f"({_diff(old.get('fingerprint'), fingerprint)}); use another --out-dir or "
                    "--overwrite"
                )
            if old.get("output_format") != fmt:
                raise GrmpiqaError(
                    f"{self.dir}: holds {old.get('output_format')} parts; resume with "
                    f"--format {old.get('output_format')}"
                )
            self._check_same_plan(old)
            self._adopt_existing()
        self._last_manifest = 0.0
        self._write_manifest(force=True)

    def file(self, part: Part) -> Path:
        return self.dir / f"{part.name}.{self.fmt}"

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        try:
            data = load_json(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise GrmpiqaError(f"{self.manifest_path}: unreadable manifest ({err})") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise GrmpiqaError(f"{self.manifest_path}: not a grmpiqa score manifest")
        return data

    def _check_same_plan(self, old: dict[str, Any]) -> None:
        """A resume may rescore a part whose images changed (its file is replaced) and add
        parts, but every part of the earlier plan, and every part file in the folder, must
        be a part of this plan: stale parts would stay mixed in with this run's."""
        planned = {p.name for p in self.parts}
        recorded = old.get("parts")
        before: list[Any] = recorded if isinstance(recorded, list) else []
        stale = [
            str(rec.get("name"))
            for rec in before
            if isinstance(rec, dict) and str(rec.get("name")) not in planned
        ]
        strays = sorted(
            f.name
            for f in self.dir.glob("part-*")
            if f.is_file() and f.name.split(".", 1)[0] not in planned
        )
        problems = [f"{n} was planned before and is not now" for n in stale]
        problems += [
            f"{n} is not a part of this run" for n in strays if n.split(".")[0] not in stale
        ]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise GrmpiqaError(
                f"{self.dir}: cannot resume, the inputs differ from the earlier run "
                f"({problems[0]}{more}); score the same inputs, or pass --overwrite or "
                "another --out-dir"
            )

    def _adopt_existing(self) -> None:
        """Keep part files whose rows are exactly their planned images."""
        kept = 0
        for p in self.parts:
            f = self.file(p)
            if not f.exists():
                continue
            try:
                rows = read_rows(f, self.fmt)
                ok = len(rows) == len(p.items) and all(
                    str(r.get("path")) == s.path
                    and (not self.cols.key or str(r.get("key") or "") == s.key)
                    and (not self.cols.id or str(r.get("id") or "") == s.id)
                    for r, s in zip(rows, p.items, strict=True)
                )
            except Exception:  # an unreadable part is simply scored again
                ok = False
            if ok:
                self.done.add(p.index)
                kept += 1
            else:
                log.warning("%s: does not match its planned images; scoring it again", f)
        log.info("resuming: %d of %d parts already complete", kept, len(self.parts))

    def pending(self) -> list[tuple[Part, list[int]]]:
        return [(p, list(range(len(p.items)))) for p in self.parts if p.index not in self.done]

    def _on_added(self, results: Sequence[Result]) -> None:
        touched = set()
        for part, _, _, _ in results:
            self._counts[part] += 1
            touched.add(part)
        for idx in sorted(touched):
            p = self.parts[idx]
            if self._counts[idx] == len(p.items):
                rows = [self.row(p, i) for i in range(len(p.items))]
                write_rows(self.file(p), self.fmt, self.cols, rows, _file_metadata(self))
                for i in range(len(p.items)):
                    del self.results[(idx, i)]
                self.done.add(idx)
                self._write_manifest()

    def _write_manifest(self, force: bool = False, complete: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_manifest < 1.0:
            return
        self._last_manifest = now
        data = {
            "format": MANIFEST_FORMAT,
            "fingerprint": self.fingerprint,
            "run": self.metadata,
            "output_format": self.fmt,
            "columns": self.cols.names(),
            "complete": complete,
            "images": sum(len(p.items) for p in self.parts),
            "parts": [
                {
                    "name": p.name,
                    "file": self.file(p).name,
                    "source": p.source,
                    "images": len(p.items),
                    "items_hash": self._hashes[p.index],
                    "done": p.index in self.done,
                }
                for p in self.parts
            ],
        }
        with atomic_open(self.manifest_path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")

    def finish(self) -> None:
        missing = [p.name for p in self.parts if p.index not in self.done]
        if missing:  # pragma: no cover - the runner delivers every result
            raise RuntimeError(f"parts never completed: {missing[:5]}")
        self._write_manifest(force=True, complete=True)
        log.info(
            "wrote %d parts (%d rows) to %s",
            len(self.parts),
            sum(len(p.items) for p in self.parts),
            self.dir,
        )

    def abort(self) -> None:
        self._write_manifest(force=True)
        log.info(
            "%d of %d parts complete in %s: rerun the same command with --resume to go on",
            len(self.done),
            len(self.parts),
            self.dir,
        )
