"""Attention over packed sequences, and the choice of kernel.

Both models run on *packed* token streams: a batch of B sequences is one tensor of T = sum(L_i)
tokens, with `cu_seqlens` = [0, L_0, L_0 + L_1, ..., T] marking where each sequence starts (the THD
layout of FlashAttention and BioNeMo). Linear layers, norms and MLPs then do no work on padding.
Only attention needs to know the boundaries; this module gives it four ways to do that:

  * `triton`: our packed FlashAttention-style kernel (`virnucpro.kernels.triton_attention`), with DNABERT-S's
    ALiBi bias or without; both models' default on a CUDA GPU with Triton. For sequences of VirNucPro's
    lengths it is faster than FA2's varlen kernel, whose 128-token blocks waste most of their work on
    short sequences (bench/README.md, "Attention").
  * `flash`: FlashAttention-2 over the packed stream (`torch.ops.aten._flash_attention_forward`, what
    `torch.nn.attention.varlen.varlen_attn` wraps; CUDA, fp16/bf16): ESM-2's kernel without Triton or
    on request (`--attention flash`); DNABERT-S's first choice on a torch build whose FA2 takes ALiBi
    slopes (none so far).
  * `flex`: `torch.nn.attention.flex_attention` with a document mask and an ALiBi score_mod, compiled
    to a Triton kernel (CUDA); opt-in (`--attention flex`) for DNABERT-S. Its speed against the others
    is not measured here (no committed run).
  * `sdpa`: gather the stream into a padded [B, H, L, hd] tensor (`PaddedLayout`), run
    `scaled_dot_product_attention` with a key-padding mask (plus the ALiBi bias when given), gather
    back. Exact, works everywhere; the CPU path and the reference for the others.

The packed kernels of our own or with ALiBi are checked once per process at model load against the
formula computed by hand (`_packed_kernel_fails`) and used only where they run and agree.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeVar

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Packing:
    """Where the sequences of a packed batch start and end, and each token's place in them."""

    cu_seqlens: torch.Tensor  # int32 [B + 1]
    max_seqlen: int
    seq_index: torch.Tensor  # int64 [T]: which sequence a token belongs to
    position: torch.Tensor  # int64 [T]: the token's position within its sequence
    # what an attention backend derives from the packing once a batch and reuses in every layer
    # (a padded bias, a flex block mask)
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, max_seqlen: int | None = None) -> "Packing":
        """Build from per-sequence token counts (any integer tensor on the target device)."""
        lengths = lengths.long()
        cu = F.pad(torch.cumsum(lengths, 0), (1, 0))
        seq_index = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        position = torch.arange(seq_index.numel(), device=lengths.device) - cu[seq_index]
        if max_seqlen is None:
            max_seqlen = int(lengths.max())
        return cls(cu.to(torch.int32), max_seqlen, seq_index, position)

    def mean(self, x: torch.Tensor, skip_first: int = 0, skip_last: int = 0) -> torch.Tensor:
        """Per-sequence mean of x [T, D] in float32, leaving out tokens at either end ([B, D])."""
        keep = (self.position >= skip_first) & (self.position < self.lengths[self.seq_index] - skip_last)
        x = x.float() * keep[:, None]
        sums = x.new_zeros(self.num_sequences, x.shape[1]).index_add_(0, self.seq_index, x)
        counts = (self.lengths - skip_first - skip_last).clamp_min(1)
        return sums / counts[:, None]


# --- ALiBi ------------------------------------------------------------------------------------------

def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes (Press et al.); for a head count that is not a power of two, the slopes of the
    nearest lower power of two followed by every other slope of the next power of two."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


# --- backends ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    name: str  # "triton" (our packed kernel), "flash" (FA2 varlen), "flex" or "sdpa"
    reason: str  # why this one: printed once at model load

    def describe(self) -> str:
        if self.name == "flash":
            return f"FlashAttention-2: enabled ({self.reason})"
        if self.name == "flex":
            return f"FlexAttention: enabled ({self.reason})"
        if self.name == "triton":
            return f"FlashAttention: enabled, our packed kernel in Triton ({self.reason})"
        if "ALiBi" in self.reason:
            return f"FlashAttention-2: not used, PyTorch SDPA with ALiBi bias ({self.reason})"
        return f"FlashAttention-2: disabled, using PyTorch SDPA fallback ({self.reason})"


