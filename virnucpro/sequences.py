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

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from .fasta import HeaderTooLong, header_id, scan
from .storage import InputFile


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


class RecordError(SequenceError):
    """A record's error whose message names the record by number. A range of the input indexed on its own
    (`virnucpro.index.index_range`) counts its records from 0; `rebased(first)` gives the message with
    the number in the whole input, once the records before the range are counted."""

    _MARK = "\x00record\x00"  # where the number goes in `template`

    def __init__(self, template: str, ordinal: int, first: int = 0):
        super().__init__(template.replace(self._MARK, str(first + ordinal + 1)))
        self.template, self.ordinal = template, ordinal

    def rebased(self, first: int) -> "RecordError":
        return RecordError(self.template, self.ordinal, first)

    def __reduce__(self):  # raised in a Ray task, unpickled in the driver
        return RecordError, (self.template, self.ordinal)


def _where(path: Path | str, offset: int) -> str:
    return f"{path}: record {RecordError._MARK} (byte {offset})"


def _record_id(header: bytes, path: Path | str, ordinal: int, offset: int) -> str:
    """The id: the header up to its first whitespace (ids may hold '/', non-ASCII letters, ...)."""
    try:
        rid = header_id(header)
    except UnicodeDecodeError:
        raise RecordError(f"{_where(path, offset)}: header is not valid UTF-8", ordinal) from None
    if not rid:
        raise RecordError(f"{_where(path, offset)}: empty header (no id after '>')", ordinal)
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
    """Stream validated records from a plain or gzip FASTA file (a path or a URI), one at a time (each
    record's sequence is held whole: for the embedding driver's bounded-memory pass, see
    `virnucpro.index.FastaIndex`)."""
    for block in scan_records(open_input(path), kind, collect=True):
        for rid, seq, ordinal in zip(block.ids, block.sequences, block.ordinals):
            yield Record(rid, seq.decode("ascii"), ordinal)


def open_input(where: str | Path) -> InputFile:
    """The input file at a path or URI; a missing or unreadable one is a one-line SequenceError."""
    try:
        return InputFile.open(where)
    except (OSError, ValueError) as e:  # pyarrow's filesystems raise OSError subclasses; a bad URI ValueError
        raise unreadable(where, e) from None


def check_fasta(where: str | Path) -> InputFile:
    """The input file at a path or URI, once its start is found to be FASTA (one block read): a missing,
    empty or other kind of file is a one-line SequenceError before anything starts."""
    source = open_input(where)
    try:
        with source.stream() as f:
            _first_header(f, source.uri)
    except (OSError, EOFError) as e:
        raise SequenceError(f"{source.uri}: {'damaged or truncated gzip file' if source.gzip else 'cannot read'} ({e})") from None
    return source


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


def scan_records(source: InputFile, kind: str | None, collect: bool = False, start: int = 0,
                 end: int | None = None, tee: BinaryIO | None = None) -> Iterator[_Scanned]:
    """One streaming pass over a FASTA file in blocks of _BLOCK bytes, validating every record.

    Yields batches of records: id, header offset, length (and the normalised sequence with
    `collect`). Sequences are validated and counted piece by piece as `virnucpro.fasta.scan` hands
    them over, never assembled, so memory stays bounded however long a line is (a record of 10 GB on
    one line costs a block). Whitespace inside sequence lines (spaces, tabs, CR) is ignored; blank
    lines before the first header are allowed.

    `start`, `end`: only the records whose header starts in [start, end) (end None: to the end of the
    file), numbered from 0 (`RecordError.rebased` renumbers their errors); a plain file only.
    `tee`: where every byte read (decompressed) is also written: a gzip input's plain copy.
    """
    path = source.uri
    try:
        f = source.stream() if start == 0 else source.random_access()
    except OSError as e:
        raise unreadable(path, e) from None
    with f:
        try:
            reader = _Tee(f, tee) if tee is not None else f
            yield from _validated(reader, path, kind, collect, start, end)
        except (OSError, EOFError) as e:  # truncated gzip, unreadable block
            if source.gzip:
                raise SequenceError(f"{path}: damaged or truncated gzip file ({e})") from None
            raise SequenceError(f"{path}: input ends unexpectedly or cannot be read ({e})") from None


class _Tee:
    """A binary stream whose reads are also written to `copy`."""

    def __init__(self, f: BinaryIO, copy: BinaryIO):
        self.f, self.copy = f, copy

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.copy.write(data)
        return data


def _first_header(f: BinaryIO, path: Path | str) -> tuple[bytes, int]:
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


def _record_start(f, start: int, end: int | None) -> tuple[bytes, int] | None:
    """(one block from the first header at or after byte `start`, its offset), or None when no header
    starts before `end`. A header is a '>' at a line start: the search begins one byte early, at the
    line end that may precede `start`."""
    f.seek(start - 1)
    base, buf = start - 1, b""
    while True:
        chunk = f.read(_BLOCK)
        buf += chunk
        at = buf.find(b"\n>")
        if at >= 0:
            offset = base + at + 1
            return (buf[at + 1:], offset) if end is None or offset < end else None
        if not chunk or (end is not None and base + len(buf) >= end + 1):
            return None
        base, buf = base + len(buf) - 1, buf[-1:]  # a line end at the block's end starts the next search


def _validated(f: BinaryIO, path: Path | str, kind: str | None, collect: bool, start: int = 0,
               end: int | None = None) -> Iterator[_Scanned]:
    """The records of `f` (those whose header starts in [start, end)), validated (when `kind` is given)
    piece by piece, in batches."""
    keep = _KEEP[kind] if kind else None  # the alphabet plus whitespace; None: no validation
    whitespace = _WHITESPACE
    found = _first_header(f, path) if start == 0 else _record_start(f, start, end)
    if found is None:  # no record starts in the range
        return
    head, base = found
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
                if end is not None and offset >= end:
                    break  # the next range's
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
        raise RecordError(f"{_where(path, e.offset)}: header line longer than {e.limit} bytes", ordinal + 1) from None
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


def unreadable(path: Path | str, e: Exception) -> SequenceError:
    """An input that cannot be opened, in one line."""
    if isinstance(e, FileNotFoundError):
        return SequenceError(f"{path}: no such file")
    if isinstance(e, IsADirectoryError):
        return SequenceError(f"{path}: is a directory, not a FASTA file")
    return SequenceError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")
