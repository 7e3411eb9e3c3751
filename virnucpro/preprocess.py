"""VirNucPro preprocessing: chunking, six-frame translation and frame selection.

This reproduces upstream VirNucPro's prediction-time preprocessing (`split_fasta_chunk`,
`translate_dna`, `identify_seq` in github.com/Li-Jing-1997/VirNucPro), quirks included, so that the
trained classifier sees the inputs it was trained for:

* chunking ("compat" mode): a record of length L becomes n = ceil(L / size) chunks. The overlap
  R = n*size - L is divided by n (not n - 1): the first gaps get floor(R/n) + 1, so the last chunk is
  often shorter than `size` (L=700, size=500 -> [0:500], [349:700]). Records with L <= size become
  one chunk, still renamed `{id}_chunk_1`. Chunks keep the input's letter case.
* translation: the chunk is upper-cased; frames 0..2 of the forward strand and of the reverse
  complement; standard code; a codon holding any letter other than A/C/G/T is dropped (not X).
  The complement swaps only A/C/G/T: ambiguity codes stay as they are (R stays R, not Y).
* frame selection: every frame whose protein has no stop is kept, ids `{chunk}F1..F3` and
  `{chunk}R1..R3`, paired with the slice `strand[f-1 : f + 3*len(protein)]` (1-based frame f) of
  the upper-cased strand: one base longer than the codons where the chunk allows, and shorter than
  the frame where codons were dropped. Frames with an empty protein are not written.
* letters (`virnucpro.sequences.check_contig`): upstream reads any letter, so `X`, `-`, `*`, `U`
  and the like go through as above (their codons translate to nothing). The one change: in the
  frame's nucleotide slice, a letter other than A/C/G/T and the IUPAC codes is written `N`, which
  DNABERT-S's tokenizer reads as `[UNK]`, as it reads the original letter in upstream's run; so the
  DNABERT-S input check accepts the file. Chunks with such letters are counted. A byte that is no
  letter, `-`, `.` or `*`, or a protein given as a contig, is refused, naming file and record.
* duplicate contig ids are refused (`DuplicateIds`): upstream merges their features by id.

Unlike upstream there is no per-codon Python loop: a batch of records is translated at every
position of both strands at once (base codes by bytes.translate, codon index 25*c1+5*c2+c3 in
numpy, amino acids by bytes.translate again), frames with a stop are ruled out for all chunks at
once from per-frame stop prefix counts, and each kept frame is a strided bytes slice. Records stream
through in batches, optionally over a process pool, in input order.
"""

from __future__ import annotations

import multiprocessing
import os
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from Bio.Data import CodonTable, IUPACData

from .fasta import fasta_ids, iter_records
from .ids import FRAME_NAMES, chunk_id, frame_id
from .sequences import _IUPAC_DNA, TO_DNA_INPUT, SequenceError, check_contig, plain_contigs
from .storage import InputFile

CHUNKING_MODES = ("compat", "even")
FASTA_WRAP = 60  # Bio.SeqIO's "fasta" writer wraps at 60; upstream writes chunks through it
CHUNKS_FASTA = "chunks.fasta"
NUCLEOTIDE_FASTA = "nucleotide.fasta"
PROTEIN_FASTA = "protein.faa"
_BATCH_BASES = 1_000_000  # bases per unit of work: amortises numpy calls and process-pool IPC


# -----------------------------------------------------------------------------
# lookup tables (bytes.translate tables: C-speed per-byte maps), built from Biopython's data

_BASES = "ACGT"
_OTHER = 4  # base code for anything that is not A/C/G/T after upper-casing
_DROP = 0  # amino-acid byte for a codon that upstream drops (any non-ACGT base)
_STOP = ord("*")


def _complement_pairs() -> dict[str, str]:
    # Upstream complements A/C/G/T only (str.maketrans('ACGTacgt', 'TGCAtgca')); IUPAC codes such as
    # R or Y stay unchanged, unlike Bio.Seq.reverse_complement. Only the pairs come from Bio.
    return {b: IUPACData.ambiguous_dna_complement[b] for b in _BASES}


def _build_base_code() -> bytes:
    codes = [_OTHER] * 256
    for i, base in enumerate(_BASES):
        codes[ord(base)] = i
    return bytes(codes)


