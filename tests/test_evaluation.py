"""The few-shot protocol end to end (method.md 8) on the tiny random backbone."""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import CLIVE_ROOT, TINY_CONFIG, make_image, needs_clive
from PIL import Image

import grmpiqa
from grmpiqa.checkpoint import save_checkpoint
from grmpiqa.cli import main
from grmpiqa.data import load_dataset
from grmpiqa.data.synth import synthesize
from grmpiqa.errors import DatasetError, GrmpiqaError
from grmpiqa.evaluation import ProtocolConfig, ablation_name, run_protocol
from grmpiqa.finetune import FinetuneConfig
from grmpiqa.metrics import METRICS

pytestmark = pytest.mark.usefixtures("one_thread")


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST_FT = FinetuneConfig(max_epochs=2, eval_every=1, cache_augmentations=1)
TINY = {"backbone": "test-tiny", "pretrained": None, "model_config": TINY_CONFIG}


@pytest.fixture(scope="module")
def synth_spec(tmp_path_factory) -> str:
    """4 references x 2 distortion types x 5 levels = 40 synthetic images."""
    root = tmp_path_factory.mktemp("evalsynth")
    for i in range(4):
        make_image(root / "pristine" / f"p{i}.png", size=(72, 64), seed=10 + i)
    synthesize(
        root / "pristine", root / "kadid", types=["gaussian_blur", "white_noise"], progress=False
    )
    return f"kadid:{root / 'kadid'}"


@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory) -> Path:
    """A stage-1-style checkpoint (prompts of a tiny model) to start grmp from."""
    model = grmpiqa.create_model("test-tiny", pretrained=None, config=TINY_CONFIG, seed=3)
    return save_checkpoint(model, tmp_path_factory.mktemp("init") / "stage1.safetensors")


def _cfg(method: str = "grmp", **kw) -> ProtocolConfig:
    ft = kw.pop("finetune", FAST_FT if method in ("grmp", "coop") else None)
    base = dict(method=method, shots=8, splits=2, seed=0, finetune=ft, **TINY)
    base.update(kw)
    return ProtocolConfig(**base)


def _numbers(report: dict) -> list:
    return [
        {k: v for k, v in s.items() if k not in ("seconds", "train_seconds")}
        for s in report["splits"]
    ]


