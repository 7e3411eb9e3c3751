"""DNABERT-S's fused elementwise kernels (`virnucpro/triton_elementwise.py`): tile sweep and what they buy.

    python bench/probe_fused.py --out bench/results/probe-fused-<gpu>.json [-n 6000]

1. Each kernel alone on one batch's activations (262144 tokens, DNABERT-S's GPU budget), per tile
   shape, against PyTorch's ops for the same step, in GB/s of the bytes it must move (CUDA events
   after warm-up).
2. The model over the same planned batches (random weights of the real shape, 300-520 bp chunks,
   tokens pre-staged): uncompiled with PyTorch's elementwise ops, uncompiled with the fused kernels,
   and compiled (`compiled_layers()`, Inductor's own fusion); tokens/s, and each variant's pooled
   cosine to a float32 copy of the model (SDPA, no TF32), minimum over 128 sequences.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_models import (cuda_time, dna_token_lengths, dnabert_flops, pooled_cosine_min,  # noqa: E402
                                random_dnabert_s, staged_batches, token_batches)
from virnucpro.kernels import triton_elementwise as te  # noqa: E402
from virnucpro.kernels.attention import select_backend  # noqa: E402
from virnucpro.models.dnabert_s import DNABERTSConfig  # noqa: E402

GATED_TILES = [(1, 1024, 4), (2, 1024, 4), (4, 1024, 4), (4, 1024, 8), (8, 512, 8), (8, 1024, 8), (16, 256, 4),
               (4, 2048, 8)]
NORM_TILES = [(1, 4), (2, 4), (4, 4), (4, 8), (8, 4), (8, 8), (16, 8)]


def kernel_sweep(tokens: int) -> dict:
    c = DNABERTSConfig()
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(tokens, 2 * c.intermediate_size, device="cuda", dtype=torch.bfloat16, generator=g)
    x, r = (torch.randn(tokens, c.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    norm = torch.nn.LayerNorm(c.hidden_size, eps=1e-12, device="cuda", dtype=torch.bfloat16)
    gated_bytes = h.numel() * 2 + h.numel()  # read [T, 2I], write [T, I], bf16
    norm_bytes = 3 * x.numel() * 2  # read two [T, C], write one

    def rate(fn, nbytes):
        with torch.inference_mode():
            s = cuda_time(fn, warmup=3, repeat=20)
        return {"ms": round(s * 1e3, 4), "GB_per_s": round(nbytes / s / 1e9, 1)}

    out = {"tokens": tokens, "gated_gelu": {}, "add_layer_norm": {}}
    i = c.intermediate_size
    out["gated_gelu"]["pytorch"] = rate(lambda: F.gelu(h[:, :i]) * h[:, i:], gated_bytes)
    out["add_layer_norm"]["pytorch"] = rate(lambda: norm(x + r), norm_bytes)
    want = (F.gelu(h[:, :i].float()) * h[:, i:].float())
    for tile in GATED_TILES:
        te.GATED_GELU_BLOCK = tile
        err = float((te.gated_gelu(h).float() - want).abs().max())
        out["gated_gelu"]["x".join(map(str, tile))] = {**rate(lambda: te.gated_gelu(h), gated_bytes), "max_abs_err": err}
    want = F.layer_norm(x.float() + r.float(), (c.hidden_size,), norm.weight.float(), norm.bias.float(), norm.eps)
    for tile in NORM_TILES:
        te.ADD_LAYER_NORM_BLOCK = tile
        err = float((te.add_layer_norm(x, r, norm).float() - want).abs().max())
        out["add_layer_norm"]["x".join(map(str, tile))] = {**rate(lambda: te.add_layer_norm(x, r, norm), norm_bytes),
                                                           "max_abs_err": err}
    for name, table in (("gated_gelu", out["gated_gelu"]), ("add_layer_norm", out["add_layer_norm"])):
        best = max((k for k in table if k != "pytorch"), key=lambda k: table[k]["GB_per_s"])
        out[f"{name}_best"] = best
        print(f"{name}: pytorch {table['pytorch']['GB_per_s']} GB/s; best tile {best}: {table[best]['GB_per_s']} GB/s",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("-n", type=int, default=6000, help="DNA chunks x5 (as probe_inductor)")
    args = ap.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "kernels": kernel_sweep(262144)}
    # the model runs with the sweep's best tiles
    te.GATED_GELU_BLOCK = tuple(int(v) for v in result["kernels"]["gated_gelu_best"].split("x"))
    te.ADD_LAYER_NORM_BLOCK = tuple(int(v) for v in result["kernels"]["add_layer_norm_best"].split("x"))
    rng = np.random.default_rng(0)
    c = DNABERTSConfig()
    lengths_tokens = dna_token_lengths(args.n * 5, rng)
    model = random_dnabert_s(torch.bfloat16)
    model.backend = select_backend(torch.device("cuda"), torch.bfloat16, alibi=True, head_dim=64)
    staged = staged_batches(token_batches(lengths_tokens - 2, 262144, 2), c.vocab_size)
    flops = dnabert_flops(lengths_tokens, c)
    tokens = int(lengths_tokens.sum())
    ref = copy.deepcopy(model).float()
    ref.backend = select_backend(torch.device("cuda"), torch.float32, alibi=True, requested="sdpa", head_dim=64)
    check = staged_batches(token_batches(dna_token_lengths(128, np.random.default_rng(1)) - 2, 262144, 2), c.vocab_size)
    torch.backends.cuda.matmul.allow_tf32 = False
    variants = {}
    for name, fused, compiled in (("uncompiled, PyTorch elementwise", False, False),
                                  ("uncompiled, fused Triton elementwise", True, False),
                                  ("compiled (Inductor)", False, True)):
        model.fused = fused
        layers = model.compiled_layers() if compiled else None

        def one_pass(layers=layers):
            with torch.inference_mode():
                for t, p in staged:
                    model.embed(t, p, layers)
        torch.backends.cuda.matmul.allow_tf32 = True
        start = time.perf_counter()
        one_pass()
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        seconds = cuda_time(one_pass, warmup=1, repeat=3)
        torch.backends.cuda.matmul.allow_tf32 = False
        cos = pooled_cosine_min(model, layers, ref, check)
        variants[name] = {"tokens_per_s": round(tokens / seconds), "tflops": round(flops / seconds / 1e12, 1),
                          "seconds": round(seconds, 4), "first_pass_seconds": round(first, 2),
                          "pooled_cosine_min": round(cos, 6)}
        print(f"{name}: {tokens / seconds / 1e6:.3f} M tok/s, first pass {first:.1f} s, cosine min {cos:.6f}", flush=True)
    result["dnabert_s"] = {"tokens": tokens, "batches": len(staged), "variants": variants,
                           "tiles": {"gated_gelu": te.GATED_GELU_BLOCK, "add_layer_norm": te.ADD_LAYER_NORM_BLOCK}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
