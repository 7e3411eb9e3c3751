"""The warm service on one GPU: request latency, concurrent clients, a job through it, against the bare model.

    python bench/bench_service.py --out bench/results/service-<gpu>.json [--model esm2_3B] [-n 20000]
    python bench/bench_service.py --scaling --out bench/results/service-scaling-<gpu>x<G>.json [-n 60000]
    python bench/bench_service.py --scaling --tiny --out /tmp/scaling.json -n 2000   # CPU smoke run

Writes a random-weight checkpoint of the real shape (fair-esm `.pt`, bf16) and a seeded FASTA of
VirNucPro's protein lengths, starts a local Ray and `virnucpro serve` with one replica per GPU, then:
  latency      100-protein HTTP requests (JSON) one after another: p50 and p99 seconds;
  concurrent   8 clients, each sending 1,000-protein requests (Arrow IPC): aggregate tokens/s;
  job          `embed(..., service=NAME)` on the whole FASTA: wall clock, first part, tokens/s;
  bare         the same model compiled in this process on planned batches pre-staged on the GPU
               (bench_e2e.bare_model), tokens/s: what the ratios are taken against.

--scaling (issue 11's multi-GPU target: the 60,000-protein job >= 3.5x faster through a 4-GPU service
than through a 1-GPU one, >= 1.8x with 2 GPUs): a service of 1 replica, then one of G (one per GPU),
each warmed by an untimed job of --warmup proteins and then given the same job of n proteins; wall
clock from the call's start, first part and tokens/s of each, and their ratio. ESM-2 3B, n = 60,000
(10.4 M tokens) on 2 H200s: ~6 minutes in all (checkpoint ~1 min, two service starts ~40 s each, jobs
~115 s and ~60 s). `--tiny`: a 2-layer ESM-2 on CPU replicas, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_e2e import SHAPES, bare_model, write_inputs  # noqa: E402

PORT = 8765
TINY = "esm2_tiny"
SHAPES.setdefault(TINY, (2, 64, 4))  # layers, width, heads: the --tiny smoke run's ESM-2


def post(records: list[tuple[str, str]], token: str, arrow: bool) -> float:
    body = json.dumps({"sequences": [{"id": i, "sequence": s} for i, s in records]}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}",
               "Accept": "application/vnd.apache.arrow.stream" if arrow else "application/json"}
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{PORT}/bench", body, headers),
                                timeout=600) as r:
        data = r.read()
    seconds = time.perf_counter() - start
    if arrow:
        import pyarrow as pa

        assert pa.ipc.open_stream(io.BytesIO(data)).read_all().num_rows == len(records)
    else:
        assert len(json.loads(data)["embeddings"]) == len(records)
    return seconds


def read_records(fasta: Path) -> list[tuple[str, str]]:
    lines = fasta.read_text().split("\n")
    return [(lines[i][1:], lines[i + 1]) for i in range(0, len(lines) - 1, 2)]


def scaling_job(ckpt: Path, fasta: Path, warmup: Path, work: Path, replicas: int, opts) -> dict:
    """Start a service of `replicas` replicas, warm it with an untimed job, time the job on `fasta`, stop it."""
    from cluster.driver import embed
    from cluster.service import start_service, stop_service

    name = f"scaling-{replicas}"
    t = time.perf_counter()
    start_service(str(ckpt), name, replicas=replicas, opts=opts, http_port=PORT)
    started = time.perf_counter() - t
    embed(warmup, work / f"warmup-{replicas}", None, service=name, progress=False, overwrite=True)
    t = time.perf_counter()
    job = embed(fasta, work / f"job-{replicas}", None, service=name, progress=False, overwrite=True)
    wall = time.perf_counter() - t
    stop_service(name)
    row = {"replicas": replicas, "replicas_used": len(job.actors), "service_start_seconds": started,
           "sequences": job.num_sequences, "tokens": job.tokens_computed, "wall_seconds": wall,
           "compute_seconds": job.compute_seconds, "tokens_per_s": job.tokens_per_second,
           "first_part_seconds": job.timeline.get("first_part"), "timeline": job.timeline}
    print(f"{replicas} replica(s): service up in {started:.1f} s; job of {job.num_sequences} proteins "
          f"{wall:.1f} s wall, {job.tokens_per_second / 1e3:.1f} K tokens/s, first part after "
          f"{row['first_part_seconds']} s", flush=True)
    return row


def scaling(args: argparse.Namespace) -> dict:
    """The same job through a 1-replica service and a G-replica one (one replica per GPU)."""
    import ray
    import torch

    from virnucpro.options import EmbedOptions

    work = args.work or Path(tempfile.mkdtemp(prefix="service-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    model = TINY if args.tiny else args.model
    fasta, ckpt = write_inputs(model, args.n, work)
    warmup = work / "warmup.fasta"  # the FASTA's first proteins (two lines a record)
    warmup.write_text("".join(fasta.read_text().splitlines(keepends=True)[:2 * args.warmup]))
    cuda = torch.cuda.is_available() and not args.tiny
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"]
    many = args.replicas or (len(names) if cuda else 2)
    opts = EmbedOptions() if cuda else EmbedOptions(device="cpu")
    result = {"gpu": names[0], "gpu_names": names, "gpus": len(names) if cuda else 0, "model": model,
              "n": args.n, "torch": torch.__version__, "host": platform.node(), "date": time.strftime("%Y-%m-%d"),
              "target_ratio": 3.5 if many >= 4 else 1.8}
    ray.init(logging_level="WARNING", **({} if cuda else {"num_cpus": many}))
    try:
        result["one"] = scaling_job(ckpt, fasta, warmup, work, 1, opts)
        result["many"] = scaling_job(ckpt, fasta, warmup, work, many, opts)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    one, m = result["one"], result["many"]
    result["ratio_wall"] = one["wall_seconds"] / m["wall_seconds"]
    result["ratio_tokens_per_s"] = m["tokens_per_s"] / one["tokens_per_s"]
    result["target_met"] = result["ratio_wall"] >= result["target_ratio"]
    print(f"1 -> {many} replicas: wall clock {result['ratio_wall']:.2f}x faster (target {result['target_ratio']}x), "
          f"tokens/s {result['ratio_tokens_per_s']:.2f}x", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="esm2_3B")
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--requests", type=int, default=50, help="timed 100-protein requests")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=4, help="1,000-protein requests per client")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--scaling", action="store_true", help="the same job through a 1-replica and a G-replica service")
    ap.add_argument("--replicas", type=int, default=None, help="--scaling: G (default: one per GPU; 2 with --tiny)")
    ap.add_argument("--warmup", type=int, default=4000, help="--scaling: proteins of the untimed warm-up job")
    ap.add_argument("--tiny", action="store_true", help="--scaling: a 2-layer ESM-2 on CPU replicas (smoke run)")
    args = ap.parse_args()
    if args.scaling:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(scaling(args), indent=1, default=str))
        return
    import ray
    import torch

    from cluster.driver import embed
    from cluster.service import start_service
    from virnucpro.options import EmbedOptions

    work = args.work or Path(tempfile.mkdtemp(prefix="service-"))
    work.mkdir(parents=True, exist_ok=True)
    fasta, ckpt = write_inputs(args.model, args.n, work)
    records = read_records(fasta)
    tokens_of = lambda recs: sum(len(s) + 2 for _, s in recs)  # noqa: E731 - <cls> and <eos> included
    result = {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "host": platform.node(), "model": args.model, "date": time.strftime("%Y-%m-%d")}

    ray.init(logging_level="WARNING")
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    t = time.perf_counter()
    start_service(str(ckpt), "bench", replicas=torch.cuda.device_count(), opts=EmbedOptions(), http_port=PORT)
    result["service_start_seconds"] = time.perf_counter() - t
    print(f"service up in {result['service_start_seconds']:.1f} s", flush=True)

    rng = np.random.default_rng(1)
    sample = lambda k: [records[i] for i in rng.choice(len(records), k, replace=False)]  # noqa: E731
    for _ in range(3):
        post(sample(100), token, arrow=False)  # warm-up: first shapes, connections
    for arrow in (False, True):
        lat = np.array([post(sample(100), token, arrow) for _ in range(args.requests)])
        key = "latency_100_proteins_" + ("arrow" if arrow else "json")
        result[key] = {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                       "mean": float(lat.mean()), "requests": len(lat)}
        print(f"100-protein requests ({key}): p50 {result[key]['p50']:.3f} s, p99 {result[key]['p99']:.3f} s",
              flush=True)

    batches = [[sample(1000) for _ in range(args.per_client)] for _ in range(args.clients)]
    t = time.perf_counter()
    threads = [threading.Thread(target=lambda reqs: [post(r, token, arrow=True) for r in reqs], args=(b,))
               for b in batches]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    total = sum(tokens_of(r) for b in batches for r in b)
    result["concurrent"] = {"clients": args.clients, "requests": args.clients * args.per_client,
                            "proteins_per_request": 1000, "tokens": total, "seconds": wall,
                            "tokens_per_s": total / wall}
    print(f"{args.clients} clients x {args.per_client} x 1000 proteins: {total / wall / 1e3:.1f} K tokens/s", flush=True)

    t = time.perf_counter()
    job = embed(fasta, work / "job", None, service="bench", progress=False, overwrite=True)
    result["job"] = {"sequences": job.num_sequences, "tokens": job.tokens_computed, "wall_seconds": time.perf_counter() - t,
                     "compute_seconds": job.compute_seconds, "tokens_per_s": job.tokens_per_second,
                     "first_part_seconds": job.timeline.get("first_part"), "timeline": job.timeline}
    print(f"job of {job.num_sequences} proteins through the service: {result['job']['wall_seconds']:.1f} s wall, "
          f"{job.tokens_per_second / 1e3:.1f} K tokens/s, first part after {job.timeline.get('first_part')} s",
          flush=True)
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    toks = 65536
    bare = bare_model(ckpt, fasta, toks, work)
    result["bare_model"] = bare
    result["ratios"] = {"concurrent_vs_bare": result["concurrent"]["tokens_per_s"] / bare["tokens_per_s"],
                        "job_vs_bare": result["job"]["tokens_per_s"] / bare["tokens_per_s"]}
    print(f"bare {bare['tokens_per_s'] / 1e3:.1f} K tokens/s; ratios {result['ratios']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
