"""What a model may be given: the letters of proteins and DNA, how they are normalised, and the one-line
error that names a record and its first bad character.

Validation rules (documented in docs/embedding.md, "Input rules"):
  * protein: letters are upper-cased; `J` (not in ESM-2's vocabulary, fair-esm fails on it) is read
    as `X`, the unknown residue; `B`, `Z`, `U`, `O`, `X` are ESM-2 tokens; one trailing `*` (a stop codon
    written by translators) is removed; any other character (digits, `-`, `.`, an internal `*`,
    punctuation) is an error naming record and character.
  * DNA: letters are upper-cased; `U` is read as `T`; IUPAC ambiguity codes (N, R, Y, ...) are kept
    and become `[UNK]` tokens in DNABERT-S, as upstream VirNucPro feeds them; anything else is an error.

Contigs given to `preprocess` / `predict` (`check_contig`, docs/predict.md "Letters") follow upstream
VirNucPro, which reads any letter: lowercase is upper-cased, codons with a letter other than A/C/G/T
(IUPAC codes, `U`, `X`, `-`, `*`, ...) translate to nothing, and the chunk is still embedded. Only
what no nucleotide FASTA holds is refused: a byte other than a letter, `-`, `.` or `*` (digits,
punctuation, non-ASCII), and a record whose letters look like a protein.

Reading files is `virnucpro.io.fasta`'s, which applies these rules record by record.
"""

from __future__ import annotations

from pathlib import Path

from virnucpro.errors import SequenceError


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


class RecordError(SequenceError):
    """A record's error whose message names the record by number. A range of the input indexed on its own
    (`virnucpro.io.index.index_range`) counts its records from 0; `rebased(first)` gives the message with
    the number in the whole input, once the records before the range are counted."""

    _MARK = "\x00record\x00"  # where the number goes in `template`

    def __init__(self, template: str, ordinal: int, first: int = 0):
        super().__init__(template.replace(self._MARK, str(first + ordinal + 1)))
        self.template, self.ordinal = template, ordinal

    def rebased(self, first: int) -> "RecordError":
        return RecordError(self.template, self.ordinal, first)

    def __reduce__(self):  # raised in a Ray task, unpickled in the driver
        return RecordError, (self.template, self.ordinal)


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


