"""--repr-layers, --include and --output-dtype: every column against fair-esm's extract semantics (ESM-2)
or the plain DNABERT-S reference, float32 on CPU; the columns written to Parquet; the options."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import fair_esm_reference, random_dna, random_proteins, write_fasta
from tests.reference_dnabert import load_reference_model, load_reference_tokenizer, reference_forward
from virnucpro.kernels.attention import Packing
from virnucpro.models.columns import compute_columns, residue_counts
from virnucpro.models.dnabert_s import DNABERTSTokenizer, load_dnabert_s
from virnucpro.models.esm2 import ESM2Tokenizer, load_esm2
from virnucpro.options import EmbedOptions, OptionError
from virnucpro.io.output import plan_columns
from virnucpro.models.tiny import write_dnabert_s_dir, write_esm2_checkpoint

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative L2 error over rows."""
    a, b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def ours(model, tokenizer, seqs, columns):
    tokens, lengths, _ = tokenizer.encode(seqs)
    with torch.no_grad():
        out = compute_columns(model, torch.from_numpy(tokens).long(), Packing.from_lengths(torch.from_numpy(lengths)),
                              columns)
    return out, residue_counts(model, lengths)


def split(flat: torch.Tensor, counts: np.ndarray) -> list[torch.Tensor]:
    return list(torch.split(flat, counts.tolist()))


@pytest.mark.parametrize("layers", [(0, 1, -1), (-2,), None])
def test_esm2_columns_match_fair_esm_extract(tmp_path, layers):
    import esm

    path = write_esm2_checkpoint(tmp_path / "esm2_out.pt", 3, 64, 4, seed=13)
    model, ref = load_esm2(path), fair_esm_reference(3, 64, 4, seed=13)
    seqs = random_proteins(6, 1, 80, seed=4) + ["MKV" + "XBZUO" * 3]  # mixed lengths, rare tokens
    columns = plan_columns(layers, ("mean", "bos", "per-token", "logits"), 3, "bos", has_logits=True)
    got, counts = ours(model, ESM2Tokenizer(), seqs, columns)
    _, _, tokens = esm.data.Alphabet.from_architecture("ESM-1b").get_batch_converter()(
        [(str(i), s) for i, s in enumerate(seqs)])
    wanted_layers = sorted({c.layer for c in columns})
    with torch.no_grad():
        out = ref(tokens, repr_layers=wanted_layers)
    assert list(counts) == [len(s) for s in seqs]
    for c in columns:
        rep = out["logits"] if c.what == "logits" else out["representations"][c.layer]
        per_seq = [rep[i, 1:len(s) + 1] for i, s in enumerate(seqs)]  # fair-esm's extract: residues 1..len
        if c.what == "mean":
            assert rel_err(got[c.name], torch.stack([r.mean(0) for r in per_seq])) < TOL, c
        elif c.what == "bos":
            assert rel_err(got[c.name], rep[:, 0]) < TOL, c
        else:  # per residue, each sequence in order
            for mine, theirs in zip(split(got[c.name], counts), per_seq):
                assert rel_err(mine, theirs) < TOL, c


def test_dnabert_s_columns_match_reference(tmp_path):
    path = write_dnabert_s_dir(tmp_path / "dnabert", hidden=48, layers=3, heads=12, intermediate=96, seed=9)
    model = load_dnabert_s(path)
    seqs = random_dna(5, 1, 300, seed=6)
    columns = plan_columns((0, 2, -1), ("mean", "cls", "per-token"), 3, "cls")
    assert [c.name for c in columns][:4] == ["mean_0", "mean_2", "mean_3", "cls_0"]
    got, counts = ours(model, DNABERTSTokenizer(path), seqs, columns)
    cfg, state = load_reference_model(path)
    tok = load_reference_tokenizer(path)
    for c in columns:
        hidden = [reference_forward({**cfg, "num_hidden_layers": c.layer}, state, tok.encode(s).ids) for s in seqs]
        if c.what == "mean":  # every token, [CLS] and [SEP] included, as DNABERT-S
            assert rel_err(got[c.name], torch.stack([h.mean(0) for h in hidden])) < TOL, c
        elif c.what == "bos":
            assert rel_err(got[c.name], torch.stack([h[0] for h in hidden])) < TOL, c
        else:
            assert [len(h) for h in hidden] == list(counts)
            for mine, theirs in zip(split(got[c.name], counts), hidden):
                assert rel_err(mine, theirs) < TOL, c


