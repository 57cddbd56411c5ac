"""Benchmark the command line's start: ``grmpiqa --help``, ``--version``, ``CMD --help``.

Usage::

    python benchmarks/cli_startup.py [--repeat 5]

Runs each command ``--repeat`` times as a fresh process (``python -m grmpiqa ...``, the
same code as the ``grmpiqa`` script) and prints the median wall time per command, next
to the start of a bare interpreter and of ``import torch`` / ``import open_clip`` (what
each command used to pay before it could print its help). The last stdout line is one
JSON object with the medians in seconds and the slowest command. Wall times on a shared
machine vary: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = (
    ["--help"],
    ["--version"],
    *[
        [c, "--help"]
        for c in (
            "score",
            "info",
            "export",
            "import-released",
            "synth",
            "pretrain",
            "finetune",
            "evaluate",
            "demo",
            "explain",
            "serve",
        )
    ],
)


def _time(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs per command (median reported)")
    args = ap.parse_args()
    py = sys.executable
    rows: dict[str, float] = {
        "python -c pass": _time([py, "-c", "pass"], args.repeat),
        "import torch": _time([py, "-c", "import torch"], args.repeat),
        "import open_clip": _time([py, "-c", "import open_clip"], args.repeat),
    }
    for argv in COMMANDS:
        rows["grmpiqa " + " ".join(argv)] = _time([py, "-m", "grmpiqa", *argv], args.repeat)
    width = max(len(k) for k in rows)
    print(f"{'command':<{width}}  median s  (of {args.repeat} runs)")
    for k, v in rows.items():
        print(f"{k:<{width}}  {v:8.3f}")
    cli = {k: v for k, v in rows.items() if k.startswith("grmpiqa")}
    slowest = max(cli, key=lambda k: cli[k])
    print(
        json.dumps(
            {
                "median_s": {k: round(v, 3) for k, v in rows.items()},
                "slowest": slowest,
                "slowest_s": round(cli[slowest], 3),
                "repeat": args.repeat,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