def _build_codon_tables() -> tuple[bytes, bytes]:
    """Codon index 25*c1 + 5*c2 + c3 (base codes 0..4) -> amino-acid byte, for the codon and for
    its reverse complement; any code 4 gives _DROP."""
    table = CodonTable.unambiguous_dna_by_id[1]  # the standard code
    pairs = _complement_pairs()
    fwd, rev = [_DROP] * 256, [_DROP] * 256
    for i, b1 in enumerate(_BASES):
        for j, b2 in enumerate(_BASES):
            for k, b3 in enumerate(_BASES):
                for lut, codon in ((fwd, b1 + b2 + b3), (rev, pairs[b3] + pairs[b2] + pairs[b1])):
                    aa = "*" if codon in table.stop_codons else table.forward_table[codon]
                    lut[25 * i + 5 * j + k] = ord(aa)
    return bytes(fwd), bytes(rev)


_BASE_CODE = _build_base_code()
_CODON_FWD, _CODON_REV = _build_codon_tables()
_COMPLEMENT = bytes.maketrans(_BASES.encode(), "".join(_complement_pairs().values()).encode())
_STR_COMPLEMENT = str.maketrans(_complement_pairs())


# -----------------------------------------------------------------------------
# chunking

def chunk_bounds(length: int, size: int, mode: str = "compat") -> list[tuple[int, int]]:
    """Half-open [start, end) bounds of the chunks of a sequence of `length` bases.

    mode "compat" is upstream's split (the last chunk often shorter than `size`); mode "even" puts
    n = ceil(length/size) chunks of exactly `size` bases (one shorter chunk if length < size) with the
    overlap spread over the n-1 gaps, first chunk at 0 and last ending at `length`.
    An empty sequence has no chunks (upstream divides by zero on it).
    """
    if mode not in CHUNKING_MODES:
        raise ValueError(f"chunking mode must be one of {CHUNKING_MODES}, got {mode!r}")
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    if length <= 0:
        return []
    n = -(-length // size)
    if n == 1:
        return [(0, length)]
    if mode == "even":
        span = length - size
        return [(k * span // (n - 1), k * span // (n - 1) + size) for k in range(n)]
    # compat: gap k (between chunk k and k+1) is base+1 for the first `wide` gaps, base after that.
    # Upstream's list holds `wide` = R - base*(n-1) entries of base+1, which can exceed the n-1 gaps
    # (then every gap is base+1 and the last chunk comes out short).
    overlap = n * size - length
    base = overlap // n
    wide = overlap - base * (n - 1)
    bounds, shift = [], 0
    for k in range(n):
        start = k * size - shift
        bounds.append((start, min(start + size, length)))
        shift += base + 1 if k < wide else base
    return bounds


def split_chunks(record_id: str, seq: str, size: int, mode: str = "compat") -> list[tuple[str, str]]:
    """Chunks of one record as (chunk_id, chunk_seq), ids `{record_id}_chunk_{k}` from k = 1.

    The chunk keeps the input's letter case. A record no longer than `size` is one chunk, still
    renamed `_chunk_1` (as upstream does).
    """
    return [(chunk_id(record_id, k), seq[s:e])
            for k, (s, e) in enumerate(chunk_bounds(len(seq), size, mode), start=1)]


# -----------------------------------------------------------------------------
# translation

def _ascii_upper(seq: str, record_id: str = "") -> bytes:
    try:
        return seq.encode("ascii").upper()  # ASCII only, so the same as upstream's str.upper()
    except UnicodeEncodeError as e:
        raise ValueError(f"record {record_id!r}: sequence has a non-ASCII character") from e


_ODD = bytes(0 if b in _IUPAC_DNA else 1 for b in range(256))  # 1 for a letter DNABERT-S gets as N


@dataclass(frozen=True, slots=True)
class OddLetters:
    """Letters outside A/C/G/T and the IUPAC codes (upper-cased) in a batch: how many chunks hold
    one, and how often each letter occurs in the records (chunks overlap; records do not)."""

    chunks: int = 0
    letters: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, upper: bytes, bounds: np.ndarray) -> "OddLetters":
        odd = upper.translate(None, _IUPAC_DNA)
        if not odd:
            return cls()
        seen = np.concatenate([[0], np.cumsum(np.frombuffer(upper.translate(_ODD), np.uint8), dtype=np.int64)])
        chunks = int((seen[bounds[:, 1]] > seen[bounds[:, 0]]).sum()) if len(bounds) else 0
        return cls(chunks, {chr(b): n for b, n in sorted(Counter(odd).items())})

    def __add__(self, other: "OddLetters") -> "OddLetters":
        letters = Counter(self.letters)
        letters.update(other.letters)
        return OddLetters(self.chunks + other.chunks, dict(sorted(letters.items())))


def _strand_aa(upper: bytes) -> tuple[bytes, bytes]:
    """Amino acid (or _DROP) of the codon at every position of the forward strand and of the
    reverse complement: len(upper) - 2 bytes each.

    The reverse complement's codon at p is the reverse complement of the forward codon at
    T-3-p, so one codon index array serves both strands.
    """
    c = np.frombuffer(upper.translate(_BASE_CODE), dtype=np.uint8)
    if len(c) < 3:
        return b"", b""
    index = (c[:-2] * 25 + c[1:-1] * 5 + c[2:]).tobytes()  # uint8 is enough: at most 124
    return index.translate(_CODON_FWD), index.translate(_CODON_REV)[::-1]


def _frame_codons(aa: bytes, start: int, length: int, frame: int) -> bytes:
    """Codon bytes of frame `frame` (0..2) of the window aa-positions [start, start+length)."""
    n = max(0, (length - frame) // 3)  # upstream: codons at i = frame, frame+3, ... with i+3 <= length
    first = start + frame
    return aa[first:first + 3 * n:3]


def translate_six_frames(seq: str) -> list[str]:
    """Proteins of forward frames 0..2 then reverse-complement frames 0..2, as upstream translates.

    Upper-cases first; a codon with any non-ACGT letter is dropped; stops are `*`.
    """
    fwd, rev = _strand_aa(_ascii_upper(seq))
    return [_frame_codons(aa, 0, len(seq), f).replace(b"\0", b"").decode("ascii")
            for aa in (fwd, rev) for f in range(3)]


def reverse_complement(seq: str) -> str:
    """Reverse complement as upstream computes it: only A/C/G/T (upper case) are complemented."""
    return seq.translate(_STR_COMPLEMENT)[::-1]


def _frame_counts(aa: bytes, value: int, first: np.ndarray, n: np.ndarray) -> np.ndarray:
    """How many of the codons first, first+3, ..., first+3(n-1) of `aa` are `value`, per window.

    Per phase, a prefix count over that phase's codons (contiguous, so cumsum is fast); a window's
    count is the difference at its two ends, for all windows at once. uint16 counts wrap, but the
    difference is still exact while windows hold fewer than 2**16 codons (else int64 is used).
    """
    dtype = np.uint16 if int(n.max(initial=0)) < 1 << 16 else np.int64
    counts, offset = [], [0]
    for phase in range(3):
        hit = np.frombuffer(aa[phase::3], dtype=np.uint8) == value
        counts += [np.zeros(1, dtype), np.cumsum(hit, dtype=dtype)]
        offset.append(offset[-1] + len(hit) + 1)
    prefix = np.concatenate(counts)
    lo = np.asarray(offset[:3])[first % 3] + first // 3
    # windows with n = 0 may sit past their phase's end: both ends then read one clipped slot
    hi = np.minimum(np.where(n > 0, lo + n, lo), len(prefix) - 1)
    lo = np.minimum(lo, len(prefix) - 1)
    return (prefix[hi] - prefix[lo]).astype(np.int64)


# -----------------------------------------------------------------------------
# frame selection

@dataclass(frozen=True, slots=True)
class Frame:
    """One kept reading frame of one chunk: the unit that gets embedded and classified."""

    id: str  # `{chunk_id}F1..F3` or `{chunk_id}R1..R3` (virnucpro.ids)
    chunk_id: str  # `{contig_id}_chunk_{k}`
    contig_id: str
    dna: str  # upper-case nucleotide slice paired with the protein (upstream's slice rule)
    protein: str


_FrameTuple = tuple[str, str, str, str, str]  # Frame's fields; tuples are cheaper in bulk


def _window_frames(upper: bytes, bounds: np.ndarray, chunk_ids: list[str],
                   contig_ids: list[str]) -> list[_FrameTuple]:
    """Kept frames of the windows `bounds` [K, 2] of `upper`: upstream `identify_seq`, prediction mode.

    `upper` may be many records concatenated: no frame reads a codon past its window's end, so
    windows never see their neighbours. Both strands are translated once for the whole buffer; a
    window's frame is a strided slice of that, and frames holding a stop are ruled out for all
    windows at once, so Python only touches the (few) stop-free frames.
    """
    if len(bounds) == 0:
        return []
    strands = (upper.decode("ascii"), upper.translate(_COMPLEMENT)[::-1].decode("ascii"))
    aa = _strand_aa(upper)
    s, e = bounds[:, 0], bounds[:, 1]
    frame = np.arange(3)
    n = np.maximum(0, ((e - s)[:, None] - frame) // 3)  # codons in each frame: [K, 3]
    starts = (s, len(upper) - e)  # a window's reverse complement is rev[T-e : T-s]
    first = [st[:, None] + frame for st in starts]  # first codon position: [K, 3] per strand
    stops = np.concatenate([_frame_counts(a, _STOP, f, n) for a, f in zip(aa, first)], axis=1)
    drops = np.concatenate([_frame_counts(a, _DROP, f, n) if b"\0" in a else np.zeros_like(n)
                            for a, f in zip(aa, first)], axis=1)
    n6 = np.concatenate([n, n], axis=1)
    length = n6 - drops  # protein length of each of the six frames: [K, 6]
    rows, cols = np.nonzero((stops == 0) & (length > 0))  # window-major, then F1..R3
    lo = np.concatenate(first, axis=1)[rows, cols]
    ends = np.stack([e, len(upper) - s], axis=1)[rows, cols // 3]
    hi = np.minimum(ends, lo + 1 + 3 * length[rows, cols])  # one base past the codons (upstream)
    kept = []
    for k, j, start, stop, codons, dropped in zip(
            rows.tolist(), cols.tolist(), lo.tolist(), hi.tolist(),
            n6[rows, cols].tolist(), (drops[rows, cols] > 0).tolist()):
        strand = j // 3
        prot = aa[strand][start:start + 3 * codons:3]
        if dropped:
            prot = prot.replace(b"\0", b"")  # codons with a non-ACGT base are dropped
        kept.append((frame_id(chunk_ids[k], FRAME_NAMES[j]), chunk_ids[k], contig_ids[k],
                     strands[strand][start:stop], prot.decode("ascii")))
    return kept


def _batch_frames(records: list[tuple[str, str]], size: int, mode: str, source: str = "<input>",
                  first: int = 0) -> tuple[list[str], list[str], list[_FrameTuple], OddLetters]:
    """Chunk ids, chunk sequences (input case), kept frames and odd letters of a batch of records,
    in order; `first` is the batch's first record number (0-based) in `source`, for errors.

    The batch is processed as one buffer so that numpy's per-call cost is paid per batch, not per
    record: short reads cost little more per base than long contigs.
    """
    ids: list[str] = []
    seqs: list[str] = []
    contig_ids: list[str] = []
    bounds: list[tuple[int, int]] = []
    offset = 0
    for record_id, seq in records:
        cb = chunk_bounds(len(seq), size, mode)
        ids += [chunk_id(record_id, k) for k in range(1, len(cb) + 1)]
        seqs += [seq[s:e] for s, e in cb]
        contig_ids += [record_id] * len(cb)
        bounds += [(offset + s, offset + e) for s, e in cb]
        offset += len(seq)
    uppers = [_ascii_upper(seq, record_id) for record_id, seq in records]
    upper = b"".join(uppers)
    if not plain_contigs(upper):  # rare: look record by record
        for k, (u, (record_id, _)) in enumerate(zip(uppers, records)):
            check_contig(u, source, first + k, record_id)
    window = np.array(bounds, dtype=np.int64).reshape(-1, 2)
    odd = OddLetters.of(upper, window)
    if odd.letters:  # same codons (none of these translates), DNABERT-S input reads N
        upper = upper.translate(TO_DNA_INPUT)
    return ids, seqs, _window_frames(upper, window, ids, contig_ids), odd


def select_frames(chunk_id: str, chunk_seq: str, contig_id: str = "") -> list[Frame]:
    """Upstream `identify_seq` (prediction mode) on one chunk: its frames without a stop."""
    window = np.array([[0, len(chunk_seq)]] if chunk_seq else [], dtype=np.int64).reshape(-1, 2)
    upper = _ascii_upper(chunk_seq, chunk_id).translate(TO_DNA_INPUT)
    return [Frame(*t) for t in _window_frames(upper, window, [chunk_id], [contig_id])]


def iter_frames(records: Iterable[tuple[str, str]], chunk_size: int,
                chunking: str = "compat") -> Iterator[Frame]:
    """Kept frames of (record_id, sequence) records, in upstream's order (record, chunk, F1..R3)."""
    chunk_bounds(1, chunk_size, chunking)  # validate now, not at the first record
    first = 0
    for batch in _batched(records, _BATCH_BASES // 4):
        for t in _batch_frames(batch, chunk_size, chunking, first=first)[2]:
            yield Frame(*t)
        first += len(batch)


# -----------------------------------------------------------------------------
# FASTA output, batched and optionally parallel

@lru_cache(maxsize=64)
def _line_slices(length: int) -> tuple[slice, ...]:
    return tuple(slice(i, i + FASTA_WRAP) for i in range(0, length, FASTA_WRAP))


def _wrapped(record_id: str, seq: str) -> str:
    """A record as Bio.SeqIO writes "fasta": header, then the sequence in lines of 60."""
    return f">{record_id}\n" + "\n".join(map(seq.__getitem__, _line_slices(len(seq)))) + "\n"


@dataclass(frozen=True, slots=True)
class _BatchText:
    chunks: bytes
    nucleotide: bytes
    protein: bytes
    contigs: int
    n_chunks: int
    frames: int
    chunks_with_frames: int
    odd: OddLetters


def _format_batch(item: tuple[int, list[tuple[str, str]]], size: int, mode: str, source: str) -> _BatchText:
    """The three output files' bytes for a batch of records (in a worker process when parallel);
    item: (the batch's first record number, its records)."""
    first, batch = item
    ids, seqs, frames, odd = _batch_frames(batch, size, mode, source, first)
    return _BatchText(
        "".join(map(_wrapped, ids, seqs)).encode(),
        # upstream writes frames one line per sequence, no wrapping
        "".join([f">{fid}\n{dna}\n" for fid, _, _, dna, _ in frames]).encode(),
        "".join([f">{fid}\n{prot}\n" for fid, _, _, _, prot in frames]).encode(),
        len(batch), len(ids), len(frames),
        sum(1 for i, t in enumerate(frames) if i == 0 or t[1] != frames[i - 1][1]), odd)


def _batched(records: Iterable[tuple[str, str]], max_bases: int) -> Iterator[list[tuple[str, str]]]:
    batch, bases = [], 0
    for rec in records:
        batch.append(rec)
        bases += len(rec[1])
        if bases >= max_bases:
            yield batch
            batch, bases = [], 0
    if batch:
        yield batch


_T = TypeVar("_T")
_R = TypeVar("_R")


def _ordered_pool_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R]:
    """fn over items in a process pool, results in input order, at most 2*workers in flight.

    Bounded so that a slow writer does not make the whole input pile up in memory (Pool.imap reads
    its input eagerly). forkserver/spawn rather than fork: the caller may be a threaded Ray driver.
    """
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass(frozen=True, slots=True)
class PreprocessResult:
    """Counts and output paths of `preprocess_fasta`."""

    contigs: int
    chunks: int
    frames: int
    chunks_path: Path
    nucleotide_path: Path
    protein_path: Path
    chunks_with_frames: int = 0  # chunks with at least one kept frame
    odd: OddLetters = field(default_factory=OddLetters)  # letters outside A/C/G/T and the IUPAC codes

    def summary(self) -> str:
        out = self.protein_path.parent
        odd = ""
        if self.odd.chunks:
            letters = ", ".join(f"{c!r} x{n}" for c, n in self.odd.letters.items())
            odd = f"; {self.odd.chunks} chunks hold letters read as N ({letters})"
        return (f"{self.contigs} records -> {self.chunks} chunks ({self.chunks - self.chunks_with_frames} "
                f"without a stop-free frame) -> {self.frames} frames kept{odd}; wrote {out / CHUNKS_FASTA}, "
                f"{out / NUCLEOTIDE_FASTA}, {out / PROTEIN_FASTA}")


class DuplicateIds(SequenceError):
    """Two input records share an id: every result file reports by id, so they could not be told
    apart (upstream merges their features by id and reports one of them twice)."""


def _hashed(records: Iterable[tuple[str, str]], hashes: array) -> Iterator[tuple[str, str]]:
    for record in records:
        hashes.append(hash(record[0]))
        yield record


def check_unique_ids(path: str | os.PathLike, hashes: array) -> None:
    """Raise DuplicateIds, naming the ids and their record numbers, if two records of `path` share
    an id. `hashes`: hash(id) of every record, in order (8 bytes a record); the file's headers are
    read again only when two hashes are equal, so a hash collision reports nothing."""
    h = np.sort(np.frombuffer(hashes, np.int64))
    repeated = set(h[1:][h[1:] == h[:-1]].tolist())
    if not repeated:
        return
    numbers: dict[str, list[int]] = {}
    for n, rid in enumerate(fasta_ids(path), start=1):
        if hash(rid) in repeated:
            numbers.setdefault(rid, []).append(n)
    dups = [(rid, ns) for rid, ns in numbers.items() if len(ns) > 1]
    if not dups:
        return
    (rid, ns), more = dups[0], len(dups) - 1
    records = ", ".join(map(str, ns[:-1])) + f" and {ns[-1]}"
    raise DuplicateIds(f"{path}: contig id '{rid}' is used by records {records}"
                       + (f" (and {more} more id(s) by several records)" if more else "")
                       + "; results are reported per id, so ids must be unique (make them so, e.g. with "
                         "`seqkit rename`, which numbers repeats)")


def default_workers(input_path: str | os.PathLike) -> int:
    """Translation processes worth starting for this input: 1 (no pool) below ~64 Mbp, where one
    process takes about a second; else one per CPU, at most 8 (gzip input counted as 4x its size)."""
    source = InputFile.open(input_path)
    size = source.size * (4 if source.gzip else 1)
    if size < 64 * _BATCH_BASES:
        return 1
    return max(1, min(os.cpu_count() or 1, 8, size // _BATCH_BASES))


def preprocess_fasta(input_path: str | os.PathLike, out_dir: str | os.PathLike, chunk_size: int,
                     chunking: str = "compat", workers: int | None = None) -> PreprocessResult:
    """Chunk, translate and select frames of a FASTA file, as upstream's prediction script does.

    Writes in `out_dir`: `chunks.fasta` (wrapped at 60 like Bio.SeqIO, input case),
    `nucleotide.fasta` and `protein.faa` (one line per sequence, the kept frames, same ids and order).
    The input (plain or gzip) is streamed in batches, so memory does not grow with the file.
    workers: None or 1 runs in this process; n > 1 uses n worker processes (forkserver, or spawn
    where there is none), output order unchanged. As with any spawned pool, a calling script must
    be importable: guard its entry point with `if __name__ == "__main__":`.
    """
    chunk_bounds(1, chunk_size, chunking)  # validate arguments before creating anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / CHUNKS_FASTA, out / NUCLEOTIDE_FASTA, out / PROTEIN_FASTA)
    try:
        return _preprocess(os.fspath(input_path), paths, chunk_size, chunking, workers)
    except BaseException:  # a refused input leaves nothing behind: fixed, it runs into the same OUT_DIR
        for p in paths:
            p.unlink(missing_ok=True)
        raise


def _preprocess(input_path: str, paths: tuple[Path, Path, Path], chunk_size: int, chunking: str,
                workers: int | None) -> PreprocessResult:
    hashes = array("q")
    batches = _numbered(_batched(_hashed(iter_records(input_path), hashes), _BATCH_BASES))
    fn = partial(_format_batch, size=chunk_size, mode=chunking, source=str(input_path))
    results = map(fn, batches) if not workers or workers <= 1 else _ordered_pool_map(fn, batches, workers)
    contigs = chunks = frames = with_frames = 0
    odd = OddLetters()
    with ExitStack() as stack:
        f_chunk, f_nuc, f_prot = (stack.enter_context(open(p, "wb")) for p in paths)
        for text in results:
            f_chunk.write(text.chunks)
            f_nuc.write(text.nucleotide)
            f_prot.write(text.protein)
            contigs += text.contigs
            chunks += text.n_chunks
            frames += text.frames
            with_frames += text.chunks_with_frames
            odd = odd + text.odd if text.odd.letters else odd
    check_unique_ids(input_path, hashes)
    if not chunks:  # (records without a sequence: nothing to predict)
        raise SequenceError(f"{input_path}: no record with a sequence")
    return PreprocessResult(contigs, chunks, frames, *paths, chunks_with_frames=with_frames, odd=odd)


def _numbered(batches: Iterable[list[_T]]) -> Iterator[tuple[int, list[_T]]]:
    """(number of the batch's first item, the batch)."""
    first = 0
    for batch in batches:
        yield first, batch
        first += len(batch)