@lru_cache(maxsize=None)
def _varlen_attn():
    """FlashAttention-2 over packed sequences: `f(q, k, v, cu_q, cu_k, max_q, max_k, scale=)` -> [T, H, Dh],
    or None where this torch has no such kernel. The aten op that `torch.nn.attention.varlen.varlen_attn`
    wraps is called directly: importing that module imports torch._dynamo (seconds), which would hold up
    an actor's first batch while its layers compile beside it."""
    flash = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if flash is None or "cum_seq_q" not in str(flash.default._schema):
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            return None
        return varlen_attn

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        return flash(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False, scale=scale)[0]

    return varlen_attn


def _flash_alibi(q, k, v, cu: torch.Tensor, max_seqlen: int, scale: float, slopes: torch.Tensor) -> torch.Tensor:
    """FlashAttention-2 over packed sequences with the bias -slope * |i - j| (its non-causal ALiBi)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, False, False,
                                                   scale=scale, alibi_slopes=slopes)[0]


@lru_cache(maxsize=None)
def _flash_alibi_fails(device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> str | None:
    """None where the packed FlashAttention kernel takes ALiBi slopes and agrees with the bias added by
    hand (PyTorch's builds so far leave ALiBi out: "This flash attention build does not support
    alibi"); otherwise why not."""
    flash = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if flash is None or "alibi_slopes" not in str(flash.default._schema):
        return f"torch {torch.__version__}'s flash kernel takes no ALiBi slopes"
    return _packed_kernel_fails(_flash_alibi, device, dtype, head_dim, alibi=True)


@lru_cache(maxsize=None)
def _triton_fails(device: torch.device, dtype: torch.dtype, head_dim: int, alibi: bool) -> str | None:
    """None where our Triton kernel (`virnucpro.kernels.triton_attention`) runs here and agrees with the formula
    computed by hand; otherwise why not. Its first call compiles it (Triton caches the binary on disk)."""
    if head_dim < 16 or head_dim > 128 or head_dim & (head_dim - 1):
        return f"head dim {head_dim} is not a power of two in 16..128"
    try:
        from virnucpro.kernels.triton_attention import packed_attention
    except ImportError as e:
        return f"no Triton ({e})"
    return _packed_kernel_fails(packed_attention, device, dtype, head_dim, alibi)


def _packed_kernel_fails(kernel, device: torch.device, dtype: torch.dtype, head_dim: int, alibi: bool) -> str | None:
    """Run `kernel(q, k, v, cu_seqlens, max_seqlen, scale, slopes)` (slopes None without ALiBi) on two
    packed sequences (one longer than a block) and compare with softmax(q k^T * scale - slope * |i - j|) v
    computed by hand (no bias without ALiBi): the sign and the |i - j| form are checked, not assumed,
    and so are the sequences' boundaries. Once per device, dtype, head size and bias: a few
    milliseconds, plus the kernel's compile on its first use (seconds for Triton with a cold cache)."""
    g = torch.Generator(device=device).manual_seed(0)
    lengths, H = (37, 150), 4
    q, k, v = (torch.randn(sum(lengths), H, head_dim, device=device, dtype=dtype, generator=g) for _ in range(3))
    slopes = torch.tensor(alibi_slopes(H), device=device, dtype=torch.float32) if alibi else None
    cu = torch.tensor([0, lengths[0], sum(lengths)], device=device, dtype=torch.int32)
    scale = head_dim ** -0.5
    try:
        got = kernel(q, k, v, cu, max(lengths), scale, slopes)
        if got.is_cuda:
            torch.cuda.synchronize(device)  # a fault inside the kernel surfaces here, not in the comparison
    except Exception as e:  # noqa: BLE001 - a kernel this build or GPU refuses, whatever it raises
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0][:120] if lines else ''}"
    if not torch.allclose(got.float(), alibi_by_hand(q, k, v, cu, scale, slopes), atol=2e-2, rtol=1e-2):
        return ("its ALiBi attention differs from softmax(q k^T * scale - slope * |i - j|) v" if alibi else
                "its attention differs from softmax(q k^T * scale) v")
    return None


def alibi_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                  slopes: torch.Tensor | None) -> torch.Tensor:
    """The reference for the packed kernels: softmax(q k^T * scale - slope * |i - j|) v within each
    sequence, in float32, one sequence at a time (no bias where `slopes` is None, as for the kernels).
    q, k, v [T, H, hd] -> float32 [T, H, hd]."""
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1).float() for t in (q, k, v))  # [H, n, hd]
        pos = torch.arange(end - start, device=q.device)
        scores = qs @ ks.transpose(1, 2) * scale
        if slopes is not None:
            scores = scores - slopes.float()[:, None, None] * (pos[None, :] - pos[:, None]).abs()
        out[start:end] = (torch.softmax(scores, -1) @ vs).transpose(0, 1)
    return out


