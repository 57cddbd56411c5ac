"""Fuzz-style: generated malformed images and checkpoints through the command line.

Each case must give a one-line error (no traceback), a non-zero exit and leave nothing
half-written at the output path (issue 10). Label files and dataset layouts have their
own fuzz test (tests/test_data_fuzz.py).
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
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


# -- issue 18: no external program on input files; bounded reads; resumes; refusals -----------

_PS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"
_EPS_DOS = b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIII", 32, len(_PS), 0, 0, 0, 0) + bytes(6) + _PS


def _tar(path: Path, members: dict[str, bytes], sizes: dict[str, int] | None = None) -> Path:
    """A tar shard; ``sizes`` makes a member's header declare another size than it holds."""
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    if sizes:
        raw = bytearray(path.read_bytes())
        for name, size in sizes.items():
            at = raw.index(name.encode())  # the member's header starts with its name
            field = f"{size:011o}".encode() + b"\0" if size < 8**11 else _base256(size)
            raw[at + 124 : at + 136] = field
            raw[at + 148 : at + 156] = b" " * 8
            raw[at + 148 : at + 156] = f"{sum(raw[at : at + 512]):06o}\0 ".encode()
        path.write_bytes(bytes(raw))
    return path


def _base256(n: int) -> bytes:
    return bytes([0x80]) + n.to_bytes(11, "big")


def test_S61_T18_postscript_files_and_tar_members_never_run_ghostscript(tmp_path, capsys):
    """``grmpiqa score`` (a real process) with a ``gs`` first on PATH that records being
    run: PostScript named .jpg, a DOS EPS named .png and a tar member ps.jpg are refused
    as content outside the allowlist; gs never runs."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ps.jpg").write_bytes(_PS)
    (folder / "eps.png").write_bytes(_EPS_DOS)
    make_image(folder / "good.png")
    shard = _tar(tmp_path / "shard.tar", {"ps.jpg": _PS, "ok.png": _png_bytes()})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs-was-run"
    (bin_dir / "gs").write_text(f'#!/bin/sh\necho "$@" >> {marker}\nexit 0\n')
    (bin_dir / "gs").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "scores.csv"
    cmd = [sys.executable, "-m", "grmpiqa", "score", str(folder), str(shard), "--skip-bad"]
    r = subprocess.run([*cmd, "-o", str(out), *TINY], capture_output=True, text=True, env=env,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not marker.exists(), marker.read_text()
    rows = {
        ln.split(",")[0].rsplit("/", 1)[-1] + ln.split(",")[1]: ln
        for ln in out.read_text().splitlines()[1:]
    }
    errors = [ln for ln in rows.values() if "PostScript" in ln or "EPS" in ln]
    assert len(errors) == 3, out.read_text()
    # without --skip-bad, in this process: one line, and still no gs
    from PIL import EpsImagePlugin

    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", env["PATH"])
    mp.setattr(EpsImagePlugin, "gs_binary", None)
    try:
        rc = main(["score", str(folder), "-o", str(tmp_path / "x.csv"), "--workers", "0", *TINY])
    finally:
        mp.undo()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("grmpiqa: error:")]
    assert rc == 1 and not marker.exists()
    assert len(lines) == 1 and "not an image file in an accepted format" in lines[0]


def test_T17_tar_member_declaring_20_GB_is_refused_before_it_is_read(tmp_path, capsys):
    shard = _tar(
        tmp_path / "s.tar",
        {"a.png": _png_bytes(), "huge.jpg": _jpeg_bytes(), "b.png": _png_bytes()},
        sizes={"huge.jpg": 20 * 10**9},
    )
    out = tmp_path / "scores.csv"
    rc = main(["score", str(shard), "--skip-bad", "-o", str(out), "--workers", "0", *TINY])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err and "MemoryError" not in err
    text = out.read_text()
    assert "huge.jpg" in text and "larger than any image within the pixel limit" in text
    assert "20000000000 bytes" in text


def test_T07_resume_with_a_changed_input_set_refuses_and_keeps_the_folder(tmp_path, capsys):
    """Resuming with 2 of the 4 shards (parts 2-3 would stay beside the new ones), or with
    a stray part file in the folder: one line, the folder untouched. More inputs than
    before are a resume that scores the new parts."""
    from shard_utils import make_shards

    shards = make_shards(tmp_path / "shards", n_shards=5, per_shard=2)
    out = tmp_path / "out"
    assert main(["score", *map(str, shards[:4]), "--out-dir", str(out), *TINY]) == 0
    capsys.readouterr()
    stray = tmp_path / "stray"
    for subset, plant in ((shards[:2], False), (shards[:4], True)):
        if plant:
            (out / "part-00099.csv").write_text("path,score,error\nx.png,0.5,\n")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        rc = main(["score", *map(str, subset), "--out-dir", str(out), "--resume", *TINY])
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("grmpiqa: error:")]
        assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err
        assert "cannot resume, the inputs differ from the earlier run" in errors[0]
        assert ("part-00002 was planned before" if not plant else "part-00099.csv") in errors[0]
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "part-00099.csv").rename(stray)
    assert main(["score", *map(str, shards), "--out-dir", str(out), "--resume", *TINY]) == 0
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-{i:05d}.csv" for i in range(5)]


@pytest.mark.parametrize(
    ("case", "flags", "must"),
    [
        ("RY4-actors-0", ["--actors", "0"], "--actors must be at least 1"),
        ("RY5-nothing-listening", ["--ray-address", "127.0.0.1:{port}"], "no Ray cluster"),
    ],
)
def test_RY4_RY5_ray_refusals_come_before_anything_is_written(tmp_path, capsys, case, flags, must):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f.format(port=port) for f in flags]
    out = tmp_path / "out"
    img = make_image(tmp_path / "a.png")
    t0 = time.monotonic()
    rc = main(["score", str(img), "--engine", "ray", *flags, "--out-dir", str(out), *TINY])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("grmpiqa: error:")]
    assert rc == 1 and len(errors) == 1 and must in errors[0], err
    assert not out.exists()
    assert time.monotonic() - t0 < 60  # the connection attempt is bounded (10 s)


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder this process cannot create files in (a read-only folder, or /sys as root)."""
    from grmpiqa.utils import write_problem

    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    if write_problem(ro, folder=True) is None:  # root ignores the mode bits
        ro = Path("/sys")
        if not ro.is_dir() or write_problem(ro, folder=True) is None:
            pytest.skip("no folder this process cannot write to")
    yield ro
    (tmp_path / "read-only").chmod(0o755)


