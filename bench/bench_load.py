"""Load test: 10^6 proteins through 4 CPU actors with a tiny ESM-2, end to end.

    python bench/bench_load.py [--n 1000000] [--num-actors 4] [--out bench/results/load-HOST.json]

Writes a FASTA of --n random proteins (30-200 residues) and a tiny random ESM-2 checkpoint (2 layers,
64 dim), starts a local Ray with one CPU slot per actor, and runs the real pipeline (`cluster.embed`:
index, plan, loader threads, actors, Parquet parts, manifest) in this process. Reports throughput
(sequences/s, tokens/s), the driver's peak memory (VmHWM, and peak anonymous memory, sampled), each
actor's peak resident memory (VmHWM of the `ray::Embedder` processes, sampled every 0.25 s until they
exit, matched to `EmbedResult.actors` by pid), and checks that the output is complete: manifest
complete, one row per input record, every id once, every record number 0..n-1 once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_driver_memory import write_fasta  # noqa: E402


def status(pid: int | str = "self") -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class Sampler(threading.Thread):
    """Peak memory of this process (the driver) and of every `ray::Embedder` process while they live."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval = interval
        self.stop = threading.Event()
        self.driver_anon = 0
        self.actors: dict[int, dict[str, int]] = {}  # pid -> peak VmHWM, VmRSS

    def run(self) -> None:
        while not self.stop.is_set():
            self.driver_anon = max(self.driver_anon, status().get("RssAnon", 0))
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if not f.read(64).startswith(b"ray::Embedder"):
                            continue
                except OSError:
                    continue
                s = status(entry)
                if s:
                    peak = self.actors.setdefault(int(entry), {"VmHWM": 0, "VmRSS": 0})
                    peak["VmHWM"] = max(peak["VmHWM"], s.get("VmHWM", 0))
                    peak["VmRSS"] = max(peak["VmRSS"], s.get("VmRSS", 0))
            self.stop.wait(self.interval)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="sequences (default 10^6)")
    ap.add_argument("--lengths", type=int, nargs=2, default=[30, 200], help="shortest and longest protein")
    ap.add_argument("--num-actors", type=int, default=4)
    ap.add_argument("--toks-per-batch", type=int, default=16384)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"load-{platform.node()}.json")
    args = ap.parse_args()

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from cluster.driver import embed
    from virnucpro.io.output import Manifest
    from virnucpro.models.tiny import write_esm2_checkpoint

    mib = 1 << 20
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        model = write_esm2_checkpoint(work / "esm2_tiny.pt", num_layers=2, embed_dim=64, attention_heads=4)
        fasta = work / "load.faa"
        start = time.perf_counter()
        residues = write_fasta(fasta, args.n, lengths=tuple(args.lengths))
        print(f"wrote {args.n:,} proteins ({residues:,} residues, {fasta.stat().st_size / mib:.0f} MiB) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)

        ray.init(num_cpus=args.num_actors, include_dashboard=False, logging_level="ERROR")
        baseline = status()
        sampler = Sampler()
        sampler.start()
        try:
            start = time.perf_counter()
            result = embed(fasta, work / "out", model, device="cpu", num_actors=args.num_actors,
                           toks_per_batch=args.toks_per_batch, progress=False)
            seconds = time.perf_counter() - start
            time.sleep(1.0)  # the actors exit after the run; their last samples are in
        finally:
            sampler.stop.set()
            sampler.join()
            ray.shutdown()
        driver = status()
        print(result.summary(), flush=True)

        # completeness, from the files themselves
        manifest = Manifest.load(work / "out")
        table = pq.read_table(work / "out", columns=["id", "index"])
        ids_unique = pc.count_distinct(table.column("id")).as_py()
        index = np.sort(table.column("index").to_numpy())
        complete = bool(manifest.complete and table.num_rows == args.n and ids_unique == args.n
                        and np.array_equal(index, np.arange(args.n)))
        output_mib = sum(p.stat().st_size for p in (work / "out").glob("part-*.parquet")) / mib

    pids = {int(a["pid"]): a["actor"] for a in result.actors}
    actors = [{"actor": pids[pid], "peak_rss_mib": round(peak["VmHWM"] / mib, 1)}
              for pid, peak in sorted(sampler.actors.items()) if pid in pids]
    report = {
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "model": "esm2 tiny random (2 layers, 64 dim)", "device": "cpu", "num_actors": args.num_actors,
        "toks_per_batch": args.toks_per_batch, "protein_lengths": args.lengths,
        "sequences": args.n, "residues": residues, "batches": result.num_batches,
        "tokens": result.tokens_computed,
        "seconds_total": round(seconds, 1), "seconds_embedding": round(result.compute_seconds, 1),
        "sequences_per_second": round(args.n / result.compute_seconds),
        "sequences_per_second_total": round(args.n / seconds),
        "tokens_per_second": round(result.tokens_per_second),
        "driver_peak_rss_mib": round(driver.get("VmHWM", 0) / mib, 1),
        "driver_peak_anon_mib": round(sampler.driver_anon / mib, 1),
        "driver_baseline_rss_mib": round(baseline.get("VmRSS", 0) / mib, 1),
        "actors": actors,
        "actor_peak_rss_mib_max": max((a["peak_rss_mib"] for a in actors), default=None),
        "output_mib": round(output_mib, 1),
        "complete": complete, "manifest_complete": manifest.complete, "rows": table.num_rows,
        "unique_ids": ids_unique,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if not complete or len(actors) != args.num_actors:
        raise SystemExit(f"load test failed: complete={complete}, {len(actors)} actor(s) measured")


if __name__ == "__main__":
    main()
