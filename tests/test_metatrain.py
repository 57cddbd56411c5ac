"""Stage-1 meta-prompt pre-training (method.md 6) on the tiny random backbone."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import grmpiqa
from grmpiqa.checkpoint import read_checkpoint
from grmpiqa.cli import main
from grmpiqa.data import load_dataset
from grmpiqa.errors import DatasetError, GrmpiqaError
from grmpiqa.losses import quality_loss
from grmpiqa.metatrain import (
    _AUGMENT,
    _DROPOUT,
    _ORDER,
    PretrainConfig,
    _derive_seed,
    _seed_seq,
    build_tasks,
    log_path_for,
    pretrain,
    split_task,
    state_path_for,
)
from grmpiqa.runs import RunFiles
from grmpiqa.transforms import stage1_query_transform, stage1_support_transform

TINY = grmpiqa.ModelConfig(vpt_tokens=4)
FAST = {"support_batch": 4, "query_batch": 4}


def _shared_data() -> Path:
    env = os.environ.get("GRMPIQA_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


KODAK = _shared_data() / "pristine" / "kodak"


def _make_kadid(root: Path, refs: int = 2, types: int = 3, levels: int = 5, size: int = 48) -> Path:
    """A KADID-layout set: blur / noise / darkening at growing levels, dmos falling."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = ["dist_img,ref_img,dmos,var"]
    yy, xx = np.mgrid[0:size, 0:size] / size
    for r in range(1, refs + 1):
        f = rng.uniform(1, 4, 3)
        waves = [np.sin(f[0] * 6 * xx), np.cos(f[1] * 6 * yy), np.sin(f[2] * 6 * (xx + yy))]
        ref = Image.fromarray(((np.stack(waves, -1) * 0.5 + 0.5) * 255).astype(np.uint8))
        for t in range(1, types + 1):
            for lv in range(1, levels + 1):
                arr = np.asarray(ref, dtype=np.float64)
                if t % 3 == 1:
                    img = ref.filter(ImageFilter.GaussianBlur(lv * 0.8))
                else:
                    if t % 3 == 2:
                        arr = arr + rng.normal(0, 12 * lv, arr.shape)
                    else:
                        arr = arr * (1 - 0.15 * lv)
                    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
                name = f"I{r:02d}_{t:02d}_{lv:02d}.png"
                img.save(root / "images" / name)
                rows.append(f"{name},I{r:02d}.png,{5.0 - (lv - 1) * 0.9:.2f},0.1")
    (root / "dmos.csv").write_text("\n".join(rows) + "\n")
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kadid(tmp_path_factory: pytest.TempPathFactory) -> str:
    return "kadid:" + str(_make_kadid(tmp_path_factory.mktemp("tasks") / "kadid"))


def _model() -> grmpiqa.QualityModel:
    return grmpiqa.create_model("test-tiny", pretrained=None, config=TINY)


def _prompts(model: grmpiqa.QualityModel) -> dict[str, torch.Tensor]:
    names = model.parameter_names(grmpiqa.STAGE1_GROUPS)
    sd = model.state_dict()
    return {n: sd[n].detach().clone() for n in names}


def _task_loss(model: grmpiqa.QualityModel, spec: str, task: str) -> float:
    """Quality loss of the model (eval mode) on all images of one task."""
    ds = load_dataset(spec)
    idx = ds.groups()[task]
    tf = stage1_query_transform()
    x = torch.stack([tf(ds[i].load()) for i in idx])
    y = torch.tensor([ds[i].label for i in idx])
    model.eval()
    with torch.no_grad():
        return float(quality_loss(model(x), y))


