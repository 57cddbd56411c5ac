"""QualityModel scoring (method.md 1): range, batch-size invariance, inputs, baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_image
from PIL import Image

import grmpiqa
from grmpiqa.log import RandomWeightsWarning


def test_scores_in_unit_interval_and_batch_size_invariant(tiny_model):
    x = torch.rand(7, 3, 180, 240, generator=torch.Generator().manual_seed(0))
    s1 = tiny_model.score(x, batch_size=1)
    s3 = tiny_model.score(x, batch_size=3)
    s7 = tiny_model.score(x, batch_size=32)
    assert s1.shape == (7,) and s1.dtype == torch.float32
    assert ((s1 > 0) & (s1 < 1)).all()
    torch.testing.assert_close(s1, s3, rtol=0, atol=1e-6)
    torch.testing.assert_close(s1, s7, rtol=0, atol=1e-6)
    assert s1.std() > 0  # different images get different scores


def test_paths_pil_and_tensor_inputs_agree(tiny_model, tmp_path):
    paths = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    by_path = tiny_model.score(paths, batch_size=2)
    by_pil = tiny_model.score([Image.open(p) for p in paths])
    torch.testing.assert_close(by_path, by_pil)
    assert ((by_path > 0) & (by_path < 1)).all()


def test_score_is_softmax_of_scaled_cosines(tiny_model):
    m = tiny_model
    x = torch.rand(3, 3, 224, 224)
    with torch.no_grad():
        xin = m.preprocess.preprocess_tensor(x)
        v = F.normalize(m.image_tower(xin), dim=-1)
        t = m.quality_text_features()
        s = m.clip.logit_scale.exp()
        expected = torch.softmax(s * v @ t.T, dim=-1)[:, 0]
    torch.testing.assert_close(m.score(x), expected, rtol=0, atol=1e-6)


def test_clipiqa_baseline_equals_plain_clip_with_hand_prompts():
    cfg = grmpiqa.ModelConfig(hand_prompts=grmpiqa.CLIPIQA_PROMPTS, visual_prompts=False)
    m = grmpiqa.create_model("test-tiny", pretrained=None, config=cfg)
    assert m.visual is None and m.prompt_learner is None
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        clip = m.clip
        img = F.normalize(clip.encode_image(m.preprocess.preprocess_tensor(x)), dim=-1)
        txt = F.normalize(clip.encode_text(m.tokenizer(["Good photo.", "Bad photo."])), dim=-1)
        expected = torch.softmax(clip.logit_scale.exp() * img @ txt.T, -1)[:, 0]
    torch.testing.assert_close(m.score(x), expected, rtol=0, atol=1e-6)


def test_logit_scale_is_fixed_and_not_a_parameter(tiny_model):
    names = dict(tiny_model.named_parameters())
    assert "logit_scale" not in names
    assert abs(float(tiny_model.logit_scale) - float(tiny_model.clip.logit_scale.exp())) < 1e-4


def test_visual_prompts_can_be_switched_off():
    m = grmpiqa.create_model("test-tiny", pretrained=None, visual_prompts=False)
    assert m.visual is None
    assert "visual_prompts" in m.parameter_groups() and not m.parameter_groups()["visual_prompts"]
    assert m.score(torch.rand(1, 3, 224, 224)).shape == (1,)


def test_configurable_class_names_token_count_and_depth():
    cfg = grmpiqa.ModelConfig(
        class_names=("sharp photo", "blurry photo"), vpt_tokens=3, vpt_deep_layers=1
    )
    m = grmpiqa.create_model("test-tiny", pretrained=None, config=cfg)
    assert m.visual.prompt_embeddings.shape[1] == 3
    assert m.visual.deep_prompt_embeddings.shape[0] == 1
    assert m.prompt_learner.class_names == ("sharp photo", "blurry photo")


def test_same_seed_same_random_backbone_and_prompts():
    a = grmpiqa.create_model(
        "test-tiny", pretrained=None, seed=3, config=grmpiqa.ModelConfig(vpt_tokens=2)
    )
    b = grmpiqa.create_model(
        "test-tiny", pretrained=None, seed=3, config=grmpiqa.ModelConfig(vpt_tokens=2)
    )
    c = grmpiqa.create_model(
        "test-tiny", pretrained=None, seed=4, config=grmpiqa.ModelConfig(vpt_tokens=2)
    )
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["clip.visual.conv1.weight"], sc["clip.visual.conv1.weight"])


def test_random_backbone_is_announced_every_time():
    with pytest.warns(RandomWeightsWarning) as record:
        grmpiqa.create_model("test-tiny", pretrained=None)
        grmpiqa.create_model("test-tiny", pretrained=None)
    announced = [w for w in record if issubclass(w.category, RandomWeightsWarning)]
    assert len(announced) == 2
    assert all("RANDOM weights" in str(w.message) for w in announced)


def test_bf16_scores_within_0_01_of_fp32(tiny_model):
    x = torch.rand(6, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    fp32 = tiny_model.score(x, precision="fp32")
    bf16 = tiny_model.score(x, precision="bf16")
    assert bf16.dtype == torch.float32
    assert float((fp32 - bf16).abs().max()) < 0.01
    assert not torch.equal(fp32, bf16)  # autocast really ran in bf16


def test_dataloader_workers_do_not_change_scores(tiny_model, tmp_path):
    paths = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(5)]
    in_process = tiny_model.score(paths, batch_size=2, num_workers=0)
    workers = tiny_model.score(paths, batch_size=2, num_workers=2)
    torch.testing.assert_close(in_process, workers, rtol=0, atol=0)


def test_probabilities_are_the_models_one_output(tiny_model):
    """``probabilities`` is softmax(s * [v.t_hq, v.t_lq])[..., 0] for images and tokens."""
    m = tiny_model
    x = m.preprocess.preprocess_tensor(torch.rand(3, 3, 200, 150))
    with torch.no_grad():
        v = F.normalize(m.image_tower(x), dim=-1)
        t = m.quality_text_features()
        expected = torch.softmax(m.logit_scale * v @ t.T, dim=-1)[:, 0]
        torch.testing.assert_close(m.probabilities(v), expected, rtol=0, atol=0)
        torch.testing.assert_close(m.probabilities(v, t), expected, rtol=0, atol=0)
        torch.testing.assert_close(m.probabilities(v[:, None, :].expand(3, 5, -1))[:, 3], expected)
        assert torch.equal(m.forward(x).softmax(-1)[:, 0], expected)


def test_create_model_gives_the_scoring_api_over_the_plain_model(tiny_model):
    from grmpiqa.scoring.api import ScoringModel, quality_map, score

    assert isinstance(tiny_model, ScoringModel) and isinstance(tiny_model, grmpiqa.QualityModel)
    assert not hasattr(grmpiqa.QualityModel, "score")  # model.py owns the network only
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(score(tiny_model, x), tiny_model.score(x))
    img = Image.new("RGB", (40, 30), "gray")
    assert quality_map(tiny_model, img).score == tiny_model.quality_map(img).score


def test_model_module_imports_nothing_above_it():
    """model.py must not import scoring, explain, the factory or the CLI, not even for
    types (the layering of docs; structure_check counts type-only imports)."""
    import ast
    import inspect

    import grmpiqa.model

    tree = ast.parse(inspect.getsource(grmpiqa.model))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    above = ("grmpiqa.scoring", "grmpiqa.explain", "grmpiqa.factory", "grmpiqa.cli")
    assert not [m for m in imported if m.startswith(above)], imported
