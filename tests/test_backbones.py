"""Backbone adapters (grmpiqa.backbones): each family's tiny twin against open_clip itself."""

from __future__ import annotations

import warnings
from pathlib import Path

import open_clip
import pytest
import torch

import grmpiqa  # noqa: F401 - registers the tiny twins' configs
from grmpiqa.backbone import model_config
from grmpiqa.backbones import (
    TINY_TWINS,
    PromptSlot,
    build_adapter,
    load_tokenizer,
    placeholder_start,
    resolve_name,
)
from grmpiqa.backbones import registry as reg
from grmpiqa.errors import BackboneError
from tests.backbone_utils import make_hf_tokenizer, register_hf_text_twin
from tests.conftest import assert_close_scaled


def _build(name: str, seed: int = 0, **kw):
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        clip = open_clip.create_model(name, pretrained=None, **kw).eval()
    return clip, build_adapter(clip, model_config(name), name)


def _own(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module", params=sorted(set(TINY_TWINS) - {"tiny-SigLIP2-hf"}))
def twin(request):
    return request.param, *_build(request.param)


def test_twin_resolves_to_its_family(twin):
    name, _clip, adapter = twin
    assert adapter.family == TINY_TWINS[name][0]
    assert resolve_name(name).family == adapter.family
    full = TINY_TWINS[name][1]
    if full in open_clip.list_models():  # the full-size name (newer open_clip releases only)
        assert resolve_name(full).family == adapter.family


def test_adapter_equals_open_clip_without_prompts(twin):
    """embed -> units -> pool is the family's own encode_image; the text tower on token
    embeddings is its encode_text (the same code path: equal to rounding, here bitwise)."""
    name, clip, adapter = twin
    s = adapter.preprocessing.size
    x = torch.randn(3, 3, s, s, generator=torch.Generator().manual_seed(1))
    toks = adapter.tokenizer(["a photo of a cat", "X X X X high quality."])
    with torch.no_grad():
        img_ref = _own(clip.encode_image(x, normalize=False))
        txt_ref = _own(clip.encode_text(toks, normalize=False))
        assert_close_scaled(adapter.image.encode(x), img_ref, rel=1e-5, what=f"{name} image")
        assert_close_scaled(adapter.text.encode(toks), txt_ref, rel=1e-5, what=f"{name} text")


def test_units_rows_and_groups(twin):
    name, clip, adapter = twin
    img = adapter.image
    assert img.n_units == len(img.unit_modules()) >= 2
    groups = adapter.parameter_modules(2)
    assert len(groups["image_blocks"]) == 2 and len(groups["text_blocks"]) == 2
    owned = {id(p) for p in clip.parameters()}
    unit_ids = {id(p) for m in img.unit_modules() for p in m.parameters()}
    head_ids = {id(p) for p in img.head_parameters()}
    embed_ids = {id(p) for p in img.embed_parameters()}
    assert unit_ids <= owned and head_ids <= owned and embed_ids <= owned
    assert not (unit_ids & head_ids) and not (unit_ids & embed_ids) and not (head_ids & embed_ids)
    assert unit_ids | head_ids | embed_ids == {id(p) for p in clip.visual.parameters()}
    s = adapter.preprocessing.size
    with torch.no_grad():
        h = img.embed(torch.randn(2, 3, s, s))
        if img.visual_prompts_problem is None:  # token trunks: row-selective = full then sliced
            full = img.run_unit(0, h)
            assert_close_scaled(img.run_unit_rows(0, h, 3), full[:, :3], rel=1e-5, what=name)


def test_prompt_rows_are_position_free(twin):
    """Prompt rows after the prefix or at the end of the sequence give the same own rows
    (rotary trunks rotate neither): the towers' two layouts agree."""
    name, _clip, adapter = twin
    img = adapter.image
    if img.visual_prompts_problem is not None:
        pytest.skip(f"{name}: {img.visual_prompts_problem}")
    s = adapter.preprocessing.size
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        h = img.embed(torch.randn(2, 3, s, s, generator=g))
        k, p = img.num_prefix_tokens, torch.randn(2, 5, img.width, generator=g)
        a = img.run_unit(0, torch.cat([h[:, :k], p, h[:, k:]], 1), PromptSlot(k, 5))
        b = img.run_unit(0, torch.cat([h, p], 1), PromptSlot(h.shape[1], 5))
    own_a = torch.cat([a[:, :k], a[:, k + 5 :]], 1)
    assert_close_scaled(own_a, b[:, : h.shape[1]], rel=1e-5, what=name)
    assert_close_scaled(a[:, k : k + 5], b[:, h.shape[1] :], rel=1e-5, what=name)
    if adapter.family == "eva":  # the rotary table must know where the prompts are
        with pytest.raises(RuntimeError):
            img.run_unit(0, torch.cat([h, p], 1), None)


def test_every_registry_name_resolves_in_one_line():
    names = open_clip.list_models()
    assert len(names) > 100
    for name in names:
        r = resolve_name(name)
        assert r.family is not None or r.refusal is not None, name
        if r.refusal is not None:
            assert "\n" not in r.refusal and r.refusal.startswith(name), r.refusal


def test_families_cover_the_issue_list():
    fam = {n: resolve_name(n).family for n in open_clip.list_models()}
    expect = {
        "ViT-B-16-quickgelu": "openclip-vit",
        "coca_ViT-B-32": "openclip-vit",
        "RN50": "modified-resnet",
        "convnext_base_w": "convnext",
        "EVA02-B-16": "eva",
        "swin_base_patch4_window7_224": "swin",
    }
    for name, family in expect.items():
        assert fam[name] == family, name
    for name, family in {
        "ViT-B-16-SigLIP2": "timm-vit",
        "MobileCLIP2-S0": "fastvit",
        "PE-Core-B-16": "eva",
        "ViTamin-S": "timm-vit",
    }.items():
        if name in fam:  # newer open_clip releases only
            assert fam[name] == family, name


# -- tokenizers ------------------------------------------------------------------------------


def test_hf_tokenizer_from_a_local_folder(tmp_path: Path):
    pytest.importorskip("transformers")
    folder = make_hf_tokenizer(tmp_path / "tok")
    cfg = model_config("tiny-SigLIP2")
    tok = load_tokenizer(cfg, "tiny-SigLIP2", override=folder)
    ids = tok(["X X X X high quality.", "a photo of a cat"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert placeholder_start(tok, 4, "high quality") == 0  # no start token, as SigLIP's
    bos = load_tokenizer(cfg, "tiny-SigLIP2", override=make_hf_tokenizer(tmp_path / "b", bos=True))
    assert placeholder_start(bos, 4, "high quality") == 1
    clip = open_clip.create_model("tiny-SigLIP2", pretrained=None).eval()
    adapter = build_adapter(clip, cfg, "tiny-SigLIP2", tokenizer=folder)
    assert adapter.extra["tokenizer"] == str(folder.resolve())
    with torch.no_grad():
        assert torch.equal(adapter.text.encode(ids), clip.encode_text(ids))


def test_missing_hf_tokenizer_is_one_line(monkeypatch, tmp_path: Path):
    cfg = model_config("tiny-SigLIP2")
    cfg["text_cfg"]["hf_tokenizer_name"] = "nobody/no-such-tokenizer"
    monkeypatch.setattr(reg, "has_transformers", lambda: False)
    import grmpiqa.backbones.tokenizers as toks

    monkeypatch.setattr(toks, "has_transformers", lambda: False)
    with pytest.raises(BackboneError, match=r"grmpiqa\[hf\]") as err:
        load_tokenizer(cfg, "x")
    assert "\n" not in str(err.value)
    assert "grmpiqa[hf]" in (resolve_name("ViT-B-16-SigLIP").refusal or "")
    monkeypatch.undo()
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="tokenizer='DIR'") as err:
        load_tokenizer(cfg, "x")
    assert "\n" not in str(err.value) and "--tokenizer DIR" in err.value.for_cli()
    with pytest.raises(BackboneError, match="not found"):
        load_tokenizer(cfg, "x", override=tmp_path / "missing")


def test_hf_text_tower(tmp_path: Path):
    """An open_clip HFTextEncoder (tiny RoBERTa from a local config) run on embeddings."""
    pytest.importorskip("transformers")
    name = register_hf_text_twin(tmp_path)
    assert resolve_name(name).text == "hf-text" and resolve_name(name).ok
    clip, adapter = _build(name, pretrained_hf=False)
    toks = adapter.tokenizer(["X X X X high quality.", "a photo of a cat"])
    assert placeholder_start(adapter.tokenizer, 4, "high quality") == 1
    with torch.no_grad():
        assert_close_scaled(adapter.text.encode(toks), clip.encode_text(toks), rel=1e-5)
    assert len(adapter.text.unit_modules()) == 2
