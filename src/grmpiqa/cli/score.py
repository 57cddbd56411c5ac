"""``grmpiqa score PATH...``: one quality score per image, higher is better.

Inputs, outputs and resume are described in :mod:`grmpiqa.scoring.inputs` and
:mod:`grmpiqa.scoring.outputs`; docs/scoring-at-scale.md walks through them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from grmpiqa._version import __version__
from grmpiqa.cli.common import (
    CHECKPOINT_HELP,
    add_backbone_args,
    add_precision_arg,
    add_progress_args,
    add_prompt_args,
    describe_run,
    device_arg,
    scoring_config,
    want_progress,
)
from grmpiqa.config import DEFAULT_MAX_BATCH_BYTES
from grmpiqa.errors import GrmpiqaError, ImageError
from grmpiqa.images import DEFAULT_MAX_PIXELS
from grmpiqa.scoring.inputs import InputOptions, collect, collect_paths, plan_parts
from grmpiqa.scoring.outputs import (
    Columns,
    FileSink,
    PartsSink,
    Result,
    Sink,
    StdoutSink,
    check_output_dir,
    check_output_file,
)

__all__ = ["collect_paths", "register", "run"]

#: Images per part when --out-dir splits a folder, list or table (shards: one part each).
DEFAULT_PART_SIZE = 10_000


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "score",
        help="score images (folders, globs, lists, Parquet/CSV tables, tar shards)",
        description="Print one quality score in (0, 1) per image, higher is better. Folders "
        "are walked recursively; globs, .txt/.csv lists, Parquet/CSV tables and "
        "webdataset tar shards ('shards/shard-{0000..0099}.tar') are accepted. Results go "
        "to stdout, one file (-o) or one part per shard (--out-dir), on this machine or on "
        "Ray (--engine ray). See docs/scoring-at-scale.md.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image, folder, glob, .txt/.csv list, .parquet table, or .tar shard(s) with {a..b}",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        metavar="CKPT",
        help=CHECKPOINT_HELP + "; repeat it for one score column per checkpoint",
    )
    add_prompt_args(p)
    add_backbone_args(p)
    p.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass (default 32)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader processes reading and decoding images (default: CPUs - 1, at most 4 "
        "on the CPU and 16 on CUDA; 0 = in-process)",
    )
    add_precision_arg(p)
    p.add_argument(
        "--decode",
        choices=("auto", "pil", "torch"),
        default="auto",
        help="image decoder: pil (Pillow, the exact reference), torch (JPEGs by torchvision: "
        "nvJPEG on the GPU, batched; other files by Pillow) or auto (torch on CUDA, pil "
        "elsewhere; the default). Scores of the two differ by < 0.005 (docs/gpu.md)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="give unreadable files a row with an empty score and an error instead of stopping",
    )
    p.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images (pixels)"
    )
    p.add_argument(
        "--max-decoded-mb",
        type=float,
        default=DEFAULT_MAX_BATCH_BYTES / 2**20,
        help="decoded-pixel budget of a batch: width x height x channels x bytes per sample, "
        "read from each header before decoding; images are decoded one at a time, so a larger "
        f"image is refused (default {DEFAULT_MAX_BATCH_BYTES // 2**20})",
    )
    p.add_argument(
        "--full-decode",
        action="store_true",
        help="decode large JPEGs in full (default: at a reduced DCT scale down to the model's "
        "input resize, 244 px; scores move by < 0.001 on 12-megapixel photos)",
    )
    p.add_argument(
        "--scale",
        choices=("prob", "mos"),
        default="prob",
        help="prob: p(high quality) in (0, 1) (default); mos: the label scale the checkpoint's "
        "fine-tuning recorded (e.g. CLIVE MOS 0-100)",
    )
    add_progress_args(p)

    g = p.add_argument_group("inputs")
    g.add_argument("--path-column", default=None, help="image path column of .csv/.parquet tables")
    g.add_argument(
        "--id-column", default=None, help="column of .csv/.parquet tables copied to 'id'"
    )

    o = p.add_argument_group("outputs")
    o.add_argument(
        "--output",
        "-o",
        default=None,
        help="write FILE.csv, FILE.json or FILE.parquet (rows saved as they are scored in "
        "FILE.partial; FILE itself is written atomically at the end)",
    )
    o.add_argument(
        "--out-dir",
        default=None,
        help="write one part per tar shard (or per --part-size images) and manifest.json here",
    )
    o.add_argument(
        "--format",
        choices=("csv", "json", "parquet"),
        default="csv",
        help="format of the --out-dir parts (default csv)",
    )
    o.add_argument(
        "--part-size",
        type=int,
        default=DEFAULT_PART_SIZE,
        help=f"images per part for folders, lists and tables (default {DEFAULT_PART_SIZE})",
    )
    o.add_argument(
        "--resume",
        action="store_true",
        help="go on with an interrupted run: skip complete parts (--out-dir) or the images "
        "already in FILE.partial (-o)",
    )
    o.add_argument(
        "--overwrite", action="store_true", help="replace the parts of an earlier run in --out-dir"
    )

    r = p.add_argument_group("engine")
    r.add_argument(
        "--engine", choices=("local", "ray"), default="local", help="local (default) or ray"
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join, e.g. 10.0.0.1:6379 or auto (default: a local Ray on 127.0.0.1)",
    )
    r.add_argument(
        "--actors",
        type=int,
        default=None,
        help="scoring actors (default: one per GPU share, or 1 with every CPU)",
    )
    r.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0)")
    r.add_argument(
        "--cpus-per-actor", type=float, default=None, help="CPUs per actor (default: see docs)"
    )
    p.set_defaults(func=run)


def _checkpoint_id(path: Any, ref: str | None) -> dict[str, Any] | None:
    """Identity of a checkpoint for the run's fingerprint: its name as given (an
    ``hf-hub:`` reference, or the file name) and the sha256 of the file it resolved to."""
    if path is None:
        return None
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise GrmpiqaError(f"{path}: cannot read checkpoint ({err.strerror or err})") from None
    name = ref if ref is not None and ref.startswith("hf-hub:") else Path(str(ref or path)).name
    return {"file": name, "sha256": h.hexdigest()}


def _score_names(checkpoints: list[str | None], scale: str = "prob") -> list[str]:
    """``score`` (p in (0, 1)) or ``mos`` (``--scale mos``); with several checkpoints
    ``score_<name>`` / ``mos_<name>``."""
    base = "mos" if scale == "mos" else "score"
    if len(checkpoints) == 1:
        return [base]
    names: list[str] = []
    for i, c in enumerate(checkpoints):
        stem = Path(str(c)).stem
        name = f"{base}_{stem}"
        if name in names:
            name = f"{base}_{stem}_{i}"
        names.append(name)
    return names


def _validate(args: argparse.Namespace) -> str | None:
    """Check the flags and the output path before any work; return the -o format."""
    if args.batch_size < 1:
        raise GrmpiqaError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise GrmpiqaError(f"--workers must be 0 (decode in-process) or more, got {args.workers}")
    if args.part_size < 1:
        raise GrmpiqaError(f"--part-size must be at least 1, got {args.part_size}")
    if args.max_pixels < 1:
        raise GrmpiqaError(f"--max-pixels must be at least 1, got {args.max_pixels}")
    if not args.max_decoded_mb > 0:
        raise GrmpiqaError(f"--max-decoded-mb must be > 0, got {args.max_decoded_mb}")
    if args.output is not None and args.out_dir is not None:
        raise GrmpiqaError("use -o FILE or --out-dir DIR, not both")
    if args.resume and args.output is None and args.out_dir is None:
        raise GrmpiqaError("--resume needs -o FILE or --out-dir DIR (stdout cannot resume)")
    if args.overwrite and args.out_dir is None:
        raise GrmpiqaError("--overwrite goes with --out-dir")
    if args.resume and args.overwrite:
        raise GrmpiqaError("--resume and --overwrite contradict each other")
    if args.actors is not None and args.actors < 1:
        raise GrmpiqaError(f"--actors must be at least 1, got {args.actors}")
    if args.gpus_per_actor < 0 or (args.cpus_per_actor is not None and args.cpus_per_actor <= 0):
        raise GrmpiqaError("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")
    if args.engine != "ray":
        given = [
            f
            for f, v in (
                ("--ray-address", args.ray_address),
                ("--actors", args.actors),
                ("--cpus-per-actor", args.cpus_per_actor),
            )
            if v is not None
        ] + (["--gpus-per-actor"] if args.gpus_per_actor else [])
        if given:
            raise GrmpiqaError(f"{', '.join(given)} need --engine ray")
    out_fmt = None
    if args.output is not None:
        out_fmt = check_output_file(args.output)
    if args.out_dir is not None:
        check_output_dir(args.out_dir, args.format)
    return out_fmt


def run(args: argparse.Namespace) -> int:

    out_fmt = _validate(args)
    options = InputOptions(args.path_column, args.id_column, args.skip_bad)
    groups = collect(args.paths, options)
    part_size = args.part_size if args.out_dir is not None else sys.maxsize
    parts = plan_parts(groups, part_size)
    n_images = sum(len(p.items) for p in parts)

    from grmpiqa.scoring.ray import RaySession, actor_layout

    session = None
    if args.engine == "ray":  # connect (or fail) before anything is written
        session = RaySession(args.ray_address)
        try:
            actor_layout(session.resources(), args.actors, args.gpus_per_actor, args.cpus_per_actor)
        except BaseException:
            session.close()
            raise
    try:
        return _run(args, out_fmt, parts, n_images, session)
    finally:
        if session is not None:
            session.close()


def _run(
    args: argparse.Namespace, out_fmt: str | None, parts: list[Any], n_images: int, session: Any
) -> int:
    from grmpiqa.pipeline import default_workers
    from grmpiqa.scoring.engine import BatchScorer, check_workers, score_pending
    from grmpiqa.scoring.ray import build_models

    checkpoints: list[str | None] = list(args.checkpoint) if args.checkpoint else [None]
    device = device_arg(args.device) if args.engine == "local" else None
    untrained = scoring_config(args, args.checkpoint is not None)
    model_config = untrained.to_dict() if untrained is not None else None
    models = build_models(
        checkpoints, args.backbone, args.pretrained, args.seed, model_config, str(device or "cpu")
    )
    from grmpiqa.pipeline import describe_device, resolve_decode
    from grmpiqa.precision import resolve_precision

    # what runs where: the local device, or the Ray actors' device type
    run_device = device or ("cuda" if args.gpus_per_actor > 0 else "cpu")
    decode = resolve_decode(args.decode, run_device)
    precision = (
        resolve_precision(args.precision, run_device)
        if device is not None or args.precision != "auto"
        else "auto"  # resolved by each Ray actor on its own device
    )
    names = _score_names(checkpoints, args.scale)
    to_mos = None
    if args.scale == "mos":
        from grmpiqa.scale import require_score_scale

        scales = [
            require_score_scale(m, str(c) if c else m.describe())
            for m, c in zip(models, checkpoints, strict=True)
        ]
        to_mos = [sc.to_mos for sc in scales]
        for name, sc in zip(names, scales, strict=True):
            print(f"grmpiqa: {name} on the scale {sc.describe()}", file=sys.stderr)
    if device is None:
        where = f"on Ray ({'GPU' if args.gpus_per_actor > 0 else 'CPU'} actors)"
        if precision != "auto":
            where += f", precision {precision}"
    else:
        where = f"on {describe_run(device, args.precision).removeprefix('device ')}"
    print(
        f"grmpiqa: scoring {n_images} images in {len(parts)} part(s) {where}, decode "
        f"{_describe_decode(decode, run_device)}, with {models[0].describe()}"
        + (f", {len(models)} checkpoints" if len(models) > 1 else ""),
        file=sys.stderr,
    )
    fingerprint = {
        "models": [
            {
                "backbone": m.backbone_name,
                "pretrained": m.backbone_pretrained,
                "checkpoint": _checkpoint_id(m.checkpoint_file, c),
                "prompts": m.describe_prompts(),
                "config": m.config.to_dict(),
                "preprocess": m.preprocess.to_dict(),
            }
            for m, c in zip(models, checkpoints, strict=True)
        ],
        "precision": precision,
        "max_pixels": args.max_pixels,
        "max_decoded_bytes": _budget_bytes(args),
        "full_decode": args.full_decode,
        "scale": args.scale,
        "columns": names,
    }
    if decode != "pil":  # the reference decoder: what journals before 0.3 were written with
        fingerprint["decode"] = decode
    run_meta = {
        "grmpiqa_version": __version__,
        "engine": args.engine,
        "device": describe_device(device) if device is not None else str(run_device),
        "precision": precision,
        "precision_requested": args.precision,
        "decode": decode,
    }
    has_key = any(s.in_tar for p in parts for s in p.items)
    sink: Sink
    if args.out_dir is not None:
        cols = Columns(tuple(names), key=has_key, id=args.id_column is not None, error=True)
        sink = PartsSink(
            args.out_dir,
            args.format,
            parts,
            cols,
            fingerprint,
            args.resume,
            args.overwrite,
            metadata=run_meta,
        )
    elif args.output is not None:
        assert out_fmt is not None
        cols = Columns(
            tuple(names), key=has_key, id=args.id_column is not None, error=args.skip_bad
        )
        sink = FileSink(
            args.output, out_fmt, parts, cols, fingerprint, args.resume, metadata=run_meta
        )
    else:
        cols = Columns(
            tuple(names), key=has_key, id=args.id_column is not None, error=args.skip_bad
        )
        sink = StdoutSink(parts, cols)

    pending = sink.pending()
    results: Iterator[list[Result]]
    if args.engine == "ray":
        from grmpiqa.scoring.ray import score_pending_ray

        if len(models) > 1:
            split = BatchScorer(
                models, names=names, precision=args.precision, frozen_bf16=False
            ).split
            if split:
                print(f"grmpiqa: the checkpoints share image blocks 0-{split - 1}", file=sys.stderr)
        del models
        scorer_kwargs: dict[str, Any] = {
            "checkpoint": checkpoints[0] if len(checkpoints) == 1 else None,
            "checkpoints": None if len(checkpoints) == 1 else [str(c) for c in checkpoints],
            "names": None if len(checkpoints) == 1 else [n.split("_", 1)[1] for n in names],
            "backbone": args.backbone,
            "pretrained": args.pretrained,
            "seed": args.seed,
            "device": "cuda" if args.gpus_per_actor > 0 else "cpu",
            "precision": args.precision,
            "max_pixels": args.max_pixels,
            "max_batch_bytes": _budget_bytes(args),
            "reduced_decode": not args.full_decode,
            "decode": args.decode,
        }
        results = score_pending_ray(
            pending,
            scorer_kwargs,
            args.batch_size,
            address=args.ray_address,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
            progress=want_progress(args),
            session=session,
        )
    else:
        assert device is not None
        workers = args.workers if args.workers is not None else default_workers(device)
        check_workers(workers)
        scorer = BatchScorer(
            models,
            names=names,
            precision=precision,
            max_pixels=args.max_pixels,
            reduced_decode=not args.full_decode,
            decode=decode,
            max_batch_bytes=_budget_bytes(args),
        )
        if scorer.split:
            print(
                f"grmpiqa: the checkpoints share image blocks 0-{scorer.split - 1}: they run once",
                file=sys.stderr,
            )
        results = score_pending(
            scorer, pending, args.batch_size, num_workers=workers, progress=want_progress(args)
        )

    if to_mos is not None:
        results = _on_label_scale(results, to_mos)
    try:
        with contextlib.closing(results):  # type: ignore[type-var]
            for batch in results:
                bad = [r for r in batch if r[3]]
                if bad and not args.skip_bad:
                    sink.add([r for r in batch if not r[3]])
                    raise ImageError(str(bad[0][3]))
                sink.add(batch)
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    if sink.n_errors:
        print(f"grmpiqa: {sink.n_errors} of {n_images} files could not be scored", file=sys.stderr)
    return 0


def _describe_decode(decode: str, device: Any) -> str:
    if decode == "pil":
        return "pil (Pillow)"
    gpu = str(device).startswith("cuda")
    return "torch (JPEGs by nvJPEG on the GPU, others by Pillow)" if gpu else "torch (CPU)"


def _budget_bytes(args: argparse.Namespace) -> int:
    return int(args.max_decoded_mb * 2**20)


def _on_label_scale(
    results: Iterator[list[Result]], to_mos: Sequence[Callable[[Any], Any]]
) -> Iterator[list[Result]]:
    """Each score column mapped to its checkpoint's recorded MOS scale (``--scale mos``)."""
    try:
        for batch in results:
            yield [
                (
                    part,
                    item,
                    None if sc is None else [float(f(v)) for f, v in zip(to_mos, sc, strict=True)],
                    err,
                )
                for part, item, sc, err in batch
            ]
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
