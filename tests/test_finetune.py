"""Stage 2 fine-tuning (method.md 7): loop, schedule, resume, checkpoint, CLI."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLIVE_ROOT, needs_clive
from PIL import Image, ImageFilter

import grmpiqa
from grmpiqa.checkpoint import read_metadata
from grmpiqa.cli import main
from grmpiqa.data import load_dataset
from grmpiqa.errors import GrmpiqaError
from grmpiqa.finetune import (
    SCENE_PROMPTS,
    FinetuneConfig,
    PlateauSchedule,
    finetune,
    log_path,
    state_path,
)

pytestmark = pytest.mark.usefixtures("one_thread")


MODEL_CONFIG = grmpiqa.ModelConfig(vpt_tokens=4, finetune_blocks=2)


def tiny_model(**kw) -> grmpiqa.QualityModel:
    return grmpiqa.create_model("test-tiny", pretrained=None, config=kw.pop("config", MODEL_CONFIG))


@pytest.fixture(scope="module")
def blur_csv(tmp_path_factory) -> Path:
    """10 images whose MOS falls with their blur (sharper = better)."""
    d = tmp_path_factory.mktemp("blur")
    rng = np.random.default_rng(0)
    rows = ["path,mos"]
    for i in range(10):
        arr = rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)
        img = Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.5 * i))
        img.save(d / f"im{i}.png")
        rows.append(f"im{i}.png,{100 - 9 * i}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d / "labels.csv"


@pytest.fixture(scope="module")
def shots(blur_csv):
    return load_dataset(f"csv:{blur_csv}")


def test_scene_prompts_are_the_released_liqe_wording():
    assert len(SCENE_PROMPTS) == 9
    assert SCENE_PROMPTS[0] == "a photo of a animal"
    assert "a photo of a still_life" in SCENE_PROMPTS  # verbatim, as the released code
    assert SCENE_PROMPTS[-1] == "a photo of a others"


def test_plateau_schedule_is_the_released_rule():
    s = PlateauSchedule(lr=1e-3, patience=2, decay=0.5, min_lr=2e-4)
    assert not s.update(0.5, epoch=5)  # improvement
    assert not s.update(0.4, epoch=6) and s.bad == 1
    assert not s.update(0.5, epoch=7) and s.bad == 2  # equal is no improvement
    assert not s.update(0.3, epoch=8) and s.bad == 3 and s.lr == 1e-3  # epoch <= 10: no decay
    assert not s.update(0.3, epoch=11)  # > patience and epoch > 10: decay
    assert s.lr == pytest.approx(5e-4) and s.bad == 0 and s.decays == 1
    assert not s.update(0.9, epoch=12) and s.best == 0.9
    assert not s.update(math.nan, epoch=13) and s.bad == 1  # NaN never improves
    for e in (14, 15):  # the second stall decays to 2.5e-4 (still >= min_lr)
        assert not s.update(0.1, epoch=e)
    assert s.lr == pytest.approx(2.5e-4) and s.decays == 2
    assert not s.update(0.1, epoch=16) and not s.update(0.1, epoch=17)
    assert s.update(0.1, epoch=18)  # the third decay goes below min_lr: stop
    assert s.lr == pytest.approx(1.25e-4)


def test_finetune_trains_only_stage2_and_lowers_the_quality_loss(shots, tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def on_eval(epoch, m):
        calls.append(epoch)
        assert not m.training
        return {"test_figure": float(epoch)}

    config = FinetuneConfig(lr=0.05, max_epochs=8, eval_every=2, cache_augmentations=2)
    result = finetune(model, shots, config, on_eval=on_eval, progress=False)
    assert result.stopped == "max_epochs" and result.epochs == 8
    assert calls == [2, 4, 6, 8]
    assert [r["epoch"] for r in result.history] == [2, 4, 6, 8]
    first, last = result.history[0], result.history[-1]
    assert last["loss_q"] < first["loss_q"]
    assert all(math.isfinite(r["loss_s"]) for r in result.history)
    assert all(math.isfinite(r["grad_cos"]) for r in result.history)
    assert last["test_figure"] == 8.0 and last["monitor"] == "train_srcc"
    assert last["monitored"] == last["train_srcc"]
    assert -1.0 <= last["train_srcc"] <= 1.0
    trained = set(model.parameter_names(grmpiqa.STAGE2_GROUPS))
    after = dict(model.named_parameters())
    for n, p in after.items():
        if n in trained:
            assert not torch.equal(p.detach(), before[n]), f"{n} did not train"
        else:
            assert torch.equal(p.detach(), before[n]), f"{n} is frozen but changed"
    assert any(n.startswith("visual.") for n in before if n not in trained)


def test_schedule_decays_and_stops_at_min_lr(shots):
    model = tiny_model()
    config = FinetuneConfig(
        lr=1e-3,
        min_lr=5e-4,
        patience=0,
        eval_every=1,
        max_epochs=50,
        monitor="flat",
        cache_augmentations=1,
        lam=0.0,
    )
    result = finetune(model, shots, config, on_eval=lambda e, m: {"flat": 0.0}, progress=False)
    # improves once (epoch 1), stalls from epoch 2; the first decay is allowed at epoch 11
    assert result.stopped == "min_lr" and result.epochs == 11
    assert [r["lr"] for r in result.history] == [1e-3] * 11
    assert result.history[-1]["next_lr"] == pytest.approx(3e-4)
    assert result.final_lr == pytest.approx(3e-4)


def test_monitor_errors_name_the_missing_figure(shots):
    config = FinetuneConfig(max_epochs=1, eval_every=1, monitor="test_srcc", cache_augmentations=1)
    with pytest.raises(GrmpiqaError, match="test_srcc"):
        finetune(tiny_model(), shots, config, progress=False)
    with pytest.raises(GrmpiqaError, match="lambda"):
        finetune(tiny_model(), shots, FinetuneConfig(lam=-1.0), progress=False)


def test_plain_finetuning_and_no_teacher(shots):
    r0 = finetune(
        tiny_model(), shots, FinetuneConfig(lam=0.0, max_epochs=2, eval_every=2), progress=False
    )
    assert math.isfinite(r0.history[-1]["loss_s"])  # L_s still logged, never used
    assert r0.history[-1]["projected"] == 0
    coop = FinetuneConfig(distill=False, groups=("text_context",), max_epochs=2, eval_every=2)
    model = tiny_model()
    r1 = finetune(model, shots, coop, progress=False)
    assert math.isnan(r1.history[-1]["loss_s"])
    assert model.trainable_parameters().keys() == {"prompt_learner.ctx"}


@pytest.mark.parametrize("cache", [True, False])
def test_bf16_autocast_trains(shots, cache):
    config = FinetuneConfig(
        precision="bf16", cache=cache, max_epochs=2, eval_every=2, cache_augmentations=1, lr=0.05
    )
    model = tiny_model()
    before = model.prompt_learner.ctx.detach().clone()
    r = finetune(model, shots, config, progress=False)
    row = r.history[-1]
    assert math.isfinite(row["loss_q"]) and math.isfinite(row["loss_s"])
    assert model.prompt_learner.ctx.dtype == torch.float32  # parameters stay fp32
    assert not torch.equal(model.prompt_learner.ctx.detach(), before)


def test_validation_set_is_monitored_by_default(shots):
    config = FinetuneConfig(max_epochs=2, eval_every=1, cache_augmentations=1)
    r = finetune(
        tiny_model(), shots.subset(range(6)), config, val=shots.subset(range(6, 10)), progress=False
    )
    assert r.history[-1]["monitor"] == "val_srcc"
    assert r.history[-1]["monitored"] == r.history[-1]["val_srcc"]


@pytest.mark.parametrize("cache", [True, False])
def test_resume_continues_exactly(shots, tmp_path, cache):
    kw = dict(lr=0.05, eval_every=2, cache=cache, cache_augmentations=2, seed=3)
    straight = tiny_model(config=grmpiqa.ModelConfig(vpt_tokens=4, finetune_blocks=2))
    ra = finetune(straight, shots, FinetuneConfig(max_epochs=4, **kw), progress=False)

    out = tmp_path / "run.safetensors"
    first = tiny_model()
    finetune(first, shots, FinetuneConfig(max_epochs=2, **kw), out=out, progress=False)
    assert state_path(out).is_file() and log_path(out).is_file()
    assert read_metadata(out)["extra"]["stopped"] == "max_epochs"
    second = tiny_model()  # a fresh process would rebuild the same start model
    rb = finetune(
        second, shots, FinetuneConfig(max_epochs=4, **kw), out=out, resume=True, progress=False
    )
    assert rb.epochs == 4 and [r["epoch"] for r in rb.history] == [2, 4]
    for a, b in zip(ra.history, rb.history, strict=True):
        assert a["loss_q"] == pytest.approx(b["loss_q"], abs=1e-6)
        assert a["loss_s"] == pytest.approx(b["loss_s"], abs=1e-6)
    for (n, p), (_, q) in zip(straight.named_parameters(), second.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    lines = log_path(out).read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [2, 4]
    # a finished run resumes to itself; other settings are refused
    third = tiny_model()
    rc = finetune(
        third, shots, FinetuneConfig(max_epochs=4, **kw), out=out, resume=True, progress=False
    )
    assert rc.epochs == 4 and rc.stopped == "max_epochs" and len(rc.history) == 2
    for (n, p), (_, q) in zip(second.named_parameters(), third.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    with pytest.raises(GrmpiqaError, match="lam"):
        finetune(
            tiny_model(),
            shots,
            FinetuneConfig(max_epochs=6, lam=1.0, **kw),
            out=out,
            resume=True,
            progress=False,
        )


def test_checkpoint_scores_like_the_trained_model(shots, tmp_path):
    out = tmp_path / "ft.safetensors"
    model = tiny_model()
    finetune(
        model, shots, FinetuneConfig(max_epochs=2, eval_every=2, lr=0.05), out=out, progress=False
    )
    loaded = grmpiqa.create_model(checkpoint=out)
    torch.testing.assert_close(loaded.score(shots.paths), model.score(shots.paths))
    meta = read_metadata(out)
    assert meta["extra"]["stage"] == "finetune"
    assert meta["extra"]["train_names"] == shots.names
    assert meta["extra"]["finetune"]["lam"] == 5.0


def test_cli_finetune_end_to_end(blur_csv, tmp_path, capsys):
    init = tmp_path / "meta.safetensors"
    grmpiqa.save_checkpoint(tiny_model(), init)  # stands in for a stage-1 checkpoint
    out = tmp_path / "ft.safetensors"
    argv = [
        "finetune",
        "--data",
        f"csv:{blur_csv}",
        "--shots",
        "6",
        "--init",
        str(init),
        "--out",
        str(out),
        "--max-epochs",
        "3",
        "--eval-every",
        "3",
        "--split-seed",
        "1",
        "--cache-augmentations",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    meta = read_metadata(out)
    split = meta["extra"]["split"]
    assert split["column"] == "split_seed1_k0" and split["shots"] == 6
    assert meta["extra"]["init"] == str(init)
    csv_lines = (tmp_path / "ft.splits.csv").read_text().splitlines()
    assert sum(line.endswith(",train") for line in csv_lines) == 6
    # the visual prompts are the stage-1 ones (frozen); the last blocks changed
    t_init, _ = grmpiqa.checkpoint.read_checkpoint(init)
    t_out, _ = grmpiqa.checkpoint.read_checkpoint(out)
    assert torch.equal(t_out["visual.prompt_embeddings"], t_init["visual.prompt_embeddings"])
    assert "clip.visual.transformer.resblocks.3.mlp.c_fc.weight" in t_out
    capsys.readouterr()
    assert (
        main(["score", "--checkpoint", str(out), str(blur_csv.parent / "im0.png"), "--no-progress"])
        == 0
    )
    assert "im0.png" in capsys.readouterr().out
    # errors are one line, exit 1
    assert main(argv[:-1] + ["--lambda", "-2", "--no-progress"]) == 1
    assert "lambda" in capsys.readouterr().err
    bad = ["finetune", "--data", f"csv:{tmp_path}/none.csv", "--out", str(out), "--no-progress"]
    assert main(bad) == 1
    err = capsys.readouterr().err
    assert err.startswith("grmpiqa: error:") and "none.csv" in err
    # any output name works (the issue writes --out CKPT); the file is a grmpiqa checkpoint
    other = tmp_path / "x.ckpt"
    assert main(argv[:7] + ["--out", str(other), "--max-epochs", "1", "--no-progress"]) == 0
    assert read_metadata(other)["extra"]["split"]["shots"] == 6


@needs_clive
def test_cli_finetune_on_clive(tmp_path):
    out = tmp_path / "clive.safetensors"
    argv = [
        "finetune",
        "--data",
        f"clive:{CLIVE_ROOT}",
        "--shots",
        "8",
        "--out",
        str(out),
        "--backbone",
        "test-tiny",
        "--pretrained",
        "random",
        "--max-epochs",
        "2",
        "--eval-every",
        "1",
        "--cache-augmentations",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 0
    rows = [json.loads(x) for x in log_path(out).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss_q"]) for r in rows)
    assert len(read_metadata(out)["extra"]["train_names"]) == 8


# -- saving on a clock, SIGTERM and kill -9 (issue 21) -------------------------------------


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return grmpiqa.checkpoint.read_checkpoint(path)[0]


def _rows(out: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(x).items() if "seconds" not in k}
        for x in log_path(out).read_text().splitlines()
    ]


def test_state_is_written_on_the_clock_and_the_checkpoint_at_the_end(shots, tmp_path, monkeypatch):
    from grmpiqa.runs import RunFiles

    epochs: list[int] = []
    real = RunFiles.save_state

    def counting(self, tensors, record):
        epochs.append(int(record["epoch"]))
        real(self, tensors, record)

    monkeypatch.setattr(RunFiles, "save_state", counting)
    cfg = FinetuneConfig(max_epochs=6, eval_every=3, cache_augmentations=2, lr=0.05)
    out = tmp_path / "hourly.safetensors"
    finetune(tiny_model(), shots, cfg, out=out, progress=False, save_every=3600)
    assert epochs == [6]  # only the end: no write at the evaluations any more
    assert read_metadata(out)["extra"]["epoch"] == 6
    epochs.clear()
    finetune(
        tiny_model(), shots, cfg, out=tmp_path / "each.safetensors", progress=False, save_every=0
    )
    assert epochs == [1, 2, 3, 4, 5, 6]  # 0: after every epoch


def test_sigterm_writes_the_state_and_resume_is_bit_exact(shots, tmp_path, monkeypatch):
    """SIGTERM in epoch 5 (between evaluations at 3 and 6): the run finishes the epoch,
    writes its state (no checkpoint: it is not done) and stops with RunInterrupted; the
    resumed run ends with exactly the weights and history of an uninterrupted one."""
    import signal

    from process_utils import send_to_self

    from grmpiqa.runs import RunFiles, RunInterrupted

    ft = importlib.import_module("grmpiqa.finetune")
    cfg = FinetuneConfig(max_epochs=8, eval_every=3, cache_augmentations=3, lr=0.05, seed=2)
    ref = tmp_path / "ref.safetensors"
    finetune(tiny_model(), shots, cfg, out=ref, progress=False)

    out = tmp_path / "run.safetensors"
    real = ft.CachedShots.batch

    def batch(self, indices, epoch):
        if epoch == 5:
            send_to_self(signal.SIGTERM)
        return real(self, indices, epoch)

    monkeypatch.setattr(ft.CachedShots, "batch", batch)
    with pytest.raises(RunInterrupted, match="SIGTERM.*holds epoch 5.*--resume") as err:
        finetune(tiny_model(), shots, cfg, out=out, progress=False, save_every=3600)
    assert err.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler removed again
    assert RunFiles(out, "finetune").load_state().record["epoch"] == 5
    assert not out.exists()
    monkeypatch.setattr(ft.CachedShots, "batch", real)
    finetune(tiny_model(), shots, cfg, out=out, resume=True, progress=False)
    a, b = _tensors(ref), _tensors(out)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert _rows(ref) == _rows(out)


def test_kill_9_resumes_bit_exact_from_the_last_state(blur_csv, tmp_path):
    """`grmpiqa finetune` killed with SIGKILL (--save-every 0: a state after every epoch),
    then --resume: the checkpoint and log equal an uninterrupted run's, bit for bit."""
    from process_utils import run_and_signal

    from grmpiqa.runs import RunFiles

    init = tmp_path / "init.safetensors"
    grmpiqa.save_checkpoint(tiny_model(), init)  # test-tiny, 4 visual prompt tokens

    def argv(out: Path) -> list[str]:
        return [
            "finetune", "--data", f"csv:{blur_csv}", "--shots", "8", "--out", str(out),
            "--init", str(init), "--max-epochs", "40", "--eval-every", "4",
            "--cache-augmentations", "3", "--lr", "0.05", "--save-every", "0", "--no-progress",
        ]  # fmt: skip

    out = tmp_path / "killed.safetensors"
    state = RunFiles(out, "finetune").state

    def mid_run() -> bool:  # two evaluations logged: well inside the 40 epochs
        return log_path(out).is_file() and len(log_path(out).read_text().splitlines()) >= 2

    proc = run_and_signal(argv(out), mid_run)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert state.is_file() and not out.exists()
    killed_at = RunFiles(out, "finetune").load_state().record["epoch"]
    assert 4 <= killed_at < 40  # (the log may hold a row the state does not: dropped)
    assert main([*argv(out), "--resume"]) == 0
    ref = tmp_path / "ref.safetensors"
    assert main(argv(ref)) == 0
    a, b = _tensors(ref), _tensors(out)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert _rows(ref) == _rows(out)


def test_compiled_step_matches_eager(shots, monkeypatch):
    """``compile`` runs the step's forward through torch.compile (here dynamo's "eager"
    backend: the capture and the wiring, without inductor's C++ build, which a GPU run
    uses); without dropout its losses and weights follow the eager run to rounding."""
    ft = importlib.import_module("grmpiqa.finetune")
    monkeypatch.setattr(ft, "COMPILE_BACKEND", "eager")
    no_dropout = grmpiqa.ModelConfig(vpt_tokens=4, finetune_blocks=2, vpt_dropout=0.0)
    runs = {}
    for mode in ("off", "default"):
        cfg = FinetuneConfig(max_epochs=1, eval_every=1, cache_augmentations=1, compile=mode)
        model = tiny_model(config=no_dropout)
        runs[mode] = (finetune(model, shots, cfg, progress=False), model)
    (ra, ma), (rb, mb) = runs["off"], runs["default"]
    assert rb.history[-1]["loss_q"] == pytest.approx(ra.history[-1]["loss_q"], rel=1e-5)
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=n)
    with pytest.raises(GrmpiqaError, match="compile"):
        FinetuneConfig(compile="fast").validate()
