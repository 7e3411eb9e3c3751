"""A service under load: HTTP clients sending requests of random sizes while replicas are killed on a
schedule, and what came back (answered, failed by status), how fast (p50/p99, tokens/s).

`bench/bench_service.py --soak` runs it at length; `tests/test_service.py` runs a short one on CPU.
Only the standard library and numpy here: the clients must not slow the service they measure by
importing torch, and the test imports this module beside its own.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

AMINO_ACIDS = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
ARROW_STREAM = "application/vnd.apache.arrow.stream"


@dataclass(frozen=True)
class Soak:
    """What the clients send, for how long, and when a replica is killed."""

    url: str
    clients: int = 8
    requests: int = 600  # in all; the soak also ends at `duration_s`
    duration_s: float = 600.0  # no request is sent after this (those under way finish)
    proteins: tuple[int, int] = (1, 150)  # per request, uniform, inclusive
    lengths: tuple[int, int] = (30, 166)  # residues per protein, uniform, inclusive (VirNucPro's frames)
    arrow: bool = False  # Accept: Arrow IPC instead of JSON
    kill_at: tuple[float, ...] = ()  # seconds after the start at which a replica is killed
    seed: int = 0
    timeout_s: float = 300.0  # a client's wait for one answer


def request_body(soak: Soak, number: int) -> tuple[bytes, int, int]:
    """The JSON body of request `number` (the same for the same seed), its proteins and tokens."""
    rng = np.random.default_rng((soak.seed, number))
    n = int(rng.integers(soak.proteins[0], soak.proteins[1] + 1))
    lengths = rng.integers(soak.lengths[0], soak.lengths[1] + 1, n)
    seqs = [rng.choice(AMINO_ACIDS, k).tobytes().decode() for k in lengths.tolist()]
    body = json.dumps({"sequences": [{"id": f"r{number}_{i}", "sequence": s} for i, s in enumerate(seqs)]})
    return body.encode(), n, int(lengths.sum()) + 2 * n  # ESM-2's <cls> and <eos> on each


def post(url: str, body: bytes, token: str, arrow: bool, timeout_s: float) -> tuple[str, bytes]:
    """(status, body) of one POST: the HTTP status as text, or the name of the error when no status
    came back (a connection reset, a timeout)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}",
               "Accept": ARROW_STREAM if arrow else "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout_s) as r:
            return str(r.status), r.read()
    except urllib.error.HTTPError as e:
        return str(e.code), e.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return type(reason).__name__, str(reason).encode()


def run_soak(soak: Soak, token: str, kill: Callable[[], object] | None = None) -> dict:
    """Run the soak; `kill()` kills a replica (at each of `soak.kill_at`) and says which.
    Returns the report: statuses, answered, failed by status, latency of the answered, tokens/s."""
    results: list[tuple[str, float, int, float]] = []  # (status, seconds, tokens, sent at: s after the start)
    errors: Counter = Counter()  # first line of each failure's body, for the report
    numbers = iter(range(soak.requests))
    lock = threading.Lock()
    start = time.perf_counter()

    def client() -> None:
        while time.perf_counter() - start < soak.duration_s:
            with lock:
                number = next(numbers, None)
            if number is None:
                return
            body, _, tokens = request_body(soak, number)
            t = time.perf_counter()
            status, reply = post(soak.url, body, token, soak.arrow, soak.timeout_s)
            with lock:
                results.append((status, time.perf_counter() - t, tokens, t - start))
                if status != "200":
                    errors[f"{status}: {reply[:200].decode(errors='replace')}"] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(soak.clients)]
    for th in threads:
        th.start()
    kills = _kill_on_schedule(soak.kill_at, kill, start, threads)
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    return report(soak, results, wall, kills, errors)


def _kill_on_schedule(kill_at: tuple[float, ...], kill, start: float, threads: list[threading.Thread]) -> list:
    kills = []
    for at in sorted(kill_at):
        while time.perf_counter() - start < at and any(th.is_alive() for th in threads):
            time.sleep(0.05)
        if not any(th.is_alive() for th in threads):
            break
        kills.append({"at_s": round(time.perf_counter() - start, 2), "killed": kill()})
    return kills


def report(soak: Soak, results: list[tuple[str, float, int, float]], wall: float, kills: list,
           errors: Counter) -> dict:
    statuses = Counter(r[0] for r in results)
    ok = np.array([r[1] for r in results if r[0] == "200"])
    tokens = sum(r[2] for r in results if r[0] == "200")
    slowest = sorted(results, key=lambda r: -r[1])[:10]
    return {"soak": {k: v for k, v in asdict(soak).items() if k != "url"},
            "requests": len(results), "answered": statuses.get("200", 0),
            "failed": {k: v for k, v in statuses.items() if k != "200"},
            "p50_s": float(np.percentile(ok, 50)) if ok.size else None,
            "p99_s": float(np.percentile(ok, 99)) if ok.size else None,
            "wall_s": wall, "tokens_answered": tokens, "tokens_per_s": tokens / wall if wall else 0.0,
            "kills": kills, "errors": dict(errors.most_common(5)),
            # when the slowest were sent, beside the kills' times: what a death costs the requests it meets
            "slowest": [{"sent_at_s": round(r[3], 2), "seconds": round(r[1], 3), "status": r[0], "tokens": r[2]}
                        for r in slowest]}


def kill_local_replica(app: str, deployment: str = "EmbeddingService") -> int:
    """SIGKILL one model replica of service `app` (the one Serve routes a `prepare` call to), as a lost
    node or an out-of-memory kill would; its pid. The replica must run on this machine."""
    from ray import serve

    pid = serve.get_deployment_handle(deployment, app_name=app).prepare.remote(None).result(timeout_s=60)["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def summary(result: dict) -> str:
    failed = ", ".join(f"{v} x {k}" for k, v in result["failed"].items()) or "none"
    p50, p99 = result["p50_s"], result["p99_s"]
    latency = f"p50 {p50:.3f} s, p99 {p99:.3f} s" if p50 is not None else "no answers"
    return (f"{result['requests']} requests: {result['answered']} answered, failed: {failed}; {latency}; "
            f"{result['tokens_per_s'] / 1e3:.1f} K tokens/s; {len(result['kills'])} replica(s) killed")
