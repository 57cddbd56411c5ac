"""Checkpoints (round trip, refusal, random-seed identity) and released-file import."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_image
from safetensors.torch import save_file

import grmpiqa
from grmpiqa.checkpoint import _META_KEY, read_checkpoint
from grmpiqa.errors import CheckpointError

TINY = grmpiqa.ModelConfig(vpt_tokens=4)


def _perturbed_model(seed: int = 0) -> grmpiqa.QualityModel:
    m = grmpiqa.create_model("test-tiny", pretrained=None, seed=seed, config=TINY)
    m.set_trainable(grmpiqa.STAGE2_GROUPS)
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for p in m.trainable_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.visual.deep_prompt_embeddings.add_(0.1)
    m.set_trainable(())
    return m


def test_round_trip_restores_scores_and_stores_only_adapted_tensors(tmp_path):
    m = _perturbed_model()
    ckpt = grmpiqa.save_checkpoint(m, tmp_path / "m.safetensors", extra={"note": "x"})
    tensors, meta = read_checkpoint(ckpt)
    assert "prompt_learner.ctx" in tensors and "visual.deep_prompt_embeddings" in tensors
    assert "clip.visual.transformer.resblocks.3.attn.in_proj_weight" in tensors  # fine-tuned
    assert "clip.token_embedding.weight" not in tensors  # frozen base weights are not stored
    assert meta["backbone"]["name"] == "test-tiny"
    assert meta["backbone"]["pretrained"] == {"kind": "random", "seed": 0}
    assert meta["model_config"]["vpt_tokens"] == 4
    assert meta["preprocess"]["resize"] == 244
    assert meta["grmpiqa_version"] == grmpiqa.__version__ and meta["extra"] == {"note": "x"}
    x = torch.rand(3, 3, 224, 224)
    restored = grmpiqa.create_model(checkpoint=ckpt)  # backbone, seed and config from metadata
    torch.testing.assert_close(restored.score(x), m.score(x), rtol=0, atol=0)


def test_random_backbone_checkpoint_scores_the_same_in_another_process(tmp_path):
    m = _perturbed_model(seed=5)
    ckpt = grmpiqa.save_checkpoint(m, tmp_path / "m.safetensors")
    here = m.score(torch.full((1, 3, 224, 224), 0.3)).item()
    code = (
        "import torch, grmpiqa;"
        f"m = grmpiqa.create_model(checkpoint={str(ckpt)!r});"
        "print(repr(m.score(torch.full((1, 3, 224, 224), 0.3)).item()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) == here
    assert "RANDOM weights (seed 5)" in out.stderr


def test_loading_onto_a_different_backbone_is_refused(tmp_path):
    m = _perturbed_model()
    ckpt = grmpiqa.save_checkpoint(m, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="architecture") as info:
        grmpiqa.create_model("ViT-B-32-quickgelu", pretrained=None, checkpoint=ckpt)
    # API callers read the API's argument, the command line its flag
    assert "load it with backbone='test-tiny'" in str(info.value)
    assert "--backbone" not in str(info.value)
    assert info.value.for_cli().endswith("load it with --backbone test-tiny")


def test_local_dir_backbone_is_named_by_the_caller_not_the_checkpoint(tmp_path):
    m = _perturbed_model()
    ckpt = grmpiqa.save_checkpoint(m, tmp_path / "m.safetensors")
    tensors, meta = read_checkpoint(ckpt)
    meta["backbone"]["name"] = f"local-dir:{tmp_path}"
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata={_META_KEY: json.dumps(meta)})
    with pytest.raises(CheckpointError, match="backbone='local-dir:PATH'") as info:
        grmpiqa.create_model(checkpoint=forged)
    assert "--backbone local-dir:PATH" in info.value.for_cli()


def test_conflicting_visual_prompt_flag_is_refused(tmp_path):
    ckpt = grmpiqa.save_checkpoint(_perturbed_model(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="visual_prompts"):
        grmpiqa.create_model(checkpoint=ckpt, visual_prompts=False)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_bad_checkpoint_files_raise_checkpoint_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        grmpiqa.create_model(checkpoint=path)


# -- the authors' released layout (method.md 10) ---------------------------------------


def _released_state_dict(seed: int = 0, logit_scale: float | None = None) -> dict:
    """A state dict shaped like one saved by the authors' code (DataParallel, nested)."""
    base = grmpiqa.create_model("test-tiny", pretrained=None, seed=seed, config=TINY)
    clip_sd = base.clip.state_dict()
    g = torch.Generator().manual_seed(123)
    sd = {}
    for k, v in clip_sd.items():
        if k.startswith("visual."):
            sd["image_encoder." + k[len("visual.") :]] = v.clone()
        elif k.startswith(("transformer.", "ln_final.")) or k in (
            "positional_embedding",
            "text_projection",
        ):
            sd["text_encoder." + k] = v.clone()
    # "fine-tuned" last blocks and ln_post differ from the base weights
    for k in list(sd):
        if ".resblocks.3." in k or k.startswith("image_encoder.ln_post"):
            sd[k] = sd[k] + 0.05 * torch.randn(sd[k].shape, generator=g)
    W = 64
    sd["image_encoder.prompt_embeddings"] = 0.1 * torch.randn(1, 4, W, generator=g)
    sd["image_encoder.deep_prompt_embeddings"] = 0.1 * torch.randn(3, 4, W, generator=g)
    sd["image_encoder.prompt_proj.weight"] = 0.1 * torch.randn(W, W, generator=g)
    sd["image_encoder.prompt_proj.bias"] = 0.1 * torch.randn(W, generator=g)
    sd["image_encoder.prompt_norm.weight"] = 1 + 0.1 * torch.randn(W, generator=g)
    sd["image_encoder.prompt_norm.bias"] = 0.1 * torch.randn(W, generator=g)
    sd["prompt_learner2.ctx"] = 0.02 * torch.randn(4, W, generator=g)
    tokens = base.tokenizer(["X X X X high quality.", "X X X X low quality."])
    emb = base.clip.token_embedding(tokens).detach()
    sd["prompt_learner2.token_prefix"] = emb[:, :1]
    sd["prompt_learner2.token_suffix"] = emb[:, 5:]
    sd["logit_scale"] = clip_sd["logit_scale"].clone()
    if logit_scale is not None:
        sd["logit_scale"] = torch.tensor(logit_scale)
    return {"state_dict": {"module." + k: v for k, v in sd.items()}}


