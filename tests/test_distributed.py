"""Training and evaluation over 2 gloo processes equal one process (grmpiqa.distributed).

The multi-process checks share one ``torch.multiprocessing`` spawn of 2 ranks (CPU,
gloo on a free 127.0.0.1 port, 1 thread each) that writes what it computed under a
temporary folder; the parent computes the same in one process and compares. The CLI
check launches ``python -m torch.distributed.run --nproc_per_node 2 -m grmpiqa finetune``.
"""

from __future__ import annotations

import csv
import doctest
import json
import os
import socket
import subprocess
import sys
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close_scaled, make_image
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file

import grmpiqa
from grmpiqa import distributed
from grmpiqa.checkpoint import read_checkpoint
from grmpiqa.cli import main
from grmpiqa.data import load_dataset
from grmpiqa.data.synth import synthesize
from grmpiqa.distributed import Context, DataParallel, replicated_dropout
from grmpiqa.errors import GrmpiqaError, RunError, TrainingError
from grmpiqa.evaluation import ProtocolConfig, run_protocol
from grmpiqa.feature_cache import build_feature_cache, frozen_image_blocks
from grmpiqa.finetune import (
    FinetuneConfig,
    PixelShots,
    Stage2Step,
    _load_resized,
    build_teacher,
    finetune,
)
from grmpiqa.gradient import quality_aware_gradient, set_quality_aware_grads
from grmpiqa.metatrain import PretrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_CONFIG = grmpiqa.ModelConfig(vpt_tokens=4, finetune_blocks=2)
FT = FinetuneConfig(max_epochs=4, eval_every=2, batch_size=3, cache_augmentations=2)
PRE = PretrainConfig(epochs=2, support_batch=4, query_batch=4, images_per_task=6)
EVAL_FT = FinetuneConfig(max_epochs=2, eval_every=1, cache_augmentations=1)
LAM = 5.0


def _model() -> grmpiqa.QualityModel:
    return grmpiqa.create_model("test-tiny", pretrained=None, config=MODEL_CONFIG)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- data ----------------------------------------------------------------------------------