@pytest.fixture(scope="module")
def grmp_run(synth_spec, stage1_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "grmp"
    cfg = _cfg(init=str(stage1_ckpt))
    result = run_protocol(synth_spec, cfg, report_dir=out, progress=False)
    return result, out


def test_report_schema_files_and_figures(grmp_run):
    result, out = grmp_run
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "grmpiqa-report/1"
    cfg = report["config"]
    assert cfg["method"] == "grmp" and cfg["ablation"] is None
    assert cfg["random_backbone"] is True and report["random_backbone"] is True
    assert cfg["selection"] == "final" and report["optimistic"] is False
    assert cfg["shots"] == 8 and cfg["splits"] == 2 and cfg["finetune"]["lam"] == 5.0
    assert cfg["init"]["path"].endswith("stage1.safetensors")
    assert cfg["pretrained"] == {"kind": "random", "seed": 3}  # the --init checkpoint's
    assert len(report["splits"]) == 2
    for k, s in enumerate(report["splits"]):
        assert s["index"] == k and s["n_train"] == 8 and s["seconds"] > 0
        for m in METRICS:
            assert s[m] is None or -1.0 <= s[m] <= 1.0 or m == "rmse"
        assert s["epochs"] == 2
    for m in (*METRICS, "seconds"):
        assert set(report["summary"][m]) == {"median", "mean", "std", "n"}
    assert report["metric_definitions"]["plcc_logistic"].startswith("Pearson correlation after")
    # figures: valid PNGs
    for name in ("scatter.png", "curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        with Image.open(out / name) as im:
            im.verify()
    # predictions.csv: one row per test image per split, predictions match the result
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["split", "path", "mos", "label", "prediction"]
    assert len(rows) == sum(s.n_test for s in result.splits)
    first = [float(r["prediction"]) for r in rows if r["split"] == "0"]
    assert first == pytest.approx(result.splits[0].predictions)
    assert all(0.0 < p < 1.0 for p in first)
    # test and shots are disjoint references (synthetic sets split by content)
    ds = result.dataset
    test_refs = {ds[i].ref for i in result.splits[0].test_indices}
    assert Path(rows[0]["path"]).is_file() and len(test_refs) == 1
    md = (out / "report.md").read_text()
    assert "RANDOM BACKBONE" in md and "| SRCC |" in md and "scatter.png" in md
    assert (out / "splits" / "split_1.json").is_file() and (out / "splits.csv").is_file()
    # the history feeds the curves: one row per evaluation with losses and train SRCC
    h = result.splits[0].history
    assert [r["epoch"] for r in h] == [1, 2] and "loss_q" in h[0] and "train_srcc" in h[0]


def test_same_seed_same_numbers(grmp_run, synth_spec, stage1_ckpt, tmp_path):
    _, out = grmp_run
    again = run_protocol(
        synth_spec, _cfg(init=str(stage1_ckpt)), report_dir=tmp_path, progress=False
    )
    first = json.loads((out / "report.json").read_text())
    second = json.loads((tmp_path / "report.json").read_text())
    assert _numbers(first) == _numbers(second)
    assert first["config"]["fingerprint"] == second["config"]["fingerprint"]
    assert (out / "predictions.csv").read_text() == (tmp_path / "predictions.csv").read_text()
    assert again.splits[1].predictions == pytest.approx(
        json.loads((out / "splits" / "split_1.json").read_text())["result"]["predictions"], abs=0
    )


def test_resume_skips_finished_splits_and_checks_config(
    grmp_run, synth_spec, stage1_ckpt, monkeypatch
):
    result, out = grmp_run

    def no_training(*a, **k):
        raise AssertionError("a finished split was trained again")

    monkeypatch.setattr(sys.modules["grmpiqa.finetune"], "finetune", no_training)
    resumed = run_protocol(
        synth_spec, _cfg(init=str(stage1_ckpt)), report_dir=out, resume=True, progress=False
    )
    assert [s.metrics for s in resumed.splits] == [s.metrics for s in result.splits]
    with pytest.raises(GrmpiqaError, match="different configuration"):
        run_protocol(
            synth_spec,
            _cfg(init=str(stage1_ckpt), seed=0, logistic="5"),
            report_dir=out,
            resume=True,
            progress=False,
        )


@pytest.mark.parametrize(
    ("method", "extra", "ablation"),
    [
        ("clipiqa", {}, None),
        ("linear-probe", {}, None),
        ("coop", {}, None),
        ("grmp", {}, "no meta init"),
        ("grmp", {"lam0": True}, "no meta init, no QGR"),
    ],
)
def test_each_method_and_ablation_runs(synth_spec, method, extra, ablation):
    kw = {"splits": 1}
    if extra.get("lam0"):
        kw["finetune"] = replace(FAST_FT, lam=0.0)
    cfg = _cfg(method, **kw)
    assert ablation_name(cfg) == ablation
    r = run_protocol(synth_spec, cfg, progress=False)
    assert r.config["method"] == method and r.config["ablation"] == ablation
    s = r.splits[0]
    assert len(s.predictions) == s.n_test > 0
    assert all(math.isfinite(p) for p in s.predictions)
    assert math.isfinite(s.metrics["srcc"])
    if method == "coop":
        assert r.config["finetune"]["groups"] == ["text_context"]
        assert r.config["finetune"]["distill"] is False and r.config["finetune"]["lam"] == 0.0
        assert r.config["model_config"]["visual_prompts"] is False
    if method == "clipiqa":
        assert r.config["model_config"]["hand_prompts"] == list(grmpiqa.CLIPIQA_PROMPTS)
        assert s.history == [] and r.config["finetune"] is None
    if method == "linear-probe":
        assert s.info["alpha"] in s.info["alphas"] and len(s.info["cv_mse"]) == 13


def test_ablation_no_qgr_with_init(stage1_ckpt):
    cfg = _cfg(init=str(stage1_ckpt), finetune=replace(FAST_FT, lam=0.0))
    assert ablation_name(cfg) == "no QGR"


def test_best_on_test_is_labelled_optimistic(synth_spec, tmp_path):
    cfg = _cfg("coop", splits=1, selection="best-on-test", finetune=replace(FAST_FT, max_epochs=3))
    r = run_protocol(synth_spec, cfg, report_dir=tmp_path, progress=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["optimistic"] is True and report["selection"] == "best-on-test"
    assert report["config"]["finetune"]["monitor"] == "test_srcc"
    assert "OPTIMISTIC" in (tmp_path / "report.md").read_text()
    s = r.splits[0]
    assert s.info["best_epoch"] in (1, 2, 3)
    tested = [h["test_srcc"] for h in s.history]
    assert len(tested) == 3
    # the kept predictions are those of the best test SRCC seen
    assert s.metrics["srcc"] == pytest.approx(max(t for t in tested if math.isfinite(t)))


def test_constant_predictions_give_nan_not_crash(synth_spec, tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setattr(
        "grmpiqa.baselines.RidgeProbe.predict", lambda self, f: np.full(len(f), 0.5)
    )
    r = run_protocol(
        synth_spec, _cfg("linear-probe", splits=1), report_dir=tmp_path, progress=False
    )
    assert all(math.isnan(v) for v in r.splits[0].metrics.values())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["splits"][0]["srcc"] is None and report["summary"]["srcc"]["n"] == 0
    assert any("constant" in w for w in report["warnings"])
    assert "NaN" in (tmp_path / "report.md").read_text()


def test_nearly_constant_predictions_report_raw_plcc_not_a_step(synth_spec, tmp_path, monkeypatch):
    """Two clusters 1e-4 apart: a 4-parameter logistic fits a step through them. The
    report falls back to the raw PLCC, says so, and draws a linear fit instead."""
    import numpy as np

    def predict(self, f):
        rng = np.random.default_rng(0)
        return 0.5 + 1e-4 * (rng.random(len(f)) > 0.5) + 1e-8 * rng.random(len(f))

    monkeypatch.setattr("grmpiqa.baselines.RidgeProbe.predict", predict)
    r = run_protocol(
        synth_spec, _cfg("linear-probe", splits=1), report_dir=tmp_path, progress=False
    )
    m = r.splits[0].metrics
    assert m["plcc_logistic"] == pytest.approx(m["plcc"], abs=1e-9)
    report = json.loads((tmp_path / "report.json").read_text())
    assert any("degenerate" in w and "raw PLCC" in w for w in report["warnings"])
    assert "degenerate" in (tmp_path / "report.md").read_text()


def test_bad_inputs_are_one_line_errors(synth_spec):
    with pytest.raises(DatasetError, match="shots requested but the pool"):
        run_protocol(synth_spec, _cfg("clipiqa", shots=500), progress=False)
    with pytest.raises(GrmpiqaError, match="unknown method"):
        ProtocolConfig(method="magic")
    with pytest.raises(GrmpiqaError, match="best-on-test needs a trained method"):
        ProtocolConfig(method="clipiqa", selection="best-on-test")
    with pytest.raises(GrmpiqaError, match="watches the test set"):
        ProtocolConfig(method="coop", finetune=replace(FAST_FT, monitor="test_srcc"))
    with pytest.raises(GrmpiqaError, match="--init"):
        ProtocolConfig(method="coop", init="x.safetensors")


def test_cli_evaluate_end_to_end(synth_spec, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "evaluate",
            "--data",
            synth_spec,
            "--method",
            "grmp",
            "--splits",
            "2",
            "--shots",
            "8",
            "--max-epochs",
            "2",
            "--eval-every",
            "1",
            "--cache-augmentations",
            "1",
            "--lambda",
            "0",
            "--vpt-tokens",
            "4",
            "--backbone",
            "test-tiny",
            "--pretrained",
            "random",
            "--report",
            str(out),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0
    assert "grmp on kadid:" in captured.out and "srcc" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["ablation"] == "no meta init, no QGR"
    assert report["config"]["model_config"]["vpt_tokens"] == 4
    assert report["config"]["finetune"]["max_epochs"] == 2
    assert len(report["splits"]) == 2
    assert "RANDOM" in captured.err


def test_cli_errors_are_one_line(synth_spec, tmp_path, capsys):
    rc = main(
        [
            "evaluate",
            "--data",
            synth_spec,
            "--method",
            "clipiqa",
            "--shots",
            "999",
            "--backbone",
            "test-tiny",
            "--pretrained",
            "random",
            "--report",
            str(tmp_path),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("grmpiqa: error: ") and "999 shots" in err[-1]
    assert "Traceback" not in "\n".join(err)
    rc = main(
        [
            "evaluate",
            "--data",
            synth_spec,
            "--init",
            str(tmp_path / "nope.safetensors"),
            "--report",
            str(tmp_path),
        ]
    )
    assert rc == 1 and "not found" in capsys.readouterr().err


@needs_clive
def test_clive_two_splits(tmp_path):
    spec = f"clive:{CLIVE_ROOT}"
    ds = load_dataset(spec)
    cfg = _cfg("grmp", shots=10, finetune=replace(FAST_FT, max_epochs=1))
    r = run_protocol(ds, cfg, report_dir=tmp_path, progress=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["dataset"] == ds.spec and report["config"]["n_images"] == len(ds)
    assert [s["n_test"] for s in report["splits"]] == [round(0.2 * len(ds))] * 2
    assert all(math.isfinite(s.metrics["srcc"]) for s in r.splits)
    assert (tmp_path / "scatter.png").read_bytes()[:8] == PNG_MAGIC


# -- resume mid-protocol (issue 18 EK1) and pool-shared frozen features (issue 21) ---------


def _ek1_argv(spec: str, out: Path, *extra: str) -> list[str]:
    return [
        "evaluate", "--data", spec, "--splits", "3", "--shots", "8", "--max-epochs", "16",
        "--eval-every", "4", "--cache-augmentations", "2", "--lr", "0.05", "--vpt-tokens", "4",
        "--backbone", "test-tiny", "--pretrained", "random", "--report", str(out),
        "--no-progress", *extra,
    ]  # fmt: skip


def _figures(out: Path) -> tuple[list, str]:
    report = json.loads((out / "report.json").read_text())
    splits = [{k: v for k, v in s.items() if k != "checkpoint"} for s in _numbers(report)]
    return splits, (out / "predictions.csv").read_text()


@pytest.fixture(scope="module")
def ek1_reference(synth_spec, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ek1") / "straight"
    assert main(_ek1_argv(synth_spec, out)) == 0
    return out


def test_evaluate_killed_mid_protocol_resumes_without_keep_checkpoints(
    synth_spec, ek1_reference, tmp_path
):
    """Probe EK1: `grmpiqa evaluate` killed (SIGKILL) inside split 1 of 3, without
    --keep-checkpoints, then --resume: it used to fail ("resume needs the output checkpoint
    path"); now split 0 is reused, split 1 continues from its state, and the report's
    figures and predictions are those of an uninterrupted run."""
    from process_utils import run_and_signal

    out = tmp_path / "killed"
    state1 = out / "splits" / "split_1.state.safetensors"

    def inside_split_1() -> bool:
        return (out / "splits" / "split_0.json").is_file() and state1.is_file()

    proc = run_and_signal(_ek1_argv(synth_spec, out, "--save-every", "0"), inside_split_1)
    assert proc.returncode == -9
    assert not (out / "splits" / "split_1.json").exists() and not (out / "report.json").exists()
    assert not (out / "splits" / "split_0.state.safetensors").exists()  # done: removed
    assert main([*_ek1_argv(synth_spec, out), "--resume"]) == 0
    assert _figures(out) == _figures(ek1_reference)
    assert not list((out / "splits").glob("*.state.safetensors"))  # nothing left over
    assert not list((out / "splits").glob("*.safetensors"))  # no checkpoints asked for


def test_evaluate_sigterm_with_keep_checkpoints_resumes_to_the_same_report(
    synth_spec, ek1_reference, tmp_path, monkeypatch, capsys
):
    """SIGTERM inside split 2 with --keep-checkpoints: exit 143 after the split's state is
    written; --resume gives the uninterrupted report, and every split's model is kept."""
    import signal

    from process_utils import send_to_self

    ft = sys.modules["grmpiqa.finetune"]
    real = ft.CachedShots.batch
    seen = {"n": 0}

    def batch(self, indices, epoch):
        seen["n"] += 1
        if seen["n"] == 2 * 16 + 10:  # split 2, epoch 10
            send_to_self(signal.SIGTERM)
        return real(self, indices, epoch)

    monkeypatch.setattr(ft.CachedShots, "batch", batch)
    out = tmp_path / "stopped"
    argv = _ek1_argv(synth_spec, out, "--keep-checkpoints")
    assert main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert (out / "splits" / "split_2.state.safetensors").is_file()
    assert not (out / "splits" / "split_2.safetensors").exists()
    monkeypatch.setattr(ft.CachedShots, "batch", real)
    assert main([*argv, "--resume"]) == 0
    assert _figures(out) == _figures(ek1_reference)
    for k in range(3):
        assert (out / "splits" / f"split_{k}.safetensors").is_file()


def test_pool_scorer_gives_the_full_forward_pass_numbers(synth_spec):
    """The test images' frozen part computed once (FrozenPool, each image alone) and the
    trained blocks run on it: the predictions of the full forward pass, to rounding."""
    from grmpiqa.evaluation import _PoolScorer, _TestScorer
    from grmpiqa.feature_cache import FrozenPool, frozen_image_blocks

    data = load_dataset(synth_spec).subset(range(12))
    config = replace(TINY_CONFIG, finetune_blocks=2)
    model = grmpiqa.create_model("test-tiny", pretrained=None, config=config)
    model.set_trainable(FinetuneConfig().groups)
    start = frozen_image_blocks(model)
    assert start is not None and start > 0
    pool = FrozenPool()
    a = _PoolScorer(pool, data, start, 5, "fp32")(model)
    b = _TestScorer(model, data, 5, "fp32")(model)
    assert a == pytest.approx(b, rel=0, abs=1e-6)
    assert pool.nbytes > 0
    kept = pool.nbytes
    again = _PoolScorer(pool, data.subset(range(3, 9)), start, 5, "fp32")(model)
    assert pool.nbytes == kept  # the frozen part is reused, not computed again
    assert again == pytest.approx(a[3:9], rel=0, abs=1e-6)
