"""Planning token-budget batches, describing them to the actors, and turning them into packed token arrays.

Sequences are sorted longest first and cut greedily into batches whose packed token count stays
within `toks_per_batch`; a sequence longer than the budget gets a batch of its own. Longest-first
means the slowest batches start first and short ones fill the tail, so no actor idles at the end.
The plan is deterministic for a given input and options: batch ids name the part files, which is
what makes resume and exactly-once output possible.

The driver deals a batch as its description (`BatchSpec`: where its records are in the input, not
their tokens); the actor that computes it reads and tokenises them (`load_batch`). So the work that
grows with the data runs on the nodes that compute, and the driver's cost per batch is a few small
arrays. `BatchPlan` is the plan with those columns gathered in plan order, saved beside the output
so that `--resume` deals the remaining batches without reading the input again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from virnucpro.models.registry import ModelSource
from virnucpro.io.index import FastaIndex, RecordReader
from virnucpro.options import EmbedOptions
from virnucpro.io.storage import Location
from virnucpro.errors import BatchError  # noqa: F401 - also imported from here


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
    extra: object = None  # a pyarrow Table [B] of columns kept from a table input, written beside the embeddings

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def describe(self) -> str:
        return (f"batch {self.batch_id} ({len(self.ids)} sequences, {self.num_tokens} tokens, longest "
                f"{int(self.seq_tokens.max())} tokens, first id '{self.ids[0]}')")


@dataclass(frozen=True)
class BatchSpec:
    """One planned batch as the driver deals it: which records of which input, not their tokens. The
    actor reads and tokenises them (`load_batch`)."""

    batch_id: int
    input: str  # path or URI of the plain FASTA the records are read from (a gzip input's plain copy)
    kind: str  # the alphabet the records were validated against
    offsets: np.ndarray  # int64 [B], each record's header offset
    sizes: np.ndarray  # int64 [B], bytes from there to the next record
    lengths: np.ndarray  # int64 [B], residues or bases
    ordinals: np.ndarray  # int64 [B], record numbers in the input
    tokens: int  # planned (for DNABERT-S an estimate: `DNABERTSTokenizer.num_tokens`)
    extra: object = None  # a pyarrow Table [B] of columns kept from a table input (`virnucpro.io.tables`)

    def describe(self, first_id: str | None = None) -> str:
        """One line naming the batch; `first_id`: its first record's id, if the caller read it."""
        first = f"first id '{first_id}'" if first_id is not None else f"first record {int(self.ordinals[0]) + 1}"
        return (f"batch {self.batch_id} ({len(self.offsets)} sequences, {self.tokens} tokens, longest "
                f"{int(self.lengths.max())} residues, {first})")

    def first_id(self) -> str | None:
        """The id of the batch's first record, read from the input (None if it cannot be read now)."""
        try:
            reader = RecordReader(self.input, self.kind)
            try:
                return reader.read(self.offsets[:1], self.sizes[:1], self.lengths[:1], max_residues=0)[0][0]
            finally:
                reader.close()
        except Exception:  # noqa: BLE001 - only for a message: the batch's own error matters
            return None




@dataclass
class PartResult:
    """A batch computed: the Parquet part an actor or replica wrote, and what it took."""

    batch_id: int
    file: str
    rows: int
    tokens: int
    seconds: float  # the whole call: load, forward and write seconds, and waiting for a stream pair
    actor: str
    node: str = ""  # Ray node id of the actor that wrote the part
    forward_seconds: float = 0.0  # host-to-device copy, forward pass, pooled embeddings back on the host
    write_seconds: float = 0.0  # the Parquet part, encoded and written
    load_seconds: float = 0.0  # its records read from the input and tokenised


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
# the job's options (the service's, in `describe`), its batches' descriptions and the parts written
EXCHANGED = (ModelSource, EmbedOptions, BatchSpec, TokenBatch, PartResult)


