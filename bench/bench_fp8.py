"""FP8 frontier for ESM-2 on Hopper: tokens/s against accuracy for each way of putting GEMMs in float8
e4m3, in one process, on the same sequences and weights, beside our bf16 path.

    python bench/bench_fp8.py --out bench/results/fp8-frontier-<gpu>.json [--model esm2_3B] [-n 1200]

Each variant swaps some of the layers' Linears for `Fp8Linear` (the rest stay bf16) and is compiled
like the bf16 path, so Inductor fuses the rowwise quantisation of fc1's and qkv's inputs into their
layer norms and of fc2's into the GELU (out_proj's input comes from the attention kernel, outside the
compiled graph, and tensorwise scaling needs a whole-tensor amax first). Variants differ in
- the scales: per-token activations x per-output-channel weights ("rowwise", CUTLASS), one scale per
  tensor ("tensorwise", cuBLAS), or DeepSeek-V3's 1x128 activation tiles x 128x128 weight blocks
  ("block", cuBLAS; only where this torch and GPU take it);
- which GEMMs (all four of a layer, or the MLP's fc1/fc2, two thirds of the Linear FLOPs);
- how many layers at each end stay bf16;
- fast accumulation (Hopper's reduced-precision FP8 accumulator).

Accuracy, per variant, against a float32 model of the same weights on `--check` sequences: the minimum
over sequences of the pooled (mean) embedding's cosine, and the minimum over residues of the last
layer's per-residue cosine. The bar for shipping `--dtype fp8` (issue 14): >= 1.35x bf16 tokens/s with
pooled >= 0.999 and per-residue >= 0.99 on every sequence. Also written: how alike the float32 pooled
embeddings of different sequences are, which decides how much of the per-residue error survives
pooling (see bench/README.md, "FP8").
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_models import (ESM_SHAPES, cuda_time, esm_flops, matmul_ceiling, random_init_,  # noqa: E402
                                token_batches, virnucpro_lengths)
from virnucpro.kernels.attention import Packing, select_backend  # noqa: E402
from virnucpro.models.esm2 import ESM2, ESM2Config  # noqa: E402

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
ALL_GEMMS = ("qkv", "out", "fc1", "fc2")


@dataclass(frozen=True)
class Variant:
    name: str
    scaling: str = "rowwise"  # rowwise | tensorwise | block
    gemms: tuple[str, ...] = ALL_GEMMS
    bf16_ends: int = 0  # layers at each end left in bf16
    fast_accum: bool = False


VARIANTS = [
    Variant("fp8 rowwise, all GEMMs"),
    Variant("fp8 rowwise, all GEMMs, fast accum", fast_accum=True),
    Variant("fp8 tensorwise, all GEMMs", scaling="tensorwise"),
    Variant("fp8 tensorwise, all GEMMs, fast accum", scaling="tensorwise", fast_accum=True),
    Variant("fp8 block 1x128/128x128, all GEMMs", scaling="block"),
    Variant("fp8 rowwise, all GEMMs, 2 bf16 layers each end", bf16_ends=2),
    Variant("fp8 rowwise, MLP only", gemms=("fc1", "fc2")),
    Variant("fp8 rowwise, MLP only, fast accum", gemms=("fc1", "fc2"), fast_accum=True),
    Variant("fp8 rowwise, MLP only, 4 bf16 layers each end", gemms=("fc1", "fc2"), bf16_ends=4),
    Variant("fp8 rowwise, fc1 only", gemms=("fc1",)),
]


def _quantise_rows(x: torch.Tensor, block: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> e4m3 [M, K] and float32 decode scales [M, 1] (block=None) or [M, K/block]."""
    M, K = x.shape
    xb = x.float().view(M, -1, block) if block else x.float().unsqueeze(1)  # [M, G, K/G]
    amax = xb.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    q = (xb * (E4M3_MAX / amax)).to(E4M3).view(M, K)
    return q, (amax / E4M3_MAX).squeeze(-1)  # [M, G]


