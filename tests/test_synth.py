"""KADID-style distortion synthesis: monotonic severity, determinism, layout, bad input."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grmpiqa.data import load_dataset
from grmpiqa.data import synth as S
from grmpiqa.errors import GrmpiqaError, ImageError


def _shared_data() -> Path:
    env = os.environ.get("GRMPIQA_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


KODAK = _shared_data() / "pristine" / "kodak"


def _photo(seed: int, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """A smooth synthetic 'photo': gradients, a disk, mild texture."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    disk = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (h / 4) ** 2).astype(np.float32)
    base = np.stack([xx / w, yy / h, 0.5 + 0.3 * disk], axis=-1) * 200 + 20
    base += rng.normal(0, 6, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture
def pristine(tmp_path: Path) -> Path:
    d = tmp_path / "pristine"
    d.mkdir()
    for i in range(2):
        Image.fromarray(_photo(i)).save(d / f"p{i}.png")
    (d / "readme.txt").write_text("not an image")
    return d


def test_registry_matches_kadid_order() -> None:
    from grmpiqa.data import distortions as D

    assert len(S.TYPE_NAMES) == 25 and tuple(S.DISTORTIONS) == S.TYPE_NAMES
    records = D.list_distortions()
    assert [d.id for d in records] == list(range(1, 26))  # KADID's order, from the decorators
    assert all(len(d.params) == 5 and d.unit and d.what for d in records)
    assert S.PARAMS["jpeg"] == (43, 36, 24, 7, 4) and D.DISTORTIONS["jpeg"].unit == "quality"
    assert D.DISTORTIONS["lens_blur"].param(2, levels=3) == 3.0  # the middle anchor
    with pytest.raises(ValueError, match="registered twice"):
        D.register_distortion(10, "jpeg_again", params=(1, 2, 3, 4, 5), unit="u", what="w")(
            lambda img, p, rng: img
        )
    assert S.TYPE_IDS["gaussian_blur"] == 1 and S.TYPE_IDS["jpeg"] == 10
    assert S.TYPE_IDS["denoise"] == 15 and S.TYPE_IDS["contrast_change"] == 25
    assert S.resolve_types(["10", "gaussian-blur,25"]) == [
        "gaussian_blur",
        "jpeg",
        "contrast_change",
    ]
    with pytest.raises(GrmpiqaError, match="unknown distortion type 'blurry'"):
        S.resolve_types(["blurry"])


@pytest.mark.parametrize("name", S.TYPE_NAMES)
def test_each_distortion_shape_dtype_determinism(name: str) -> None:
    img = _photo(3)
    a = S.apply_distortion(img, name, 3, seed=5, ref=2)
    b = S.apply_distortion(img, name, 3, seed=5, ref=2)
    assert a.shape == img.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, img)


@pytest.mark.skipif(not KODAK.is_dir(), reason="../shared/data/pristine/kodak absent")
def test_psnr_strictly_decreasing_on_kodak() -> None:
    """Severity is monotonic: mean PSNR over 6 Kodak images (256 px wide) falls per level."""
    files = sorted(KODAK.glob("*.png"))[:6]
    assert files, "no Kodak images"
    imgs = []
    for f in files:
        with Image.open(f) as im:
            w, h = im.size
            imgs.append(np.asarray(im.convert("RGB").resize((256, round(256 * h / w)))))
    failures = []
    for name in S.TYPE_NAMES:
        psnrs = [
            [S.psnr(a, S.apply_distortion(a, name, lv, ref=i)) for i, a in enumerate(imgs)]
            for lv in range(1, 6)
        ]
        mean = np.mean(psnrs, axis=1)
        if not np.all(np.diff(mean) < 0):
            failures.append(f"{name}: {np.round(mean, 2).tolist()}")
    assert not failures, failures