def interface_fingerprint(classes: tuple[type, ...] | None = None) -> str:
    """A short hash of what a job's driver and a service's replicas exchange as pickled objects: this
    VirNucPro's version and the fields of the dataclasses that travel between them (`classes`, default
    `EXCHANGED`). A service started by another VirNucPro gives another hash: the driver refuses it before
    a field that one side lacks breaks the job midway. Computed from the classes, so a field added or
    removed changes it without anyone remembering to."""
    from virnucpro import __version__  # at each call, not once: the tests change it

    shapes = [(c.__name__, [f.name for f in fields(c)]) for c in classes or EXCHANGED]
    return hashlib.sha256(repr((__version__, shapes)).encode()).hexdigest()[:12]


def load_batch(spec: BatchSpec, reader: RecordReader, tokenizer) -> TokenBatch:
    """Read a planned batch's records and tokenise them (in the actor that computes it).

    A long record is read only as far as the tokenizer uses it (`max_residues`); `length` and
    `truncated` come from its true length."""
    cap = tokenizer.max_residues
    records = reader.read(spec.offsets, spec.sizes, spec.lengths, cap)
    tokens, seq_tokens, truncated = tokenizer.encode([seq for _, seq in records])
    if cap is not None:
        truncated = truncated | (spec.lengths > cap)
    return TokenBatch(
        batch_id=spec.batch_id,
        ids=[rid for rid, _ in records],
        index=np.asarray(spec.ordinals, np.int64),
        length=np.minimum(spec.lengths, np.iinfo(np.int32).max).astype(np.int32),
        truncated=np.asarray(truncated, bool),
        tokens=tokens,
        seq_tokens=seq_tokens,
        extra=spec.extra,
    )


def make_batch(index: FastaIndex, positions: np.ndarray, tokenizer, batch_id: int) -> TokenBatch:
    """The TokenBatch of the records at `positions` of `index` (tests and benchmarks, in one process)."""
    positions = np.asarray(positions, np.int64)
    spec = BatchSpec(batch_id, index.source.uri, index.kind, index.offsets[positions], index.sizes[positions],
                     index.lengths[positions], index.ordinals[positions], 0)
    reader = RecordReader(index.source, index.kind)
    try:
        return load_batch(spec, reader, tokenizer)
    finally:
        reader.close()


def token_batches(sequences: list[str] | list[bytes], tokenizer, toks_per_batch: int,
                  ids: list[str] | None = None) -> list[TokenBatch]:
    """Sequences held in memory (validated) as token-budget batches, longest first: what a service's
    ingress and `embed_sequences` send to the replicas or actors. `index` is each row's position in
    `sequences`."""
    tokens, seq_tokens, truncated = tokenizer.encode(sequences)
    lengths = np.array([len(s) for s in sequences], np.int32)
    cap = tokenizer.max_residues
    if cap is not None:
        truncated = truncated | (lengths > cap)
    starts = np.concatenate(([0], np.cumsum(seq_tokens)))
    plan = Plan.build(seq_tokens.astype(np.int64), toks_per_batch)
    return [TokenBatch(b, [ids[i] for i in rows] if ids else [""] * len(rows), rows, lengths[rows], truncated[rows],
                       np.concatenate([tokens[starts[i]:starts[i + 1]] for i in rows]), seq_tokens[rows])
            for b, rows in enumerate(plan)]


PLAN_COLUMNS = ("offsets", "sizes", "lengths", "ordinals")  # per record, in plan order
PLAN_FILE = "plan.json"  # written last: the plan's directory is complete once it exists