@contextlib.contextmanager
def in_background(device: torch.device, check: Callable[..., T], *args, **kwargs) -> Iterator[Future[T]]:
    """`check(*args, **kwargs)` in a thread of its own, with `device` as its current CUDA device: the
    kernel checks at load (Triton's import and first launches) overlap the copy of the weights to the
    GPU, which releases the GIL (bench/README.md, "Start-up"). If the block raises, the
    check is waited for: none keeps launching kernels behind a failed load (a retry would compile beside it).

    >>> with in_background(device, select_backend, device, dtype, alibi=False, head_dim=64) as backend:
    ...     state = to_device(state, device, dtype)
    >>> model.backend = backend.result()
    """
    if device.type == "cuda" and device.index is None:  # the caller's current device, not the thread's (0)
        device = torch.device("cuda", torch.cuda.current_device())

    def run() -> T:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return check(*args, **kwargs)

    executor = ThreadPoolExecutor(1, thread_name_prefix="kernel-check")
    future = executor.submit(run)
    executor.shutdown(wait=False)  # the thread ends with the check
    try:
        yield future
    except BaseException:
        wait([future])
        raise


def select_backend(device: torch.device, dtype: torch.dtype, alibi: bool, requested: str = "auto", *,
                   head_dim: int) -> Backend:
    """Pick the fastest attention kernel that supports this device, dtype, bias and head size.
    `requested`: "auto", "sdpa", "flash" (FlashAttention-2's varlen kernel; ESM-2 only) or "flex"
    (FlexAttention; DNABERT-S only); a request that does not apply to the model is said so in the
    reason and otherwise ignored."""
    if requested == "sdpa":
        return Backend("sdpa", "requested")
    if device.type != "cuda":
        return Backend("sdpa", f"device is {device.type}, packed flash kernels need CUDA")
    if dtype not in (torch.float16, torch.bfloat16):
        return Backend("sdpa", f"dtype {str(dtype).removeprefix('torch.')} is not fp16/bf16")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return Backend("sdpa", f"GPU compute capability {major}.{minor} < 8.0 (Ampere)")
    where = f"{torch.cuda.get_device_name(device)}, {str(dtype).removeprefix('torch.')}"
    ignored = ("; --attention flash applies to ESM-2 only" if requested == "flash" and alibi else
               "; --attention flex applies to DNABERT-S only" if requested == "flex" and not alibi else "")
    if alibi:
        if requested == "flex":
            return Backend("flex", f"packed ALiBi attention, {where}")
        why = _flash_alibi_fails(device, dtype, head_dim)
        if why is None:
            return Backend("flash", f"varlen FlashAttention-2 with its ALiBi slopes over packed sequences, {where}")
        why_triton = _triton_fails(device, dtype, head_dim, alibi=True)
        if why_triton is None:
            return Backend("triton", f"packed sequences with the ALiBi bias, which FlashAttention-2 does not take "
                                     f"here ({why}), {where}{ignored}")
        # Elsewhere SDPA with an additive bias over a padded grid (cuDNN's fused attention on Hopper,
        # else the memory-efficient kernel: PyTorch picks). FlexAttention stays opt-in: it compiles a
        # kernel in each process, and no committed run shows it faster here (bench/README.md, "Attention").
        return Backend("sdpa", f"no packed ALiBi kernel (FlashAttention-2: {why}; Triton: {why_triton}); "
                               f"fused SDPA with the bias over a padded grid, {where}{ignored}")
    if requested == "flash" and _varlen_attn() is not None:
        return Backend("flash", f"varlen_attn over packed sequences (requested), {where}")
    why_triton = _triton_fails(device, dtype, head_dim, alibi=False)
    if why_triton is None:
        unavailable = "; FlashAttention-2 requested, but this torch has no varlen kernel" if requested == "flash" else ""
        return Backend("triton", f"packed sequences in 64-token blocks, faster than FlashAttention-2's varlen "
                                 f"kernel on short sequences, {where}{ignored}{unavailable}")
    if _varlen_attn() is None:
        return Backend("sdpa", f"torch {torch.__version__} has no torch.nn.attention.varlen; our Triton kernel: "
                               f"{why_triton}{ignored}")
    return Backend("flash", f"varlen_attn over packed sequences (our Triton kernel: {why_triton}), {where}{ignored}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, backend: Backend,
              scale: float, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal attention within each packed sequence.

    q, k, v: [T, H, hd]; alibi: float32 [H] slopes, adding -slope * |i - j| to the scores. Returns
    [T, H, hd].

    Under torch.compile (`keep_out_of_compile`) the kernels stay opaque: they are already fused. flash
    and triton, which take only cu_seqlens and max_seqlen, are one custom op, so a compiled layer is one
    graph; sdpa and flex, which cache per-batch Python state in `packing`, sit behind a graph break.
    """
    return _kernels(q, k, v, packing, backend, scale, alibi)


def keep_out_of_compile() -> None:
    """Make torch.compile treat the attention kernels as opaque. The models' `compile_layers` call this;
    it is not done at import because registering an op and `torch.compiler.disable` import
    torch._dynamo (seconds), which a process that never compiles (the driver) should skip.

    flash and triton go through the custom op `virnucpro::packed_attention`: dynamo traces a layer
    through it as one node, so each layer is one graph, shared by all layers. With a graph break there
    instead, dynamo traced four graphs (the layer and its attention module, each split, with resume
    functions; a CPU test counts them). One graph compiles in a fraction of the time, and the layers run
    as fast as before (bench/README.md, "Where the actor's compile goes"). sdpa and flex keep the graph
    break."""
    global _kernels
    with _register_lock:  # two layers' compiles may start at once; the op is registered once
        if _kernels is not _attention_kernels:
            return
        op = _packed_attention_op()
        eager = torch.compiler.disable(_attention_kernels)

        def kernels(q, k, v, packing, backend, scale, alibi):
            if backend.name in PACKED_KERNELS:
                return op(q, k, v, packing.cu_seqlens, packing.max_seqlen, scale, alibi, backend.name)
            return eager(q, k, v, packing, backend, scale, alibi)

        _kernels = kernels


_register_lock = threading.Lock()


@lru_cache(maxsize=None)
def _packed_attention_op():
    """`_packed_kernel` registered as a torch custom op (what torch.compile needs to trace over it)."""
    op = torch.library.custom_op(  # the schema spelled out: torch < 2.5 cannot read string annotations
        "virnucpro::packed_attention", mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, float scale, "
               "Tensor? alibi, str backend) -> Tensor")(_packed_kernel)

    @op.register_fake
    def _(q, k, v, cu_seqlens, max_seqlen, scale, alibi, backend):
        return q.new_empty(q.shape)  # [T, H, hd], contiguous, as both kernels return it

    # the op as torch.ops holds it: torch 2.11's dynamo traced into the Python object `op` (its warning
    # named a line of `_packed_kernel`), where it treats torch.ops entries as one opaque call
    return torch.ops.virnucpro.packed_attention.default


PACKED_KERNELS = ("triton", "flash")  # the backends `_packed_kernel` runs: they need only cu_seqlens, max_seqlen


def _packed_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                   scale: float, alibi: torch.Tensor | None, backend: str) -> torch.Tensor:
    """The kernels that need only the packing's boundaries: triton (ours) and flash (FA2 varlen)."""
    if backend == "triton":
        from virnucpro.kernels.triton_attention import packed_attention
        return packed_attention(q, k, v, cu_seqlens, max_seqlen, scale, alibi)
    if alibi is not None:
        out = _flash_alibi(q, k, v, cu_seqlens, max_seqlen, scale, alibi)
    else:
        out = _varlen_attn()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
    return out.contiguous()  # as the op's fake says (FA2 follows q's strides; a no-op for our models)


def _attention_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, backend: Backend,
                       scale: float, alibi: torch.Tensor | None) -> torch.Tensor:
    if backend.name in PACKED_KERNELS:
        return _packed_kernel(q, k, v, packing.cu_seqlens, packing.max_seqlen, scale, alibi, backend.name)
    if backend.name == "flex":
        return _flex_attention(q, k, v, packing, scale, alibi)
    return _sdpa_attention(q, k, v, packing, scale, alibi)


