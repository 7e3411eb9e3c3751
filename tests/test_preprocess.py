"""virnucpro.pipeline.preprocess against a slow, literal transcription of upstream VirNucPro's rules.

The reference below follows upstream's prediction path step by step (REFERENCE.md section 1):
chunk records with Bio.SeqIO, write them, read them back, upper-case, translate one codon at a
time with Bio's standard table (a codon with any other letter contributes nothing), keep stop-free
frames with upstream's nucleotide slice, write one line per sequence. The code under test must
produce the same sequences and the same bytes.
"""

from __future__ import annotations

import gzip
import io
import math
import random
from pathlib import Path

import pytest
from Bio import SeqIO
from Bio.Data import CodonTable
from Bio.Seq import Seq
from Bio.SeqRecord import SeqRecord

from virnucpro.io import fasta
from virnucpro.pipeline import ids
from virnucpro.pipeline import preprocess as pp
from virnucpro.io.fasta import iter_records

# -----------------------------------------------------------------------------
# reference transcription (deliberately naive)

_STANDARD = CodonTable.unambiguous_dna_by_id[1]
CODON_TO_AA = {**_STANDARD.forward_table, **{c: "*" for c in _STANDARD.stop_codons}}
PAIR = {"A": "T", "C": "G", "G": "C", "T": "A", "a": "t", "c": "g", "g": "c", "t": "a"}


def ref_chunks(record_id: str, seq: str, size: int) -> list[tuple[str, str]]:
    """Upstream split_fasta_chunk: the overlap is divided by n, not n - 1."""
    length = len(seq)
    n = math.ceil(length / size)
    overlap = n * size - length
    low = int(overlap / n)
    n_high = overlap - low * (n - 1)  # how many steps of low + 1 upstream lists (may exceed n - 1)
    steps = [low + 1] * n_high + [low] * max(0, n - 1 - n_high) + [0]
    out, moved = [], 0
    for k in range(n):
        start = k * size - moved if k * size > 1 else k * size
        out.append((f"{record_id}_chunk_{k + 1}", seq[start:start + size]))
        moved += steps[k]
    return out


def ref_revcomp(seq: str) -> str:
    """Complement A/C/G/T in either case, leave every other letter, reverse."""
    return seq.translate(str.maketrans(PAIR))[::-1]


def ref_translate(seq: str, frame: int) -> str:
    """One dict lookup per codon i, i+3 <= len(seq); unknown codons contribute nothing."""
    return "".join(CODON_TO_AA.get(seq[i:i + 3], "") for i in range(frame, len(seq) - 2, 3))


def ref_frames(chunk_id: str, chunk: str) -> list[tuple[str, str, str]]:
    """Upstream identify_seq (prediction) then the empty-protein filter: (id, dna, protein)."""
    seq = chunk.upper()
    out = []
    for strand, s in (("F", seq), ("R", ref_revcomp(seq))):
        for f in (1, 2, 3):
            protein = ref_translate(s, f - 1)
            if "*" in protein or protein == "":
                continue
            out.append((f"{chunk_id}{strand}{f}", as_dnabert_input(s[f - 1:f + 3 * len(protein)]), protein))
    return out


def as_dnabert_input(dna: str) -> str:
    """The one planned difference from upstream's nucleotide file: a letter outside A/C/G/T and the
    IUPAC codes (X, U, -, *) is written N; DNABERT-S's tokenizer reads both as [UNK]."""
    return "".join(c if c in "ACGTNRYKMSWBDHV" else "N" for c in dna)