@dataclass
class BatchPlan:
    """A plan ready to deal: each batch's records (where they are in the input, their lengths and numbers)
    gathered in plan order, batch b being rows `bounds[b]:bounds[b+1]`.

    What the driver keeps of a run; saved as .npy columns in a directory (`save`), which `--resume` maps
    back (`load`) instead of reading the input again."""

    input: str  # what the records are read from (a gzip input's plain copy)
    kind: str
    offsets: np.ndarray  # int64 [N]
    sizes: np.ndarray  # int64 [N]
    lengths: np.ndarray  # int64 [N]
    ordinals: np.ndarray  # int64 [N]
    bounds: np.ndarray  # int64 [B + 1]
    tokens: np.ndarray  # int64 [B], planned tokens of each batch
    bases_per_token: float | None = None  # the DNABERT-S estimate the plan was made with (`calibrate`)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_sequences(self) -> int:
        return len(self.offsets)

    def rows(self, b: int) -> int:
        return int(self.bounds[b + 1] - self.bounds[b])

    def spec(self, b: int) -> BatchSpec:
        """Batch b as it is dealt: slices of the columns (contiguous, so no gather per batch)."""
        a, z = int(self.bounds[b]), int(self.bounds[b + 1])
        return BatchSpec(b, self.input, self.kind, self.offsets[a:z], self.sizes[a:z], self.lengths[a:z],
                         self.ordinals[a:z], int(self.tokens[b]))

    @classmethod
    def gather(cls, index: FastaIndex, plan: Plan, directory: str | Path, bases_per_token: float | None = None,
               chunk: int = 1 << 20) -> "BatchPlan":
        """The index's columns in `plan`'s order, written as .npy files into the local `directory`
        (chunk by chunk: the driver's heap does not grow with the input) and mapped back read-only."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        n = len(plan.order)
        for name in PLAN_COLUMNS:
            source = getattr(index, name)
            out = np.lib.format.open_memmap(directory / f"{name}.npy", "w+", np.int64, (n,))
            for a in range(0, n, chunk):
                out[a:a + chunk] = source[plan.order[a:a + chunk]]
            out.flush()
            del out
        np.save(directory / "bounds.npy", plan.bounds)
        np.save(directory / "tokens.npy", plan.tokens)
        return cls.load(directory, index.source.uri, index.kind, bases_per_token)

    @classmethod
    def load(cls, directory: str | Path, input: str, kind: str, bases_per_token: float | None = None) -> "BatchPlan":
        """The plan saved in the local `directory` (`gather`, or `fetch` of a saved one), memory-mapped."""
        columns = {name: np.load(Path(directory) / f"{name}.npy", mmap_mode="r")
                   for name in (*PLAN_COLUMNS, "bounds", "tokens")}
        return cls(input, kind, **columns, bases_per_token=bases_per_token)

    def save(self, where: Location, fingerprint: str, local: str | Path) -> None:
        """Keep the plan in `where` (the run's `.work/plan`), its description written last: for a local
        output `local` is that directory already and only the description is written; elsewhere the
        columns are copied there from `local`."""
        if where.local_path is None or Path(where.local_path) != Path(local):
            import pyarrow.fs as pafs

            where.make_dirs()
            for name in (*PLAN_COLUMNS, "bounds", "tokens"):
                pafs.copy_files(str(Path(local) / f"{name}.npy"), where.join(f"{name}.npy"),
                                destination_filesystem=where.fs)
        text = json.dumps({"fingerprint": fingerprint, "input": self.input, "kind": self.kind,
                           "batches": len(self), "sequences": self.num_sequences,
                           "bases_per_token": self.bases_per_token}).encode()
        where.write_atomic(PLAN_FILE, lambda f: f.write(text))

    @classmethod
    def fetch(cls, where: Location, fingerprint: str, local: str | Path) -> "BatchPlan | None":
        """The plan saved in `where` by a run of this `fingerprint` (copied to `local` first when `where`
        is not on this machine), or None when there is none, or another run's."""
        data = where.read_bytes(PLAN_FILE)
        if data is None:
            return None
        saved = json.loads(data)
        if saved.get("fingerprint") != fingerprint:
            return None
        if where.local_path is None or Path(where.local_path) != Path(local):
            import pyarrow.fs as pafs

            Path(local).mkdir(parents=True, exist_ok=True)
            for name in (*PLAN_COLUMNS, "bounds", "tokens"):
                pafs.copy_files(where.join(f"{name}.npy"), str(Path(local) / f"{name}.npy"), source_filesystem=where.fs)
        return cls.load(local, saved["input"], saved["kind"], saved.get("bases_per_token"))
