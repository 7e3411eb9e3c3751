"""A plain, deliberately slow reference forward pass of DNABERT-S, for tests only.

This module is an *independent* oracle: it imports nothing from ``virnucpro`` and is
written to be read, not to be fast. It follows the behaviour described in
``shared/REFERENCE.md`` section 3 (DNABERT-S = the DNABERT-2 / MosaicBERT encoder):

* embeddings: word + token-type(0) embedding, LayerNorm; no position embeddings;
* ``num_hidden_layers`` post-LN layers, each:
    - fused ``Wqkv`` projection, columns in Q, K, V order, heads contiguous inside each;
    - scores ``q k^T / sqrt(head_dim)`` plus an ALiBi bias ``-slope_h * |i - j|``;
    - softmax over keys, weighted sum of values, ``dense`` projection,
      residual + ``LayerNorm``;
    - gated MLP: ``gated_layers`` (no bias) gives 2 * intermediate columns; the FIRST
      ``intermediate`` columns go through exact (erf) GELU and multiply the SECOND
      ``intermediate`` columns; then ``wo``, residual + ``layernorm``;
* embedding of a sequence = mean of the last hidden states over ALL its tokens,
  [CLS] and [SEP] included.

Sequences are run one at a time (no padding, no attention mask), exactly as upstream
VirNucPro calls the model, so no padding can leak into the result. Every step is an
explicit tensor operation (matmul, an explicit [H, L, L] bias matrix, an explicit
softmax, LayerNorm and GELU written out) so that it does not share code paths with an
optimised implementation under test.

Public API::

    alibi_slopes(n_heads) -> list[float]
    load_reference_model(model_dir) -> (config dict, state dict)
    reference_dnabert_hidden(model_dir, sequence) -> Tensor [L, hidden] float32
    reference_dnabert_embed(model_dir, sequences) -> Tensor [N, hidden] float32
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer

__all__ = [
    "alibi_slopes",
    "alibi_bias",
    "load_reference_model",
    "load_reference_tokenizer",
    "reference_forward",
    "reference_dnabert_hidden",
    "reference_dnabert_embed",
]


# --------------------------------------------------------------------------- ALiBi


def _power_of_two_slopes(n: int) -> list[float]:
    # Geometric sequence starting at 2^(-8/n) with the same ratio: 2^(-8/n * i), i = 1..n.
    return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi slopes, one per head, in head order.

    For a power-of-two head count n: 2^(-8/n * i) for i = 1..n. Otherwise: the slopes of
    the closest smaller power of two p, followed by every other slope (the 1st, 3rd, ...)
    of the 2p set, truncated to n in total. For 12 heads that is 2^-1 .. 2^-8 then
    2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    if n_heads & (n_heads - 1) == 0:
        return _power_of_two_slopes(n_heads)
    closest = 1 << (n_heads.bit_length() - 1)  # largest power of two below n_heads
    extra = alibi_slopes(2 * closest)[0::2][: n_heads - closest]
    return _power_of_two_slopes(closest) + extra


def alibi_bias(n_heads: int, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The explicit symmetric ALiBi bias matrix [n_heads, length, length]: -slope_h * |i - j|."""
    slopes = torch.tensor(alibi_slopes(n_heads), dtype=torch.float64)
    pos = torch.arange(length, dtype=torch.float64)
    distance = (pos[None, :] - pos[:, None]).abs()  # [L, L], |i - j|
    return (-slopes[:, None, None] * distance[None, :, :]).to(dtype)


# --------------------------------------------------------------------- loading


def _read_config(model_dir: Path) -> dict:
    with open(model_dir / "config.json", encoding="utf-8") as fh:
        raw = json.load(fh)
    cfg = {
        "hidden_size": int(raw["hidden_size"]),
        "num_hidden_layers": int(raw["num_hidden_layers"]),
        "num_attention_heads": int(raw["num_attention_heads"]),
        "intermediate_size": int(raw["intermediate_size"]),
        "vocab_size": int(raw["vocab_size"]),
        "type_vocab_size": int(raw.get("type_vocab_size", 2)),
        "layer_norm_eps": float(raw.get("layer_norm_eps", 1e-12)),
    }
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError("hidden_size is not a multiple of num_attention_heads")
    return cfg


def _read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    st = model_dir / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        state = load_file(str(st), device="cpu")
    else:
        bin_path = model_dir / "pytorch_model.bin"
        if not bin_path.is_file():
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {model_dir}")
        state = torch.load(str(bin_path), map_location="cpu", weights_only=True)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("bert."):
            key = key[len("bert.") :]
        out[key] = value
    return out


