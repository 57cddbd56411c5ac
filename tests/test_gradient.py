"""The quality-aware gradient rule (method.md 7): hand-computed branches and one real step."""

from __future__ import annotations

import pytest
import torch

import grmpiqa
from grmpiqa.finetune import FinetuneConfig, ShotBatch, Stage2Step, build_teacher
from grmpiqa.gradient import quality_aware_gradient, set_quality_aware_grads

pytestmark = pytest.mark.usefixtures("one_thread")


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def test_no_semantic_gradient_keeps_quality_gradient():
    gq = t(1.0, -2.0, 3.0)
    assert quality_aware_gradient(gq, None, 5.0) is gq


def test_conflicting_or_orthogonal_gradients_keep_quality_gradient():
    gq = t(1.0, 2.0, 0.0)
    # <g_q, g_s> = -1 - 2 = -3 < 0: the rule leaves conflicts alone (unlike ProGrad)
    assert torch.equal(quality_aware_gradient(gq, t(-1.0, -1.0, 5.0), 5.0), gq)
    # <g_q, g_s> = 0 exactly
    assert torch.equal(quality_aware_gradient(gq, t(2.0, -1.0, 7.0), 5.0), gq)
    # g_s = 0 (no division by zero)
    assert torch.equal(quality_aware_gradient(gq, t(0.0, 0.0, 0.0), 5.0), gq)


def test_aligned_gradients_remove_lambda_times_the_projection():
    gq, gs = t(1.0, 2.0, 0.0), t(1.0, 0.0, 1.0)
    # <g_q, g_s> = 1, ||g_s||^2 = 2: g = g_q - lam * 1/2 * g_s
    torch.testing.assert_close(quality_aware_gradient(gq, gs, 5.0), t(-1.5, 2.0, -2.5))
    torch.testing.assert_close(quality_aware_gradient(gq, gs, 1.0), t(0.5, 2.0, -0.5))
    # lam = 1 makes the result orthogonal to g_s; lam = 5 points against it
    assert abs(float(quality_aware_gradient(gq, gs, 1.0) @ gs)) < 1e-7
    assert float(quality_aware_gradient(gq, gs, 5.0) @ gs) == pytest.approx(-4.0)
    # lam = 0 is plain fine-tuning
    torch.testing.assert_close(quality_aware_gradient(gq, gs, 0.0), gq)
    # inputs are not modified; shapes other than 1-D work per tensor
    assert torch.equal(gq, t(1.0, 2.0, 0.0))
    m = quality_aware_gradient(gq.reshape(3, 1), gs.reshape(3, 1), 5.0)
    torch.testing.assert_close(m, t(-1.5, 2.0, -2.5).reshape(3, 1))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        quality_aware_gradient(t(1.0, 2.0), t(1.0, 2.0, 3.0), 5.0)


def test_set_grads_per_tensor_with_missing_gradients():
    params = [torch.zeros(3, requires_grad=True) for _ in range(4)]
    gq = [t(1.0, 2.0, 0.0), t(1.0, 0.0, 0.0), None, t(3.0, 0.0, 0.0)]
    gs = [t(1.0, 0.0, 1.0), t(-1.0, 0.0, 0.0), t(1.0, 1.0, 1.0), None]
    stats = set_quality_aware_grads(params, gq, gs, 5.0, cosine=True)
    torch.testing.assert_close(params[0].grad, t(-1.5, 2.0, -2.5))
    assert torch.equal(params[1].grad, gq[1])  # conflict: kept
    assert params[2].grad is None  # no quality gradient: not stepped
    assert torch.equal(params[3].grad, gq[3])  # no semantic gradient: kept
    assert stats.projected == 1 and stats.tensors == 3
    # cosine over tensors having both: dots 1 + (-1) = 0
    assert stats.cosine == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        set_quality_aware_grads(params, gq[:2], gs, 5.0)


def test_one_sgd_step_applies_exactly_the_rule_plus_weight_decay():
    """A real stage-2 step moves every trainable tensor by -lr * (rule(g_q, g_s) + wd * w)
    and leaves every frozen tensor (visual prompts, early blocks) unchanged."""
    cfg_model = grmpiqa.ModelConfig(vpt_tokens=4, vpt_dropout=0.0, finetune_blocks=2)
    model = grmpiqa.create_model("test-tiny", pretrained=None, config=cfg_model)
    lam, lr, wd = 5.0, 0.05, 0.01
    config = FinetuneConfig(lam=lam, lr=lr, weight_decay=wd)
    teacher = build_teacher(model, config.scene_prompts)
    model.set_trainable(config.groups)
    step = Stage2Step(model, config)
    model.train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 224, 224, generator=gen)
    y = torch.rand(6, generator=gen)

    lq, ls, _ = step.losses(ShotBatch(y, model.encode_image(x), teacher(x)))
    assert ls is not None
    gq = torch.autograd.grad(lq, step.params, retain_graph=True, allow_unused=True)
    gs = torch.autograd.grad(ls, step.params, allow_unused=True)
    names = step.names
    ctx = names.index("prompt_learner.ctx")
    assert gs[ctx] is None  # the text context gets no gradient from L_s: it keeps g_q
    expected = {}
    changed = 0
    for n, p, a, b in zip(names, step.params, gq, gs, strict=True):
        assert a is not None, n
        g = quality_aware_gradient(a, b, lam)
        changed += int(not torch.equal(g, a))
        expected[n] = p.detach() - lr * (g + wd * p.detach())
    assert changed >= 3  # the rule really acted on several tensors
    assert changed < len(names)  # and left others alone

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lq, ls, _ = step.losses(ShotBatch(y, model.encode_image(x), teacher(x)))  # same, no dropout
    opt = torch.optim.SGD(step.params, lr=lr, weight_decay=wd, momentum=0.0)
    stats = step.step(opt, lq, ls)
    assert stats.projected == changed
    after = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(after[n].detach(), expected[n], rtol=0, atol=1e-7)
        assert not torch.equal(after[n].detach(), before[n]), n
    frozen = [n for n in before if n not in expected]
    assert any(n.startswith("visual.") for n in frozen)
    assert "clip.visual.transformer.resblocks.0.attn.in_proj_weight" in frozen
    for n in frozen:
        assert torch.equal(after[n].detach(), before[n]), n
