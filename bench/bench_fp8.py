"""FP8 experiment for ESM-2 on Hopper: every Linear of the layers as an FP8 GEMM (`torch._scaled_mm`,
e4m3, per-row scales for activations and weights), compiled like the bf16 path, against bf16 on the
same sequences, with pooled cosine similarity to a float32 model of the same weights.

    python bench/bench_fp8.py --out bench/results/fp8-<gpu>.json [--model esm2_3B]

The issue's bar for shipping it as `--dtype fp8`: >= 1.4x bf16 tokens/s at pooled cosine >= 0.999.
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_models import (ESM_SHAPES, cuda_time, esm_flops, matmul_ceiling, random_init_,  # noqa: E402
                                token_batches, virnucpro_lengths)
from virnucpro.attention import Packing, select_backend  # noqa: E402
from virnucpro.models.esm2 import ESM2, ESM2Config  # noqa: E402

E4M3_MAX = 448.0


class Fp8Linear(nn.Module):
    """y = x W^T + b with x and W in float8 e4m3, per-row scales, bf16 output."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # [N, K]
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        self.register_buffer("weight", (w / scale).to(torch.float8_e4m3fn))  # [N, K] row-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, N]
        self.register_buffer("bias", linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        pad = -T % 16  # the FP8 GEMM wants both dimensions of its first operand divisible by 16
        xf = F.pad(x.float(), (0, 0, 0, pad))
        scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX  # [T, 1]
        xq = (xf / scale).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                             bias=self.bias, out_dtype=torch.bfloat16)
        return y[:T]


def to_fp8(model: ESM2) -> ESM2:
    for layer in model.layers:
        layer.self_attn.qkv_proj = Fp8Linear(layer.self_attn.qkv_proj)
        layer.self_attn.out_proj = Fp8Linear(layer.self_attn.out_proj)
        layer.fc1, layer.fc2 = Fp8Linear(layer.fc1), Fp8Linear(layer.fc2)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="esm2_3B", choices=list(ESM_SHAPES))
    ap.add_argument("-n", type=int, default=2000)
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
    backend = select_backend(torch.device("cuda"), torch.bfloat16, alibi=False)

    # accuracy on a sample: fp32 (sdpa) reference, bf16 flash, fp8 flash
    sample = [b[:64] for b in batches[:1]][0]
    lens = torch.from_numpy(sample).cuda()
    tokens = torch.randint(4, 29, (int(sample.sum()),), device="cuda")
    packing = Packing.from_lengths(lens, int(sample.max()))
    with torch.inference_mode():
        model.backend = select_backend(torch.device("cuda"), torch.float32, alibi=False)
        ref = model.embed(tokens, packing)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.backend = backend
    del model
    torch.cuda.empty_cache()
    fp8 = to_fp8(copy.deepcopy(bf16))
    fp8.backend = backend
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
               "ceiling_tflops": ceiling / 1e12, "date": time.strftime("%Y-%m-%d"), "rows": []}
    for name, m in (("bf16", bf16), ("fp8 e4m3 row-scaled", fp8)):
        m.compile_layers()
        with torch.inference_mode():
            out = m.embed(tokens, packing)
        cos = F.cosine_similarity(out.double(), ref.double(), dim=-1)
        staged = []
        for b in batches:
            bl = torch.from_numpy(b).cuda()
            staged.append((torch.randint(4, 29, (int(b.sum()),), device="cuda"), Packing.from_lengths(bl, int(b.max()))))

        def one_pass(m=m, staged=staged):  # this variant's model and batches
            with torch.inference_mode():
                for t, p in staged:
                    m.embed(t, p)
        seconds = cuda_time(one_pass, warmup=1, repeat=3)
        tok_s = float((lengths + 2).sum()) / seconds
        results["rows"].append({"path": name, "tokens_per_s": tok_s, "mfu_vs_bf16_ceiling": flops / seconds / ceiling,
                                "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())})
        print(f"{name:>22}: {tok_s / 1e3:7.1f} K tokens/s  cosine to fp32 min {cos.min():.5f} mean {cos.mean():.5f}",
              flush=True)
    speedup = results["rows"][1]["tokens_per_s"] / results["rows"][0]["tokens_per_s"]
    results["fp8_speedup"] = speedup
    print(f"fp8 / bf16 = {speedup:.2f}x (bar: 1.4x at cosine >= 0.999)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
