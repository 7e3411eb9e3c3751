"""Does an Inductor setting speed up our compiled layers? ESM-2 650M and DNABERT-S, one process.

    python bench/probe_inductor.py --out bench/results/probe-inductor-<gpu>.json [--models esm2_650M dnabert_s]

bench_profile put 12% of ESM-2 650M's GPU time in its two LayerNorms, run as looped ("red") Triton
reductions at about 40% of the memory bandwidth: at width 1280 they are above Inductor's 1024-element
limit for a persistent reduction (one pass over the row held in registers). Each variant compiles the
same random-weight model's layers with `torch.compile(layer, dynamic=True, options=...)` and times
one pass over the same planned batches with CUDA events after a warm-up pass, tokens pre-staged:
  default             what the models ship with
  coordinate_descent  Inductor tunes each kernel's block sizes and warps at compile time
  multi_kernel        Inductor emits persistent and looped versions of each reduction (up to 16384
                      wide) and picks the faster one per shape at run time
  both                the two together
  autotune_gemm       Inductor's Triton GEMM templates autotuned against cuBLAS (max_autotune_gemm),
                      so a winning template carries the GELU or residual add in its epilogue
  autotune_gemm_cd    that and coordinate descent
The compile time is the first (warm-up) pass's wall clock, compile included. The variants run in one
process, in order: the first pays one-off costs (cuBLAS, imports) and later ones reuse Inductor's
in-process caches, so compare the first-pass times only roughly. Each variant's kernels are tuned on
the real batches (its first pass), unlike an actor's, whose compiled layers first run on a tiny
warm-up (actors/embedder.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_models import (ESM_SHAPES, cuda_time, dna_token_lengths, dnabert_flops, esm_flops,  # noqa: E402
                                matmul_ceiling, random_dnabert_s, random_esm2, token_batches, virnucpro_lengths)
from virnucpro.attention import Packing, keep_out_of_compile  # noqa: E402
from virnucpro.models.dnabert_s import DNABERTSConfig  # noqa: E402

VARIANTS = {
    "default": {},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "multi_kernel": {"triton.multi_kernel": 1},
    "both": {"coordinate_descent_tuning": True, "triton.multi_kernel": 1},
    # Inductor's own Triton GEMM templates, autotuned against cuBLAS, with the GELU and the residual
    # add fused into their epilogues where a template wins (cuBLAS offers no exact-GELU epilogue)
    "autotune_gemm": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON,ATEN"},
    "autotune_gemm_cd": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON,ATEN",
                         "coordinate_descent_tuning": True},
}


def staged_batches(batches: list[np.ndarray], vocab: int) -> list[tuple[torch.Tensor, Packing]]:
    out = []
    for b in batches:
        tokens = torch.randint(4, vocab - 1, (int(b.sum()),), device="cuda")
        out.append((tokens, Packing.from_lengths(torch.from_numpy(b).cuda(), int(b.max()))))
    return out


def probe(model, layers: list[torch.nn.Module], staged) -> tuple[float, float]:
    """(seconds of the first pass, compile included; seconds of one pass after it, CUDA events)."""
    def one_pass():
        with torch.inference_mode():
            for tokens, packing in staged:
                model.embed(tokens, packing, layers)
    torch.cuda.synchronize()
    t = time.perf_counter()
    one_pass()
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    return first, cuda_time(one_pass, warmup=1, repeat=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=["esm2_650M", "dnabert_s"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("-n", type=int, default=6000, help="sequences (proteins, or DNA chunks x5)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ceiling = matmul_ceiling()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "matmul_ceiling_tflops": round(ceiling / 1e12, 1), "models": {}}
    print(f"matmul ceiling {ceiling / 1e12:.0f} TFLOP/s", flush=True)
    for name in args.models:
        if name == "dnabert_s":
            lengths_tokens = dna_token_lengths(args.n * 5, rng)
            model, vocab = random_dnabert_s(torch.bfloat16), DNABERTSConfig().vocab_size
            staged = staged_batches(token_batches(lengths_tokens - 2, 262144, 2), vocab)
            flops = dnabert_flops(lengths_tokens, DNABERTSConfig())
            blocks = model.encoder.layer
        else:
            layers_n, d, _ = ESM_SHAPES[name]
            lengths_tokens = virnucpro_lengths(args.n, rng) + 2
            model, vocab = random_esm2(name), 33
            staged = staged_batches(token_batches(lengths_tokens - 2, 65536, 2), vocab)
            flops = esm_flops(lengths_tokens, layers_n, d)
            blocks = model.layers
        tokens = int(lengths_tokens.sum())
        rows = {}
        keep_out_of_compile()  # the attention kernels opaque to dynamo, as the models' compiled_layers do
        for variant in args.variants:
            torch._dynamo.reset()
            compiled = [torch.compile(block, dynamic=True, options=VARIANTS[variant]) for block in blocks]
            try:
                first, t = probe(model, compiled, staged)
            except Exception as e:  # noqa: BLE001 - a setting this torch lacks is a result too
                rows[variant] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"{name} {variant}: {rows[variant]['error']}", flush=True)
                continue
            rows[variant] = {"options": VARIANTS[variant], "tokens_per_s": round(tokens / t),
                             "mfu": round(flops / t / ceiling, 4), "first_pass_seconds": round(first, 2)}
            print(f"{name} {variant}: {tokens / t / 1e3:.1f} K tok/s, MFU {flops / t / ceiling:.1%}, "
                  f"first pass {first:.1f} s", flush=True)
        result["models"][name] = {"tokens": tokens, "batches": len(staged), "variants": rows}
        del model, staged, blocks
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
