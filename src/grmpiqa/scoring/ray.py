"""Ray Data: :class:`Scorer` for ``ds.map_batches`` and the ``--engine ray`` runner.

:class:`Scorer` is a callable class; Ray builds one per actor, so the model loads once
per actor::

    import ray, grmpiqa.ray
    ds = ray.data.read_parquet("s3://bucket/index/")          # a "path" column
    ds = ds.map_batches(
        grmpiqa.ray.Scorer,
        fn_constructor_kwargs={"checkpoint": "koniq.safetensors"},
        concurrency=4, num_gpus=1, batch_size=64,
    )

Batches carry image paths (``path_column``) or encoded image bytes (``bytes_column``);
the scorer adds one float column per checkpoint (``score``; NaN for an unreadable
image) and ``error`` (None, or why the image could not be scored): a bad image is an
error row, never a failed job. Scoring goes through the same
:class:`~grmpiqa.scoring.engine.BatchScorer` as the local engine, so scores are
identical. Ray itself is needed only by :func:`score_pending_ray`
(``pip install 'grmpiqa[ray]'``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from grmpiqa.errors import GrmpiqaError
from grmpiqa.images import DEFAULT_MAX_PIXELS
from grmpiqa.log import get_logger
from grmpiqa.scoring.engine import DEFAULT_MAX_BATCH_BYTES, BatchScorer, Result, plan_batches
from grmpiqa.scoring.inputs import ImageSource

log = get_logger("scoring")

#: Internal columns ``grmpiqa score --engine ray`` sends along with ``path``.
_PLAN_COLUMNS = ("_part", "_item", "path", "label", "key", "member", "offset", "size")


def build_models(
    checkpoints: Sequence[str | None],
    backbone: str | None = None,
    pretrained: str | None = None,
    seed: int | None = None,
    model_config: dict[str, Any] | None = None,
    device: str | None = None,
) -> list[Any]:
    """The models of a scoring run, one per checkpoint (``None``: no checkpoint).

    ``pretrained``: an open_clip tag or weights file, ``"random"``, or None for the
    default (the checkpoint's, else the library's).
    """
    import torch

    from grmpiqa.factory import DEFAULT, create_model
    from grmpiqa.model import ModelConfig

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pre: Any = DEFAULT
    if pretrained is not None:
        pre = None if pretrained.lower() in ("random", "none") else pretrained
    config = ModelConfig.from_dict(model_config) if model_config is not None else None
    return [
        create_model(
            backbone=backbone,
            pretrained=pre,
            checkpoint=ckpt,
            device=device,
            seed=seed,
            config=config,
        )
        for ckpt in checkpoints
    ]


class Scorer:
    """Quality scores for Ray Data ``map_batches`` (method.md 1): paths or bytes in,
    score columns and ``error`` out.

    Args:
        checkpoint: one grmpiqa checkpoint (or None: the backbone's zero-shot prompts).
        checkpoints: several checkpoints, one score column each (``score_<name>``).
        names: the score column suffixes for ``checkpoints`` (default 0, 1, ...).
        backbone, pretrained, seed, model_config: as for :func:`grmpiqa.create_model`
            (``pretrained="random"`` for random weights; ``model_config`` a dict).
        device: torch device (default: ``cuda`` when Ray gave this actor a GPU, else cpu).
        precision: ``fp32``, ``bf16`` or ``auto``.
        path_column / bytes_column: where the images are; ``bytes_column`` wins when a
            batch has both. ``name_column`` names images in error messages (default: the
            path column when present).
        num_threads: torch threads in this actor (default: torch's choice).
        decode_threads: threads reading and decoding a batch.
        decode: ``auto`` (nvJPEG on a GPU actor, Pillow on a CPU one), ``pil`` or ``torch``.
        max_batch_bytes: decoded-pixel budget of a batch in bytes (``--max-decoded-mb``).
        keep_bytes: keep the bytes column in the output (default: dropped).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        checkpoints: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
        backbone: str | None = None,
        pretrained: str | None = None,
        seed: int | None = None,
        model_config: dict[str, Any] | None = None,
        device: str | None = None,
        precision: str = "fp32",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reduced_decode: bool = True,
        decode: str = "auto",
        max_batch_bytes: int | None = DEFAULT_MAX_BATCH_BYTES,
        path_column: str = "path",
        bytes_column: str = "bytes",
        name_column: str | None = None,
        num_threads: int | None = None,
        decode_threads: int = 1,
        keep_bytes: bool = False,
    ) -> None:
        import torch

        if checkpoint is not None and checkpoints:
            raise GrmpiqaError("pass checkpoint or checkpoints, not both")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        ckpts: list[str | None] = list(checkpoints) if checkpoints else [checkpoint]
        models = build_models(ckpts, backbone, pretrained, seed, model_config, device)
        cols = None
        if len(ckpts) > 1:
            cols = [f"score_{n}" for n in (names or range(len(ckpts)))]
        self.engine = BatchScorer(
            models,
            names=cols,
            precision=precision,
            max_pixels=max_pixels,
            reduced_decode=reduced_decode,
            decode=decode,
            max_batch_bytes=max_batch_bytes,
        )
        self.path_column = path_column
        self.bytes_column = bytes_column
        self.name_column = name_column
        self.decode_threads = max(1, int(decode_threads))
        self.keep_bytes = keep_bytes

    @property
    def columns(self) -> list[str]:
        return list(self.engine.columns)

    def _items(self, batch: dict[str, Any]) -> list[Any]:
        n = len(next(iter(batch.values()))) if batch else 0
        names = batch.get(self.name_column or self.path_column)
        if self.bytes_column in batch:
            out: list[Any] = []
            for i, data in enumerate(batch[self.bytes_column]):
                label = str(names[i]) if names is not None else f"row {i} of the batch"
                out.append((b"" if data is None else bytes(data), label))
            return out
        if self.path_column not in batch:
            raise GrmpiqaError(
                f"a batch needs a '{self.path_column}' or '{self.bytes_column}' column; got "
                f"{', '.join(map(str, batch))}"
            )
        paths = batch[self.path_column]
        if "offset" in batch:  # grmpiqa score --engine ray: files and tar members
            return [
                ImageSource(
                    str(paths[i]),
                    key=str(batch["key"][i]),
                    offset=int(batch["offset"][i]),
                    size=int(batch["size"][i]),
                    member=str(batch["member"][i]),
                    name=str(batch["label"][i]),
                )
                for i in range(n)
            ]
        return [ImageSource(str(p)) for p in paths]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        items = self._items(batch)
        res = self.engine.score_items(items, self.decode_threads)
        n, k = len(items), len(self.engine.columns)
        scores = np.full((n, k), np.nan, dtype=np.float64)
        if res.indices:
            scores[res.indices] = res.scores.double().numpy()
        errors = np.array([None] * n, dtype=object)
        for i, msg in res.errors:
            errors[i] = msg
        out = {c: v for c, v in batch.items() if c != self.bytes_column or self.keep_bytes}
        for j, name in enumerate(self.engine.columns):
            out[name] = scores[:, j]
        out["error"] = errors
        return out


# -- the --engine ray runner ------------------------------------------------------------------


def import_ray(local: bool) -> Any:
    """Import ray; for a local cluster first make it listen on 127.0.0.1 only.

    Ray binds its servers to the node address; with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
    (read when ray is imported) a local Ray uses the loopback address, as it does on
    laptops, so nothing listens beyond this machine. Usage statistics stay off.
    """
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise GrmpiqaError("--engine ray needs Ray: pip install 'grmpiqa[ray]'") from None
    return ray


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "localhost")


