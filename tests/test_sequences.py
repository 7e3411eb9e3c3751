"""FASTA input: streaming, gzip, validation with one-line errors, the offset index."""

from __future__ import annotations

import gzip
import re
import logging

import numpy as np
import pytest

from tests.conftest import random_dna, random_proteins, write_fasta
from virnucpro.sequences import DNA, PROTEIN, FastaIndex, SequenceError, iter_fasta, normalise


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