def _ln(x, sd, key, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _block(x, sd, key, heads, mask=None):
    """One CLIP residual block restated from raw tensors (QuickGELU)."""
    h = _ln(x, sd, key + ".ln_1")
    n, length, w = h.shape
    qkv = h @ sd[key + ".attn.in_proj_weight"].T + sd[key + ".attn.in_proj_bias"]
    q, k, v = (t.reshape(n, length, heads, w // heads).transpose(1, 2) for t in qkv.chunk(3, -1))
    att = q @ k.transpose(-1, -2) / (w // heads) ** 0.5
    if mask is not None:
        att = att + mask
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(n, length, w)
    x = x + o @ sd[key + ".attn.out_proj.weight"].T + sd[key + ".attn.out_proj.bias"]
    h = _ln(x, sd, key + ".ln_2") @ sd[key + ".mlp.c_fc.weight"].T + sd[key + ".mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[key + ".mlp.c_proj.weight"].T + sd[key + ".mlp.c_proj.bias"]


def _released_forward(released: dict, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Independent restatement of the authors' eval-mode forward (method.md 3, 4)."""
    sd = {k[len("module.") :]: v for k, v in released["state_dict"].items()}
    ie = {k[len("image_encoder.") :]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    te = {k[len("text_encoder.") :]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    # image: patches, CLS, positions, ln_pre, VPT-deep, prompt_norm, ln_post, proj
    x = F.conv2d(images, ie["conv1.weight"], stride=32).flatten(2).transpose(1, 2)
    cls = ie["class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + ie["positional_embedding"]
    x = _ln(x, ie, "ln_pre")

    def proj(p):
        return (p @ ie["prompt_proj.weight"].T + ie["prompt_proj.bias"]).expand(x.shape[0], -1, -1)

    x = torch.cat([x[:, :1], proj(ie["prompt_embeddings"]), x[:, 1:]], 1)
    for i in range(4):
        if i > 0:
            x = torch.cat([x[:, :1], proj(ie["deep_prompt_embeddings"][i - 1 : i]), x[:, 5:]], 1)
        x = _block(x, ie, f"transformer.resblocks.{i}", heads=2)
    x = _ln(x, ie, "prompt_norm", eps=1e-6)
    v = _ln(x[:, 0], ie, "ln_post") @ ie["proj"]
    # text: [prefix, ctx, suffix] + positions, causal transformer, ln_final, EOT, projection
    ctx = sd["prompt_learner2.ctx"].expand(2, -1, -1)
    t = torch.cat([sd["prompt_learner2.token_prefix"], ctx, sd["prompt_learner2.token_suffix"]], 1)
    t = t + te["positional_embedding"]
    mask = torch.full((77, 77), float("-inf")).triu(1)
    for i in range(4):
        t = _block(t, te, f"transformer.resblocks.{i}", heads=2, mask=mask)
    t = _ln(t, te, "ln_final")
    t = t[torch.arange(2), tokens.argmax(-1)] @ te["text_projection"]
    v, t = F.normalize(v, dim=-1), F.normalize(t, dim=-1)
    return torch.softmax(sd["logit_scale"].exp() * v @ t.T, -1)[:, 0]


@pytest.mark.parametrize("logit_scale", [None, math.log(100.0)])
def test_import_released_scores_exactly_as_their_forward(tmp_path, logit_scale):
    """Also when their logit_scale differs from the base weights' (log 100 over the
    random base's log(1/0.07)): their forward pass uses it, so the import keeps it."""
    released = _released_state_dict(logit_scale=logit_scale)
    src = tmp_path / "released.pt"
    torch.save(released, src)
    out = grmpiqa.import_released(
        src, tmp_path / "imported.safetensors", backbone="test-tiny", pretrained=None
    )
    tensors, meta = read_checkpoint(out)
    assert "prompt_learner.ctx" in tensors and "visual.prompt_norm.weight" in tensors
    assert "clip.visual.transformer.resblocks.3.mlp.c_fc.weight" in tensors  # differs from base
    assert "clip.transformer.resblocks.3.ln_1.weight" in tensors
    assert "clip.visual.transformer.resblocks.0.mlp.c_fc.weight" not in tensors  # equals base
    assert meta["model_config"]["vpt_tokens"] == 4
    model = grmpiqa.create_model(checkpoint=out)
    x = torch.rand(3, 3, 300, 280, generator=torch.Generator().manual_seed(1))
    ours = model.score(x)
    with torch.no_grad():
        theirs = _released_forward(
            released, model.preprocess.preprocess_tensor(x), model.prompt_learner.tokens
        )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)
    assert ("clip.logit_scale" in tensors) == (logit_scale is not None)


def test_import_released_cli_and_bad_file(tmp_path, capsys):
    from grmpiqa.cli import main

    src = tmp_path / "released.pt"
    torch.save(_released_state_dict(), src)
    out = tmp_path / "ck.safetensors"
    rc = main(
        [
            "import-released",
            str(src),
            "--out",
            str(out),
            "--backbone",
            "test-tiny",
            "--pretrained",
            "random",
        ]
    )
    assert rc == 0 and out.is_file()
    assert (
        json.loads(json.dumps(grmpiqa.read_metadata(out)))["extra"]["imported_from"]
        == "released.pt"
    )
    junk = tmp_path / "junk.pt"
    torch.save({"foo": torch.zeros(2)}, junk)
    rc = main(
        [
            "import-released",
            str(junk),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--backbone",
            "test-tiny",
            "--pretrained",
            "random",
        ]
    )
    assert rc == 1 and not (tmp_path / "x.safetensors").exists()
    assert "junk.pt" in capsys.readouterr().err


FIXTURES = Path(__file__).parent / "fixtures"


def test_a_checkpoint_written_by_0_1_0_loads_and_scores_identically():
    """tests/fixtures/v0.1.0-tiny.safetensors was fine-tuned and saved by grmpiqa 0.1.0
    (commit 34da5bd, test-tiny, random seed 5); its scores were recorded then."""
    expected = json.loads((FIXTURES / "v0.1.0-tiny.scores.json").read_text())
    model = grmpiqa.create_model(checkpoint=FIXTURES / "v0.1.0-tiny.safetensors")
    x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(model.score(x), torch.tensor(expected["scores"]), rtol=0, atol=2e-6)
    assert grmpiqa.read_metadata(FIXTURES / "v0.1.0-tiny.safetensors")["grmpiqa_version"] == "0.1.0"


def test_non_finite_tensors_are_never_written_or_loaded(tmp_path):
    m = _perturbed_model()
    with torch.no_grad():
        m.visual.prompt_embeddings[0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        grmpiqa.save_checkpoint(m, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    # a file written by other means is refused when read
    good = grmpiqa.save_checkpoint(_perturbed_model(), tmp_path / "good.safetensors")
    tensors, meta = read_checkpoint(good)
    tensors["prompt_learner.ctx"][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "inf.safetensors"), metadata={"grmpiqa": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="inf.safetensors.*NaN or inf"):
        grmpiqa.create_model(checkpoint=tmp_path / "inf.safetensors")


@pytest.mark.parametrize(
    "change",
    [
        {"model_config": {"vpt_tokens": "many"}},
        {"model_config": {"vpt_dropout": 3}},
        {"preprocess": {"stats": "nonsense"}},
        {"preprocess": {"resize": "big"}},
        {"preprocess": [1, 2]},
        {"backbone": "test-tiny"},
        {"backbone": {"name": "test-tiny", "pretrained": {"kind": "random", "seed": "x"}}},
    ],
)
def test_bad_metadata_values_are_one_line_errors(tmp_path, change, capsys):
    good = grmpiqa.save_checkpoint(_perturbed_model(), tmp_path / "good.safetensors")
    tensors, meta = read_checkpoint(good)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key] = {**meta[key], **value}
        else:
            meta[key] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"grmpiqa": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        grmpiqa.create_model(checkpoint=bad)
    from grmpiqa.cli import main

    image = make_image(tmp_path / "x.png")
    rc = main(["score", str(image), "--checkpoint", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "bad.safetensors" in err


@pytest.mark.parametrize("content", [b"hello world\n", bytes(range(256)) * 8])
def test_import_released_on_a_non_pickle_file_is_one_line(tmp_path, capsys, content):
    from grmpiqa.cli import main

    src = tmp_path / "weird.pt"
    src.write_bytes(content)
    out = tmp_path / "x.safetensors"
    rc = main(["import-released", str(src), "--out", str(out), "--backbone", "test-tiny"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and not out.exists()
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "weird.pt" in lines[0] and "Traceback" not in err


def test_create_model_on_a_missing_device_is_a_grmpiqa_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(grmpiqa.GrmpiqaError, match="CUDA is not available"):
        grmpiqa.create_model("test-tiny", pretrained=None, device="cuda")
    with pytest.raises(grmpiqa.GrmpiqaError, match="device"):
        grmpiqa.create_model("test-tiny", pretrained=None, device="nonsense")
