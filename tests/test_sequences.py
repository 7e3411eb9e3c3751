"""FASTA input: streaming, gzip, validation with one-line errors, the offset index."""

from __future__ import annotations

import gzip
import re
import logging

import numpy as np
import pytest

from tests.conftest import random_dna, random_proteins, write_fasta
from virnucpro.io.index import FastaIndex
from virnucpro.errors import SequenceError
from virnucpro.io.alphabet import DNA, PROTEIN, normalise
from virnucpro.io.fasta import iter_fasta


def test_iter_fasta_plain_and_gzip(tmp_path):
    seqs = random_proteins(20, 1, 300, seed=1)
    ids = write_fasta(tmp_path / "a.faa", seqs)
    with open(tmp_path / "a.faa", "rb") as f, gzip.open(tmp_path / "a.faa.gz", "wb") as g:
        g.write(f.read())
    for name in ("a.faa", "a.faa.gz"):
        records = list(iter_fasta(tmp_path / name, PROTEIN))
        assert [r.id for r in records] == ids and [r.sequence for r in records] == seqs
        assert [r.index for r in records] == list(range(20))


def test_index_reads_back_by_offset(tmp_path):
    seqs = random_dna(50, 1, 500, seed=2)
    ids = write_fasta(tmp_path / "d.fa", seqs)
    index = FastaIndex.build(tmp_path / "d.fa", DNA, tmp_path / "scratch")
    assert len(index) == 50 and index.lengths.tolist() == [len(s) for s in seqs]
    pick = np.array([49, 3, 17, 3])
    records = index.read(pick)
    assert [r.id for r in records] == [ids[i] for i in pick]
    assert [r.sequence for r in records] == [seqs[i] for i in pick]


def test_index_of_gzip_input(tmp_path):
    seqs = random_dna(10, 5, 50, seed=3)
    write_fasta(tmp_path / "d.fa", seqs)
    with open(tmp_path / "d.fa", "rb") as f, gzip.open(tmp_path / "d.fa.gz", "wb") as g:
        g.write(f.read())
    index = FastaIndex.build(tmp_path / "d.fa.gz", DNA, tmp_path / "scratch")
    assert [r.sequence for r in index.read(np.arange(10))] == seqs


def test_normalisation_rules():
    assert normalise(b"mkv*", PROTEIN, "r") == b"MKV"
    assert normalise(b"acgun", DNA, "r") == b"ACGTN"
    assert normalise(b"ACGTRYKMSWBDHVN", DNA, "r") == b"ACGTRYKMSWBDHVN"


@pytest.mark.parametrize("kind,seq,bad", [(PROTEIN, b"MK*V", "'*' at position 3"),
                                          (PROTEIN, b"MK1V", "'1' at position 3"),
                                          (DNA, b"ACGTX", "'X' at position 5"),
                                          (DNA, b"AC-GT", "'-' at position 3")])
def test_invalid_characters_name_record_and_position(kind, seq, bad):
    with pytest.raises(SequenceError, match=re.escape(f"in.fa: record 'rec7': character {bad}")):
        normalise(seq, kind, "rec7", "in.fa")


