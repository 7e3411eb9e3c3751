"""Hostile and malformed input through the real command line (`cluster.cli.main`, in process).

Two tables:
  * REFUSED: each case ends in exit code 1 and exactly one line `virnucpro: error: ...` naming the
    file (and the record, where there is one) and the cause; never a traceback, and nothing written
    but the output directory's own checks. All but one fail before Ray is needed.
  * HANDLED: input with a documented handling (docs/embedding.md, "Input rules"): the run succeeds, the handling is
    logged where docs/embedding.md says so, and the output rows show it.

More detail elsewhere: block boundaries, positions and trailing '*' (tests/test_sequences.py),
checkpoint loaders (tests/test_models.py), the classifier's unpickler (tests/test_classifier.py),
ids that look like paths (tests/test_security.py).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.cli import main
from tests.conftest import random_proteins
from virnucpro.io.output import LEGACY_MANIFEST, MANIFEST, Manifest, read_embeddings

pytestmark = pytest.mark.slow


@pytest.fixture()
def models(esm_tiny, dnabert_tiny) -> dict[str, Path]:
    return {"esm": esm_tiny, "dnabert": dnabert_tiny}


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _fasta(tmp: Path, data: bytes | str, name: str = "in.faa") -> list[str]:
    return [str(_write(tmp / name, data))]


def _ok_protein(tmp: Path) -> str:
    return str(_write(tmp / "ok.faa", ">p1\nMKVLAAGIV\n"))


# --- refused: one clear line, exit code 1 ----------------------------------------------------------

def _truncated_gzip(tmp: Path, models: dict) -> list[str]:
    data = gzip.compress(b"".join(b">s%d\n%s\n" % (i, b"MKVL" * 100) for i in range(500)))
    return [str(_write(tmp / "in.faa.gz", data[: len(data) // 2]))]


def _previous_run(tmp: Path, legacy: bool = False) -> None:
    """A finished run of another model in tmp/out; `legacy`: as the previous layout wrote it (JSON manifest)."""
    (tmp / "out").mkdir()
    run = {"model": "esm2_other", "family": "esm2", "dim": 64, "input": "/elsewhere/x.faa", "fingerprint": "0" * 16,
           "num_sequences": 3, "num_batches": 1, "parts": {}, "complete": True}
    if legacy:
        (tmp / "out" / LEGACY_MANIFEST).write_text(json.dumps({**run, "version": 1}))
    else:
        Manifest(**{k: v for k, v in run.items() if k != "parts"}).save(tmp / "out")


def _esm_wrong_shapes(tmp: Path, esm: Path) -> str:
    data = torch.load(esm, weights_only=False)
    data["model"]["encoder.sentence_encoder.layers.1.fc1.weight"] = torch.zeros(3, 3)
    torch.save(data, tmp / "esm2_bad.pt")
    return str(tmp / "esm2_bad.pt")


def _dnabert_wrong_shapes(tmp: Path, dnabert: Path) -> str:
    import shutil

    shutil.copytree(dnabert, tmp / "dnabert_bad")
    weights = tmp / "dnabert_bad" / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    key = next(k for k in state if k.endswith("Wqkv.weight"))
    state[key] = torch.zeros(2, 2)
    torch.save(state, weights)
    return str(tmp / "dnabert_bad")


def _wrong_family_dir(tmp: Path) -> str:
    (tmp / "gpt2").mkdir()
    (tmp / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    return str(tmp / "gpt2")


def _hf_esm_dir(tmp: Path) -> str:
    (tmp / "hf-esm").mkdir()
    (tmp / "hf-esm" / "config.json").write_text(json.dumps({  # ESM-1b's shape: absolute positions
        "model_type": "esm", "architectures": ["EsmModel"], "num_hidden_layers": 2, "hidden_size": 64,
        "num_attention_heads": 4, "intermediate_size": 256, "position_embedding_type": "absolute"}))
    return str(tmp / "hf-esm")


def _not_esm_pt(tmp: Path) -> str:
    torch.save({"model": {"bert.embeddings.word_embeddings.weight": torch.zeros(4, 4)}}, tmp / "other.pt")
    return str(tmp / "other.pt")


class _Evil:
    def __reduce__(self):
        import os
        return os.system, ("touch /tmp/virnucpro-bad-input-pwned",)


def _evil_pt(tmp: Path) -> str:
    torch.save({"model": {"embed_tokens.weight": torch.zeros(33, 8)}, "cfg": _Evil()}, tmp / "evil.pt")
    return str(tmp / "evil.pt")


# case id -> (make: tmp, models -> argv after "embed", expected error line (regex))
Make = Callable[[Path, dict], list[str]]
REFUSED: dict[str, tuple[Make, str]] = {
    # not FASTA
    "empty file": (lambda t, m: _fasta(t, b""), r"in.faa: empty file, no FASTA records"),
    "only blank lines": (lambda t, m: _fasta(t, b"\n\n  \n"), r"in.faa: no FASTA records"),
    "FASTQ": (lambda t, m: _fasta(t, "@read1\nACGT\n+\nIIII\n"), r"in.faa: looks like FASTQ"),
    "HTML": (lambda t, m: _fasta(t, "<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n"),
             r"in.faa: looks like an HTML or XML page, not FASTA"),
    "binary": (lambda t, m: _fasta(t, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))),
               r"in.faa: a binary file, not FASTA"),
    "binary after a header": (lambda t, m: _fasta(t, b">p1\nMKV\n>blob\n" + bytes(range(256)) * 4),
                              r"in.faa: record 'blob' contains binary data \(NUL bytes\)"),
    "plain text": (lambda t, m: _fasta(t, "MKVLAAGIV\n"), r"in.faa: not a FASTA file"),
    "truncated gzip": (_truncated_gzip, r"in.faa.gz: damaged or truncated gzip file"),
    "input missing": (lambda t, m: [str(t / "nope.faa")], r"nope.faa: no such file"),
    "input is a directory": (lambda t, m: [str(t)], r": is a directory, not a FASTA file"),
    # records
    "only empty records": (lambda t, m: _fasta(t, ">a\n>b\n\n"), r"in.faa: no records with a sequence"),
    "empty header": (lambda t, m: _fasta(t, ">p1\nMKV\n>\nMKV\n"),
                     r"in.faa: record 2 \(byte 8\): empty header \(no id after '>'\)"),
    "header not UTF-8": (lambda t, m: _fasta(t, ">p1\nMKV\n>caf\xe9\nMKV\n".encode("latin-1")),
                         r"in.faa: record 2 \(byte 8\): header is not valid UTF-8"),
    "'*' inside a protein": (lambda t, m: _fasta(t, ">p1\nMKV\n>p2 stop\nMK*VL\n"),
                             r"in.faa: record 'p2': character '\*' at position 3 is not a valid protein letter"),
    "digit in a protein": (lambda t, m: _fasta(t, ">p1\nMKV\nLL\n>p2\nMKV\nL1\n"),
                           r"in.faa: record 'p2': character '1' at position 5 is not a valid protein letter"),
    "gap '-' in a protein": (lambda t, m: _fasta(t, ">p1\nMK-V\n"),
                             r"in.faa: record 'p1': character '-' at position 3 is not a valid protein letter"),
    "non-ASCII in a sequence": (lambda t, m: _fasta(t, ">p1\nMKé\n"),
                                r"in.faa: record 'p1': character '\\\\xc3' at position 3 is not a valid protein"),
    "'>' inside a line": (lambda t, m: _fasta(t, ">p1\nMK>V\n"),
                          r"in.faa: record 'p1': character '>' at position 3"),
    "protein given to the DNA model": (
        lambda t, m: _fasta(t, ">p1\nMKVLE\n") + ["--model", str(m["dnabert"])],
        r"in.faa: record 'p1': character 'L' at position 4 is not a valid DNA letter"),
    "'-' in DNA": (lambda t, m: _fasta(t, ">c1\nACGT--ACGT\n", "in.fa") + ["--model", str(m["dnabert"])],
                   r"in.fa: record 'c1': character '-' at position 5 is not a valid DNA letter"),
    # output directory
    "output path under a file": (lambda t, m: [_ok_protein(t), "-o", str(_write(t / "afile", "x") / "out")],
                                 r"/afile/out: output directory is not writable"),
    "output on a read-only filesystem": (lambda t, m: [_ok_protein(t), "-o", "/sys/virnucpro-test-out"],
                                         r"/sys/virnucpro-test-out: output directory is not writable"),
    "output holds a previous run": (lambda t, m: [_ok_protein(t)] if _previous_run(t) is None else [],
                                    r"/out: holds the output of a previous run; use --resume to finish it or "
                                    r"--overwrite to replace it \(--resume needs the same model, input and "
                                    r"batching options\)"),
    "output holds a different run (--resume)": (
        lambda t, m: [_ok_protein(t), "--resume"] if _previous_run(t, legacy=True) is None else [],
        r"/out: holds a different run \(model, input or batching options differ: esm2_other on /elsewhere/x.faa\); "
        r"use --overwrite to replace it"),
    # models
    "model missing": (lambda t, m: [_ok_protein(t), "--model", str(t / "esm2_t33_650M_UR50D.pt")],
                      r"model '.*esm2_t33_650M_UR50D.pt': no such file or directory, and not a known checkpoint"),
    "model name not in the cache": (lambda t, m: [_ok_protein(t), "--model", "esm2_t48_15B_UR50D"],
                                    r"model 'esm2_t48_15B_UR50D': not in the torch hub cache .*nothing is downloaded"),
    "model of another family (dir)": (lambda t, m: [_ok_protein(t), "--model", _wrong_family_dir(t)],
                                      r"/gpt2: config.json describes a 'gpt2' model, not ESM-2 or DNABERT-S"),
    "Hugging Face ESM-1b directory": (lambda t, m: [_ok_protein(t), "--model", _hf_esm_dir(t)],
                                      r"/hf-esm/config.json: position_embedding_type 'absolute': ESM-2 has rotary"),
    "not an ESM-2 .pt": (lambda t, m: [_ok_protein(t), "--model", _not_esm_pt(t)],
                         r"/other.pt: not an ESM-2 checkpoint"),
    "weights file of another format": (lambda t, m: [_ok_protein(t), "--model", str(_write(t / "w.bin", b"\0" * 64))],
                                       r"/w.bin: expected a fair-esm .pt file or a model directory"),
    "garbage .pt": (lambda t, m: [_ok_protein(t), "--model", str(_write(t / "g.pt", b"not a checkpoint"))],
                    r"/g.pt: not a readable fair-esm checkpoint \(weights-only load refused it"),
    "pickle with code in a .pt": (lambda t, m: [_ok_protein(t), "--model", _evil_pt(t)],
                                  r"/evil.pt: not a readable fair-esm checkpoint \(weights-only load refused it: "
                                  r"Trying to load unsupported GLOBAL posix.system"),
    "ESM-2 checkpoint with wrong shapes": (
        lambda t, m: [_ok_protein(t), "--model", _esm_wrong_shapes(t, m["esm"])],
        r"/esm2_bad.pt: layers.1.fc1.weight has shape \(3, 3\), expected \(256, 64\)"),
    "DNABERT-S weights with wrong shapes": (
        lambda t, m: _fasta(t, ">c1\nACGT\n", "in.fa") + ["--model", _dnabert_wrong_shapes(t, m["dnabert"])],
        r"/dnabert_bad: encoder.layer.0.attention.self.Wqkv.weight has shape \(2, 2\), expected \(\d+, \d+\)"),
}


def _argv(tail: list[str], tmp: Path, model: Path) -> list[str]:
    argv = ["embed", *tail]
    if "-o" not in argv:
        argv += ["-o", str(tmp / "out")]
    if "--model" not in argv:
        argv += ["--model", str(model)]
    return argv + ["--device", "cpu", "--num-actors", "1", "--no-progress"]


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_one_clear_line(case, tmp_path, models, local_ray, capsys):
    make, pattern = REFUSED[case]
    argv = _argv(make(tmp_path, models), tmp_path, models["esm"])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # stderr: the error line, and nothing else but Ray's forwarded actor logs ("(Embedder pid=...)")
    lines = [ln for ln in err.splitlines() if ln.strip() and "pid=" not in ln]
    assert len(lines) == 1 and lines[0].startswith("virnucpro: error: "), err[-3000:]
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    out = tmp_path / "out"
    if out.is_dir() and case not in ("output holds a previous run", "output holds a different run (--resume)"):
        assert not list(out.glob("part-*")) and not (out / MANIFEST).exists()
    assert not Path("/tmp/virnucpro-bad-input-pwned").exists()


def test_previous_output_refused_before_ray_starts(tmp_path, models, monkeypatch, capsys):
    """A command that would only be refused says so before Ray starts (seconds), not after."""
    import cluster.cli

    class RayStarted(BaseException):  # not an Exception: the CLI's handler must not turn it into a message
        pass

    def session(*args, **kwargs):
        raise RayStarted("Ray started for a command that is refused")

    monkeypatch.setattr(cluster.cli, "RaySession", session)
    _previous_run(tmp_path)
    assert main(_argv([_ok_protein(tmp_path)], tmp_path, models["esm"])) == 1
    assert "out: holds the output of a previous run; use --resume" in capsys.readouterr().err
    # --overwrite replaces it: the command gets as far as starting Ray
    with pytest.raises(RayStarted, match="Ray started"):
        main(_argv([_ok_protein(tmp_path), "--overwrite"], tmp_path, models["esm"]))


# --- handled: documented, logged, visible in the rows -------------------------------------------------

def _rows(out: Path) -> dict[str, dict]:
    table = read_embeddings(out)
    rows = table.to_pylist()
    return {f"{r['id']}#{r['index']}": r for r in rows}


def _emb(rows: dict, key: str) -> np.ndarray:
    return np.asarray(rows[key]["embedding"], np.float32)


def _run(tmp: Path, model: Path, data: bytes | str, name: str = "in.faa", *extra: str) -> Path:
    path = _write(tmp / name, data)
    out = tmp / "out"
    assert main(["embed", str(path), "-o", str(out), "--model", str(model), "--device", "cpu", "--num-actors", "1",
                 "--no-progress", *extra]) == 0
    return out


def test_empty_record_is_skipped_logged_and_listed(tmp_path, models, local_ray, caplog):
    out = _run(tmp_path, models["esm"], ">p1\nMKV\n>empty description\n>p3\nMKVL\n")
    assert "skipped 1 empty record(s) (no sequence): empty" in caplog.text
    rows = _rows(out)
    assert sorted(rows) == ["p1#0", "p3#2"]  # the empty record keeps its number: index 1 is absent
    assert Manifest.load(out).skipped_empty == ["empty"]


def test_duplicate_ids_are_reported_and_both_kept(tmp_path, models, local_ray, caplog):
    out = _run(tmp_path, models["esm"], ">dup first\nMKV\n>other\nMKVL\n>dup second\nGGG\n")
    assert "1 duplicate record id(s), all records kept (see the 'index' column): dup" in caplog.text
    rows = _rows(out)
    assert sorted(rows) == ["dup#0", "dup#2", "other#1"] and rows["dup#2"]["length"] == 3


def test_ids_with_slashes_spaces_and_non_ascii(tmp_path, models, local_ray):
    """The id is the header up to its first whitespace; ids are data: '/' and non-ASCII letters go to
    Parquet as they are and never name a file (part names come from batch numbers)."""
    out = _run(tmp_path, models["esm"], ">sp|P12345|A/B_HUMAN some protein\nMKV\n>séquence_α1 x\nMKVL\n"
                                        ">\tleading_tab and spaces\nMKVLL\n>a/../../b\nMK\n")
    rows = _rows(out)
    assert sorted(rows) == sorted(["sp|P12345|A/B_HUMAN#0", "séquence_α1#1", "leading_tab#2", "a/../../b#3"])
    names = {p.name for p in tmp_path.rglob("*")}
    assert not names & {"A", "B_HUMAN", "séquence_α1", "b", "leading_tab"}
    assert {p.name for p in out.iterdir()} <= {MANIFEST} | {f"part-{i:06d}.parquet" for i in range(4)}


def test_lowercase_crlf_and_trailing_stop_are_normalised(tmp_path, models, local_ray):
    out = _run(tmp_path, models["esm"], b">upper\r\nMKVLAAGIV\r\n>lower\r\nmkvl\r\naagiv\r\n>stop\r\nMKVLAAGIV*\r\n")
    rows = _rows(out)
    assert rows["lower#1"]["length"] == rows["stop#2"]["length"] == 9
    np.testing.assert_allclose(_emb(rows, "lower#1"), _emb(rows, "upper#0"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_emb(rows, "stop#2"), _emb(rows, "upper#0"), rtol=1e-5, atol=1e-6)


def test_protein_ambiguity_codes_and_j(tmp_path, models, local_ray):
    """B, Z, X, U, O are ESM-2 tokens; J (not in ESM-2's vocabulary) is read as X."""
    out = _run(tmp_path, models["esm"], ">x\nMKXLBZUO\n>j\nMKJLBZUO\n")
    rows = _rows(out)
    np.testing.assert_allclose(_emb(rows, "j#1"), _emb(rows, "x#0"), rtol=1e-5, atol=1e-6)


def test_dna_u_is_t_and_ambiguity_codes_are_kept(tmp_path, models, local_ray):
    out = _run(tmp_path, models["dnabert"], ">t\nACGTACGTTTGA\n>u\nacguacguuuga\n>iupac\nACGTNNRYKMSWBDHVACGT\n",
               "in.fa")
    rows = _rows(out)
    np.testing.assert_allclose(_emb(rows, "u#1"), _emb(rows, "t#0"), rtol=1e-5, atol=1e-6)
    assert rows["iupac#2"]["length"] == 20 and np.isfinite(_emb(rows, "iupac#2")).all()


def test_100000_residue_protein_is_truncated_and_flagged(tmp_path, models, local_ray):
    long = random_proteins(1, 100_000, 100_000, seed=7)[0]
    text = f">long\n{long}\n>prefix\n{long[:1022]}\n>short\nMKV\n"
    out = _run(tmp_path, models["esm"], text)
    rows = _rows(out)
    assert (rows["long#0"]["length"], rows["long#0"]["truncated"]) == (100_000, True)
    assert (rows["prefix#1"]["length"], rows["prefix#1"]["truncated"]) == (1022, False)
    # truncation keeps the first 1022 residues (fair-esm's BatchConverter)
    np.testing.assert_allclose(_emb(rows, "long#0"), _emb(rows, "prefix#1"), rtol=1e-5, atol=1e-6)


def test_a_huge_line_without_newline_is_streamed_in_bounded_memory(tmp_path, models, local_ray):
    """A 10 GB line without a newline, scaled to 400 MB: the driver's traced Python memory stays a small
    fraction of the line (the index pass holds a block, the batch reads 1022 residues of it), and the
    row reports the true length and truncated=True."""
    import tracemalloc

    size = 400 << 20
    block = np.random.default_rng(3).choice(np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8), 1 << 20).tobytes()
    path = tmp_path / "huge.faa"
    with open(path, "wb") as f:
        f.write(b">short\nMKVL\n>huge one line, no newline at the end\n")
        for _ in range(size >> 20):
            f.write(block)
    tracemalloc.start()
    try:
        rc = main(["embed", str(path), "-o", str(tmp_path / "out"), "--model", str(models["esm"]),
                   "--device", "cpu", "--num-actors", "1", "--no-progress"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        path.unlink()
    assert rc == 0
    assert peak < 32 << 20, f"driver traced {peak / 2**20:.0f} MiB for a {size >> 20} MiB line"
    rows = _rows(tmp_path / "out")
    assert (rows["huge#1"]["length"], rows["huge#1"]["truncated"]) == (size, True)
    assert (rows["short#0"]["length"], rows["short#0"]["truncated"]) == (4, False)
