"""What starting its own local Ray costs a command: `import ray` and `cluster.session.init_ray`, each run in a
fresh process, as `virnucpro embed` does without --address, RAY_ADDRESS or a Ray started on the machine.

    python bench/bench_ray_start.py --out bench/results/ray-start-<machine>.json [--runs 5] [--machine NAME]

Alternates runs without the dashboard (a command's default for an input under 16 MiB) and with it
(--dashboard, or a larger input). Reports per run: seconds to import ray, seconds of `init_ray` (Ray's
processes started and joined), their sum, seconds of `ray.shutdown()`, and the 1-minute load average at
the run's start (a shared machine's other work shows there). CPU only; no model is loaded.

It refuses to run where a Ray started with `ray start` is the machine's current cluster (Ray's rule would
join it rather than start one) or RAY_ADDRESS is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE_RUN = """
import json, sys, time
t0 = time.perf_counter()
import ray
imported = time.perf_counter() - t0
from cluster.session import init_ray
t1 = time.perf_counter()
connected = init_ray(None, "127.0.0.1", dashboard=sys.argv[1] == "1")
started = time.perf_counter() - t1
t2 = time.perf_counter()
ray.shutdown()
print(json.dumps({"import_ray_seconds": imported, "init_ray_seconds": started, "connected": connected,
                  "shutdown_seconds": time.perf_counter() - t2, "ray": ray.__version__}))
"""


def one_run(dashboard: bool) -> dict:
    if Path("/tmp/ray/ray_current_cluster").exists() or os.environ.get("RAY_ADDRESS"):
        sys.exit("a Ray runs here as the machine's current cluster (or RAY_ADDRESS is set): a command would join "
                 "it, not start one; nothing measured")
    load = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", ONE_RUN, "1" if dashboard else "0"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if not row["connected"]:
        sys.exit("init_ray joined a Ray that was already connected; nothing measured")
    row["start_seconds"] = row["import_ray_seconds"] + row["init_ray_seconds"]
    return {"dashboard": dashboard, "load_1min_at_start": round(load, 2), "process_wall_seconds": wall, **row}


def summary(rows: list[dict]) -> dict:
    starts = [r["start_seconds"] for r in rows]
    return {"runs": len(rows), "start_seconds_min": min(starts), "start_seconds_median": statistics.median(starts),
            "start_seconds_max": max(starts),
            "init_ray_seconds_median": statistics.median(r["init_ray_seconds"] for r in rows),
            "import_ray_seconds_median": statistics.median(r["import_ray_seconds"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=5, help="runs with and without the dashboard each")
    ap.add_argument("--machine", default=f"{platform.node()} ({os.cpu_count()} CPUs)")
    args = ap.parse_args()
    rows = []
    for i in range(args.runs):
        for dashboard in (False, True):
            rows.append(one_run(dashboard))
            r = rows[-1]
            print(f"run {i + 1}, dashboard {'on' if dashboard else 'off'}: import ray {r['import_ray_seconds']:.2f} s, "
                  f"init_ray {r['init_ray_seconds']:.2f} s, shutdown {r['shutdown_seconds']:.2f} s "
                  f"(load {r['load_1min_at_start']})", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    result = {"benchmark": "bench_ray_start", "machine": args.machine, "cpus": os.cpu_count(),
              "python": platform.python_version(), "ray": rows[0]["ray"], "date": time.strftime("%Y-%m-%d"),
              "commit": commit,
              "without_dashboard": summary([r for r in rows if not r["dashboard"]]),
              "with_dashboard": summary([r for r in rows if r["dashboard"]]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for key in ("without_dashboard", "with_dashboard"):
        s = result[key]
        print(f"{key}: import ray + init_ray {s['start_seconds_min']:.1f}-{s['start_seconds_max']:.1f} s "
              f"(median {s['start_seconds_median']:.1f})")


if __name__ == "__main__":
    main()
