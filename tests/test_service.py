"""The embedding service on Ray Serve, on CPU with a tiny model: start, status and stop; jobs through it
(the same rows as a job's own actors, two jobs at once, a replica killed mid-job, a replica's torch
error); HTTP with the cluster's token, bad input and size limits, a short soak with a replica killed
(no request lost); autoscaling from zero, under load and back; a service of another VirNucPro refused."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import ray

from actors.embedder import Embedder
from actors.ingress import Limits
from actors.service import EmbeddingService, _torch_free_errors
from bench.soak import Soak, kill_local_replica, run_soak, summary
from cluster.cli import main
from cluster.driver import embed
from cluster.scheduling import EmbedError
from cluster.service import (DEPLOYMENT, Scaling, _described, check_interface, service_status, start_service,
                             stop_service)
from tests import faults
from tests.conftest import random_dna, random_proteins, write_fasta
from virnucpro import batching
from virnucpro.batching import BatchError, interface_fingerprint
from virnucpro.options import EmbedOptions
from virnucpro.io.output import part_metadata, read_embeddings

pytestmark = pytest.mark.slow


def _free_port() -> int:
    """A loopback port nobody listens on now: Serve's proxy shares its port with another's (SO_REUSEPORT),
    so two test sessions on one port would answer each other's requests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()


@pytest.fixture(scope="module")
def serve_ray():
    # 4 CPUs in Ray's count: svc's 2 replicas, and another service's 2 (the ingresses count none)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def service(serve_ray, esm_tiny):
    """Two replicas of the tiny ESM-2 whose batches each take 0.1 s longer (so a kill lands mid-job)."""
    start_service(str(esm_tiny), "svc", replicas=2, opts=EmbedOptions(device="cpu", toks_per_batch=512),
                  http_port=PORT, actor_class=faults.slow(0.1))
    yield "svc"
    stop_service("svc")


def _embeddings(out: Path) -> dict[str, np.ndarray]:
    t = read_embeddings(out)
    return dict(zip(t.column("id").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))))


def _assert_exactly_once(out: Path, ids: list[str]) -> None:
    counts = Counter(read_embeddings(out).column("id").to_pylist())
    assert sorted(counts) == sorted(ids) and max(counts.values()) == 1


def test_status_lists_the_service(service, esm_tiny):
    [s] = service_status("svc")
    assert s["replicas"] == {"RUNNING": 2} and s["model"] == str(esm_tiny) and s["route"] == "/svc"


def test_job_through_the_service_matches_its_own_actors(service, esm_tiny, tmp_path):
    ids = write_fasta(tmp_path / "in.faa", random_proteins(60, 5, 120, seed=51))
    result = embed(tmp_path / "in.faa", tmp_path / "svc", None, service="svc", progress=False)
    assert result.num_sequences == 60 and len(result.actors) == 2
    own = embed(tmp_path / "in.faa", tmp_path / "own", esm_tiny, device="cpu", toks_per_batch=512, progress=False)
    assert own.num_batches == result.num_batches  # the service's budget (512) planned the same batches
    a, b = _embeddings(tmp_path / "svc"), _embeddings(tmp_path / "own")
    assert sorted(a) == sorted(ids)
    for k in ids:  # not bitwise: the replica and the job's actor may run torch with different thread counts
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    # resume works as for a job's own actors: nothing left to do
    again = embed(tmp_path / "in.faa", tmp_path / "svc", None, service="svc", resume=True, progress=False)
    assert again.batches_computed == 0


