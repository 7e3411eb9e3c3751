"""Placement and fault tolerance on a multi-node Ray cluster (ray.cluster_utils.Cluster, one machine).

Nodes advertise fake GPU resources; actors compute on CPU (`device="cpu"`) but reserve
`gpus_per_actor` of Ray's GPU resource, so placement (fractional GPUs, spread over nodes) is what it
would be on GPU nodes. A slow actor (`tests.faults.slow`) makes every batch take longer, so that kills
land mid-run.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from cluster.driver import embed
from tests import faults
from tests.conftest import random_proteins, write_fasta
from virnucpro.io.output import part_metadata, read_embeddings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        nodes = [c.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        ray.init(address=c.address, logging_level="WARNING")
        c.wait_for_nodes()
        yield c, nodes
    finally:  # a cluster left behind would be joined by the CLI tests, which join the Ray found on this machine as users do
        try:
            ray.shutdown()
        finally:
            c.shutdown()


def _run_in_thread(**kwargs) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["result"] = embed(**kwargs)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _wait_for_parts(out: Path, n: int, timeout: float = 120) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = sorted(out.glob("part-*.parquet"))
        if len(parts) >= n:
            return parts
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} parts in {out} after {timeout} s")


def _assert_exactly_once(out: Path, ids: list[str]) -> None:
    table = read_embeddings(out)
    counts = Counter(table.column("id").to_pylist())
    assert sorted(counts) == sorted(ids), "some ids are missing or unexpected"
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    assert table.num_rows == len(ids)
    # nothing besides the plan's parts is visible to a dataset reader (temporary files are hidden)
    assert pq.read_table(out).num_rows == len(ids)


def test_fractional_gpus_spread_and_sigkilled_actor(cluster, tmp_path, esm_tiny):
    c, nodes = cluster
    ids = write_fasta(tmp_path / "x.faa", random_proteins(240, 5, 60, seed=21))
    out = tmp_path / "out"
    slow = faults.slow(0.1)
    t, box = _run_in_thread(actor_class=slow, input=tmp_path / "x.faa", out_dir=out, model=esm_tiny, device="cpu",
                            gpus_per_actor=0.5, toks_per_batch=256, progress=False)
    parts = _wait_for_parts(out, 3)
    victim = part_metadata(out, parts[0].name)["actor"]  # host:pid of the actor that wrote it
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
    t.join(240)
    assert not t.is_alive(), "embed did not finish after an actor was killed"
    assert "error" not in box, box.get("error")
    result = box["result"]
    # 2 nodes x 1 GPU / 0.5 per actor = 4 actors, two on each node, sharing that node's GPU id
    assert len(result.actors) == 4
    per_node = Counter(a["node_id"] for a in result.actors)
    assert sorted(per_node.values()) == [2, 2] and set(per_node) == {n.node_id for n in nodes}
    assert all(len(a["gpu_ids"]) == 1 for a in result.actors)
    assert result.batches_retried >= 1  # the killed actor's batches were dealt again
    _assert_exactly_once(out, ids)


def test_node_removed_mid_run(cluster, tmp_path, esm_tiny):
    c, nodes = cluster
    spare = c.add_node(num_cpus=2, num_gpus=1)
    c.wait_for_nodes()
    ids = write_fasta(tmp_path / "y.faa", random_proteins(150, 5, 60, seed=22))
    out = tmp_path / "out"
    slow = faults.slow(0.05)
    # one actor with a whole (fake) GPU: when its node goes, the run can only finish if Ray restarts
    # it on a node with a free GPU and the driver takes it back into the pool
    t, box = _run_in_thread(actor_class=slow, input=tmp_path / "y.faa", out_dir=out, model=esm_tiny, device="cpu",
                            gpus_per_actor=1, num_actors=1, toks_per_batch=256, progress=False)
    parts = _wait_for_parts(out, 3)
    node_id = part_metadata(out, parts[0].name)["node_id"]
    victim = next(n for n in [*nodes, spare] if n.node_id == node_id)
    c.remove_node(victim)
    t.join(240)
    assert not t.is_alive(), "embed did not finish after a node was removed"
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result.batches_retried >= 1
    _assert_exactly_once(out, ids)
    writers = {part_metadata(out, p.name)["node_id"] for p in out.glob("part-*.parquet")}
    assert node_id in writers and len(writers) == 2  # the actor came back on another node


def test_actor_ray_gives_up_on_is_replaced(cluster, tmp_path, esm_tiny):
    ids = write_fasta(tmp_path / "z.faa", random_proteins(120, 5, 60, seed=23))
    out = tmp_path / "out"
    slow = faults.slow(0.05)
    # no restarts by Ray: a killed actor is dead for good, and the pool starts a new one
    t, box = _run_in_thread(actor_class=slow, input=tmp_path / "z.faa", out_dir=out, model=esm_tiny, device="cpu",
                            gpus_per_actor=1, num_actors=1, toks_per_batch=256, progress=False,
                            max_actor_restarts=0)
    parts = _wait_for_parts(out, 2)
    victim = part_metadata(out, parts[0].name)["actor"]
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
    t.join(240)
    assert not t.is_alive() and "error" not in box, box.get("error")
    assert box["result"].actors_replaced == 1 and box["result"].batches_retried >= 1
    _assert_exactly_once(out, ids)


# --- issue 27: the data path on the nodes, a node killed by pid, a service over two nodes ------------------

def _descendants(pid: int) -> list[int]:
    """pid's children, their children, ... (from /proc: a raylet's workers and agents)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_node(c, node_id: str) -> None:
    """SIGKILL a node's raylet and every process under it (its workers, the actors among them), by pid."""
    node = next(n for n in c.list_all_nodes() if n.node_id == node_id)
    raylet = node.all_processes["raylet"][0].process.pid
    for pid in [raylet, *_descendants(raylet)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    c.remove_node(node, allow_graceful=False)  # (the cluster's bookkeeping: its processes are dead already)


def test_worker_node_killed_by_pid_mid_run(cluster, tmp_path, esm_tiny, monkeypatch):
    """Actors only on the worker nodes (the head has no GPU), the input indexed by Ray tasks in ranges, one
    worker node's raylet and workers SIGKILLed mid-run: the job finishes on the other node, every
    sequence exactly once."""
    import cluster.driver as driver

    c, _ = cluster
    # this test's own pair of worker nodes: the actors need their `killable` resource, one per node
    nodes = [c.add_node(num_cpus=2, num_gpus=1, resources={"killable": 1}) for _ in range(2)]
    c.wait_for_nodes()
    ids = write_fasta(tmp_path / "k.faa", random_proteins(300, 5, 60, seed=24))
    monkeypatch.setattr(driver, "RANGE_BYTES", 4096)  # several ranges, indexed by Ray tasks
    monkeypatch.setattr(driver, "TASK_INDEX_BYTES", 4096)
    out = tmp_path / "out"
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
    t, box = _run_in_thread(actor_class=faults.slow(0.05), input=tmp_path / "k.faa", out_dir=out, model=esm_tiny,
                            device="cpu", gpus_per_actor=1, num_actors=2, toks_per_batch=256, progress=False,
                            actor_options=lambda i: {"resources": {"killable": 1}})
    parts = _wait_for_parts(out, 4)
    victim = part_metadata(out, parts[0].name)["node_id"]
    killed_at = time.time()
    _kill_node(c, victim)
    t.join(240)
    assert not t.is_alive(), "embed did not finish after a worker node was killed"
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert {a["node_id"] for a in result.actors} == {n.node_id for n in nodes} <= gpu_nodes  # none on the head
    assert len(result.index_nodes) >= 1 and set(result.index_nodes) <= {n["NodeID"] for n in ray.nodes()}
    assert result.batches_retried >= 1
    _assert_exactly_once(out, ids)
    survivor = next(n.node_id for n in nodes if n.node_id != victim)
    late = [p for p in out.glob("part-*.parquet") if p.stat().st_mtime > killed_at + 0.5]
    assert late and {part_metadata(out, p.name)["node_id"] for p in late} == {survivor}
    c.remove_node(next(n for n in nodes if n.node_id == survivor))


def test_a_service_with_replicas_on_two_nodes_serves_two_jobs(cluster, tmp_path, esm_tiny):
    """A service of two replicas, one per GPU node, and two jobs at once: both finish exactly once, and
    the parts of each come from both nodes."""
    from ray import serve

    from cluster.service import start_service
    from virnucpro.options import EmbedOptions

    try:
        start_service(str(esm_tiny), "two-nodes", replicas=2, gpus_per_replica=1, opts=EmbedOptions(device="cpu"),
                      http_port=_free_port())
        jobs = {}
        for name, seed in (("a", 25), ("b", 26)):
            ids = write_fasta(tmp_path / f"{name}.faa", random_proteins(200, 5, 60, seed=seed))
            jobs[name] = (ids, *_run_in_thread(input=tmp_path / f"{name}.faa", out_dir=tmp_path / name, model=None,
                                               service="two-nodes", toks_per_batch=256, progress=False))
        for name, (ids, t, box) in jobs.items():
            t.join(240)
            assert not t.is_alive() and "error" not in box, box.get("error")
            _assert_exactly_once(tmp_path / name, ids)
            writers = {part_metadata(tmp_path / name, p.name)["node_id"] for p in (tmp_path / name).glob("part-*")}
            assert len(writers) == 2, name  # a replica per GPU node: each job used both
    finally:
        serve.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
