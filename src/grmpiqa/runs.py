"""The run scaffold shared by both training stages: files beside the checkpoint.

A training run writing ``OUT`` (``stage1.safetensors``) keeps two sidecars:

* ``OUT.state.safetensors`` - the resume state: tensors in safetensors, everything else
  as JSON in its header (nothing in it can run code when read);
* ``OUT.log.jsonl`` - one JSON record per line (per task, per epoch, per evaluation).

:class:`RunFiles` names them, refuses to overwrite an existing run unless asked
(``--resume`` / ``--overwrite``), removes temporaries an interrupted write left behind,
writes and reads the state atomically, and compares the *fingerprint* of a saved run
with the current settings, explaining a refused resume field by field. Every problem is
a :class:`~grmpiqa.errors.RunError`.

Example:
    >>> import tempfile, torch
    >>> run = RunFiles(Path(tempfile.mkdtemp()) / "ft.safetensors", kind="finetune")
    >>> run.save_state({"w": torch.zeros(2)}, {"epoch": 3})
    >>> run.load_state().record["epoch"]
    3
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from grmpiqa.errors import RunError
from grmpiqa.utils import (
    atomic_open,
    atomic_path,
    json_safe,
    load_json,
    remove_stale_temporaries,
    write_problem,
)

__all__ = [
    "RunFiles",
    "RunState",
    "diff_records",
    "json_safe",
    "optimizer_from_state",
    "optimizer_to_state",
    "rng_from_state",
    "rng_to_state",
]

_META_KEY = "grmpiqa-run"
STATE_SUFFIX = ".state.safetensors"
LOG_SUFFIX = ".log.jsonl"
LEGACY_STATE_SUFFIX = ".state.pt"


def diff_records(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like records (``a.b: saved X, now Y``)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for k in sorted(set(saved) | set(now), key=str):
            out.extend(diff_records(saved.get(k), now.get(k), f"{prefix}{k}."))
        return out
    return [] if saved == now else [f"{prefix.rstrip('.')}: saved {saved!r}, now {now!r}"]


@dataclass
class RunState:
    """A resume state: named tensors and a JSON record."""

    tensors: dict[str, torch.Tensor]
    record: dict[str, Any]

    def take(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix/`` with the prefix removed."""
        p = prefix + "/"
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}


