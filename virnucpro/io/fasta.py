"""Reading FASTA: opening plain or gzip input, and the one record scanner every reader is built on.

Three readers use `scan`, each with its own rules on top:

  * `iter_records` (preprocessing): (id, sequence) pairs exactly as Bio.SeqIO's "fasta" parser gives
    them, with no alphabet check;
  * `fasta_ids`: the ids alone (the prediction stage lists the frames and chunks it wrote);
  * `virnucpro.io.alphabet` (the embedding input): validates every record against its model's alphabet
    and indexes it in bounded memory, never assembling a sequence.

The format, as `scan` reads it: a header is a line whose first byte is '>' (a '>' anywhere else is
sequence text); everything up to the next header is the record's sequence, line ends included; the
id is the header up to its first whitespace (`header_id`, Bio.SeqIO's rule). What to do with text
before the first header, whitespace inside sequences, or other letters is left to the readers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from virnucpro.errors import SequenceError
from virnucpro.io.alphabet import _KEEP, _NORMALISE, _WHITESPACE, RecordError, _past_star
from virnucpro.io.storage import InputFile

READ_BLOCK = 1 << 22  # bytes per read: large enough that Python's work is per record, not per block
_SEQUENCE_WHITESPACE = b" \t\r\n"  # what Bio.SeqIO removes from sequence lines


def is_gzip(path: str | os.PathLike) -> bool:
    """Whether the file (a path or URI) is gzip-compressed, by its magic bytes (not its name)."""
    return InputFile.open(path).gzip


def open_fasta(path: str | os.PathLike) -> BinaryIO:
    """Open a FASTA file (a path or any URI of `virnucpro.io.storage`) for streaming binary reads,
    decompressing gzip transparently."""
    return InputFile.open(path).stream()  # type: ignore[return-value]


class HeaderTooLong(ValueError):
    """A header line longer than the scanner's `max_header` (the one thing `scan` holds whole)."""

    def __init__(self, offset: int, limit: int):
        super().__init__(f"byte {offset}: header line longer than {limit} bytes")
        self.offset, self.limit = offset, limit


def header_id(header: bytes) -> str:
    """A record's id: its header line (after '>') up to the first whitespace; '' for an empty header.
    Raises UnicodeDecodeError for a header that is not UTF-8."""
    words = header.decode("utf-8").split(None, 1)
    return words[0] if words else ""


Event = tuple[int, "bytes | None", bytes]  # (file offset, header line or None, sequence text)


def scan(f: BinaryIO, block_size: int = READ_BLOCK, *, max_header: int | None = None, head: bytes = b"",
         offset: int = 0, sequences: bool = True) -> Iterator[Event]:
    """The FASTA stream `f` as (offset, header, text) events, in file order, read in blocks of
    `block_size` bytes.

    A record starts with an event whose `header` is its header line after the '>' (without the line
    feed; a carriage return stays, ids are split off on whitespace) and `offset` that of the '>';
    `text` is the sequence text that follows (line ends included) up to the next header or the end
    of the block. A record that goes on past the block comes in more events with `header` None. So a
    short record is one event, and a long one costs a block of memory however long its lines are.
    Text before the first header comes as events with `header` None too.

    max_header: a longer header line raises HeaderTooLong (a header is the one thing held whole);
    None: no limit. head: bytes already read from `f` (starting at a line start), at file offset
    `offset`; scanning continues with them. sequences=False: headers only (text is always b"").
    """
    limit = max_header if max_header is not None else float("inf")
    buf, base, pos = head, offset, 0
    eof = False
    at_line_start = True  # a '>' starts a header only there; a block may end mid-line
    while True:
        n = len(buf)
        find = buf.find
        while pos < n:
            start = search = pos
            header = None
            if at_line_start and buf[pos] == 62:  # '>'
                eol = find(b"\n", pos)
                if eol < 0:
                    if not eof:
                        break  # the header line continues in the next block
                    eol = n
                if eol - pos > limit:
                    raise HeaderTooLong(base + pos, limit)
                # the next header is searched for from this line's end, where an empty record's is found
                header, search, pos = buf[pos + 1:eol], eol, eol + 1
            nxt = find(b"\n>", search)  # the next header, or the block's end
            end = n if nxt < 0 else nxt + 1
            if sequences:
                yield base + start, header, buf[pos:end]
            elif header is not None:
                yield base + start, header, b""
            at_line_start = buf[end - 1] == 10
            pos = end
        if eof:
            return
        if n - pos > limit:  # an unfinished header line, already too long
            raise HeaderTooLong(base + pos, limit)
        chunk = f.read(block_size)
        eof = not chunk
        base += pos
        buf, pos = buf[pos:] + chunk, 0


