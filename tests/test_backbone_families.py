"""The whole method on each backbone family's tiny twin (issue 22): both stages, scoring,
batch invariance, checkpoint round trip, the stage-2 cache against the uncached path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close_scaled, random_pil_images
from PIL import Image, ImageFilter

import grmpiqa
from grmpiqa.cli import main
from grmpiqa.errors import CheckpointError
from grmpiqa.feature_cache import bank_view, build_feature_cache, frozen_image_blocks
from grmpiqa.finetune import FinetuneConfig, ShotBatch, Stage2Step, build_teacher
from grmpiqa.losses import quality_loss
from grmpiqa.prompts import l2_normalize

pytestmark = pytest.mark.usefixtures("one_thread")

#: one tiny twin per family, and the other architectures of the big families
TWINS = [
    "tiny-CoCa",
    "tiny-SigLIP2",
    "tiny-MobileCLIP-B",
    "tiny-ViTamin",
    "tiny-relpos",
    "tiny-EVA02",
    "tiny-PE-Core",
    "tiny-convnext",
    "tiny-MobileCLIP2-S0",
    "tiny-swin",
    "tiny-RN50",
]
CONFIG = grmpiqa.ModelConfig(vpt_tokens=3, vpt_dropout=0.0, finetune_blocks=2)


def build(name: str, **kw) -> grmpiqa.QualityModel:
    return grmpiqa.create_model(name, pretrained=None, config=CONFIG, **kw)


@pytest.fixture(scope="module")
def blur_dir(tmp_path_factory) -> Path:
    """8 images whose MOS falls with their blur, and their labels."""
    d = tmp_path_factory.mktemp("fam_blur")
    rng = np.random.default_rng(0)
    rows = ["path,mos"]
    for i in range(8):
        arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.5 * i)).save(d / f"im{i}.png")
        rows.append(f"im{i}.png,{100 - 9 * i}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d


@pytest.mark.parametrize("name", TWINS)
def test_stage1_trains_the_prompts(name):
    """Stage 1 (method.md 6): only the prompts train; an Adam step moves the score."""
    model = build(name)
    params = model.set_trainable(grmpiqa.STAGE1_GROUPS)
    names = set(model.trainable_parameters())
    assert names == set(model.parameter_names(grmpiqa.STAGE1_GROUPS))
    expect_vpt = model.adapter.visual_prompts_problem is None
    assert any(n.startswith("visual.") for n in names) == expect_vpt
    assert (model.visual is not None) == expect_vpt
    s = model.preprocess.crop
    x = torch.randn(4, 3, s, s, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0.9, 0.1, 0.6, 0.3])
    model.train()
    before = model.probabilities(model.encode_image(x)).detach()
    opt = torch.optim.Adam(params, lr=1e-2)
    loss = quality_loss(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model.probabilities(model.encode_image(x))
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("name", TWINS)
def test_stage2_cache_equals_the_uncached_path(name):
    """The frozen prefix cached, the last units live: same losses and gradients as
    running the whole tower (method.md 7; feature_cache)."""
    model = build(name)
    config = FinetuneConfig()
    teacher = build_teacher(model, config.scene_prompts)
    model.set_trainable(config.groups)
    start = frozen_image_blocks(model)
    assert start == model.image_tower.n_blocks - 2
    imgs = random_pil_images(4)
    cache = build_feature_cache(
        model, imgs, start_block=start, augmentations=2, seed=3, teacher=teacher
    )
    y = torch.linspace(0.1, 0.9, 4)
    model.train()
    step = Stage2Step(model, config)
    x = torch.stack([bank_view(model, im, 3, i, 1) for i, im in enumerate(imgs)])
    naive = ShotBatch(y, model.encode_image(x), teacher(x))
    h, t = cache.batch(range(4), 1)
    cached = ShotBatch(y, l2_normalize(model.image_tower.forward_from(h, start)), t)
    lq1, ls1, _ = step.losses(naive)
    lq2, ls2, _ = step.losses(cached)
    assert ls1 is not None and ls2 is not None
    assert_close_scaled(lq2, lq1, 1e-5, f"{name} L_q")
    assert_close_scaled(ls2, ls1, 1e-5, f"{name} L_s")
    g1q, _ = step.gradients(lq1, ls1)
    g2q, _ = step.gradients(lq2, ls2)
    scale = max(float(a.abs().max()) for a in g1q if a is not None)
    assert scale > 0
    for n, a, b in zip(step.names, g1q, g2q, strict=True):
        assert (a is None) == (b is None), n
        if a is not None and b is not None:
            assert_close_scaled(b, a, 1e-4, n, scale=scale)
    unit_params = {id(p) for m in model.image_tower.block_modules()[start:] for p in m.parameters()}
    assert unit_params and all(
        p.requires_grad for p in model.clip.parameters() if id(p) in unit_params
    )


@pytest.mark.parametrize("name", TWINS)
def test_scores_do_not_depend_on_the_batch(name, blur_dir):
    model = build(name)
    paths = sorted(str(p) for p in blur_dir.glob("*.png"))[:5]
    one = model.score(paths, batch_size=1)
    many = model.score(paths, batch_size=4)
    assert one.shape == (5,) and bool(((one > 0) & (one < 1)).all())
    assert_close_scaled(many, one, 1e-5, name)


@pytest.mark.parametrize("name", TWINS)
def test_checkpoint_round_trip_and_family_refusal(name, tmp_path):
    model = build(name)
    params = model.set_trainable(grmpiqa.STAGE2_GROUPS)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    out = grmpiqa.save_checkpoint(model, tmp_path / "m.safetensors")
    meta = grmpiqa.read_metadata(out)
    assert meta["backbone"]["adapter"]["family"] == model.adapter.family
    back = grmpiqa.create_model(checkpoint=out)
    assert back.backbone_name == name and back.config == model.config
    s = model.preprocess.crop
    x = torch.rand(3, 3, s + 20, s + 20)
    assert_close_scaled(back.score(x), model.score(x), 1e-5, name)
    other = "tiny-convnext" if model.adapter.family != "convnext" else "tiny-EVA02"
    with pytest.raises(CheckpointError, match="backbone") as err:
        grmpiqa.create_model(other, checkpoint=out)
    msg = str(err.value)
    assert "\n" not in msg and f"a {model.adapter.family} backbone" in msg


def test_token_free_trunks_run_without_visual_prompts():
    model = build("tiny-convnext")
    assert model.visual is None and not model.config.visual_prompts
    with pytest.raises(grmpiqa.GrmpiqaError, match="no visual prompts"):
        grmpiqa.create_model("tiny-convnext", pretrained=None, visual_prompts=True)


@pytest.mark.parametrize(
    "name", ["tiny-SigLIP2", "tiny-convnext", "tiny-EVA02", "tiny-MobileCLIP2-S0"]
)
def test_cli_finetune_and_score(name, blur_dir, tmp_path, capsys):
    """grmpiqa finetune (2 epochs, random weights) then grmpiqa score, from the CLI."""
    out = tmp_path / "ft.safetensors"
    argv = [
        "finetune", "--data", f"csv:{blur_dir / 'labels.csv'}", "--shots", "6",
        "--out", str(out), "--backbone", name, "--pretrained", "random",
        "--max-epochs", "2", "--eval-every", "1", "--cache-augmentations", "1",
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    assert grmpiqa.read_metadata(out)["backbone"]["name"] == name
    capsys.readouterr()
    images = sorted(str(p) for p in blur_dir.glob("*.png"))[:3]
    assert main(["score", *images, "--checkpoint", str(out), "--no-progress"]) == 0
    rows = [ln.rsplit(",", 1) for ln in capsys.readouterr().out.strip().splitlines()[1:]]
    assert len(rows) == 3 and all(0.0 < float(s) < 1.0 for _, s in rows)


def test_cli_hf_tokenizer_flag(blur_dir, tmp_path, capsys):
    """A SigLIP-style backbone with a Hugging Face tokenizer given by --tokenizer DIR: the
    checkpoint records the folder's name (never a path to open, issue 18) and scoring
    with the same --tokenizer DIR works; without it, one line names the folder."""
    pytest.importorskip("transformers")
    from backbone_utils import make_hf_tokenizer

    tok = make_hf_tokenizer(tmp_path / "tok")
    out = tmp_path / "ft.safetensors"
    argv = [
        "finetune", "--data", f"csv:{blur_dir / 'labels.csv'}", "--shots", "6",
        "--out", str(out), "--backbone", "tiny-SigLIP2-hf", "--pretrained", "random",
        "--tokenizer", str(tok), "--max-epochs", "1", "--eval-every", "1",
        "--cache-augmentations", "1", "--no-progress",
    ]  # fmt: skip
    try:
        assert main(argv) == 0
    finally:
        import os

        os.environ.pop("GRMPIQA_TOKENIZER", None)
    meta = grmpiqa.read_metadata(out)
    assert meta["backbone"]["tokenizer"] == "tok" and str(tmp_path) not in json.dumps(meta)
    model = grmpiqa.create_model(checkpoint=out, tokenizer=tok)
    assert model.prompt_learner is not None and model.prompt_learner.ctx_start == 0
    capsys.readouterr()
    img = str(sorted(blur_dir.glob("*.png"))[0])
    try:
        assert main(["score", img, "--checkpoint", str(out), "--tokenizer", str(tok),
                     "--no-progress"]) == 0  # fmt: skip
    finally:
        import os

        os.environ.pop("GRMPIQA_TOKENIZER", None)


@pytest.mark.parametrize("name", TWINS)
def test_quality_maps_or_a_one_line_refusal(name):
    """Quality maps read every patch token through the head; their global score is the
    model's score (CLS, MAP or average pooling). Token-free trunks refuse in one line."""
    model = build(name)
    img = Image.new("RGB", (64, 48), "gray")
    if model.adapter.visual_prompts_problem is not None or name == "tiny-CoCa":
        # token-free trunks, and CoCa's attention pooler (no per-token read-out)
        with pytest.raises(grmpiqa.GrmpiqaError, match="no quality maps") as err:
            model.quality_map(img)
        assert "\n" not in str(err.value)
        return
    qm = model.quality_map(img)
    assert qm.grid.shape == model.image_tower.grid_size
    assert abs(qm.score - float(model.score([img])[0])) < 1e-5


@pytest.mark.parametrize("name", ["test-tiny", *TWINS])
def test_bf16_scoring_on_frozen_bf16_weights_is_bit_identical(name):
    """Scoring in bf16 runs a tower copy whose matrix weights are stored in bf16
    (``PromptedVisionTower.frozen_copy``): the same scores, bit for bit, as bf16
    autocast over the fp32 weights, on every family."""
    from grmpiqa.scoring import BatchScorer

    model = build(name)
    x = model.preprocess.normalize(
        torch.randint(0, 256, (3, 3, model.preprocess.crop, model.preprocess.crop),
                      dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    )  # fmt: skip
    frozen = BatchScorer(model, precision="bf16")
    autocast = BatchScorer(model, precision="bf16", frozen_bf16=False)
    assert frozen.towers[0] is not model.image_tower
    assert any(p.dtype == torch.bfloat16 for p in frozen.towers[0].trunk.visual.parameters())
    assert torch.equal(frozen.score_tensor(x), autocast.score_tensor(x))