class Fp8Linear(nn.Module):
    """y = x W^T + b with x and W in e4m3 and bf16 out; W quantised once, x at each call."""

    def __init__(self, linear: nn.Linear, scaling: str, fast_accum: bool):
        super().__init__()
        self.scaling, self.fast_accum = scaling, fast_accum
        w = linear.weight.detach().float()  # [N, K]
        N, K = w.shape
        if scaling == "rowwise":
            wq, ws = _quantise_rows(w, None)  # per output channel
            ws = ws.t().contiguous()  # [1, N]
        elif scaling == "tensorwise":
            amax = w.abs().amax().clamp(min=1e-12)
            wq, ws = (w * (E4M3_MAX / amax)).to(E4M3), (amax / E4M3_MAX).float()
        else:  # 128x128 blocks: scales [N/128, K/128]
            blocks = w.view(N // 128, 128, K // 128, 128)
            amax = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12)
            wq = (blocks * (E4M3_MAX / amax)).to(E4M3).view(N, K)
            ws = (amax / E4M3_MAX).view(N // 128, K // 128)
        self.register_buffer("weight", wq)  # [N, K] row-major: W^T is the column-major [K, N] the GEMM wants
        self.register_buffer("weight_scale", ws)
        self.register_buffer("bias", linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        x = F.pad(x, (0, 0, 0, -T % 16))  # the FP8 GEMM wants the rows of its first operand in 16s
        if self.scaling == "rowwise":
            xq, xs = _quantise_rows(x, None)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale, bias=self.bias,
                                 out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)
        elif self.scaling == "tensorwise":
            amax = x.abs().amax().float().clamp(min=1e-12)
            xq = (x.float() * (E4M3_MAX / amax)).to(E4M3)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=amax / E4M3_MAX, scale_b=self.weight_scale,
                                 bias=self.bias, out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)
        else:
            xq, xs = _quantise_rows(x, 128)
            xs = xs.t().contiguous().t()  # 1x128 scales are read outer-dim-major: [M, K/128], stride (1, M)
            y = block_scaled_mm(xq, self.weight.t(), xs, self.weight_scale) + self.bias
        return y[:T]


BLOCK_WEIGHT_SCALES_TRANSPOSED = [False]  # which layout of the 128x128 scales this torch reads (probed)


def block_scaled_mm(xq, wq_t, xs, ws) -> torch.Tensor:
    from torch.nn.functional import ScalingType, scaled_mm
    ws = ws.t() if BLOCK_WEIGHT_SCALES_TRANSPOSED[0] else ws
    return scaled_mm(xq, wq_t, xs, ScalingType.BlockWise1x128, ws, ScalingType.BlockWise128x128,
                     output_dtype=torch.bfloat16)


