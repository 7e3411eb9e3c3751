"""Where each record of a FASTA input is: the index the embedding driver plans from, built in ranges that
are indexed apart (on the cluster's nodes), and records read back by byte offset (by the actors).

    index = FastaIndex.build("s3://bucket/in.fasta", "dna", scratch_dir)   # one process
    records = index.read(np.array([5, 0, 9]))                              # (id, sequence) by position

The index keeps four numbers per record (byte offset, bytes up to the next record, length, ordinal) in
int64 columns backed by scratch files (memory-mapped: they page out instead of growing the driver's
heap). A plain input is cut into byte ranges of RANGE_BYTES; each range is validated and indexed alone
by `index_range`, which the driver runs as Ray tasks beside the actors (`map_ranges`), so no process
reads the whole input. A gzip stream cannot be cut or read back by offset: one task decompresses it
once, indexing it as it goes, into a plain copy in the run's scratch location (`copy_to`: the output's
`.work/`, on the same storage as the output), and the records are read back from that copy.

Record numbers in errors are those of the whole input (`RecordError.rebased`), and duplicate ids are
found across ranges through stable 64-bit hashes of the ids, confirmed by reading their headers back.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from virnucpro.io import alphabet, fasta
from virnucpro.io.fasta import header_id
from virnucpro.errors import SequenceError
from virnucpro.io.alphabet import RecordError, normalise
from virnucpro.io.fasta import Record, open_input, scan_records
from virnucpro.io.storage import InputFile, Location

log = logging.getLogger(__name__)

RANGE_BYTES = 32 << 20  # a plain input is indexed in ranges of this many bytes, each by one task
_MAX_REPORTED = 5
_INT32_MAX = 2**31 - 1  # the output's `length` column is int32: longer records saturate


def id_hash(record_id: str) -> int:
    """A 64-bit hash of an id, the same in every process (Python's `hash` of a str is not)."""
    b = record_id.encode()
    return ((zlib.crc32(b) << 32) | zlib.crc32(b, 0x5BD1E995)) - (1 << 63)


@dataclass
class RangeIndex:
    """The records of (a piece of) one byte range of the input, as `index_range` indexes them."""

    start: int
    records: int  # records in this piece, empty ones included (what the next piece's numbers start after)
    offsets: np.ndarray  # int64 [n], header offsets in the file (the plain copy's, for gzip input)
    lengths: np.ndarray  # int64 [n], residues after normalisation
    ordinals: np.ndarray  # int64 [n], record numbers from 0 at the range's first record
    hashes: np.ndarray  # int64 [n], id_hash of each id
    empty: list[str] = field(default_factory=list)  # ids of records without a sequence
    copy: str | None = None  # gzip input: the plain copy the offsets point into (path or URI)
    last: bool = True  # the range's last piece (a range indexed in this process comes in pieces)


def input_ranges(source: InputFile, range_bytes: int = RANGE_BYTES) -> list[tuple[int, int | None]]:
    """[start, end) byte ranges covering a plain file (end None: to its end); one for a small file."""
    starts = list(range(0, max(source.size, 1), max(1, range_bytes)))
    return [(s, starts[i + 1] if i + 1 < len(starts) else None) for i, s in enumerate(starts)]


def index_range(uri: str, kind: str, start: int = 0, end: int | None = None, copy_to: str | None = None) -> RangeIndex:
    """Validate and index the records of input `uri` whose header starts in [start, end), in one piece
    (what a Ray task returns). See `index_pieces`."""
    return _merged(list(index_pieces(uri, kind, start, end, copy_to)))


def index_pieces(uri: str, kind: str, start: int = 0, end: int | None = None,
                 copy_to: str | None = None) -> Iterator[RangeIndex]:
    """Validate and index the records of input `uri` whose header starts in [start, end), a piece of at
    most a thousand records at a time (memory stays bounded whatever the range's size).

    A gzip input is indexed whole (start 0, end None) and decompressed into `copy_to` (a directory: path
    or URI) as it goes; the offsets are the copy's (the last piece names it). Raises SequenceError
    (RecordError numbered from the range's first record) for bad input."""
    source = open_input(uri)
    if not source.gzip:
        yield from _pieces(source, kind, start, end)
        return
    if copy_to is None:
        raise ValueError(f"{uri}: a gzip input needs a directory for its plain copy")
    where = Location.parse(copy_to)
    where.make_dirs()
    pieces: list[RangeIndex] = []
    # the copy appears whole or not at all: a truncated gzip leaves nothing behind. (Its pieces are kept
    # until it is whole: its offsets mean nothing without it.)
    where.write_atomic(plain_copy_name(source), lambda f: pieces.extend(_pieces(source, kind, 0, None, tee=f)))
    pieces[-1].copy = plain_copy(where, source)
    yield from pieces


def plain_copy_name(source: InputFile) -> str:
    return source.name.removesuffix(".gz") + ".plain"


def plain_copy(where: Location, source: InputFile) -> str:
    """The path or URI of a gzip input's plain copy in directory `where` (`index_pieces` writes it)."""
    name = plain_copy_name(source)
    return str(where.local_path / name) if where.local_path else f"{where.uri.rstrip('/')}/{name}"


def _pieces(source: InputFile, kind: str, start: int, end: int | None, tee=None) -> Iterator[RangeIndex]:
    column = lambda a: np.array(a, np.int64)  # noqa: E731
    for block in scan_records(source, kind, start=start, end=end, tee=tee):
        keep = [i for i, n in enumerate(block.lengths) if n]  # (all but the rare empty record)
        yield RangeIndex(start, len(block.ids), column([block.offsets[i] for i in keep]),
                         column([block.lengths[i] for i in keep]), column([block.ordinals[i] for i in keep]),
                         column([id_hash(block.ids[i]) for i in keep]),
                         [block.ids[i] for i, n in enumerate(block.lengths) if not n], last=False)
    yield RangeIndex(start, 0, *(np.empty(0, np.int64) for _ in range(4)))


def _merged(pieces: list[RangeIndex]) -> RangeIndex:
    """The pieces of one range as one."""
    cat = lambda name: np.concatenate([getattr(p, name) for p in pieces])  # noqa: E731
    return RangeIndex(pieces[0].start, sum(p.records for p in pieces), cat("offsets"), cat("lengths"),
                      cat("ordinals"), cat("hashes"), [e for p in pieces for e in p.empty], pieces[-1].copy)


def serial(jobs: Iterable[tuple]) -> Iterator[RangeIndex]:
    """The pieces of each job's range, one range after another in this process (what `map_ranges` does by
    default)."""
    for job in jobs:
        yield from index_pieces(*job)


@dataclass
class FastaIndex:
    """Byte offsets, sizes, lengths and numbers of every valid record of a FASTA input."""

    source: InputFile  # what the records are read back from: the input, or its plain copy
    kind: str
    offsets: np.ndarray  # int64 [N], header line offset (arrays are read-only, file-backed)
    sizes: np.ndarray  # int64 [N], bytes from the header to the next record's (what reading it costs at most)
    lengths: np.ndarray  # int64 [N], residues or bases after normalisation
    ordinals: np.ndarray  # int64 [N], record number in the input (0-based, empty records counted)
    skipped_empty: list[str] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def path(self) -> str:
        return self.source.uri

    @classmethod
    def build(cls, path: str | Path, kind: str, scratch_dir: str | Path, *, copy_to: str | None = None,
              map_ranges: Callable[[list[tuple]], Iterable[RangeIndex]] = serial,
              range_bytes: int = RANGE_BYTES) -> "FastaIndex":
        """Validate and index every record: a plain input in ranges of `range_bytes`, a gzip one whole into
        a plain copy in `copy_to` (default: `scratch_dir`). `map_ranges(jobs)` yields `index_range(*job)`
        for each job in order (default: here, one after another; the driver runs them as Ray tasks).
        Columns live in scratch files under `scratch_dir` (local)."""
        source = open_input(path)
        if source.gzip:
            jobs = [(source.uri, kind, 0, None, str(copy_to or scratch_dir))]
        else:
            jobs = [(source.uri, kind, s, e) for s, e in input_ranges(source, range_bytes)]
        return cls.assemble(source, kind, map_ranges(jobs), scratch_dir)

    @classmethod
    def assemble(cls, source: InputFile, kind: str, ranges: Iterable[RangeIndex], scratch_dir: str | Path) -> "FastaIndex":
        """The index of `source` from its ranges' indexes (whole, or in pieces), in input order."""
        columns = [_Column(scratch_dir) for _ in range(4)]  # offsets, lengths, ordinals, hashes
        empty: list[str] = []
        first = in_range = 0  # records before the current range, and in it so far
        try:
            it = iter(ranges)
            while True:
                try:
                    r = next(it)
                except StopIteration:
                    break
                except RecordError as e:  # numbered in its range: now in the input
                    raise e.rebased(first) from None
                if r.copy is not None:
                    source = open_input(r.copy)
                for column, values in zip(columns, (r.offsets, r.lengths, r.ordinals + first, r.hashes)):
                    column.extend(values)
                empty.extend(r.empty)
                in_range += r.records
                if r.last:
                    first, in_range = first + in_range, 0
            offsets, lengths, ordinals, hashes = (c.finish() for c in columns)
        finally:
            for c in columns:
                c.close()
        if not len(offsets):
            _warn_skipped(source.uri, empty, [])
            raise SequenceError(f"{source.uri}: no records with a sequence")
        sizes = _Column(scratch_dir)
        try:
            for a in range(0, len(offsets), _SPILL_CHUNK):
                b = min(len(offsets), a + _SPILL_CHUNK)
                nxt = offsets[a + 1:b + 1] if b < len(offsets) else np.append(offsets[a + 1:b], source.size)
                sizes.extend(nxt - offsets[a:b])
            sizes_column = sizes.finish()
        finally:
            sizes.close()
        index = cls(source, kind, offsets, sizes_column, lengths, ordinals, empty)
        index.duplicate_ids = _duplicate_ids(index, hashes, scratch_dir)
        _warn_skipped(source.uri, empty, index.duplicate_ids)
        if int(lengths.max()) > _INT32_MAX:
            log.warning("%s: a record is longer than %d residues; its 'length' column (int32) says %d",
                        source.uri, _INT32_MAX, _INT32_MAX)
        return index

    def read(self, positions: np.ndarray, max_residues: int | None = None) -> list[Record]:
        """Read the records at the given index positions (in that order) back.

        With `max_residues`, a longer sequence is read only that far (what the tokenizer will use of
        it): reading back is bounded however long a record is. `lengths` keeps the true length."""
        positions = np.asarray(positions, np.int64)
        found = RecordReader(self.source, self.kind).read(self.offsets[positions], self.sizes[positions],
                                                          self.lengths[positions], max_residues)
        return [Record(rid, seq.decode("ascii"), int(o)) for (rid, seq), o in zip(found, self.ordinals[positions])]


class RecordReader:
    """Reads records back from a plain FASTA file by byte offset: from a local disk, a shared filesystem or
    an object store. Records close together in the file are read in one request (a batch of equal-length
    chunks is usually one), and on object stores the requests of a batch go out in parallel."""

    GAP = 64 << 10  # bytes between two records that are read through rather than asked for apart
    OBJECT_STORE_GAP = 1 << 20  # on object stores a request costs more than a MiB of transfer
    MAX_READ = 16 << 20  # one request at most (unless one record alone needs more)

    def __init__(self, source: InputFile | str, kind: str, threads: int = 8):
        from virnucpro.io.storage import is_object_store

        self.source = source if isinstance(source, InputFile) else open_input(source)
        self.kind = kind
        self.file = self.source.random_access()
        remote = is_object_store(self.source.fs)
        self.gap = self.OBJECT_STORE_GAP if remote else self.GAP
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="virnucpro-read") if remote else None

    def read(self, offsets: np.ndarray, sizes: np.ndarray, lengths: np.ndarray,
             max_residues: int | None = None) -> list[tuple[str, bytes]]:
        """(id, normalised sequence) of each record, in the order given; a sequence longer than
        `max_residues` is read and returned only that far."""
        need = lengths if max_residues is None else np.minimum(lengths, max_residues)
        # a whole record is `size` bytes; a capped one needs its header and `need` residues with line ends
        want = np.where(need < lengths, np.minimum(sizes, need + (need >> 4) + 4096), sizes)
        spans = self._spans(np.asarray(offsets, np.int64), want)
        fetch = lambda span: self.file.read_at(span[1] - span[0], span[0])  # noqa: E731
        datas = self.pool.map(fetch, spans) if self.pool is not None and len(spans) > 1 else map(fetch, spans)
        out: list[tuple[str, bytes] | None] = [None] * len(offsets)
        for (start, _, members), data in zip(spans, datas):
            for j in members:
                o = int(offsets[j]) - start
                out[j] = self._record(data[o:o + int(want[j])], int(offsets[j]), int(need[j]))
        return out  # type: ignore[return-value]

    def _spans(self, offsets: np.ndarray, want: np.ndarray) -> list[tuple[int, int, list[int]]]:
        """(start, end, record positions) of the reads that cover the records, in file order."""
        spans: list[tuple[int, int, list[int]]] = []
        for j in np.argsort(offsets, kind="stable").tolist():
            o, e = int(offsets[j]), int(offsets[j] + want[j])
            if spans and o - spans[-1][1] <= self.gap and max(e, spans[-1][1]) - spans[-1][0] <= self.MAX_READ:
                start, end, members = spans[-1]
                members.append(j)
                spans[-1] = (start, max(end, e), members)
            else:
                spans.append((o, e, [j]))
        return spans

    def _record(self, data: bytes, offset: int, need: int) -> tuple[str, bytes]:
        """A record from its first bytes `data` (at file offset `offset`), reading on when they fall short."""
        eol = data.find(b"\n")
        if eol < 0:  # a header longer than what was read
            data = self.file.read_at(fasta.MAX_HEADER + 2 + len(data), offset)
            eol = data.find(b"\n")
        rid = header_id(data[1:eol])
        seq = data[eol + 1:].translate(None, alphabet._WHITESPACE)
        if len(seq) < need:
            seq += self._residues(offset + len(data), need - len(seq), rid)
        return rid, normalise(seq[:need], self.kind, rid, self.source.uri)

    def _residues(self, at: int, need: int, rid: str) -> bytes:
        """The next `need` residues from byte `at` (line ends and other whitespace dropped); the index pass
        counted them, so nothing past them (a trailing '*', the next header) is taken."""
        pieces, got = [], 0
        while got < need:
            left = need - got
            chunk = self.file.read_at(min(left + (left >> 5) + 2, fasta._BLOCK), at)  # room for the line ends
            if not chunk:
                raise SequenceError(f"{self.source.uri}: record '{rid}' is shorter than when it was indexed (was "
                                    f"the file changed during the run?)")
            at += len(chunk)
            clean = chunk.translate(None, alphabet._WHITESPACE)[:left]
            pieces.append(clean)
            got += len(clean)
        return b"".join(pieces)

    def close(self) -> None:
        self.file.close()
        if self.pool is not None:
            self.pool.shutdown(wait=False)