def _blur_csv(root: Path, n: int = 7) -> Path:
    """``n`` images whose MOS falls with their blur."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["path,mos"]
    for i in range(n):
        arr = rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)
        Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.5 * i)).save(root / f"im{i}.png")
        rows.append(f"im{i}.png,{100 - 9 * i}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def _synth(root: Path) -> str:
    """4 references x 3 distortion types x 5 levels (3 stage-1 tasks: an odd number)."""
    for i in range(4):
        make_image(root / "pristine" / f"p{i}.png", size=(72, 64), seed=10 + i)
    types = ["gaussian_blur", "white_noise", "darken"]
    synthesize(root / "pristine", root / "kadid", types=types, progress=False)
    return f"kadid:{root / 'kadid'}"


# -- what both sides compute -----------------------------------------------------------------


def _stage2_gradients(
    csv_path: Path, ctx: Context, parts: list[range] | None = None
) -> dict[str, torch.Tensor]:
    """One released-path step (prompt dropout in every layer) on all 7 shots: global g_q,
    g_s, the rule's output, and (several ranks) the 'project then average' control.

    ``parts`` (one process): compute the batch as the data-parallel ranks do, part by
    part with the full batch's dropout masks, and sum the parts' gradients weighted by
    their share of the batch.
    """
    shots = load_dataset(f"csv:{csv_path}")
    model = _model()
    cfg = replace(FT, cache=False, lam=LAM)
    teacher = build_teacher(model, cfg.scene_prompts)
    model.set_trainable(cfg.groups)
    labels = torch.tensor(shots.labels, dtype=torch.float32)
    source = PixelShots(model, _load_resized(model, shots), labels, cfg, teacher)
    step = Stage2Step(model, cfg)
    if ctx.is_distributed:
        step.parallel = DataParallel(ctx, model)
    model.train()
    out: dict[str, torch.Tensor] = {}
    if parts is not None:
        sums: list[Any] = []
        for rows in parts:
            torch.manual_seed(1234)
            with replicated_dropout(model, len(shots), rows):
                lq, ls, _ = step.losses(source.batch(list(rows), 3))
            w = len(rows) / len(shots)
            grads = [g * w if g is not None else None for gl in step.gradients(lq, ls) for g in gl]
            sums = (
                grads
                if not sums
                else [a + b if a is not None else None for a, b in zip(sums, grads, strict=True)]
            )
        gq, gs = sums[: len(step.params)], sums[len(step.params) :]
        stats = set_quality_aware_grads(step.params, gq, gs, LAM)
        return _collect(out, step, gq, gs, stats.projected)
    torch.manual_seed(1234)
    with step.share(list(range(len(shots)))) as part:
        lq, ls, _ = step.losses(source.batch(part, 3))
    gq, gs = step.gradients(lq, ls)
    assert gs is not None
    if step.parallel is not None:
        assert step.parallel.weight == len(part) / len(shots)
        w = step.parallel.weight
        local = [
            quality_aware_gradient(q, s, LAM) if q is not None else None
            for q, s in zip(gq, gs, strict=True)
        ]
        gq, gs, lq_v, ls_v = step.parallel.all_reduce(gq, gs, lq, ls)
        assert gs is not None
        for n, g in zip(step.names, local, strict=True):
            if g is not None:
                out[f"control/{n}"] = ctx.all_reduce_(g.detach() * w)
        out["loss"] = torch.tensor([lq_v, ls_v if ls_v is not None else float("nan")])
    else:
        assert ls is not None
        out["loss"] = torch.tensor([float(lq.detach()), float(ls.detach())])
    stats = set_quality_aware_grads(step.params, gq, gs, LAM)
    return _collect(out, step, gq, gs, stats.projected)


def _collect(
    out: dict[str, torch.Tensor], step: Stage2Step, gq: Any, gs: Any, projected: int
) -> dict[str, torch.Tensor]:
    out["projected"] = torch.tensor([projected])
    for n, p, q, s in zip(step.names, step.params, gq, gs, strict=True):
        if q is not None:
            out[f"gq/{n}"] = q.detach().clone()
            assert p.grad is not None
            out[f"rule/{n}"] = p.grad.detach().clone()
        if s is not None:
            out[f"gs/{n}"] = s.detach().clone()
    return out


def _cache(csv_path: Path, ctx: Context) -> dict[str, torch.Tensor]:
    """The frozen-feature cache of the 7 shots (21 views: chunks of 16 and 5)."""
    shots = load_dataset(f"csv:{csv_path}")
    model = _model()
    teacher = build_teacher(model, FT.scene_prompts)
    model.set_trainable(FT.groups)
    start = frozen_image_blocks(model)
    assert start is not None
    cache = build_feature_cache(
        model,
        _load_resized(model, shots),
        start_block=start,
        augmentations=2,
        teacher=teacher,
        context=ctx,
    )
    assert cache.teacher_logits is not None
    return {"hidden": cache.hidden, "eval": cache.eval_hidden, "teacher": cache.teacher_logits}


def _finetune(csv_path: Path, out: Path, **kw: Any) -> None:
    finetune(_model(), load_dataset(f"csv:{csv_path}"), replace(FT, **kw), out=out, progress=False)


def _finetune_resumed(csv_path: Path, out: Path) -> None:
    """2 epochs, then a resumed run to 4 (every rank reads the same state file)."""
    _finetune(csv_path, out, max_epochs=2)
    shots = load_dataset(f"csv:{csv_path}")
    finetune(_model(), shots, FT, out=out, resume=True, progress=False)


def _pretrain(spec: str, out: Path, resumed: bool = False, **kw: Any) -> None:
    model = grmpiqa.create_model(
        "test-tiny", pretrained=None, config=grmpiqa.ModelConfig(vpt_tokens=4)
    )
    cfg = replace(PRE, **kw)
    if resumed:
        pretrain(model, [spec], replace(cfg, epochs=1), out, progress=False)
        model = grmpiqa.create_model(
            "test-tiny", pretrained=None, config=grmpiqa.ModelConfig(vpt_tokens=4)
        )
    pretrain(model, [spec], cfg, out, resume=resumed, progress=False)


def _evaluate(spec: str, out: Path) -> None:
    cfg = ProtocolConfig(
        method="grmp",
        shots=8,
        splits=3,
        finetune=EVAL_FT,
        backbone="test-tiny",
        pretrained=None,
        model_config=grmpiqa.ModelConfig(vpt_tokens=4),
    )
    run_protocol(spec, cfg, report_dir=out, progress=False)


def _errors(ctx: Context) -> dict[str, str]:
    """A task failing on rank 1 and a run refused on rank 0 stop every rank with their error."""
    seen: dict[str, str] = {}
    like = {"w": torch.zeros(2)}

    def task(t: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if ctx.rank == 1:
            raise TrainingError(f"task {t} diverged on rank 1")
        return {"w": torch.ones(2)}, {"task": t}

    try:
        ctx.share_tasks([0, 1, 2], like, task)
    except TrainingError as err:
        seen["task"] = str(err)

    def refuse() -> bool:
        raise RunError("out.safetensors: already exists (rank 0 refused)")

    try:
        ctx.from_main(refuse)
    except RunError as err:
        seen["main"] = str(err)
    return seen


# -- the 2-rank worker -------------------------------------------------------------------------


def _worker(rank: int, port: int, root: str) -> None:
    base = Path(root)
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=2,
            timeout=timedelta(seconds=300),
        )
        ctx = distributed.current()
        assert (ctx.rank, ctx.world_size) == (rank, 2)
        csv_path, spec = base / "shots" / "labels.csv", (base / "spec.txt").read_text()
        grads = _stage2_gradients(csv_path, ctx)
        if rank == 0:
            save_file(grads, str(base / "grads_2.safetensors"))
        cache = _cache(csv_path, ctx)
        if rank == 0:
            save_file(cache, str(base / "cache_2.safetensors"))
        _finetune(csv_path, base / "ft_2.safetensors")
        _finetune(csv_path, base / "ft_pixels_2.safetensors", cache=False)
        _finetune_resumed(csv_path, base / "ft_resumed_2.safetensors")
        _pretrain(spec, base / "reptile_2.safetensors", resumed=True)
        _pretrain(spec, base / "released_2.safetensors", variant="released", epochs=1)
        _evaluate(spec, base / "report_2")
        (base / f"errors_{rank}.json").write_text(json.dumps(_errors(ctx)))
        dist.barrier()
    except BaseException:
        (base / f"failed_{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the 2-rank worker once; its outputs lie in the returned folder."""
    base = tmp_path_factory.mktemp("dist")
    _blur_csv(base / "shots")
    (base / "spec.txt").write_text(_synth(base / "synth"))
    mp.spawn(_worker, args=(_free_port(), str(base)), nprocs=2, join=True)
    return base


