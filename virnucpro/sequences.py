"""Sequence input: streaming FASTA (plain or gzip), alphabet validation, and an on-disk index.

The embedding driver never holds all sequences in memory. `FastaIndex.build` makes one streaming
pass over the file, in fixed-size blocks, that validates every record and keeps only three numbers
per record (byte offset, length, ordinal) in numpy arrays backed by scratch files (memory-mapped, so
they page out instead of growing the driver's heap); no record's sequence is assembled, so a record
of any length (a 10 GB line without a newline) costs one block. Batches later read their sequences
back by offset, each only as far as the tokenizer will use it (`FastaIndex.read(max_residues=)`). A
gzip input is decompressed once into a scratch file, because gzip streams cannot seek.

Records: a header is a line starting with '>'; the id is the header up to its first whitespace (it
may hold '/', '|', non-ASCII letters: ids are data, never used to build a path); headers must be
UTF-8 and at most 1 MiB. Whitespace inside sequence lines (CR, spaces, tabs) is ignored; blank lines
before the first header are allowed.

Validation rules (documented in the README):
  * protein: letters are upper-cased; `J` (not in ESM-2's vocabulary, fair-esm fails on it) is read
    as `X`, the unknown residue; `B`, `Z`, `U`, `O`, `X` are ESM-2 tokens; one trailing `*` (a stop codon written by
    translators) is removed; any other character (digits, `-`, `.`, an internal `*`, punctuation) is an error naming record and character.
  * DNA: letters are upper-cased; `U` is read as `T`; IUPAC ambiguity codes (N, R, Y, ...) are kept
    and become `[UNK]` tokens in DNABERT-S, as upstream VirNucPro feeds them; anything else is an error.
  * an empty record (header without sequence) is skipped with a warning and listed in the manifest;
    duplicate ids are reported with a warning and both records are kept (the `index` column tells
    them apart).
"""

from __future__ import annotations

import gzip
import logging
import mmap
import os
import shutil
import tempfile
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

log = logging.getLogger(__name__)

PROTEIN = "protein"
DNA = "dna"

_PROTEIN_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DNA_LETTERS = b"ACGTUNRYKMSWBDHVacgtunrykmswbdhv"
_ALLOWED = {PROTEIN: _PROTEIN_LETTERS, DNA: _DNA_LETTERS}
_WHITESPACE = b" \t\r\n\x0b\x0c"  # ignored inside sequence lines
_KEEP = {k: v + _WHITESPACE for k, v in _ALLOWED.items()}
_NORMALISE = {
    PROTEIN: bytes.maketrans(_PROTEIN_LETTERS[26:], _PROTEIN_LETTERS[:26]),
    DNA: bytes.maketrans(b"acgtunrykmswbdhvU", b"ACGTTNRYKMSWBDHVT"),
}
_MAX_REPORTED = 5
_INT32_MAX = 2**31 - 1  # the output's `length` column is int32: longer records saturate


class SequenceError(ValueError):
    """Bad input: names the file, the record and the cause in one line."""


@dataclass(frozen=True)
class Record:
    id: str
    sequence: str
    index: int


