"""Per-token output end to end: what writing every residue's vector costs against pooled output.

    python bench/bench_per_token.py --out bench/results/per-token-<gpu>.json [--model esm2_650M] [-n 20000]

Writes a random-weight checkpoint of the real shape (fair-esm `.pt`, bf16) and a seeded FASTA of
VirNucPro's protein lengths (bench_e2e.write_inputs), starts one local Ray, then runs `cluster.embed`
on one GPU actor three times: pooled only (the default `embedding` column), `--include mean,per-token
--output-dtype float16`, and the same in float32. Each rate counts from the first batch dealt to the
last part written (bench_e2e.end_to_end); the wall clock includes the actor's start-up. Per-token
parts are large (ESM-2 650M: 2.5 KB per residue in float16), so the disk and Parquet's encoding of
nested lists are in the measurement, as they are for a user.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_e2e import end_to_end, write_inputs  # noqa: E402

VARIANTS = {
    "pooled": {},
    "per_token_float16": {"include": "mean,per-token", "output_dtype": "float16"},
    "per_token_float32": {"include": "mean,per-token", "output_dtype": "float32"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="esm2_650M")
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    import ray
    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="per-token-"))
    work.mkdir(parents=True, exist_ok=True)
    fasta, ckpt = write_inputs(args.model, args.n, work)
    ray.init(logging_level="WARNING", include_dashboard=False)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model, "n": args.n,
              "date": time.strftime("%Y-%m-%d"), "variants": {}}
    # one run first, not measured: the compile cache of a fresh machine is empty, and an actor runs
    # eagerly until its compile is done (20 s for 650M then, ~6 s after): every measured run compiles alike
    end_to_end(ckpt, fasta, None, work)
    shutil.rmtree(work / "out", ignore_errors=True)
    for name in args.variants:
        e2e = end_to_end(ckpt, fasta, None, work, **VARIANTS[name])
        size = sum(f.stat().st_size for f in (work / "out").glob("part-*.parquet"))
        e2e["output_bytes"] = size
        result["variants"][name] = e2e
        print(f"{name}: {e2e['tokens_per_s'] / 1e3:.1f} K tokens/s over {e2e['seconds']:.1f} s, wall "
              f"{e2e['wall_seconds_including_startup']:.1f} s, {size / 1e9:.2f} GB written, Parquet "
              f"{e2e['write_seconds_sum']:.1f} s summed", flush=True)
        shutil.rmtree(work / "out", ignore_errors=True)
    pooled = result["variants"].get("pooled", {}).get("tokens_per_s")
    if pooled:
        result["ratio_to_pooled"] = {k: v["tokens_per_s"] / pooled for k, v in result["variants"].items()}
        print("ratio to pooled:", {k: round(v, 3) for k, v in result["ratio_to_pooled"].items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
