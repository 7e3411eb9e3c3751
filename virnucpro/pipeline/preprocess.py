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
* letters (`virnucpro.io.alphabet.check_contig`): upstream reads any letter, so `X`, `-`, `*`, `U`
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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import TypeVar

import numpy as np

from virnucpro.io.fasta import fasta_ids, iter_records
from virnucpro.pipeline.frames import (_BATCH_BASES, CHUNKING_MODES, Frame, OddLetters, _batch_frames,  # noqa: F401
                                       _batched, chunk_bounds, iter_frames, reverse_complement, select_frames,
                                       split_chunks, translate_six_frames)
from virnucpro.io.alphabet import SequenceError
from virnucpro.io.storage import InputFile

FASTA_WRAP = 60  # Bio.SeqIO's "fasta" writer wraps at 60; upstream writes chunks through it
CHUNKS_FASTA = "chunks.fasta"
NUCLEOTIDE_FASTA = "nucleotide.fasta"
PROTEIN_FASTA = "protein.faa"


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