def test_tasks_are_distortion_types_and_split_each_epoch(kadid: str) -> None:
    dbs = build_tasks([kadid])
    assert [t.name for t in dbs[0].tasks] == ["01", "02", "03"]
    assert all(len(t) == 10 for t in dbs[0].tasks)
    assert build_tasks([kadid], max_tasks=2)[0].tasks[-1].name == "02"
    sub = build_tasks([kadid], images_per_task=6, seed=3)[0].tasks[0]
    assert len(sub) == 6 and sub == build_tasks([kadid], images_per_task=6, seed=3)[0].tasks[0]
    task = dbs[0].tasks[0]
    s0, q0 = split_task(task, 0.8, seed=0, epoch=0, d_index=0, t_index=0)
    assert (len(s0), len(q0)) == (8, 2) and sorted(s0 + q0) == list(range(10))
    assert split_task(task, 0.8, 0, 0, 0, 0) == (s0, q0)  # a pure function of the keys
    later = [split_task(task, 0.8, 0, e, 0, 0)[1] for e in range(1, 6)]
    assert any(sorted(q) != sorted(q0) for q in later)  # re-split every epoch


def test_loss_falls_on_a_task_it_trains_on(kadid: str, tmp_path: Path) -> None:
    model = _model()
    before = _task_loss(model, kadid, "01")
    cfg = PretrainConfig(epochs=6, max_tasks=1, inner_lr=2e-3, outer_lr=1.0, **FAST)
    result = pretrain(model, [kadid], cfg, tmp_path / "p.safetensors", progress=False)
    after = _task_loss(model, kadid, "01")
    assert after < before - 0.01, (before, after)
    assert result.epochs_done == 6 and len(result.history) == 6


