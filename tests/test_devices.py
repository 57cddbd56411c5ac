"""Device and precision that fit the machine (issue 19, item 1): ``auto`` by default in
every command, announced once, resolved before it is recorded in every output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image, ImageFilter

from grmpiqa.checkpoint import read_metadata
from grmpiqa.cli import main
from grmpiqa.precision import resolve_precision

TINY = ["--backbone", "test-tiny", "--pretrained", "random"]
#: what ``--precision auto`` gives on this machine's CPU (bf16 with AVX512-BF16 or AMX)
AUTO = resolve_precision("auto", "cpu")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("devices")
    rng = np.random.default_rng(0)
    rows = ["path,mos"]
    for i in range(10):
        arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.4 * i)).save(d / f"im{i}.png")
        rows.append(f"im{i}.png,{90 - 8 * i}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d / "labels.csv"


def test_every_command_defaults_to_auto(capsys):
    from grmpiqa.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in ("score", "finetune", "pretrain", "evaluate", "serve", "explain", "demo"):
        actions = {a.dest: a.default for a in sub[name]._actions}
        assert actions["device"] == "auto", name
        if "precision" in actions:
            assert actions["precision"] == "auto", name
    assert {a.dest: a.default for a in sub["score"]._actions}["decode"] == "auto"


def test_finetune_announces_once_and_records_the_resolved_choice(labelled, tmp_path, capsys):
    out = tmp_path / "ft.safetensors"
    argv = ["finetune", "--data", f"csv:{labelled}", "--shots", "6", "--out", str(out)]
    argv += [*TINY, "--max-epochs", "1", "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    said = [ln for ln in err.splitlines() if ln.startswith("grmpiqa: device ")]
    assert said == [f"grmpiqa: device cpu, precision {AUTO} (auto: " + said[0].split("(auto: ")[1]]
    extra = read_metadata(out)["extra"]
    assert extra["device"] == "cpu" and extra["finetune"]["precision"] == AUTO


def test_evaluate_report_records_device_and_resolved_precision(labelled, tmp_path, capsys):
    report = tmp_path / "report"
    argv = ["evaluate", "--data", f"csv:{labelled}", "--method", "clipiqa", "--splits", "1"]
    argv += ["--shots", "4", "--report", str(report), *TINY, "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().err.count("grmpiqa: device cpu, precision") == 1
    config = json.loads((report / "report.json").read_text())["config"]
    assert config["device"] == "cpu" and config["precision"] == AUTO


def test_score_outputs_carry_the_run_metadata(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    from grmpiqa.scoring.outputs import read_output_metadata, read_rows

    for i in range(3):
        make_image(tmp_path / "imgs" / f"{i}.jpg", seed=i)
    pq_file = tmp_path / "s.parquet"
    assert main(["score", str(tmp_path / "imgs"), *TINY, "-o", str(pq_file)]) == 0
    meta = read_output_metadata(pq_file, "parquet")
    assert meta is not None and meta["models"][0]["backbone"] == "test-tiny"  # the models
    run = meta["run"]  # and how the scores were computed
    assert run["device"] == "cpu" and run["precision"] == AUTO and run["decode"] == "pil"
    assert len(read_rows(pq_file, "parquet")) == 3
    out_dir = tmp_path / "parts"
    argv = ["score", str(tmp_path / "imgs"), *TINY, "--out-dir", str(out_dir)]
    assert main([*argv, "--decode", "torch", "--precision", "fp32"]) == 0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["run"]["decode"] == "torch" and manifest["run"]["precision"] == "fp32"
    assert manifest["fingerprint"]["decode"] == "torch"
    # another decoder changes the scores: a resume with it is refused
    assert main([*argv, "--resume", "--precision", "fp32"]) == 1
    assert "decode" in capsys.readouterr().err
