"""Which SDPA kernel, and which padded shapes, for DNABERT-S's ALiBi attention over a whole run.

    python bench/bench_attention.py --out bench/results/attention-<gpu>.json

Every planned batch has its own (sequences, longest) shape. A kernel that builds a plan per shape
(cuDNN's fused attention) pays for it on batches of a real run, which a benchmark that repeats the
same batches after a warm-up never sees. So each strategy (kernel x exact or bucketed shapes) runs in
a fresh process over the batches of one simulated run: DNABERT-S's shapes (12 heads of 64, 95-125
tokens, 262144-token batches), 12 attention calls per batch (one per layer), bias from our
`_sdpa_mask`, padded layout from our `PaddedLayout`. Reported: the run's attention seconds with every
plan build included, the first batch, and the median batch once warm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_models import dna_token_lengths, token_batches  # noqa: E402
from virnucpro.kernels.attention import Packing, PaddedLayout, _sdpa_mask, alibi_slopes  # noqa: E402

STRATEGIES = ["cudnn exact", "cudnn bucketed", "efficient exact", "efficient bucketed", "default bucketed"]


def one_run(strategy: str, batches: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel, shapes = strategy.split()
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(kernel)
    H, hd = 12, 64
    slopes = torch.tensor(alibi_slopes(H), device="cuda")
    plan = token_batches(dna_token_lengths(2700 * batches, np.random.default_rng(0)) - 2, 262144, 2)[:batches]
    torch.zeros(1, device="cuda")  # CUDA context outside the timing
    per_batch, seen = [], set()
    for b in plan:
        packing = Packing.from_lengths(torch.from_numpy(b).cuda(), int(b.max()))
        layout = PaddedLayout.of(packing, bucketed=shapes == "bucketed")
        q, k, v = (torch.randn(layout.rows, H, layout.length, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        torch.cuda.synchronize()
        start = time.perf_counter()
        mask = _sdpa_mask(layout, slopes, torch.bfloat16)
        for _ in range(12):
            if backend is None:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
            else:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
        torch.cuda.synchronize()
        per_batch.append(time.perf_counter() - start)
        seen.add((layout.rows, layout.length))
    return {"strategy": strategy, "batches": len(plan), "distinct_shapes": len(seen),
            "run_seconds": float(np.sum(per_batch)), "first_batch_seconds": per_batch[0],
            "median_batch_seconds": float(np.median(per_batch)), "batch_seconds": per_batch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batches", type=int, default=25)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child, args.batches)))
        return
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
               "date": time.strftime("%Y-%m-%d"), "runs": []}
    for strategy in STRATEGIES:
        proc = subprocess.run([sys.executable, __file__, "--child", strategy, "--batches", str(args.batches)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{strategy}: failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results["runs"].append(r)
        print(f"{strategy:<20} {r['batches']} batches, {r['distinct_shapes']:2d} shapes: attention {r['run_seconds']:6.2f} s "
              f"a run (first batch {1e3 * r['first_batch_seconds']:6.0f} ms, warm batch "
              f"{1e3 * r['median_batch_seconds']:5.1f} ms)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
