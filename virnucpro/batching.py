"""Planning token-budget batches and turning them into packed token arrays.

Sequences are sorted longest first and cut greedily into batches whose packed token count stays
within `toks_per_batch`; a sequence longer than the budget gets a batch of its own. Longest-first
means the slowest batches start first and short ones fill the tail, so no actor idles at the end.
The plan is deterministic for a given input and options: batch ids name the part files, which is
what makes resume and exactly-once output possible.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .checkpoint import ModelSource
from .options import EmbedOptions
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


class BatchError(RuntimeError):
    """A batch that cannot be computed: not worth retrying elsewhere (bad input, out of memory)."""


@dataclass
class PartResult:
    """A batch computed: the Parquet part an actor or replica wrote, and what it took."""

    batch_id: int
    file: str
    rows: int
    tokens: int
    seconds: float  # the whole call: forward_seconds + write_seconds + waiting for a stream pair
    actor: str
    node: str = ""  # Ray node id of the actor that wrote the part
    forward_seconds: float = 0.0  # host-to-device copy, forward pass, pooled embeddings back on the host
    write_seconds: float = 0.0  # the Parquet part, encoded and written


def plan_batches(num_tokens: np.ndarray, toks_per_batch: int) -> list[np.ndarray]:
    """Cut sequences (given their token counts) into batches of at most toks_per_batch tokens.

    Returns index arrays into num_tokens, longest sequences first (`Plan` without the list).
    """
    return list(Plan.build(np.asarray(num_tokens), toks_per_batch))


_CHUNK = 1 << 16  # records per planning chunk: bounds the planner's temporary arrays (a few MiB)


@dataclass
class Plan:
    """Token-budget batches as two arrays, not one object per batch or per record.

    Batch b holds the records `order[bounds[b]:bounds[b+1]]` (positions in the FASTA index) and
    `tokens[b]` planned tokens. `order` sorts the records by token count, longest first, ties in input
    order; it is built by a counting pass over token counts (the distinct counts are few: at most the
    truncation length), in chunks, so planning needs no per-record Python objects and no full
    in-memory argsort. With `scratch_dir`, `order` lives in a memory-mapped scratch file.
    """

    order: np.ndarray  # int64 [N]
    bounds: np.ndarray  # int64 [B + 1]
    tokens: np.ndarray  # int64 [B]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, b: int) -> np.ndarray:
        if not -len(self) <= b < len(self):
            raise IndexError(b)
        b %= len(self)
        return self.order[self.bounds[b]:self.bounds[b + 1]]

    def __iter__(self):
        for b in range(len(self)):
            yield self[b]

    def rows(self, b: int) -> int:
        return int(self.bounds[b + 1] - self.bounds[b])

    @classmethod
    def build(cls, num_tokens, toks_per_batch: int, num_records: int | None = None,
              scratch_dir: str | Path | None = None, chunk: int = _CHUNK) -> "Plan":
        """`num_tokens`: an int array of token counts, or a function (start, stop) -> token counts of
        records start..stop-1 (then `num_records` is required), so counts can be computed chunk by
        chunk from the index and never held whole."""
        if toks_per_batch < 1:
            raise ValueError("toks_per_batch must be positive")
        if callable(num_tokens):
            counts_of, n = num_tokens, int(num_records)
        else:
            array = np.asarray(num_tokens)
            counts_of, n = (lambda a, b: array[a:b]), len(array)
        # pass 1: how many records have each token count
        histogram: dict[int, int] = {}
        for a in range(0, n, chunk):
            values, counts = np.unique(counts_of(a, min(n, a + chunk)), return_counts=True)
            for v, c in zip(values.tolist(), counts.tolist()):
                histogram[v] = histogram.get(v, 0) + c
        values = sorted(histogram, reverse=True)
        # pass 2: stable placement, longest first
        order = _int64_array(n, scratch_dir)
        cursor, pos = {}, 0
        for v in values:
            cursor[v], pos = pos, pos + histogram[v]
        for a in range(0, n, chunk):
            c = counts_of(a, min(n, a + chunk))
            idx = np.argsort(-c, kind="stable")
            grouped = c[idx]
            starts = np.flatnonzero(np.concatenate(([True], grouped[1:] != grouped[:-1])))
            ends = np.append(starts[1:], len(grouped))
            for s0, s1 in zip(starts.tolist(), ends.tolist()):
                v = int(grouped[s0])
                order[cursor[v]:cursor[v] + s1 - s0] = idx[s0:s1] + a
                cursor[v] += s1 - s0
        if isinstance(order, np.memmap):
            order.flush()
        bounds, tokens = _cut(values, [histogram[v] for v in values], toks_per_batch)
        return cls(order, bounds, tokens)


def _int64_array(n: int, scratch_dir: str | Path | None) -> np.ndarray:
    if scratch_dir is None or n == 0:
        return np.empty(n, np.int64)
    Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".plan-", suffix=".i64", dir=scratch_dir)
    try:
        os.ftruncate(fd, n * 8)
        mapped = np.memmap(name, np.int64, mode="r+", shape=(n,))
    finally:
        os.close(fd)
        os.unlink(name)  # the mapping keeps the data; nothing to clean up
    return mapped


def _cut(values: list[int], counts: list[int], budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy cut of records sorted longest first, given as (token count, how many) groups: a record
    joins the open batch if the batch stays within the budget, else it opens a new batch; a record
    over the budget travels alone. Same result as walking the records one by one, in O(groups + batches)."""
    bounds: list[np.ndarray] = [np.zeros(1, np.int64)]
    tokens: list[np.ndarray] = []
    pos = open_n = open_t = 0  # records placed; the open (last) batch's records and tokens
    for v, c in zip(values, counts):
        room = (budget - open_t) // v if open_n else max(1, budget // v)
        take = min(c, max(0, room))
        open_n, open_t, pos, c = open_n + take, open_t + take * v, pos + take, c - take
        if c == 0:
            continue
        bounds.append(np.array([pos], np.int64))  # close the open batch
        tokens.append(np.array([open_t], np.int64))
        per = max(1, budget // v)
        full, rest = divmod(c, per)
        if rest == 0:  # the last full batch stays open: shorter records may still fit
            full, rest = full - 1, per
        if full:
            bounds.append(pos + per * np.arange(1, full + 1, dtype=np.int64))
            tokens.append(np.full(full, per * v, np.int64))
        pos += full * per + rest
        open_n, open_t = rest, rest * v
    if open_n:
        bounds.append(np.array([pos], np.int64))
        tokens.append(np.array([open_t], np.int64))
    return np.concatenate(bounds), (np.concatenate(tokens) if tokens else np.zeros(0, np.int64))


def token_counts(tokenizer, lengths: np.ndarray) -> np.ndarray:
    """Planned tokens of each record, from its length: `tokenizer.num_tokens` called once per distinct
    length, not once per record."""
    distinct, inverse = np.unique(np.asarray(lengths), return_inverse=True)
    table = np.fromiter((tokenizer.num_tokens(int(x)) for x in distinct), np.int64, len(distinct))
    return table[inverse.reshape(-1)]


def plan_fingerprint(*parts: object) -> str:
    """A short hash of everything that decides the plan, to check a resumed run is the same run."""
    h = hashlib.sha256()
    for p in parts:
        # arrays hash through the buffer protocol: no copy of a large index
        h.update(memoryview(np.ascontiguousarray(p)).cast("B") if isinstance(p, np.ndarray) else repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


# the dataclasses a job's driver and a service's replicas pickle for each other: the model's description,
# the job's options (the service's, in `describe`), its batches and the parts written
EXCHANGED = (ModelSource, EmbedOptions, TokenBatch, PartResult)


def interface_fingerprint(classes: tuple[type, ...] | None = None) -> str:
    """A short hash of what a job's driver and a service's replicas exchange as pickled objects: this
    VirNucPro's version and the fields of the dataclasses that travel between them (`classes`, default
    `EXCHANGED`). A service started by another VirNucPro gives another hash: the driver refuses it before
    a field that one side lacks breaks the job midway. Computed from the classes, so a field added or
    removed changes it without anyone remembering to."""
    from . import __version__  # at each call, not once: the tests change it

    shapes = [(c.__name__, [f.name for f in fields(c)]) for c in classes or EXCHANGED]
    return hashlib.sha256(repr((__version__, shapes)).encode()).hexdigest()[:12]


def make_batch(index: FastaIndex, positions: np.ndarray, tokenizer, batch_id: int) -> TokenBatch:
    """Read a planned batch's records back from disk and tokenise them (runs in loader threads).

    A long record is read only as far as the tokenizer uses it (`max_residues`); `length` and
    `truncated` come from its true length."""
    cap = tokenizer.max_residues
    records = index.read(positions, cap)
    tokens, seq_tokens, truncated = tokenizer.encode([r.sequence for r in records])
    lengths = index.lengths[positions]
    if cap is not None:
        truncated = truncated | (lengths > cap)
    return TokenBatch(
        batch_id=batch_id,
        ids=[r.id for r in records],
        index=index.ordinals[positions].astype(np.int64),
        length=np.minimum(lengths, np.iinfo(np.int32).max).astype(np.int32),
        truncated=truncated,
        tokens=tokens,
        seq_tokens=seq_tokens,
    )
