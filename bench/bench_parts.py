"""What many small part files cost the readers of an output, and what merging them into larger files costs.

    python bench/bench_parts.py --parts 64000 --out bench/results/parts-64k-<machine>.json [--machine NAME]

Writes `--parts` parts with `virnucpro.io.output.write_part` (the real schema and Parquet options), each of
`--rows` rows of `--dim`-wide embeddings, into a scratch directory: small rows on purpose, so that what
is timed is the per-file cost (listing, opening, footers), which is what the count of parts adds at
10^8 records. Then times, each in a fresh process (its imports not counted): listing the directory;
pyarrow reading the `index` column of the directory; polars and duckdb counting rows of `*.parquet`;
pyarrow reading every column. Then merges the parts into files of `--merged-rows` rows with
`pyarrow.dataset.write_dataset` (the recipe in docs/embedding.md) and times the same readers on them.
Local disk only; an object store adds a request per file to each of these.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

READERS = {
    "list": "import os; t=time.perf_counter(); n=len([f for f in os.listdir(d) if f.endswith('.parquet')])",
    "pyarrow_index_column": "import pyarrow.parquet as pq; t=time.perf_counter(); "
                            "n=pq.read_table(d, columns=['index']).num_rows",
    "polars_count": "import polars as pl; t=time.perf_counter(); "
                    "n=pl.scan_parquet(d + '/*.parquet').select(pl.len()).collect().item()",
    "duckdb_count": "import duckdb; t=time.perf_counter(); "
                    "n=duckdb.sql(f\"select count(*) from '{d}/*.parquet'\").fetchall()[0][0]",
    "pyarrow_all_columns": "import pyarrow.parquet as pq; t=time.perf_counter(); n=pq.read_table(d).num_rows",
}


def time_reader(code: str, directory: Path) -> dict:
    script = f"import json, sys, time\nd = sys.argv[1]\n{code}\nprint(json.dumps([time.perf_counter() - t, n]))"
    done = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True,
                          check=True)
    seconds, n = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": seconds, "rows_or_files": n}


def write_parts(directory: Path, parts: int, rows: int, dim: int) -> float:
    from virnucpro.io.output import write_part

    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((rows, dim)).astype(np.float32)
    start = time.perf_counter()
    for b in range(parts):
        index = np.arange(b * rows, (b + 1) * rows)
        write_part(directory, b, [f"seq{i}" for i in index], index, np.full(rows, 100, np.int32),
                   np.zeros(rows, bool), embeddings, "bench")
    return time.perf_counter() - start


def merge(directory: Path, merged: Path, rows_per_file: int) -> float:
    import pyarrow.dataset as ds

    start = time.perf_counter()
    ds.write_dataset(ds.dataset(directory, format="parquet"), merged, format="parquet",
                     max_rows_per_file=rows_per_file, min_rows_per_group=min(rows_per_file, 65536),
                     max_rows_per_group=min(rows_per_file, 65536), basename_template="merged-{i}.parquet")
    return time.perf_counter() - start


def du(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", type=int, default=64000)
    p.add_argument("--rows", type=int, default=16, help="rows a part")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--merged-rows", type=int, default=1_000_000, help="rows a merged file")
    p.add_argument("--scratch", default=None, help="directory for the parts (default: a temporary one)")
    p.add_argument("--machine", default="cpu-2core-vm")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-parts-", dir=args.scratch))
    parts, merged = scratch / "parts", scratch / "merged"
    parts.mkdir()
    try:
        report = {"machine": args.machine, "host": platform.node(), "cpus": os.cpu_count(),
                  "date": time.strftime("%Y-%m-%d"), "parts": args.parts, "rows_a_part": args.rows,
                  "dim": args.dim, "merged_rows_a_file": args.merged_rows}
        report["write_seconds"] = write_parts(parts, args.parts, args.rows, args.dim)
        report["parts_bytes"] = du(parts)
        report["parts_readers"] = {name: time_reader(code, parts) for name, code in READERS.items()}
        report["merge_seconds"] = merge(parts, merged, args.merged_rows)
        report["merged_files"] = len(list(merged.iterdir()))
        report["merged_bytes"] = du(merged)
        report["merged_readers"] = {name: time_reader(code, merged) for name, code in READERS.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
