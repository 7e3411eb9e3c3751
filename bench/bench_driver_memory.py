"""Driver memory against input size: does the embedding driver stay flat as the FASTA grows?

    python bench/bench_driver_memory.py [--sizes 10000 100000 1000000] [--out bench/results/driver-memory.json]

For each size, writes a FASTA of short random proteins (20-40 residues) and a tiny random ESM-2
checkpoint, then runs the real pipeline (`cluster.embed`: index, plan, local Ray, CPU actors, Parquet
parts, manifest) in a fresh Python process that samples its own memory every 20 ms from
/proc/self/status. Reported per size: the driver's peak resident set (VmHWM), its peak anonymous
memory (RssAnon: heap and numpy arrays, what cannot be paged out) and peak file-backed resident
memory (RssFile: includes the memory-mapped index and plan columns, which the kernel can drop), the
baseline before the run (Python, torch, pyarrow, Ray client imported and connected), and the growth
per record between sizes. Ray's own processes (raylet, GCS, actors) are not the driver and are not
counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, {root!r})

def status():
    out = {{}}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out

import ray
from cluster.driver import embed
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
for fasta, out in {jobs!r}:
    peak = {{"RssAnon": 0, "RssFile": 0, "VmRSS": 0}}
    stop = False
    def sample():
        while not stop:
            s = status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.02)
    base = status()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    res = embed(fasta, out, {model!r}, device="cpu", num_actors=2, toks_per_batch={toks},
                progress=False, dataloader_workers=2)
    seconds = time.perf_counter() - start
    stop = True
    t.join()
    print("RESULT " + json.dumps({{"baseline": base, "peak": peak, "end": status(), "seconds": seconds,
                                  "sequences": res.num_sequences, "batches": res.num_batches,
                                  "tokens": res.tokens_computed}}), flush=True)
ray.shutdown()
"""


def write_fasta(path: Path, n: int, seed: int = 0, lengths: tuple[int, int] = (20, 40)) -> int:
    """n random proteins with ids p0..p{n-1}, written in blocks; returns the residues written."""
    import numpy as np

    rng = np.random.default_rng(seed)
    residues = 0
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    with open(path, "wb") as f:
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            sizes = rng.integers(lengths[0], lengths[1] + 1, m)
            seqs = rng.choice(letters, int(sizes.sum())).tobytes()
            pos, lines = 0, []
            for i, length in enumerate(sizes.tolist()):
                lines.append(b">p%d\n%s\n" % (start + i, seqs[pos:pos + length]))
                pos += length
            f.write(b"".join(lines))
            residues += int(sizes.sum())
    return residues


def run_one(n: int, work: Path, model: Path, toks: int, lengths: tuple[int, int] = (20, 40)) -> dict:
    """Embed n random proteins in a fresh driver process; its memory figures (bytes) and timings."""
    return run_in_one_process([n], work, model, toks, lengths)[0]


def run_in_one_process(sizes: list[int], work: Path, model: Path, toks: int,
                       lengths: tuple[int, int] = (20, 40)) -> list[dict]:
    """Embed inputs of the given sizes one after the other in one driver process (one Ray start-up);
    the peaks are sampled per run."""
    jobs = []
    for i, n in enumerate(sizes):
        fasta = work / f"in-{i}-{n}.faa"
        write_fasta(fasta, n, lengths=lengths)
        jobs.append((str(fasta), str(work / f"out-{i}-{n}")))
    code = CHILD.format(root=str(ROOT), jobs=jobs, model=str(model), toks=toks)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ""})
    results = [json.loads(ln.removeprefix("RESULT ")) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or len(results) != len(sizes):
        raise SystemExit(f"sizes {sizes} failed:\n{proc.stderr[-4000:]}")
    for r, (fasta, _) in zip(results, jobs):
        r["input_bytes"] = Path(fasta).stat().st_size
        Path(fasta).unlink()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--toks-per-batch", type=int, default=16384)
    ap.add_argument("--lengths", type=int, nargs=2, default=[20, 40], help="shortest and longest protein")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"driver-memory-{platform.node()}.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from virnucpro.models.tiny import write_esm2_checkpoint

    mib = 1 << 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_esm2_checkpoint(work / "esm2_tiny.pt", num_layers=2, embed_dim=64, attention_heads=4)
        for n in args.sizes:
            r = run_one(n, work, model, args.toks_per_batch, tuple(args.lengths))
            row = {"sequences": n, "batches": r["batches"], "tokens": r["tokens"], "seconds": round(r["seconds"], 1),
                   "input_mib": round(r["input_bytes"] / mib, 1),
                   "baseline_rss_mib": round(r["baseline"]["VmRSS"] / mib, 1),
                   "peak_rss_mib": round(r["peak"]["VmRSS"] / mib, 1),
                   "peak_anon_mib": round(r["peak"]["RssAnon"] / mib, 1),
                   "peak_file_mib": round(r["peak"]["RssFile"] / mib, 1),
                   "anon_growth_mib": round((r["peak"]["RssAnon"] - r["baseline"]["RssAnon"]) / mib, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    per_record = None
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        per_record = (b["peak_anon_mib"] - a["peak_anon_mib"]) * mib / (b["sequences"] - a["sequences"])
        print(f"peak anonymous memory grows {per_record:.1f} bytes/record from {a['sequences']:,} to "
              f"{b['sequences']:,} sequences ({a['peak_anon_mib']} -> {b['peak_anon_mib']} MiB)")
    result = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "toks_per_batch": args.toks_per_batch, "protein_lengths": args.lengths, "model": "esm2 tiny random (2 layers, 64 dim)",
              "runs": rows, "anon_bytes_per_record": per_record, "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
