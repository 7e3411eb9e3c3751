"""DNABERT-S's elementwise steps as one Triton kernel each, for layers that run without torch.compile.

Uncompiled, the gated-GELU MLP costs three passes over its [T, 2 x 3072] activations (the GELU of a
strided half, then the product) and each post-LN residual two (the add, then the LayerNorm). Each
kernel here reads its inputs once and writes once, as Inductor's fused kernels do, so the eager layers
come close to the compiled ones without importing the compiler (torch._dynamo and torch._inductor take
seconds to import in a new actor, which then competes with the first batches for the GIL:
bench/README.md, "Where the actor's compile goes").

Both compute in float32 and round once, where eager PyTorch rounds the GELU and the residual sum to the
model's dtype before the next step. Imported only where Triton and a CUDA GPU are present
(`dnabert_s.fused_kernels_fail` checks them against the plain ops at model load).
"""

import torch
import triton
import triton.language as tl

# Tile shapes: the fastest of bench/probe_fused.py's sweep at DNABERT-S's batch size (its figures:
# bench/results/probe-fused-nvidia-h200.json).
GATED_GELU_BLOCK = (2, 1024, 4)  # BLOCK_M rows, BLOCK_N columns a program, num_warps
ADD_LAYER_NORM_BLOCK = (8, 8)  # rows a program, num_warps (a row is held whole: width rounded up to 2^k)


# n_rows differs with every batch: not specialised (Triton would otherwise build, and run unchecked, other
# versions for a multiple of 16 rows or for one row than the one the load-time check ran)
@triton.jit(do_not_specialize=["n_rows"])
def _gated_gelu_fwd(H, Y, n_rows, stride_h, stride_y, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < WIDTH)[None, :]
    rows = rows.to(tl.int64)  # T x 6144 passes 2^31 elements at 350 K tokens
    h = H + rows[:, None] * stride_h + cols[None, :]
    gate = tl.load(h, mask=mask, other=0.0).to(tl.float32)
    linear = tl.load(h + WIDTH, mask=mask, other=0.0).to(tl.float32)
    y = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)) * linear  # exact (erf) GELU, as F.gelu
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def gated_gelu(h: torch.Tensor) -> torch.Tensor:
    """gelu(h[:, :I]) * h[:, I:] for h [T, 2I] (DNABERT-S's gated MLP; the GELU is the exact, erf one).
    Returns [T, I] in h's dtype."""
    T, two_i = h.shape
    width = two_i // 2
    h = h if h.stride(1) == 1 else h.contiguous()
    y = torch.empty(T, width, device=h.device, dtype=h.dtype)
    block_m, block_n, warps = GATED_GELU_BLOCK
    grid = (triton.cdiv(T, block_m), triton.cdiv(width, block_n))
    _gated_gelu_fwd[grid](h, y, T, h.stride(0), y.stride(0), WIDTH=width, BLOCK_M=block_m, BLOCK_N=block_n,
                          num_warps=warps)
    return y


@triton.jit(do_not_specialize=["n_rows"])
def _add_layer_norm_fwd(X, R, W, B, Y, n_rows, stride_x, stride_r, stride_y, eps, WIDTH: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < WIDTH
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / WIDTH
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / WIDTH + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """norm(x + residual) for x, residual [T, C] (a post-LN residual), in one pass. Returns [T, C] in x's dtype."""
    T, width = x.shape
    x, residual = (t if t.stride(1) == 1 else t.contiguous() for t in (x, residual))
    y = torch.empty_like(x)
    rows, warps = ADD_LAYER_NORM_BLOCK
    _add_layer_norm_fwd[(triton.cdiv(T, rows),)](x, residual, norm.weight, norm.bias, y, T, x.stride(0),
                                                 residual.stride(0), y.stride(0), norm.eps, WIDTH=width,
                                                 BLOCK_M=rows, BLOCK_N=triton.next_power_of_2(width),
                                                 num_warps=warps)
    return y
