"""`ray job submit` against a running Ray head with token authentication on, and a killed driver.

The module starts one real head (`ray start --head`, loopback dashboard, token auth, its own
--temp-dir and ports) and tears down only the processes it started. Tests:
  * a job submitted with `JobSubmissionClient` (the token in an Authorization header) embeds a FASTA;
    a client without the token is refused; the run's Ray metrics appear on the node's metrics port;
  * the same through the `ray job submit` CLI with `--working-dir`;
  * a driver that joined the cluster is SIGKILLed mid-run; `--resume` finishes without redoing parts.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ray_head import free_ports, ray_command, stop_head
from tests.conftest import random_proteins, write_fasta
from virnucpro.io.output import MANIFEST, Manifest, read_embeddings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
JOB_TIMEOUT = 180


@dataclass
class Head:
    temp_dir: Path
    token: str
    dashboard: str  # http://127.0.0.1:PORT (job API)
    gcs: str  # host:port for --address
    metrics_port: int
    env: dict  # environment for clients and drivers: token auth on, this cluster's token

    def client(self, token: str | None = ""):
        from ray.job_submission import JobSubmissionClient

        token = self.token if token == "" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return JobSubmissionClient(self.dashboard, headers=headers)


def _answers_http(url: str) -> None:
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=5).close()
    except urllib.error.HTTPError:
        pass  # an answer (401 without the token) is what is asked here


@pytest.fixture(scope="module")
def head():
    temp_dir = Path(tempfile.mkdtemp(prefix="vnp-ray-", dir="/tmp"))  # short: Ray's socket paths
    token = secrets.token_hex(32)
    (temp_dir / "token").write_text(token)
    dashboard, metrics, client, agent = free_ports(4)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(temp_dir / "token"),
               RAY_metrics_report_interval_ms="1000", PYTHONPATH=str(ROOT))
    log = open(temp_dir / "ray-start.log", "w")
    proc = subprocess.Popen(
        [*ray_command(), "start", "--head", "--port=0", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=120)
        assert rc == 0, f"ray start failed:\n{(temp_dir / 'ray-start.log').read_text()[-3000:]}"
        gcs = (temp_dir / "ray_current_cluster").read_text().strip()
        h = Head(temp_dir, token, f"http://127.0.0.1:{dashboard}", gcs, metrics, {**env, "RAY_ADDRESS": ""})
        deadline = time.monotonic() + 90
        while True:  # the job API comes up a little after `ray start` returns
            try:
                _answers_http(h.dashboard)  # first, with a timeout: the job API client's requests have none
                h.client().list_jobs()
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield h
    finally:
        stop_head(proc.pid)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _virnucpro() -> list[str]:
    exe = shutil.which("virnucpro")
    return [exe] if exe else [sys.executable, "-m", "cluster.cli"]


def _slow_virnucpro(delay: float) -> list[str]:
    """`virnucpro` whose batches each take `delay` s longer (tests/faults.py), so a run is caught mid-way."""
    return [sys.executable, "-m", "tests.faults", str(delay)]


def _wait_job(client, job_id: str) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + JOB_TIMEOUT
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id}: {status}\n--- job logs ---\n{logs[-4000:]}"
    return logs


def _assert_exactly_once(out: Path, ids: list[str]) -> None:
    counts = Counter(read_embeddings(out).column("id").to_pylist())
    assert sorted(counts) == sorted(ids) and max(counts.values()) == 1


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _metric_total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_job_submission_client_with_token_and_metrics(head, tmp_path, esm_tiny):
    from ray.job_submission import JobSubmissionClient

    ids = write_fasta(tmp_path / "in.faa", random_proteins(80, 5, 120, seed=31))
    out = tmp_path / "out"
    with pytest.raises(Exception, match="(?i)auth|401|token"):
        JobSubmissionClient(head.dashboard).list_jobs()  # no token: refused
    client = head.client()
    cmd = " ".join([*_slow_virnucpro(0.4), "embed", str(tmp_path / "in.faa"), "-o", str(out), "--model", str(esm_tiny),
                    "--device", "cpu", "--num-actors", "1", "--toks-per-batch", "512"])
    # the metrics are read while the job runs, kept alive for several reports (1 s apart) by a delay per
    # batch: a process that exits within a report of setting a gauge may never export it
    job = client.submit_job(entrypoint=cmd)
    seen: set[str] = set()
    deadline = time.monotonic() + JOB_TIMEOUT
    while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
        seen |= _metric_names(_metrics(head.metrics_port))
        time.sleep(0.5)
    logs = _wait_job(client, job)
    assert "80 sequences" in logs, logs[-2000:]
    _assert_exactly_once(out, ids)
    assert Manifest.load(out).complete
    # the actor's counters reach the node's Prometheus endpoint (the dashboard's source) in full
    deadline = time.monotonic() + 30
    while True:
        text = _metrics(head.metrics_port)
        seen |= _metric_names(text)
        seqs = _metric_total(text, "ray_virnucpro_sequences_embedded_total")
        if seqs >= 80 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert seqs >= 80, sorted(seen)
    for name in ("ray_virnucpro_tokens_embedded_total", "ray_virnucpro_batches_embedded_total",
                 "ray_virnucpro_batch_seconds_bucket", "ray_virnucpro_actor_tokens_per_second",
                 "ray_virnucpro_queue_depth", "ray_virnucpro_batches_in_flight", "ray_virnucpro_actors_usable"):
        assert name in seen, (name, sorted(seen))


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"^(ray_virnucpro_\w+?)(?:\{| )", text, re.M))


def test_ray_job_submit_cli_with_working_dir(head, tmp_path, esm_tiny):
    ids = write_fasta(tmp_path / "in.faa", random_proteins(50, 5, 80, seed=32))
    out = tmp_path / "out"
    env = {**head.env, "RAY_AUTH_TOKEN": head.token}
    proc = subprocess.run(
        [*ray_command(), "job", "submit", "--address", head.dashboard, "--working-dir", str(ROOT), "--",
         "python", "-m", "cluster.cli", "embed", str(tmp_path / "in.faa"), "-o", str(out),
         "--model", str(esm_tiny), "--device", "cpu", "--num-actors", "1"],
        env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "succeeded" in proc.stdout.lower() and "50 sequences" in proc.stdout, proc.stdout[-2000:]
    _assert_exactly_once(out, ids)


def test_driver_killed_then_resumed(head, tmp_path, esm_tiny):
    ids = write_fasta(tmp_path / "in.faa", random_proteins(200, 5, 40, seed=33))
    out = tmp_path / "out"
    args = ["embed", str(tmp_path / "in.faa"), "-o", str(out), "--model", str(esm_tiny),
            "--device", "cpu", "--address", head.gcs, "--num-actors", "2", "--toks-per-batch", "128"]
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(_slow_virnucpro(0.2) + args, env=head.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while len(list(out.glob("part-*.parquet"))) < 6:
                assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
                time.sleep(0.05)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    # the job's actors die with their driver; wait until no part appears any more
    stable_since, seen = time.monotonic(), None
    while time.monotonic() - stable_since < 3:
        now = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
        if now != seen:
            seen, stable_since = now, time.monotonic()
        time.sleep(0.2)
    manifest = Manifest.load(out)
    assert manifest is not None and not manifest.complete
    assert 6 <= len(seen) < manifest.num_batches, (len(seen), manifest.num_batches)

    proc = subprocess.run(_virnucpro() + args + ["--resume"], env=head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"(\d+) of (\d+) batches computed", proc.stdout)
    assert m, proc.stdout
    assert int(m.group(1)) == manifest.num_batches - len(seen) and int(m.group(2)) == manifest.num_batches
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert {k: after[k] for k in seen} == seen  # parts done before the kill were not rewritten
    assert len(after) == manifest.num_batches
    _assert_exactly_once(out, ids)
    assert not list(out.glob(".*.tmp")) and (out / MANIFEST).is_file()