@pytest.mark.parametrize("variant", ["reptile", "released"])
def test_only_prompts_train_clip_bit_identical(kadid: str, tmp_path: Path, variant: str) -> None:
    model = _model()
    clip_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("clip.")}
    prompts_before = _prompts(model)
    cfg = PretrainConfig(epochs=1, variant=variant, inner_lr=1e-3, **FAST)
    out = tmp_path / "p.safetensors"
    pretrain(model, [kadid], cfg, out, progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in clip_before.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(prompts_before)
    changed = [n for n, v in prompts_before.items() if not torch.equal(after[n], v)]
    assert "prompt_learner.ctx" in changed and "visual.deep_prompt_embeddings" in changed
    tensors, meta = read_checkpoint(out)
    assert set(tensors) == set(prompts_before)  # no CLIP tensor in the checkpoint
    assert meta["extra"]["stage"] == "pretrain" and meta["extra"]["variant"] == variant
    state = RunFiles(out, "pretrain").load_state()
    theta, phi = state.take("theta"), state.take("phi")
    assert state_path_for(out) == RunFiles(out, "pretrain").state
    same_phi = all(torch.equal(phi[n], theta[n]) for n in theta)
    # reptile ends every epoch holding theta; released keeps a separate inner model phi
    assert same_phi == (variant == "reptile")
    assert (state.record["inner_optimizer"] is None) == (variant == "reptile")


@pytest.mark.parametrize("variant", ["reptile", "released"])
def test_outer_step_interpolates_towards_task_weights(
    kadid: str, tmp_path: Path, variant: str
) -> None:
    """theta1 = theta0 + outer_lr * mean_i(phi_i - theta0): linear in outer_lr."""
    theta0 = _prompts(_model())
    ends = {}
    for lr in (1.0, 0.25):
        model = _model()
        cfg = PretrainConfig(epochs=1, variant=variant, outer_lr=lr, inner_lr=1e-3, **FAST)
        pretrain(model, [kadid], cfg, tmp_path / f"{lr}.safetensors", progress=False)
        ends[lr] = _prompts(model)
    for n, t0 in theta0.items():
        torch.testing.assert_close(ends[0.25][n] - t0, 0.25 * (ends[1.0][n] - t0))


@pytest.mark.parametrize("variant", ["reptile", "released"])
def test_resume_gives_the_same_prompts(kadid: str, tmp_path: Path, variant: str) -> None:
    cfg2 = PretrainConfig(epochs=2, variant=variant, inner_lr=1e-3, **FAST)
    straight = tmp_path / "straight.safetensors"
    torch.manual_seed(1)  # the caller's global RNG must not matter, only config.seed
    pretrain(_model(), [kadid], cfg2, straight, progress=False)

    split = tmp_path / "split.safetensors"
    torch.manual_seed(2)
    pretrain(
        _model(), [kadid], PretrainConfig(**{**cfg2.to_dict(), "epochs": 1}), split, progress=False
    )
    resumed = pretrain(_model(), [kadid], cfg2, split, resume=True, progress=False)
    assert resumed.epochs_done == 2
    a, meta_a = read_checkpoint(straight)
    b, meta_b = read_checkpoint(split)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_b["extra"]["epochs_done"] == 2
    log = [json.loads(line) for line in log_path_for(split).read_text().splitlines()]
    assert [r["epoch"] for r in log if r.get("event") == "epoch"] == [1, 2]
    task_recs = [r for r in log if "task" in r]
    assert len(task_recs) == 6 and {"support_loss", "query_loss", "seconds"} <= set(task_recs[0])


def test_resume_refuses_a_different_run(kadid: str, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    cfg = PretrainConfig(epochs=1, **FAST)
    pretrain(_model(), [kadid], cfg, out, progress=False)
    with pytest.raises(GrmpiqaError, match="seed"):
        pretrain(
            _model(),
            [kadid],
            PretrainConfig(epochs=2, seed=1, **FAST),
            out,
            resume=True,
            progress=False,
        )
    with pytest.raises(GrmpiqaError, match="variant"):
        pretrain(
            _model(),
            [kadid],
            PretrainConfig(epochs=2, variant="released", **FAST),
            out,
            resume=True,
            progress=False,
        )
    with pytest.raises(GrmpiqaError, match="--resume"):
        pretrain(_model(), [kadid], cfg, out, progress=False)  # would clobber the state


def test_validation_and_opt_in_best_selection(kadid: str, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    cfg = PretrainConfig(epochs=2, keep_best_val=True, precision="bf16", inner_lr=1e-3, **FAST)
    model = _model()
    result = pretrain(model, [kadid], cfg, out, val=kadid, progress=False)
    meta = grmpiqa.read_metadata(out)["extra"]
    assert meta["selection"] == "best-val" and meta["best_epoch"] == result.best_epoch
    # every epoch was validated; the checkpoint is the best epoch's, written then
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all("val_srcc" in h for h in result.history)
    figures = meta["val"]["figures"]
    assert [f["epoch"] for f in figures] == list(range(1, meta["best_epoch"] + 1))
    assert all(f["srcc"] is None or -1 <= f["srcc"] <= 1 for f in figures)
    tensors, _ = read_checkpoint(out)
    held = _prompts(model)  # the model ends holding what the checkpoint holds
    assert all(torch.equal(tensors[k], held[k]) for k in tensors)
    with pytest.raises(GrmpiqaError, match="validation"):
        pretrain(_model(), [kadid], cfg, tmp_path / "q.safetensors", progress=False)


def test_checkpoint_starts_fine_tuning(kadid: str, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    model = _model()
    pretrain(model, [kadid], PretrainConfig(epochs=1, inner_lr=1e-3, **FAST), out, progress=False)
    loaded = grmpiqa.create_model(checkpoint=out)
    assert loaded.config.vpt_tokens == 4
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in _prompts(model).items())
    params = loaded.set_trainable(grmpiqa.STAGE2_GROUPS)
    assert params and not any(p.requires_grad for p in loaded.visual.parameters())  # type: ignore[union-attr]


def test_cli_missing_task_dataset_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    code = main(
        [
            "pretrain",
            "--tasks",
            f"kadid:{missing}",
            "--out",
            str(tmp_path / "p.safetensors"),
            "--backbone",
            "test-tiny",
            "--pretrained",
            "random",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("grmpiqa: error: ") and str(missing) in err[-1]
    assert "Traceback" not in "\n".join(err)
    with pytest.raises(DatasetError):
        build_tasks([f"clive:{missing}"])


@pytest.mark.skipif(not KODAK.is_dir(), reason="../shared/data/pristine/kodak absent")
def test_cli_synth_pretrain_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    for name in sorted(p.name for p in KODAK.glob("*.png"))[:2]:
        with Image.open(KODAK / name) as img:  # downscaled: keeps the test fast
            img.convert("RGB").resize((192, 128), Image.Resampling.BICUBIC).save(pristine / name)
    synth = tmp_path / "synth"
    assert (
        main(
            [
                "synth",
                "--pristine",
                str(pristine),
                "--out",
                str(synth),
                "--types",
                "1",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    out = tmp_path / "stage1.safetensors"
    args = [
        "pretrain",
        "--tasks",
        f"kadid:{synth}",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--support-batch",
        "4",
        "--query-batch",
        "4",
        "--vpt-tokens",
        "4",
        "--backbone",
        "test-tiny",
        "--pretrained",
        "random",
        "--seed",
        "3",
        "--no-progress",
    ]
    assert main(args) == 0
    assert out.is_file() and state_path_for(out).is_file()
    extra = grmpiqa.read_metadata(out)["extra"]
    assert extra["epochs_done"] == 1 and extra["seed"] == 3 and len(extra["tasks"][0]["types"]) == 2
    assert main(args + ["--resume"]) == 0  # already done: nothing to redo, still exit 0
    capsys.readouterr()
    images = sorted(str(p) for p in (synth / "images").glob("I*_*_*.png"))[:3]
    assert main(["score", *images, "--checkpoint", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.rsplit(",", 1) for line in lines if not line.startswith("path,")]
    assert len(rows) == 3 and all(0.0 < float(s) < 1.0 for _, s in rows)


def test_step_size_defaults_depend_on_the_variant() -> None:
    from grmpiqa.metatrain import VARIANT_DEFAULTS, outer_lr_at

    released = PretrainConfig(variant="released")
    assert (released.inner_lr, released.outer_lr, released.outer_schedule) == (
        1e-4,
        0.01,
        "constant",
    )  # the authors' values, exactly
    assert (released.inner_passes, released.support_batch, released.query_batch) == (1, 75, 50)
    reptile = PretrainConfig()
    assert reptile.variant == "reptile"
    assert {k: getattr(reptile, k) for k in VARIANT_DEFAULTS["reptile"]} == VARIANT_DEFAULTS[
        "reptile"
    ]
    assert PretrainConfig(variant="released", outer_lr=0.5).outer_lr == 0.5  # explicit wins
    assert PretrainConfig.from_dict(released.to_dict()) == released
    with pytest.raises(GrmpiqaError, match="schedule"):
        PretrainConfig(outer_schedule="cosine")
    with pytest.raises(GrmpiqaError, match="inner_passes"):
        PretrainConfig(inner_passes=0)
    lin = PretrainConfig(epochs=4, outer_lr=1.0, outer_schedule="linear")
    assert [outer_lr_at(lin, e) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert outer_lr_at(PretrainConfig(epochs=4, outer_lr=0.3), 3) == 0.3


def test_log_shows_losses_and_displacement_of_theta(kadid: str, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    model = _model()
    before = _prompts(model)
    cfg = PretrainConfig(epochs=2, inner_passes=2, **FAST)
    result = pretrain(model, [kadid], cfg, out, progress=False)
    log = [json.loads(line) for line in log_path_for(out).read_text().splitlines()]
    tasks = [r for r in log if "task" in r]
    assert len(tasks) == 6 and all(r["inner_displacement"] > 0 for r in tasks)
    epochs = [r for r in log if r.get("event") == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert {"support_loss", "query_loss", "inner_displacement", "outer_lr"} <= set(r)
        assert (
            set(r["displacement"])
            == set(r["step"])
            == {
                "total",
                "text_context",
                "visual_prompts",
            }
        )
    after = _prompts(model)
    total = float(torch.sqrt(sum(((after[n] - before[n]).double() ** 2).sum() for n in after)))
    assert epochs[-1]["displacement"]["total"] == pytest.approx(total, rel=1e-5)
    assert epochs[0]["step"]["total"] == pytest.approx(epochs[0]["displacement"]["total"])
    assert result.history[-1]["max_abs_displacement"] == pytest.approx(
        max(float((after[n] - before[n]).abs().max()) for n in after), rel=1e-5
    )


def test_linear_schedule_fixes_the_horizon_for_resume(kadid: str, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    cfg = PretrainConfig(epochs=1, outer_schedule="linear", **FAST)
    pretrain(_model(), [kadid], cfg, out, progress=False)
    longer = PretrainConfig(**{**cfg.to_dict(), "epochs": 2})
    with pytest.raises(GrmpiqaError, match="epochs"):
        pretrain(_model(), [kadid], longer, out, resume=True, progress=False)


def test_cli_step_size_flags(kadid: str, tmp_path: Path) -> None:
    out = tmp_path / "p.safetensors"
    args = ["pretrain", "--tasks", kadid, "--out", str(out), "--epochs", "1"]
    args += ["--vpt-tokens", "4", "--backbone", "test-tiny", "--pretrained", "random"]
    args += ["--no-progress", "--variant", "released", "--inner-passes", "2"]
    args += ["--outer-schedule", "linear", "--support-batch", "4", "--query-batch", "4"]
    assert main(args) == 0
    conf = grmpiqa.read_metadata(out)["extra"]["config"]
    assert conf["variant"] == "released" and conf["inner_passes"] == 2
    assert conf["outer_schedule"] == "linear" and conf["support_batch"] == 4
    assert conf["inner_lr"] == 1e-4 and conf["outer_lr"] == 0.01  # the variant's defaults


@pytest.fixture(scope="module")
def kadid_small(tmp_path_factory: pytest.TempPathFactory) -> str:
    return "kadid:" + str(_make_kadid(tmp_path_factory.mktemp("tasks2") / "k2", refs=2, types=2))


def _authors_released_loop(
    model: grmpiqa.QualityModel, specs: list[str], cfg: PretrainConfig
) -> dict[str, torch.Tensor]:
    """The authors' ``pretrain.py`` loop restated on its own (method.md 6): one inner
    model that is never reset, the first database's tasks sharing one Adam carried over
    from the last one used, a fresh Adam per task of every later database, per support
    batch one step then one on the next query batch, and after each database
    ``theta += outer_lr * mean_i(phi_i - theta)``. Only the seed derivations (which
    stream feeds which choice) are taken from grmpiqa."""
    model.set_trainable(grmpiqa.STAGE1_GROUPS)
    params = model.trainable_parameters()
    plist = list(params.values())
    theta = {n: p.detach().clone() for n, p in params.items()}
    databases = build_tasks(specs, seed=cfg.seed)
    query_tf = stage1_query_transform(cfg.stats)
    opt: torch.optim.Optimizer | None = None

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        assert opt is not None
        opt.zero_grad(set_to_none=True)
        quality_loss(model(x), y).backward()
        opt.step()

    model.train()
    for epoch in range(cfg.epochs):
        for d, db in enumerate(databases):
            order = np.random.default_rng(_seed_seq(cfg.seed, _ORDER, epoch, d))
            snapshots = []
            for t in order.permutation(len(db.tasks)).tolist():
                if d > 0 or opt is None:
                    opt = torch.optim.Adam(plist, lr=cfg.inner_lr)
                task = db.tasks[t]
                support, query = split_task(task, cfg.support_fraction, cfg.seed, epoch, d, t)
                aug = random.Random(_derive_seed(cfg.seed, _AUGMENT, epoch, d, t))
                support_tf = stage1_support_transform(cfg.stats, aug)
                torch.manual_seed(_derive_seed(cfg.seed, _DROPOUT, epoch, d, t))
                y = torch.tensor([it.label for it in task.items], dtype=torch.float32)
                sb, qb = cfg.support_batch, cfg.query_batch
                q_batches = [query[i : i + qb] for i in range(0, len(query), qb)]
                for b, start in enumerate(range(0, len(support), sb)):
                    idx = support[start : start + sb]
                    step(torch.stack([support_tf(task.items[i].load()) for i in idx]), y[idx])
                    q = q_batches[b % len(q_batches)]
                    step(torch.stack([query_tf(task.items[i].load()) for i in q]), y[q])
                snapshots.append({n: p.detach().clone() for n, p in params.items()})
            with torch.no_grad():
                for n in theta:
                    delta = torch.zeros_like(theta[n])
                    for snap in snapshots:
                        delta += snap[n] - theta[n]
                    theta[n] = theta[n] + cfg.outer_lr * (delta / float(len(snapshots)))
    return theta


def test_released_is_the_authors_loop_bit_for_bit(
    kadid: str, kadid_small: str, tmp_path: Path
) -> None:
    """``variant="released"`` with its defaults (the authors' step sizes) saves exactly
    the theta of the restated authors' loop, over two databases and two epochs."""
    specs = [kadid_small, kadid]
    cfg = PretrainConfig(epochs=2, variant="released", support_batch=3, query_batch=2)
    assert (cfg.inner_lr, cfg.outer_lr, cfg.inner_passes) == (1e-4, 0.01, 1)
    out = tmp_path / "released.safetensors"
    pretrain(_model(), specs, cfg, out, progress=False)
    saved, _ = read_checkpoint(out)
    expected = _authors_released_loop(_model(), specs, cfg)
    assert set(saved) == set(expected)
    for n, v in expected.items():
        assert torch.equal(saved[n], v), n
    moved = max(float((expected[n] - v).abs().max()) for n, v in _prompts(_model()).items())
    assert moved > 0  # the comparison is not between two untouched initial states


@pytest.mark.parametrize("variant", ["reptile", "released"])
def test_sigterm_mid_epoch_saves_and_resumes_bit_exact(
    kadid: str, kadid_small: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    """SIGTERM during the second task of epoch 2 (issue 21): the run finishes that task,
    saves a state holding the epoch's finished tasks (no checkpoint: not done) and stops;
    the resumed run ends with exactly the prompts and log of an uninterrupted one."""
    import signal

    from process_utils import send_to_self

    from grmpiqa import metatrain
    from grmpiqa.runs import RunInterrupted

    specs = [kadid_small, kadid]
    cfg = PretrainConfig(epochs=2, variant=variant, inner_passes=1, **FAST)
    ref = tmp_path / "ref.safetensors"
    pretrain(_model(), specs, cfg, ref, progress=False)

    out = tmp_path / "run.safetensors"
    real = metatrain._run_task
    calls = {"n": 0}

    def task(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # epoch 2 (5 tasks per epoch), its second task
            send_to_self(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(metatrain, "_run_task", task)
    with pytest.raises(RunInterrupted, match="SIGTERM.*epoch 2 up to task 2 of 5"):
        pretrain(_model(), specs, cfg, out, progress=False, save_every=3600)
    state = RunFiles(out, "pretrain").load_state()
    assert state.record["epochs_done"] == 1 and state.record["partial"]["done"] == 2
    assert not out.exists()
    monkeypatch.setattr(metatrain, "_run_task", real)
    pretrain(_model(), specs, cfg, out, resume=True, progress=False)
    a, b = read_checkpoint(ref)[0], read_checkpoint(out)[0]
    for n in a:
        assert torch.equal(a[n], b[n]), n

    def lines(p: Path) -> list[dict]:
        rows = [json.loads(x) for x in log_path_for(p).read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    for x, y in zip(lines(ref), lines(out), strict=True):
        assert x == y, {k: (x[k], y.get(k)) for k in x if x[k] != y.get(k)}
