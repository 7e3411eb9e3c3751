"""Reading FASTA: opening plain or gzip input, and the one record scanner every reader is built on.

Three readers use `scan`, each with its own rules on top:

  * `iter_records` (preprocessing): (id, sequence) pairs exactly as Bio.SeqIO's "fasta" parser gives
    them, with no alphabet check;
  * `fasta_ids`: the ids alone (the prediction stage lists the frames and chunks it wrote);
  * `virnucpro.sequences` (the embedding input): validates every record against its model's alphabet
    and indexes it in bounded memory, never assembling a sequence.

The format, as `scan` reads it: a header is a line whose first byte is '>' (a '>' anywhere else is
sequence text); everything up to the next header is the record's sequence, line ends included; the
id is the header up to its first whitespace (`header_id`, Bio.SeqIO's rule). What to do with text
before the first header, whitespace inside sequences, or other letters is left to the readers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from .storage import InputFile

READ_BLOCK = 1 << 22  # bytes per read: large enough that Python's work is per record, not per block
_SEQUENCE_WHITESPACE = b" \t\r\n"  # what Bio.SeqIO removes from sequence lines


def is_gzip(path: str | os.PathLike) -> bool:
    """Whether the file (a path or URI) is gzip-compressed, by its magic bytes (not its name)."""
    return InputFile.open(path).gzip


def open_fasta(path: str | os.PathLike) -> BinaryIO:
    """Open a FASTA file (a path or any URI of `virnucpro.storage`) for streaming binary reads,
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
            raise ValueError(f"{path}: {e}") from e


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
            raise ValueError(f"text before the first FASTA header: {text[:60]!r}")
    if header is not None:
        yield _bio_record(header, pieces)


def _bio_record(header: bytes, pieces: list[bytes]) -> tuple[str, str]:
    record_id = header_id(header)
    seq = b"".join(pieces).translate(None, _SEQUENCE_WHITESPACE)
    try:
        return record_id, seq.decode("ascii")
    except UnicodeDecodeError as e:
        raise ValueError(f"record {record_id!r}: sequence has a non-ASCII byte") from e


def fasta_ids(path: str | os.PathLike) -> Iterator[str]:
    """Record ids of a FASTA file in order, without assembling any sequence."""
    with open_fasta(path) as f:
        for _, header, _ in scan(f, sequences=False):
            yield header_id(header)