@pytest.mark.parametrize("family", ["esm2", "dnabert_s"])
def test_a_job_through_the_service_imports_no_torch(service, dnabert_tiny, family, tmp_path):
    """`virnucpro embed --service` plans with the tokenizer the service hands it, and gets `PartResult`s
    back: its process never imports torch (2.2-2.5 s of a driver's start on an H200 host)."""
    if family == "esm2":
        name, ids = service, write_fasta(tmp_path / "in.fa", random_proteins(40, 5, 120, seed=57))
    else:  # its tokenizer is Hugging Face's, rebuilt from its JSON in the driver
        name, ids = "dna", write_fasta(tmp_path / "in.fa", random_dna(40, 20, 400, seed=58))
        start_service(str(dnabert_tiny), name, opts=EmbedOptions(device="cpu", toks_per_batch=2048), http_port=PORT)
    try:
        proc = _embed_in_a_fresh_process(tmp_path / "in.fa", tmp_path / "out", name)
    finally:
        if name != service:
            stop_service(name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch imported: False" in proc.stdout
    _assert_exactly_once(tmp_path / "out", ids)


def _embed_in_a_fresh_process(fasta: Path, out: Path, service: str) -> subprocess.CompletedProcess:
    """`virnucpro embed FASTA -o OUT --service SERVICE` in a new Python process, which prints at its end
    whether it imported torch."""
    argv = ["embed", str(fasta), "-o", str(out), "--service", service,
            "--address", ray.get_runtime_context().gcs_address, "--no-progress"]
    code = (f"import sys; from cluster.cli import main; rc = main({argv!r}); "
            f"print('torch imported:', 'torch' in sys.modules); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _torch_error_replica() -> type:
    """Replicas whose every batch raises torch's own error class, as a CUDA error outside the Embedder's
    out-of-memory handling would (a class made here, so that Ray ships it by value)."""

    class TorchErrorEmbedder(Embedder):
        def _compute(self, batch, columns, dtype, attempt=0):
            import torch

            raise torch.AcceleratorError("injected: CUDA error: an illegal memory access was encountered")

    return TorchErrorEmbedder


def test_a_torch_error_in_a_replica_stops_the_job_with_one_line_and_no_torch(serve_ray, esm_tiny, tmp_path):
    """The replica's torch error reaches the driver as a RuntimeError naming it: retried as an error from
    an actor of the job's own would be, then one line; unpickling torch's class would import torch."""
    start_service(str(esm_tiny), "torch-error", opts=EmbedOptions(device="cpu", toks_per_batch=512),
                  http_port=PORT, actor_class=_torch_error_replica())
    write_fasta(tmp_path / "in.faa", random_proteins(20, 5, 60, seed=59))
    try:
        proc = _embed_in_a_fresh_process(tmp_path / "in.faa", tmp_path / "out", "torch-error")
    finally:
        stop_service("torch-error")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "torch imported: False" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("virnucpro: error: batch ") and last.endswith(
        "failed: RuntimeError: torch.AcceleratorError: injected: CUDA error: an illegal memory access was "
        "encountered (3 attempts); fix the cause, then rerun with --resume"), proc.stderr[-3000:]


def test_replica_errors_of_torch_classes_leave_as_runtime_errors():
    import torch

    class LaterError(torch.OutOfMemoryError):  # a subclass of torch's, defined elsewhere
        pass

    for error in (torch.AcceleratorError("device lost"), LaterError("out of memory")):
        with pytest.raises(RuntimeError) as e, _torch_free_errors("embed"):
            raise error
        name = f"{type(error).__module__}.{type(error).__qualname__}"
        assert type(e.value) is RuntimeError and str(e.value) == f"{name}: {error}"
    for error in (BatchError("batch 3: out of memory"), OSError(28, "No space left on device")):
        with pytest.raises(type(error)) as e, _torch_free_errors("embed"):
            raise error
        assert e.value is error  # the driver's scheduler tells these apart: unchanged


def test_http_batches_take_their_turns_at_a_replica_in_arrival_order():
    """A replica hands HTTP batches to threads in the order they came, as many at once as it has streams
    (one on CPU): threads waiting for a stream would take it in no particular order, and a request whose
    one batch waits behind later ones is answered late."""

    class OneStream:
        def __init__(self):
            self.lock, self.running, self.most, self.order = threading.Lock(), 0, 0, []

        def compute(self, batch):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.005)
            with self.lock:
                self.order.append(batch.batch_id)
                self.running -= 1
            return np.zeros((1, 4), np.float32)

    replica = EmbeddingService.__new__(EmbeddingService)  # the model deployment's class, without a model
    replica.embedder, replica.streams, replica.turns = OneStream(), 1, None

    async def batches():
        await asyncio.gather(*(replica.compute(SimpleNamespace(batch_id=i)) for i in range(24)))

    asyncio.run(batches())
    assert replica.embedder.most == 1 and replica.embedder.order == list(range(24))


def test_two_jobs_at_once_share_the_replicas(service, tmp_path):
    """A large job and a small one started just after it: the small one is not starved (it finishes
    long before the large one), and both are complete, each sequence once."""
    big = write_fasta(tmp_path / "big.faa", random_proteins(1800, 20, 120, seed=52))  # ~250 batches
    small = write_fasta(tmp_path / "small.faa", random_proteins(10, 20, 60, seed=53), prefix="s")
    done: dict[str, float] = {}

    def run(name: str) -> None:
        embed(tmp_path / f"{name}.faa", tmp_path / name, None, service="svc", progress=False)
        done[name] = time.monotonic()

    t = threading.Thread(target=run, args=("big",))
    t.start()
    deadline = time.monotonic() + 300
    while not list((tmp_path / "big").glob("part-*.parquet")):  # the large job is under way
        assert t.is_alive() and time.monotonic() < deadline, "the large job ended or stalled before its first part"
        time.sleep(0.05)
    run("small")
    assert t.is_alive(), "the small job waited for the large one to finish"
    t.join(300)
    assert done["small"] < done["big"]
    _assert_exactly_once(tmp_path / "big", big)
    _assert_exactly_once(tmp_path / "small", small)


def test_replica_killed_mid_job(service, tmp_path):
    ids = write_fasta(tmp_path / "k.faa", random_proteins(300, 20, 120, seed=54))
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(result=embed(tmp_path / "k.faa", tmp_path / "k", None,
                                                                service="svc", progress=False)))
    t.start()
    deadline = time.monotonic() + 60
    while not list((tmp_path / "k").glob("part-*.parquet")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first = sorted((tmp_path / "k").glob("part-*.parquet"))[0]
    os.kill(int(part_metadata(tmp_path / "k", first.name)["actor"].rsplit(":", 1)[1]), signal.SIGKILL)
    t.join(300)
    assert "result" in box, "the job did not finish after a replica was killed"
    assert box["result"].batches_retried >= 1
    _assert_exactly_once(tmp_path / "k", ids)
    _wait_for(lambda: _running("svc") == 2, 120, "Serve to replace the replica")


def _running(name: str) -> int:
    from ray import serve

    return serve.status().applications[name].deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}: {service_status()}"
        time.sleep(0.2)