# -- in-process checks -------------------------------------------------------------------------


def test_parts_cover_the_batch_once_and_balance() -> None:
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [Context(rank=r, world_size=world).part(n) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [t for t in range(7) if Context(rank=1, world_size=3).owns(t)] == [1, 4]


def test_one_process_context_and_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = distributed.current()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    assert ctx.from_main(lambda: 3) == 3 and ctx.gather(4) == [4]
    assert ctx.describe() == {"world_size": 1}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") == (Context(), torch.device("cpu"))
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "42")
    assert distributed.timeout_from_env() == timedelta(seconds=42)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(GrmpiqaError, match="GRMPIQA_DIST_TIMEOUT"):
        distributed.timeout_from_env()


def test_docstring_examples() -> None:
    assert doctest.testmod(distributed).failed == 0


def test_replicated_dropout_gives_each_sample_its_full_batch_mask() -> None:
    """The projected visual prompts of two parts of a batch under replicated_dropout are
    the batch's, bit for bit, and the random stream ends where one process leaves it;
    plain dropout on a part draws other masks (the control)."""
    model = _model()
    model.train()
    assert model.visual is not None
    torch.manual_seed(7)
    whole = [model.visual.prompts(b, 5) for b in (0, 1, 2)]
    state_after = torch.get_rng_state()
    for rows in (range(0, 3), range(3, 5)):
        torch.manual_seed(7)
        with replicated_dropout(model, 5, rows):
            part = [model.visual.prompts(b, len(rows)) for b in (0, 1, 2)]
        assert torch.equal(torch.get_rng_state(), state_after)
        for p, w in zip(part, whole, strict=True):
            assert torch.equal(p, w[rows.start : rows.stop])
    torch.manual_seed(7)
    plain = model.visual.prompts(0, 2)
    assert not torch.equal(plain, whole[0][3:5])
    model.eval()  # no dropout in eval mode: the input comes back unchanged
    with replicated_dropout(model, 5, range(0, 2)):
        assert torch.equal(model.visual.prompts(0, 2), model.visual.prompts(0, 5)[:2])