@pytest.mark.parametrize("content,match", [
    (b"", "empty file"),
    (b"@read1\nACGT\n+\nIIII\n", "FASTQ"),
    (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
    (b"ACGTACGT\n", "not a FASTA file"),
    (b">\nACGT\n", "empty header"),
])
def test_not_fasta_is_one_clear_error(tmp_path, content, match):
    path = tmp_path / "x.fa"
    path.write_bytes(content)
    with pytest.raises(SequenceError, match=match):
        FastaIndex.build(path, DNA, tmp_path)


def test_truncated_gzip(tmp_path):
    data = gzip.compress(b"".join(f">s{i}\n{'ACGT' * 100}\n".encode() for i in range(500)))
    (tmp_path / "t.fa.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SequenceError, match="truncated|ends unexpectedly"):
        FastaIndex.build(tmp_path / "t.fa.gz", DNA, tmp_path / "scratch")


def test_empty_records_skipped_and_duplicates_reported(tmp_path, caplog):
    (tmp_path / "x.fa").write_text(">a\nACGT\n>empty\n>a\nGG\n>b\nTT\n")
    with caplog.at_level(logging.WARNING):
        index = FastaIndex.build(tmp_path / "x.fa", DNA, tmp_path)
    assert len(index) == 3 and index.skipped_empty == ["empty"] and index.duplicate_ids == ["a"]
    assert index.ordinals.tolist() == [0, 2, 3]
    assert "skipped 1 empty record" in caplog.text and "duplicate record id" in caplog.text


def test_only_empty_records_is_an_error(tmp_path):
    (tmp_path / "x.fa").write_text(">a\n>b\n")
    with pytest.raises(SequenceError, match="no records with a sequence"):
        FastaIndex.build(tmp_path / "x.fa", DNA, tmp_path)


# --- the streaming scanner: any block size, whitespace, trailing '*', bounded memory -----------------

def _reference(text: bytes, kind: str) -> list[tuple[str, bytes]]:
    """Records as a line-based reader sees them: id = header up to whitespace, sequence = the lines
    with all whitespace removed, normalised (the rules of `normalise`)."""
    records, header, parts = [], None, []
    for line in text.split(b"\n"):
        if line.startswith(b">"):
            if header is not None:
                records.append((header, b"".join(parts)))
            header, parts = line[1:].decode().split(None, 1)[0], []
        elif header is not None:
            parts.append(line.translate(None, b" \t\r\n"))
    records.append((header, b"".join(parts)))
    return [(rid, normalise(seq, kind, rid) if seq else seq) for rid, seq in records]


def _messy_fasta(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = [b"\n\n"]  # blank lines before the first header are allowed
    for i in range(40):
        eol = b"\r\n" if rng.random() < 0.3 else b"\n"
        out.append(b">r%d%s desc %d%s" % (i, "é".encode() if i % 7 == 0 else b"", i, eol))
        n = int(rng.integers(0, 400))
        seq = rng.choice(np.frombuffer(b"ACDEFGHIKLMNPQRSTVWYacdxuj", np.uint8), n).tobytes()
        if i % 5 == 1 and n:
            seq += b"*"
        width = int(rng.integers(1, 90))
        for a in range(0, len(seq), width):
            out.append(seq[a:a + width] + (b" " if rng.random() < 0.1 else b"") + eol)
    return b"".join(out)


@pytest.mark.parametrize("block", [1, 5, 64, 1 << 20])
def test_scanner_matches_a_line_reader_for_any_block_size(tmp_path, monkeypatch, block):
    import virnucpro.io.fasta as s

    monkeypatch.setattr(s, "_BLOCK", block)
    text = _messy_fasta(block)
    (tmp_path / "m.faa").write_bytes(text)
    want = _reference(text, PROTEIN)
    got = [(r.id, r.sequence.encode()) for r in iter_fasta(tmp_path / "m.faa", PROTEIN)]
    assert got == want
    index = FastaIndex.build(tmp_path / "m.faa", PROTEIN, tmp_path / "scratch")
    nonempty = [(i, rid, seq) for i, (rid, seq) in enumerate(want) if seq]
    assert index.ordinals.tolist() == [i for i, _, _ in nonempty]
    assert index.lengths.tolist() == [len(seq) for _, _, seq in nonempty]
    records = index.read(np.arange(len(index)))
    assert [(r.id, r.sequence.encode()) for r in records] == [(rid, seq) for _, rid, seq in nonempty]
    capped = index.read(np.arange(len(index)), max_residues=17)
    assert [r.sequence.encode() for r in capped] == [seq[:17] for _, _, seq in nonempty]


@pytest.mark.parametrize("block", [2, 3, 4, 1 << 20])
@pytest.mark.parametrize("seq,position", [(b"MKV*\nL", 4), (b"MK\n*\n\nL", 3), (b"MKV**", 4), (b"MK*V*", 3),
                                          (b"MKV\n*\n*", 4), (b"MK V\n-", 4), (b"AB\x00C", None)])
def test_errors_at_block_boundaries_name_the_right_position(tmp_path, monkeypatch, block, seq, position):
    import virnucpro.io.fasta as s

    monkeypatch.setattr(s, "_BLOCK", block)
    (tmp_path / "e.faa").write_bytes(b">ok\nMKV*\n>bad x\n" + seq + b"\n>next\nM\n")
    match = "record 'bad' contains binary data" if position is None else f"record 'bad': character '.' at position {position} "
    with pytest.raises(SequenceError, match=match):
        FastaIndex.build(tmp_path / "e.faa", PROTEIN, tmp_path / "scratch")


def test_trailing_star_on_its_own_line_and_across_blocks(tmp_path, monkeypatch):
    import virnucpro.io.fasta as s

    monkeypatch.setattr(s, "_BLOCK", 3)
    (tmp_path / "t.faa").write_bytes(b">a\nMKV\n*\n\n>b\nMK*\n")
    assert [(r.id, r.sequence) for r in iter_fasta(tmp_path / "t.faa", PROTEIN)] == [("a", "MKV"), ("b", "MK")]


def test_header_too_long_and_headers_in_other_encodings(tmp_path, monkeypatch):
    import virnucpro.io.fasta as s

    monkeypatch.setattr(s, "MAX_HEADER", 100)
    (tmp_path / "h.fa").write_bytes(b">ok\nACGT\n>" + b"x" * 200 + b"\nACGT\n")
    with pytest.raises(SequenceError, match=r"h.fa: record 2 \(byte 9\): header line longer than 100 bytes"):
        FastaIndex.build(tmp_path / "h.fa", DNA, tmp_path)
    (tmp_path / "l.fa").write_bytes(">ok\nACGT\n>caf\xe9\nACGT\n".encode("latin-1"))
    with pytest.raises(SequenceError, match=r"l.fa: record 2 \(byte 9\): header is not valid UTF-8"):
        FastaIndex.build(tmp_path / "l.fa", DNA, tmp_path)


def test_a_long_line_is_scanned_in_bounded_memory(tmp_path):
    """An 8 MiB single-line record: the index pass and a capped read hold about one block, not the line
    (tests/test_bad_input.py runs a 400 MB line through `embed`)."""
    import tracemalloc

    size = 8 << 20
    with open(tmp_path / "long.fa", "wb") as f:
        f.write(b">long\n")
        block = (b"ACGTN" * (1 << 14))[: 1 << 16]
        for _ in range(size >> 16):
            f.write(block)
    tracemalloc.start()
    try:
        index = FastaIndex.build(tmp_path / "long.fa", DNA, tmp_path / "scratch")
        record = index.read(np.array([0]), max_residues=1000)[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert index.lengths.tolist() == [size] and len(record.sequence) == 1000
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB traced for an {size >> 20} MiB line"


# -----------------------------------------------------------------------------
# contigs for preprocess / predict

def test_contig_letters_upstream_reads_pass_and_become_dnabert_s_input():
    from virnucpro.io.alphabet import TO_DNA_INPUT, check_contig, plain_contigs

    odd = b"ACGTNRYKMSWBDHVUXEJ-.*" + b"ACGT" * 20 + bytes(b for b in range(65, 91) if chr(b) not in "EFIJLOPQZ")
    check_contig(odd, "in.fa", 0, "c")  # letters, gaps and stops: as upstream, they go through
    dna = odd.translate(TO_DNA_INPUT)
    assert normalise(dna, DNA, "c") == dna  # the DNABERT-S check takes them unchanged
    assert dna[:15] == b"ACGTNRYKMSWBDHV" and set(dna[15:22]) == {ord("N")} and dna[22:102] == b"ACGT" * 20
    assert plain_contigs(b"ACGTNNXX--**..") and not plain_contigs(b"ACGTE") and not plain_contigs(b"AC1")


@pytest.mark.parametrize("seq,match", [
    (b"ACGT1", r"^in\.fa: record 3 \('c'\): character '1' at position 5 is not a nucleotide letter$"),
    (b"ACG\xc3\xa9", r"record 3 \('c'\): character '\\\\xc3' at position 4"),
    (b"AC>GT", r"character '>' at position 3"),
    (b"MKVLAAGIEFPQLLSTWR", r"^in\.fa: record 3 \('c'\): looks like a protein, not a nucleotide sequence \(8 of 18"),
])
def test_contig_refusals_name_file_record_and_cause(seq, match):
    from virnucpro.io.alphabet import check_contig

    with pytest.raises(SequenceError, match=match):
        check_contig(seq, "in.fa", 2, "c")


def test_a_stray_protein_letter_or_x_masking_is_not_a_protein():
    from virnucpro.io.alphabet import check_contig

    check_contig(b"ACGT" * 30 + b"EL", "in.fa", 0, "c")
    check_contig(b"X" * 1000 + b"ACGT", "in.fa", 0, "c")


def test_dnabert_s_tokenizer_reads_n_as_it_reads_the_letters_upstream_feeds_it():
    """Upstream feeds X, -, *, U ... to DNABERT-S's tokenizer (BPE over A/C/G/T, whitespace
    pre-tokenizer); we feed N. Same tokens: each is [UNK], and no merge crosses an [UNK] or a
    pre-tokenizer split. Checked on a tokenizer of DNABERT-S's kind (virnucpro.models.tiny)."""
    import random

    from virnucpro.io.alphabet import TO_DNA_INPUT
    from virnucpro.models.tiny import build_dna_tokenizer

    tok = build_dna_tokenizer(vocab_size=200)
    rng = random.Random(0)
    for _ in range(200):
        seq = [rng.choice("ACGT") for _ in range(rng.randint(1, 120))]
        for _ in range(rng.randint(1, 6)):
            seq[rng.randrange(len(seq))] = rng.choice("XU-*.NRYEJ")
        upstream = "".join(seq)
        ours = upstream.encode().translate(TO_DNA_INPUT).decode()
        assert tok.encode(ours).ids == tok.encode(upstream).ids, upstream
    assert tok.encode("ACGT-ACGT").tokens.count("[UNK]") == 1
    # What the equality needs of the tokenizer, checked rather than assumed (this ACGT-only one meets it by
    # construction; DNABERT-S's must too): neither N nor a letter N stands in for is in the vocabulary,
    # alone or inside a learned token, so each reads as [UNK] and no merge holds one.
    stood_in_for = {c for c in "XU-*.NRYEJ" if TO_DNA_INPUT[ord(c)] == ord("N")}
    assert stood_in_for == set("XU-*.EJN")  # R and Y are IUPAC codes, which both feed as they are
    assert not _tokens_holding(tok, stood_in_for)
    # Negative control: a tokenizer of the same kind that knows N. The vocabulary check names its tokens
    # with N, and the equality the loop above asserts breaks on it: the loop can fail.
    knows_n = _dna_tokenizer_knowing_n()
    assert "N" in _tokens_holding(knows_n, stood_in_for)
    differ = 0
    for _ in range(50):
        seq = [rng.choice("ACGT") for _ in range(rng.randint(10, 120))]
        seq[rng.randrange(len(seq))] = rng.choice("XU-*.EJ")
        upstream = "".join(seq)
        differ += knows_n.encode(upstream.encode().translate(TO_DNA_INPUT).decode()).ids != knows_n.encode(upstream).ids
    assert differ == 50


def _tokens_holding(tok, letters: set[str]) -> list[str]:
    """The tokenizer's vocabulary entries that contain any of `letters` (specials such as [UNK] aside)."""
    return sorted(t for t in tok.get_vocab() if not t.startswith("[") and letters & set(t))


def _dna_tokenizer_knowing_n():
    """A BPE tokenizer shaped like DNABERT-S's (whitespace pre-tokenizer, specials 0-4) whose alphabet and
    merges include N: what the test above must tell apart from one that reads N as [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = np.random.default_rng(0)
    corpus = ["".join(rng.choice(list("ACGTN"), size=200, p=[0.24, 0.24, 0.24, 0.24, 0.04])) for _ in range(200)]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"],
        initial_alphabet=list("ACGTN"), show_progress=False))
    return tok
