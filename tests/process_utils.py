"""Run the command line in a child process and stop it at a chosen moment (kill tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def run_and_signal(
    argv: Sequence[str],
    ready: Callable[[], bool],
    sig: int = signal.SIGKILL,
    timeout: float = 240.0,
    poll: float = 0.01,
) -> subprocess.CompletedProcess[str]:
    """``grmpiqa ARGV`` in a child (one torch thread, as the tests' own runs), sent
    ``sig`` as soon as ``ready()`` holds. Returns the finished process (``returncode``
    ``-sig`` when the signal killed it); fails when it ends or times out first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "grmpiqa", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"the run ended before the signal:\n{err[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the run never reached the point to stop it at")
            time.sleep(poll)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def send_to_self(sig: int = signal.SIGTERM) -> None:
    """Deliver ``sig`` to this process (its handler runs before the next bytecode)."""
    os.kill(os.getpid(), sig)
