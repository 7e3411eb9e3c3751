"""FASTA index pass speed (`FastaIndex.build`: validation, lengths, offsets, duplicate check), on the
driver's critical path before any batch is dealt.

    python bench/bench_index.py [--mib 100] [--repeat 3] [--out bench/results/index-HOST.json]

Three inputs of about --mib MiB each, written to a temporary directory: short proteins (30-200
residues, one line each), DNA contigs (2-50 kb, wrapped at 60 columns), and one protein on a single
line. Reports the best of --repeat index passes (MiB/s and records/s) and the time to read every
record back (`FastaIndex.read`) for the first two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from virnucpro.io.index import FastaIndex  # noqa: E402
from virnucpro.io.alphabet import DNA, PROTEIN  # noqa: E402

AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
BASES = np.frombuffer(b"ACGT", np.uint8)


def write_records(path: Path, target: int, low: int, high: int, letters: np.ndarray, wrap: int | None,
                  seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    written = n = 0
    with open(path, "wb") as f:
        while written < target:
            sizes = rng.integers(low, high + 1, 1000)
            seqs = rng.choice(letters, int(sizes.sum())).tobytes()
            pos, out = 0, []
            for size in sizes.tolist():
                s = seqs[pos:pos + size]
                pos += size
                if wrap:
                    s = b"\n".join(s[i:i + wrap] for i in range(0, len(s), wrap))
                out.append(b">r%d some description\n%s\n" % (n, s))
                n += 1
            chunk = b"".join(out)
            f.write(chunk)
            written += len(chunk)
    return n


def write_one_line(path: Path, target: int) -> int:
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        f.write(b">long\n")
        block = rng.choice(AMINO, 1 << 20).tobytes()
        for _ in range(max(1, target >> 20)):
            f.write(block)
        f.write(b"\n")
    return 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    target = args.mib << 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = [
            ("proteins 30-200 aa, one line each", tmp / "p.faa", PROTEIN,
             lambda p: write_records(p, target, 30, 200, AMINO, None)),
            ("DNA contigs 2-50 kb, 60 columns", tmp / "d.fa", DNA,
             lambda p: write_records(p, target, 2000, 50000, BASES, 60)),
            ("one protein on a single line", tmp / "l.faa", PROTEIN, lambda p: write_one_line(p, target)),
        ]
        for name, path, kind, make in inputs:
            records = make(path)
            size = path.stat().st_size
            best = float("inf")
            for _ in range(args.repeat):
                start = time.perf_counter()
                index = FastaIndex.build(path, kind, tmp / "scratch")
                best = min(best, time.perf_counter() - start)
            assert len(index) == records
            row = {"input": name, "mib": round(size / 2**20, 1), "records": records,
                   "index_seconds": round(best, 3), "index_mib_per_s": round(size / 2**20 / best, 1),
                   "index_records_per_s": round(records / best)}
            if records > 1:
                start = time.perf_counter()
                for a in range(0, records, 4096):
                    index.read(np.arange(a, min(records, a + 4096)))
                row["read_all_seconds"] = round(time.perf_counter() - start, 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
            path.unlink()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "runs": rows,
                                        "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
    main()
