"""Which kernel for attention over packed short sequences? One process, one GPU.

    python bench/probe_packed_attention.py --out bench/results/probe-packed-attention-<gpu>.json

ESM-2 650M spends 11% of its GPU time in FlashAttention-2's varlen kernel (profile-*-650m-issue14.json)
for 2% of its FLOPs: VirNucPro's proteins are at most 168 tokens, and FA2 works in 128-token blocks,
so a 168-token sequence costs it a 256 x 256 tile grid. This probe times, on the packed batches the
actors run (the same planner's token budgets, q/k/v as strided views of one fused [T, 3, H, hd]
tensor as the models produce them):
  fa2      torch's FlashAttention-2 varlen (`virnucpro.kernels.attention._varlen_attn`; ESM-2's kernel until this
           probe, its fallback since)
  cudnn    cuDNN's ragged (THD) SDPA through `aten._cudnn_attention_forward` with cumulative lengths;
           its first call per shape builds a plan, timed apart
  triton   our packed kernel (`virnucpro.kernels.triton_attention.packed_attention`) at several block sizes
Each kernel: one untimed pass over the batches (compiles, plans), then the median of 5 passes timed
with CUDA events. Accuracy: largest absolute difference to FA2's output (ALiBi workloads: to
`alibi_by_hand` on the first 48 sequences of the first batch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_models import (cuda_time, dna_token_lengths, proteome_lengths, token_batches,  # noqa: E402
                                virnucpro_lengths)
from virnucpro.kernels.triton_attention import packed_attention  # noqa: E402
from virnucpro.kernels.attention import Packing, _varlen_attn, alibi_by_hand, alibi_slopes  # noqa: E402

WORKLOADS = {  # name: (heads, head dim, lengths in tokens, token budget, ALiBi)
    "esm2_650M/virnucpro": (20, 64, lambda n, rng: virnucpro_lengths(n, rng) + 2, 65536, False),
    "esm2_3B/virnucpro": (40, 64, lambda n, rng: virnucpro_lengths(n, rng) + 2, 65536, False),
    "esm2_650M/proteome": (20, 64, lambda n, rng: proteome_lengths(n, rng) + 2, 65536, False),
    "dnabert_s/95-125 tokens": (12, 64, lambda n, rng: dna_token_lengths(n, rng), 262144, True),
}
TRITON_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (32, 64, 2, 2),
                  (64, 128, 4, 2), (128, 128, 8, 2)]


def batches_of(workload: str, count: int) -> list[tuple]:
    H, hd, lengths, budget, alibi = WORKLOADS[workload]
    plan = token_batches(lengths(200_000, np.random.default_rng(0)), budget, 0)[:count]
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for b in plan:
        T = int(b.sum())
        qkv = torch.randn(T, 3, H, hd, device="cuda", dtype=torch.bfloat16, generator=g)
        packing = Packing.from_lengths(torch.from_numpy(b).cuda(), int(b.max()))
        out.append((*qkv.unbind(1), packing.cu_seqlens, packing.max_seqlen))
    return out


def attention_flops(batches: list[tuple]) -> float:
    total = 0.0
    for q, _, _, cu, _ in batches:
        L = (cu[1:] - cu[:-1]).double()
        total += float((4 * L * L).sum()) * q.shape[1] * q.shape[2]
    return total


def kernels(alibi: bool) -> dict:
    def fa2(q, k, v, cu, m, scale, slopes):
        return _varlen_attn()(q, k, v, cu, cu, m, m, scale=scale)

    def cudnn(q, k, v, cu, m, scale, slopes):
        return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, m, m, False, 0.0, False, False,
                                                       scale=scale)[0]

    out = {} if alibi else {"fa2": fa2, "cudnn": cudnn}
    for bm, bn, w, s in TRITON_CONFIGS:
        out[f"triton {bm}x{bn} w{w} s{s}"] = (
            lambda q, k, v, cu, m, scale, slopes, c=(bm, bn, w, s):
            packed_attention(q, k, v, cu, m, scale, slopes, block_m=c[0], block_n=c[1], num_warps=c[2], num_stages=c[3]))
    return out


def reference(q, k, v, cu, m, scale, slopes, alibi: bool):
    if not alibi:
        return _varlen_attn()(q, k, v, cu, cu, m, m, scale=scale).float()
    return alibi_by_hand(q, k, v, cu, scale, slopes)


def probe(workload: str, count: int) -> dict:
    H, hd, _, _, alibi = WORKLOADS[workload]
    batches = batches_of(workload, count)
    slopes = torch.tensor(alibi_slopes(H), device="cuda") if alibi else None
    scale = hd ** -0.5
    flops = attention_flops(batches)
    tokens = sum(q.shape[0] for q, *_ in batches)
    # accuracy on a slice of the first batch: 48 sequences
    q, k, v, cu, m = batches[0]
    cu48 = cu[:49]
    t48 = int(cu48[-1])
    small = (q[:t48], k[:t48], v[:t48], cu48, m)
    want = reference(*small, scale, slopes, alibi)
    rows = {}
    for name, fn in kernels(alibi).items():
        row = {}
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for b in batches:
                fn(*b, scale, slopes)
            torch.cuda.synchronize()
            row["first_pass_seconds"] = time.perf_counter() - start
            seconds = cuda_time(lambda fn=fn: [fn(*b, scale, slopes) for b in batches], warmup=1, repeat=5)
            row.update(seconds=seconds, tokens_per_s=tokens / seconds, tflops=flops / seconds / 1e12,
                       max_abs_diff=float((fn(*small, scale, slopes).float() - want).abs().max()))
        except Exception as e:  # noqa: BLE001 - a kernel this build refuses: recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        rows[name] = row
        print(f"{workload:26s} {name:22s} " + (f"{row['seconds'] * 1e3:8.2f} ms  {row['tflops']:6.1f} TFLOP/s  "
              f"diff {row['max_abs_diff']:.2e}  first pass {row['first_pass_seconds']:.2f} s"
              if "seconds" in row else row["error"]), flush=True)
    return {"batches": len(batches), "tokens": tokens, "heads": H, "head_dim": hd, "alibi": alibi,
            "attention_tflop": flops / 1e12, "kernels": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    args = ap.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "date": time.strftime("%Y-%m-%d"),
              "workloads": {w: probe(w, args.batches) for w in args.workloads}}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
