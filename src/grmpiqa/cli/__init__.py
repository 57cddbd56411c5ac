"""The ``grmpiqa`` command line: one module per subcommand in this package.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (taking the parsed ``argparse.Namespace`` and returning an exit code). Parsers
are built from :mod:`grmpiqa.config` alone: torch and open_clip are imported only inside
the ``func`` of a command that needs them, so ``--help`` and ``--version`` are instant. Errors
the user caused (:class:`~grmpiqa.errors.GrmpiqaError`) are printed as one line on
stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from grmpiqa._version import __version__
from grmpiqa.errors import GrmpiqaError
from grmpiqa.log import install_cli_handler

# Subcommand modules, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = (
    "score",
    "info",
    "export",
    "import_released",
    "synth",
    "pretrain",
    "finetune",
    "evaluate",
    "demo",
    "explain",
    "serve",
    "backbones",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grmpiqa",
        description="Few-shot blind image quality assessment by adapting CLIP (GRMP-IQA).",
    )
    parser.add_argument("--version", action="version", version=f"grmpiqa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"grmpiqa.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    install_cli_handler()
    _export_tokenizer(args)
    try:
        return int(args.func(args) or 0)
    except GrmpiqaError as err:
        print(f"grmpiqa{_rank_tag()}: error: {err.for_cli()}", file=sys.stderr)
        return int(getattr(err, "exit_code", 1))  # RunInterrupted: 128 + the signal
    except KeyboardInterrupt:
        print("grmpiqa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `grmpiqa backbones | head`: the reader has gone, say nothing
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail again
        return 141  # 128 + SIGPIPE, as a shell reports it
    except Exception as err:
        dist = sys.modules.get("grmpiqa.distributed")  # loaded by a command that joined a job
        peers = dist.peer_failure(err) if dist is not None else None  # a peer rank died
        if peers is None:
            raise
        print(f"grmpiqa{_rank_tag()}: error: {peers}", file=sys.stderr)
        return 1
    finally:
        if "grmpiqa.distributed" in sys.modules:  # a command that ran may have joined a job
            sys.modules["grmpiqa.distributed"].shutdown()


def _export_tokenizer(args: argparse.Namespace) -> None:
    """``--tokenizer DIR`` reaches every model the command builds, in every process."""
    import os
    from pathlib import Path

    folder = getattr(args, "tokenizer", None)
    if folder:
        os.environ["GRMPIQA_TOKENIZER"] = str(Path(folder).expanduser().resolve())


def _rank_tag() -> str:
    """``[rank R]`` under torchrun (each rank prints its own error), else nothing."""
    dist = sys.modules.get("grmpiqa.distributed")
    if dist is None:
        return ""
    ctx = dist.current()
    return f"[rank {ctx.rank}]" if ctx.is_distributed else ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
