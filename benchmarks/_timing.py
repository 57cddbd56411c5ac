"""Shared helpers of the speed benchmarks (imported by the scripts beside it)."""

from __future__ import annotations

import time

import torch


def matmul_tflops(dtype: torch.dtype, n: int = 4096, reps: int = 3) -> float:
    """The machine's dense matmul rate (best of ``reps`` n^3 products), in TFLOP/s."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12
