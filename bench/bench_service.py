"""The warm service: request latency, concurrent clients, a job through it, against the bare model; a soak.

    python bench/bench_service.py --out bench/results/service-<gpu>.json [--model esm2_3B] [-n 20000]
    python bench/bench_service.py --latency --out bench/results/service-latency-<gpu>.json
    python bench/bench_service.py --soak --out bench/results/service-soak-<gpu>.json [--kill-at 10]
    python bench/bench_service.py --scaling --out bench/results/service-scaling-<gpu>x<G>.json [-n 60000]
    python bench/bench_service.py --soak --tiny --out bench/results/service-soak-cpu-2core-vm.json  # CPU
    python bench/bench_service.py --latency --tiny --out /tmp/latency.json                        # CPU

Writes a random-weight checkpoint of the real shape (fair-esm `.pt`, bf16) and a seeded FASTA of
VirNucPro's protein lengths, starts a local Ray and `virnucpro serve` with one replica per GPU, then:
  latency      100-protein HTTP requests one after another, as JSON and as Arrow IPC, in the same run:
               p50 and p99 seconds of each, and their ratio (`--latency`: this alone); beside it the
               cost of encoding 100 embeddings of `--width` floats each way, in this process;
  concurrent   8 clients, each sending 1,000-protein requests (Arrow IPC): aggregate tokens/s;
  job          `embed(..., service=NAME)` on the whole FASTA: wall clock, first part, tokens/s;
  bare         the same model compiled in this process on planned batches pre-staged on the GPU
               (bench_e2e.bare_model), tokens/s: what the ratios are taken against.

--soak: `--clients` clients send `--requests` requests (or for `--duration` seconds) of 1-150
proteins (`--proteins A B`) to a service of `--replicas` replicas (default: one per GPU; 2 with
--tiny), and a replica is SIGKILLed at each of `--kill-at` seconds; reports the requests answered,
those failed by status, p50/p99 of the answered and their tokens/s (bench/soak.py).

--scaling (issue 11's multi-GPU target: the 60,000-protein job >= 3.5x faster through a 4-GPU service
than through a 1-GPU one, >= 1.8x with 2 GPUs): a service of 1 replica, then one of G (one per GPU),
each warmed by an untimed job of --warmup proteins and then given the same job of n proteins; wall
clock from the call's start, first part and tokens/s of each, and their ratio. ESM-2 3B, n = 60,000
(10.4 M tokens) on 2 H200s: ~6 minutes in all (checkpoint ~1 min, two service starts ~40 s each, jobs
~115 s and ~60 s).

`--tiny`: a 2-layer ESM-2 of width 64 on CPU replicas, for any mode: checks the script without a GPU,
and on CPU measures what the service adds around the model. `--stub-width W` (with --tiny): replicas
answer W-wide vectors without the model's compute, so the HTTP path (proxy, encoding, transfer) is
timed at a real model's width (ESM-2 3B: 2560) on a machine without a GPU.
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


def latency(records: list[tuple[str, str]], token: str, requests: int, seed: int = 1) -> dict:
    """100-protein requests one after another, JSON then Arrow IPC, on the same samples of `records`."""
    rng = np.random.default_rng(seed)
    samples = [[records[i] for i in rng.choice(len(records), 100, replace=False)] for _ in range(requests)]
    for sample in samples[:3]:
        post(sample, token, arrow=False)  # warm-up: first shapes, connections
    out = {}
    for arrow in (False, True):
        lat = np.array([post(sample, token, arrow) for sample in samples])
        key = "latency_100_proteins_" + ("arrow" if arrow else "json")
        out[key] = {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                    "mean": float(lat.mean()), "requests": len(lat)}
        print(f"100-protein requests ({key}): p50 {out[key]['p50']:.4f} s, p99 {out[key]['p99']:.4f} s", flush=True)
    out["json_vs_arrow_p50"] = out["latency_100_proteins_json"]["p50"] / out["latency_100_proteins_arrow"]["p50"]
    print(f"JSON / Arrow at the median: {out['json_vs_arrow_p50']:.2f}x", flush=True)
    return out


def encoding_cost(width: int, rows: int = 100, repeats: int = 30) -> dict:
    """Seconds (median) to encode `rows` embeddings of `width` float32 into a response body, each way
    the service has answered: JSON text of Python floats (the json module, as Starlette's JSONResponse
    did before orjson), orjson straight from the numpy array, and Arrow IPC; and the bodies' bytes."""
    import orjson
    import pyarrow as pa

    emb = np.random.default_rng(0).standard_normal((rows, width), np.float32)
    ids = [f"p{i}" for i in range(rows)]

    def stdlib_json() -> bytes:
        return json.dumps({"ids": ids, "embeddings": emb.tolist()}, separators=(",", ":")).encode()

    def orjson_numpy() -> bytes:
        return orjson.dumps({"ids": ids, "embeddings": emb}, option=orjson.OPT_SERIALIZE_NUMPY)

    def arrow_ipc() -> bytes:
        table = pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), width)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    out = {"rows": rows, "width": width}
    for name, encode in (("json_stdlib", stdlib_json), ("orjson_numpy", orjson_numpy), ("arrow_ipc", arrow_ipc)):
        seconds = []
        for _ in range(repeats):
            t = time.perf_counter()
            body = encode()
            seconds.append(time.perf_counter() - t)
        out[name] = {"seconds_p50": float(np.median(seconds)), "bytes": len(body)}
        print(f"encode {rows} x {width} floats, {name}: {out[name]['seconds_p50'] * 1e3:.1f} ms, "
              f"{len(body) / 1e6:.2f} MB", flush=True)
    return out