def ref_preprocess_files(fasta: Path, out: Path, size: int) -> None:
    """Upstream's file path: SeqIO-written chunks, re-read, frames one line per record."""
    out.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if fasta.suffix == ".gz" else open
    with opener(fasta, "rt") as src, open(out / "chunks.fasta", "w") as dst:
        for rec in SeqIO.parse(src, "fasta"):
            for cid, cseq in ref_chunks(rec.id, str(rec.seq), size):
                SeqIO.write(SeqRecord(Seq(cseq), id=cid, description=""), dst, "fasta")
    with open(out / "nucleotide.fasta", "w") as dna, open(out / "protein.faa", "w") as prot:
        for rec in SeqIO.parse(out / "chunks.fasta", "fasta"):
            for fid, d, p in ref_frames(rec.id, str(rec.seq)):
                dna.write(f">{fid}\n{d}\n")
                prot.write(f">{fid}\n{p}\n")


# -----------------------------------------------------------------------------
# generated contigs

SENSE = [c for c, aa in CODON_TO_AA.items() if aa != "*"]
AMBIGUOUS = "NRYKMSWBDHV"


def _orf(rng: random.Random, codons: int) -> str:
    return "".join(rng.choice(SENSE) for _ in range(codons))


def random_contig(rng: random.Random, length: int) -> str:
    """Random DNA with stop-free stretches on either strand, case changes and ambiguity codes."""
    parts, total = [], 0
    while total < length:
        r = rng.random()
        if r < 0.5:  # an ORF, reverse-complemented half the time
            piece = _orf(rng, rng.randint(20, 400))
            piece = ref_revcomp(piece) if rng.random() < 0.5 else piece
        else:
            piece = "".join(rng.choice("ACGT") for _ in range(rng.randint(1, 300)))
        parts.append(piece)
        total += len(piece)
    seq = list("".join(parts)[:length])
    if rng.random() < 0.3:  # a lower-case stretch
        a = rng.randrange(length)
        b = a + rng.randint(1, 600)
        seq[a:b] = [base.lower() for base in seq[a:b]]
    if rng.random() < 0.3:  # an N run
        a = rng.randrange(length)
        for i in range(a, min(length, a + rng.randint(1, 40))):
            seq[i] = "N"
    if rng.random() < 0.3:  # scattered ambiguity codes, some lower-case, rarely a non-IUPAC letter
        for _ in range(rng.randint(1, 8)):
            seq[rng.randrange(length)] = rng.choice(AMBIGUOUS + AMBIGUOUS.lower() + "X")
    return "".join(seq)


def contig_set(seed: int, size: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 5000) for _ in range(300)]
    lengths += [1, 2, 3, 4, 5, 6, 7, size - 1, size, size + 1, 2 * size - 1, 2 * size, 2 * size + 1,
                3 * size, 5 * size, 10 * size, 700, 1001, 4999, 5000]
    return [(f"ctg{i}", random_contig(rng, n)) for i, n in enumerate(lengths)]


SIZES = (300, 500)


# -----------------------------------------------------------------------------
# chunking

def test_worked_examples_from_reference():
    assert pp.chunk_bounds(700, 500) == [(0, 500), (349, 700)]
    assert [e - s for s, e in pp.chunk_bounds(1001, 500)] == [500, 500, 335]
    assert pp.chunk_bounds(1001, 500) == [(0, 500), (333, 833), (666, 1001)]
    seq = "".join(random.Random(0).choice("ACGT") for _ in range(700))
    assert pp.split_chunks("c", seq, 500) == [("c_chunk_1", seq[:500]), ("c_chunk_2", seq[349:])]


def test_short_record_is_one_renamed_chunk():
    assert pp.split_chunks("r", "acgN", 500) == [("r_chunk_1", "acgN")]
    assert pp.split_chunks("r", "A" * 500, 500) == [("r_chunk_1", "A" * 500)]
    assert pp.split_chunks("r", "", 500) == []  # upstream divides by zero here


