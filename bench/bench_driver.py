"""The driver's ceiling: tokens and batches one driver process deals per second of its own CPU.

    python bench/bench_driver.py --out bench/results/driver-<machine>.json [--workloads dnabert_s esm2 esm2-8k]
        [--nodes 2] [--scale 1.0]

A multi-node Ray cluster simulated on one machine (`ray.cluster_utils.Cluster`): a head with one CPU and no
GPU, and --nodes worker nodes with two CPUs and a fake GPU each. `embed(..., device="cpu",
gpus_per_actor=1)` puts one actor on each worker node and none on the head. The actors are `NullEmbedder`s:
they do everything a real actor does (read and tokenise their batch, write a real Parquet part) except the
forward pass, which returns zeros of the model's width. So the run goes as fast as the driver and the
actors' data path allow, and the driver's share is measured apart.

Workloads (issue 27's):
  dnabert_s  300,000 chunks of 500 bp, a tiny DNABERT-S with a BPE tokenizer of 4,096 tokens, 262,144-token
             batches (its default on a GPU)
  esm2       200,000 proteins of VirNucPro's lengths (70% 166 aa, 30% 30-165 aa), a tiny ESM-2, 65,536-token
             batches (its default on a GPU)
  esm2-8k    the same proteins in 8,192-token batches: batches per second
(--scale multiplies the counts.)

Reported per workload: the driver process's CPU seconds (getrusage: all its threads, Ray's core worker
included) over the whole `embed` call and over its dealing phase (from the plan to the last part), per
million tokens and per batch; tokens and batches dealt per wall second; the driver's peak resident and
anonymous memory; the run's timeline. Ray's own processes and the actors are not the driver and are not
counted. The same script runs against an earlier checkout (PYTHONPATH=that checkout) for a before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actors.embedder import Embedder  # noqa: E402


class NullEmbedder(Embedder):
    """An actor that reads, tokenises and writes like `Embedder` but computes no forward pass: zeros of
    the model's width (the driver's benchmark, and tests of the data path at scale)."""

    def _compute(self, batch, columns, dtype, attempt=0):
        rows = len(batch.seq_tokens)
        return {c.name: np.zeros((rows, self.model.dim), np.float32) for c in columns}, 0.0


def write_chunks(path: Path, n: int, length: int = 500, seed: int = 0) -> None:
    """n random DNA chunks of `length` bases, wrapped at 60 columns, ids c0.."""
    rng = np.random.default_rng(seed)
    bases = np.frombuffer(b"ACGT", np.uint8)
    with open(path, "wb") as f:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            seqs = rng.choice(bases, (m, length)).tobytes()
            out = []
            for i in range(m):
                s = seqs[i * length:(i + 1) * length]
                out.append(b">c%d\n%s\n" % (start + i, b"\n".join(s[j:j + 60] for j in range(0, length, 60))))
            f.write(b"".join(out))


def write_proteins(path: Path, n: int, seed: int = 0) -> None:
    """n proteins of VirNucPro's 500 bp chunks: 70% 166 aa, 30% uniform 30-165 aa."""
    rng = np.random.default_rng(seed)
    amino = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    with open(path, "wb") as f:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            lengths = np.where(rng.random(m) < 0.7, 166, rng.integers(30, 166, m))
            letters = rng.choice(amino, int(lengths.sum())).tobytes()
            out, pos = [], 0
            for i, length in enumerate(lengths.tolist()):
                out.append(b">p%d\n%s\n" % (start + i, letters[pos:pos + length]))
                pos += length
            f.write(b"".join(out))


