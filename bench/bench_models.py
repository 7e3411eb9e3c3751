"""Model throughput on one GPU: our packed path against the references, same process, same sequences.

    python bench/bench_models.py --out bench/results/models-<gpu>.json [--quick]

Runs, in order: the bf16 matmul ceiling (8192^3, CUDA events), then for each workload our packed
bf16 path and each reference on the same length-sorted sequences with random weights of the real
shapes. Prints a table (tokens/s, sequences/s, MFU against the measured ceiling, peak memory, ratio
to each reference) and writes it as JSON with the GPU named.

FLOPs counted per sequence of L tokens: linear layers 2 * P_linear * L, attention 4 * L^2 * d per layer
(QK^T and AV), i.e. the useful work; padding done by a reference is not counted in its favour.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from virnucpro.kernels.attention import Packing  # noqa: E402
from virnucpro.models.dnabert_s import DNABERTS, DNABERTSConfig, fused_kernels_fail  # noqa: E402
from virnucpro.models.esm2 import ESM2, ESM2Config  # noqa: E402
from virnucpro.kernels.attention import select_backend  # noqa: E402

ESM_SHAPES = {"esm2_3B": (36, 2560, 40), "esm2_650M": (33, 1280, 20)}


# --- workloads --------------------------------------------------------------------------------------

def virnucpro_lengths(n: int, rng) -> np.ndarray:
    """Proteins of VirNucPro's 500 bp chunks: 70% full 166 aa, the rest 30-165."""
    full = rng.random(n) < 0.7
    return np.where(full, 166, rng.integers(30, 166, n))


def proteome_lengths(n: int, rng) -> np.ndarray:
    """A proteome's protein lengths: log-normal with median ~300, capped at 1022."""
    return np.clip(rng.lognormal(np.log(300), 0.6, n).astype(int), 30, 1022)


def dna_token_lengths(n: int, rng) -> np.ndarray:
    return rng.integers(95, 126, n)


def token_batches(lengths: np.ndarray, budget: int, specials: int) -> list[np.ndarray]:
    """Length-sorted (longest first) token-budget batches of per-sequence token counts."""
    toks = np.sort(lengths + specials)[::-1]
    batches, cur, total = [], [], 0
    for t in toks:
        if total + t > budget and cur:
            batches.append(np.array(cur))
            cur, total = [], 0
        cur.append(t)
        total += t
    batches.append(np.array(cur))
    return batches


# --- timing -----------------------------------------------------------------------------------------

def cuda_time(fn, warmup: int = 2, repeat: int = 3) -> float:
    """Median seconds of fn() over `repeat` runs after `warmup`, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def matmul_ceiling() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: [a @ b for _ in range(10)], warmup=2, repeat=5) / 10
    return 2 * n ** 3 / t


def esm_flops(lengths_tokens: np.ndarray, layers: int, d: int) -> float:
    L = lengths_tokens.astype(np.float64)
    return float((2 * 12 * d * d * layers * L + 4 * L * L * d * layers).sum())


def dnabert_flops(lengths_tokens: np.ndarray, c: DNABERTSConfig) -> float:
    d, i, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    per_token_linear = 2 * (3 * d * d + d * d + 2 * d * i + i * d) * n
    L = lengths_tokens.astype(np.float64)
    return float((per_token_linear * L + 4 * L * L * d * n).sum())


def random_init_(model: torch.nn.Module, seed: int = 0) -> None:
    """Realistic-scale random weights (std 0.02, norms ~1) so activations look like a trained model's."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "weight" in name:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda", dtype=torch.float32) * 0.02)


