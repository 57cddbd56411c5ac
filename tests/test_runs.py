"""The run scaffold (grmpiqa.runs) and what it guarantees to both training stages:
resume state that can never run code, refusal of overwrites, cleanup of interrupted
writes, atomic files with the usual modes, training that stops on NaN (issue 10)."""

from __future__ import annotations

import importlib
import os
import pickle
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image

import grmpiqa
from grmpiqa.cli import main
from grmpiqa.data import load_dataset
from grmpiqa.errors import CheckpointError, RunError, TrainingError
from grmpiqa.finetune import FinetuneConfig, finetune, state_path
from grmpiqa.runs import RunFiles, diff_records, json_safe
from grmpiqa.utils import atomic_open, remove_stale_temporaries

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_CONFIG = grmpiqa.ModelConfig(vpt_tokens=4, finetune_blocks=1)
FAST = {"max_epochs": 2, "eval_every": 1, "cache_augmentations": 1}


def tiny() -> grmpiqa.QualityModel:
    return grmpiqa.create_model("test-tiny", pretrained=None, config=MODEL_CONFIG)


@pytest.fixture(scope="module")
def labels_csv(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shots")
    rows = ["path,mos"]
    for i in range(6):
        make_image(d / f"im{i}.png", size=(40, 36), seed=i)
        rows.append(f"im{i}.png,{10 + 15 * i}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d / "labels.csv"


class _Evil:
    """Unpickling this calls os.system: a planted state file must never get here."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_state_round_trip_tensors_and_json(tmp_path):
    run = RunFiles(tmp_path / "ck.safetensors", kind="finetune")
    assert run.state.name == "ck.state.safetensors" and run.log.name == "ck.log.jsonl"
    run.save_state({"a/x": torch.arange(3.0)}, {"epoch": 2, "loss": float("nan"), "p": Path("q")})
    st = run.load_state()
    assert st.record["epoch"] == 2 and st.record["loss"] is None and st.record["p"] == "q"
    assert torch.equal(st.take("a")["x"], torch.arange(3.0))
    with pytest.raises(RunError, match="not a pretrain resume state"):
        RunFiles(tmp_path / "ck.safetensors", kind="pretrain").load_state()


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", pickle.dumps({"epoch": 1}), b"\x00" * 64],
)
def test_unreadable_state_files_are_one_line_run_errors(tmp_path, content):
    run = RunFiles(tmp_path / "ck.safetensors", kind="finetune")
    run.state.write_bytes(content)
    with pytest.raises(RunError, match="ck.state.safetensors"):
        run.load_state()


def test_a_safetensors_file_without_a_run_record_is_refused(tmp_path):
    from safetensors.torch import save_file

    run = RunFiles(tmp_path / "ck.safetensors", kind="finetune")
    save_file({"x": torch.zeros(1)}, str(run.state))
    with pytest.raises(RunError, match="no run record"):
        run.load_state()


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_a_planted_pickle_state_never_runs(tmp_path, monkeypatch, labels_csv, stage):
    """0.1.0 read OUT.state.pt with torch.load(weights_only=False). A planted pickle (old
    name or new name) is refused with a one-line error and never unpickled."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run.safetensors"
    for name in ("run.state.pt", "run.state.safetensors"):
        planted = tmp_path / name
        torch.save({"version": 1, "evil": _Evil()}, planted)
        if stage == "finetune":
            argv = ["finetune", "--data", f"csv:{labels_csv}", "--shots", "4", "--out", str(out)]
            argv += ["--backbone", "test-tiny", "--max-epochs", "1", "--resume", "--no-progress"]
        else:
            argv = ["pretrain", "--tasks", f"csv:{labels_csv}", "--out", str(out), "--resume"]
            argv += ["--backbone", "test-tiny", "--epochs", "1", "--no-progress"]
        assert main(argv) == 1
        assert not (tmp_path / "PWNED").exists()
        planted.unlink()


def test_resume_refusal_explains_the_difference(tmp_path):
    run = RunFiles(tmp_path / "x.safetensors", kind="finetune")
    with pytest.raises(RunError, match=r"config.lam: saved 5.0, now 1.0; hint"):
        run.check_resume({"config": {"lam": 5.0}}, {"config": {"lam": 1.0}}, "hint")
    assert diff_records({"a": {"b": 1}}, {"a": {"b": 1}}) == []
    assert json_safe({"x": (1, float("inf")), "y": np.float32(2.5)}) == {"x": [1, None], "y": 2.5}


def test_finetune_refuses_to_overwrite_a_run_without_overwrite(tmp_path, labels_csv):
    shots = load_dataset(f"csv:{labels_csv}")
    out = tmp_path / "ft.safetensors"
    finetune(tiny(), shots, FinetuneConfig(**FAST), out=out, progress=False)
    before = out.read_bytes()
    with pytest.raises(RunError, match="--resume.*--overwrite"):
        finetune(tiny(), shots, FinetuneConfig(**FAST, lr=0.5), out=out, progress=False)
    assert out.read_bytes() == before
    finetune(tiny(), shots, FinetuneConfig(**FAST, lr=0.5), out=out, overwrite=True, progress=False)
    assert out.read_bytes() != before


def test_finetune_stops_at_the_first_non_finite_step_and_keeps_the_last_good_files(
    tmp_path, labels_csv, monkeypatch
):
    """The loss turns NaN at epoch 3: training stops with a TrainingError naming the epoch,
    and the state on disk is that of epoch 2 (the last good one; saved after every epoch
    with save_every=0); no checkpoint is written before a run ends."""
    ft = importlib.import_module("grmpiqa.finetune")

    shots = load_dataset(f"csv:{labels_csv}")
    out = tmp_path / "ft.safetensors"
    real = ft.quality_loss
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(ft, "quality_loss", poisoned)
    cfg = FinetuneConfig(max_epochs=5, eval_every=1, cache_augmentations=1)
    with pytest.raises(TrainingError, match=r"epoch 3: the quality loss became nan.*holds epoch 2"):
        finetune(tiny(), shots, cfg, out=out, progress=False, save_every=0)
    assert not out.exists()
    assert RunFiles(out, "finetune").load_state().record["epoch"] == 2
    monkeypatch.setattr(ft, "quality_loss", real)
    resumed = finetune(tiny(), shots, cfg, out=out, resume=True, progress=False)
    assert resumed.epochs == 5
    assert grmpiqa.read_metadata(out)["extra"]["epoch"] == 5


def test_cli_huge_learning_rate_is_a_one_line_error(tmp_path, labels_csv, capsys):
    out = tmp_path / "ft.safetensors"
    argv = ["finetune", "--data", f"csv:{labels_csv}", "--shots", "4", "--out", str(out)]
    argv += ["--backbone", "test-tiny", "--max-epochs", "3", "--lr", "1e12", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lower --lr" in err
    assert not out.exists()


def test_training_error_names_the_step(labels_csv):
    shots = load_dataset(f"csv:{labels_csv}")
    with pytest.raises(TrainingError, match="stopped at epoch .*(nan|inf|not finite|NaN)"):
        finetune(tiny(), shots, FinetuneConfig(**FAST, lr=1e12), progress=False)


def test_interrupted_temporaries_are_removed_by_the_next_run(tmp_path, labels_csv):
    out = tmp_path / "ft.safetensors"
    stale = [
        tmp_path / ".ft.safetensors.abc123.tmp",
        tmp_path / ".ft.state.safetensors.zz.tmp",
        tmp_path / ".ft.log.jsonl.q.tmp",
    ]
    for p in stale:
        p.write_bytes(b"x" * 100)
    other = tmp_path / ".unrelated.safetensors.abc.tmp"
    other.write_bytes(b"keep")
    shots = load_dataset(f"csv:{labels_csv}")
    finetune(tiny(), shots, FinetuneConfig(**FAST), out=out, progress=False)
    assert not any(p.exists() for p in stale) and other.exists()
    assert remove_stale_temporaries(tmp_path / "unrelated.safetensors") == [other]


def test_atomic_files_get_the_usual_modes(tmp_path):
    old = os.umask(0o022)
    try:
        new = tmp_path / "new.csv"
        with atomic_open(new) as fh:
            fh.write("a")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        kept = tmp_path / "kept.csv"
        kept.write_text("x")
        kept.chmod(0o640)
        with atomic_open(kept) as fh:
            fh.write("b")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "b"
        os.umask(0o077)
        private = tmp_path / "private.csv"
        with atomic_open(private) as fh:
            fh.write("c")
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_checkpoints_written_by_training_have_umask_modes(tmp_path, labels_csv):
    old = os.umask(0o022)
    try:
        out = tmp_path / "ft.safetensors"
        shots = load_dataset(f"csv:{labels_csv}")
        finetune(tiny(), shots, FinetuneConfig(**FAST), out=out, progress=False)
        for p in (out, state_path(out), out.with_suffix(".log.jsonl")):
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    finally:
        os.umask(old)


def test_a_corrupt_image_leaves_no_split_file(tmp_path, capsys):
    d = tmp_path / "data"
    rows = ["path,mos"]
    for i in range(10):
        make_image(d / f"im{i}.png", size=(40, 36), seed=i)
        rows.append(f"im{i}.png,{10 * i}")
    for i in (1, 3, 5, 7):  # 4 of 10: the 8 shots of an 8-image pool hold at least 2
        (d / f"im{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "ft.safetensors"
    argv = ["finetune", "--data", f"csv:{d / 'labels.csv'}", "--shots", "8", "--out", str(out)]
    argv += ["--backbone", "test-tiny", "--max-epochs", "1", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"im[1357]\.png", err) and "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".splits.csv").exists()
    report = tmp_path / "report"
    argv = ["evaluate", "--data", f"csv:{d / 'labels.csv'}", "--method", "linear-probe"]
    argv += ["--shots", "8", "--splits", "1", "--report", str(report), "--backbone", "test-tiny"]
    assert main([*argv, "--no-progress"]) == 1
    assert not (report / "splits.csv").exists() and not (report / "report.json").exists()


def test_run_output_names_that_clash_or_cannot_be_written(tmp_path):
    with pytest.raises(RunError, match="clashes"):
        RunFiles(tmp_path / "x.safetensors", kind="finetune", log=tmp_path / "x.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(RunError, match="is a folder"):
        RunFiles(tmp_path / "dir.safetensors", kind="finetune").start(False, False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file"):
        RunFiles(tmp_path / "file" / "ck.safetensors", kind="finetune").start(False, False)


def test_checkpoint_with_nan_cannot_be_scored_from_the_cli(tmp_path, capsys):
    from safetensors.torch import save_file

    ck = grmpiqa.save_checkpoint(tiny(), tmp_path / "ok.safetensors")
    tensors, meta = grmpiqa.checkpoint.read_checkpoint(ck)
    tensors["prompt_learner.ctx"][0, 0] = float("nan")
    import json

    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata={"grmpiqa": json.dumps(meta)})
    img = make_image(tmp_path / "a.png")
    assert main(["score", str(img), "--checkpoint", str(tmp_path / "nan.safetensors")]) == 1
    assert "NaN or inf" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        grmpiqa.create_model(checkpoint=tmp_path / "nan.safetensors")


def test_save_clock_is_due_after_its_interval_and_at_every_point_with_zero(monkeypatch):
    from grmpiqa import runs

    now = {"t": 100.0}
    monkeypatch.setattr(runs.time, "monotonic", lambda: now["t"])
    clock = runs.SaveClock(120)
    assert not clock.due()
    now["t"] += 119.9
    assert not clock.due()
    now["t"] += 0.2
    assert clock.due()
    clock.saved()
    assert not clock.due()
    assert runs.SaveClock(0).due() and runs.SaveClock(0).due()  # 0: every safe point
    assert runs.DEFAULT_SAVE_EVERY == 120.0


def test_stop_signals_turn_sigterm_into_a_request_and_a_second_into_an_interrupt():
    import signal

    from process_utils import send_to_self

    from grmpiqa.runs import RunInterrupted, stop_signals

    before = signal.getsignal(signal.SIGTERM)
    with stop_signals() as stop:
        assert not stop.requested
        send_to_self(signal.SIGTERM)  # would kill the test process without the handler
        assert stop.requested and stop.name == "SIGTERM"
        with stop_signals() as inner:  # nested (evaluate -> finetune): the same request
            assert inner is stop
        err = stop.interrupted("state saved")
        assert isinstance(err, RunInterrupted) and err.exit_code == 128 + signal.SIGTERM
        assert "stopped by SIGTERM: state saved; run again with --resume" in str(err)
        with pytest.raises(KeyboardInterrupt):
            send_to_self(signal.SIGTERM)  # the second signal: stop at once
    assert signal.getsignal(signal.SIGTERM) == before
    with stop_signals(enabled=False) as off:
        assert signal.getsignal(signal.SIGTERM) == before and not off.requested