class Sampler:
    """The process's CPU seconds and memory, sampled every 50 ms against wall time."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []  # (wall, cpu)
        self.peak_rss = self.peak_anon = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self.cpu()))
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
                    elif line.startswith("RssAnon:"):
                        self.peak_anon = max(self.peak_anon, int(line.split()[1]) * 1024)
            time.sleep(0.05)

    def cpu_at(self, wall: float) -> float:
        walls = [w for w, _ in self.samples]
        return float(np.interp(wall, walls, [c for _, c in self.samples]))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.samples.append((time.time(), self.cpu()))


def run_workload(name: str, fasta: Path, model: Path, toks: int | None, out: Path) -> dict:
    from cluster.driver import embed
    from cluster.progress import Timeline

    timeline = Timeline()
    with Sampler() as s:
        cpu0 = s.cpu()
        start = time.perf_counter()
        res = embed(fasta, out, str(model), actor_class=NullEmbedder, timeline=timeline, device="cpu",
                    gpus_per_actor=1, toks_per_batch=toks, progress=False)
        wall = time.perf_counter() - start
        cpu = s.cpu() - cpu0
    marks = res.timeline
    dealing = None
    if "planned" in marks and "last_part" in marks:
        a, b = timeline.origin + marks["planned"], timeline.origin + marks["last_part"]
        dealing = {"seconds": b - a, "cpu_seconds": s.cpu_at(b) - s.cpu_at(a)}
    tokens, batches = res.tokens_computed, res.num_batches
    row = {
        "workload": name, "sequences": res.num_sequences, "tokens": tokens, "batches": batches,
        "toks_per_batch": toks, "actors": len(res.actors), "actor_nodes": len({a["node_id"] for a in res.actors}),
        "wall_seconds": round(wall, 2), "driver_cpu_seconds": round(cpu, 2),
        "driver_cpu_seconds_per_m_tokens": round(cpu / (tokens / 1e6), 4),
        "tokens_per_second": round(tokens / res.compute_seconds), "batches_per_second": round(batches / res.compute_seconds, 1),
        "driver_peak_rss_mib": round(s.peak_rss / 2**20, 1), "driver_peak_anon_mib": round(s.peak_anon / 2**20, 1),
        "timeline": marks,
    }
    if dealing:
        row["dealing"] = {
            "seconds": round(dealing["seconds"], 2), "driver_cpu_seconds": round(dealing["cpu_seconds"], 2),
            "driver_cpu_seconds_per_m_tokens": round(dealing["cpu_seconds"] / (tokens / 1e6), 4),
            "driver_cpu_ms_per_batch": round(1e3 * dealing["cpu_seconds"] / batches, 3),
            "batches_per_driver_cpu_second": round(batches / max(dealing["cpu_seconds"], 1e-9), 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workloads", nargs="+", default=["dnabert_s", "esm2", "esm2-8k"])
    p.add_argument("--nodes", type=int, default=2, help="worker nodes (one actor each)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the sequence counts")
    p.add_argument("--note", default="", help="what this run measures (recorded in the JSON)")
    args = p.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from virnucpro.models.tiny import write_dnabert_s_dir, write_esm2_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-driver-"))
    models = {"dnabert_s": write_dnabert_s_dir(tmp / "dnabert", vocab_size=4096),
              "esm2": write_esm2_checkpoint(tmp / "esm2_tiny.pt", 2, 64, 4)}
    n_dna, n_prot = int(300_000 * args.scale), int(200_000 * args.scale)
    write_chunks(tmp / "chunks.fa", n_dna)
    write_proteins(tmp / "proteins.faa", n_prot)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, logging_level="ERROR")
    rows = []
    try:
        # the budgets of a GPU run (the CPU default, 4,096 tokens, would measure a CPU run's many small batches)
        plan = {"dnabert_s": ("chunks.fa", "dnabert_s", 262144), "esm2": ("proteins.faa", "esm2", 65536),
                "esm2-8k": ("proteins.faa", "esm2", 8192)}
        for name in args.workloads:
            fasta, model, toks = plan[name]
            rows.append(run_workload(name, tmp / fasta, models[model], toks, tmp / f"out-{name}"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"benchmark": "bench_driver", "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
              "device": "cpu (null actors)", "commit": commit, "note": args.note,
              "cluster": {"head": {"CPU": 1}, "worker_nodes": args.nodes, "per_worker": {"CPU": 2, "GPU (fake)": 1}},
              "python": sys.version.split()[0], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
