"""The one precision policy: what runs in bf16 and what stays fp32.

``"fp32"`` runs everything in fp32. ``"bf16"`` runs the image tower's matrix
multiplications (linear layers, attention, the patch convolution) in bf16 under
autocast, while parameters, the residual stream between transformer blocks, layer
norms, losses and gradients stay fp32. The text tower always runs in fp32: it encodes a
handful of prompts, too little work for bf16 to pay for casting its weights (autocast
casts frozen weights again at every call; measured 5x slower than fp32 on CPU). ``"auto"`` picks
bf16 where the hardware has fast bf16 (CUDA with bf16 support; x86 CPUs with AMX or
AVX512-BF16) and fp32 elsewhere.

Example:
    >>> import torch
    >>> resolve_precision("fp32", torch.device("cpu"))
    'fp32'
    >>> with autocast(torch.device("cpu"), "fp32"):
    ...     pass
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any

import torch

from grmpiqa.config import PRECISIONS
from grmpiqa.errors import GrmpiqaError


def check_precision(precision: str) -> str:
    """``precision`` itself, or :class:`GrmpiqaError` if it is not one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise GrmpiqaError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 matrices faster than fp32, and why."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA bf16" if ok else "CUDA device without bf16"
    if device.type == "cpu":
        flags = _cpu_flags()
        if "amx_bf16" in flags:
            return True, "CPU with AMX bf16"
        if "avx512_bf16" in flags:
            return True, "CPU with AVX512-BF16"
        return False, "CPU without AMX or AVX512-BF16"
    return False, f"{device.type} device"


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"fp32"`` or ``"bf16"``: ``auto`` becomes bf16 where :func:`fast_bf16` holds."""
    check_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if fast_bf16(device)[0] else "fp32"


def describe_choice(precision: str, device: torch.device | str) -> str:
    """One line saying what ``precision`` resolves to on ``device`` (for ``auto``)."""
    resolved = resolve_precision(precision, device)
    if precision != "auto":
        return resolved
    return f"{resolved} (auto: {fast_bf16(device)[1]})"


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CPU or CUDA, or a no-op for fp32 (``auto`` is resolved first)."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def storage_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """dtype for cached activations: bf16 when computing in bf16, else fp32."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32
