"""Tokenizers: open_clip's CLIP BPE, or a Hugging Face tokenizer (``grmpiqa[hf]``).

A Hugging Face tokenizer (SigLIP, SigLIP2, the HF text towers) is looked up, in order:
a folder given explicitly (``tokenizer=DIR``, ``--tokenizer DIR``: anything saved with
``save_pretrained``), the ``local-dir:`` backbone folder, then the local Hugging Face
cache, and only then the hub. Anything missing fails in one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from grmpiqa.backbones.registry import HF_EXTRA, has_transformers
from grmpiqa.errors import BackboneError

__all__ = ["TOKENIZER_ENV", "load_tokenizer", "placeholder_start", "tokenizer_source"]

#: environment variable the command line's ``--tokenizer DIR`` sets (Ray workers and
#: torchrun ranks inherit it); used for backbones with a Hugging Face tokenizer
TOKENIZER_ENV = "GRMPIQA_TOKENIZER"

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


def tokenizer_source(
    model_cfg: dict[str, Any], local_dir: str | None = None, override: str | None = None
) -> str | None:
    """Where a Hugging Face tokenizer comes from (None: open_clip's CLIP tokenizer)."""
    if override:
        return str(override)
    hf_name = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if not hf_name:
        return None
    if local_dir is not None:
        return str(local_dir)
    return str(hf_name)


def load_tokenizer(
    model_cfg: dict[str, Any],
    name: str,
    *,
    local_dir: str | None = None,
    override: str | os.PathLike[str] | None = None,
    cache_dir: str | None = None,
) -> Tokenizer:
    """The tokenizer of a backbone; :class:`BackboneError` (one line) when unavailable."""
    text = model_cfg.get("text_cfg", {})
    context_length = int(text.get("context_length", 77))
    source = tokenizer_source(model_cfg, local_dir, None if override is None else str(override))
    if source is None:
        from open_clip.tokenizer import SimpleTokenizer

        kwargs = dict(text.get("tokenizer_kwargs") or {})
        return SimpleTokenizer(context_length=context_length, **kwargs)  # type: ignore[no-any-return]
    if override is not None and not Path(source).is_dir():
        raise BackboneError(f"{source}: tokenizer folder not found")
    if not has_transformers():
        raise BackboneError(f"{name}: its tokenizer is a Hugging Face tokenizer; {HF_EXTRA}")
    from open_clip.tokenizer import HFTokenizer

    kwargs = dict(text.get("tokenizer_kwargs") or {})
    mode = text.get("tokenizer_mode")
    if mode:
        kwargs["tokenizer_mode"] = mode
    local_only = Path(source).is_dir() or _offline()
    try:
        tok = HFTokenizer(
            source,
            context_length=context_length,
            cache_dir=cache_dir,
            local_files_only=True,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        if local_only:
            raise _missing(name, source, err) from None
        try:
            tok = HFTokenizer(source, context_length=context_length, cache_dir=cache_dir, **kwargs)
        except Exception as err2:  # noqa: BLE001 - hub and tokenizer errors, one message
            raise _missing(name, source, err2) from None
    inner = tok.tokenizer
    if not hasattr(inner, "batch_encode_plus"):
        # open_clip < 3 calls batch_encode_plus, which transformers 5 removed; it is the
        # tokenizer's own __call__ on a batch
        inner.batch_encode_plus = inner.__call__
    return tok  # type: ignore[no-any-return]


def _offline() -> bool:
    return any(
        os.environ.get(v, "") not in ("", "0")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GRMPIQA_OFFLINE")
    )


def _missing(name: str, source: str, err: BaseException) -> BackboneError:
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    if Path(source).is_dir():
        return BackboneError(f"{source}: not a Hugging Face tokenizer folder ({first})")
    head = (
        f"{name}: tokenizer {source} is not in the local Hugging Face cache and could not be "
        "fetched; pass a saved tokenizer folder with "
    )
    return BackboneError(
        f"{head}--tokenizer DIR, or use --backbone local-dir:FOLDER",
        api=f"{head}tokenizer='DIR', or use backbone='local-dir:FOLDER'",
    )


def placeholder_start(tokenizer: Tokenizer, n_ctx: int, class_name: str) -> int:
    """Index of the first of ``n_ctx`` placeholder words in ``"X X ... {class_name}."``.

    The context vectors of CoOp (method.md 3) replace these embeddings: right after SOT
    for CLIP's tokenizer (index 1), at index 0 for tokenizers without a start token
    (SigLIP's). Found as the positions where ``X X ..`` and ``Y Y ..`` tokenise apart.
    """
    a = tokenizer([f"{' '.join(['X'] * n_ctx)} {class_name}."])[0]
    b = tokenizer([f"{' '.join(['Y'] * n_ctx)} {class_name}."])[0]
    diff = (a != b).nonzero().flatten().tolist()
    if len(diff) != n_ctx or diff != list(range(diff[0], diff[0] + n_ctx)):
        raise BackboneError(
            f"the tokenizer does not give one token per placeholder word (positions {diff}); "
            "learned text context cannot be placed"
        )
    return int(diff[0])