# -- 2 gloo processes against one ---------------------------------------------------------------


def _family_error(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], family: str
) -> float:
    """max |got - want| over a family's tensors, relative to the family's largest magnitude."""
    keys = sorted(k for k in want if k.startswith(family + "/"))
    assert keys and keys == sorted(k for k in got if k.startswith(family + "/")), family
    scale = max(float(want[k].abs().max()) for k in keys)
    return max(float((got[k] - want[k]).abs().max()) for k in keys) / scale


def test_stage2_gradients_equal_one_process_and_project_then_average_does_not(
    two_ranks: Path,
) -> None:
    """2 gloo ranks, 7 shots cut 4 + 3, g_q and g_s summed before the rule.

    Against one process computing the same two parts (masks, weights 4/7 and 3/7): the
    same values to 1e-6. Against one process on the whole batch of 7: the values of
    fp32 arithmetic, whose rows already move by ~1e-7 when a kernel runs 3 rows instead
    of 7; g_q to 1e-5 of its largest entry (measured 2e-6, in the text context, where
    the gradients from t_hq and t_lq nearly cancel), g_s to 1e-4 (measured 3e-5: at the
    start the student's scene logits nearly equal the teacher's, so g_s is 500 times
    smaller than g_q and a difference of nearly equal softmaxes), the rule's output to
    1e-4 (it divides by ||g_s||^2). The control, projecting each rank's gradients and
    then averaging, misses by far more.
    """
    csv_path = two_ranks / "shots" / "labels.csv"
    got = load_file(str(two_ranks / "grads_2.safetensors"))
    parts = _stage2_gradients(csv_path, Context(), parts=[range(0, 4), range(4, 7)])
    whole = _stage2_gradients(csv_path, Context())
    assert int(whole["projected"]) > 0  # the rule changed some tensor: the control can differ
    assert int(got["projected"]) == int(parts["projected"]) == int(whole["projected"])
    assert_close_scaled(got["loss"], whole["loss"], rel=1e-6, what="losses")
    for family in ("gq", "gs", "rule"):
        assert _family_error(got, parts, family) <= 1e-6, family
    assert _family_error(got, whole, "gq") <= 1e-5
    assert _family_error(got, whole, "gs") <= 1e-4
    rule_error = _family_error(got, whole, "rule")
    assert rule_error <= 1e-4
    control = {
        "rule/" + k[len("control/") :]: v for k, v in got.items() if k.startswith("control/")
    }
    assert _family_error(control, whole, "rule") > 100 * max(rule_error, 1e-6)


def test_feature_cache_built_in_shares_has_the_one_process_bits(two_ranks: Path) -> None:
    got = load_file(str(two_ranks / "cache_2.safetensors"))
    want = _cache(two_ranks / "shots" / "labels.csv", Context())
    for k in ("hidden", "eval", "teacher"):
        assert torch.equal(got[k], want[k]), k