def block_scaling_fails() -> str | None:
    """None when block-scaled e4m3 GEMMs run here and agree with the product they approximate (both
    layouts of the weight scales are tried: the one that agrees is kept)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 512, device="cuda", generator=g)
    lin = nn.Linear(512, 384, device="cuda")
    lin.weight.data.copy_(torch.randn(384, 512, device="cuda", generator=g) * torch.rand(384, 1, device="cuda"))
    lin.bias.data.zero_()
    want = x @ lin.weight.t()
    why = "no layout tried"
    for transposed in (False, True):
        BLOCK_WEIGHT_SCALES_TRANSPOSED[0] = transposed
        try:
            got = Fp8Linear(lin, "block", False)(x.bfloat16()).float()
        except Exception as e:  # noqa: BLE001 - any refusal from the op or its layout checks
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            continue
        err = float((got - want).norm() / want.norm())
        if err < 0.06:
            return None
        why = f"block-scaled result off by {err:.3f} (relative L2)"
    return why


def to_fp8(model: ESM2, v: Variant) -> ESM2:
    n = len(model.layers)
    for i, layer in enumerate(model.layers):
        if i < v.bf16_ends or i >= n - v.bf16_ends:
            continue
        attn = layer.self_attn
        if "qkv" in v.gemms:
            attn.qkv_proj = Fp8Linear(attn.qkv_proj, v.scaling, v.fast_accum)
        if "out" in v.gemms:
            attn.out_proj = Fp8Linear(attn.out_proj, v.scaling, v.fast_accum)
        if "fc1" in v.gemms:
            layer.fc1 = Fp8Linear(layer.fc1, v.scaling, v.fast_accum)
        if "fc2" in v.gemms:
            layer.fc2 = Fp8Linear(layer.fc2, v.scaling, v.fast_accum)
    return model


def accuracy(model: ESM2, tokens: torch.Tensor, packing: Packing, ref_tokens: torch.Tensor,
             ref_pooled: torch.Tensor) -> dict:
    with torch.inference_mode():
        hidden = model(tokens, packing).float()
    residue = (packing.position >= 1) & (packing.position < packing.lengths[packing.seq_index] - 1)
    per_residue = F.cosine_similarity(hidden[residue].double(), ref_tokens[residue].double(), dim=-1)
    pooled = F.cosine_similarity(packing.mean(hidden, 1, 1).double(), ref_pooled.double(), dim=-1)
    return {"pooled_cosine_min": float(pooled.min()), "pooled_cosine_mean": float(pooled.mean()),
            "per_residue_cosine_min": float(per_residue.min()),
            "per_residue_cosine_p001": float(per_residue.quantile(0.001)),
            "per_residue_cosine_mean": float(per_residue.mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="esm2_3B", choices=list(ESM_SHAPES))
    ap.add_argument("-n", type=int, default=1200, help="proteins timed (VirNucPro's lengths)")
    ap.add_argument("--check", type=int, default=128, help="proteins in the accuracy check")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = ap.parse_args()
    layers, d, heads = ESM_SHAPES[args.model]
    ceiling = matmul_ceiling()
    rng = np.random.default_rng(0)
    lengths = virnucpro_lengths(args.n, rng)
    batches = token_batches(lengths, 65536, 2)
    flops = esm_flops(lengths + 2, layers, d)

    with torch.device("cuda"):
        model = ESM2(ESM2Config(layers, d, heads))
    random_init_(model, seed=1)
    model.eval().requires_grad_(False)

    # the check: `--check` proteins of VirNucPro's lengths, float32 reference (SDPA, no TF32)
    check_lengths = torch.from_numpy(virnucpro_lengths(args.check, np.random.default_rng(1)) + 2).cuda()
    tokens = torch.randint(4, 29, (int(check_lengths.sum()),), device="cuda")
    packing = Packing.from_lengths(check_lengths, int(check_lengths.max()))
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        model.backend = select_backend(torch.device("cuda"), torch.float32, alibi=False, head_dim=64)
        ref_tokens = model(tokens, packing).float()
    ref_pooled = packing.mean(ref_tokens, 1, 1)
    torch.backends.cuda.matmul.allow_tf32 = True
    unit = F.normalize(ref_pooled.double(), dim=-1)
    similarity = unit @ unit.T
    off_diagonal = similarity[~torch.eye(len(unit), dtype=torch.bool, device="cuda")]
    residue_norm = ref_tokens.norm(dim=-1).mean()

    base = model.to(torch.bfloat16)  # every variant starts from a copy of these bf16 weights
    base.backend = select_backend(torch.device("cuda"), torch.bfloat16, alibi=False, head_dim=64)
    torch.cuda.empty_cache()
    staged = []
    for b in batches:
        bl = torch.from_numpy(b).cuda()
        staged.append((torch.randint(4, 29, (int(b.sum()),), device="cuda"), Packing.from_lengths(bl, int(b.max()))))

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
               "ceiling_tflops": ceiling / 1e12, "date": time.strftime("%Y-%m-%d"),
               "timed": {"proteins": args.n, "tokens": int((lengths + 2).sum()), "toks_per_batch": 65536},
               "check": {"proteins": args.check, "residues": int((check_lengths - 2).sum()),
                         "pooled_cosine_between_sequences_mean": float(off_diagonal.mean()),
                         "pooled_norm_over_residue_norm": float(ref_pooled.norm(dim=-1).mean() / residue_norm)},
               "bar": {"speedup": 1.35, "pooled_cosine_min": 0.999, "per_residue_cosine_min": 0.99},
               "rows": []}
    print(f"check: pooled embeddings of different proteins have mean cosine {off_diagonal.mean():.3f}; "
          f"|pooled| / |residue| = {results['check']['pooled_norm_over_residue_norm']:.3f}", flush=True)
    block_refused = block_scaling_fails()
    wanted = [Variant("bf16", gemms=())] + VARIANTS
    if args.only:
        wanted = [v for v in wanted if v.name == "bf16" or v.name in args.only]
    for v in wanted:
        row = {"path": v.name, **asdict(v)}
        if v.scaling == "block" and block_refused:
            row["skipped"] = block_refused
            results["rows"].append(row)
            print(f"{v.name:>48}: skipped ({block_refused})", flush=True)
            continue
        m = copy.deepcopy(base)
        try:
            to_fp8(m, v)
            torch._dynamo.reset()  # each variant compiles afresh: no cache limit reached, no stale graph reused
            m.compile_layers()
            row.update(accuracy(m, tokens, packing, ref_tokens, ref_pooled))

            def one_pass(m=m):
                with torch.inference_mode():
                    for t, p in staged:
                        m.embed(t, p)
            seconds = cuda_time(one_pass, warmup=1, repeat=3)
        except Exception as e:  # noqa: BLE001 - a variant this torch cannot run is reported, not fatal
            if not v.gemms:
                raise  # no bf16 baseline, no speedups
            row["skipped"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            results["rows"].append(row)
            print(f"{v.name:>48}: failed ({row['skipped']})", flush=True)
            continue
        finally:
            del m
            one_pass = None  # its default argument holds the model too
            torch.cuda.empty_cache()
        row["tokens_per_s"] = results["timed"]["tokens"] / seconds
        row["mfu_vs_bf16_ceiling"] = flops / seconds / ceiling
        row["speedup"] = row["tokens_per_s"] / results["rows"][0]["tokens_per_s"] if results["rows"] else 1.0
        bar = results["bar"]
        row["meets_bar"] = (row["speedup"] >= bar["speedup"] and row["pooled_cosine_min"] >= bar["pooled_cosine_min"]
                            and row["per_residue_cosine_min"] >= bar["per_residue_cosine_min"])
        results["rows"].append(row)
        print(f"{v.name:>48}: {row['tokens_per_s'] / 1e3:7.1f} K tok/s {row['speedup']:5.2f}x  pooled min "
              f"{row['pooled_cosine_min']:.5f}  per-residue min {row['per_residue_cosine_min']:.4f} "
              f"(p0.1% {row['per_residue_cosine_p001']:.4f})", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))  # after each row: a killed run keeps what it has
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
