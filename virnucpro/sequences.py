"""Sequence input for embedding: alphabet validation and an on-disk index of a FASTA file.

Reading the file (plain or gzip, blocks, headers) is `virnucpro.fasta`'s; this module adds the rules
for what a model may be given, and the index the embedding driver plans and reads batches from.

The embedding driver never holds all sequences in memory. `FastaIndex.build` makes one streaming
pass over the file, in fixed-size blocks, that validates every record and keeps only three numbers
per record (byte offset, length, ordinal) in numpy arrays backed by scratch files (memory-mapped, so
they page out instead of growing the driver's heap); no record's sequence is assembled, so a record
of any length (a 10 GB line without a newline) costs one block. Batches later read their sequences
back by offset, each only as far as the tokenizer will use it (`FastaIndex.read(max_residues=)`). A
gzip input is decompressed once into a scratch file, because gzip streams cannot seek.

Records (`virnucpro.fasta.scan`): a header is a line starting with '>'; the id is the header up to its
first whitespace (it may hold '/', '|', non-ASCII letters: ids are data, never used to build a path);
headers must be UTF-8, at most 1 MiB, and hold an id. Whitespace inside sequence lines (CR, spaces, tabs) is ignored; blank lines
before the first header are allowed.

Validation rules (documented in docs/embedding.md, "Input rules"):
  * protein: letters are upper-cased; `J` (not in ESM-2's vocabulary, fair-esm fails on it) is read
    as `X`, the unknown residue; `B`, `Z`, `U`, `O`, `X` are ESM-2 tokens; one trailing `*` (a stop codon written by
    translators) is removed; any other character (digits, `-`, `.`, an internal `*`, punctuation) is an error naming record and character.
  * DNA: letters are upper-cased; `U` is read as `T`; IUPAC ambiguity codes (N, R, Y, ...) are kept
    and become `[UNK]` tokens in DNABERT-S, as upstream VirNucPro feeds them; anything else is an error.
  * an empty record (header without sequence) is skipped with a warning and listed in the manifest;
    duplicate ids are reported with a warning and both records are kept (the `index` column tells
    them apart).

Contigs given to `preprocess` / `predict` (`check_contig`, docs/predict.md "Letters") follow upstream
VirNucPro, which reads any letter: lowercase is upper-cased, codons with a letter other than A/C/G/T
(IUPAC codes, `U`, `X`, `-`, `*`, ...) translate to nothing, and the chunk is still embedded. Only
what no nucleotide FASTA holds is refused: a byte other than a letter, `-`, `.` or `*` (digits,
punctuation, non-ASCII), and a record whose letters look like a protein.
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

from .fasta import HeaderTooLong, header_id, is_gzip, open_fasta, scan

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


# contigs (preprocess / predict)
_CONTIG_SYMBOLS = bytes(range(65, 91)) + bytes(range(97, 123)) + b"-.*"  # letters, gap and stop symbols
_IUPAC_DNA = b"ACGTNRYKMSWBDHV"  # what the DNABERT-S input check keeps (upper case)
_PROTEIN_ONLY = b"EFIJLOPQZ"  # letters of proteins that no nucleotide code uses (X excluded: masking)
_NOT_PROTEIN_ONLY = bytes(b for b in range(256) if b not in _PROTEIN_ONLY)
PROTEIN_LIKE_FRACTION = 0.1  # proteins hold ~35% of E/F/I/L/P/Q; a contig with a stray letter ~0%
# upper-case contig bytes -> DNABERT-S input: every byte outside A/C/G/T and the IUPAC codes becomes N
TO_DNA_INPUT = bytes(b if b in _IUPAC_DNA else ord("N") for b in range(256))
_PLAIN_CONTIG = bytes(b for b in _CONTIG_SYMBOLS if b not in _PROTEIN_ONLY)  # delete-set of `plain_contigs`


class SequenceError(ValueError):
    """Bad input: names the file, the record and the cause in one line."""


@dataclass(frozen=True)
class Record:
    id: str
    sequence: str
    index: int


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
        rid = header_id(header)
    except UnicodeDecodeError:
        raise SequenceError(f"{_where(path, ordinal, offset)}: header is not valid UTF-8") from None
    if not rid:
        raise SequenceError(f"{_where(path, ordinal, offset)}: empty header (no id after '>')")
    return rid


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
_RECORDS_PER_YIELD = 1024  # records the scanner hands over at a time (and at most _BLOCK residues)


@dataclass
class _Scanned:
    """A batch of validated records, in input order."""

    ids: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # header byte offset
    lengths: list[int] = field(default_factory=list)  # residues after normalisation (0: empty record)
    ordinals: list[int] = field(default_factory=list)
    sequences: list[bytes] = field(default_factory=list)  # normalised, only when collecting
    residues: int = 0  # in `sequences`

    def add(self, record_id: str, offset: int, length: int, ordinal: int) -> None:
        self.ids.append(record_id)
        self.offsets.append(offset)
        self.lengths.append(length)
        self.ordinals.append(ordinal)

    def add_sequence(self, pieces: list[bytes], kind: str | None) -> None:
        seq = b"".join(pieces)
        self.sequences.append(seq.translate(_NORMALISE[kind]) if kind else seq)
        self.residues += len(seq)


def _scan(path: Path, kind: str | None, collect: bool = False) -> Iterator[_Scanned]:
    """One streaming pass over a FASTA file in blocks of _BLOCK bytes, validating every record.

    Yields batches of records: id, header offset, length (and the normalised sequence with
    `collect`). Sequences are validated and counted piece by piece as `virnucpro.fasta.scan` hands
    them over, never assembled, so memory stays bounded however long a line is (a record of 10 GB on
    one line costs a block). Whitespace inside sequence lines (spaces, tabs, CR) is ignored; blank
    lines before the first header are allowed.
    """
    try:
        f = open_fasta(path)
    except OSError as e:
        raise _unreadable(path, e) from None
    with f:
        try:
            yield from _validated(f, path, kind, collect)
        except (OSError, EOFError) as e:  # truncated gzip, unreadable block
            raise SequenceError(f"{path}: input ends unexpectedly or cannot be read ({e})") from None


def _first_header(f: BinaryIO, path: Path) -> tuple[bytes, int]:
    """The input from its first non-blank byte on (one block of it), and that byte's offset, once
    the start is checked to look like FASTA (see `_check_fasta_start`)."""
    buf = f.read(_BLOCK)
    base = 0  # file offset of buf[0]
    while buf and not buf.lstrip():  # blank lines before the first header
        chunk = f.read(_BLOCK)
        if not chunk:
            break
        base, buf = base + len(buf), chunk
    _check_fasta_start(path, buf)
    skip = len(buf) - len(buf.lstrip())
    return buf[skip:], base + skip


def _validated(f: BinaryIO, path: Path, kind: str | None, collect: bool) -> Iterator[_Scanned]:
    """The records of `f`, validated (when `kind` is given) piece by piece, in batches."""
    keep = _KEEP[kind] if kind else None  # the alphabet plus whitespace; None: no validation
    whitespace = _WHITESPACE
    head, base = _first_header(f, path)
    # the open record: its header (bytes), offset and ordinal, residues so far, a trailing '*' seen
    header: bytes | None = None
    h_offset = length = 0
    ordinal = -1
    star = False
    pieces: list[bytes] = []
    out = _Scanned()
    try:
        for offset, starts, text in scan(f, _BLOCK, max_header=MAX_HEADER, head=head, offset=base):
            if starts is not None:  # a new record: the open one is complete
                if header is not None:
                    out.add(_record_id(header, path, ordinal, h_offset), h_offset, length, ordinal)
                    if collect:
                        out.add_sequence(pieces, kind)
                    if len(out.ids) >= _RECORDS_PER_YIELD or out.residues >= _BLOCK:  # bounded batches
                        yield out
                        out = _Scanned()
                header, h_offset, length, star = starts, offset, 0, False
                ordinal += 1
                if collect:
                    pieces = []
            if keep is not None and (star or text.translate(None, keep)):  # rare: an error, or a '*'
                text, star = _past_star(text, star, kind, _record_id(header, path, ordinal, h_offset),
                                        path, length)
            clean = text.translate(None, whitespace)
            length += len(clean)
            if collect:
                pieces.append(clean)
    except HeaderTooLong as e:
        raise SequenceError(f"{_where(path, ordinal + 1, e.offset)}: header line longer than {e.limit} "
                            f"bytes") from None
    if header is not None:
        out.add(_record_id(header, path, ordinal, h_offset), h_offset, length, ordinal)
        if collect:
            out.add_sequence(pieces, kind)
    if out.ids:
        yield out


def _past_star(text: bytes, star: bool, kind: str, record_id: str, path: Path, length: int
               ) -> tuple[bytes, bool]:
    """A piece of sequence that holds a byte outside the alphabet, or that follows a '*'.

    Only a protein's one trailing '*' (a stop codon written by translators) is allowed: it is dropped,
    and nothing but whitespace may follow it, in this piece or later ones. Returns (what to count,
    whether a '*' was seen); anything else raises the error naming the first bad character.
    """
    if star:
        if text.translate(None, _WHITESPACE):
            raise _bad_character(b"*" + text, kind, record_id, path, length)
        return text, True
    at = text.find(b"*")
    if (kind == PROTEIN and at >= 0 and not text[:at].translate(None, _KEEP[kind])
            and not text[at + 1:].translate(None, _WHITESPACE)):
        return text[:at], True
    raise _bad_character(text, kind, record_id, path, length)


def check_contig(upper: bytes, path: Path | str, ordinal: int, record_id: str) -> None:
    """Refuse a contig (upper-cased) that no nucleotide FASTA holds, naming file, record number
    (from 1) and id: a byte outside letters, `-`, `.` and `*`, or letters that look like a protein.

    Everything else goes through preprocessing as upstream treats it (see the module docstring)."""
    where = f"{path}: record {ordinal + 1} ('{record_id}')"
    bad = upper.translate(None, _CONTIG_SYMBOLS)
    if bad:
        at = upper.index(bad[:1])
        char = chr(bad[0]) if 32 <= bad[0] < 127 else f"\\x{bad[0]:02x}"
        raise SequenceError(f"{where}: character {char!r} at position {at + 1} is not a nucleotide letter")
    protein = upper.translate(None, _NOT_PROTEIN_ONLY)
    if upper and len(protein) >= PROTEIN_LIKE_FRACTION * len(upper):
        raise SequenceError(f"{where}: looks like a protein, not a nucleotide sequence ({len(protein)} of "
                            f"{len(upper)} letters are E, F, I, L, P, Q, ...); predict takes nucleotide contigs")


def plain_contigs(upper: bytes) -> bool:
    """Whether upper-cased contig bytes (a whole batch at once) hold nothing that `check_contig`
    needs to look at record by record: no byte outside its symbols, no protein-only letter."""
    return not upper.translate(None, _PLAIN_CONTIG)  # one pass: deletes all but the two kinds


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
        return header_id(f.readline(MAX_HEADER + 2)[1:])


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


def _unreadable(path: Path, e: OSError) -> SequenceError:
    """An input that cannot be opened, in one line."""
    if isinstance(e, FileNotFoundError):
        return SequenceError(f"{path}: no such file")
    if isinstance(e, IsADirectoryError):
        return SequenceError(f"{path}: is a directory, not a FASTA file")
    return SequenceError(f"{path}: cannot read ({e.strerror or e})")


def _plain_copy(path: Path, scratch_dir: str | Path) -> Path:
    """`path` itself, or for gzip input a decompressed copy in scratch_dir: the index reads records
    back by byte offset, and a gzip stream cannot seek."""
    try:
        compressed = is_gzip(path)
    except OSError as e:
        raise _unreadable(path, e) from None
    if not compressed:
        return path
    source = Path(scratch_dir) / (path.name.removesuffix(".gz") + ".plain")
    source.parent.mkdir(parents=True, exist_ok=True)
    try:
        with gzip.open(path, "rb") as src, open(source, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise SequenceError(f"{path}: damaged or truncated gzip file ({e})") from None
    return source


def _index_columns(source: Path, kind: str, scratch_dir: str | Path
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Offsets, lengths, ordinals and id hashes of the records with a sequence; the ids of the empty ones.

    Int64 columns appended in chunks to unlinked scratch files and mapped back read-only: the
    driver's heap does not grow with the input (the OS pages the columns in and out). The id hashes
    are for the duplicate check, which sorts them in buckets afterwards."""
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
        return offsets.finish(), lengths.finish(), ordinals.finish(), hashes.finish(), empty
    finally:
        for c in (offsets, lengths, ordinals, hashes):
            c.close()


def _warn_skipped(path: Path, empty: list[str], duplicates: list[str]) -> None:
    if empty:
        log.warning("%s: skipped %d empty record(s) (no sequence): %s", path, len(empty),
                    ", ".join(empty[:_MAX_REPORTED]) + (" ..." if len(empty) > _MAX_REPORTED else ""))
    if duplicates:
        log.warning("%s: %d duplicate record id(s), all records kept (see the 'index' column): %s",
                    path, len(duplicates), ", ".join(duplicates[:_MAX_REPORTED]))


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
        source = _plain_copy(path, scratch_dir)
        offsets, lengths, ordinals, hashes, empty = _index_columns(source, kind, scratch_dir)
        duplicates = _duplicate_ids(source, offsets, hashes, scratch_dir)
        _warn_skipped(path, empty, duplicates)
        if not len(offsets):
            raise SequenceError(f"{path}: no records with a sequence")
        if int(lengths.max()) > _INT32_MAX:
            log.warning("%s: a record is longer than %d residues; its 'length' column (int32) says %d",
                        path, _INT32_MAX, _INT32_MAX)
        return cls(source, kind, offsets, lengths, ordinals, empty, duplicates)

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
                rid = header_id(f.readline(MAX_HEADER + 2)[1:])
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
