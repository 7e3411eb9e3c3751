"""The output columns of a packed batch, from the model's hidden states: pooled means, the first token,
per-token rows, logits (`--repr-layers` / `--include`; the columns themselves: `virnucpro.io.output.plan_columns`)."""

from __future__ import annotations

import numpy as np
import torch

from virnucpro.kernels.attention import Packing
from virnucpro.io.output import Column
from virnucpro.models.dnabert_s import DNABERTS
from virnucpro.models.esm2 import ESM2


def compute_columns(model: ESM2 | DNABERTS, tokens: torch.Tensor, packing: Packing, columns: list[Column],
                    dtype: torch.dtype = torch.float32, layers: list | None = None) -> dict[str, torch.Tensor]:
    """Each output column of one packed batch, on the model's device, in `dtype`: [B, D] for a
    per-sequence column, [R, D] for a per-token one (the residues of every sequence in order, without
    the model's special tokens at either end: `model.specials`). Only the layers needed are run.
    Means are taken in float32 whatever the model's dtype. `layers`: compiled versions of the layers."""
    need = tuple(sorted({c.layer for c in columns}))
    hidden = model.hidden_states(tokens, packing, need, layers)
    first, last = model.specials
    residue = (packing.position >= first) & (packing.position < packing.lengths[packing.seq_index] - last)
    out = {}
    for c in columns:
        h = hidden[c.layer]
        if c.what == "mean":
            value = packing.mean(h, first, last)
        elif c.what == "bos":
            value = h[packing.cu_seqlens[:-1].long()]
        elif c.what == "per_token":
            value = h[residue]
        else:  # logits, of the residues only (per_token's rows)
            value = model.logits(h[residue])
        out[c.name] = value.to(dtype)
    return out


def residue_counts(model: ESM2 | DNABERTS, seq_tokens: np.ndarray) -> np.ndarray:
    """Rows each sequence has in per-token columns: its tokens less the model's special ones."""
    return np.maximum(np.asarray(seq_tokens, np.int64) - sum(model.specials), 0)