@pytest.mark.parametrize("size", SIZES)
def test_compat_chunks_match_reference_for_every_length(size):
    for length in range(1, 12 * size + 2):
        seq = "ACGT" * (length // 4) + "ACG"[:length % 4]
        assert pp.split_chunks("x", seq, size) == ref_chunks("x", seq, size), length


def test_compat_last_chunk_short_only_when_upstream_overshoots():
    # upstream's chunks always end at L; the last is shorter than size when the overlap is large
    for length in range(501, 6000):
        bounds = pp.chunk_bounds(length, 500)
        assert bounds[0][0] == 0 and bounds[-1][1] == length
        assert all(e - s == 500 for s, e in bounds[:-1])
        assert all(b[0] <= a[1] for a, b in zip(bounds, bounds[1:]))  # no gap between chunks


def test_even_mode_properties():
    for size in (1, 2, 3, 300, 500):
        for length in list(range(1, 3 * size + 3)) + [7001, 10_000, 12_345]:
            bounds = pp.chunk_bounds(length, size, "even")
            n = math.ceil(length / size)
            assert len(bounds) == n
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            if length < size:
                assert bounds == [(0, length)]
                continue
            assert all(e - s == size for s, e in bounds)
            overlaps = [a[1] - b[0] for a, b in zip(bounds, bounds[1:])]
            assert all(o >= 0 for o in overlaps)
            assert not overlaps or max(overlaps) - min(overlaps) <= 1
    assert pp.chunk_bounds(700, 500, "even") == [(0, 500), (200, 700)]
    assert pp.split_chunks("c", "A" * 1001, 500, "even")[2] == ("c_chunk_3", "A" * 500)


def test_bad_arguments():
    with pytest.raises(ValueError):
        pp.chunk_bounds(10, 500, "bogus")
    with pytest.raises(ValueError):
        pp.chunk_bounds(10, 0)


# -----------------------------------------------------------------------------
# chunk and frame ids

def test_ids_are_built_and_read_back():
    assert ids.chunk_id("c1", 3) == "c1_chunk_3"
    assert ids.frame_id("c1_chunk_3", "R2") == "c1_chunk_3R2"
    assert ids.FRAME_NAMES == ("F1", "F2", "F3", "R1", "R2", "R3")
    # contig ids are data: '_chunk_' inside them, punctuation and non-ASCII letters survive the round trip
    for contig in ("c1", "a_chunk_2", "x|y/z", "caf\u00e9", "_chunk_", ""):
        for k in (1, 12):
            chunk = ids.chunk_id(contig, k)
            assert ids.contig_of(chunk) == contig
            for name in ids.FRAME_NAMES:
                assert ids.chunk_of(ids.frame_id(chunk, name)) == chunk


def test_preprocessing_names_chunks_and_frames_with_ids():
    seq = "ATGAAACCCGGGTTTAAA" * 40
    frames = list(pp.iter_frames([("a_chunk_b", seq)], 300))
    assert frames and all(f.chunk_id == ids.chunk_of(f.id) and f.contig_id == ids.contig_of(f.chunk_id)
                          for f in frames)
    assert {f.id[-2:] for f in frames} <= set(ids.FRAME_NAMES)


# -----------------------------------------------------------------------------
# translation and frame selection

def test_translation_of_every_codon():
    letters = "ACGTNRYacgtn"
    triplets = [a + b + c for a in letters for b in letters for c in letters]
    seq = "".join(triplets)
    got = pp.translate_six_frames(seq)
    up = seq.upper()
    want = [ref_translate(up, f) for f in range(3)] + [ref_translate(ref_revcomp(up), f) for f in range(3)]
    assert got == want
    assert pp.translate_six_frames("ATGNNNtaaGG")[0] == "M*"  # N codon dropped, not X


def test_reverse_complement_leaves_ambiguity_codes():
    # upstream complements A/C/G/T only; Bio would turn R into Y
    assert pp.reverse_complement("AACGTRN") == "NRACGTT"


def test_frame_slice_quirks():
    # forward frame 1 of a 12-base stop-free chunk: slice [0:1+3*4] is clipped by the chunk end
    (f1,) = [f for f in pp.select_frames("c_chunk_1", "ATGAAACCCGGG", "c") if f.id.endswith("F1")]
    assert (f1.dna, f1.protein) == ("ATGAAACCCGGG", "MKPG")
    # 13 bases: the slice takes one base past the last codon
    (f1,) = [f for f in pp.select_frames("c_chunk_1", "ATGAAACCCGGGT", "c") if f.id.endswith("F1")]
    assert f1.dna == "ATGAAACCCGGGT"
    # a dropped codon shortens the slice by three bases, from the end
    (f1,) = [f for f in pp.select_frames("c_chunk_1", "atgNAACCCGGGTT", "c") if f.id.endswith("F1")]
    assert (f1.dna, f1.protein) == ("ATGNAACCCG", "MPG")


@pytest.mark.parametrize("size", SIZES)
def test_frames_match_reference(size):
    records = contig_set(seed=size, size=size)
    want = [(fid, d, p) for rid, seq in records
            for cid, chunk in ref_chunks(rid, seq, size) for fid, d, p in ref_frames(cid, chunk)]
    frames = list(pp.iter_frames(records, size))
    assert [(f.id, f.dna, f.protein) for f in frames] == want
    # the generated set exercises what it should
    assert any(f.id[-2] == "R" for f in frames) and any(f.id[-2] == "F" for f in frames)
    assert any(len(f.dna) < 3 * len(f.protein) + 1 for f in frames)  # clipped by the chunk end
    assert any(len(f.dna) == 3 * len(f.protein) + 1 for f in frames)  # one base past the codons
    assert any("N" in f.dna for f in frames)  # dropped codons
    for f in frames:
        assert f.chunk_id == f.id[:-2] and f.id.startswith(f.contig_id + "_chunk_")
    # chunk by chunk through select_frames agrees too
    for rid, seq in records[:30]:
        for cid, chunk in pp.split_chunks(rid, seq, size):
            got = [(f.id, f.dna, f.protein) for f in pp.select_frames(cid, chunk, rid)]
            assert got == ref_frames(cid, chunk)


def test_even_mode_frames_match_reference_on_even_chunks():
    records = contig_set(seed=1, size=500)[:80]
    want = [(fid, d, p) for rid, seq in records
            for cid, chunk in pp.split_chunks(rid, seq, 500, "even") for fid, d, p in ref_frames(cid, chunk)]
    assert [(f.id, f.dna, f.protein) for f in pp.iter_frames(records, 500, "even")] == want


def test_non_ascii_sequence_is_an_error():
    with pytest.raises(ValueError, match="non-ASCII"):
        list(pp.iter_frames([("bad", "ACGTé")], 500))


# -----------------------------------------------------------------------------
# files

def _write_fasta(path: Path, records: list[tuple[str, str]], rng: random.Random) -> None:
    lines = []
    for i, (rid, seq) in enumerate(records):
        lines.append(f">{rid} some description {i}" if i % 2 else f">{rid}")
        width = rng.choice([60, 70, 80, 1000])
        lines += [seq[j:j + width] for j in range(0, len(seq), width)]
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


@pytest.mark.parametrize("size,name,workers", [(500, "in.fasta", None), (300, "in.fa.gz", None),
                                               (300, "in.fasta", 2)])
def test_preprocess_fasta_matches_reference_files(tmp_path, monkeypatch, size, name, workers):
    rng = random.Random(7)
    records = contig_set(seed=11, size=size)[:60]
    fasta = tmp_path / name
    _write_fasta(fasta, records, rng)
    ref_preprocess_files(fasta, tmp_path / "ref", size)
    monkeypatch.setattr(pp, "_BATCH_BASES", 20_000)  # several batches (through the pool if any)
    result = pp.preprocess_fasta(fasta, tmp_path / "ours", size, workers=workers)
    for fname in ("chunks.fasta", "nucleotide.fasta", "protein.faa"):
        assert (tmp_path / "ours" / fname).read_bytes() == (tmp_path / "ref" / fname).read_bytes(), fname
    n_chunks = sum(1 for _ in SeqIO.parse(tmp_path / "ref" / "chunks.fasta", "fasta"))
    n_frames = sum(1 for _ in SeqIO.parse(tmp_path / "ref" / "protein.faa", "fasta"))
    assert (result.contigs, result.chunks, result.frames) == (len(records), n_chunks, n_frames)
    assert result.protein_path == tmp_path / "ours" / "protein.faa"


FASTA_TEXTS = [
    ">a desc\nAC GT\nacgt\t\r\n\n>b\n>c  x\nNNNN\n>\nAC\n",
    ">x\r\nACGT\r\nAC>GT\r\n>y d\r\n\r\nTT\r\n",  # CRLF; a '>' inside a line is sequence
    ">only header",  # no newline at the end
    ">h1\nAAAA\n>h2 \u00e9t\u00e9 caf\u00e9\nCCCC\nGG",  # UTF-8 header, no final newline
    "\n\n>after blank lines\nACGT\n",
]


@pytest.mark.parametrize("text", FASTA_TEXTS)
def test_iter_records_parses_like_biopython(tmp_path, text):
    path = tmp_path / "x.fasta"
    path.write_text(text, encoding="utf-8")
    # Bio 1.88 refuses leading blank lines, which we skip; CRLF read in text mode as Bio would
    bio_input = io.StringIO(text.lstrip("\n"), newline=None)
    want = [(r.id, str(r.seq)) for r in SeqIO.parse(bio_input, "fasta")]
    for block_size in (1, 2, 3, 5, 7, 64, 1 << 20):  # records, headers and lines cut anywhere
        assert list(iter_records(path, block_size=block_size)) == want, block_size


def test_iter_records_random_files_any_block_size(tmp_path):
    rng = random.Random(3)
    records = contig_set(seed=5, size=300)[:40] + [("empty", ""), ("gt", "AC>GT")]
    path = tmp_path / "x.fasta"
    _write_fasta(path, records, rng)
    for block_size in (1, 13, 61, 4096):
        assert list(iter_records(path, block_size=block_size)) == records


@pytest.mark.parametrize("text", FASTA_TEXTS)
def test_scanner_events_and_id_listing_for_any_block_size(tmp_path, text):
    """virnucpro.io.fasta.scan: one header event per line starting with '>', at that line's offset, and the
    text between headers, however the blocks cut it; fasta_ids lists the same ids as iter_records."""
    path = tmp_path / "x.fasta.gz"
    with gzip.open(path, "wb") as f:
        f.write(text.encode())
    data = text.encode()
    starts = [i for i in range(len(data)) if data[i:i + 1] == b">" and (i == 0 or data[i - 1:i] == b"\n")]
    for block_size in (1, 2, 3, 7, 1 << 20):
        with fasta.open_fasta(path) as f:
            events = list(fasta.scan(f, block_size))
        assert [o for o, h, _ in events if h is not None] == starts, block_size
        assert b"".join((b">" + h + b"\n" if h is not None else b"") + t for _, h, t in events).rstrip(b"\n") \
            == data.rstrip(b"\n")
    assert list(fasta.fasta_ids(path)) == [rid for rid, _ in iter_records(path)]


def test_iter_records_rejects_bad_input(tmp_path):
    path = tmp_path / "x.fasta"
    path.write_text("junk before\n>a\nACGT\n")
    with pytest.raises(ValueError, match="before the first FASTA header"):
        list(iter_records(path))
    path.write_text(">a\nACGT\u00e9\n", encoding="utf-8")
    with pytest.raises(ValueError, match="non-ASCII"):
        list(iter_records(path))


def test_empty_records_are_counted_but_yield_nothing(tmp_path):
    path = tmp_path / "x.fasta"
    path.write_text(">empty\n>one\nATGAAACCC\n")
    result = pp.preprocess_fasta(path, tmp_path / "out", 500)
    assert (result.contigs, result.chunks, result.frames) == (2, 1, 5)  # F1 F3 R1 R2 R3
    assert result.chunks_path.read_text() == ">one_chunk_1\nATGAAACCC\n"


# -----------------------------------------------------------------------------
# any chunk size, real-data letters, duplicate ids

@pytest.mark.parametrize("size", [1, 2, 7, 137, 1000])
def test_any_chunk_size_matches_reference(size):
    records = contig_set(seed=size, size=max(size, 2))[:15] + [("edge", "ACGTAC" * size)]
    want = [(fid, d, p) for rid, seq in records
            for cid, chunk in ref_chunks(rid, seq, size) for fid, d, p in ref_frames(cid, chunk)]
    assert [(f.id, f.dna, f.protein) for f in pp.iter_frames(records, size)] == want


ODD = [("masked", "atgaaacccgggtttXXXXXXaaacccgggtttaaa"), ("gapped", "ATGAAA---CCCGGG..TTTAAA*CCC"),
       ("rna", "AUGAAACCCGGGUUUAAACCC"), ("plain", "ATGAAACCCGGGTTTAAACCCGGG")]


def test_odd_letters_go_through_as_upstream_and_are_counted(tmp_path):
    from virnucpro.io.alphabet import DNA, normalise

    fasta = tmp_path / "odd.fasta"
    fasta.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in ODD))
    res = pp.preprocess_fasta(fasta, tmp_path / "out", 20)
    want = [(fid, d, p) for rid, seq in ODD for cid, chunk in ref_chunks(rid, seq, 20) for fid, d, p in ref_frames(cid, chunk)]
    dna = list(iter_records(tmp_path / "out" / "nucleotide.fasta"))
    assert [(i, d) for i, d in dna] == [(i, d) for i, d, _ in want]
    assert [p for _, p in iter_records(tmp_path / "out" / "protein.faa")] == [p for _, _, p in want]
    for rid, d in dna:  # what DNABERT-S's input check accepts, unchanged
        assert normalise(d.encode(), DNA, rid).decode() == d
    chunks = [(cid, c) for rid, seq in ODD for cid, c in ref_chunks(rid, seq, 20)]
    assert res.odd.chunks == sum(any(ch not in "ACGTNRYKMSWBDHV" for ch in c.upper()) for _, c in chunks) == 6
    assert res.odd.letters == {"*": 1, "-": 3, ".": 2, "U": 4, "X": 6}
    assert "6 chunks hold letters read as N" in res.summary()
    # chunks.fasta keeps the input as given (case, letters)
    assert [c for _, c in iter_records(tmp_path / "out" / "chunks.fasta")] == [c for _, c in chunks]