# --- scratch columns and the duplicate check --------------------------------------------------------------

_SPILL_CHUNK = 1 << 16  # values buffered per column before they are appended to its scratch file


class _Column:
    """An int64 column built by appending, stored in an unlinked scratch file and mapped back
    read-only: memory the kernel can page out, not driver heap."""

    def __init__(self, scratch_dir: str | Path):
        Path(scratch_dir).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".index-", suffix=".i64", dir=scratch_dir)
        os.unlink(name)  # no file to clean up: the data lives until the mapping is dropped
        self.file = os.fdopen(fd, "w+b")

    def extend(self, values: np.ndarray) -> None:
        np.asarray(values, np.int64).tofile(self.file)

    def finish(self) -> np.ndarray:
        self.file.flush()
        size = self.file.tell()
        if size == 0:
            return np.empty(0, np.int64)
        mapped = mmap.mmap(self.file.fileno(), size, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, np.int64)

    def close(self) -> None:
        self.file.close()


_DEDUP_BUCKET = 1 << 18  # hashes sorted at once by the duplicate check (2 MiB)


def _repeats(sorted_hashes: np.ndarray) -> np.ndarray:
    return np.unique(sorted_hashes[1:][sorted_hashes[1:] == sorted_hashes[:-1]])


def _repeated_hashes(hashes: np.ndarray, scratch_dir: str | Path) -> np.ndarray:
    """Hash values that occur more than once, in bounded memory: hashes are split by their top bits into
    scratch buckets of about _DEDUP_BUCKET each, and each bucket is sorted alone."""
    n = len(hashes)
    bits = max(0, int(np.ceil(np.log2(n / _DEDUP_BUCKET))))
    if bits == 0:
        return _repeats(np.sort(hashes))
    buckets = [tempfile.TemporaryFile(dir=scratch_dir) for _ in range(1 << bits)]
    try:
        for a in range(0, n, _SPILL_CHUNK):
            h = hashes[a:a + _SPILL_CHUNK]
            which = (h.view(np.uint64) >> np.uint64(64 - bits)).astype(np.intp)
            order = np.argsort(which, kind="stable")
            grouped, counts = h[order], np.bincount(which, minlength=len(buckets))
            ends = np.cumsum(counts)
            for k in np.flatnonzero(counts).tolist():
                grouped[ends[k] - counts[k]:ends[k]].tofile(buckets[k])
        found = []
        for f in buckets:
            f.seek(0)
            found.append(_repeats(np.sort(np.fromfile(f, np.int64))))
        return np.concatenate(found)
    finally:
        for f in buckets:
            f.close()