def random_esm2(name: str) -> ESM2:
    """Our ESM-2 of a real shape on the GPU in bf16, random weights, eval mode, its kernel selected."""
    layers, d, heads = ESM_SHAPES[name]
    with torch.device("cuda"):
        model = ESM2(ESM2Config(layers, d, heads)).to(torch.bfloat16)
    random_init_(model)
    model.eval().requires_grad_(False)
    model.backend = select_backend(torch.device("cuda"), torch.bfloat16, alibi=False, head_dim=d // heads)
    return model


def random_dnabert_s(dtype: torch.dtype) -> DNABERTS:
    """Our DNABERT-S (the real shape) on the GPU in `dtype`, random weights, eval mode, its kernel selected."""
    with torch.device("cuda"):
        model = DNABERTS(DNABERTSConfig()).to(dtype)
    random_init_(model)
    model.alibi_slopes = model.alibi_slopes.cuda()
    model.eval().requires_grad_(False)
    model.backend = select_backend(torch.device("cuda"), dtype, alibi=True, head_dim=64)
    c = model.config  # its uncompiled layers fuse their elementwise steps where the kernels load, as load_dnabert_s's
    model.fused = fused_kernels_fail(torch.device("cuda"), dtype, c.hidden_size, c.intermediate_size) is None
    return model


def staged_batches(batches: list[np.ndarray], vocab: int) -> list[tuple[torch.Tensor, Packing]]:
    """Random tokens for each planned batch of sequence lengths, with its packing, on the GPU."""
    out = []
    for b in batches:
        tokens = torch.randint(4, vocab - 1, (int(b.sum()),), device="cuda")
        out.append((tokens, Packing.from_lengths(torch.from_numpy(b).cuda(), int(b.max()))))
    return out


def pooled_cosine_min(model, layers, ref, staged) -> float:
    """The lowest cosine over sequences between `model`'s pooled embeddings (through `layers`) and `ref`'s."""
    with torch.inference_mode():
        got = torch.cat([model.embed(t, p, layers) for t, p in staged]).double()
        want = torch.cat([ref.embed(t, p) for t, p in staged]).double()
    return float(torch.nn.functional.cosine_similarity(got, want, dim=-1).min())


def run_ours(model, batches: list[np.ndarray], vocab: int) -> float:
    """Seconds for one pass over all batches through model.embed (packed), tokens pre-staged on the GPU."""
    staged = []
    for b in batches:
        lengths = torch.from_numpy(b).cuda()
        tokens = torch.randint(4, vocab - 1, (int(b.sum()),), device="cuda")
        staged.append((tokens, Packing.from_lengths(lengths, int(b.max()))))

    def one_pass():
        with torch.inference_mode():
            for tokens, packing in staged:
                model.embed(tokens, packing)
    return cuda_time(one_pass)


def run_padded(forward, batches: list[np.ndarray], vocab: int, pad_id: int, warmup: int = 1, repeat: int = 2) -> float:
    """Seconds for one pass of a padded reference: each batch padded to its longest sequence."""
    staged = []
    for b in batches:
        L = int(b.max())
        tokens = torch.full((len(b), L), pad_id, device="cuda", dtype=torch.long)
        mask = torch.zeros((len(b), L), device="cuda", dtype=torch.long)
        for i, n in enumerate(b.tolist()):
            tokens[i, :n] = torch.randint(4, vocab - 1, (n,), device="cuda")
            mask[i, :n] = 1
        staged.append((tokens, mask))

    def one_pass():
        with torch.inference_mode():
            for tokens, mask in staged:
                forward(tokens, mask)
    return cuda_time(one_pass, warmup=warmup, repeat=repeat)


def row(name: str, seconds: float, lengths_tokens: np.ndarray, flops: float, ceiling: float) -> dict:
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    torch.cuda.reset_peak_memory_stats()
    return {"implementation": name, "seconds": seconds, "tokens_per_s": float(lengths_tokens.sum()) / seconds,
            "sequences_per_s": len(lengths_tokens) / seconds, "mfu": flops / seconds / ceiling,
            "peak_gib": peak}


# --- benchmarks -------------------------------------------------------------------------------------

def bench_esm(name: str, workload: str, lengths: np.ndarray, ceiling: float, budget: int,
              references: bool, compiled_peer: bool = True) -> list[dict]:
    layers, d, heads = ESM_SHAPES[name]
    tokens_per_seq = lengths + 2
    flops = esm_flops(tokens_per_seq, layers, d)
    rows = []
    model = random_esm2(name)
    batches = token_batches(lengths, budget, 2)
    t = run_ours(model, batches, 33)
    rows.append(row(f"ours bf16 packed {model.backend.name} (toks {budget})", t, tokens_per_seq, flops, ceiling))
    try:
        model.compile_layers()
        t = run_ours(model, batches, 33)
        rows.append(row(f"ours bf16 packed {model.backend.name} compiled layers", t, tokens_per_seq, flops, ceiling))
    except Exception as e:  # noqa: BLE001
        print(f"compile failed: {type(e).__name__}: {str(e)[:300]}")
    del model
    torch.cuda.empty_cache()
    if not references:
        return rows
    try:
        import esm
        with torch.device("cuda"):
            ref = esm.model.esm2.ESM2(layers, d, heads, esm.data.Alphabet.from_architecture("ESM-1b")).half()
        ref.eval().requires_grad_(False)

        def fair(tokens, mask):
            ref(tokens, repr_layers=[layers])
        t = run_padded(fair, token_batches(lengths, 32768, 2), 33, 1)
        rows.append(row("fair-esm fp16 padded (toks 32768)", t, tokens_per_seq, flops, ceiling))
        ref = None  # free its GPU memory
        torch.cuda.empty_cache()
    except ImportError as e:
        print(f"skip fair-esm: {e}")
    for compiled in (False, True) if compiled_peer else (False,):
        rows += transformers_esm(layers, d, heads, lengths, tokens_per_seq, flops, ceiling, budget, compiled)
    return rows


def transformers_esm(layers: int, d: int, heads: int, lengths: np.ndarray, tokens_per_seq: np.ndarray,
                     flops: float, ceiling: float, budget: int, compiled: bool) -> list[dict]:
    """transformers' EsmModel in bf16 with SDPA on padded batches: what a careful user builds; with
    `compiled`, under torch.compile(dynamic=True), its compile time (the first pass) reported too."""
    try:
        from transformers import EsmConfig, EsmModel
        cfg = EsmConfig(vocab_size=33, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * d, position_embedding_type="rotary", token_dropout=True,
                        mask_token_id=32, pad_token_id=1, emb_layer_norm_before=False,
                        max_position_embeddings=1026, attn_implementation="sdpa")
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            hf = EsmModel(cfg, add_pooling_layer=False)
        torch.set_default_dtype(torch.float32)
        hf.eval().requires_grad_(False)
        run = torch.compile(hf, dynamic=True) if compiled else hf

        def hf_forward(tokens, mask):
            run(input_ids=tokens, attention_mask=mask)
        batches = token_batches(lengths, budget, 2)
        compile_s = None
        if compiled:  # the first pass compiles (and recompiles for the shapes it meets): time it whole
            start = time.perf_counter()
            run_padded(hf_forward, batches, 33, 1, warmup=0, repeat=1)
            compile_s = time.perf_counter() - start
        t = run_padded(hf_forward, batches, 33, 1)
        label = f"transformers EsmModel bf16 sdpa padded{' torch.compile' if compiled else ''} (toks {budget})"
        r = row(label, t, tokens_per_seq, flops, ceiling)
        if compile_s is not None:
            r["first_pass_seconds"] = compile_s
            print(f"  (transformers torch.compile: first pass {compile_s:.0f} s)", flush=True)
        return [r]
    except Exception as e:  # noqa: BLE001
        print(f"skip transformers{' compiled' if compiled else ''}: {type(e).__name__}: {str(e)[:300]}")
        return []
    finally:
        torch.set_default_dtype(torch.float32)
        hf = run = None  # free its GPU memory
        torch.cuda.empty_cache()


def bench_dnabert(lengths_tokens: np.ndarray, ceiling: float, budget: int = 262144) -> list[dict]:
    """Ours at DNABERT-S's GPU batch budget, with the attention `select_backend` picks (FlashAttention-2
    with ALiBi slopes where torch has them, else the packed ALiBi kernel in Triton) and with the
    SDPA-over-a-padded-grid fallback, against the reference code's fp32 setting."""
    c = DNABERTSConfig()
    flops = dnabert_flops(lengths_tokens, c)
    rows = []
    for dtype, toks, compiled, attention in ((torch.bfloat16, budget, True, "auto"),
                                             (torch.bfloat16, budget, True, "sdpa"),
                                             (torch.bfloat16, budget, False, "auto"),
                                             (torch.float32, 128 * 127, False, "sdpa")):
        model = random_dnabert_s(dtype)
        model.backend = select_backend(torch.device("cuda"), dtype, alibi=True, requested=attention, head_dim=64)
        if compiled:
            model.compile_layers()
        if dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = False  # the upstream code runs plain fp32
        t = run_ours(model, token_batches(lengths_tokens - 2, toks, 2), c.vocab_size)
        torch.backends.cuda.matmul.allow_tf32 = True
        if dtype == torch.float32:
            label = "fp32 padded batches of ~128 (reference code's batched fp32 setting)"
        else:
            label = (f"ours bf16 packed {model.backend.name}+ALiBi (toks {toks}, --attention {attention})"
                     f"{' compiled layers' if compiled else ''}")
        rows.append(row(label, t, lengths_tokens, flops, ceiling))
        del model
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="fewer sequences, 650M only")
    ap.add_argument("--budget", type=int, default=65536, help="ESM-2 tokens a batch (DNABERT-S runs at its "
                    "own GPU default, 262144)")
    ap.add_argument("--no-references", action="store_true")
    ap.add_argument("--no-compiled-peer", action="store_true",
                    help="skip transformers under torch.compile (its compile takes 1-2 min a model)")
    ap.add_argument("--workloads", nargs="*", help="keys to run, e.g. esm2_650M/virnucpro dnabert_s (default: all)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = 1000 if args.quick else 3000
    ceiling = matmul_ceiling()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s", flush=True)
    results = {"gpu": gpu, "torch": torch.__version__, "host": platform.node(),
               "ceiling_tflops": ceiling / 1e12, "date": time.strftime("%Y-%m-%d"), "workloads": {}}
    plan = [("esm2_650M", "virnucpro", virnucpro_lengths(n, rng)),
            ("esm2_650M", "proteome", proteome_lengths(n // 2, rng))]
    if not args.quick:
        plan = [("esm2_3B", "virnucpro", virnucpro_lengths(n, rng)),
                ("esm2_3B", "proteome", proteome_lengths(n // 2, rng))] + plan
    dna_lengths = dna_token_lengths(4 * n, rng)
    wanted = (lambda key: not args.workloads or any(key.startswith(w) for w in args.workloads))
    for name, workload, lengths in plan:
        key = f"{name}/{workload}"
        if wanted(key):
            results["workloads"][key] = bench_esm(name, workload, lengths, ceiling, args.budget,
                                                  not args.no_references, not args.no_compiled_peer)
            _print(key, results["workloads"][key])
    key = "dnabert_s/95-125 tokens"
    if wanted(key):
        results["workloads"][key] = bench_dnabert(dna_lengths, ceiling)
        _print(key, results["workloads"][key])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


def _print(key: str, rows: list[dict]) -> None:
    ours = max(r["tokens_per_s"] for r in rows if r["implementation"].startswith("ours"))  # our best path
    print(f"\n{key}")
    print(f"  {'implementation':<62} {'tok/s':>9} {'seq/s':>8} {'MFU':>6} {'peak GiB':>8} {'ours/x':>6}")  # ours: our fastest row
    for r in rows:
        print(f"  {r['implementation']:<62} {r['tokens_per_s'] / 1e3:8.1f}K {r['sequences_per_s']:8.0f} "
              f"{100 * r['mfu']:5.1f}% {r['peak_gib']:8.1f} {ours / r['tokens_per_s']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
