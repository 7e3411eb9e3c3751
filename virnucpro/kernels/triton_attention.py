"""Packed attention in Triton: non-causal attention over the packed token stream, no padding, with
DNABERT-S's ALiBi bias where slopes are given.

Each program computes one block of one sequence's queries for one head, streaming that sequence's
keys and values in blocks with the online softmax of FlashAttention (Dao et al. 2022); the bias
-slope * |i - j| is computed in registers. q, k and v are read in place from the fused QKV
projection's output (strided views, no copy).

Why our own kernel where PyTorch has FlashAttention-2: PyTorch's FA2 build takes no ALiBi slopes, and
its varlen kernel works in 128-token blocks, so a 168-token protein (VirNucPro's 500 bp chunks) costs
it a 256 x 256 tile grid against 192 x 192 here (the measured difference: bench/README.md, "Attention").
Imported only where Triton and a CUDA GPU are present (`attention.select_backend`, which checks it
against the plain formula at model load).
"""

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _packed_attention_fwd(Q, K, V, O, cu_seqlens, slopes,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                          scale_log2e,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          ALIBI: tl.constexpr):
    seq, block, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    begin = tl.load(cu_seqlens + seq)
    length = tl.load(cu_seqlens + seq + 1) - begin
    if block * BLOCK_M >= length:  # the grid is sized for the longest sequence of the batch
        return
    # The sequence's first token, as 64-bit offsets: begin * stride passes 2^31 elements in a batch of
    # 280 K tokens for ESM-2 3B's fused QKV (stride 3 * 2560). Offsets within a sequence stay 32-bit.
    start_token = begin.to(tl.int64)
    Q += start_token * stride_qt
    K += start_token * stride_kt
    V += start_token * stride_vt
    O += start_token * stride_ot
    if ALIBI:
        slope_log2e = tl.load(slopes + head) * 1.4426950408889634  # the bias, in exp2's units as the scores
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions within the sequence
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < length
    q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of each query's scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - max)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, length, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # key positions
        col_ok = cols < length
        k = tl.load(K + cols[:, None] * stride_kt + head * stride_kh + dims[None, :],
                    mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2e  # [BLOCK_M, BLOCK_N] in float32
        if ALIBI:
            s -= slope_log2e * tl.abs(rows[:, None] - cols[None, :]).to(tl.float32)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * stride_vt + head * stride_vh + dims[None, :],
                    mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float, slopes: torch.Tensor | None = None, *,
                     block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """Non-causal attention within each packed sequence, with the bias -slope_h * |i - j| where `slopes`
    are given.

    q, k, v: [T, H, hd] (any strides with a contiguous last dimension; hd a power of two, 16-128),
    cu_seqlens: int32 [B + 1], max_seqlen: the longest sequence, slopes: float32 [H] or None. Returns a
    new [T, H, hd] tensor. The defaults are bench/probe_packed_attention.py's sweep's choice for ESM-2's
    and DNABERT-S's lengths (bench/README.md, "Attention")."""
    T, H, hd = q.shape
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((T, H, hd), device=q.device, dtype=q.dtype)
    # sequences on the grid's x axis: y and z are limited to 65535, and a batch can hold more sequences
    grid = (cu_seqlens.numel() - 1, triton.cdiv(max_seqlen, block_m), H)
    _packed_attention_fwd[grid](q, k, v, out, cu_seqlens, q if slopes is None else slopes,  # q: unread
                                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                out.stride(0), out.stride(1), scale * LOG2E,
                                HEAD_DIM=hd, BLOCK_M=block_m, BLOCK_N=block_n, ALIBI=slopes is not None,
                                num_warps=num_warps, num_stages=num_stages)
    return out
