"""Training and evaluation over several processes started by ``torchrun`` (docs/distributed.md).

``torchrun --nproc_per_node N -m grmpiqa pretrain|finetune|evaluate ...`` runs the same
command in N processes; each finds its rank, the world size and its device in the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and joins one process group (:func:`init_from_env`): gloo on the CPU,
``cpu:gloo,cuda:nccl`` on CUDA (gradients over NCCL, small JSON messages over gloo).
Without that environment everything runs in one process exactly as before.

What each stage shares out (the training loops ask :func:`current` for the
:class:`Context`):

* stage 1, ``reptile`` (method.md 6): the tasks of every meta-step go to the ranks by
  task index (:meth:`Context.share_tasks`); every task's ``phi_i - theta`` reaches
  every rank through one all-reduce of a ``[tasks, numel]`` buffer that is zero except
  in the owner's row, and every rank sums the rows in the single-process task order,
  so theta has the same bits as in one process. ``released`` carries one inner model
  from task to task, which cannot be split; every rank runs the whole loop (see
  docs/distributed.md).
* stage 2 (method.md 7): each step's batch is cut into contiguous parts, one per rank
  (:class:`DataParallel`); each rank computes ``g_q`` and ``g_s`` of its part, both are
  summed over ranks in one flat buffer, each weighted by the rank's share of the batch,
  and the quality-aware rule runs once per tensor on the global gradients. Prompt
  dropout draws the full batch's masks on every rank (:func:`replicated_dropout`), so
  every sample sees the mask it sees in one process. The frozen-feature cache is built
  in shares and summed (:func:`grmpiqa.feature_cache.build_feature_cache`).
* evaluate (method.md 8): one split per rank at a time; results gathered on rank 0.

Only rank 0 writes files and shows progress; a rank that fails sends its error to the
others at the next exchange, so every rank stops with that error. Collectives time out
after ``GRMPIQA_DIST_TIMEOUT`` seconds (default 1800), so a rank that hangs or dies
brings the job down instead of blocking it.

Example:
    >>> ctx = current()  # no process group: one process
    >>> (ctx.rank, ctx.world_size, ctx.is_main)
    (0, 1, True)
    >>> list(Context(rank=1, world_size=2).part(5))
    [3, 4]
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from grmpiqa import errors
from grmpiqa.errors import GrmpiqaError
from grmpiqa.log import get_logger
from grmpiqa.runs import RunFiles

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "Context",
    "DataParallel",
    "FollowerRun",
    "RankError",
    "current",
    "init_from_env",
    "local",
    "replicated_dropout",
    "shutdown",
    "timeout_from_env",
]

logger = get_logger("distributed")

T = TypeVar("T")

#: Environment variable with the collective timeout in seconds.
TIMEOUT_ENV = "GRMPIQA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("grmpiqa_local", default=False)
_OWNED = False  # whether init_from_env created the process group (shutdown destroys it)


class RankError(GrmpiqaError):
    """Another rank failed with an error that is not a :class:`GrmpiqaError` (a bug)."""


def timeout_from_env() -> timedelta:
    """The collective timeout: ``$GRMPIQA_DIST_TIMEOUT`` seconds, default 1800."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise GrmpiqaError(f"{TIMEOUT_ENV}={raw!r}: give the collective timeout in seconds (> 0)")
    return timedelta(seconds=seconds)