_kernels = _attention_kernels  # made opaque to torch.compile by keep_out_of_compile()


@dataclass
class PaddedLayout:
    """Where a packed batch's tokens sit in the padded [rows, length] grid the SDPA kernels take.

    On CUDA the grid is rounded up (`bucketed`) so that a run meets few distinct shapes: cuDNN's fused
    attention, PyTorch's pick for a bias on Hopper, builds a plan for each new shape and compiles a
    kernel for each new length, which per batch cost more than the attention itself (bench/README.md,
    "Attention"); an odd length also got a slower kernel than an even one.
    """

    rows: int  # B' >= B: sequences, rounded up; the extra rows are discarded
    length: int  # L' >= longest sequence
    gather: torch.Tensor  # int64 [B' * L']: the token each slot is filled from
    slot: torch.Tensor  # int64 [T]: each token's slot
    keep: torch.Tensor  # bool [B', L']: the keys each row attends to

    @staticmethod
    def of(packing: Packing, bucketed: bool) -> "PaddedLayout":
        layout = packing.cache.get("padded_layout")
        if layout is None:
            layout = packing.cache["padded_layout"] = PaddedLayout._build(packing, bucketed)
        return layout

    @staticmethod
    def _build(packing: Packing, bucketed: bool) -> "PaddedLayout":
        B, L = packing.num_sequences, packing.max_seqlen
        if bucketed:
            L = _round_up(L, 16)
            B = _round_up(B, 1 << max(0, B.bit_length() - 5))  # at most 1/16 more rows
        device = packing.cu_seqlens.device
        lengths = F.pad(packing.lengths, (0, B - packing.num_sequences), value=L)  # extra rows: all keys
        keep = torch.arange(L, device=device)[None, :] < lengths[:, None]  # [B', L']
        # A padding slot is filled from some real token: any finite value does, since its key is masked
        # (its weight is exactly zero) and its query's output row is never read. A gather of whole rows
        # took a fifth of the GPU time of scattering tokens into a zeroed grid (profile-*.json).
        starts = F.pad(packing.cu_seqlens[:-1].long(), (0, B - packing.num_sequences))
        gather = (starts[:, None] + torch.arange(L, device=device)[None, :]).masked_fill_(
            ~keep | (torch.arange(B, device=device) >= packing.num_sequences)[:, None], 0)
        slot = packing.seq_index * L + packing.position
        return PaddedLayout(B, L, gather.reshape(-1), slot, keep)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B', L', ...]."""
        return x.index_select(0, self.gather).view((self.rows, self.length) + tuple(x.shape[1:]))

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B', L', ...] -> [T, ...]."""
        return x.reshape((-1,) + tuple(x.shape[2:])).index_select(0, self.slot)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _sdpa_attention(q, k, v, packing: Packing, scale: float, alibi: torch.Tensor | None) -> torch.Tensor:
    layout = PaddedLayout.of(packing, bucketed=q.is_cuda)  # an earlier layer's layout when there is one
    qp, kp, vp = (layout.pad(t).transpose(1, 2) for t in (q, k, v))  # [T, H, hd] -> [B', H, L', hd]
    mask = packing.cache.get("sdpa_mask")
    if mask is None:
        mask = packing.cache["sdpa_mask"] = _sdpa_mask(layout, alibi, q.dtype)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)
    return layout.unpad(out.transpose(1, 2))