def _post(body: bytes, content_type: str, token: str | None, accept: str = "application/json", app: str = "svc",
          headers_out: dict | None = None):
    headers = {"Content-Type": content_type, "Accept": accept}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/{app}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        if headers_out is not None:
            headers_out.update({k.lower(): v for k, v in e.headers.items()})
        return e.code, e.read()


def _token() -> str:
    return (Path.home() / ".ray" / "auth_token").read_text().strip()


def test_http_needs_the_token_and_answers_json_and_arrow(service, tmp_path):
    seqs = {"p1": "MKTAYIAKQRQISFVKSHFSRQ", "p2": "MKV"}
    body = json.dumps({"sequences": [{"id": k, "sequence": v} for k, v in seqs.items()]}).encode()
    assert _post(body, "application/json", None)[0] == 401
    assert _post(body, "application/json", "0" * 64)[0] == 401
    status, data = _post(body, "application/json", _token())
    assert status == 200
    reply = json.loads(data)
    assert reply["ids"] == ["p1", "p2"] and len(reply["embeddings"]) == 2 and reply["dim"] == 64
    # the same vectors as a job writes, for the same sequences
    (tmp_path / "h.faa").write_text("".join(f">{k}\n{v}\n" for k, v in seqs.items()))
    embed(tmp_path / "h.faa", tmp_path / "h", None, service="svc", progress=False)
    rows = _embeddings(tmp_path / "h")
    np.testing.assert_allclose(np.array(reply["embeddings"], np.float32), np.stack([rows["p1"], rows["p2"]]),
                               rtol=1e-5, atol=1e-6)
    fasta = "".join(f">{k}\n{v}\n" for k, v in seqs.items()).encode()
    status, data = _post(fasta, "text/x-fasta", _token(), accept="application/vnd.apache.arrow.stream")
    assert status == 200
    table = pa.ipc.open_stream(io.BytesIO(data)).read_all()
    assert table.column("id").to_pylist() == ["p1", "p2"] and table.schema.field("embedding").type.list_size == 64
    np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                               np.array(reply["embeddings"], np.float32), rtol=1e-6)


