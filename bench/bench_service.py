"""The warm service on one GPU: request latency, concurrent clients, a job through it, against the bare model.

    python bench/bench_service.py --out bench/results/service-<gpu>.json [--model esm2_3B] [-n 20000]

Writes a random-weight checkpoint of the real shape (fair-esm `.pt`, bf16) and a seeded FASTA of
VirNucPro's protein lengths, starts a local Ray and `virnucpro serve` with one replica per GPU, then:
  latency      100-protein HTTP requests (JSON) one after another: p50 and p99 seconds;
  concurrent   8 clients, each sending 1,000-protein requests (Arrow IPC): aggregate tokens/s;
  job          `embed(..., service=NAME)` on the whole FASTA: wall clock, first part, tokens/s;
  bare         the same model compiled in this process on planned batches pre-staged on the GPU
               (bench_e2e.bare_model), tokens/s: what the ratios are taken against.
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

from bench.bench_e2e import bare_model, write_inputs  # noqa: E402

PORT = 8765


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="esm2_3B")
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--requests", type=int, default=50, help="timed 100-protein requests")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=4, help="1,000-protein requests per client")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
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