def _assert_same_checkpoint(got: Path, want: Path, rel: float) -> dict[str, Any]:
    """Same tensors to ``rel`` of the largest magnitude among them (the rounding of the
    gradients a run sums moves every weight by about the same absolute amount)."""
    t_got, m_got = read_checkpoint(got)
    t_want, m_want = read_checkpoint(want)
    assert sorted(t_got) == sorted(t_want)
    scale = max(float(v.abs().max()) for v in t_want.values())
    for k in t_want:
        assert_close_scaled(t_got[k], t_want[k], rel=rel, what=k, scale=scale)
    return {"got": m_got["extra"], "want": m_want["extra"], "scale": scale}


def _approx_record(a: object, b: object, rel: float = 1e-5) -> bool:
    """Equal JSON records, floats compared to ``rel`` of their magnitude."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_approx_record(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        pairs = zip(a, b, strict=True)
        return len(a) == len(b) and all(_approx_record(x, y, rel) for x, y in pairs)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)
    return a == b


def _moved(trained: Path, init: dict[str, torch.Tensor]) -> float:
    """How far training moved the checkpoint's tensors from ``init`` (largest change)."""
    tensors, _ = read_checkpoint(trained)
    return max(float((tensors[k] - init[k]).abs().max()) for k in tensors if k in init)