def test_http_bad_input_and_limits(service):
    status, data = _post(b">x\nMK1V\n", "text/x-fasta", _token())
    assert status == 400
    message = json.loads(data)["error"]
    assert message == "request: record 'x': character '1' at position 3 is not a valid protein letter"
    assert _post(b"{not json", "application/json", _token())[0] == 400
    many = json.dumps({"sequences": ["MK"] * 10_001}).encode()
    status, data = _post(many, "application/json", _token())
    assert (status, json.loads(data)["error"]) == (413, "10001 sequences in one request; at most 10000 per request")
    # a body over 16 MiB: read to its end and refused with the limit, not a connection reset
    large = b">big\n" + b"M" * (17 << 20) + b"\n"
    status, data = _post(large, "text/x-fasta", _token())
    assert (status, json.loads(data)["error"]) == (
        413, f"request of {len(large)} bytes; at most {16 << 20} bytes (16 MiB) per request")


def test_http_soak_with_a_replica_killed_loses_no_request(service):
    """200 requests from 8 clients, a replica SIGKILLed under them: each one answered 200 (the
    ingress computes the dead replica's batches on the other), none failed."""
    # mostly one batch a request: each takes the fault's 0.1 s at its replica, one batch at a time
    soak = Soak(f"http://127.0.0.1:{PORT}/svc", clients=8, requests=200, proteins=(1, 8), lengths=(20, 120),
                kill_at=(2.0,), timeout_s=120)
    result = run_soak(soak, _token(), kill=lambda: kill_local_replica("svc"))
    assert len(result["kills"]) == 1 and result["wall_s"] > 2.5, summary(result)  # killed mid-soak
    assert (result["answered"], result["failed"]) == (200, {}), summary(result) + f" {result['errors']}"
    _wait_for(lambda: _running("svc") == 2, 120, "Serve to replace the replica")


def test_autoscaling_from_zero_under_load_and_back(serve_ray, esm_tiny, tmp_path):
    """A service of 0-2 replicas: none while idle; the first request then waits for one to load and is
    answered; a second replica comes under load; a burst beyond the ingress's queue gets 503 with
    Retry-After at once; idle again, none, and a job then waits for one and completes. (Short delays:
    Serve's defaults are 30 s up, 600 s down.)"""
    scaling = Scaling(0, 2, upscale_delay_s=0.5, downscale_delay_s=1.0, look_back_s=1.0, metrics_interval_s=0.25)
    start_service(str(esm_tiny), "auto", opts=EmbedOptions(device="cpu", toks_per_batch=256), http_port=PORT,
                  actor_class=faults.slow(0.2), scaling=scaling, limits=Limits(max_requests=4, max_queued_requests=2))
    body = json.dumps({"sequences": random_proteins(16, 20, 60, seed=60)}).encode()
    post = partial(_post, body, "application/json", _token(), app="auto")
    statuses: Counter = Counter()
    try:
        _wait_for(lambda: _running("auto") == 0, 60, "the idle service to scale to zero")
        assert post()[0] == 200  # held while a replica loads, then answered
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                status, reply = post()
                statuses[status if status == 200 else (status, reply[:300])] += 1

        # 2 clients keep ~7 batches at the replica (target: 3); fewer than the ingress's 4 requests at
        # work, as a request's slot there is freed a moment after its client has the answer
        clients = [threading.Thread(target=client) for _ in range(2)]
        for c in clients:
            c.start()
        _wait_for(lambda: _running("auto") == 2, 60, "a second replica under load")
        stop.set()
        for c in clients:
            c.join()
        assert set(statuses) == {200}, statuses
        retry_after: dict = {}
        time.sleep(0.5)
        with ThreadPoolExecutor(10) as pool:  # 4 at work and 2 queued in the ingress: the others refused
            burst = Counter(pool.map(lambda _: post(headers_out=retry_after)[0], range(10)))
        assert burst[503] >= 1 and burst[200] >= 4 and burst[200] + burst[503] == 10, burst
        assert retry_after["retry-after"] == "5"
        _wait_for(lambda: _running("auto") == 0, 60, "the replicas to be removed when idle")
        assert service_status("auto")[0]["model"].startswith("(no replica running")  # asked without waking it
        ids = write_fasta(tmp_path / "in.faa", random_proteins(20, 20, 60, seed=61))
        embed(tmp_path / "in.faa", tmp_path / "out", None, service="auto", progress=False)
        _assert_exactly_once(tmp_path / "out", ids)
    finally:
        stop_service("auto")


