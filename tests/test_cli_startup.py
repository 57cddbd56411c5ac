"""The command line starts without torch, open_clip, scipy or matplotlib (issue 20, item 6).

``grmpiqa --help``, ``grmpiqa CMD --help`` and ``--version`` build the parsers from
:mod:`grmpiqa.config` alone; the time is measured by ``benchmarks/cli_startup.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grmpiqa.cli import COMMANDS

HEAVY = ("torch", "open_clip", "scipy", "matplotlib", "safetensors")

_PROBE = """
import contextlib, io, json, sys
import grmpiqa.cli as cli
argv = sys.argv[1:]
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        cli.main(argv)
    except SystemExit:
        pass
print(json.dumps({"heavy": [m for m in HEAVY if m in sys.modules], "out": buf.getvalue()}))
""".replace("HEAVY", repr(HEAVY))


def _probe(*argv: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [("--help",), ("--version",), ("finetune", "--help")])
def test_help_and_version_import_no_heavy_module(argv):
    res = _probe(*argv)
    assert res["heavy"] == [], f"grmpiqa {' '.join(argv)} imported {res['heavy']}"
    assert res["out"].strip(), "nothing printed"


def test_every_subcommand_parser_builds_without_heavy_modules():
    res = _probe("--help")
    assert res["heavy"] == []
    for name in COMMANDS:  # every subcommand is listed by the top-level help
        assert name.replace("_", "-") in res["out"]


def test_importing_the_package_is_light_until_a_name_is_used():
    code = (
        "import sys, grmpiqa; a = 'torch' in sys.modules; "
        "grmpiqa.FinetuneConfig(); b = 'torch' in sys.modules; "
        "m = grmpiqa.create_model; import grmpiqa.finetune; "
        "print(a, b, 'torch' in sys.modules, callable(grmpiqa.finetune), "
        "type(grmpiqa.finetune).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # the function grmpiqa.finetune keeps its name after the submodule is imported
    assert out.stdout.split() == ["False", "False", "True", "True", "function"]