def _duplicate_ids(index: FastaIndex, hashes: np.ndarray, scratch_dir: str | Path) -> list[str]:
    """Ids that occur more than once (each listed once). Candidates (repeated hashes) are confirmed by
    reading their headers back, so a hash collision reports nothing."""
    if len(hashes) < 2:
        return []
    repeated = _repeated_hashes(hashes, scratch_dir)
    if not len(repeated):
        return []
    seen: dict[str, int] = {}
    reader = RecordReader(index.source, index.kind)
    try:
        for a in range(0, len(hashes), _SPILL_CHUNK):
            positions = a + np.flatnonzero(np.isin(hashes[a:a + _SPILL_CHUNK], repeated))
            for rid, _ in reader.read(index.offsets[positions], index.sizes[positions],
                                      index.lengths[positions], max_residues=0):
                seen[rid] = seen.get(rid, 0) + 1
    finally:
        reader.close()
    return [rid for rid, n in seen.items() if n > 1]


def _warn_skipped(path: str, empty: list[str], duplicates: list[str]) -> None:
    if empty:
        log.warning("%s: skipped %d empty record(s) (no sequence): %s", path, len(empty),
                    ", ".join(empty[:_MAX_REPORTED]) + (" ..." if len(empty) > _MAX_REPORTED else ""))
    if duplicates:
        log.warning("%s: %d duplicate record id(s), all records kept (see the 'index' column): %s",
                    path, len(duplicates), ", ".join(duplicates[:_MAX_REPORTED]))


__all__ = ["FastaIndex", "RangeIndex", "RecordReader", "index_range", "input_ranges", "RANGE_BYTES", "id_hash"]