def test_cli_serve_status_and_stop(service, esm_tiny, capsys):
    # the replica killed by an earlier test may still be coming back (Serve says UNHEALTHY meanwhile)
    deadline = time.monotonic() + 120
    while service_status("svc")[0]["status"] != "RUNNING" and time.monotonic() < deadline:
        time.sleep(1)
    assert main(["serve", "status"]) == 0
    assert "svc\tRUNNING" in capsys.readouterr().out
    assert main(["serve", "start", "--model", str(esm_tiny), "--name", "second", "--device", "cpu",
                 "--http-port", str(PORT)]) == 0
    assert "service 'second' RUNNING" in capsys.readouterr().out
    assert main(["serve", "stop", "--name", "second"]) == 0
    assert main(["serve", "stop", "--name", "second"]) == 1
    assert "no virnucpro service named 'second'" in capsys.readouterr().err


def test_interface_fingerprint_follows_the_exchanged_fields(monkeypatch):
    ours = interface_fingerprint()
    assert ours == interface_fingerprint(batching.EXCHANGED)

    @dataclass
    class PartResult(batching.PartResult):  # as a later VirNucPro might grow it
        gpu_seconds: float = 0.0

    grown = tuple(PartResult if c is batching.PartResult else c for c in batching.EXCHANGED)
    assert interface_fingerprint(grown) != ours
    monkeypatch.setattr("virnucpro.__version__", "0.0.1")
    assert interface_fingerprint() != ours


@pytest.mark.parametrize("interface", ["another", None])
def test_a_service_of_another_interface_is_refused(interface):
    """Another VirNucPro's fingerprint, or none (a service from before it), gets one line: restart it."""
    info = {"source": None, **({"interface": interface} if interface else {})}
    with pytest.raises(EmbedError) as e:
        check_interface("esm", info)
    message = str(e.value)
    assert message.startswith("service 'esm' runs a different VirNucPro interface") and "\n" not in message
    assert "virnucpro serve stop --name esm, then virnucpro serve start --name esm" in message
    check_interface("esm", {**info, "interface": interface_fingerprint()})  # this VirNucPro's: accepted
    # the description is fetched only once the interface matches: another VirNucPro's objects may not
    # deserialise here at all, and the user gets the restart line, not a deserialisation error
    class Handle:  # a deployment handle of another VirNucPro's service
        class describe:
            @staticmethod
            def remote():
                return SimpleNamespace(result=lambda timeout_s: info)

        class description:
            @staticmethod
            def remote():
                raise AssertionError("description asked for before the interface was checked")

    with pytest.raises(EmbedError, match="different VirNucPro interface"):
        _described("esm", lambda: Handle, timeout_s=1)
    # this interface, but no `description` (a service of this version from before it): one line, restart it
    info["interface"] = interface_fingerprint()
    with pytest.raises(EmbedError) as e:
        _described("esm", lambda: Handle, timeout_s=1)
    assert str(e.value).startswith("service 'esm' did not describe its model (AssertionError: description asked")
    assert "virnucpro serve stop --name esm" in str(e.value) and "\n" not in str(e.value)
