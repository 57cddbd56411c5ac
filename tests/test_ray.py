"""Ray Data engine and grmpiqa.ray.Scorer on a local Ray (127.0.0.1, 2 CPUs), tiny backbone.

Skipped when Ray is not installed (pip install 'grmpiqa[ray]'). Ray starts once for the
module and is shut down at its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# a local Ray listens on the loopback address only (read when ray is imported)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from conftest import TINY_CONFIG, make_image  # noqa: E402
from shard_utils import make_shards  # noqa: E402

import grmpiqa.ray  # noqa: E402
from grmpiqa.cli import main  # noqa: E402
from grmpiqa.scoring import BatchScorer  # noqa: E402
from grmpiqa.scoring.outputs import read_rows  # noqa: E402

# Ray starts slowly on 2 cores: these count as long runs (the fast CI pass skips them)
pytestmark = pytest.mark.slow

TINY = ["--backbone", "test-tiny", "--no-progress"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def local_ray():
    # ray.init installs a SIGTERM handler (sys.exit) in this process: put the previous one
    # back afterwards, or a worker forked by a later test and terminated by its pool runs
    # Ray's handler and goes on running the test session in the child
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        yield ray
    finally:
        ray.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_scorer_in_map_batches_paths_and_bytes(local_ray, tmp_path, tiny_model):
    paths = [make_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    files = [str(paths[0]), str(bad), str(paths[1]), str(paths[2])]
    kwargs = {
        "backbone": "test-tiny",
        "pretrained": "random",
        "model_config": TINY_CONFIG.to_dict(),
    }
    by_path = (
        ray.data.from_items([{"path": p} for p in files])
        .repartition(1)
        .map_batches(grmpiqa.ray.Scorer, fn_constructor_kwargs=kwargs, concurrency=1, batch_size=4)
        .take_all()
    )
    by_bytes = (
        ray.data.from_items([{"name": p, "bytes": Path(p).read_bytes()} for p in files])
        .repartition(1)
        .map_batches(
            grmpiqa.ray.Scorer,
            fn_constructor_kwargs={**kwargs, "name_column": "name"},
            concurrency=1,
            batch_size=4,
        )
        .take_all()
    )
    local = BatchScorer(tiny_model).score_items(files)
    assert local.indices == [0, 2, 3]
    for rows in (by_path, by_bytes):
        assert len(rows) == 4 and "bytes" not in rows[0]
        got = {r.get("path") or r["name"]: r for r in rows}
        assert (
            "bad.jpg" in got[str(bad)]["error"] and got[str(bad)]["score"] != got[str(bad)]["score"]
        )
        for k, i in enumerate(local.indices):
            assert got[files[i]]["error"] is None
            assert got[files[i]]["score"] == pytest.approx(float(local.scores[k, 0]), abs=1e-6)


def test_cli_ray_engine_rows_equal_the_local_engine(local_ray, tmp_path, capsys):
    make_shards(tmp_path / "shards", n_shards=3, per_shard=3, bad={2: 0})
    pattern = str(tmp_path / "shards" / "shard-{0000..0002}.tar")
    common = [pattern, *TINY, "--skip-bad", "--batch-size", "2"]
    assert main(["score", *common, "--out-dir", str(tmp_path / "local"), "--workers", "0"]) == 0
    assert main(["score", *common, "--out-dir", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    assert ray.is_initialized()  # the CLI does not stop a Ray it did not start
    capsys.readouterr()
    for i in range(3):
        name = f"part-{i:05d}.csv"
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    rows = read_rows(tmp_path / "ray" / "part-00002.csv", "csv")
    assert rows[0]["key"] == "s00006" and rows[0]["score"] is None and "s00006" in rows[0]["error"]
    assert all(r["score"] is not None for r in rows[1:])


def test_killed_ray_run_resumes_to_the_local_rows(local_ray, tmp_path, capsys):
    """The issue's command, killed mid-run, then --resume: rows equal the local engine's."""
    make_shards(tmp_path / "shards", n_shards=4, per_shard=4)
    cmd = [
        sys.executable, "-m", "grmpiqa", "score", "shards/shard-{0000..0003}.tar",
        "--engine", "ray", "--out-dir", "out/", "--backbone", "test-tiny", "--batch-size", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "out" / "part-00000.csv").exists():
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert (tmp_path / "out" / "part-00000.csv").exists(), err.decode()[-2000:]
    # whatever the kill left: complete parts, no half-written part under its own name
    for f in (tmp_path / "out").glob("part-*.csv"):
        assert len(read_rows(f, "csv")) == 4
    shards = "shards/shard-{0000..0003}.tar"
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        resume = ["--engine", "ray", "--out-dir", "out/", "--resume"]
        assert main(["score", shards, *TINY, "--batch-size", "1", *resume]) == 0
        assert main(["score", shards, *TINY, "--batch-size", "1", "--out-dir", "local/"]) == 0
    finally:
        os.chdir(here)
    capsys.readouterr()
    for i in range(4):
        name = f"part-{i:05d}.csv"
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_ray_session_puts_the_signal_handlers_back():
    """ray.init replaces SIGTERM's handler in the driver (with one that calls sys.exit);
    closing the session grmpiqa started restores the caller's."""
    code = (
        "import signal\n"
        "from grmpiqa.scoring.ray import RaySession\n"
        "before = signal.getsignal(signal.SIGTERM)\n"
        "session = RaySession(num_cpus=1)\n"
        "during = signal.getsignal(signal.SIGTERM)\n"
        "session.close()\n"
        "print(during is not before, signal.getsignal(signal.SIGTERM) is before)\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]