def open_text_or_gzip(path: str | Path) -> BinaryIO:
    """Open a file for binary reading, transparently decompressing gzip (detected by magic bytes)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _check_fasta_start(path: Path, first: bytes) -> None:
    if not first:
        raise SequenceError(f"{path}: empty file, no FASTA records")
    head = first.lstrip()
    if head.startswith(b">"):
        return
    if not head:
        raise SequenceError(f"{path}: no FASTA records (only blank lines at the start)")
    if head.startswith(b"@"):
        raise SequenceError(f"{path}: looks like FASTQ (starts with '@'); give a FASTA file")
    if head[:15].lower().startswith((b"<!doctype", b"<html", b"<?xml")):
        raise SequenceError(f"{path}: looks like an HTML or XML page, not FASTA (a failed download?)")
    if b"\x00" in head[:4096]:
        raise SequenceError(f"{path}: a binary file, not FASTA")
    raise SequenceError(f"{path}: not a FASTA file (the first line does not start with '>')")


def _where(path: Path, ordinal: int, offset: int) -> str:
    return f"{path}: record {ordinal + 1} (byte {offset})"


def _record_id(header: bytes, path: Path, ordinal: int, offset: int) -> str:
    """The id: the header up to its first whitespace (ids may hold '/', non-ASCII letters, ...)."""
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        raise SequenceError(f"{_where(path, ordinal, offset)}: header is not valid UTF-8") from None
    words = text.split(None, 1)
    if not words:
        raise SequenceError(f"{_where(path, ordinal, offset)}: empty header (no id after '>')")
    return words[0]


def _bad_character(sequence: bytes, kind: str, record_id: str, path: Path | str, first: int = 0) -> SequenceError:
    """The error for the first byte of `sequence` outside the alphabet (whitespace ignored); `first`
    is the number of residues before `sequence` in its record."""
    bad = sequence.translate(None, _KEEP[kind])
    if b"\x00" in bad:
        return SequenceError(f"{path}: record '{record_id}' contains binary data (NUL bytes)")
    at = sequence.index(bad[:1])
    pos = first + len(sequence[:at].translate(None, _WHITESPACE)) + 1
    char = chr(bad[0]) if 32 <= bad[0] < 127 else f"\\x{bad[0]:02x}"
    what = "protein" if kind == PROTEIN else "DNA"
    return SequenceError(f"{path}: record '{record_id}': character {char!r} at position {pos} is not a "
                         f"valid {what} letter")


def normalise(sequence: bytes, kind: str, record_id: str, path: Path | str = "<input>") -> bytes:
    """Validate one sequence and return it in the model's alphabet (see module docstring)."""
    if kind == PROTEIN and sequence.endswith(b"*"):
        sequence = sequence[:-1]
    if sequence.translate(None, _ALLOWED[kind]):
        raise _bad_character(sequence, kind, record_id, path)
    return sequence.translate(_NORMALISE[kind])


def iter_fasta(path: str | Path, kind: str | None = None) -> Iterator[Record]:
    """Stream validated records from a plain or gzip FASTA file, one at a time (each record's
    sequence is held whole: for the embedding driver's bounded-memory pass, see `FastaIndex`)."""
    for block in _scan(Path(path), kind, collect=True):
        for rid, seq, ordinal in zip(block.ids, block.sequences, block.ordinals):
            yield Record(rid, seq.decode("ascii"), ordinal)


_BLOCK = 1 << 18  # bytes read at a time: what the index pass holds, however long a line is
MAX_HEADER = 1 << 20  # a longer header line is an error (a header is buffered whole, a sequence never)
_RECORDS_PER_YIELD = 1024  # records the scanner hands over at a time


@dataclass
class _Scanned:
    """The records that ended in one block of input."""

    ids: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # header byte offset
    lengths: list[int] = field(default_factory=list)  # residues after normalisation (0: empty record)
    ordinals: list[int] = field(default_factory=list)
    sequences: list[bytes] = field(default_factory=list)  # normalised, only when collecting


def _scan(path: Path, kind: str | None, collect: bool = False) -> Iterator[_Scanned]:
    """One streaming pass over a FASTA file in blocks of _BLOCK bytes, validating every record.

    Yields, per block, the records that ended in it: id, header offset, length (and the normalised
    sequence with `collect`). Sequences are validated and counted block by block, never assembled, so
    memory stays bounded however long a line is (a record of 10 GB on one line costs a block).
    Whitespace inside sequence lines (spaces, tabs, CR) is ignored; a '>' starts a header only at the
    start of a line; blank lines before the first header are allowed.
    """
    try:
        f = open_text_or_gzip(path)
    except FileNotFoundError:
        raise SequenceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SequenceError(f"{path}: is a directory, not a FASTA file") from None
    except OSError as e:
        raise SequenceError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            yield from _scan_blocks(f, path, kind, collect)
        except (OSError, EOFError) as e:  # truncated gzip, unreadable block
            raise SequenceError(f"{path}: input ends unexpectedly or cannot be read ({e})") from None


