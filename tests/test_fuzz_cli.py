"""Fuzz-style: generated malformed images and checkpoints through the command line.

Each case must give a one-line error (no traceback), a non-zero exit and leave nothing
half-written at the output path (issue 10). Label files and dataset layouts have their
own fuzz test (tests/test_data_fuzz.py).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image
from safetensors.torch import save_file

import grmpiqa
from grmpiqa.checkpoint import read_checkpoint
from grmpiqa.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--backbone", "test-tiny", "--pretrained", "random", "--no-progress"]


def _png_bytes(size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_with_size(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    )


def _bad_images() -> dict[str, tuple[str, bytes]]:
    png, jpg = _png_bytes(), _jpeg_bytes()
    rng = np.random.default_rng(1)
    cases = {
        "empty.png": ("png", b""),
        "empty.jpg": ("jpg", b""),
        "text.jpg": ("jpg", b"hello, I am not an image\n"),
        "random.png": ("png", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        "random.jpg": ("jpg", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        "random.bmp": ("bmp", b"BM" + rng.integers(0, 256, 200, dtype=np.uint8).tobytes()),
        "random.tif": ("tif", b"II*\x00" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes()),
        "random.webp": ("webp", b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(40)),
        "random.gif": ("gif", b"GIF89a" + bytes(20)),
        "magic_only.png": ("png", png[:8]),
        "header_only.png": ("png", png[:33]),
        "truncated_half.png": ("png", png[: len(png) // 2]),
        "truncated_idat.png": ("png", png[:-25]),
        "jpeg_soi_only.jpg": ("jpg", b"\xff\xd8"),
        "jpeg_header_only.jpg": ("jpg", jpg[:120]),
        "jpeg_zeroed_body.jpg": ("jpg", jpg[:200] + bytes(len(jpg) - 200)),
        "bomb_header.png": ("png", _png_with_size(200_000, 200_000)),
        "zero_size.png": ("png", _png_with_size(0, 0)),
        "pdf.png": ("png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"),
        "zip.jpg": ("jpg", b"PK\x03\x04" + bytes(30)),
        "html.png": ("png", b"<html><body>404</body></html>"),
        "nul.jpeg": ("jpeg", bytes(1000)),
    }
    return cases


BAD_IMAGES = _bad_images()


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_malformed_image_is_one_line_and_writes_nothing(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_bytes(BAD_IMAGES[name][1])
    good = make_image(tmp_path / "good.png")
    out = tmp_path / "scores.csv"
    rc = main(["score", str(good), str(path), "-o", str(out), "--workers", "0", *TINY])
    err = capsys.readouterr().err
    assert rc != 0, name
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and name in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scores.csv")]


def _checkpoint_cases(good: Path, tmp: Path) -> dict[str, Callable[[Path], None]]:
    tensors, meta = read_checkpoint(good)
    raw = good.read_bytes()

    def with_meta(m: object) -> Callable[[Path], None]:
        return lambda p: save_file(tensors, str(p), metadata={"grmpiqa": json.dumps(m)})

    def with_tensors(t: dict[str, torch.Tensor], m: object = meta) -> Callable[[Path], None]:
        return lambda p: save_file(t, str(p), metadata={"grmpiqa": json.dumps(m)})

    def patched(**kw: object) -> dict:
        m = json.loads(json.dumps(meta))
        for k, v in kw.items():
            m[k] = v
        return m

    def bytes_(b: bytes) -> Callable[[Path], None]:
        return lambda p: p.write_bytes(b)

    nan = dict(tensors)
    nan["prompt_learner.ctx"] = torch.full_like(tensors["prompt_learner.ctx"], float("nan"))
    wrong_shape = dict(tensors)
    wrong_shape["prompt_learner.ctx"] = torch.zeros(3, 7)
    unknown = dict(tensors)
    unknown["not.a.tensor"] = torch.zeros(2)
    ints = dict(tensors)
    ints["prompt_learner.ctx"] = torch.zeros_like(tensors["prompt_learner.ctx"]).long()
    return {
        "empty": bytes_(b""),
        "text": bytes_(b"not a checkpoint"),
        "truncated_header": bytes_(raw[:20]),
        "truncated_body": bytes_(raw[: len(raw) // 2]),
        "header_length_lies": bytes_(struct.pack("<Q", 10**12) + raw[8:200]),
        "pickle": bytes_(b"\x80\x04\x95" + bytes(40)),
        "no_metadata": lambda p: save_file(tensors, str(p)),
        "metadata_not_json": lambda p: save_file(tensors, str(p), metadata={"grmpiqa": "{oops"}),
        "metadata_array": with_meta([1, 2, 3]),
        "metadata_string": with_meta("grmpiqa"),
        "wrong_format": with_meta(patched(format="something-else/9")),
        "backbone_not_object": with_meta(patched(backbone="test-tiny")),
        "backbone_unknown": with_meta(patched(backbone={"name": "no-such-model"})),
        "model_config_bad_type": with_meta(patched(model_config={"vpt_tokens": "many"})),
        "model_config_negative": with_meta(patched(model_config={"vpt_tokens": -3})),
        "model_config_list": with_meta(patched(model_config=[1])),
        "preprocess_bad_stats": with_meta(patched(preprocess={"stats": "mystery"})),
        "preprocess_crop_too_big": with_meta(patched(preprocess={"resize": 10, "crop": 20})),
        "nan_tensor": with_tensors(nan),
        "wrong_shape": with_tensors(wrong_shape),
        "unknown_tensor": with_tensors(unknown),
        "integer_tensor": with_tensors(ints),
        "architecture_mismatch": with_meta(
            patched(backbone={**meta["backbone"], "model_cfg": {"embed_dim": 9}})
        ),
    }


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    m = grmpiqa.create_model("test-tiny", pretrained=None, config=grmpiqa.ModelConfig(vpt_tokens=4))
    return grmpiqa.save_checkpoint(m, tmp_path_factory.mktemp("ck") / "good.safetensors")


CHECKPOINT_CASES = [
    "empty",
    "text",
    "truncated_header",
    "truncated_body",
    "header_length_lies",
    "pickle",
    "no_metadata",
    "metadata_not_json",
    "metadata_array",
    "metadata_string",
    "wrong_format",
    "backbone_not_object",
    "backbone_unknown",
    "model_config_bad_type",
    "model_config_negative",
    "model_config_list",
    "preprocess_bad_stats",
    "preprocess_crop_too_big",
    "nan_tensor",
    "wrong_shape",
    "unknown_tensor",
    "integer_tensor",
    "architecture_mismatch",
]


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_malformed_checkpoint_is_one_line_and_writes_nothing(
    tmp_path, capsys, good_checkpoint, case
):
    cases = _checkpoint_cases(good_checkpoint, tmp_path)
    assert sorted(cases) == sorted(CHECKPOINT_CASES)
    bad = tmp_path / f"{case}.safetensors"
    cases[case](bad)
    img = make_image(tmp_path / "a.png")
    out = tmp_path / "scores.csv"
    rc = main(["score", str(img), "--checkpoint", str(bad), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0, case
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1, err
    assert not out.exists()


def test_malformed_checkpoint_as_finetune_init_writes_nothing(tmp_path, capsys, good_checkpoint):
    d = tmp_path / "data"
    rows = ["path,mos"]
    for i in range(6):
        make_image(d / f"{i}.png", size=(32, 30), seed=i)
        rows.append(f"{i}.png,{i}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    for case in ("truncated_body", "nan_tensor", "wrong_shape", "model_config_bad_type"):
        bad = tmp_path / f"{case}.safetensors"
        _checkpoint_cases(good_checkpoint, tmp_path)[case](bad)
        out = tmp_path / f"ft_{case}.safetensors"
        argv = ["finetune", "--data", f"csv:{d / 'labels.csv'}", "--shots", "4", "--init"]
        argv += [str(bad), "--out", str(out), "--max-epochs", "1", "--no-progress"]
        assert main(argv) == 1, case
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("grmpiqa: error:")]
        assert "Traceback" not in err and len(errors) == 1, err
        assert not any(p.name.startswith(f"ft_{case}") for p in tmp_path.iterdir())


def test_a_real_process_reports_bad_files_in_one_line(tmp_path, good_checkpoint):
    """The same through a real process (exit status, stderr, no output file)."""
    bad_img = tmp_path / "truncated.png"
    bad_img.write_bytes(_png_bytes()[:40])
    bad_ck = tmp_path / "bad.safetensors"
    _checkpoint_cases(good_checkpoint, tmp_path)["truncated_body"](bad_ck)
    out = tmp_path / "o.csv"
    for argv in (
        ["score", str(bad_img), "-o", str(out), *TINY],
        [
            "score",
            str(make_image(tmp_path / "ok.png")),
            "--checkpoint",
            str(bad_ck),
            "-o",
            str(out),
            "--no-progress",
        ],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "grmpiqa", *argv], capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 1
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("grmpiqa: error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr
        assert not out.exists()


# -- issue 18: checkpoints that name host paths, ask for huge sizes, nest deeply, come from
#    a newer grmpiqa or lack a trained tensor ---------------------------------------------


def _probe_checkpoint(good: Path, case: str, tmp: Path) -> tuple[Path, str]:
    """The checkpoint of one probe and the text its refusal must contain."""
    tensors, meta = read_checkpoint(good)

    def patched(edit: Callable[[dict], None]) -> dict:
        m = json.loads(json.dumps(meta))
        edit(m)
        return m

    path = tmp / f"{case}.safetensors"
    raw: str | None = None
    t = dict(tensors)
    if case == "P022-vpt-tokens-1e9":
        m, must = patched(lambda m: m["model_config"].update(vpt_tokens=10**9)), "vpt_tokens"
    elif case == "P025-resize-crop-1e5":
        m = patched(lambda m: m["preprocess"].update(resize=100_000, crop=100_000))
        must = "resize must be an integer from 1 to 4096"
    elif case == "P030-host-path":
        secret = tmp / "host-secret-weights.pt"
        secret.write_bytes(b"\x80\x04 not weights")
        m = patched(
            lambda m: m["backbone"].update(pretrained={"kind": "file", "path": str(secret)})
        )
        must = "--pretrained FILE"
    elif case == "P030-local-dir-backbone":
        m = patched(lambda m: m["backbone"].update(name=f"local-dir:{tmp}"))
        must = "--backbone local-dir:PATH"
    elif case == "P034-newer-format":
        m, must = patched(lambda m: m.update(format="grmpiqa-checkpoint/99")), "newer than"
    elif case == "P037-json-100k-deep":
        m, must = meta, "nested 100001 levels deep"
        raw = json.dumps(meta)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    elif case == "D8-context-deleted":
        m, must = meta, "the trained tensor prompt_learner.ctx is missing"
        del t["prompt_learner.ctx"]
    elif case == "D8-listed-tensor-deleted":
        m, must = meta, "the trained tensor visual.prompt_proj.bias is missing"
        del t["visual.prompt_proj.bias"]
    elif case == "P020-same-name-other-sizes":
        m = patched(lambda m: m["backbone"]["model_cfg"]["vision_cfg"].update(layers=3))
        must = "recorded architecture of 'test-tiny' differs from this build of it"
        must += " (vision_cfg.layers: saved 3, now 4)"
    else:  # pragma: no cover
        raise AssertionError(case)
    save_file(t, str(path), metadata={"grmpiqa": raw if raw is not None else json.dumps(m)})
    return path, must


PROBE_CHECKPOINTS = [
    "P022-vpt-tokens-1e9",
    "P025-resize-crop-1e5",
    "P030-host-path",
    "P030-local-dir-backbone",
    "P034-newer-format",
    "P037-json-100k-deep",
    "D8-context-deleted",
    "D8-listed-tensor-deleted",
    "P020-same-name-other-sizes",
]


@pytest.mark.parametrize("case", PROBE_CHECKPOINTS)
def test_probe_checkpoints_are_refused_in_one_line(tmp_path, capsys, good_checkpoint, case):
    """Each would have allocated hundreds of GB, opened a host path, recursed, loaded
    silently or contradicted itself before issue 18."""
    bad, must = _probe_checkpoint(good_checkpoint, case, tmp_path)
    _OPENED.clear()
    img = make_image(tmp_path / "a.png")
    out = tmp_path / "scores.csv"
    rc = main(["score", str(img), "--checkpoint", str(bad), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    opened = [p for p in _OPENED if "host-secret" in p or p.endswith("open_clip_config.json")]
    assert rc == 1, case
    errors = [ln for ln in err.splitlines() if ln.startswith("grmpiqa: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert must in errors[0], errors[0]
    assert not out.exists()
    assert opened == []  # no path the checkpoint named was opened


_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], str | bytes):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def test_checkpoints_record_no_host_paths(tmp_path):
    """A weights file is recorded by name and hash; a user-named file stays user-named."""
    from grmpiqa.backbone import load_backbone

    bb = load_backbone("test-tiny", None, seed=3)
    weights = tmp_path / "private" / "my-weights.safetensors"
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in bb.clip.state_dict().items()}, str(weights))
    m = grmpiqa.create_model(
        "test-tiny", pretrained=str(weights), config=grmpiqa.ModelConfig(vpt_tokens=2)
    )
    ck = grmpiqa.save_checkpoint(m, tmp_path / "ck.safetensors")
    _, meta = read_checkpoint(ck)
    assert str(tmp_path) not in json.dumps(meta)
    assert meta["backbone"]["pretrained"]["file"] == "my-weights.safetensors"
    assert meta["tensors"] == sorted(m.adapted_state())
    # loading needs the weights named again; named, it loads and scores as before
    with pytest.raises(grmpiqa.errors.CheckpointError, match="my-weights.safetensors"):
        grmpiqa.create_model(checkpoint=ck)
    again = grmpiqa.create_model(checkpoint=ck, pretrained=str(weights))
    x = torch.rand(1, 3, 224, 224)
    assert torch.allclose(again.score(x), m.score(x), atol=1e-6)