def load_reference_model(model_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``config.json`` and the weights; keys are returned without any ``bert.`` prefix."""
    model_dir = Path(model_dir)
    cfg = _read_config(model_dir)
    state = _read_state_dict(model_dir)
    required = [
        "embeddings.word_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    ]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        required += [
            p + "attention.self.Wqkv.weight",
            p + "attention.self.Wqkv.bias",
            p + "attention.output.dense.weight",
            p + "attention.output.dense.bias",
            p + "attention.output.LayerNorm.weight",
            p + "attention.output.LayerNorm.bias",
            p + "mlp.gated_layers.weight",
            p + "mlp.wo.weight",
            p + "mlp.wo.bias",
            p + "mlp.layernorm.weight",
            p + "mlp.layernorm.bias",
        ]
    missing = [k for k in required if k not in state]
    if missing:
        raise KeyError(f"checkpoint in {model_dir} lacks {len(missing)} keys, e.g. {missing[:3]}")
    return cfg, state


def load_reference_tokenizer(model_dir: str | Path) -> Tokenizer:
    """``tokenizer.json`` with any stored padding and truncation switched off."""
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


# --------------------------------------------------------------------- the math


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _softmax_last(x: torch.Tensor) -> torch.Tensor:
    shifted = x - x.max(dim=-1, keepdim=True).values
    e = torch.exp(shifted)
    return e / e.sum(dim=-1, keepdim=True)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # weight is stored as nn.Linear does: [out_features, in_features]
    y = x @ weight.t()
    return y if bias is None else y + bias


def reference_forward(
    cfg: dict,
    state: dict[str, torch.Tensor],
    input_ids: list[int] | torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Last hidden states [L, hidden] of ONE unpadded token sequence (ids include [CLS]/[SEP])."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    length = ids.numel()
    if length == 0:
        raise ValueError("empty token sequence")
    hidden = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    head_dim = hidden // n_heads
    inter = cfg["intermediate_size"]
    eps = cfg["layer_norm_eps"]

    def w(name: str) -> torch.Tensor:
        return state[name].to(dtype)

    # Embeddings: word + token type 0, LayerNorm. (Dropout is identity at inference.)
    x = w("embeddings.word_embeddings.weight")[ids] + w("embeddings.token_type_embeddings.weight")[0]
    x = _layer_norm(x, w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"), eps)

    bias = alibi_bias(n_heads, length, dtype)  # [H, L, L]
    scale = 1.0 / math.sqrt(head_dim)

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        # ---- attention
        qkv = _linear(x, w(p + "attention.self.Wqkv.weight"), w(p + "attention.self.Wqkv.bias"))
        q = qkv[:, 0 * hidden : 1 * hidden].reshape(length, n_heads, head_dim).permute(1, 0, 2)
        k = qkv[:, 1 * hidden : 2 * hidden].reshape(length, n_heads, head_dim).permute(1, 0, 2)
        v = qkv[:, 2 * hidden : 3 * hidden].reshape(length, n_heads, head_dim).permute(1, 0, 2)
        scores = (q @ k.transpose(1, 2)) * scale + bias  # [H, L, L]
        probs = _softmax_last(scores)
        context = (probs @ v).permute(1, 0, 2).reshape(length, hidden)  # heads back side by side
        attn_out = _linear(context, w(p + "attention.output.dense.weight"), w(p + "attention.output.dense.bias"))
        x = _layer_norm(
            attn_out + x, w(p + "attention.output.LayerNorm.weight"), w(p + "attention.output.LayerNorm.bias"), eps
        )
        # ---- gated MLP
        h = _linear(x, w(p + "mlp.gated_layers.weight"), None)  # [L, 2 * inter]
        gated, linear_part = h[:, :inter], h[:, inter:]
        h = _gelu_erf(gated) * linear_part
        h = _linear(h, w(p + "mlp.wo.weight"), w(p + "mlp.wo.bias"))
        x = _layer_norm(h + x, w(p + "mlp.layernorm.weight"), w(p + "mlp.layernorm.bias"), eps)
    return x


# --------------------------------------------------------------------- public API


def reference_dnabert_hidden(
    model_dir: str | Path, sequence: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Last hidden states [L, hidden] (float32) of one sequence, L counting [CLS] and [SEP]."""
    cfg, state = load_reference_model(model_dir)
    tok = load_reference_tokenizer(model_dir)
    ids = tok.encode(sequence).ids
    with torch.no_grad():
        return reference_forward(cfg, state, ids, dtype).to(torch.float32)


def reference_dnabert_embed(
    model_dir: str | Path, sequences: list[str], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Mean-pooled embeddings [N, hidden] (float32), one unpadded forward per sequence.

    The mean runs over every token of the sequence, [CLS] and [SEP] included, as upstream
    VirNucPro does. ``dtype`` (float32 by default, as upstream) is the compute precision;
    float64 gives a tighter oracle.
    """
    cfg, state = load_reference_model(model_dir)
    tok = load_reference_tokenizer(model_dir)
    rows = []
    with torch.no_grad():
        for seq in sequences:
            ids = tok.encode(seq).ids
            hidden_states = reference_forward(cfg, state, ids, dtype)
            rows.append(hidden_states.mean(dim=0).to(torch.float32))
    if not rows:
        return torch.empty(0, cfg["hidden_size"], dtype=torch.float32)
    return torch.stack(rows)