def _scan_blocks(f: BinaryIO, path: Path, kind: str | None, collect: bool) -> Iterator[_Scanned]:
    keep = _KEEP[kind] if kind else None
    table = _NORMALISE[kind] if kind else None
    star_ok = kind == PROTEIN
    buf = f.read(_BLOCK)
    base = 0  # file offset of buf[0]
    while buf and not buf.lstrip():  # blank lines before the first header
        chunk = f.read(_BLOCK)
        if not chunk:
            break
        base, buf = base + len(buf), chunk
    _check_fasta_start(path, buf)
    pos = len(buf) - len(buf.lstrip())
    eof = False
    at_line_start = True
    # the open record: header (bytes), its offset and ordinal, residues so far, a trailing '*' seen
    header: bytes | None = None
    h_offset = ordinal = length = 0
    star = False
    pieces: list[bytes] = []
    out = _Scanned()

    def close() -> None:
        rid = _record_id(header, path, ordinal, h_offset)
        out.ids.append(rid)
        out.offsets.append(h_offset)
        out.lengths.append(length)
        out.ordinals.append(ordinal)
        if collect:
            seq = b"".join(pieces)
            out.sequences.append(seq.translate(table) if table else seq)

    while True:
        n = len(buf)
        find = buf.find
        while pos < n:
            if at_line_start and buf[pos] == 62:  # '>' at a line start: a header
                eol = find(b"\n", pos)
                if eol < 0:
                    if not eof:
                        break  # the header continues in the next block
                    eol = n
                if eol - pos > MAX_HEADER:
                    raise SequenceError(f"{_where(path, ordinal + (header is not None), base + pos)}: header "
                                        f"line longer than {MAX_HEADER} bytes")
                if header is not None:
                    close()
                    ordinal += 1
                    if len(out.ids) >= _RECORDS_PER_YIELD:  # bounded lists, however short the records
                        yield out
                        out = _Scanned()
                header, h_offset, length, star = buf[pos + 1:eol].rstrip(b"\r"), base + pos, 0, False
                if collect:
                    pieces = []
                pos = eol + 1
                continue
            nxt = find(b"\n>", pos)
            end = n if nxt < 0 else nxt + 1
            seg = buf[pos:end]
            at_line_start = buf[end - 1] == 10
            pos = end
            if keep is not None and seg.translate(None, keep):
                rid = _record_id(header, path, ordinal, h_offset)
                if star:  # residues after a '*' that looked like the trailing one
                    raise _bad_character(b"*" + seg, kind, rid, path, length)
                err = _bad_character(seg, kind, rid, path, length)
                at = seg.find(b"*")
                if not (star_ok and at >= 0 and not seg[:at].translate(None, keep)
                        and not seg[at + 1:].translate(None, _WHITESPACE)):
                    raise err
                seg, star = seg[:at], True  # a trailing '*' (a stop codon) is dropped, if nothing follows
            elif star and seg.translate(None, _WHITESPACE):
                raise _bad_character(b"*" + seg, kind, _record_id(header, path, ordinal, h_offset), path,
                                     length)
            clean = seg.translate(None, _WHITESPACE)
            length += len(clean)
            if collect:
                pieces.append(clean)
        if out.ids:
            yield out
            out = _Scanned()
        if eof:
            break
        if n - pos > MAX_HEADER:
            raise SequenceError(f"{_where(path, ordinal + 1, base + pos)}: header line longer than "
                                f"{MAX_HEADER} bytes")
        chunk = f.read(_BLOCK)
        eof = not chunk
        base += pos
        buf, pos = buf[pos:] + chunk, 0
    if header is not None:
        close()
        yield out


_SPILL_CHUNK = 1 << 16  # values buffered per column before they are appended to its scratch file