def test_finetune_two_ranks_writes_the_one_process_checkpoint(two_ranks: Path) -> None:
    csv_path = two_ranks / "shots" / "labels.csv"
    single = two_ranks / "ft_1.safetensors"
    _finetune(csv_path, single)
    init = _model().state_dict()
    for name in ("ft_2.safetensors", "ft_resumed_2.safetensors"):
        extra = _assert_same_checkpoint(two_ranks / name, single, rel=1e-6)
        assert _moved(single, init) > 1e-4 * extra["scale"]  # training moved the weights
        assert extra["got"]["world_size"] == 2 and extra["want"]["world_size"] == 1
        assert "contiguous parts" in extra["got"]["distributed"]["sharding"]
        same = {k: v for k, v in extra["got"].items() if k not in ("world_size", "distributed")}
        want = {k: v for k, v in extra["want"].items() if k != "world_size"}
        # the MOS map is fitted on the shots' predictions, and the last evaluation's
        # figures come from them: equal up to float rounding
        assert _approx_record(same.pop("scale", None), want.pop("scale", None))
        assert _approx_record(same.pop("figures", None), want.pop("figures", None))
        assert same == want
    pixels = two_ranks / "ft_pixels_1.safetensors"  # the released path: dropout in every layer
    _finetune(csv_path, pixels, cache=False)
    _assert_same_checkpoint(two_ranks / "ft_pixels_2.safetensors", pixels, rel=1e-6)
    rows = [json.loads(line) for line in (two_ranks / "ft_2.log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (two_ranks / "ft_1.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref] == [2, 4]
    for r, e in zip(rows, ref, strict=True):
        for key in ("loss_q", "loss_s", "train_srcc", "lr"):
            assert r[key] == pytest.approx(e[key], rel=1e-5, abs=1e-7), key


def test_pretrain_two_ranks_equals_one_process(two_ranks: Path) -> None:
    spec = (two_ranks / "spec.txt").read_text()
    _pretrain(spec, two_ranks / "reptile_1.safetensors")
    _pretrain(spec, two_ranks / "released_1.safetensors", variant="released", epochs=1)
    for variant in ("reptile", "released"):
        extra = _assert_same_checkpoint(
            two_ranks / f"{variant}_2.safetensors", two_ranks / f"{variant}_1.safetensors", 1e-6
        )
        assert extra["got"]["world_size"] == 2 and extra["want"]["world_size"] == 1
        assert extra["got"]["epochs_done"] == extra["want"]["epochs_done"]
    log = [json.loads(x) for x in (two_ranks / "reptile_2.log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (two_ranks / "reptile_1.log.jsonl").read_text().splitlines()]
    notes = [r for r in log if r.get("event") == "distributed"]
    assert notes and notes[0]["world_size"] == 2 and "task t on rank" in notes[0]["sharding"]
    tasks = [r for r in log if "task" in r]
    ref_tasks = [r for r in ref if "task" in r]
    strip = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in tasks] == [
        {k: v for k, v in r.items() if k not in strip} for r in ref_tasks
    ]


def _timeless(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if "seconds" not in k and k != "device"}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def test_evaluate_two_ranks_writes_the_one_process_report(two_ranks: Path) -> None:
    spec = (two_ranks / "spec.txt").read_text()
    _evaluate(spec, two_ranks / "report_1")
    got = json.loads((two_ranks / "report_2" / "report.json").read_text())
    want = json.loads((two_ranks / "report_1" / "report.json").read_text())
    assert len(want["splits"]) == 3
    assert _timeless(got) == _timeless(want)
    for name in ("predictions.csv", "splits.csv"):
        assert (two_ranks / "report_2" / name).read_bytes() == (
            two_ranks / "report_1" / name
        ).read_bytes()
    for k in range(3):
        g = json.loads((two_ranks / "report_2" / "splits" / f"split_{k}.json").read_text())
        w = json.loads((two_ranks / "report_1" / "splits" / f"split_{k}.json").read_text())
        assert _timeless(g) == _timeless(w)


def test_a_failing_rank_stops_every_rank_with_its_error(two_ranks: Path) -> None:
    for rank in (0, 1):
        seen = json.loads((two_ranks / f"errors_{rank}.json").read_text())
        assert seen["task"] == "task 1 diverged on rank 1"
        assert seen["main"] == "out.safetensors: already exists (rank 0 refused)"


# -- the command line under torchrun ---------------------------------------------------------------


def test_torchrun_finetune_writes_the_single_process_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = _blur_csv(tmp_path / "shots", n=9)
    init = tmp_path / "meta.safetensors"
    grmpiqa.save_checkpoint(_model(), init)
    args = [
        "finetune",
        "--data",
        f"csv:{csv_path}",
        "--shots",
        "7",
        "--init",
        str(init),
        "--max-epochs",
        "3",
        "--eval-every",
        "3",
        "--cache-augmentations",
        "2",
        "--backbone",
        "test-tiny",
        "--precision",
        "fp32",  # equality to float rounding is checked in fp32
        "--no-progress",
    ]
    single = tmp_path / "one.safetensors"
    assert main([*args, "--out", str(single)]) == 0
    capsys.readouterr()
    two = tmp_path / "two.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "grmpiqa",
        *args,
        "--out",
        str(two),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fine-tuning on 2 ranks (gloo)" in proc.stderr
    assert proc.stderr.count("grmpiqa: wrote") == 1  # rank 0 alone reports
    extra = _assert_same_checkpoint(two, single, rel=1e-6)
    assert extra["got"]["world_size"] == 2 and extra["want"]["world_size"] == 1
    for e in (extra["got"], extra["want"]):
        e.pop("world_size"), e.pop("distributed", None)
        assert e["split"].pop("file") in ("one.splits.csv", "two.splits.csv")
    assert _approx_record(extra["got"].pop("scale"), extra["want"].pop("scale"))
    assert _approx_record(extra["got"].pop("figures"), extra["want"].pop("figures"))
    assert _approx_record(extra["got"].pop("held_out", None), extra["want"].pop("held_out", None))
    assert extra["got"] == extra["want"]
    assert (
        two.with_suffix(".splits.csv").read_bytes()
        == single.with_suffix(".splits.csv").read_bytes()
    )
    with open(two.with_suffix(".splits.csv"), newline="") as fh:
        assert sum(row[-1] == "train" for row in csv.reader(fh)) == 7
