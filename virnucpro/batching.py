"""Planning token-budget batches and turning them into packed token arrays.

Sequences are sorted longest first and cut greedily into batches whose packed token count stays
within `toks_per_batch`; a sequence longer than the budget gets a batch of its own. Longest-first
means the slowest batches start first and short ones fill the tail, so no actor idles at the end.
The plan is deterministic for a given input and options: batch ids name the part files, which is
what makes resume and exactly-once output possible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .sequences import FastaIndex


@dataclass
class TokenBatch:
    """One planned batch, read and tokenised: what a GPU actor receives."""

    batch_id: int
    ids: list[str]
    index: np.ndarray  # int64 [B], record ordinal in the input
    length: np.ndarray  # int32 [B], residues or bases before truncation
    truncated: np.ndarray  # bool [B]
    tokens: np.ndarray  # int32 [T], all sequences' tokens back to back
    seq_tokens: np.ndarray  # int32 [B], tokens of each sequence (specials included)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def describe(self) -> str:
        return (f"batch {self.batch_id} ({len(self.ids)} sequences, {self.num_tokens} tokens, longest "
                f"{int(self.seq_tokens.max())} tokens, first id '{self.ids[0]}')")


def plan_batches(num_tokens: np.ndarray, toks_per_batch: int) -> list[np.ndarray]:
    """Cut sequences (given their token counts) into batches of at most toks_per_batch tokens.

    Returns index arrays into num_tokens, longest sequences first.
    """
    if toks_per_batch < 1:
        raise ValueError("toks_per_batch must be positive")
    order = np.argsort(-num_tokens, kind="stable")
    sizes = num_tokens[order]
    batches: list[np.ndarray] = []
    start, total = 0, 0
    for i, n in enumerate(sizes.tolist()):
        if total + n > toks_per_batch and i > start:
            batches.append(order[start:i])
            start, total = i, 0
        total += n
    batches.append(order[start:])
    return batches


def plan_fingerprint(*parts: object) -> str:
    """A short hash of everything that decides the plan, to check a resumed run is the same run."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def make_batch(index: FastaIndex, positions: np.ndarray, tokenizer, batch_id: int) -> TokenBatch:
    """Read a planned batch's records back from disk and tokenise them (runs in loader threads)."""
    records = index.read(positions)
    tokens, seq_tokens, truncated = tokenizer.encode([r.sequence for r in records])
    return TokenBatch(
        batch_id=batch_id,
        ids=[r.id for r in records],
        index=index.ordinals[positions].astype(np.int64),
        length=index.lengths[positions].astype(np.int32),
        truncated=truncated,
        tokens=tokens,
        seq_tokens=seq_tokens,
    )