#: Seconds ``--ray-address HOST:PORT`` may take to accept a connection before grmpiqa
#: gives up (Ray's own client would wait and retry for minutes, deaf to SIGTERM).
RAY_CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse, within ``timeout`` seconds, a Ray address (``HOST:PORT`` or
    ``ray://HOST:PORT``) where nothing accepts a connection; ``auto`` is left to Ray
    (it reads the local cluster's address file and fails at once without one)."""
    import socket

    target = address[len("ray://") :] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form only Ray understands
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        why = (
            "timed out"
            if isinstance(err, TimeoutError)
            else (getattr(err, "strerror", None) or str(err))
        )
        raise GrmpiqaError(
            f"--ray-address {address}: no Ray cluster answers there ({why}, waited at most "
            f"{timeout:g} s)"
        ) from None


class RaySession:
    """``ray.init`` (local on 127.0.0.1, or ``address``) unless Ray is already initialised;
    ``close`` shuts down only what it started."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.ray = import_ray(local=address is None)
        self.started = False
        if self.ray.is_initialized():
            return
        # ray.init installs a SIGTERM handler that calls sys.exit in this process; close()
        # puts the previous handlers back (a process forked later, e.g. a worker pool the
        # caller terminates, would otherwise run Python code it inherited from Ray)
        self._handlers = _signal_handlers()
        if address is not None:
            check_reachable(address)
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        try:
            if address is None:
                self.ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
            else:
                self.ray.init(address=address, **kwargs)
        except Exception as err:  # ray raises ConnectionError, RuntimeError, ValueError...
            _restore_signal_handlers(self._handlers)
            raise GrmpiqaError(f"cannot start or reach Ray ({type(err).__name__}: {err})") from None
        self.started = True
        if address is None:
            ip = self.ray.util.get_node_ip_address()
            if not _loopback(ip):
                self.close()
                raise GrmpiqaError(
                    f"the local Ray would listen on {ip}, not 127.0.0.1 (ray was imported before "
                    "grmpiqa could set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); set it in the "
                    "environment or pass --ray-address"
                )
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def resources(self) -> dict[str, float]:
        return dict(self.ray.cluster_resources())

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False
            _restore_signal_handlers(self._handlers)


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _signal_handlers() -> dict[int, Any]:
    """This process's handlers of SIGTERM and SIGINT."""
    return {int(sig): signal.getsignal(sig) for sig in _SIGNALS}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (and Ray's init ran elsewhere too)
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def actor_layout(
    resources: dict[str, float],
    actors: int | None,
    gpus_per_actor: float,
    cpus_per_actor: float | None,
) -> tuple[int, float, float]:
    """(actors, cpus, gpus) per actor: by default one actor per GPU share, or on CPUs one
    actor with every CPU (intra-op threads beat more model copies)."""
    total_cpu = float(resources.get("CPU", 1))
    total_gpu = float(resources.get("GPU", 0))
    if gpus_per_actor < 0 or (cpus_per_actor is not None and cpus_per_actor <= 0):
        raise GrmpiqaError("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")
    if gpus_per_actor > 0 and total_gpu < gpus_per_actor:
        raise GrmpiqaError(
            f"--gpus-per-actor {gpus_per_actor}: the Ray cluster has {total_gpu:g} GPUs"
        )
    if actors is not None and actors < 1:
        raise GrmpiqaError(f"--actors must be at least 1, got {actors}")
    if actors is None:
        if gpus_per_actor > 0:
            actors = max(1, int(total_gpu // gpus_per_actor))
        elif cpus_per_actor is not None:
            actors = max(1, int(total_cpu // cpus_per_actor))
        else:
            actors = 1
    if cpus_per_actor is None:
        cpus_per_actor = 1.0 if gpus_per_actor > 0 else max(1.0, float(int(total_cpu // actors)))
    return actors, float(cpus_per_actor), float(gpus_per_actor)


def score_pending_ray(
    pending: Sequence[tuple[Any, Sequence[int]]],
    scorer_kwargs: dict[str, Any],
    batch_size: int,
    *,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float | None = None,
    progress: bool = False,
    session: RaySession | None = None,
) -> Iterator[list[Result]]:
    """Score the pending items of a plan on Ray Data (an actor pool of :class:`Scorer`).

    Each batch is one Arrow block scored whole (``batch_size=None``), so batches are the
    ones the local engine forms, and scores equal the local engine's. ``session``: a Ray
    connection opened before (``grmpiqa score`` connects before it writes anything);
    closed here at the end either way.
    """
    items, where, batches = plan_batches(pending, batch_size)
    if not batches:
        if session is not None:
            session.close()
        return
    from tqdm.auto import tqdm

    session = session if session is not None else RaySession(address)
    try:
        import pyarrow as pa

        ray = session.ray
        n_actors, cpus, gpus = actor_layout(
            session.resources(), actors, gpus_per_actor, cpus_per_actor
        )
        log.info(
            "Ray: %d actor(s) with %g CPU and %g GPU each, %d batches",
            n_actors,
            cpus,
            gpus,
            len(batches),
        )
        tables = []
        for b in batches:
            srcs: list[ImageSource] = [items[i] for i in b]
            tables.append(
                pa.table(
                    {
                        "_part": pa.array([where[i][0] for i in b], pa.int64()),
                        "_item": pa.array([where[i][1] for i in b], pa.int64()),
                        # actors may run elsewhere: absolute paths, errors named as given
                        "path": pa.array([os.path.abspath(s.path) for s in srcs], pa.string()),
                        "label": pa.array([s.label for s in srcs], pa.string()),
                        "key": pa.array([s.key for s in srcs], pa.string()),
                        "member": pa.array([s.member for s in srcs], pa.string()),
                        "offset": pa.array([s.offset for s in srcs], pa.int64()),
                        "size": pa.array([s.size for s in srcs], pa.int64()),
                    }
                )
            )
        _quiet_ray_data(ray)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        kwargs = dict(scorer_kwargs)
        kwargs.setdefault("num_threads", max(1, int(cpus)))
        kwargs.setdefault("decode_threads", max(1, int(cpus)))
        ds = ray.data.from_arrow(tables).map_batches(
            Scorer,
            fn_constructor_kwargs=kwargs,
            batch_size=None,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=cpus,
            num_gpus=gpus,
        )
        bar = tqdm(total=len(items), unit="img", disable=not progress, dynamic_ncols=True)
        score_cols: list[str] | None = None
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if score_cols is None:
                    score_cols = [c for c in out if c == "score" or c.startswith("score_")]
                results: list[Result] = []
                scores = np.stack([np.asarray(out[c], dtype=np.float64) for c in score_cols], 1)
                for r in range(len(out["_part"])):
                    err = _error_text(out["error"][r])
                    place = (int(out["_part"][r]), int(out["_item"][r]))
                    if err is None:
                        results.append((*place, scores[r].tolist(), None))
                    else:
                        results.append((*place, None, err))
                bar.update(len(results))
                yield results
        finally:
            bar.close()
    except GrmpiqaError:
        raise
    except Exception as err:
        cause = _user_error(err)
        if cause is not None:
            raise cause from None
        raise
    finally:
        session.close()


def _error_text(v: Any) -> str | None:
    """An ``error`` cell as text, or None (Arrow turns an all-None column into nulls/NaN)."""
    if (
        v is None
        or (isinstance(v, float | np.floating) and v != v)
        or (isinstance(v, str) and not v)
    ):
        return None
    return str(v)


def _quiet_ray_data(ray: Any) -> None:
    """Ray Data's console handler logs every execution at INFO; keep warnings only."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger

    for h in logging.getLogger("ray.data").handlers:
        if type(h).__name__ == "PlainRayHandler":
            h.setLevel(logging.WARNING)


def _user_error(err: BaseException) -> GrmpiqaError | None:
    """The GrmpiqaError an actor raised (Ray wraps it), if that is what failed."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, GrmpiqaError):
            return e
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException) and id(cause) not in seen:
            e = cause
            continue
        e = e.__cause__ or e.__context__
    text = str(err)
    if "GrmpiqaError" in text or "CheckpointError" in text or "BackboneError" in text:
        line = next((ln for ln in text.splitlines()[::-1] if "Error:" in ln), text.splitlines()[-1])
        return GrmpiqaError(f"a Ray actor failed: {line.strip()}")
    return None
