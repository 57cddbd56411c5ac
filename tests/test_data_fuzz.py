"""Fuzz-style: generated malformed label files and layouts, through the API and the CLI.

Every case must end in one :class:`~grmpiqa.errors.DatasetError` whose message is one
line and names the file at fault (and the row where there is one); through the command
line: exit status 1, a single ``grmpiqa: error: ...`` line on stderr, no traceback and
nothing written where the output would go (issue 10, "Done when").
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from data_layouts import _img, make_agiqa, make_clive, make_kadid, make_koniq, make_tid

from grmpiqa.cli import main
from grmpiqa.data import load_dataset
from grmpiqa.errors import DatasetError, GrmpiqaError

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """``make(tmp) -> (spec, text the message must contain)``."""

    name: str
    make: Callable[[Path], tuple[str, str]]


def _images(d: Path, n: int = 4) -> list[str]:
    return [_img(d / f"{i}.png", seed=i).name for i in range(n)]


def _csv_case(
    body: str | bytes, n_images: int = 4, options: str = ""
) -> Callable[[Path], tuple[str, str]]:
    """A ``csv:`` label file (text or raw bytes) beside images ``0.png``.. and a folder."""

    def make(tmp: Path) -> tuple[str, str]:
        _images(tmp, n_images)
        (tmp / "sub").mkdir()
        f = tmp / "labels.csv"
        if isinstance(body, bytes):
            f.write_bytes(body)
        else:
            f.write_text(body, encoding="utf-8")
        return f"csv:{f}{options}", str(f)

    return make


def _pyiqa_case(body: str) -> Callable[[Path], tuple[str, str]]:
    def make(tmp: Path) -> tuple[str, str]:
        _images(tmp / "imgs")
        f = tmp / "meta.csv"
        f.write_text(body)
        return f"pyiqa:{f}::{tmp / 'imgs'}", str(f)

    return make


def _edit(
    build: Callable[[Path], Path], rel: str, edit: Callable[[str], str], kind: str
) -> Callable[[Path], tuple[str, str]]:
    """Build a valid layout, then edit one of its text files."""

    def make(tmp: Path) -> tuple[str, str]:
        root = build(tmp / "db")
        f = root / rel
        f.write_text(edit(f.read_text()))
        return f"{kind}:{root}", str(f)

    return make


def _replace(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, (old, text)
        return text.replace(old, new, 1)

    return edit


def _clive_mat(which: str, write: Callable[[Path], None]) -> Callable[[Path], tuple[str, str]]:
    def make(tmp: Path) -> tuple[str, str]:
        root = make_clive(tmp / "clive")
        f = root / "Data" / f"{which}.mat"
        write(f)
        return f"clive:{root}", str(f)

    return make


def _spaq_bytes(data: bytes) -> Callable[[Path], tuple[str, str]]:
    def make(tmp: Path) -> tuple[str, str]:
        root = tmp / "SPAQ"
        _images(root / "TestImage", 2)
        f = root / "Annotations" / "MOS and Image attribute scores.xlsx"
        f.parent.mkdir(parents=True)
        f.write_bytes(data)
        return f"spaq:{root}", str(f)

    return make


def _rm(rel: str, kind: str, build: Callable[[Path], Path]) -> Callable[[Path], tuple[str, str]]:
    def make(tmp: Path) -> tuple[str, str]:
        root = build(tmp / "db")
        (root / rel).unlink()
        return f"{kind}:{root}", str(root / rel)

    return make


def _spec_only(spec: Callable[[Path], str], must: str) -> Callable[[Path], tuple[str, str]]:
    return lambda tmp: (spec(tmp), must)


RNG = np.random.default_rng(2024)
GARBAGE = RNG.bytes(3000)
OK = "path,mos\n0.png,1\n1.png,2\n2.png,3\n"

CASES: list[Case] = [
    # --- csv: the file itself
    Case("csv-empty-file", _csv_case("")),
    Case("csv-header-only", _csv_case("path,mos\n")),
    Case("csv-bom-blank-header", _csv_case(b"\xef\xbb\xbf\n0.png,1\n")),
    Case("csv-binary-garbage", _csv_case(GARBAGE)),
    Case("csv-nul-bytes", _csv_case(b"path,mos\n0.png,1\n1.p\x00ng,2\n")),
    Case("csv-missing-mos-column", _csv_case("path,score\n0.png,1\n")),
    Case("csv-missing-path-column", _csv_case("file,mos\n0.png,1\n")),
    Case("csv-mos-column-twice", _csv_case("path,mos,mos\n0.png,1,2\n1.png,2,3\n")),
    Case("csv-truncated-row", _csv_case("path,mos\n0.png,1\n1.png\n")),
    Case("csv-truncated-mid-field", _csv_case('path,mos\n0.png,1\n1.png,"2')),
    Case("csv-unterminated-quote", _csv_case('path,mos\n0.png,1\n"1.png,2\n2.png,3\n')),
    Case("csv-garbage-after-quote", _csv_case('path,mos\n0.png,1\n"1.png"x,2\n')),
    Case("csv-too-many-fields", _csv_case("path,mos\n0.png,1\n1.png,2,3\n")),
    # --- csv: values
    Case("csv-nan-mos", _csv_case("path,mos\n0.png,1\n1.png,nan\n")),
    Case("csv-inf-mos", _csv_case("path,mos\n0.png,1\n1.png,inf\n")),
    Case("csv-minus-inf-mos", _csv_case("path,mos\n0.png,-Infinity\n1.png,2\n")),
    Case("csv-huge-mos", _csv_case("path,mos\n0.png,1\n1.png,1e400\n")),
    Case("csv-non-numeric-mos", _csv_case("path,mos\n0.png,1\n1.png,good\n")),
    Case("csv-empty-mos", _csv_case("path,mos\n0.png,1\n1.png,\n")),
    Case("csv-hex-mos", _csv_case("path,mos\n0.png,1\n1.png,0x10\n")),
    Case("csv-all-mos-equal", _csv_case("path,mos\n0.png,3\n1.png,3\n")),
    Case("csv-mos-outside-range", _csv_case(OK + "3.png,250\n", options="?mos_range=0,100")),
    Case("csv-negative-std", _csv_case("path,mos,std\n0.png,1,0.5\n1.png,2,-1\n")),
    Case("csv-bad-dist-level", _csv_case("path,mos,dist_level\n0.png,1,2\n1.png,2,high\n")),
    Case("csv-fractional-dist-level", _csv_case("path,mos,dist_level\n0.png,1,2.5\n")),
    Case(
        "csv-split-matches-nothing",
        _csv_case("path,mos,split\n0.png,1,train\n1.png,2,train\n", options="?split=test"),
    ),
    # --- csv: paths
    Case("csv-duplicate-rows", _csv_case("path,mos\n0.png,1\n1.png,2\n0.png,1\n")),
    Case("csv-duplicate-spelling", _csv_case("path,mos\n0.png,1\n./0.png,2\n")),
    Case("csv-dotdot-escape", _csv_case("path,mos\n0.png,1\n../../x.bmp,2\n")),
    Case("csv-absolute-path", _csv_case("path,mos\n0.png,1\n/etc/hostname,2\n")),
    Case("csv-empty-path", _csv_case('path,mos\n0.png,1\n"",2\n')),
    Case("csv-control-char-path", _csv_case('path,mos\n0.png,1\n"1\n.png",2\n')),
    Case("csv-very-long-path", _csv_case("path,mos\n0.png,1\n" + "a" * 5000 + ".png,2\n")),
    Case("csv-missing-image", _csv_case("path,mos\n0.png,1\nnone.png,2\n")),
    Case("csv-path-is-the-folder", _csv_case("path,mos\n0.png,1\n./,2\n")),
    Case("csv-path-is-a-folder", _csv_case("path,mos\n0.png,1\nsub,2\n")),
    # --- pyiqa
    Case("pyiqa-no-name-column", _pyiqa_case("file,mos\n0.png,1\n")),
    Case("pyiqa-no-mos-column", _pyiqa_case("img_name,score\n0.png,1\n")),
    Case("pyiqa-row-without-mos", _pyiqa_case("img_name,mos\n0.png,1\n1.png\n")),
    Case("pyiqa-unterminated-quote", _pyiqa_case('img_name,mos\n0.png,1\n"1.png,2\n')),
    Case("pyiqa-escape", _pyiqa_case("img_name,mos\n0.png,1\n../meta.csv,2\n")),
    # --- kadid / koniq / tid2013 / agiqa3k
    Case(
        "kadid-bad-name",
        _edit(make_kadid, "dmos.csv", _replace("I01_05_01.png,", "photo.png,"), "kadid"),
    ),
    Case("kadid-negative-var", _edit(make_kadid, "dmos.csv", _replace(",0.25", ",-0.25"), "kadid")),
    Case(
        "kadid-escape",
        _edit(make_kadid, "dmos.csv", _replace("I01_05_01.png,", "../../I01_05_01.png,"), "kadid"),
    ),
    Case("kadid-no-label-file", _rm("dmos.csv", "kadid", make_kadid)),
    Case(
        "kadid-dmos-out-of-scale",
        _edit(make_kadid, "dmos.csv", _replace(",3.80,", ",7.5,"), "kadid"),
    ),
    Case(
        "koniq-absolute-path",
        _edit(
            make_koniq,
            "koniq10k_scores_and_distributions.csv",
            _replace('"b.jpg"', '"/etc/passwd"'),
            "koniq",
        ),
    ),
    Case(
        "koniq-nan-mos",
        _edit(
            make_koniq,
            "koniq10k_scores_and_distributions.csv",
            _replace(",3.25,", ",NaN,"),
            "koniq",
        ),
    ),
    Case(
        "tid-three-tokens",
        _edit(make_tid, "mos_with_names.txt", _replace("4.1 ", "4.1 x "), "tid2013"),
    ),
    Case(
        "tid-binary",
        _edit(make_tid, "mos_with_names.txt", lambda t: GARBAGE.decode("latin-1"), "tid2013"),
    ),
    Case(
        "agiqa-no-quality-column",
        _edit(make_agiqa, "data.csv", _replace("mos_quality", "quality"), "agiqa3k"),
    ),
    # --- clive .mat files
    Case("clive-empty-mat", _clive_mat("AllMOS_release", lambda f: f.write_bytes(b""))),
    Case("clive-random-mat", _clive_mat("AllImages_release", lambda f: f.write_bytes(GARBAGE))),
    Case(
        "clive-truncated-mat",
        _clive_mat("AllMOS_release", lambda f: f.write_bytes(f.read_bytes()[:150])),
    ),
    Case(
        "clive-wrong-key",
        _clive_mat("AllMOS_release", lambda f: scipy.io.savemat(f, {"mos": np.ones((1, 10))})),
    ),
    Case(
        "clive-count-mismatch",
        _clive_mat(
            "AllMOS_release", lambda f: scipy.io.savemat(f, {"AllMOS_release": np.ones((1, 9))})
        ),
    ),
    Case(
        "clive-numeric-names",
        _clive_mat(
            "AllImages_release",
            lambda f: scipy.io.savemat(f, {"AllImages_release": np.arange(10.0)}),
        ),
    ),
    Case(
        "clive-string-mos",
        _clive_mat(
            "AllMOS_release",
            lambda f: scipy.io.savemat(f, {"AllMOS_release": np.array(["x"] * 10)}),
        ),
    ),
    # --- spaq, folder, specs
    Case("spaq-garbage-xlsx", _spaq_bytes(GARBAGE)),
    Case("spaq-zip-not-xlsx", _spaq_bytes(b"PK\x03\x04" + GARBAGE[:200])),
    Case("folder-without-images", _spec_only(lambda t: f"folder:{t}", "no image files")),
    Case("spec-unknown-kind", _spec_only(lambda t: f"live:{t}", "unknown kind 'live'")),
    Case("spec-nul-in-path", _spec_only(lambda t: f"csv:{t}/a\x00b.csv", "NUL")),
    Case("spec-bad-mos-range", _spec_only(lambda t: f"csv:{t}/x.csv?mos_range=5,1", "mos_range")),
    Case(
        "spec-unknown-option",
        _spec_only(lambda t: f"kadid:{t}?resolution=512x384", "unknown option"),
    ),
]


def test_enough_distinct_cases() -> None:
    assert len(CASES) >= 50 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_api_one_line_error_naming_the_file(tmp_path: Path, case: Case) -> None:
    spec, must = case.make(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_dataset(spec)
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    assert must in msg, (must, msg)
    assert isinstance(err.value, GrmpiqaError)


def test_cli_in_process_every_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """All cases through ``grmpiqa evaluate``, and every fifth through ``finetune``."""
    import grmpiqa.cli as cli

    monkeypatch.setattr(cli, "COMMANDS", ("evaluate", "finetune"))
    for i, case in enumerate(CASES):
        base = tmp_path / f"{i:02d}"
        base.mkdir()
        spec, must = case.make(base)
        out = tmp_path / f"out{i:02d}"
        commands = [
            ["evaluate", "--data", spec, "--report", str(out / "report"), "--method", "clipiqa",
             "--splits", "1", "--shots", "2", "--backbone", "test-tiny", "--pretrained", "random",
             "--no-progress"],
        ]  # fmt: skip
        if i % 5 == 0:
            commands.append(
                ["finetune", "--data", spec, "--shots", "2", "--out", str(out / "ft.safetensors"),
                 "--backbone", "test-tiny", "--pretrained", "random", "--max-epochs", "1",
                 "--no-progress"]
            )  # fmt: skip
        for argv in commands:
            rc = main(argv)
            cap = capsys.readouterr()
            assert rc == 1, (case.name, argv[0], cap)
            lines = cap.err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("grmpiqa: error: "), (case.name, cap.err)
            assert must in lines[0] and "Traceback" not in cap.err, (case.name, cap.err)
            assert cap.out == ""
            assert not out.exists(), (case.name, argv[0])  # nothing written


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env_path = str(REPO / "src")
    return subprocess.run(
        [sys.executable, "-m", "grmpiqa", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )


@pytest.mark.parametrize(
    ("case", "command"),
    [
        ("pyiqa-escape", "finetune"),
        ("clive-random-mat", "evaluate"),
    ],
)
def test_cli_subprocess_no_traceback(tmp_path: Path, case: str, command: str) -> None:
    """A real process: exit 1, one stderr line, no traceback, nothing written."""
    spec, must = next(c for c in CASES if c.name == case).make(tmp_path)
    out = tmp_path / "out"
    if command == "finetune":
        args = ["finetune", "--data", spec, "--shots", "2", "--out", str(out / "x.safetensors"),
                "--max-epochs", "1"]  # fmt: skip
    else:
        args = ["evaluate", "--data", spec, "--report", str(out), "--method", "clipiqa"]
    res = _cli(
        *args, "--backbone", "test-tiny", "--pretrained", "random", "--no-progress", cwd=tmp_path
    )
    assert res.returncode == 1, res
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("grmpiqa: error: "), res.stderr
    assert must in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_D16_synth_never_replaces_a_dmos_csv_it_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``synth --out DIR`` where DIR holds the user's own dmos.csv (no synth.json, no
    images/): refused in one line, the file untouched (issue 18)."""
    pristine = tmp_path / "pristine"
    _images(pristine, 1)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "dmos.csv").write_text("dist_img,ref_img,dmos,var\nmy.png,ref.png,4.2,0.1\n")
    before = (out / "dmos.csv").read_bytes()
    rc = main(["synth", "--pristine", str(pristine), "--out", str(out), "--types", "jpeg",
               "--levels", "2", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and err.count("grmpiqa: error:") == 1 and "Traceback" not in err
    assert "holds a dmos.csv that grmpiqa synth did not write" in err
    assert (out / "dmos.csv").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["dmos.csv"]
