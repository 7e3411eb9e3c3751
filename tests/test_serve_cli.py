"""`virnucpro serve start|status|stop` and `embed --service` from the command line, each command a
process of its own: the service outlives the command that started it, and jobs from other processes find
it there.

The commands run against a Ray head of the test's own (`tests/ray_head.py`: its own --temp-dir, ports and
token, reached through RAY_ADDRESS), so the test runs whatever other Ray runs on the machine, and stops
only the processes that head started. What `serve start` does where no Ray runs, start one with `ray start
--head` that outlives it, is checked without starting that Ray: it would take the machine's default ports
and /tmp/ray, which another Ray may hold.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.ray_head import free_ports, start_head, stop_head
from tests.conftest import random_proteins, write_fasta
from virnucpro.io.output import read_embeddings

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def head_env():
    """The environment of a command that joins the test's own Ray head (token authentication on)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="vnp-serve-", dir="/tmp"))  # short: Ray's socket paths
    (temp_dir / "token").write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(temp_dir / "token"),
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    leader = None
    try:
        leader, gcs = start_head(temp_dir, env, "--num-cpus=2", "--num-gpus=0")
        yield {**env, "RAY_ADDRESS": gcs}
    finally:
        if leader is not None:
            stop_head(leader)
        shutil.rmtree(temp_dir, ignore_errors=True)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_a_service_outlives_serve_start_and_jobs_in_other_processes_use_it(head_env, tmp_path, esm_tiny):
    ids = write_fasta(tmp_path / "in.faa", random_proteins(12, 5, 60, seed=4))
    started = cli(head_env, "serve", "start", "--model", str(esm_tiny), "--name", "cli", "--device", "cpu",
                  "--http-port", str(free_ports(1)[0]))
    assert started.returncode == 0, started.stderr[-3000:]
    assert "service 'cli'" in started.stdout
    status = cli(head_env, "serve", "status")
    assert status.returncode == 0 and status.stdout.startswith("cli\t"), status.stdout + status.stderr[-2000:]
    job = cli(head_env, "embed", str(tmp_path / "in.faa"), "-o", str(tmp_path / "out"), "--service", "cli",
              "--no-progress")
    assert job.returncode == 0, job.stderr[-3000:]
    assert sorted(read_embeddings(tmp_path / "out").column("id").to_pylist()) == sorted(ids)
    stopped = cli(head_env, "serve", "stop", "--name", "cli")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert "no virnucpro service" in cli(head_env, "serve", "status").stdout


def test_serve_start_without_a_ray_starts_a_head_that_outlives_it(monkeypatch, esm_tiny):
    """With no Ray to join (no --address, no RAY_ADDRESS, none running here), `serve start` runs `ray start
    --head` (a Ray that stays up after the command, token authentication on, its dashboard on loopback),
    then joins it and deploys the service there. Ray's start and the deployment are stood in for."""
    import ray

    import cluster.service as service
    from cluster.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_ENABLE_AUTO_CONNECT", "0")  # what main() sets, undone after the test
    joined, started, deployed = [], [], []

    def init(address=None, **kwargs):
        joined.append(address)
        if not started:
            raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(service.subprocess, "run", lambda cmd, env=None, **kw: started.append((cmd, env)))
    monkeypatch.setattr(service, "start_service", lambda model, name, *a, **kw: deployed.append(name) or {
        "name": name, "status": "RUNNING", "model": model, "replicas": 1, "route": "/cli"})
    assert main(["serve", "start", "--model", str(esm_tiny), "--name", "cli", "--device", "cpu"]) == 0
    (cmd, env), = started
    assert cmd[-4:-2] == ["start", "--head"] and "--dashboard-host=127.0.0.1" in cmd, cmd
    assert env["RAY_AUTH_MODE"] == "token"
    assert joined == ["auto", "auto"] and deployed == ["cli"]  # tried to join, started Ray, joined it