def stub_replica(width: int) -> type:
    """Replicas of the tiny model that answer `width`-wide vectors without computing them: the HTTP
    path (proxy, parsing, encoding, transfer) at a real model's width, on a machine without its GPU."""
    from actors.embedder import Embedder

    class Wider:
        def __init__(self, model):
            self.model, self.dim = model, width

        def __getattr__(self, name):
            return getattr(self.model, name)

    class StubEmbedder(Embedder):
        def __init__(self, config):
            super().__init__(config)
            self.model = Wider(self.model)

        def compute(self, batch):
            return np.random.default_rng(batch.batch_id).standard_normal((len(batch.index), width), np.float32)

    return StubEmbedder


class Service:
    """Ray and the service "bench" on it, for one mode's measurements: `with Service(args) as s: ...`."""

    def __init__(self, args: argparse.Namespace, replicas: int | None = None):
        import torch

        self.args, self.cuda = args, torch.cuda.is_available() and not args.tiny
        self.work = args.work or Path(tempfile.mkdtemp(prefix="service-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.model = TINY if args.tiny else args.model
        self.fasta, self.ckpt = write_inputs(self.model, args.n, self.work)
        self.replicas = replicas or args.replicas or (torch.cuda.device_count() if self.cuda else 2)
        self.info = {"gpu": torch.cuda.get_device_name() if self.cuda else "cpu",
                     "gpus": torch.cuda.device_count() if self.cuda else 0, "torch": torch.__version__,
                     "host": platform.node(), "model": self.model, "replicas": self.replicas,
                     "stub_width": args.stub_width, "date": time.strftime("%Y-%m-%d")}

    def __enter__(self) -> "Service":
        import ray

        from cluster.service import start_service
        from virnucpro.options import EmbedOptions

        # on CPU a Ray of its own, never one running on this machine (whose CPUs the replicas would share)
        ray.init(logging_level="WARNING", **({} if self.cuda else {"address": "local", "num_cpus": self.replicas + 1}))
        self.token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        opts = EmbedOptions() if self.cuda else EmbedOptions(device="cpu")
        stub = {"actor_class": stub_replica(self.args.stub_width)} if self.args.stub_width else {}
        # more replicas than GPUs share them (two 3B replicas fit one 80 GB GPU): the soak's kill on one GPU
        share = self.info["gpus"] / self.replicas if self.cuda and self.replicas > self.info["gpus"] else None
        t = time.perf_counter()
        start_service(str(self.ckpt), "bench", replicas=self.replicas, gpus_per_replica=share, opts=opts, http_port=PORT,
                      **stub)
        self.info["service_start_seconds"] = time.perf_counter() - t
        print(f"service up in {self.info['service_start_seconds']:.1f} s", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def latency_mode(args: argparse.Namespace) -> dict:
    with Service(args) as s:
        result = {**s.info, **latency(read_records(s.fasta), s.token, args.requests)}
    result["encoding"] = encoding_cost(args.width)
    return result


def soak_mode(args: argparse.Namespace) -> dict:
    from bench.soak import Soak, kill_local_replica, run_soak, summary

    with Service(args) as s:
        soak = Soak(f"http://127.0.0.1:{PORT}/bench", clients=args.clients, requests=args.requests,
                    duration_s=args.duration, proteins=tuple(args.proteins), arrow=args.arrow,
                    kill_at=tuple(args.kill_at))
        result = {**s.info, **run_soak(soak, s.token, kill=lambda: kill_local_replica("bench"))}
    print(summary(result), flush=True)
    return result


def full(args: argparse.Namespace) -> dict:
    """Latency, concurrent clients and a job through the service, then the bare model (a GPU)."""
    from cluster.driver import embed

    with Service(args) as s:
        result = dict(s.info)
        records, token = read_records(s.fasta), s.token
        result.update(latency(records, token, args.requests))
        rng = np.random.default_rng(2)
        batches = [[[records[i] for i in rng.choice(len(records), 1000, replace=False)]
                    for _ in range(args.per_client)] for _ in range(args.clients)]
        t = time.perf_counter()
        threads = [threading.Thread(target=lambda reqs: [post(r, token, arrow=True) for r in reqs], args=(b,))
                   for b in batches]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        total = sum(len(s) + 2 for b in batches for r in b for _, s in r)  # <cls> and <eos> included
        result["concurrent"] = {"clients": args.clients, "requests": args.clients * args.per_client,
                                "proteins_per_request": 1000, "tokens": total, "seconds": wall,
                                "tokens_per_s": total / wall}
        print(f"{args.clients} clients x {args.per_client} x 1000 proteins: {total / wall / 1e3:.1f} K tokens/s",
              flush=True)
        t = time.perf_counter()
        job = embed(s.fasta, s.work / "job", None, service="bench", progress=False, overwrite=True)
        result["job"] = {"sequences": job.num_sequences, "tokens": job.tokens_computed,
                         "wall_seconds": time.perf_counter() - t, "compute_seconds": job.compute_seconds,
                         "tokens_per_s": job.tokens_per_second, "first_part_seconds": job.timeline.get("first_part"),
                         "timeline": job.timeline}
        print(f"job of {job.num_sequences} proteins through the service: {result['job']['wall_seconds']:.1f} s "
              f"wall, {job.tokens_per_second / 1e3:.1f} K tokens/s, first part after "
              f"{job.timeline.get('first_part')} s", flush=True)
    bare = bare_model(s.ckpt, s.fasta, 65536, s.work)
    result["bare_model"] = bare
    result["ratios"] = {"concurrent_vs_bare": result["concurrent"]["tokens_per_s"] / bare["tokens_per_s"],
                        "job_vs_bare": result["job"]["tokens_per_s"] / bare["tokens_per_s"]}
    print(f"bare {bare['tokens_per_s'] / 1e3:.1f} K tokens/s; ratios {result['ratios']}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="esm2_3B")
    ap.add_argument("-n", type=int, default=20000, help="proteins of the FASTA (the job's, and the requests' pool)")
    ap.add_argument("--requests", type=int, default=None,
                    help="timed 100-protein requests each way (default 50); --soak: requests in all (default 600)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=4, help="1,000-protein requests per client")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer ESM-2 on CPU replicas")
    ap.add_argument("--replicas", type=int, default=None, help="(default: one per GPU; 2 with --tiny)")
    ap.add_argument("--latency", action="store_true", help="only 100-protein requests, JSON against Arrow IPC")
    ap.add_argument("--width", type=int, default=2560, help="--latency: embedding width of the encoding costs")
    ap.add_argument("--stub-width", type=int, default=None,
                    help="with --tiny: replicas answer vectors this wide without computing them")
    ap.add_argument("--soak", action="store_true", help="clients with random request sizes, replicas killed")
    ap.add_argument("--duration", type=float, default=600.0, help="--soak: seconds after which no request is sent")
    ap.add_argument("--proteins", type=int, nargs=2, default=[1, 150], metavar=("MIN", "MAX"),
                    help="--soak: proteins per request")
    ap.add_argument("--kill-at", type=float, nargs="*", default=[10.0], metavar="S",
                    help="--soak: seconds after its start at which a replica is SIGKILLed (none: no kill)")
    ap.add_argument("--arrow", action="store_true", help="--soak: ask for Arrow IPC instead of JSON")
    ap.add_argument("--scaling", action="store_true", help="the same job through a 1-replica and a G-replica service")
    ap.add_argument("--warmup", type=int, default=4000, help="--scaling: proteins of the untimed warm-up job")
    args = ap.parse_args()
    if args.requests is None:
        args.requests = 600 if args.soak else 50
    mode = scaling if args.scaling else soak_mode if args.soak else latency_mode if args.latency else full
    result = mode(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
