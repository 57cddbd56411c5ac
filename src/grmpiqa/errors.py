"""Typed, user-facing errors.

Every error a user can cause (a bad file, a missing label, an unknown backbone) is a
:class:`GrmpiqaError`. The CLI prints ``str(err)`` as one line and exits non-zero; the
API lets it propagate. Messages name the file (and row) first, then the reason.
"""

from __future__ import annotations


class GrmpiqaError(Exception):
    """Base class for errors caused by the user's input or environment.

    ``message`` is what the command line prints (it may name flags such as
    ``--pretrained``); ``api``, when given, is the same message for Python callers,
    naming the API's arguments instead (``pretrained=``): ``str(err)`` is that one.
    """

    def __init__(self, message: str = "", *, api: str | None = None) -> None:
        super().__init__(api if api is not None else message)
        self.cli_message = message

    def for_cli(self) -> str:
        """The message as the command line prints it."""
        return getattr(self, "cli_message", "") or str(self)


class BackboneError(GrmpiqaError):
    """A CLIP backbone or its weights could not be resolved or loaded."""


class CheckpointError(GrmpiqaError):
    """A grmpiqa checkpoint (or a released file to import) is unusable."""


class ImageError(GrmpiqaError):
    """An image file could not be read or is unsuitable (corrupt, too large, ...)."""


class NotAnImageError(ImageError):
    """The data is not in any image format Pillow recognises."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the limit (refused before decoding)."""


class DatasetError(GrmpiqaError):
    """A dataset spec, label file or its contents are invalid."""


class RunError(GrmpiqaError):
    """A training run's files (checkpoint, resume state, log) cannot be used as asked:
    a resume that does not match, a state file that is unreadable, or an existing run
    that would be overwritten."""


class TrainingError(GrmpiqaError):
    """Training cannot go on (e.g. a loss or gradient became NaN or infinite)."""
