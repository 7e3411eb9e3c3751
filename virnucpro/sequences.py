"""Sequence input: streaming FASTA (plain or gzip), alphabet validation, and an on-disk index.

The embedding driver never holds all sequences in memory. `FastaIndex.build` makes one streaming
pass over the file that validates every record and keeps only three numbers per record (byte offset,
length, ordinal) in numpy arrays backed by scratch files (memory-mapped, so they page out instead of
growing the driver's heap); batches later read their sequences back by offset. A gzip input is
decompressed once into a scratch file, because gzip streams cannot seek.

Validation rules (documented in the README):
  * protein: letters are upper-cased; `J` (not in ESM-2's vocabulary, fair-esm fails on it) is read
    as `X`, the unknown residue; `B`, `Z`, `U`, `O`, `X` are ESM-2 tokens; one trailing `*` (a stop codon written by translators) is removed; any other
    character (digits, `-`, `.`, an internal `*`, punctuation) is an error naming record and character.
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
_NORMALISE = {
    PROTEIN: bytes.maketrans(_PROTEIN_LETTERS[26:], _PROTEIN_LETTERS[:26]),
    DNA: bytes.maketrans(b"acgtunrykmswbdhvU", b"ACGTTNRYKMSWBDHVT"),
}
_MAX_REPORTED = 5


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
    if head.startswith(b"@"):
        raise SequenceError(f"{path}: looks like FASTQ (starts with '@'); give a FASTA file")
    if head[:15].lower().startswith((b"<!doctype", b"<html")):
        raise SequenceError(f"{path}: looks like an HTML page, not FASTA (a failed download?)")
    raise SequenceError(f"{path}: not a FASTA file (first line does not start with '>')")


def _record_id(header: bytes, path: Path, line_no: int) -> str:
    try:
        text = header[1:].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SequenceError(f"{path}:{line_no}: record header is not valid UTF-8") from None
    if not text:
        raise SequenceError(f"{path}:{line_no}: record has an empty header (no id after '>')")
    return text.split(None, 1)[0]


def normalise(sequence: bytes, kind: str, record_id: str, path: Path | str = "<input>") -> bytes:
    """Validate one sequence and return it in the model's alphabet (see module docstring)."""
    if kind == PROTEIN and sequence.endswith(b"*"):
        sequence = sequence[:-1]
    bad = sequence.translate(None, _ALLOWED[kind])
    if bad:
        char = chr(bad[0]) if bad[0] < 128 else f"\\x{bad[0]:02x}"
        pos = sequence.index(bad[:1]) + 1
        what = "protein" if kind == PROTEIN else "DNA"
        raise SequenceError(
            f"{path}: record '{record_id}': character {char!r} at position {pos} is not a valid "
            f"{what} letter"
        )
    return sequence.translate(_NORMALISE[kind])


def iter_fasta(path: str | Path, kind: str | None = None) -> Iterator[Record]:
    """Stream validated records from a plain or gzip FASTA file, one at a time."""
    for rid, seq, index, _offset in _scan(Path(path), kind):
        yield Record(rid, seq.decode("ascii", errors="replace"), index)


def _scan(path: Path, kind: str | None) -> Iterator[tuple[str, bytes, int, int]]:
    """One pass over a FASTA file yielding (id, normalised sequence, ordinal, header byte offset)."""
    try:
        f = open_text_or_gzip(path)
    except FileNotFoundError:
        raise SequenceError(f"{path}: no such file") from None
    with f:
        try:
            first = f.readline()
        except (OSError, EOFError) as e:
            raise SequenceError(f"{path}: cannot read ({e})") from None
        _check_fasta_start(path, first)
        header, header_offset, header_line = first.strip(), 0, 1
        parts: list[bytes] = []
        offset, index, line_no = len(first), 0, 1
        try:
            for line in f:
                line_no += 1
                if line.startswith(b">"):
                    yield _finish(path, header, header_line, parts, kind) + (index, header_offset)
                    index += 1
                    header, header_offset, header_line, parts = line.strip(), offset, line_no, []
                else:
                    parts.append(line.strip())
                offset += len(line)
        except (OSError, EOFError) as e:  # truncated gzip, unreadable block
            raise SequenceError(f"{path}: input ends unexpectedly near line {line_no} ({e})") from None
        yield _finish(path, header, header_line, parts, kind) + (index, header_offset)


def _finish(path: Path, header: bytes, line_no: int, parts: list[bytes],
            kind: str | None) -> tuple[str, bytes]:
    rid = _record_id(header, path, line_no)
    seq = b"".join(parts)
    if b"\x00" in seq:
        raise SequenceError(f"{path}: record '{rid}' contains binary data (NUL bytes)")
    if kind is not None:
        seq = normalise(seq, kind, rid, path)
    return rid, seq


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
        return f.readline()[1:].decode("utf-8").strip().split(None, 1)[0]


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
        with open_text_or_gzip(path) as f:
            compressed = isinstance(f, gzip.GzipFile)
        if compressed:
            source = Path(scratch_dir) / (path.name.removesuffix(".gz") + ".plain")
            source.parent.mkdir(parents=True, exist_ok=True)
            try:
                with gzip.open(path, "rb") as src, open(source, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (OSError, EOFError) as e:
                raise SequenceError(f"{path}: damaged or truncated gzip file ({e})") from None
        # Int64 columns appended in chunks to unlinked scratch files and mapped back read-only: the
        # driver's heap does not grow with the input (the OS pages the columns in and out). The id
        # hashes for the duplicate check are one more such column, sorted in buckets at the end.
        offsets, lengths, ordinals, hashes = (_Column(scratch_dir) for _ in range(4))
        empty: list[str] = []
        try:
            for rid, seq, ordinal, offset in _scan(source, kind):
                if not seq:
                    empty.append(rid)
                    continue
                hashes.append(hash(rid))
                offsets.append(offset)
                lengths.append(len(seq))
                ordinals.append(ordinal)
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
        return cls(source, kind, offsets_a, lengths_a, ordinals_a, empty, duplicates)

    def read(self, positions: np.ndarray) -> list[Record]:
        """Read the records at the given index positions (in that order) back from disk."""
        order = np.argsort(self.offsets[positions], kind="stable")  # sequential disk access
        out: list[Record | None] = [None] * len(positions)
        with open(self.path, "rb") as f:
            for j in order:
                i = int(positions[j])
                f.seek(int(self.offsets[i]))
                header = f.readline()
                parts = []
                for line in f:
                    if line.startswith(b">"):
                        break
                    parts.append(line.strip())
                seq = normalise(b"".join(parts), self.kind, "", self.path)
                rid = header[1:].decode("utf-8").strip().split(None, 1)[0]
                out[j] = Record(rid, seq.decode("ascii"), int(self.ordinals[i]))
        return out  # type: ignore[return-value]
