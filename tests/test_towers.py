"""The prompted image tower and the text tower (method.md 3, 4): one forward for all."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close_scaled

import grmpiqa
from grmpiqa.backbones import openclip_vit
from grmpiqa.finetune import SCENE_PROMPTS
from grmpiqa.log import FallbackWarning
from grmpiqa.towers import PromptedVisionTower

pytestmark = pytest.mark.usefixtures("one_thread")


def model_with(**kw) -> grmpiqa.QualityModel:
    cfg = grmpiqa.ModelConfig(vpt_tokens=kw.pop("vpt_tokens", 4), **kw)
    return grmpiqa.create_model("test-tiny", pretrained=None, config=cfg)


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("deep_layers", [None, 1, 0])
def test_fast_path_equals_the_reference_path(deep_layers):
    """Prompt rows as keys/values only, CLS-only last block: same embedding up to
    rounding, for VPT-deep in every block, in some, and shallow VPT."""
    m = model_with(vpt_deep_layers=deep_layers).eval()
    tower = m.image_tower
    assert tower.fast
    x = images()
    with torch.no_grad():
        reference = tower.head(tower.forward_features(x))
        fast = tower(x)
    assert_close_scaled(fast, reference, 1e-5, "embedding")


@pytest.mark.parametrize("deep_layers", [None, 1])
def test_hidden_states_resume_the_tower_at_any_block(deep_layers):
    m = model_with(vpt_deep_layers=deep_layers).eval()
    tower = m.image_tower
    x = images()
    with torch.no_grad():
        full = tower(x)
        for start in range(tower.n_blocks + 1):
            h = tower.hidden(x, start)
            compact = tower.is_compact(start)
            assert h.shape[1] == (50 if compact else 54), start
            assert_close_scaled(tower.forward_from(h, start), full, 1e-5, f"from block {start}")
            # the reference path from the expanded state agrees too
            ref = tower.head(tower.blocks(tower.expand(h, start), start))
            assert_close_scaled(ref, full, 1e-5, f"reference from block {start}")


def test_gradients_of_the_fast_path_equal_the_reference_path():
    m = model_with(vpt_dropout=0.0)
    m.set_trainable(("visual_prompts",))
    params = list(m.trainable_parameters().values())
    x = images(2)
    fast = torch.autograd.grad(m.image_tower(x).square().sum(), params)
    tower = m.image_tower
    ref = torch.autograd.grad(tower.head(tower.forward_features(x)).square().sum(), params)
    for (n, _), a, b in zip(m.trainable_parameters().items(), fast, ref, strict=True):
        assert_close_scaled(a, b, 1e-4, n)


def test_no_prompts_is_plain_clip():
    m = model_with(visual_prompts=False).eval()
    x = images()
    with torch.no_grad():
        ours = m.image_tower(x)
        assert_close_scaled(ours, m.clip.encode_image(x), 1e-5, "plain CLIP")
        tower = PromptedVisionTower(m.clip.visual, None)
        assert tower.num_prefix_tokens == 1
        assert_close_scaled(tower(x), ours, 1e-6, "prompt-free tower")


def test_prompt_dropout_draws_are_the_same_on_both_paths():
    """In train mode the fast and reference paths consume the RNG identically."""
    m = model_with(vpt_dropout=0.5).train()
    tower = m.image_tower
    x = images(2)
    with torch.no_grad():
        torch.manual_seed(3)
        fast = tower(x)
        torch.manual_seed(3)
        ref = tower.head(tower.forward_features(x))
        torch.manual_seed(4)
        other = tower(x)
    assert_close_scaled(fast, ref, 1e-5, "train-mode embedding")
    assert not torch.allclose(fast, other)  # dropout really acts


def test_per_token_head_pools_to_the_embedding():
    m = model_with().eval()
    tower = m.image_tower
    with torch.no_grad():
        seq = tower.forward_features(images(2))
        tokens = tower.forward_head(seq, pool=False)
        pooled = tower.forward_head(seq)
    assert tokens.shape == (2, tower.num_prefix_tokens + 49, pooled.shape[1])
    assert_close_scaled(tokens[:, 0], pooled, 1e-6, "CLS token")
    assert tower.grid_size == (7, 7)


def test_truncated_text_tower_equals_the_full_tower():
    m = model_with().eval()
    with torch.no_grad():
        assert_close_scaled(
            m.quality_text_features(truncate=True), m.quality_text_features(), 1e-5, "quality"
        )
        assert_close_scaled(
            m.encode_text(SCENE_PROMPTS, truncate=True),
            m.encode_text(SCENE_PROMPTS),
            1e-5,
            "scenes",
        )
        tokens = m.tokenizer(list(SCENE_PROMPTS))
        assert_close_scaled(
            m.text_tower.encode_tokens(tokens), m.clip.encode_text(tokens), 1e-5, "encode_text"
        )


def test_fast_path_falls_back_with_a_warning_for_unknown_blocks(monkeypatch):
    m = model_with()
    monkeypatch.setattr(openclip_vit, "block_problem", lambda block: "a custom block")
    with pytest.warns(FallbackWarning, match="a custom block"):
        tower = PromptedVisionTower(m.clip.visual, m.visual)
    assert not tower.fast
    with torch.no_grad():
        x = images(2)
        assert_close_scaled(tower(x), m.eval().image_tower(x), 1e-5, "fallback")


def test_supported_open_clip_needs_no_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        m = model_with()
    assert m.image_tower.fast
    assert openclip_vit.open_clip_version() >= openclip_vit.MIN_VERSION


def test_bf16_keeps_an_fp32_residual_stream():
    m = model_with().eval()
    seen = []
    block = openclip_vit.vision_blocks(m.clip.visual)[1]
    block.ln_1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m.image_tower(images(1))
    assert seen and all(d == torch.float32 for d in seen)


def test_declared_open_clip_lower_bound_is_the_shim_minimum():
    """pyproject's open_clip_torch>=X is what the ViT adapter supports (CI tests against X)."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not run from a checkout")
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("open_clip_torch"))
    lowest = re.search(r">=\s*([0-9.]+)", spec)
    assert lowest is not None
    assert tuple(int(v) for v in lowest.group(1).split(".")) == openclip_vit.MIN_VERSION
