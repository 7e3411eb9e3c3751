"""Where the GPU time of our bare model path goes: CUDA kernel time by kind, from a torch profiler trace.

    python bench/bench_profile.py --out bench/results/profile-<gpu>.json [--trace-dir DIR]

For ESM-2 3B (VirNucPro lengths, budget 65536) and DNABERT-S (95-125 tokens, budget 262144), compiled
as the actor runs them, random weights of the real shapes: a warm-up pass, then a few batches under
`torch.profiler`. Kernels are grouped by name into GEMM (cuBLAS / CUTLASS), attention (flash,
memory-efficient), fused elementwise (Triton kernels torch.compile generated: norms, GELU, rotary,
residuals) and other (copies, indexing, pooling). Also reported: the GPU-busy fraction of the wall
time and the GEMMs' achieved TFLOP/s against the matmul ceiling measured in the same run.
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

from bench.bench_models import (ESM_SHAPES, dna_token_lengths, dnabert_flops, esm_flops, matmul_ceiling,  # noqa: E402
                                random_dnabert_s, random_esm2, token_batches, virnucpro_lengths)
from virnucpro.kernels.attention import Packing  # noqa: E402


def kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "mem_eff")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_", "ampere_")):
        return "gemm"
    if n.startswith("triton"):
        return "fused elementwise (triton)"
    return "other"


def profile(model, batches: list[np.ndarray], vocab: int, flops_per_batch: list[float], ceiling: float,
            trace: Path | None) -> dict:
    staged = []
    for b in batches:
        lengths = torch.from_numpy(b).cuda()
        staged.append((torch.randint(4, vocab - 1, (int(b.sum()),), device="cuda"),
                       Packing.from_lengths(lengths, int(b.max()))))
    with torch.inference_mode():
        for t, p in staged:  # warm-up: compile, allocator, cuBLAS heuristics
            model.embed(t, p)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for t, p in staged:
                model.embed(t, p)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    by_kind: dict[str, float] = {}
    top: dict[str, float] = {}
    intervals = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        by_kind[kind(e.name)] = by_kind.get(kind(e.name), 0.0) + us
        top[e.name] = top.get(e.name, 0.0) + us
        intervals.append((e.time_range.start, e.time_range.end))
    intervals.sort()
    busy, end = 0.0, -1.0
    for s, e in intervals:  # union of kernel intervals (kernels of one stream do not overlap anyway)
        if e > end:
            busy += e - max(s, end)
            end = e
    kernel_us = sum(by_kind.values())
    tokens = int(sum(int(b.sum()) for b in batches))
    gemm_s = by_kind.get("gemm", 0.0) / 1e6
    return {
        "batches": len(batches), "tokens": tokens, "wall_seconds": wall,
        "tokens_per_s_under_profiler": tokens / wall,
        "gpu_busy_fraction": busy / 1e6 / wall,
        "kernel_seconds": kernel_us / 1e6,
        "share": {k: v / kernel_us for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "gemm_tflops": sum(flops_per_batch) / gemm_s / 1e12 if gemm_s else None,
        "ceiling_tflops": ceiling / 1e12,
        "top_kernels": [{"name": k[:120], "kind": kind(k), "share": v / kernel_us}
                        for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trace-dir", type=Path, default=None, help="also write the chrome traces here")
    ap.add_argument("--esm", nargs="*", default=["esm2_3B"], choices=list(ESM_SHAPES), help="ESM-2 sizes to profile")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ceiling = matmul_ceiling()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "ceiling_tflops": ceiling / 1e12, "date": time.strftime("%Y-%m-%d"), "workloads": {}}

    for name in args.esm:
        layers, d, heads = ESM_SHAPES[name]
        esm = random_esm2(name)
        esm.compile_layers()
        batches = token_batches(virnucpro_lengths(1500 if name == "esm2_3B" else 3000, rng), 65536, 2)[:4]
        # linear-layer FLOPs only: what the GEMM kernels do
        linear = [esm_flops(b, layers, d) - float((4 * b.astype(float) ** 2 * d * layers).sum()) for b in batches]
        results["workloads"][f"{name}/virnucpro"] = profile(
            esm, batches, 33, linear, ceiling, args.trace_dir / f"trace-{name}.json" if args.trace_dir else None)
        del esm
        torch.cuda.empty_cache()

    dna = random_dnabert_s(torch.bfloat16)
    c = dna.config
    dna.compile_layers()
    batches = token_batches(dna_token_lengths(12000, rng) - 2, 262144, 2)[:4]
    linear = [dnabert_flops(b, c) - float((4 * b.astype(float) ** 2 * c.hidden_size * c.num_hidden_layers).sum())
              for b in batches]
    results["workloads"]["dnabert_s/95-125 tokens"] = profile(
        dna, batches, c.vocab_size, linear, ceiling, args.trace_dir / "trace-dnabert_s.json" if args.trace_dir else None)

    for key, r in results["workloads"].items():
        print(f"\n{key}: {r['tokens_per_s_under_profiler'] / 1e3:.1f} K tokens/s under the profiler, GPU busy "
              f"{100 * r['gpu_busy_fraction']:.1f}% of wall; GEMMs at {r['gemm_tflops']:.0f} TFLOP/s "
              f"(ceiling {r['ceiling_tflops']:.0f})")
        for k, v in r["share"].items():
            print(f"  {k:<30} {100 * v:5.1f}% of kernel time")
        for t in r["top_kernels"][:6]:
            print(f"    {100 * t['share']:5.1f}%  {t['kind']:<12} {t['name'][:90]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
