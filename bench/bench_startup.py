"""Time to the first result, as a user waits for it: `virnucpro embed` from its start to the first part.

    python bench/bench_startup.py --out bench/results/startup-<gpu>.json [--models esm2_3B dnabert_s] [-n 2000]

For each model, writes a random-weight checkpoint of the real shape in the real format (fair-esm `.pt`
in bf16, or a DNABERT-S directory; written here, so in the OS page cache) and a seeded FASTA, then runs
`python -m cluster.cli embed` in a fresh process twice with its own compile cache:
  first   an empty compile cache (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), as on a new machine;
  second  the cache the first run left, as on every later run.
Each run reports its wall clock from the process's spawn and the start-up timeline the driver logs
(seconds from the process's start to: driver started (imports, arguments), model checked, indexed,
Ray up, planned, actor placed, weights loaded, warmed up, first part), and how long the actor's
background compile took (batches run eagerly until it is done). Also `--help`.

`--runs ... ray_running` adds runs that join a Ray started beforehand (`ray start --head`, then
`embed --address auto`), as on a workstation or cluster where Ray stays up: the start-up without
Ray's own. One driver connects and leaves first (Ray prestarts its idle workers for the first driver),
then `--jobs` embeds run one after another. `ray_running_preload` is the same with
`RAY_preload_python_modules=torch,actors.embedder` in `ray start`'s environment, so that Ray's idle
workers import torch and the model code before an actor takes one (docs/cluster.md). `service` starts
Ray and `virnucpro serve start --model` (timed), then runs `--jobs` embeds with `--service`: a job
through replicas that keep the model loaded. Every invocation also records `ray_init`, where `ray.init()`'s seconds go on this machine
(cProfile, cumulative, twice, each in a fresh process): starting the GCS and the dashboard/API server
(ray.init waits until it has written its address), then waiting until the raylet has registered,
then connecting. It refuses to run beside a Ray started with `ray start` (runs would join it), and
the ray_running run stops the Ray it started with `ray stop`: run it on a machine of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_e2e import write_inputs  # noqa: E402

_COMPILED = re.compile(r"layers compiled in (\d+(?:\.\d+)?) s")
_SHUTDOWN = re.compile(r"shut down in (\d+(?:\.\d+)?) s \(actors (\d+(?:\.\d+)?) s, Ray (\d+(?:\.\d+)?) s\)")
_PHASE = re.compile(r"([a-z][a-z ]*?) (\d+(?:\.\d+)?) s")


def timeline_of(log: str) -> dict[str, float]:
    """The driver's 'start-up: driver started 4.7 s, ..., first part 18.4 s' line, as a dict."""
    line = next((ln for ln in log.splitlines() if "first part written; start-up:" in ln), "")
    return {k.replace(" ", "_"): float(v) for k, v in _PHASE.findall(line.split("start-up:", 1)[-1])}


def cache_env(cache: Path) -> dict[str, str]:
    """This environment with its own compile cache (and this checkout importable)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
            "PYTHONPATH": path}


def run_embed(fasta: Path, ckpt: Path | None, out: Path, cache: Path, extra: list[str]) -> dict:
    """One `virnucpro embed` in a fresh process; `ckpt` None: the service's model (`extra` names it)."""
    env = cache_env(cache)
    model = ["--model", str(ckpt)] if ckpt is not None else []
    cmd = [sys.executable, "-m", "cluster.cli", "embed", str(fasta), "-o", str(out), *model,
           "--overwrite", "--no-progress", *extra]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    timeline = timeline_of(proc.stderr)
    compiled = _COMPILED.search(proc.stderr)  # the actor's background compile, which the first parts do not wait for
    shutdown = _SHUTDOWN.search(proc.stderr)  # logged when it took a second or more
    print(f"  {wall:6.1f} s wall; {timeline}; compile {compiled and compiled.group(1)} s; "
          f"shutdown {shutdown and shutdown.group(0)}", flush=True)
    return {"wall_seconds": round(wall, 2), "timeline": timeline,
            "compile_seconds": float(compiled.group(1)) if compiled else None,
            "shutdown_seconds": float(shutdown.group(1)) if shutdown else None,  # None: under 1 s (not logged)
            "summary": proc.stdout.strip().splitlines()[-1]}


_RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # `ray`, where its script is not on PATH
_RAY_INIT_PROFILE = """
import cProfile, json, pstats, time
t = time.perf_counter(); import ray; imported = time.perf_counter() - t
p = cProfile.Profile(); p.enable(); t = time.perf_counter(); ray.init(logging_level="WARNING")
total = time.perf_counter() - t; p.disable(); ray.shutdown()
wanted = {"start_head_processes": "head processes (GCS, monitor, API server)", "start_api_server":
          "API server (dashboard), until its address is written", "start_raylet": "raylet started",
          "get_node": "waiting for the raylet to register", "connect": "driver connected"}
stats = pstats.Stats(p).stats
out = {"import_ray": round(imported, 2), "init": round(total, 2)}
for (path, _, func), (_, _, _, cum, _) in stats.items():
    if func in wanted and "ray/_private" in path:
        out[wanted[func]] = max(out.get(wanted[func], 0), round(cum, 2))
print(json.dumps(out))
"""


def ray_init_profile() -> dict:
    proc = subprocess.run([sys.executable, "-c", _RAY_INIT_PROFILE], capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def help_seconds(repeat: int = 3) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.time()
        subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, check=True, cwd=ROOT)
        times.append(round(time.time() - start, 3))
    return times


def ray_running_here() -> bool:
    """Whether a Ray started with `ray start` runs on this machine: `ray.init()` would join it, and a
    run meant to start its own Ray would measure no Ray start at all."""
    from ray._private.services import find_gcs_addresses
    return bool(find_gcs_addresses())


PRELOAD = "torch,actors.embedder"  # what Ray's idle workers import before an actor takes one (ray_running_preload)


@contextlib.contextmanager
def ray_head(env: dict[str, str]) -> Iterator[None]:
    """A Ray started with `ray start --head` in `env` (its workers, the actors, inherit the raylet's
    environment), stopped when the block ends."""
    started = subprocess.run([*_RAY_CLI, "start", "--head", "--disable-usage-stats"], capture_output=True, text=True,
                             env=env)
    try:
        if started.returncode:
            raise RuntimeError(f"ray start --head failed:\n{started.stderr[-2000:]}")
        yield
    finally:
        # `ray stop` stops every Ray of this user on the machine: the check in main() made sure it was ours
        subprocess.run([*_RAY_CLI, "stop", "--force"], capture_output=True)


def jobs_in_a_row(jobs: int, fasta: Path, ckpt: Path | None, dir_: Path, extra: list[str]) -> list[dict]:
    """`jobs` runs of `embed ... --address auto` one after another; a failed one is recorded and the
    ones before it still count."""
    runs = []
    for _ in range(jobs):
        try:
            runs.append(run_embed(fasta, ckpt, dir_ / "out", dir_ / "compile-cache", [*extra, "--address", "auto"]))
        except RuntimeError as e:
            print(f"  failed: {e}", flush=True)
            runs.append({"error": str(e)[-3000:]})
    return runs


def ray_running_runs(fasta: Path, ckpt: Path, dir_: Path, extra: list[str], jobs: int, preload: bool,
                     settle: float) -> list[dict]:
    """`jobs` runs of `embed --address auto`, one after another, joining a Ray started beforehand with
    this model's compile cache. A driver connects and leaves first, then `settle` seconds pass: a Ray
    that has been up a while. That Ray is stopped afterwards."""
    env = cache_env(dir_ / "compile-cache")
    if preload:
        env["RAY_preload_python_modules"] = PRELOAD
    with ray_head(env):
        first = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto', logging_level='ERROR')"],
                               capture_output=True, text=True, env=env)
        if first.returncode:
            raise RuntimeError(f"the first driver could not connect:\n{first.stderr[-2000:]}")
        time.sleep(settle)
        return jobs_in_a_row(jobs, fasta, ckpt, dir_, extra)