# -- the rank context ------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """This process's place in the job: rank, world size, local rank, backend.

    ``Context()`` is one process (every method is then a no-op or a plain call).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def part(self, n: int) -> range:
        """This rank's contiguous part of ``n`` positions (the first ``n mod world``
        ranks get one more; a rank may get none)."""
        q, r = divmod(n, self.world_size)
        start = self.rank * q + min(self.rank, r)
        return range(start, start + q + (1 if self.rank < r else 0))

    def owns(self, index: int) -> bool:
        """Whether this rank runs task (or split) ``index`` (``index mod world == rank``)."""
        return index % self.world_size == self.rank

    def describe(self) -> dict[str, Any]:
        """``{"world_size": N}`` (and the backend when N > 1), for checkpoint metadata."""
        if not self.is_distributed:
            return {"world_size": 1}
        return {"world_size": self.world_size, "backend": self.backend}

    # -- collectives (no-ops in one process) ---------------------------------------------

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def _message_device(self) -> torch.device:
        if "gloo" in self.backend:
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def broadcast_json(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` (JSON values; NaN allowed) on every rank."""
        if not self.is_distributed:
            return obj
        dev = self._message_device()
        payload = _encode(obj) if self.is_main else torch.empty(0, dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=dev)
        dist.broadcast(size, src=0)
        if self.is_main:
            buf = payload.to(dev)
        else:
            buf = torch.empty(int(size), dtype=torch.uint8, device=dev)
        dist.broadcast(buf, src=0)
        return obj if self.is_main else _decode(buf)

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON values), in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        dev = self._message_device()
        payload = _encode(obj).to(dev)
        sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=dev))
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
        padded[: payload.numel()] = payload
        bufs = [torch.empty(longest, dtype=torch.uint8, device=dev) for _ in range(self.world_size)]
        dist.all_gather(bufs, padded)
        return [_decode(b[: int(s)]) for b, s in zip(bufs, sizes, strict=True)]

    # -- running work and passing errors on -----------------------------------------------

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and hand its JSON result to every rank; an error of
        rank 0 is raised on every rank (no rank waits for a result that never comes)."""
        if not self.is_distributed:
            return fn()
        if self.is_main:
            try:
                value = fn()
            except Exception as err:
                self.broadcast_json({"error": _error_record(err, self.rank)})
                raise
            self.broadcast_json({"value": value})
            return value
        message = self.broadcast_json()
        if "error" in message:
            raise _rebuild(message["error"])
        return message["value"]  # type: ignore[no-any-return]

    def gather(self, value: Any, error: BaseException | None = None) -> list[Any]:
        """Every rank's JSON ``value`` on every rank, after this rank's work; if any rank
        passes an ``error``, every rank raises the first one (lowest rank)."""
        if not self.is_distributed:
            if error is not None:
                raise error
            return [value]
        if error is not None:
            record = {"error": _error_record(error, self.rank)}
        else:
            record = {"value": value}
        got = self.all_gather_json(record)
        for r, item in enumerate(got):
            if "error" in item:
                if r == self.rank and error is not None:
                    raise error
                raise _rebuild(item["error"])
        return [item["value"] for item in got]

    def start_run(self, run: RunFiles, resume: bool, overwrite: bool) -> bool:
        """:meth:`RunFiles.start` on rank 0 (it may delete files); its answer everywhere."""
        return bool(self.from_main(lambda: run.start(resume, overwrite)))

    def run_files(self, run: RunFiles) -> RunFiles:
        """``run`` on rank 0; on the other ranks a :class:`FollowerRun` that reads the
        same files but never writes them."""
        if self.is_main:
            return run
        return FollowerRun(run.out, run.kind, run.log)

    # -- stage 1: tasks over ranks -------------------------------------------------------

    def share_tasks(
        self,
        order: Sequence[int],
        like: Mapping[str, torch.Tensor],
        run: Callable[[int], tuple[Mapping[str, torch.Tensor], dict[str, Any]]],
    ) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Run the tasks of ``order`` that this rank owns (``t mod world == rank``) and
        return every task's (tensors, record) in ``order`` on every rank.

        ``run(t)`` returns tensors shaped like ``like`` and a JSON record. The tensors
        travel exactly: one all-reduce of a ``[max(order) + 1, numel]`` buffer whose
        rows are zero except the owner's (``x + 0 = x``). The first error of any rank
        is raised on every rank after the exchange.
        """
        names = list(like)
        sizes = [like[n].numel() for n in names]
        first = like[names[0]]
        slots = max(order) + 1 if order else 0
        rows = torch.zeros(slots, sum(sizes), dtype=first.dtype, device=first.device)
        records: dict[str, dict[str, Any]] = {}
        error: BaseException | None = None
        for t in order:
            if not self.owns(t):
                continue
            try:
                tensors, rec = run(t)
            except Exception as err:
                error = err
                break
            rows[t] = torch.cat([tensors[n].reshape(-1).to(rows.dtype) for n in names])
            records[str(t)] = rec
        gathered = self.gather(records, error)
        self.all_reduce_(rows)
        merged: dict[str, dict[str, Any]] = {}
        for part in gathered:
            merged.update(part)
        out = []
        for t in order:
            pieces = torch.split(rows[t], sizes)
            tensors = {n: p.view_as(like[n]) for n, p in zip(names, pieces, strict=True)}
            out.append((tensors, merged[str(t)]))
        return out


def _plain(obj: Any) -> Any:
    """NumPy and torch scalars/arrays as JSON values (``json.dumps`` default)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} cannot be sent to other ranks as JSON")


def _encode(obj: Any) -> torch.Tensor:
    data = json.dumps(obj, allow_nan=True, default=_plain).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode(buf: torch.Tensor) -> Any:
    return json.loads(bytes(buf.cpu().numpy().tobytes()).decode("utf-8"))


def _error_record(err: BaseException | None, rank: int) -> dict[str, Any]:
    assert err is not None
    return {"type": type(err).__name__, "message": str(err), "rank": rank}


def _rebuild(record: Mapping[str, Any]) -> GrmpiqaError:
    """Another rank's error as an exception of this rank (same class for grmpiqa's own)."""
    cls = getattr(errors, str(record.get("type")), None)
    message = str(record.get("message", ""))
    if isinstance(cls, type) and issubclass(cls, GrmpiqaError):
        return cls(message)
    return RankError(f"rank {record.get('rank')} failed: {record.get('type')}: {message}")


class FollowerRun(RunFiles):
    """The run files as ranks other than 0 see them: read (resume), never written."""

    def start(self, resume: bool, overwrite: bool) -> bool:  # pragma: no cover - guard
        raise RuntimeError("only rank 0 starts a run (Context.start_run)")

    def save_state(self, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> None:
        return None

    def append_log(self, record: Mapping[str, Any]) -> None:
        return None

    def write_log(self, records: Any) -> None:
        return None

    def trim_log(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        return None


# -- the process group ------------------------------------------------------------------


def current() -> Context:
    """The context of this process: the initialised process group's rank and size, or
    one process (also inside :func:`local`)."""
    if _LOCAL.get() or not (dist.is_available() and dist.is_initialized()):
        return Context()
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, backend)


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Work inside runs in this process alone (e.g. one evaluation split per rank)."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise GrmpiqaError(f"{name}={raw!r} in the environment is not an integer") from None


def init_from_env(device: str | torch.device = "cpu") -> tuple[Context, torch.device]:
    """Join the job the torchrun environment describes; return (context, this rank's device).

    Without ``WORLD_SIZE`` (or with 1) nothing is initialised and ``device`` is returned
    as given. Otherwise: on CUDA each process takes ``cuda:LOCAL_RANK`` and the backend
    is ``cpu:gloo,cuda:nccl``; on the CPU gloo. The rendezvous is torchrun's
    (``MASTER_ADDR``/``MASTER_PORT``); collectives time out after :func:`timeout_from_env`.
    """
    global _OWNED
    dev = torch.device(device)
    world = _env_int("WORLD_SIZE")
    if dist.is_available() and dist.is_initialized():
        ctx = current()
        return ctx, _rank_device(dev, ctx.local_rank) if ctx.is_distributed else dev
    if world is None or world <= 1:
        return Context(), dev
    rank = _env_int("RANK")
    if rank is None:
        raise GrmpiqaError("WORLD_SIZE is set but RANK is not: launch with torchrun")
    local_rank = _env_int("LOCAL_RANK")
    local_rank = rank if local_rank is None else local_rank
    if not dist.is_available():
        raise GrmpiqaError("this torch build has no torch.distributed")
    dev = _rank_device(dev, local_rank)
    backend = "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "cpu:gloo,cuda:nccl"
    elif dev.type != "cpu":
        raise GrmpiqaError(f"device {dev}: torchrun training runs on cpu or cuda devices")
    dist.init_process_group(backend=backend, timeout=timeout_from_env())
    _OWNED = True
    ctx = current()
    return ctx, dev


def _rank_device(dev: torch.device, local_rank: int) -> torch.device:
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise GrmpiqaError(f"device {dev}: CUDA is not available on this machine")
    if local_rank >= torch.cuda.device_count():
        raise GrmpiqaError(
            f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
            "device(s): start at most that many processes per node"
        )
    if dev.index is not None and dev.index != local_rank:
        logger.info("device %s replaced by cuda:%d (one GPU per rank: LOCAL_RANK)", dev, local_rank)
    return torch.device("cuda", local_rank)


def shutdown() -> None:
    """Leave the process group :func:`init_from_env` created (nothing otherwise)."""
    global _OWNED
    if _OWNED and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a group a peer's death broke
            dist.destroy_process_group()
    _OWNED = False


_BROKEN_LINK = (
    "gloo",
    "nccl",
    "NCCL",
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
)


def peer_failure(err: BaseException) -> str | None:
    """One line saying that a collective failed because another rank died, stopped or
    hung (gloo/NCCL errors, a collective timeout), or None for any other error.

    Each rank reports its own error; this is what the surviving ranks say instead of
    the communication library's traceback.
    """
    if not current().is_distributed:
        return None
    text = str(err).strip()
    dist_errors = tuple(
        getattr(dist, n) for n in ("DistError",) if isinstance(getattr(dist, n, None), type)
    )
    if not (
        (dist_errors and isinstance(err, dist_errors))
        or (isinstance(err, RuntimeError) and any(k in text for k in _BROKEN_LINK))
    ):
        return None
    line = text.splitlines()[0] if text else type(err).__name__
    if line.startswith("[") and "] " in line:  # "[/path/to/pair.cc:545] Read error ..."
        line = line.split("] ", 1)[1]
    line = line.split(". This is typically", 1)[0].strip()
    return (
        f"another rank failed, stopped or hung, so the collective communication broke "
        f"({line[:200]}); that rank's own output says why"
    )


# -- stage 2: data parallelism with the gradient rule intact -------------------------------


@contextlib.contextmanager
def replicated_dropout(module: nn.Module, batch: int, rows: range) -> Iterator[None]:
    """Make every active ``nn.Dropout`` in ``module`` draw the masks of the whole batch
    (``batch`` samples) and apply rows ``rows`` of them to its input.

    The random stream then advances as in one process running the whole batch, and
    each sample gets the mask it gets there (exactly on the CPU, where dropout is
    ``x * bernoulli(1 - p) / (1 - p)`` drawn for the full tensor). Dropout inputs must
    have the batch first, as the projected visual prompts do (method.md 4).
    """
    patched: list[nn.Dropout] = []

    def make(m: nn.Dropout) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not m.training or m.p == 0:
                return x
            if x.shape[0] != len(rows):
                raise RuntimeError(
                    f"dropout input has {x.shape[0]} rows, this rank's part has {len(rows)}"
                )
            ones = torch.ones((batch, *x.shape[1:]), dtype=x.dtype, device=x.device)
            noise = F.dropout(ones, m.p, True)
            return x * noise[rows.start : rows.stop]

        return forward

    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            m.forward = make(m)  # type: ignore[method-assign,assignment]
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class DataParallel:
    """Stage-2 data parallelism (method.md 7) for one model on one rank.

    :meth:`part` gives the samples of a step's batch this rank computes (a contiguous
    part; a rank left without samples computes the first one with weight 0, so its
    random stream keeps pace); :meth:`all_reduce` sums the weighted ``g_q``, ``g_s`` and
    losses of all ranks in one flat buffer. Weights are ``n_r / n`` for a part of
    ``n_r`` of the batch's ``n`` samples, so the result is the full batch's mean-loss
    gradient whatever the parts' sizes.
    """

    def __init__(self, ctx: Context, model: nn.Module) -> None:
        self.ctx = ctx
        self.model = model
        self.weight = 1.0

    @contextlib.contextmanager
    def part(self, batch: Sequence[int]) -> Iterator[list[int]]:
        rows = self.ctx.part(len(batch))
        self.weight = len(rows) / len(batch)
        if len(rows) == 0:
            rows = range(0, 1)
        with replicated_dropout(self.model, len(batch), rows):
            yield [batch[i] for i in rows]

    def all_reduce(
        self,
        gq: Sequence[torch.Tensor | None],
        gs: Sequence[torch.Tensor | None] | None,
        lq: torch.Tensor,
        ls: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None] | None, float, float | None]:
        """(global g_q, global g_s, global L_q, global L_s) from this rank's part.

        A tensor that a loss does not reach (None) is so on every rank (the graph is
        the same everywhere) and stays None.
        """
        w = self.weight
        losses = [lq.detach().float().reshape(1)]
        if ls is not None:
            losses.append(ls.detach().float().reshape(1))
        grads = [g for g in gq if g is not None]
        if gs is not None:
            grads += [g for g in gs if g is not None]
        device = lq.device
        flat = torch.cat(
            [x.to(device) for x in losses]
            + [g.detach().reshape(-1).to(device=device, dtype=torch.float32) for g in grads]
        )
        flat.mul_(w)
        self.ctx.all_reduce_(flat)
        lq_v = float(flat[0])
        ls_v = float(flat[1]) if ls is not None else None
        offset = len(losses)

        def unpack(gl: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
            nonlocal offset
            out: list[torch.Tensor | None] = []
            for g in gl:
                if g is None:
                    out.append(None)
                    continue
                k = g.numel()
                out.append(flat[offset : offset + k].view(g.shape).to(g.dtype))
                offset += k
            return out

        gq_out = unpack(gq)
        gs_out = unpack(gs) if gs is not None else None
        return gq_out, gs_out, lq_v, ls_v