def _sdpa_mask(layout: PaddedLayout, alibi: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Key-padding mask [B', 1, 1, L'] (bool), or with ALiBi an additive bias [B', H, L', L']."""
    keep = layout.keep
    if alibi is None:
        return keep[:, None, None, :]  # True = attend
    L = layout.length
    ar = torch.arange(L, device=keep.device)
    distance = (ar[None, :] - ar[:, None]).abs().to(torch.float32)  # [L, L]
    bias = -alibi.float()[:, None, None] * distance  # [H, L, L]
    return bias[None].masked_fill(~keep[:, None, None, :], float("-inf")).to(dtype)


@lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=True)


def _flex_attention(q, k, v, packing: Packing, scale: float, alibi: torch.Tensor | None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    seq_index, position = packing.seq_index, packing.position
    T = q.shape[0]

    def same_sequence(b, h, q_idx, kv_idx):
        return seq_index[q_idx] == seq_index[kv_idx]

    def alibi_bias(score, b, h, q_idx, kv_idx):
        return score - alibi[h] * (position[q_idx] - position[kv_idx]).abs()

    block_mask = packing.cache.get("flex_block_mask")
    if block_mask is None:
        block_mask = packing.cache["flex_block_mask"] = create_block_mask(
            same_sequence, None, None, T, T, device=q.device, _compile=True)
    # flex_attention wants [B, H, T, hd]; the whole packed stream is one "batch" row
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = _compiled_flex()(qh, kh, vh, score_mod=alibi_bias if alibi is not None else None,
                           block_mask=block_mask, scale=scale)
    return out.squeeze(0).transpose(0, 1)
