"""`predict` on input as users have it: letters outside ACGT (masking, gaps, stops, RNA), lowercase,
any chunk size, duplicate ids, a protein FASTA given as contigs; and the per-stage timings.

Upstream VirNucPro finishes on every contig set made of letters, `-`, `.` and `*` (codons with another
letter than A/C/G/T translate to nothing; the chunk is still embedded): so must predict, counting
the chunks concerned. What it refuses, it refuses before any embedding, in one line naming the
input file and the record. One CPU predict run with tiny models (a few seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.cli import create_parser, main
from cluster.pipeline import PredictError, predict
from virnucpro.pipeline.classifier import MLPClassifier
from virnucpro.io.fasta import fasta_ids, iter_records
from virnucpro.options import OptionError, PredictOptions
from virnucpro.pipeline.classify import STAGE_TIMES
from virnucpro.pipeline.preprocess import chunk_bounds

pytestmark = pytest.mark.slow

DNA_DIM, ESM_DIM = 48, 64  # conftest's dnabert_tiny and esm_tiny
SIZE = 137  # neither of upstream's sizes
ORF = "ATGGCTAAACGTCTGGAAGTTCCGCGTATCGGTAAAGACTGGCTGGAACAGTTCCGTAAAGCGCTGGAAGGT" * 6
CONTIGS = [  # (id, sequence): every kind of letter upstream reads
    ("soft_masked", ORF[:150].lower() + ORF[150:]),
    ("x_masked_and_gapped", ORF[:100] + "XXXXXXXXXX" + ORF[110:200] + "---" + ORF[203:300] + "*" + ORF[301:]),
    ("rna", ORF.replace("T", "U")[:250]),
    ("iupac", ORF[:60] + "NNNNRYKMSWBDHV" + ORF[74:280] + ".." + ORF[282:]),
]
IUPAC = set("ACGTNRYKMSWBDHV")


def _fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{rid} a description\n{seq}\n" for rid, seq in records))
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A state dict of the MLP, named as upstream names its models (`<chunk size>_model.pth`)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("classifier") / f"{SIZE}_model.pth"
    torch.save(MLPClassifier(DNA_DIM + ESM_DIM, 32, 2).eval().state_dict(), path)
    return path


def _predict(fasta: Path, out: Path, classifier: Path, esm: Path, dnabert: Path, **kw):
    return predict(fasta, out, classifier, esm, dnabert, chunk_size=SIZE, device="cpu", toks_per_batch=2048,
                   progress=False, plots=False, **kw)


def test_duplicate_ids_refused_then_odd_letters_finish_counted_and_timed(
        tmp_path, local_ray, classifier, esm_tiny, dnabert_tiny):
    out = tmp_path / "out"
    # four contigs, two of them sharing an id: refused before any work, in the input's terms
    dup = _fasta(tmp_path / "dup.fasta", CONTIGS[:3] + [("soft_masked", CONTIGS[3][1])])
    with pytest.raises(PredictError) as e:
        _predict(dup, out, classifier, esm_tiny, dnabert_tiny)
    msg = str(e.value)
    assert "\n" not in msg and str(dup) in msg
    assert "contig id 'soft_masked' is used by records 1 and 4" in msg
    assert list(out.iterdir()) == []  # nothing to --overwrite: the fixed input runs into the same OUT_DIR

    fasta = _fasta(tmp_path / "odd.fasta", CONTIGS)
    result = _predict(fasta, out, classifier, esm_tiny, dnabert_tiny)
    # every contig gets its verdict, and its chunks are upstream's
    rows = [line.split("\t") for line in (out / "contig_predictions.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == [rid for rid, _ in CONTIGS]
    assert [int(r[1]) for r in rows] == [len(chunk_bounds(len(s), SIZE)) for _, s in CONTIGS]
    assert result.contigs == 4 and result.frames == len(list(fasta_ids(out / "protein.faa"))) > 0
    # DNABERT-S got only A/C/G/T and IUPAC codes (the other letters as N: [UNK] either way)
    assert all(set(seq) <= IUPAC for _, seq in iter_records(out / "nucleotide.fasta"))
    assert any("N" in seq for rid, seq in iter_records(out / "nucleotide.fasta") if rid.startswith("rna_"))
    # the chunks with such letters are counted, in _predict.json and the summary line
    want = sum(any(c not in IUPAC for c in s[a:b].upper()) for _, s in CONTIGS for a, b in chunk_bounds(len(s), SIZE))
    marker = json.loads((out / "_predict.json").read_text())
    assert marker["chunks_with_nonstandard_letters"] == result.chunks_with_nonstandard_letters == want > 0
    assert marker["nonstandard_letters"] == {"*": 1, "-": 3, ".": 2, "U": ORF[:250].count("T"), "X": 10}
    assert f"{want} chunks with letters outside ACGT/IUPAC" in result.summary()
    # per-stage wall times, in pipeline order, in the summary line and _predict.json
    seconds = marker["seconds"]
    assert list(seconds) == list(STAGE_TIMES) + ["total"] == list(result.stage_seconds) + ["total"]
    assert all(v >= 0 for v in seconds.values())
    assert seconds["embed"] <= seconds["total"] and seconds["esm2"] <= seconds["embed"] + 0.01
    assert sum(seconds[k] for k in ("preprocess", "embed", "classify", "write")) <= seconds["total"] + 0.01
    assert "seconds: preprocess " in result.summary() and ", esm2 " in result.summary()

    # resumed with nothing to do: the marker says what this run did
    again = _predict(fasta, out, classifier, esm_tiny, dnabert_tiny, resume=True)
    assert again.stages["classify"] == "reused" and set(again.stage_seconds) == {"write"}
    marker = json.loads((out / "_predict.json").read_text())
    assert set(marker["seconds"]) == {"write", "total"} and marker["chunks_with_nonstandard_letters"] == want


@pytest.mark.parametrize("records,match", [
    ([("c1", ORF), ("p1", "MAKRLEVPRIGKDWLEQFRKALEG" * 3)], r"record 2 \('p1'\): looks like a protein"),
    ([("c1", ORF), ("c2", ORF[:50] + "12" + ORF[52:])], r"record 2 \('c2'\): character '1' at position 51"),
    ([("c1", ORF), ("c2", ORF[:50] + "\u00e9")], r"record 'c2': sequence has a non-ASCII byte"),
])
def test_refused_before_any_embedding_naming_file_and_record(tmp_path, classifier, esm_tiny, dnabert_tiny,
                                                              records, match):
    fasta = _fasta(tmp_path / "in.fasta", records)
    out = tmp_path / "out"
    with pytest.raises(PredictError, match=match) as e:
        _predict(fasta, out, classifier, esm_tiny, dnabert_tiny)  # no Ray here: it never gets that far
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{fasta}: ")
    assert list(out.iterdir()) == []


def test_cli_preprocess_refuses_duplicates_in_one_line_and_counts_odd_letters(tmp_path, capsys):
    dup = _fasta(tmp_path / "dup.fasta", CONTIGS + [("rna", "ACGT")])
    assert main(["preprocess", str(dup), "-o", str(tmp_path / "a"), "--chunk-size", str(SIZE)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"{dup}: contig id 'rna' is used by records 3 and 5; results are "
                                             f"reported per id, so ids must be unique (make them so, e.g. with "
                                             f"`seqkit rename`, which numbers repeats)")
    ok = _fasta(tmp_path / "ok.fasta", CONTIGS)
    assert main(["preprocess", str(ok), "-o", str(tmp_path / "b"), "--chunk-size", "1000"]) == 0
    out = capsys.readouterr().out
    assert "4 records -> 4 chunks" in out and "3 chunks hold letters read as N" in out  # not the lowercase one


def test_any_positive_chunk_size_is_an_option():
    assert PredictOptions(chunk_size=SIZE).chunk_size == SIZE
    assert PredictOptions(chunk_size=1).chunk_size == 1
    with pytest.raises(OptionError, match="--chunk-size 0: must be at least 1"):
        PredictOptions(chunk_size=0)
    for verb in ("preprocess", "predict"):
        args = create_parser().parse_args([verb, "in.fa", "-o", "out", "--chunk-size", "2000"]
                                          + (["--classifier", "m.pth"] if verb == "predict" else []))
        assert args.chunk_size == 2000