def test_synthesize_layout_and_kadid_adapter(pristine: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out).mkdir()
    (out / "dmos.csv").write_text("stale")  # of an earlier synth run (its synth.json beside)
    (out / "synth.json").write_text("{}")
    res = S.synthesize(pristine, out, types=["jpeg", "white_noise"], levels=5, progress=False)
    assert res.references == 2 and res.images == 20 and res.spec == f"kadid:{out}"
    lines = (out / "dmos.csv").read_text().splitlines()
    assert lines[0] == "dist_img,ref_img,dmos,var"
    assert lines[1] == "I01_10_01.png,I01.png,4.2,"
    assert (out / "images" / "I02.png").is_file() and (out / "synth.json").is_file()
    ds = load_dataset(res.spec)
    assert len(ds) == 20 and set(ds.groups()) == {"10", "11"}
    by_level = {it.dist_level: it.label for it in ds}
    assert by_level == {lv: pytest.approx((4 - 4 * lv / 5) / 4) for lv in range(1, 6)}
    assert [it.mos for it in ds if it.dist_level == 5] == [1.0] * 4
    ref = np.asarray(Image.open(out / "images" / "I01.png"))
    np.testing.assert_array_equal(ref, np.asarray(Image.open(pristine / "p0.png")))
    dist = np.asarray(Image.open(out / "images" / "I01_11_03.png"))
    np.testing.assert_array_equal(dist, S.apply_distortion(ref, "white_noise", 3, ref=1))


def test_synthesize_independent_of_workers(pristine: Path, tmp_path: Path) -> None:
    a = S.synthesize(pristine, tmp_path / "a", seed=3, workers=1, progress=False)
    b = S.synthesize(pristine, tmp_path / "b", seed=3, workers=2, progress=False)
    assert a.images == b.images == 2 * 25 * 5
    names = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b" / "images").iterdir())
    for n in names:
        assert (tmp_path / "a" / "images" / n).read_bytes() == (
            tmp_path / "b" / "images" / n
        ).read_bytes(), n
    assert (tmp_path / "a" / "dmos.csv").read_bytes() == (tmp_path / "b" / "dmos.csv").read_bytes()
    c = S.synthesize(pristine, tmp_path / "c", types=["white_noise"], seed=4, progress=False)
    assert c.images == 10
    assert (tmp_path / "c" / "images" / "I01_11_01.png").read_bytes() != (
        tmp_path / "a" / "images" / "I01_11_01.png"
    ).read_bytes()


def test_other_level_counts(pristine: Path, tmp_path: Path) -> None:
    S.synthesize(pristine, tmp_path / "o", types=["gaussian_blur"], levels=3, progress=False)
    ds = load_dataset(f"kadid:{tmp_path / 'o'}")
    assert sorted({it.dist_level for it in ds}) == [1, 2, 3]
    assert sorted({it.mos for it in ds}) == pytest.approx([1.0, 5 - 8 / 3, 5 - 4 / 3])


