"""scoring.engine: the API's inputs, the BatchScorer, several checkpoints in one pass."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image
from PIL import Image

import grmpiqa
from grmpiqa.errors import GrmpiqaError
from grmpiqa.scoring import BatchScorer, shared_prefix_blocks

CFG = grmpiqa.ModelConfig(vpt_tokens=4, finetune_blocks=2)


def test_one_path_one_pil_image_or_one_chw_tensor_is_a_batch_of_one(tiny_model, tmp_path):
    p = make_image(tmp_path / "a.png", seed=3)
    ref = tiny_model.score([str(p)])
    assert ref.shape == (1,)
    torch.testing.assert_close(tiny_model.score(str(p)), ref, rtol=0, atol=0)
    torch.testing.assert_close(tiny_model.score(p), ref, rtol=0, atol=0)
    torch.testing.assert_close(tiny_model.score(Image.open(p)), ref, rtol=0, atol=0)
    x = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tiny_model.score(x), tiny_model.score(x[None]), rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float tensor .* torch.uint8"),
        (torch.full((1, 3, 32, 32), 2.0), r"\[0, 1\], got min 2, max 2"),
        (torch.full((3, 32, 32), -0.5), r"\[0, 1\]"),
        (torch.full((1, 3, 8, 8), float("nan")), r"\[0, 1\]"),
        (torch.rand(3, 32), r"\[3, H, W\]"),
        (torch.rand(2, 4, 32, 32), r"\[3, H, W\]"),
        (42, "type int"),
    ],
)
def test_bad_api_inputs_raise_grmpiqa_error(tiny_model, bad, msg):
    with pytest.raises(GrmpiqaError, match=msg):
        tiny_model.score(bad)


def test_negative_workers_and_batch_size_are_refused(tiny_model, tmp_path):
    p = make_image(tmp_path / "a.png")
    with pytest.raises(GrmpiqaError, match="workers"):
        tiny_model.score([p], num_workers=-1)
    with pytest.raises(GrmpiqaError, match="batch size"):
        tiny_model.score([p], batch_size=0)


def test_training_mode_is_restored(tmp_path):
    model = grmpiqa.create_model("test-tiny", pretrained=None, config=CFG)
    model.train()
    model.score(torch.rand(1, 3, 32, 32))
    model.score([make_image(tmp_path / "a.png")])
    assert model.training


def _finetuned(base_seed: int, tune_seed: int, tmp_path, name: str, touch_prompts: bool = False):
    """A stage-2 checkpoint from the stage-1 model of ``base_seed``: its last
    ``finetune_blocks`` image blocks, text context and ln_post changed (seeded)."""
    m = grmpiqa.create_model("test-tiny", pretrained=None, config=CFG, seed=base_seed)
    params = m.set_trainable(grmpiqa.STAGE2_GROUPS + (("visual_prompts",) if touch_prompts else ()))
    g = torch.Generator().manual_seed(tune_seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path / f"{name}.safetensors"
    grmpiqa.save_checkpoint(m, path)
    return grmpiqa.create_model(checkpoint=path)


def test_checkpoints_from_one_stage1_share_their_frozen_blocks_and_match_separate_runs(tmp_path):
    models = [_finetuned(0, s, tmp_path, f"c{s}") for s in (1, 2, 3)]
    assert shared_prefix_blocks(models) == 2  # 4 blocks, the last 2 fine-tuned
    x = torch.rand(5, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    together = BatchScorer(models).score_tensor(x)
    assert together.shape == (5, 3)
    for j, m in enumerate(models):
        alone = BatchScorer(m).score_tensor(x)[:, 0]
        torch.testing.assert_close(together[:, j], alone, rtol=0, atol=1e-5)
    # the columns really differ (three different fine-tunings)
    assert not torch.allclose(together[:, 0], together[:, 1])


def test_checkpoints_with_different_prompts_or_backbones_run_in_full(tmp_path):
    same_base = [
        _finetuned(0, 1, tmp_path, "a"),
        _finetuned(0, 2, tmp_path, "b", touch_prompts=True),
    ]
    assert shared_prefix_blocks(same_base) is None  # stage-2 changed the visual prompts
    other_base = [_finetuned(0, 1, tmp_path, "c"), _finetuned(5, 2, tmp_path, "d")]
    assert shared_prefix_blocks(other_base) is None
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    both = BatchScorer(other_base).score_tensor(x)
    for j, m in enumerate(other_base):
        torch.testing.assert_close(
            both[:, j], BatchScorer(m).score_tensor(x)[:, 0], rtol=0, atol=1e-6
        )


def test_scorer_refuses_mixed_preprocessing(tmp_path):
    a = grmpiqa.create_model("test-tiny", pretrained=None, config=CFG)
    b = grmpiqa.create_model(
        "test-tiny", pretrained=None, config=CFG, preprocess=grmpiqa.PreprocessConfig(stats="clip")
    )
    with pytest.raises(GrmpiqaError, match="same preprocessing"):
        BatchScorer([a, b])


def test_score_items_reports_bad_items_and_keeps_order(tiny_model, tmp_path):
    good = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    scorer = BatchScorer(tiny_model)
    res = scorer.score_items(
        [str(good[0]), str(tmp_path / "bad.jpg"), str(good[1]), str(good[2])], decode_threads=2
    )
    assert res.indices == [0, 2, 3]
    assert res.errors[0][0] == 1 and "bad.jpg" in res.errors[0][1]
    ref = tiny_model.score(good)
    torch.testing.assert_close(res.scores[:, 0], ref, rtol=0, atol=2e-6)


def test_large_jpegs_decode_at_reduced_scale_with_nearly_the_same_scores(tiny_model, tmp_path):
    """A 12-megapixel JPEG decodes at 1/8 scale (still >= the 244 px resize); the scores
    stay within 0.005 of the full decode, and reduced_decode=False is the full decode."""
    import numpy as np

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    paths = []
    for i, angle in enumerate((0, 90)):
        big = small.rotate(angle, expand=True).resize((4000, 3000), Image.Resampling.BICUBIC)
        paths.append(tmp_path / f"big{i}.jpg")
        big.save(paths[-1], quality=92)
    reduced = BatchScorer(tiny_model)
    full = BatchScorer(tiny_model, reduced_decode=False)
    assert reduced.min_side == 244 and full.min_side is None
    a = reduced.score_items(paths).scores[:, 0]
    b = full.score_items(paths).scores[:, 0]
    assert float((a - b).abs().max()) < 0.005
    direct = torch.stack(
        [tiny_model.preprocess.eval_transform()(grmpiqa.images.load_image(p)) for p in paths]
    )
    torch.testing.assert_close(b, full.score_tensor(direct)[:, 0], rtol=0, atol=1e-6)


def test_the_towers_decide_what_they_share(tmp_path):
    """``PromptedVisionTower.shared_blocks`` compares tensors and modules, not key names:
    the same seed on another architecture, other deep prompts or plain CLIP towers."""
    a = _finetuned(0, 1, tmp_path, "a")
    b = _finetuned(0, 2, tmp_path, "b")
    assert a.image_tower.shared_blocks(b.image_tower) == 2
    assert a.image_tower.shared_blocks(a.image_tower) == a.image_tower.n_blocks
    # one deep prompt changed before block 1: blocks 0 stays shared, nothing after it
    c = _finetuned(0, 3, tmp_path, "c")
    with torch.no_grad():
        c.visual.deep_prompt_embeddings[0].add_(0.01)
    assert a.image_tower.shared_blocks(c.image_tower) == 1
    # no visual prompts (plain CLIP towers) share their untouched blocks too
    plain = [
        grmpiqa.create_model("test-tiny", pretrained=None, visual_prompts=False, seed=0)
        for _ in range(2)
    ]
    with torch.no_grad():
        for p in list(plain[1].image_tower.block_modules()[-1].parameters()):
            p.add_(0.01)
    assert shared_prefix_blocks(plain) == plain[0].image_tower.n_blocks - 1
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    both = BatchScorer(plain).score_tensor(x)
    for j, m in enumerate(plain):
        torch.testing.assert_close(
            both[:, j], BatchScorer(m).score_tensor(x)[:, 0], atol=1e-5, rtol=0
        )
    # the same seed with other activations (another architecture): nothing shared
    from grmpiqa.towers import PromptedVisionTower

    other_act = PromptedVisionTower(plain[0].clip.visual)
    import copy

    visual = copy.deepcopy(plain[0].clip.visual)
    for blk in visual.transformer.resblocks:
        blk.mlp.gelu = torch.nn.ReLU()
    assert other_act.shared_blocks(PromptedVisionTower(visual)) == 0
