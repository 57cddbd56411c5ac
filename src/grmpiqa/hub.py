"""Files on the Hugging Face Hub (``hf-hub:OWNER/REPO/FILE``), through ``huggingface_hub``.

A reference names a repository and a file in it, optionally a revision::

    hf-hub:zzhowe/GRMP-IQA/clive_50_prompt_lda_5.0.pt        (the authors' released file)
    hf-hub:me/my-scorer/model.safetensors                   (a grmpiqa checkpoint)
    hf-hub:me/my-scorer@v1.0/model.safetensors              (at a tag, branch or commit)

Files are fetched with :func:`huggingface_hub.hf_hub_download` into the standard Hub cache
(``~/.cache/huggingface/hub``, or ``HF_HUB_CACHE`` / ``HF_HOME``), so a file fetched once
is found again offline. With ``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached, only
the cache is used, and a missing file fails at once with one line saying what to download
and where to put it (never a traceback, never minutes of retries).

Example:
    >>> parse_hub_ref("hf-hub:zzhowe/GRMP-IQA/clive_50_prompt_lda_5.0.pt")
    HubRef(repo_id='zzhowe/GRMP-IQA', filename='clive_50_prompt_lda_5.0.pt', revision=None)
    >>> str(parse_hub_ref("hf-hub:me/scorer@v1/sub/model.safetensors"))
    'hf-hub:me/scorer@v1/sub/model.safetensors'
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grmpiqa.errors import GrmpiqaError

__all__ = [
    "HF_HUB_PREFIX",
    "HubRef",
    "MissingFileError",
    "blob_id",
    "open_clip_folder",
    "snapshot_revision",
    "cache_dir",
    "download",
    "fetch",
    "hub_reachable",
    "is_hub_ref",
    "parse_hub_ref",
]

HF_HUB_PREFIX = "hf-hub:"
_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubRef:
    """A repository on the Hub and, for a file reference, the file in it."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        tail = f"/{self.filename}" if self.filename else ""
        return f"{HF_HUB_PREFIX}{self.repo_id}{rev}{tail}"

    @property
    def url(self) -> str:
        """Where a browser downloads the file."""
        return f"{_ENDPOINT}/{self.repo_id}/resolve/{self.revision or 'main'}/{self.filename}"


def is_hub_ref(value: Any) -> bool:
    """Whether ``value`` is a string starting with ``hf-hub:``."""
    return isinstance(value, str) and value.startswith(HF_HUB_PREFIX)


def parse_hub_ref(ref: str, *, with_file: bool = True) -> HubRef:
    """``hf-hub:OWNER/REPO[@REV][/FILE]`` as a :class:`HubRef`; :class:`GrmpiqaError` when
    malformed (``with_file``: a file must be named)."""
    body = ref[len(HF_HUB_PREFIX) :] if ref.startswith(HF_HUB_PREFIX) else ref
    parts = [p for p in body.strip("/").split("/")]
    if len(parts) < 2 or not all(parts[:2]) or any(p in ("", ".", "..") for p in parts):
        raise GrmpiqaError(
            f"{ref}: not a Hub reference; use hf-hub:OWNER/REPO/FILE (e.g. "
            "hf-hub:zzhowe/GRMP-IQA/clive_50_prompt_lda_5.0.pt)"
        )
    owner, name = parts[0], parts[1]
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
        if not name or not revision:
            raise GrmpiqaError(f"{ref}: empty repository or revision around '@'")
    filename = "/".join(parts[2:]) or None
    if with_file and filename is None:
        raise GrmpiqaError(f"{ref}: names no file; use hf-hub:{owner}/{name}/FILE")
    return HubRef(f"{owner}/{name}", filename, revision)


