"""Preprocessing throughput: upstream VirNucPro's rules (per-codon Python loop) vs virnucpro.pipeline.preprocess.

    python3 bench/bench_preprocess.py --mbp 100 [--chunk-size 500 300] [--ref-mbp 2] [--workers N]

Generates a seeded, metagenome-like contig set (log-normal lengths clipped to 1-50 kbp, gene-dense:
stop-free ORFs on both strands between short random spacers, so that chunks keep frames as real
contigs do), writes it as FASTA in a temp dir, then times
  * the reference: tests/test_preprocess.py's literal transcription of upstream's path (Bio.SeqIO
    chunk file written and re-read, per-codon dict translation). It is slow, so it runs on a prefix
    of the contigs (--ref-mbp) and its time is extrapolated per Mbp to the full set;
  * virnucpro.pipeline.preprocess.preprocess_fasta on the full set, in a child process (so its peak RSS is
    its own), serially and with a process pool.
Outputs on the reference prefix are checked byte for byte. Results go to
bench/results/preprocess-<hostname>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_preprocess import CODON_TO_AA, ref_preprocess_files  # noqa: E402

SENSE = np.array([list(c.encode()) for c, aa in sorted(CODON_TO_AA.items()) if aa != "*"], np.uint8)
COMPLEMENT = np.zeros(256, np.uint8)
for a, b in zip(b"ACGT", b"TGCA"):
    COMPLEMENT[a] = b


def make_contig(rng: np.random.Generator, length: int) -> bytes:
    """Gene-dense contig: ORFs of ~100-700 codons, either strand, between random spacers."""
    parts, total = [], 0
    while total < length:
        orf = SENSE[rng.integers(len(SENSE), size=int(rng.integers(100, 700)))].ravel()
        if rng.random() < 0.5:
            orf = COMPLEMENT[orf[::-1]]
        spacer = np.frombuffer(b"ACGT", np.uint8)[rng.integers(4, size=int(rng.integers(20, 200)))]
        parts += [spacer, orf]
        total += len(spacer) + len(orf)
    seq = np.concatenate(parts)[:length]
    if rng.random() < 0.05:  # a few assembly gaps
        start = int(rng.integers(length))
        seq[start:start + 100] = ord("N")
    return seq.tobytes()


def write_contigs(path: Path, mbp: float, seed: int) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    target, bases, n = int(mbp * 1e6), 0, 0
    with open(path, "wb") as f:
        while bases < target:
            length = int(np.clip(rng.lognormal(np.log(4000), 1.0), 1000, 50_000))
            seq = make_contig(rng, length)
            f.write(b">contig_%d len=%d\n" % (n, length))
            f.write(b"\n".join(seq[i:i + 60] for i in range(0, length, 60)) + b"\n")
            bases += length
            n += 1
    return n, bases


def prefix_fasta(src: Path, dst: Path, mbp: float) -> int:
    """Copy whole records from the start of src until `mbp` megabases; returns bases copied."""
    bases, limit = 0, int(mbp * 1e6)
    with open(src) as fin, open(dst, "w") as fout:
        for line in fin:
            if line.startswith(">") and bases >= limit:
                break
            if not line.startswith(">"):
                bases += len(line) - 1
            fout.write(line)
    return bases


def run_ours(fasta: Path, out: Path, size: int, workers: int | None) -> dict:
    """preprocess_fasta in a child process: wall time and the child's peak RSS."""
    code = (
        "import json, resource, sys, time\n"
        "from virnucpro.pipeline.preprocess import preprocess_fasta\n"
        "t = time.perf_counter()\n"
        f"r = preprocess_fasta({str(fasta)!r}, {str(out)!r}, {size}, workers={workers!r})\n"
        "s = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps({'seconds': s, 'peak_rss_mib': rss, 'contigs': r.contigs,"
        " 'chunks': r.chunks, 'frames': r.frames}))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def best_of(repeat: int, fn: Callable[[], dict]) -> dict:
    """The fastest of `repeat` runs: the usual way to read through a noisy shared machine."""
    return min((fn() for _ in range(repeat)), key=lambda r: r["seconds"])


def time_reference(prefix: Path, out: Path, size: int) -> dict:
    t = time.perf_counter()
    ref_preprocess_files(prefix, out, size)
    return {"seconds": time.perf_counter() - t}


def bench_size(fasta: Path, prefix: Path, tmp: Path, size: int, workers: int,
               bases: int, ref_bases: int, repeat: int) -> dict:
    """Reference on the prefix, ours on the prefix (for the byte check) and on the full input."""
    ref_s = best_of(repeat, lambda: time_reference(prefix, tmp / f"ref{size}", size))["seconds"]
    run_ours(prefix, tmp / f"ours_prefix{size}", size, None)
    identical = all((tmp / f"ref{size}" / f).read_bytes() == (tmp / f"ours_prefix{size}" / f).read_bytes()
                    for f in ("chunks.fasta", "nucleotide.fasta", "protein.faa"))
    runs = {"serial": best_of(repeat, lambda: run_ours(fasta, tmp / f"ours{size}", size, None))}
    if workers > 1:
        runs[f"workers={workers}"] = best_of(
            repeat, lambda: run_ours(fasta, tmp / f"ours_par{size}", size, workers))
    ref_per_mbp = ref_s / (ref_bases / 1e6)
    return {
        "chunk_size": size,
        "reference": {"measured_mbp": ref_bases / 1e6, "seconds": ref_s, "seconds_per_mbp": ref_per_mbp,
                      "extrapolated_seconds_full_input": ref_per_mbp * bases / 1e6,
                      "outputs_identical_on_prefix": identical},
        "ours": {name: {**r, "seconds_per_mbp": r["seconds"] / (bases / 1e6),
                        "speedup_vs_reference": ref_per_mbp / (r["seconds"] / (bases / 1e6))}
                 for name, r in runs.items()},
    }


def print_table(res: dict, bases: int) -> None:
    ref = res["reference"]
    print(f"\nchunk size {res['chunk_size']}: outputs identical to the reference on the prefix: "
          f"{ref['outputs_identical_on_prefix']}")
    print(f"{'implementation':36} {'seconds':>9} {'s/Mbp':>7} {'Mbp/s':>7} {'speedup':>8} "
          f"{'RSS MiB':>8}  note")
    print(f"{'upstream rules (per-codon loop)':36} {ref['extrapolated_seconds_full_input']:9.2f} "
          f"{ref['seconds_per_mbp']:7.3f} {1 / ref['seconds_per_mbp']:7.2f} {1:7.1f}x {'-':>8}  "
          f"measured on a {ref['measured_mbp']:.2f} Mbp prefix, extrapolated to {bases / 1e6:.1f} Mbp")
    for name, r in res["ours"].items():
        print(f"{'virnucpro.pipeline.preprocess ' + name:36} {r['seconds']:9.2f} {r['seconds_per_mbp']:7.3f} "
              f"{1 / r['seconds_per_mbp']:7.2f} {r['speedup_vs_reference']:7.1f}x {r['peak_rss_mib']:8.0f}  "
              f"measured on {bases / 1e6:.1f} Mbp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mbp", type=float, default=100.0, help="size of the generated input, Mbp")
    ap.add_argument("--ref-mbp", type=float, default=2.0, help="prefix the slow reference runs on, Mbp")
    ap.add_argument("--chunk-size", type=int, nargs="+", default=[500, 300], choices=(300, 500))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pool size of the parallel run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest is kept")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        fasta = tmp / "contigs.fasta"
        t = time.perf_counter()
        n_contigs, bases = write_contigs(fasta, args.mbp, args.seed)
        print(f"generated {n_contigs} contigs, {bases / 1e6:.1f} Mbp in {time.perf_counter() - t:.1f} s")
        prefix = tmp / "prefix.fasta"
        ref_bases = prefix_fasta(fasta, prefix, args.ref_mbp)
        results = []
        for size in args.chunk_size:
            results.append(bench_size(fasta, prefix, tmp, size, args.workers, bases, ref_bases,
                                      args.repeat))
            print_table(results[-1], bases)

    host = socket.gethostname() or "cpu"
    out = ROOT / "bench" / "results" / f"preprocess-{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "preprocess",
        "note": "reference = literal transcription of upstream's rules (tests/test_preprocess.py), "
                "timed on a prefix of the input and extrapolated per Mbp; ours timed on the full input "
                "in a child process; best of `repeat` runs each; peak_rss_mib is that process's own "
                "(pool workers not included)",
        "machine": {"hostname": host, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "python": platform.python_version(),
                    "numpy": np.__version__},
        "repeat": args.repeat,
        "input": {"mbp": bases / 1e6, "contigs": n_contigs, "seed": args.seed,
                  "length_model": "lognormal(ln 4000, 1) clipped to 1-50 kbp, gene-dense"},
        "results": results,
    }, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