def _labels(d: Path, n: int = 6) -> Path:
    rows = ["path,mos"]
    for i in range(n):
        make_image(d / f"{i}.png", size=(32, 30), seed=i)
        rows.append(f"{i}.png,{i}")
    (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return d / "labels.csv"


@pytest.mark.parametrize("command", ["O15-finetune", "O16-explain", "O18-pretrain", "O19-evaluate"])
def test_O15_O19_unwritable_outputs_are_refused_before_any_work(
    tmp_path, capsys, unwritable, command, monkeypatch
):
    import grmpiqa.factory as factory  # the command line imports it when it builds a model

    built: list[str] = []
    real = factory.create_model
    monkeypatch.setattr(
        factory, "create_model", lambda *a, **k: built.append("model") or real(*a, **k)
    )
    labels = _labels(tmp_path / "data")
    target = unwritable / "grmpiqa-out"
    argv = {
        "O15-finetune": ["finetune", "--data", f"csv:{labels}", "--shots", "4", "--out",
                         str(target / "ft.safetensors"), "--max-epochs", "1", "--no-progress"],
        "O16-explain": ["explain", str(tmp_path / "data" / "0.png"), "--out", str(target)],
        "O18-pretrain": ["pretrain", "--tasks", f"csv:{labels}", "--out",
                         str(target / "p.safetensors"), "--epochs", "1", "--no-progress"],
        "O19-evaluate": ["evaluate", "--data", f"csv:{labels}", "--report", str(target),
                         "--method", "clipiqa", "--splits", "1", "--shots", "2", "--no-progress"],
    }[command]  # fmt: skip
    rc = main([*argv, "--backbone", "test-tiny", "--pretrained", "random"])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("grmpiqa: error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "cannot write in" in errors[0] and str(target) in errors[0]
    assert built == []  # refused before any model was built


def test_R09j_unknown_monitor_is_refused_before_training(tmp_path, capsys):
    labels = _labels(tmp_path / "data")
    out = tmp_path / "ft.safetensors"
    rc = main(["finetune", "--data", f"csv:{labels}", "--shots", "4", "--out", str(out),
               "--monitor", "bogus", "--max-epochs", "1", *TINY])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and err.count("grmpiqa: error:") == 1 and "'bogus' is not an evaluation" in err
    assert not list(tmp_path.glob("ft*"))
    rc = main(["finetune", "--data", f"csv:{labels}", "--shots", "4", "--out", str(out),
               "--monitor", "val_srcc", "--max-epochs", "1", *TINY])  # fmt: skip
    assert rc == 1 and "(needs --val)" in capsys.readouterr().err


def test_P039_P040_other_families_score_or_refuse_in_one_line(tmp_path, capsys):
    """``--backbone RN50`` ended in an AttributeError traceback; it now scores through its
    backbone adapter (issue 22), and a family that cannot be built here is one line."""
    from grmpiqa.backbones import resolve_name

    img = make_image(tmp_path / "a.png")
    rc = main(["score", str(img), "--backbone", "RN50", "--pretrained", "random", "--workers",
               "0", "-o", str(tmp_path / "rn50.csv"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err, err
    assert float((tmp_path / "rn50.csv").read_text().splitlines()[1].split(",")[1]) > 0
    name = "mt5-base-ViT-B-32"  # its Hugging Face text config is not cached here
    if resolve_name(name).refusal is None:
        pytest.skip(f"{name} can be built on this machine")
    out = tmp_path / "s.csv"
    rc = main(["score", str(img), "--backbone", name, "--pretrained", "random", "-o", str(out)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("grmpiqa: error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert name in errors[0] and not out.exists()


def test_RS1_corrupt_resume_states_are_one_line(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    labels = _labels(tmp_path / "data")
    out = tmp_path / "ft.safetensors"
    argv = ["finetune", "--data", f"csv:{labels}", "--shots", "4", "--out", str(out),
            "--eval-every", "1", *TINY]  # fmt: skip
    assert main([*argv, "--max-epochs", "1"]) == 0
    state = out.with_suffix(".state.safetensors")
    with safe_open(str(state), "pt") as fh:
        record = json.loads(fh.metadata()["grmpiqa-run"])
    tensors = load_file(str(state))
    good = json.dumps(record)
    cases = {
        "epoch-NaN": (json.dumps({**record, "epoch": "NaN"}), 'epoch is "NaN", not an integer'),
        "json-100k-deep": (good[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
                           "nested 100001 levels deep"),
        "history-not-a-list": (json.dumps({**record, "history": 3}), "history is 3, not a list"),
    }  # fmt: skip
    capsys.readouterr()
    for name, (raw, must) in cases.items():
        save_file(tensors, str(state), metadata={"grmpiqa-run": raw})
        rc = main([*argv, "--max-epochs", "3", "--resume"])
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("grmpiqa: error:")]
        assert rc == 1 and len(errors) == 1 and "Traceback" not in err, (name, err)
        assert "corrupt resume state" in errors[0] and must in errors[0], (name, errors)


@pytest.mark.parametrize(
    ("kind", "must"),
    [("int64", "holds int64 values"), ("list", "holds list<"), ("binary", "holds binary values")],
)
def test_Q02_Q04_Q06_parquet_path_column_of_another_type_is_named(tmp_path, capsys, kind, must):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    values = {"int64": [1, 2], "list": [["a.png"], ["b.png"]], "binary": [b"a.png", b"b.png"]}
    table = pa.table({"path": values[kind]})
    pq.write_table(table, tmp_path / "t.parquet")
    rc = main(["score", str(tmp_path / "t.parquet"), "-o", str(tmp_path / "s.csv"), *TINY])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("grmpiqa: error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err
    assert "column 'path'" in errors[0] and must in errors[0] and "no path in" not in errors[0]


def _rank_process(rank: int, port: int, folder: str, labels: str) -> None:
    """One torchrun-like rank running ``grmpiqa finetune``; rank 1 dies (os._exit) in its
    second collective, as a killed peer does."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GRMPIQA_DIST_TIMEOUT="60",
    )  # fmt: skip
    torch.set_num_threads(1)
    from grmpiqa import distributed

    if rank == 1:
        real = distributed.Context.all_reduce_
        calls = []

        def dying(self, t):
            calls.append(1)
            if len(calls) == 2:
                os._exit(9)
            return real(self, t)

        distributed.Context.all_reduce_ = dying  # type: ignore[method-assign]
    err = open(f"{folder}/rank{rank}.err", "w")  # noqa: SIM115 - closed before _exit
    sys.stderr = err
    try:
        rc = main(["finetune", "--data", f"csv:{labels}", "--shots", "6", "--out",
                   f"{folder}/ft.safetensors", "--max-epochs", "20", "--eval-every", "10",
                   "--no-cache", *TINY])  # fmt: skip
    except BaseException:  # noqa: BLE001 - a traceback is what the test looks for
        import traceback

        traceback.print_exc(file=err)
        rc = 99
    err.close()
    os._exit(rc)


def test_DK1_a_dead_peer_rank_is_one_line_on_the_survivor(tmp_path):
    import torch.multiprocessing as mp

    labels = _labels(tmp_path / "data", n=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(
        _rank_process, args=(port, str(tmp_path), str(labels)), nprocs=2, join=False,
        start_method="spawn",
    )  # fmt: skip
    for p in ctx.processes:
        p.join(240)
    codes = [p.exitcode for p in ctx.processes]
    err = (tmp_path / "rank0.err").read_text()
    assert codes == [1, 9], (codes, err[-3000:])
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and errors[0].startswith("grmpiqa[rank 0]: error: another rank")
    assert not (tmp_path / "ft.safetensors").exists()