def service_runs(fasta: Path, ckpt: Path, dir_: Path, extra: list[str], jobs: int) -> tuple[float, list[dict]]:
    """`jobs` runs of `embed --service`, one after another, through a warm service: `ray start --head`,
    `virnucpro serve start --model` (timed: it returns once the replica has the model loaded), then
    the embeds, which start no actor and load no weights. Returns (serve start's seconds, the runs);
    the service and that Ray are stopped afterwards."""
    env = cache_env(dir_ / "compile-cache")
    with ray_head(env):
        t = time.time()
        served = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "start", "--model", str(ckpt),
                                 "--address", "auto", "--name", "startup"], capture_output=True, text=True, env=env,
                                cwd=ROOT)
        serve_seconds = time.time() - t
        if served.returncode:
            raise RuntimeError(f"serve start failed:\n{served.stderr[-3000:]}")
        print(f"  serve start: {serve_seconds:.1f} s", flush=True)
        try:
            return serve_seconds, jobs_in_a_row(jobs, fasta, None, dir_, [*extra, "--service", "startup"])
        finally:
            subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "stop", "--name", "startup", "--address",
                            "auto"], capture_output=True, env=env, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=["esm2_3B", "dnabert_s"])
    ap.add_argument("-n", type=int, default=2000, help="sequences per input (a small job: start-up dominates)")
    ap.add_argument("--work", type=Path, default=None, help="default: a new temporary directory (an empty compile cache)")
    ap.add_argument("--embed-args", default="", help="extra `virnucpro embed` arguments, e.g. '--num-actors 1'")
    ap.add_argument("--runs", nargs="+", default=["first", "second"],
                    choices=["first", "second", "ray_running", "ray_running_preload", "service"],
                    help="in this order; ray_running: joining a Ray started beforehand, with the compile cache left; "
                         "ray_running_preload: its idle workers preloading torch and the model code; "
                         "service: `embed --service` through a warm `virnucpro serve start` service")
    ap.add_argument("--jobs", type=int, default=3, help="ray_running and service runs: embeds one after another")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="ray_running runs: seconds between Ray's first driver leaving and the first embed")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs: at least 1")
    if ray_running_here():
        sys.exit("a Ray started with `ray start` runs on this machine: the runs would join it instead of starting "
                 "their own (and ray_running would stop it); stop it first (`ray stop`)")
    work = args.work or Path(tempfile.mkdtemp(prefix="startup-"))
    import torch

    result = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "gpus": torch.cuda.device_count(), "torch": torch.__version__, "host": platform.node(),
              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "n": args.n, "argv": sys.argv[1:],
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       cwd=ROOT).stdout.strip(),
              "help_seconds": help_seconds(), "models": {}}
    print(f"--help: {result['help_seconds']} s", flush=True)
    result["ray_init"] = [ray_init_profile() for _ in range(2)]
    print(f"ray.init: {result['ray_init']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        dir_ = work / model
        dir_.mkdir(parents=True, exist_ok=True)
        t = time.time()
        fasta, ckpt = write_inputs(model, args.n, dir_)
        print(f"{model}: inputs written in {time.time() - t:.0f} s", flush=True)
        runs = result["models"][model] = {}
        for name in args.runs:
            print(f"{model}, {name} run:", flush=True)
            extra = args.embed_args.split()
            try:
                if name.startswith("ray_running"):
                    preload = name.endswith("preload")
                    jobs = ray_running_runs(fasta, ckpt, dir_, extra, args.jobs, preload, args.settle)
                    # the first job's figures at the top, as before (which then ran with no driver before it)
                    runs[name] = {**jobs[0], "jobs": jobs, "settle_seconds": args.settle,
                                  "ray_preload_python_modules": PRELOAD if preload else None}
                elif name == "service":
                    serve_seconds, jobs = service_runs(fasta, ckpt, dir_, extra, args.jobs)
                    runs[name] = {**jobs[0], "jobs": jobs, "serve_start_seconds": round(serve_seconds, 2)}
                else:
                    runs[name] = run_embed(fasta, ckpt, dir_ / "out", dir_ / "compile-cache", extra)
            except RuntimeError as e:  # one failed run is a result too; the others still count
                print(f"  failed: {e}", flush=True)
                runs[name] = {"error": str(e)[-3000:]}
            args.out.write_text(json.dumps(result, indent=1))  # after each run: a later failure loses nothing


if __name__ == "__main__":
    main()