class _Column:
    """An int64 column built by appending, stored in an unlinked scratch file and mapped back
    read-only: memory the kernel can page out, not driver heap."""

    def __init__(self, scratch_dir: str | Path):
        Path(scratch_dir).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".index-", suffix=".i64", dir=scratch_dir)
        os.unlink(name)  # no file to clean up: the data lives until the mapping is dropped
        self.file = os.fdopen(fd, "w+b")
        self.buf = array("q")

    def append(self, value: int) -> None:
        self.buf.append(value)
        if len(self.buf) >= _SPILL_CHUNK:
            self.buf.tofile(self.file)
            del self.buf[:]

    def extend(self, values) -> None:
        self.buf.extend(values)
        if len(self.buf) >= _SPILL_CHUNK:
            self.buf.tofile(self.file)
            del self.buf[:]

    def finish(self) -> np.ndarray:
        self.buf.tofile(self.file)
        del self.buf[:]
        self.file.flush()
        size = self.file.tell()
        if size == 0:
            return np.empty(0, np.int64)
        mapped = mmap.mmap(self.file.fileno(), size, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, np.int64)

    def close(self) -> None:
        self.file.close()


def _read_header_id(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.readline(MAX_HEADER + 2)[1:].decode("utf-8").split(None, 1)[0]


_DEDUP_BUCKET = 1 << 18  # hashes sorted at once by the duplicate check (2 MiB)


def _repeats(sorted_hashes: np.ndarray) -> np.ndarray:
    return np.unique(sorted_hashes[1:][sorted_hashes[1:] == sorted_hashes[:-1]])


def _duplicate_ids(path: Path, offsets: np.ndarray, hashes: np.ndarray, scratch_dir: str | Path) -> list[str]:
    """Ids that occur more than once (each listed once), found through their 64-bit hashes in bounded
    memory: hashes are split by their top bits into scratch buckets of about _DEDUP_BUCKET each, each
    bucket is sorted alone, and the repeated values are looked up in one more chunked pass. Candidates
    are confirmed by reading their headers back, so a hash collision reports nothing."""
    n = len(hashes)
    if n < 2:
        return []
    bits = max(0, int(np.ceil(np.log2(n / _DEDUP_BUCKET))))
    if bits == 0:
        repeated = _repeats(np.sort(hashes))
    else:
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
            repeated = np.concatenate(found)
        finally:
            for f in buckets:
                f.close()
    if not len(repeated):
        return []
    seen: dict[str, int] = {}
    for a in range(0, n, _SPILL_CHUNK):
        for position in (a + np.flatnonzero(np.isin(hashes[a:a + _SPILL_CHUNK], repeated))).tolist():
            rid = _read_header_id(path, int(offsets[position]))
            seen[rid] = seen.get(rid, 0) + 1
    return [rid for rid, n in seen.items() if n > 1]


@dataclass
class FastaIndex:
    """Byte offsets and lengths of every valid record of a (seekable, plain) FASTA file."""

    path: Path
    kind: str
    offsets: np.ndarray  # int64 [N], header line offset (arrays are read-only, file-backed)
    lengths: np.ndarray  # int64 [N], residues or bases after normalisation
    ordinals: np.ndarray  # int64 [N], record number in the input (0-based, empty records counted)
    skipped_empty: list[str] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def build(cls, path: str | Path, kind: str, scratch_dir: str | Path) -> "FastaIndex":
        """Validate every record in one streaming pass; decompress gzip input into scratch_dir."""
        path = Path(path)
        source = path
        try:
            with open_text_or_gzip(path) as f:
                compressed = isinstance(f, gzip.GzipFile)
        except FileNotFoundError:
            raise SequenceError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise SequenceError(f"{path}: is a directory, not a FASTA file") from None
        if compressed:
            source = Path(scratch_dir) / (path.name.removesuffix(".gz") + ".plain")
            source.parent.mkdir(parents=True, exist_ok=True)
            try:
                with gzip.open(path, "rb") as src, open(source, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                raise SequenceError(f"{path}: damaged or truncated gzip file ({e})") from None
        # Int64 columns appended in chunks to unlinked scratch files and mapped back read-only: the
        # driver's heap does not grow with the input (the OS pages the columns in and out). The id
        # hashes for the duplicate check are one more such column, sorted in buckets at the end.
        offsets, lengths, ordinals, hashes = (_Column(scratch_dir) for _ in range(4))
        empty: list[str] = []
        try:
            for block in _scan(source, kind):
                if 0 in block.lengths:  # rare: take the empty records out
                    keep = [i for i, n in enumerate(block.lengths) if n]
                    empty.extend(block.ids[i] for i, n in enumerate(block.lengths) if not n)
                    block = _Scanned(*([column[i] for i in keep]
                                       for column in (block.ids, block.offsets, block.lengths, block.ordinals)))
                hashes.extend(map(hash, block.ids))
                offsets.extend(block.offsets)
                lengths.extend(block.lengths)
                ordinals.extend(block.ordinals)
            offsets_a, lengths_a, ordinals_a = offsets.finish(), lengths.finish(), ordinals.finish()
            duplicates = _duplicate_ids(source, offsets_a, hashes.finish(), scratch_dir)
        finally:
            for c in (offsets, lengths, ordinals, hashes):
                c.close()
        if empty:
            log.warning("%s: skipped %d empty record(s) (no sequence): %s", path, len(empty),
                        ", ".join(empty[:_MAX_REPORTED]) + (" ..." if len(empty) > _MAX_REPORTED else ""))
        if duplicates:
            log.warning("%s: %d duplicate record id(s), all records kept (see the 'index' column): %s",
                        path, len(duplicates), ", ".join(duplicates[:_MAX_REPORTED]))
        if not len(offsets_a):
            raise SequenceError(f"{path}: no records with a sequence")
        if int(lengths_a.max()) > _INT32_MAX:
            log.warning("%s: a record is longer than %d residues; its 'length' column (int32) says %d",
                        path, _INT32_MAX, _INT32_MAX)
        return cls(source, kind, offsets_a, lengths_a, ordinals_a, empty, duplicates)

    def read(self, positions: np.ndarray, max_residues: int | None = None) -> list[Record]:
        """Read the records at the given index positions (in that order) back from disk.

        With `max_residues`, a longer sequence is read only that far (what the tokenizer will use of
        it): reading back is bounded however long a record is. `lengths` keeps the true length."""
        order = np.argsort(self.offsets[positions], kind="stable")  # sequential disk access
        out: list[Record | None] = [None] * len(positions)
        with open(self.path, "rb") as f:
            for j in order:
                i = int(positions[j])
                f.seek(int(self.offsets[i]))
                header = f.readline(MAX_HEADER + 2)
                rid = header[1:].decode("utf-8").split(None, 1)[0]
                need = int(self.lengths[i]) if max_residues is None else min(int(self.lengths[i]), max_residues)
                seq = f.read(min(need + (need >> 5) + 2, _BLOCK)).translate(None, _WHITESPACE)  # usually all
                if len(seq) < need:
                    seq += _read_residues(f, need - len(seq), self.path, rid)
                seq = normalise(seq[:need], self.kind, rid, self.path)
                out[j] = Record(rid, seq.decode("ascii"), int(self.ordinals[i]))
        return out  # type: ignore[return-value]


def _read_residues(f: BinaryIO, need: int, path: Path, rid: str) -> bytes:
    """The next `need` residues from f (line ends and other whitespace dropped); the index pass
    counted them, so nothing past them (a trailing '*', the next header) is taken."""
    pieces, got = [], 0
    while got < need:
        left = need - got
        chunk = f.read(min(left + (left >> 5) + 2, _BLOCK))  # room for the line ends
        if not chunk:
            raise SequenceError(f"{path}: record '{rid}' is shorter than when it was indexed (was the "
                                f"file changed during the run?)")
        clean = chunk.translate(None, _WHITESPACE)[:left]
        pieces.append(clean)
        got += len(clean)
    return b"".join(pieces)