def test_interrupted_run_keeps_the_earlier_output(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    S.synthesize(pristine, out, types=["jpeg"], progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "notes.txt").write_text("mine")

    def boom(img: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
        raise RuntimeError("crash")

    monkeypatch.setitem(S.DISTORTIONS, "pixelate", replace(S.DISTORTIONS["pixelate"], impl=boom))
    with pytest.raises(RuntimeError):
        S.synthesize(pristine, out, types=["jpeg", "pixelate"], progress=False)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after.pop(Path("notes.txt")) == b"mine"
    assert after == before  # the earlier, complete output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pristine"]  # no staging left


def test_failed_run_writes_nothing(
    pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(img: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
        raise RuntimeError("crash")

    monkeypatch.setitem(S.DISTORTIONS, "jpeg", replace(S.DISTORTIONS["jpeg"], impl=boom))
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError):
        S.synthesize(pristine, out, types=["white_noise", "jpeg"], progress=False)
    assert not (tmp_path / "new").exists()  # neither OUT nor the parents it created


def test_rerun_replaces_only_what_synth_wrote(pristine: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    S.synthesize(pristine, out, types=["jpeg", "pixelate"], levels=2, progress=False)
    (out / "notes.txt").write_text("mine")
    (out / ".out.synth-dead").mkdir()  # no marker: not ours, kept
    killed = tmp_path / ".out.synth-0badcafe"  # a staging folder a killed run left
    killed.mkdir()
    (killed / ".grmpiqa-synth-staging").touch()
    (killed / "images").mkdir()
    res = S.synthesize(pristine, out, types=["jpeg"], levels=2, progress=False)
    assert res.images == 4
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "I01.png", "I01_10_01.png", "I01_10_02.png", "I02.png", "I02_10_01.png", "I02_10_02.png"
    ]  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine" and (out / ".out.synth-dead").is_dir()
    assert not killed.exists()
    assert len(load_dataset(res.spec)) == 4


def test_refuses_an_images_folder_it_did_not_write(pristine: Path, tmp_path: Path) -> None:
    out = tmp_path / "photos"
    (out / "images").mkdir(parents=True)
    (out / "images" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(GrmpiqaError, match="did not write"):
        S.synthesize(pristine, out, types=["jpeg"], progress=False)
    assert (out / "images" / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["images"]


def test_bad_input(pristine: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GrmpiqaError, match="no image files"):
        S.synthesize(empty, tmp_path / "o", progress=False)
    with pytest.raises(GrmpiqaError, match="pristine folder not found"):
        S.synthesize(tmp_path / "missing", tmp_path / "o", progress=False)
    (pristine / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ImageError, match="broken.jpg"):
        S.synthesize(pristine, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # issue 10.21: no half-written OUT/images/
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "pristine"]  # no staging
    (pristine / "broken.jpg").unlink()
    existing = tmp_path / "kept"
    S.synthesize(pristine, existing, types=["jpeg"], levels=1, progress=False, workers=0)
    before = sorted(p.name for p in (existing / "images").iterdir())
    Image.fromarray(_photo(7, (8, 8))).save(pristine / "tiny.png")
    with pytest.raises(ImageError, match="too small"):
        S.synthesize(pristine, existing, types=["jpeg"], levels=1, progress=False)
    assert sorted(p.name for p in (existing / "images").iterdir()) == before
    for bad in ({"levels": 0}, {"seed": -1}, {"workers": -1}, {"compress_level": 10}):
        with pytest.raises(GrmpiqaError):
            S.synthesize(pristine, tmp_path / "x", progress=False, **bad)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def test_cli(pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import grmpiqa.cli as cli

    monkeypatch.setattr(cli, "COMMANDS", ("synth",))
    out = tmp_path / "cli_out"
    rc = cli.main(
        ["synth", "--pristine", str(pristine), "--out", str(out), "--types", "1,10", "24",
         "--levels", "2", "--seed", "1", "--workers", "1", "--quiet"]
    )  # fmt: skip
    assert rc == 0
    assert "wrote 12 distorted images of 2 references" in capsys.readouterr().out
    assert len(load_dataset(f"kadid:{out}")) == 12
    defaults = cli.build_parser().parse_args(["synth", "--pristine", "a", "--out", "b"])
    d = S.SynthConfig()
    assert (defaults.types, defaults.levels, defaults.seed) == (d.types, d.levels, d.seed)
    assert (defaults.workers, defaults.compress_level) == (d.workers, d.compress_level)
    rc = cli.main(["synth", "--pristine", str(pristine), "--out", str(out), "--types", "nope"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "unknown distortion type 'nope'" in err
    (pristine / "broken.png").write_bytes(b"garbage")
    rc = cli.main(["synth", "--pristine", str(pristine), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "broken.png" in err


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (40, 64, 3)])
def test_png_encoder_roundtrip(shape: tuple[int, int, int], tmp_path: Path) -> None:
    a = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    f = tmp_path / "x.png"
    f.write_bytes(S.encode_png(a, 1))
    with Image.open(f) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), a)
