"""VirNucPro's chunking, six-frame translation and frame selection, as upstream does them (the rules are
in `virnucpro.pipeline.preprocess`'s docstring): a batch of records translated at every position of
both strands at once, frames with a stop ruled out from per-frame stop prefix counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from Bio.Data import CodonTable, IUPACData

from virnucpro.io.alphabet import _IUPAC_DNA, TO_DNA_INPUT, check_contig, plain_contigs
from virnucpro.pipeline.ids import FRAME_NAMES, chunk_id, frame_id
from virnucpro.errors import OptionError, SequenceError

CHUNKING_MODES = ("compat", "even")
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
        raise OptionError(f"--chunking {mode}: choose from {', '.join(CHUNKING_MODES)}")
    if size < 1:
        raise OptionError(f"--chunk-size {size}: must be at least 1")
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
        raise SequenceError(f"record {record_id!r}: sequence has a non-ASCII character") from e


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

    id: str  # `{chunk_id}F1..F3` or `{chunk_id}R1..R3` (virnucpro.pipeline.ids)
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


