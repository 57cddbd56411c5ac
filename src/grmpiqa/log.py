"""The ``grmpiqa`` logger and the warning categories of the library.

Library code never prints: it logs to ``logging.getLogger("grmpiqa")`` (or a child) and
raises warnings of the categories below. The command line installs a handler that
writes ``grmpiqa: message`` lines on stderr (:func:`install_cli_handler`); programs
that use the API configure logging as they like. A random backbone is always announced
with a :class:`RandomWeightsWarning` (shown every time, not once per place).
"""

from __future__ import annotations

import logging
import sys
import warnings

logger = logging.getLogger("grmpiqa")


class GrmpiqaWarning(UserWarning):
    """Base class of grmpiqa's warnings."""


class RandomWeightsWarning(GrmpiqaWarning):
    """A CLIP backbone was built with random weights (scores carry no learned knowledge)."""


class FallbackWarning(GrmpiqaWarning):
    """A fast path could not be used and an exact, slower path runs instead."""


# Random weights are announced every time a backbone is built, not once per call site.
warnings.simplefilter("always", RandomWeightsWarning)


def get_logger(name: str | None = None) -> logging.Logger:
    """``grmpiqa`` or its child ``grmpiqa.NAME``."""
    return logger if not name else logger.getChild(name)


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "grmpiqa: "
        if record.levelno >= logging.WARNING:
            prefix += "WARNING: " if record.levelno < logging.ERROR else "error: "
        return prefix + record.getMessage()


_CLI_HANDLER_NAME = "grmpiqa-cli"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be
    replaced after the handler is installed, e.g. by a test harness)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def install_cli_handler(level: int = logging.INFO) -> None:
    """Route the ``grmpiqa`` logger and grmpiqa's warnings to stderr as one-line messages.

    Idempotent; used by the command line (``grmpiqa ...``), not by the library.
    """
    if not any(h.get_name() == _CLI_HANDLER_NAME for h in logger.handlers):
        handler = _StderrHandler()
        handler.set_name(_CLI_HANDLER_NAME)
        handler.setFormatter(_CliFormatter())
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

    def _show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: object = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, GrmpiqaWarning):
            print(f"grmpiqa: WARNING: {message}", file=sys.stderr, flush=True)
        else:
            _default_showwarning(message, category, filename, lineno, file, line)  # type: ignore[arg-type]

    warnings.showwarning = _show


_default_showwarning = warnings.showwarning
