"""Backbone resolution: names, tags (offline), files, local-dir, random seeds."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

import grmpiqa
from grmpiqa.backbone import load_backbone
from grmpiqa.errors import BackboneError
from grmpiqa.log import GrmpiqaWarning


def test_offline_tag_fails_fast_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(BackboneError, match="pretrained='/path/to/ViT-B-16.pt'") as info:
        load_backbone("ViT-B-16-quickgelu", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 30
    # API callers read API arguments; the command line prints its flags
    assert "--pretrained" not in str(info.value)
    assert "--pretrained /path/to/ViT-B-16.pt" in info.value.for_cli()


def test_offline_cli_one_line_error_no_traceback(tmp_path):
    from conftest import make_image

    img = make_image(tmp_path / "a.png")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "grmpiqa", "score", str(img)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("grmpiqa: error")]
    assert len(lines) == 1 and "--pretrained" in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "name,pretrained,match",
    [
        ("no-such-model", None, "unknown backbone"),
        ("test-tiny", "/no/such/file.pt", "neither a checkpoint file nor a pretrained tag"),
        ("local-dir:/no/such/dir", None, "not found"),
    ],
)
def test_bad_backbone_arguments(name, pretrained, match):
    with pytest.raises(BackboneError, match=match):
        load_backbone(name, pretrained)


def test_wrong_architecture_weights_file_is_refused(tmp_path):
    sd = load_backbone("test-tiny", None).clip.state_dict()
    sd["visual.conv1.weight"] = torch.zeros(64, 3, 16, 16)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    with pytest.raises(BackboneError, match="shapes differ"):
        load_backbone("test-tiny", path)


def test_state_dict_variants_load_identically(tmp_path):
    """open_clip .pt, nested 'state_dict' with 'module.' prefix, and .safetensors."""
    from safetensors.torch import save_file

    src = load_backbone("test-tiny", None, seed=7)
    sd = src.clip.state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    torch.save(
        {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
        tmp_path / "nested.pt",
    )
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for f in ("plain.pt", "nested.pt", "w.safetensors"):
        bb = load_backbone("test-tiny", tmp_path / f, seed=0)
        assert bb.pretrained["kind"] == "file"
        got = bb.clip.state_dict()
        assert all(torch.equal(got[k], sd[k]) for k in sd), f


def test_torchscript_archive_loads(tmp_path):
    """An OpenAI-style JIT archive: a ScriptModule whose state dict is the CLIP layout."""
    src = load_backbone("test-tiny", None, seed=2)

    class Holder(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            for name, t in clip.state_dict().items():
                parts = name.split(".")
                mod = self
                for p in parts[:-1]:
                    if not hasattr(mod, p):
                        mod.add_module(p, torch.nn.Module())
                    mod = getattr(mod, p)
                mod.register_buffer(parts[-1], t.clone())
            self.register_buffer("input_resolution", torch.tensor(224))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    path = tmp_path / "jit.pt"
    torch.jit.script(Holder(src.clip)).save(str(path))
    bb = load_backbone("test-tiny", path)
    sd = src.clip.state_dict()
    got = bb.clip.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_quickgelu_mismatch_is_warned(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(GrmpiqaWarning, match="quick_gelu"), pytest.raises(BackboneError):
        load_backbone("ViT-B-16", "openai", cache_dir=str(tmp_path))


@pytest.mark.slow
def test_full_size_vit_b16_openai_layout_and_local_dir_score_identically(tmp_path):
    """Full ViT-B-16-quickgelu random weights, saved as an OpenAI-layout state dict and as
    an open_clip local-dir, load through the public API and give identical scores."""
    ref = load_backbone("ViT-B-16-quickgelu", None, seed=11)
    sd = ref.clip.state_dict()
    torch.save(sd, tmp_path / "ViT-B-16.pt")
    folder = tmp_path / "local"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(folder / "open_clip_model.safetensors")
    )
    cfg = {"model_cfg": grmpiqa.backbone.model_config("ViT-B-16-quickgelu"), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    del ref, sd
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    a = grmpiqa.create_model("ViT-B-16-quickgelu", pretrained=tmp_path / "ViT-B-16.pt", seed=0)
    sa = a.score(x)
    del a
    b = grmpiqa.create_model(f"local-dir:{folder}", seed=0)
    sb = b.score(x)
    assert b.backbone_pretrained["kind"] == "local-dir"
    torch.testing.assert_close(sa, sb, rtol=0, atol=0)
    assert ((sa > 0) & (sa < 1)).all()