def iter_records(path: str | os.PathLike, block_size: int = READ_BLOCK) -> Iterator[tuple[str, str]]:
    """Stream (id, sequence) from a plain or gzip FASTA file, one record at a time.

    Parsed as Bio.SeqIO's "fasta" format does (Biopython 1.88): the id is the first word of the
    header ('' for an empty one); spaces, tabs and line ends inside the sequence are removed; an
    empty record is kept; text other than blank lines before the first '>' is an error. Headers
    are UTF-8; sequences must be ASCII. Letters are not checked (preprocessing keeps them as given).
    Errors are ValueErrors naming the file.
    """
    with open_fasta(path) as f:
        try:
            yield from _bio_records(scan(f, block_size))
        except ValueError as e:
            raise SequenceError(f"{path}: {e}") from e


def _bio_records(events: Iterable[Event]) -> Iterator[tuple[str, str]]:
    """(id, sequence) per record of `scan`'s events, by Bio.SeqIO's rules (see `iter_records`)."""
    header: bytes | None = None
    pieces: list[bytes] = []
    for _, starts, text in events:
        if starts is not None:
            if header is not None:
                yield _bio_record(header, pieces)
            header, pieces = starts, [text]
        elif header is not None:
            pieces.append(text)
        elif text.strip():
            raise SequenceError(f"text before the first FASTA header: {text[:60]!r}")
    if header is not None:
        yield _bio_record(header, pieces)


def _bio_record(header: bytes, pieces: list[bytes]) -> tuple[str, str]:
    record_id = header_id(header)
    seq = b"".join(pieces).translate(None, _SEQUENCE_WHITESPACE)
    try:
        return record_id, seq.decode("ascii")
    except UnicodeDecodeError as e:
        raise SequenceError(f"record {record_id!r}: sequence has a non-ASCII byte") from e


def fasta_ids(path: str | os.PathLike) -> Iterator[str]:
    """Record ids of a FASTA file in order, without assembling any sequence."""
    with open_fasta(path) as f:
        for _, header, _ in scan(f, sequences=False):
            yield header_id(header)


# --- validated records: the embedding input -------------------------------------------------------------

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


def iter_fasta(path: str | Path, kind: str | None = None) -> Iterator[Record]:
    """Stream validated records from a plain or gzip FASTA file (a path or a URI), one at a time (each
    record's sequence is held whole: for the embedding driver's bounded-memory pass, see
    `virnucpro.io.index.FastaIndex`)."""
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
    `collect`). Sequences are validated and counted piece by piece as `virnucpro.io.fasta.scan` hands
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
    found = _first_header(f, path) if start == 0 else _record_start(f, start, end)
    if found is None:  # no record starts in the range
        return
    head, base = found
    record, out = _OpenRecord(path, kind, collect), _Scanned()
    try:
        for offset, starts, text in scan(f, _BLOCK, max_header=MAX_HEADER, head=head, offset=base):
            if starts is not None:  # a new record: the open one is complete
                if end is not None and offset >= end:
                    break  # the next range's
                record.close_into(out)
                if len(out.ids) >= _RECORDS_PER_YIELD or out.residues >= _BLOCK:  # bounded batches
                    yield out
                    out = _Scanned()
                record.open(starts, offset)
            record.take(text)
    except HeaderTooLong as e:
        raise RecordError(f"{_where(path, e.offset)}: header line longer than {e.limit} bytes",
                          record.ordinal + 1) from None
    record.close_into(out)
    if out.ids:
        yield out


class _OpenRecord:
    """The record being read: its header, where it starts, its number, its residues so far (validated as
    they come), and, when collecting, its pieces of sequence."""

    def __init__(self, path: Path | str, kind: str | None, collect: bool):
        self.path, self.kind, self.collect = path, kind, collect
        self.keep = _KEEP[kind] if kind else None  # the alphabet plus whitespace; None: no validation
        self.header: bytes | None = None
        self.offset = self.length = 0
        self.ordinal = -1
        self.star = False  # a trailing '*' was seen
        self.pieces: list[bytes] = []

    def open(self, header: bytes, offset: int) -> None:
        self.header, self.offset, self.length, self.star = header, offset, 0, False
        self.ordinal += 1
        if self.collect:
            self.pieces = []

    def take(self, text: bytes) -> None:
        if self.keep is not None and (self.star or text.translate(None, self.keep)):  # rare: an error, or a '*'
            text, self.star = _past_star(text, self.star, self.kind, self.id(), self.path, self.length)
        clean = text.translate(None, _WHITESPACE)
        self.length += len(clean)
        if self.collect:
            self.pieces.append(clean)

    def id(self) -> str:
        return _record_id(self.header, self.path, self.ordinal, self.offset)

    def close_into(self, out: _Scanned) -> None:
        if self.header is not None:
            out.add(self.id(), self.offset, self.length, self.ordinal)
            if self.collect:
                out.add_sequence(self.pieces, self.kind)


def unreadable(path: Path | str, e: Exception) -> SequenceError:
    """An input that cannot be opened, in one line."""
    if isinstance(e, FileNotFoundError):
        return SequenceError(f"{path}: no such file")
    if isinstance(e, IsADirectoryError):
        return SequenceError(f"{path}: is a directory, not a FASTA file")
    return SequenceError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")
