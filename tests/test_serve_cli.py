"""`virnucpro serve start` on a machine where no Ray runs: it starts its own `ray start --head`, which
outlives the command (as a service must), and jobs from other processes find the service there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import random_proteins, write_fasta
from virnucpro.io.output import read_embeddings

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.mark.skipif(Path("/tmp/ray/ray_current_cluster").exists(), reason="a Ray cluster already runs here")
def test_serve_start_starts_a_ray_head_that_outlives_it(tmp_path, esm_tiny):
    ids = write_fasta(tmp_path / "in.faa", random_proteins(12, 5, 60, seed=4))
    try:
        started = cli("serve", "start", "--model", str(esm_tiny), "--name", "cli", "--device", "cpu",
                      "--http-port", "8933")
        assert started.returncode == 0, started.stderr[-3000:]
        assert "service 'cli'" in started.stdout and Path("/tmp/ray/ray_current_cluster").exists()
        status = cli("serve", "status")
        assert status.returncode == 0 and status.stdout.startswith("cli\t"), status.stdout + status.stderr[-2000:]
        job = cli("embed", str(tmp_path / "in.faa"), "-o", str(tmp_path / "out"), "--service", "cli", "--no-progress")
        assert job.returncode == 0, job.stderr[-3000:]
        assert sorted(read_embeddings(tmp_path / "out").column("id").to_pylist()) == sorted(ids)
        stopped = cli("serve", "stop", "--name", "cli")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert "no virnucpro service" in cli("serve", "status").stdout
    finally:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
