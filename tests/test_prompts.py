"""Prompt learners (method.md 3, 4): injection, VPT layout, trainable groups."""

from __future__ import annotations

import torch

import grmpiqa
from grmpiqa.backbones import openclip_vit
from grmpiqa.model import STAGE1_GROUPS, STAGE2_GROUPS


def test_injected_placeholder_context_equals_open_clip_encode_text(tiny_model):
    m = tiny_model
    pl = m.prompt_learner
    tokens = pl.tokens
    emb = pl().detach().clone()
    emb[:, 1 : 1 + pl.n_ctx] = pl.placeholder_embedding  # context := "X X X X" embeddings
    with torch.no_grad():
        ours = m.text_tower(emb, tokens)
        ref = m.clip.encode_text(tokens)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_context_vectors_sit_after_sot_and_before_class_tokens(tiny_model):
    pl = tiny_model.prompt_learner
    emb = pl()
    assert emb.shape[0] == 2
    torch.testing.assert_close(emb[0, 1 : 1 + pl.n_ctx], pl.ctx)
    torch.testing.assert_close(emb[1, 1 : 1 + pl.n_ctx], pl.ctx)
    sot = tiny_model.clip.token_embedding(pl.tokens[:, :1])
    torch.testing.assert_close(emb[:, :1], sot)
    assert pl.ctx.shape == (4, tiny_model.clip.token_embedding.weight.shape[1])


def _block_inputs(model, images):
    seen = []
    hooks = [
        blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
        for blk in model.clip.visual.transformer.resblocks
    ]
    try:
        with torch.no_grad():
            model.image_tower.forward_features(images)  # the reference path: every row
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_vpt_sequence_layout_and_deep_replacement(tiny_model):
    m = tiny_model.eval()
    v = m.visual
    x = torch.randn(2, 3, 224, 224)
    seen = _block_inputs(m, x)
    n_patches = (224 // 32) ** 2
    P = v.num_tokens
    assert len(seen) == m.image_tower.n_blocks
    for h in seen:
        assert h.shape == (2, 1 + P + n_patches, 64)
    # block 0 input: [CLS, proj(prompt_embeddings), patches]
    plain = openclip_vit.vision_embed(m.clip.visual, x)
    with torch.no_grad():
        p0 = v.prompt_proj(v.prompt_embeddings)[0]
        torch.testing.assert_close(seen[0][:, 0], plain[:, 0])
        torch.testing.assert_close(seen[0][:, 1 : 1 + P], p0.expand(2, -1, -1))
        torch.testing.assert_close(seen[0][:, 1 + P :], plain[:, 1:])
        # blocks 1..L-1: the prompt positions hold proj(deep_prompt_embeddings[i-1])
        for i in range(1, m.image_tower.n_blocks):
            deep = v.prompt_proj(v.deep_prompt_embeddings[i - 1])
            torch.testing.assert_close(seen[i][:, 1 : 1 + P], deep.expand(2, -1, -1))
    # the CLS and patch positions of block i's input are block i-1's outputs
    out0 = m.clip.visual.transformer.resblocks[0](seen[0])
    torch.testing.assert_close(seen[1][:, 0], out0[:, 0])
    torch.testing.assert_close(seen[1][:, 1 + P :], out0[:, 1 + P :])


def test_vpt_init_bound_and_shapes():
    m = grmpiqa.create_model("test-tiny", pretrained=None, config=grmpiqa.ModelConfig())
    v = m.visual
    bound = (6.0 / (3 * 32 * 32 + 64)) ** 0.5
    assert v.prompt_embeddings.shape == (1, 100, 64)
    assert v.deep_prompt_embeddings.shape == (3, 100, 64)
    assert v.prompt_embeddings.abs().max() <= bound
    assert isinstance(v.prompt_norm, torch.nn.LayerNorm) and v.prompt_norm.eps == 1e-6


def _grads_after_backward(model, groups):
    model.set_trainable(groups)
    model.zero_grad(set_to_none=True)
    model.train()
    loss = grmpiqa.quality_loss(model(torch.randn(2, 3, 224, 224)), torch.tensor([0.2, 0.9]))
    loss.backward()
    model.eval()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradients_reach_only_stage1_tensors():
    m = grmpiqa.create_model("test-tiny", pretrained=None, config=grmpiqa.ModelConfig(vpt_tokens=4))
    got = _grads_after_backward(m, STAGE1_GROUPS)
    expected = set(m.parameter_names(STAGE1_GROUPS))
    assert got == expected
    assert all(n.startswith(("visual.", "prompt_learner.")) for n in got)


def test_gradients_reach_only_stage2_tensors():
    m = grmpiqa.create_model("test-tiny", pretrained=None, config=grmpiqa.ModelConfig(vpt_tokens=4))
    got = _grads_after_backward(m, STAGE2_GROUPS)
    expected = set(m.parameter_names(STAGE2_GROUPS))
    assert got == expected
    assert not any(n.startswith("visual.") for n in got)  # visual prompts frozen in stage 2
    assert "prompt_learner.ctx" in got
