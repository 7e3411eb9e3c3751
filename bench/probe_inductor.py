"""Does an Inductor setting speed up our compiled layers? ESM-2 650M and DNABERT-S, one process.

    python bench/probe_inductor.py --out bench/results/probe-inductor-<gpu>.json [--models esm2_650M dnabert_s]

bench_profile put 12% of ESM-2 650M's GPU time in its two LayerNorms, run as looped ("red") Triton
reductions at about 40% of the memory bandwidth: at width 1280 they are above Inductor's 1024-element
limit for a persistent reduction (one pass over the row held in registers). Each variant compiles the
same random-weight model's layers with `torch.compile(layer, dynamic=True, options=...)` and times
one pass over the same planned batches with CUDA events after a warm-up pass, tokens pre-staged:
  default             Inductor's defaults, ESM-2's GELU a kernel of its own (the models before 2026-12-02)
  coordinate_descent  Inductor tunes each kernel's block sizes and warps at compile time
  multi_kernel        Inductor emits persistent and looped versions of each reduction (up to 16384
                      wide) and picks the faster one per shape at run time
  both                the two together
  autotune_gemm       Inductor's Triton GEMM templates autotuned against cuBLAS (max_autotune_gemm),
                      so a winning template carries the GELU or residual add in its epilogue
  autotune_gemm_cd    that and coordinate descent
  persistent_wide     rows up to 2048 wide reduced in one pass in registers (virnucpro.kernels.compiling's
                      InductorChoices raises the 1024 limit), i.e. multi_kernel's persistent LayerNorms
                      without its run-time pick, which torch 2.11 cannot load from its cache
  gelu_epilogue       ESM-2's fc1 bias and GELU in cuBLASLt's GEMM epilogue (tanh GELU), no GELU pass
  gelu_epilogue_persistent   those together
  gelu_epilogue_persistent_cd   and coordinate descent
  shipped             the models' own compiled_layers() (virnucpro/compiling.py), the GELU epilogue on:
                      the same as gelu_epilogue_persistent, by the code path the models use
  shipped_flash       that with FlashAttention-2's varlen kernel (`--attention flash`) in place of our
                      Triton kernel, ESM-2's default since 2026-12-02 (every other variant runs the
                      default attention kernel)
Every variant also reports the pooled cosine of its bf16 output to a float32 copy of the model (SDPA,
no TF32) on 128 sequences, minimum over sequences, so a faster variant shows what it costs.
The compile time is the first (warm-up) pass's wall clock, compile included, with Inductor's caches
off. The variants run in one process, in order: the first pays one-off costs (cuBLAS, imports), so
compare the first-pass times only roughly. Each variant's kernels are tuned on
the real batches (its first pass), unlike an actor's, whose compiled layers first run on a quarter of
the token budget in 128-token sequences, beside eager batches (Embedder._compile_shapes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# Inductor's caches are keyed by its config, not by a choices handler: a variant could load another's
# kernels. Every variant compiles from scratch, so first-pass times compare too.
os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
import torch  # noqa: E402
from torch._inductor.choices import InductorChoices  # noqa: E402
from torch._inductor.virtualized import V  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_models import (ESM_SHAPES, cuda_time, dna_token_lengths, dnabert_flops, esm_flops,  # noqa: E402
                                matmul_ceiling, pooled_cosine_min, random_dnabert_s, random_esm2, staged_batches,
                                token_batches, virnucpro_lengths)
from virnucpro.kernels.attention import keep_out_of_compile, select_backend  # noqa: E402
from virnucpro.kernels.compiling import WideRowChoices  # noqa: E402
from virnucpro.models.esm2 import TransformerLayer  # noqa: E402
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
    # keys starting with "_" are ours, not Inductor's
    "persistent_wide": {"_wide_rows": True},
    "gelu_epilogue": {"_gelu_epilogue": True},
    "gelu_epilogue_persistent": {"_gelu_epilogue": True, "_wide_rows": True},
    "gelu_epilogue_persistent_cd": {"_gelu_epilogue": True, "_wide_rows": True, "coordinate_descent_tuning": True},
    "shipped": {"_gelu_epilogue": True, "_shipped": True},  # the models' own compiled_layers()
    "shipped_flash": {"_gelu_epilogue": True, "_shipped": True, "_attention": "flash"},  # with FA2's varlen
}


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
    ap.add_argument("--models", nargs="+", default=["esm2_650M", "dnabert_s"], choices=["esm2_650M", "esm2_3B", "dnabert_s"])
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
        ref = copy.deepcopy(model).float()  # the accuracy reference: float32, SDPA, no TF32
        ref.backend = select_backend(torch.device("cuda"), torch.float32, alibi=name == "dnabert_s", head_dim=64)
        for layer in ref.modules():
            if isinstance(layer, TransformerLayer):
                layer.gelu_epilogue = False  # the reference keeps the exact GELU whatever the variant
        check_lengths = lengths_tokens[:128] - 2
        check = staged_batches([check_lengths[:64], check_lengths[64:]], vocab)
        rows = {}
        keep_out_of_compile()  # the attention kernels opaque to dynamo, as the models' compiled_layers do
        for variant in args.variants:
            torch._dynamo.reset()
            ours = {k: v for k, v in VARIANTS[variant].items() if k.startswith("_")}
            options = {k: v for k, v in VARIANTS[variant].items() if not k.startswith("_")}
            if ours.get("_gelu_epilogue") and name == "dnabert_s":
                continue  # ESM-2's plain GELU only; DNABERT-S's is gated
            TransformerLayer.gelu_epilogue = bool(ours.get("_gelu_epilogue"))
            model.backend = select_backend(torch.device("cuda"), torch.bfloat16, alibi=name == "dnabert_s",
                                           requested=ours.get("_attention", "auto"), head_dim=64)
            V.set_choices_handler(WideRowChoices() if ours.get("_wide_rows") else InductorChoices())
            compiled = (model.compiled_layers() if ours.get("_shipped")
                        else [torch.compile(block, dynamic=True, options=options) for block in blocks])
            try:
                first, t = probe(model, compiled, staged)
                cos = pooled_cosine_min(model, compiled, ref, check)
            except Exception as e:  # noqa: BLE001 - a setting this torch lacks is a result too
                rows[variant] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"{name} {variant}: {rows[variant]['error']}", flush=True)
                continue
            rows[variant] = {"options": {k: str(v) for k, v in VARIANTS[variant].items()},
                             "attention": model.backend.describe(),
                             "tokens_per_s": round(tokens / t), "mfu": round(flops / t / ceiling, 4),
                             "first_pass_seconds": round(first, 2), "pooled_cosine_min_to_fp32": round(cos, 6)}
            print(f"{name} {variant}: {tokens / t / 1e3:.1f} K tok/s, MFU {flops / t / ceiling:.1%}, "
                  f"first pass {first:.1f} s, pooled cosine min {cos:.6f}", flush=True)
        TransformerLayer.gelu_epilogue = False
        V.set_choices_handler(InductorChoices())
        result["models"][name] = {"tokens": tokens, "batches": len(staged), "variants": rows}
        del model, ref, staged, blocks
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