@pytest.mark.parametrize("text,match", [
    (">ok\nACGT\n>prot x\nMKVLAAGIEFPQLLSTWR\n", r"in\.fasta: record 2 \('prot'\): looks like a protein"),
    (">ok\nACGT\n>ok2\nACGT\n>num\nACGT12ACGT\n", r"in\.fasta: record 3 \('num'\): character '1' at position 5"),
    (">a\nACGT\n>b\nACGT\n>a\nACGTT\n>b\nA\n>c\nAC\n",
     r"in\.fasta: contig id 'a' is used by records 1 and 3 \(and 1 more id\(s\) by several records\); .*unique"),
])
@pytest.mark.parametrize("workers", [None, 2])
def test_refused_input_names_file_and_record_and_leaves_nothing(tmp_path, monkeypatch, text, match, workers):
    monkeypatch.setattr(pp, "_BATCH_BASES", 8)  # the bad record is in a later batch
    fasta = tmp_path / "in.fasta"
    fasta.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        pp.preprocess_fasta(fasta, tmp_path / "out", 3, workers=workers)
    assert "\n" not in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_stray_protein_letter_or_x_run_is_not_a_protein(tmp_path):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\n" + "ACGT" * 30 + "E\n>b\n" + "X" * 500 + "ACGT\n>c\nNNNNNN\n")
    assert pp.preprocess_fasta(fasta, tmp_path / "out", 100).contigs == 3