def cache_dir() -> Path:
    """grmpiqa's own cache (converted released files): ``$GRMPIQA_CACHE``, else
    ``$XDG_CACHE_HOME/grmpiqa``, else ``~/.cache/grmpiqa``."""
    env = os.environ.get("GRMPIQA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path("~/.cache").expanduser()
    return base / "grmpiqa"


def _offline_by_setting() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "GRMPIQA_OFFLINE"))
    if any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with open_clip
        return True


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub may be asked at all: not offline by setting, and its name resolves."""
    if _offline_by_setting():
        return False
    previous = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo("huggingface.co", 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def _hub_cache_location(cache: str | os.PathLike[str] | None) -> str:
    if cache is not None:
        return str(cache)
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"


class MissingFileError(GrmpiqaError):
    """A Hub file is neither in the cache nor downloadable, or does not exist there."""


def download(
    ref: HubRef | str,
    *,
    cache: str | os.PathLike[str] | None = None,
    cli_hint: str = "download {url} and pass the file with --checkpoint FILE",
    api_hint: str = "download {url} and pass the file as checkpoint='FILE'",
) -> Path:
    """The local path of a Hub file, fetched into the Hub cache when the Hub answers.

    ``cli_hint`` and ``api_hint`` say, in the error message, what to download (``{url}``
    is the file's address) and how to pass it instead (naming the CLI flag and the API
    argument).

    Raises:
        GrmpiqaError: one line: the file is neither cached nor downloadable (what to
            download, where to put it), or the repository or file does not exist.
    """
    hub = parse_hub_ref(ref) if isinstance(ref, str) else ref
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a dependency of open_clip
        raise GrmpiqaError(f"{hub}: needs huggingface_hub (pip install huggingface_hub)") from None
    online = hub_reachable()
    where = _hub_cache_location(cache)
    try:
        path = hf_hub_download(
            hub.repo_id,
            str(hub.filename),
            revision=hub.revision,
            cache_dir=None if cache is None else str(cache),
            local_files_only=not online,
        )
    except hf_errors.LocalEntryNotFoundError:
        why = "offline" if not online else "the download failed"
        head = f"{hub}: not in the Hugging Face cache ({where}) and {why}; "
        tail = (
            f", or fetch it on a connected machine (huggingface-cli download {hub.repo_id} "
            f"{hub.filename}) and copy that cache folder here (HF_HUB_CACHE)"
        )
        raise MissingFileError(
            head + cli_hint.format(url=hub.url) + tail,
            api=head + api_hint.format(url=hub.url) + tail,
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise GrmpiqaError(f"{hub}: no such repository on the Hub (or it is private)") from None
    except hf_errors.RevisionNotFoundError:
        raise GrmpiqaError(f"{hub}: no such revision {hub.revision!r}") from None
    except hf_errors.EntryNotFoundError:
        raise MissingFileError(f"{hub}: the repository has no file {hub.filename!r}") from None
    except (hf_errors.HfHubHTTPError, hf_errors.HFValidationError, OSError, ValueError) as err:
        text = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise GrmpiqaError(f"{hub}: cannot get it from the Hub ({text})") from None
    return Path(path)


def fetch(
    ref: str,
    *,
    cli_hint: str = "download {url} and pass the file with --checkpoint FILE",
    api_hint: str = "download {url} and pass the file as checkpoint='FILE'",
) -> tuple[Path, dict[str, Any]]:
    """A Hub file (:func:`download`) and where it came from: repository, file, the commit
    of the cached snapshot and the content id (:func:`blob_id`), for metadata records
    (never a host path)."""
    hub = parse_hub_ref(ref)
    path = download(hub, cli_hint=cli_hint, api_hint=api_hint)
    source: dict[str, Any] = {
        "hf_hub": hub.repo_id,
        "filename": hub.filename,
        "revision": snapshot_revision(path) or hub.revision,
    }
    content = blob_id(path)
    if content:
        source["content_id"] = content
    return path, source


def blob_id(path: str | os.PathLike[str]) -> str | None:
    """The Hub cache's content id of a downloaded file: the name of the blob its snapshot
    entry links to (the file's sha256 for LFS files, its git hash otherwise), or None when
    the file is not a link into a ``blobs/`` folder."""
    p = Path(path)
    try:
        target = p.resolve(strict=True)
    except OSError:
        return None
    if target.parent.name == "blobs" and target != p.absolute():
        return target.name
    return None


def snapshot_revision(path: str | os.PathLike[str]) -> str | None:
    """The commit a file of the Hub cache belongs to (``.../snapshots/<commit>/FILE``)."""
    parts = Path(path).parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


#: Weights files of an open_clip repository on the Hub, in the order open_clip tries them.
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def open_clip_folder(
    name: str, *, cache: str | os.PathLike[str] | None = None
) -> tuple[Path, HubRef, str | None]:
    """The Hub cache folder holding an ``hf-hub:OWNER/REPO`` backbone's
    ``open_clip_config.json`` and weights (fetched when the Hub answers), the reference,
    and the commit it is at. Errors are one line saying what to download."""
    ref = parse_hub_ref(name, with_file=False)
    folder_hint = (
        f"download {ref.repo_id}'s open_clip_config.json and {OPEN_CLIP_WEIGHTS[0]} into a "
        "folder and pass "
    )
    cli_hint = folder_hint + "--backbone local-dir:FOLDER"
    api_hint = folder_hint + "backbone='local-dir:FOLDER'"
    cfg = download(
        HubRef(ref.repo_id, "open_clip_config.json", ref.revision),
        cache=cache,
        cli_hint=cli_hint,
        api_hint=api_hint,
    )
    last: MissingFileError | None = None
    for fname in OPEN_CLIP_WEIGHTS:
        try:
            weights = download(
                HubRef(ref.repo_id, fname, ref.revision),
                cache=cache,
                cli_hint=cli_hint,
                api_hint=api_hint,
            )
        except MissingFileError as err:
            last = err
            continue
        if weights.parent != cfg.parent:
            raise GrmpiqaError(f"{ref}: config and weights are at different revisions")
        return cfg.parent, ref, snapshot_revision(cfg)
    assert last is not None
    raise last