def test_only_the_layers_needed_run(esm_tiny):
    model = load_esm2(esm_tiny)
    calls = []
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *a, i=i: calls.append(i))
    ours(model, ESM2Tokenizer(), ["MKVL"], plan_columns((1,), ("mean",), model.num_layers))
    assert calls == [0]


def test_plan_columns_defaults_and_refusals():
    assert [c.name for c in plan_columns(None, None, 33)] == ["embedding"]
    assert [c.name for c in plan_columns(None, ("mean",), 33)] == ["embedding"]
    assert [c.name for c in plan_columns((-1,), None, 33)] == ["mean_33"]
    assert [c.name for c in plan_columns(None, ("per-token",), 6, "cls")] == ["per_token_6"]
    with pytest.raises(ValueError, match=r"--repr-layers 34: this model's layers are 0..33"):
        plan_columns((34,), None, 33)
    with pytest.raises(ValueError, match=r"--repr-layers -35"):
        plan_columns((-35,), None, 33)
    with pytest.raises(ValueError, match="no language-model head"):
        plan_columns(None, ("logits",), 12, "cls", has_logits=False)


def test_options_parse_include_and_layers():
    import argparse

    from virnucpro.options import add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser, EmbedOptions)
    opts = from_args(EmbedOptions, parser.parse_args(
        ["--repr-layers", "0", "-1", "--include", "mean,per-token", "bos", "--output-dtype", "float16"]))
    assert (opts.repr_layers, opts.include, opts.output_dtype) == ((0, -1), ("mean", "per-token", "bos"), "float16")
    with pytest.raises(OptionError, match="--include .*tokens: tokens is not one of mean, bos"):
        EmbedOptions(include="mean,tokens")


@pytest.mark.slow
def test_embed_writes_the_columns_asked_for(tmp_path, esm_tiny, local_ray):
    """Through the actors and Parquet: layers 0 and last, mean + bos + per-token, float16."""
    from cluster.driver import embed

    seqs = random_proteins(30, 5, 120, seed=2)
    ids = write_fasta(tmp_path / "in.faa", seqs)
    res = embed(tmp_path / "in.faa", tmp_path / "out", esm_tiny, repr_layers=(0, -1),
                include="mean,bos,per-token", output_dtype="float16", progress=False, toks_per_batch=1024)
    assert res.num_sequences == 30
    table = pq.read_table(tmp_path / "out").sort_by("index")
    assert table.column_names[5:] == ["mean_0", "mean_2", "bos_0", "bos_2", "per_token_0", "per_token_2"]
    assert str(table.schema.field("per_token_2").type) == "list<element: fixed_size_list<element: halffloat>[64]>"
    assert table.column("id").to_pylist() == ids
    model = load_esm2(esm_tiny)
    want, counts = ours(model, ESM2Tokenizer(), seqs, plan_columns((0, -1), ("mean", "bos", "per-token"), 2))
    for name in ("mean_2", "bos_0"):
        got = np.stack(table.column(name).to_numpy(zero_copy_only=False)).astype(np.float32)
        assert np.allclose(got, want[name].numpy(), atol=2e-3, rtol=2e-3), name
    per_token = table.column("per_token_2").combine_chunks()
    assert per_token.value_lengths().to_pylist() == counts.tolist() == [len(s) for s in seqs]
    flat = per_token.flatten().flatten().to_numpy().astype(np.float32).reshape(-1, 64)
    assert np.allclose(flat, want["per_token_2"].numpy(), atol=2e-3, rtol=2e-3)


def test_only_writes_cut_short_count_as_temporaries():
    """A run deletes what its own cut-short writes left (`.NAME.<12 hex>.tmp` of a part, the manifest
    or the write test) and nothing else a user may keep in the output directory."""
    from virnucpro.io.output import LEGACY_MANIFEST, MANIFEST, WRITE_TEST, is_cut_short
    from virnucpro.io.storage import _temporary_name

    for name in ("part-000042.parquet", "part-1234567.parquet", MANIFEST, LEGACY_MANIFEST, WRITE_TEST):
        assert is_cut_short(_temporary_name(name)), name
    for name in ("part-000042.parquet", ".notes.txt.0123456789ab.tmp", ".part-42.parquet.0123456789ab.tmp",
                 ".part-000042.parquet.tmp", ".part-000042.parquet.xyz.tmp", "_manifest.parquet.0123456789ab.tmp"):
        assert not is_cut_short(name), name