@dataclass
class RunFiles:
    """The files of one training run writing ``out`` (see the module docstring).

    Args:
        out: the checkpoint the run writes.
        kind: ``"pretrain"`` or ``"finetune"`` (recorded in and checked against the state).
        log: the JSON-lines log (default ``OUT`` with suffix ``.log.jsonl``).
    """

    out: Path
    kind: str
    log: Path = field(default=Path())

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.log == Path():
            self.log = self.out.with_suffix(LOG_SUFFIX)
        self.log = Path(self.log)
        clash = {self.out, self.log} & {self.state, self.legacy_state}
        if clash or self.out == self.log:
            raise RunError(
                f"{self.out}: choose another output name (it clashes with the run's own "
                f"files {self.state.name} / {self.log.name})"
            )

    @property
    def state(self) -> Path:
        return self.out.with_suffix(STATE_SUFFIX)

    @property
    def legacy_state(self) -> Path:
        return self.out.with_suffix(LEGACY_STATE_SUFFIX)

    @property
    def format(self) -> str:
        return f"grmpiqa-{self.kind}-state/2"

    # -- starting a run -------------------------------------------------------------------

    def check_output_path(self) -> None:
        """Refuse outputs that cannot be written (a folder, a parent that is a file, a
        folder without write permission), before any work."""
        for path in (self.out, self.state, self.log):
            if path.is_dir():
                raise RunError(f"{path}: is a folder, not a file name")
            parent = path.parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if parent.exists() and not parent.is_dir():
                raise RunError(f"{path}: cannot write here ({parent} is a file)")
        for path in dict.fromkeys(p.parent for p in (self.out, self.state, self.log)):
            problem = write_problem(path, folder=True)
            if problem:
                raise RunError(f"{self.out}: cannot be written ({problem})")

    def start(self, resume: bool, overwrite: bool) -> bool:
        """Prepare the run's files; return True when there is a state to resume from.

        Removes temporaries of interrupted writes. Without ``resume`` or ``overwrite`` an
        existing checkpoint or state is refused; with ``overwrite`` the old state and
        log are deleted (the checkpoint is replaced at the first save).
        """
        self.check_output_path()
        for path in (self.out, self.state, self.log):
            remove_stale_temporaries(path)
        if resume and not self.state.exists() and self.legacy_state.exists():
            raise RunError(
                f"{self.legacy_state}: a resume state written by grmpiqa 0.1.0 as a pickle, "
                "which grmpiqa no longer loads (a pickle can run code); start the run again "
                "with --overwrite"
            )
        if resume:
            return self.state.exists()
        existing = [p for p in (self.out, self.state, self.legacy_state) if p.exists()]
        if existing and not overwrite:
            raise RunError(
                f"{existing[0]}: already exists (an earlier run); pass --resume to continue "
                "it or --overwrite to start again"
            )
        for path in (self.state, self.legacy_state, self.log):
            if path.exists() and path.is_file():
                path.unlink()
        return False

    # -- resume state ---------------------------------------------------------------------

    def save_state(self, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> None:
        """Write the state atomically (tensors + JSON record)."""
        meta = {"format": self.format, **json_safe(dict(record))}
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(self.state) as tmp:
            save_file(flat, str(tmp), metadata={_META_KEY: json.dumps(meta)})

    def load_state(self, expect: Mapping[str, type | tuple[type, ...]] | None = None) -> RunState:
        """Read the state; :class:`RunError` if it is missing, unreadable or of another kind.

        ``expect``: the record fields the caller reads and their JSON types (dotted keys
        reach into objects), checked by :func:`check_record` before any is used.
        """
        path = self.state
        if not path.is_file():
            raise RunError(f"{path}: no resume state")
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(_META_KEY)
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise RunError(f"{path}: not a readable resume state ({_first_line(err)})") from None
        if raw is None:
            raise RunError(f"{path}: not a grmpiqa resume state (no run record)")
        try:
            record = load_json(raw)
        except ValueError as err:
            raise RunError(f"{path}: corrupt resume state ({err})") from None
        if not isinstance(record, dict) or record.get("format") != self.format:
            found = record.get("format") if isinstance(record, dict) else None
            raise RunError(f"{path}: not a {self.kind} resume state (format {found!r})")
        check_record(record, expect or {}, path)
        return RunState(tensors, record)

    def check_resume(
        self,
        saved: Mapping[str, Any],
        now: Mapping[str, Any],
        hint: str = "",
        first: Sequence[str] = (),
    ) -> None:
        """Refuse to resume when the saved fingerprint differs from the current one.

        Differences under the dotted keys in ``first`` are named before the others (e.g.
        a variant, which also changes the defaults of other fields).
        """
        diffs = diff_records(json_safe(dict(saved)), json_safe(dict(now)))
        diffs.sort(key=lambda d: not any(d.startswith(f"{k}:") for k in first))
        if diffs:
            more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise RunError(
                f"{self.state}: cannot resume, the run differs: {'; '.join(diffs[:3])}{more}"
                + (f"; {hint}" if hint else "")
            )

    # -- log ------------------------------------------------------------------------------

    def append_log(self, record: Mapping[str, Any]) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(json_safe(dict(record))) + "\n")

    def write_log(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace the log with ``records`` (atomically)."""
        with atomic_open(self.log, "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(json_safe(dict(r))) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        """The log's records (unparseable lines, e.g. one cut by a kill, are skipped)."""
        if not self.log.is_file():
            return []
        out = []
        for line in self.log.read_text(encoding="utf-8").splitlines():
            try:
                rec = load_json(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def trim_log(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Keep only the records for which ``keep`` holds (e.g. epochs already done)."""
        if self.log.exists():
            self.write_log([r for r in self.read_log() if keep(r)])


#: A JSON number as ``json.loads`` returns it (a bool is refused where a number is due).
NUMBER = (int, float)
_MISSING = object()


def check_record(
    record: Mapping[str, Any], expect: Mapping[str, type | tuple[type, ...]], path: Path
) -> None:
    """Refuse a resume record whose fields do not have the JSON types the code reads
    (``{"epoch": int, "schedule.lr": NUMBER}``), in one line naming the field."""
    for key, kinds in expect.items():
        value: Any = record
        for part in key.split("."):
            value = value.get(part, _MISSING) if isinstance(value, Mapping) else _MISSING
        allowed = kinds if isinstance(kinds, tuple) else (kinds,)
        if value is _MISSING:
            raise RunError(f"{path}: corrupt resume state (no field {key!r})")
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            want = " or ".join(sorted({_json_type(k) for k in allowed}))
            raise RunError(f"{path}: corrupt resume state ({key} is {_short(value)}, not {want})")


def _json_type(kind: type) -> str:
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        bool: "true/false",
        type(None): "null",
    }.get(kind, kind.__name__)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -- optimiser and RNG state as tensors + JSON ------------------------------------------------


def optimizer_to_state(
    optimizer: torch.optim.Optimizer, prefix: str = "optimizer"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state dict split into tensors (``prefix/ID/NAME``) and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{pid}/{name}"] = value
            else:
                plain.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": json_safe(sd["param_groups"]), "plain": json_safe(plain)}


def optimizer_from_state(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    record: Mapping[str, Any],
    prefix: str = "optimizer",
) -> None:
    """Restore what :func:`optimizer_to_state` saved."""
    state: dict[int, dict[str, Any]] = {}
    p = prefix + "/"
    for key, value in tensors.items():
        if key.startswith(p):
            pid, name = key[len(p) :].split("/", 1)
            state.setdefault(int(pid), {})[name] = value
    for pid, entries in dict(record.get("plain", {})).items():
        state.setdefault(int(pid), {}).update(entries)
    groups = [dict(g) for g in record["param_groups"]]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as err:
        raise RunError(f"the saved optimiser state does not fit ({err})") from None


def rng_to_state(prefix: str = "rng") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global Python, NumPy and torch (CPU, CUDA) generator states."""
    tensors = {f"{prefix}/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}/cuda/{i}"] = s
    py = random.getstate()
    npy = np.random.get_state(legacy=True)
    assert isinstance(npy, tuple)
    record = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    }
    return tensors, record


def rng_from_state(
    tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any], prefix: str = "rng"
) -> None:
    """Restore what :func:`rng_to_state` saved."""
    try:
        py = record["python"]
        random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
        npy = record["numpy"]
        np.random.set_state(
            (
                str(npy[0]),
                np.asarray(npy[1], dtype=np.uint32),
                int(npy[2]),
                int(npy[3]),
                float(npy[4]),
            )
        )
        torch.set_rng_state(tensors[f"{prefix}/torch"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise RunError(f"the saved random generator state is unusable ({err})") from None
    cuda = sorted(k for k in tensors if k.startswith(f"{prefix}/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
