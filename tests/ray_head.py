"""A Ray head of a test's own, beside whatever Ray runs on the machine (another session's, a developer's).

`ray start --head` in a session of its own, with its own --temp-dir (so its address file is not
/tmp/ray/ray_current_cluster, which `ray.init()` and `ray start` elsewhere read) and its own ports; the
test reaches it by its address (RAY_ADDRESS or --address) and stops it by signalling only the processes
it started. Never `ray stop`, with or without --force: it stops every Ray on the machine.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """n ports free now, below the kernel's ephemeral range (32768-60999 on Linux) and above Ray's worker
    ports (10002-19999). A port the kernel hands out for port 0 can be handed out again at once: once the
    head's dashboard bound its own gRPC server to the port picked for its HTTP server, whose start then
    failed, and the job API client waited forever on a server that does not speak HTTP."""
    rng, ports = random.Random(), []
    while len(ports) < n:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def ray_command() -> list[str]:
    exe = shutil.which("ray")
    return [exe] if exe else [sys.executable, "-m", "ray.scripts.scripts"]


def head_processes(leader: int) -> list[int]:
    """The head's processes: its process group (ray start ran in a new session) and their descendants
    (Ray's workers, which start process groups of their own)."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        procs[int(entry)] = (int(fields[1]), int(fields[2]))  # ppid, pgid
    ours = {pid for pid, (_, pgid) in procs.items() if pgid == leader}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours
        ours |= more
        grew = bool(more)
    return sorted(ours)


def stop_head(leader: int) -> None:
    """SIGTERM the head's processes, then SIGKILL those left: by pid, nothing else on the machine."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in head_processes(leader):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and head_processes(leader):
            time.sleep(0.2)


def start_head(temp_dir: Path, env: dict[str, str], *options: str) -> tuple[int, str]:
    """`ray start --head` on ports of its own: the GCS's picked by Ray (--port=0), the others free now, and
    its workers' picked by the kernel (not Ray's default range, which another Ray's workers use). Returns
    the process group leader to stop it by (`stop_head`) and the GCS address to reach it by. `temp_dir`
    must be short (Ray's socket paths); `options` are added to the command."""
    dashboard, metrics, client, agent, agent_grpc, runtime_env, node_manager, object_manager = free_ports(8)
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*ray_command(), "start", "--head", "--port=0", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_manager}",
             f"--object-manager-port={object_manager}", "--min-worker-port=0", "--max-worker-port=0",
             f"--temp-dir={temp_dir}", "--disable-usage-stats", *options],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        stop_head(proc.pid)
        raise AssertionError(f"ray start failed ({rc}):\n{log_path.read_text()[-3000:]}")
    return proc.pid, (temp_dir / "ray_current_cluster").read_text().strip()
