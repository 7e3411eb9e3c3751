"""Our ESM-2 and DNABERT-S against their references, on random weights in the real formats (float32, CPU)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import fair_esm_pooled, fair_esm_reference, random_dna, random_proteins
from tests.reference_dnabert import reference_dnabert_embed
from virnucpro.kernels.attention import Packing
from virnucpro.models import (DNABERT_S_FAMILY, ESM2_FAMILY, FAMILIES, CheckpointError, ModelSource, check_model,
                              default_toks_per_batch, load_model, load_tokenizer, resolve_model)
from virnucpro.models.dnabert_s import DNABERTSTokenizer, load_dnabert_s
from virnucpro.models.esm2 import ALPHABET, MASK, ESM2Tokenizer, load_esm2
from virnucpro.io.alphabet import DNA, PROTEIN
from virnucpro.models.tiny import write_dnabert_s_dir, write_esm2_checkpoint

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per row."""
    return (a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)


def ours_pooled(model, tokenizer, seqs: list[str]) -> torch.Tensor:
    tokens, lengths, _ = tokenizer.encode(seqs)
    packing = Packing.from_lengths(torch.from_numpy(lengths))
    with torch.no_grad():
        return model.embed(torch.from_numpy(tokens).long(), packing)


def test_alphabet_is_fair_esm():
    import esm

    assert ALPHABET == esm.data.Alphabet.from_architecture("ESM-1b").all_toks


@pytest.mark.parametrize("layers,dim,heads", [(2, 64, 4), (3, 120, 20), (2, 2560, 40)])
def test_esm2_matches_fair_esm(tmp_path, layers, dim, heads):
    path = write_esm2_checkpoint(tmp_path / "esm2_test.pt", layers, dim, heads, seed=11)
    ours = load_esm2(path)
    ref = fair_esm_reference(layers, dim, heads, seed=11)
    seqs = random_proteins(7, 1, 90, seed=layers) + ["MKV" + "XBZUO" * 3]  # mixed lengths, rare tokens
    err = rel_err(ours_pooled(ours, ESM2Tokenizer(), seqs), fair_esm_pooled(ref, seqs))
    assert err.max() < TOL, err


def test_esm2_packing_does_not_change_results(esm_tiny):
    model, tok = load_esm2(esm_tiny), ESM2Tokenizer()
    seqs = random_proteins(9, 1, 200, seed=1)
    packed = ours_pooled(model, tok, seqs)
    alone = torch.cat([ours_pooled(model, tok, [s]) for s in seqs])
    assert rel_err(packed, alone).max() < TOL


def test_esm2_token_dropout_scaling_with_mask_tokens(esm_tiny):
    """fair-esm rescales embeddings by the observed <mask> ratio of each sequence; so must we."""
    import esm

    model, ref = load_esm2(esm_tiny), fair_esm_reference(2, 64, 4, seed=3)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    seqs = ["ACD<mask>EFGH<mask>K", "MKVL", "<mask>W<mask><mask>"]
    _, _, toks = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(seqs)])
    with torch.no_grad():
        want = ref(toks, repr_layers=[2])["representations"][2]
    rows = [t[t != alphabet.padding_idx] for t in toks]
    packing = Packing.from_lengths(torch.tensor([len(r) for r in rows]))
    assert int((torch.cat(rows) == MASK).sum()) == 5
    with torch.no_grad():
        got = model(torch.cat(rows), packing)
    want = torch.cat([want[i, : len(r)] for i, r in enumerate(rows)])
    assert rel_err(got, want).max() < TOL


def test_esm2_truncation(esm_tiny):
    tok = ESM2Tokenizer(truncation_seq_length=50)
    tokens, lengths, truncated = tok.encode(["A" * 80, "C" * 50])
    assert lengths.tolist() == [52, 52] and truncated.tolist() == [True, False]
    model, ref = load_esm2(esm_tiny), fair_esm_reference(2, 64, 4, seed=3)
    long = random_proteins(1, 80, 80, seed=4)[0]
    got = ours_pooled(model, tok, [long])
    assert rel_err(got, fair_esm_pooled(ref, [long[:50]])).max() < TOL


def test_esm2_j_is_read_as_x():
    tokens, _, _ = ESM2Tokenizer().encode(["AJX"])
    assert tokens[2] == tokens[3] == ALPHABET.index("X")


def test_esm2_fewer_layers(esm_tiny):
    """repr_layer < last: only those layers run and no final layer norm, as fair-esm's repr_layers."""
    model = load_esm2(esm_tiny, repr_layer=1)
    assert len(model.layers) == 1 and model.emb_layer_norm_after is None
    ref = fair_esm_reference(2, 64, 4, seed=3)
    seqs = random_proteins(4, 5, 40, seed=9)
    assert rel_err(ours_pooled(model, ESM2Tokenizer(), seqs), fair_esm_pooled(ref, seqs, layer=1)).max() < TOL


@pytest.mark.parametrize("safetensors", [False, True])
def test_dnabert_s_matches_reference(tmp_path, safetensors):
    path = write_dnabert_s_dir(tmp_path / "dnabert", hidden=48, layers=3, heads=12, intermediate=96,
                               seed=7, safetensors=safetensors)
    model, tok = load_dnabert_s(path), DNABERTSTokenizer(path)
    seqs = random_dna(8, 1, 600, seed=2) + random_dna(2, 50, 120, seed=3, alphabet="ACGTNRY")
    err = rel_err(ours_pooled(model, tok, seqs), reference_dnabert_embed(path, seqs))
    assert err.max() < TOL, err


def test_dnabert_s_packing_does_not_change_results(dnabert_tiny):
    model, tok = load_dnabert_s(dnabert_tiny), DNABERTSTokenizer(dnabert_tiny)
    seqs = random_dna(10, 3, 500, seed=8)
    packed = ours_pooled(model, tok, seqs)
    alone = torch.cat([ours_pooled(model, tok, [s]) for s in seqs])
    assert rel_err(packed, alone).max() < TOL


@pytest.mark.parametrize("alibi", [True, False])
def test_bucketed_padded_attention_equals_exact(alibi):
    """The CUDA path rounds the padded grid up (more rows, longer rows) so a run meets few kernel
    shapes; the extra rows and columns must not change any token's output."""
    from virnucpro.kernels.attention import PaddedLayout, _sdpa_attention, alibi_slopes

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 38, (33,), generator=g)
    lengths[0] = 37
    H, hd = 4, 8
    q, k, v = (torch.randn(int(lengths.sum()), H, hd, generator=g) for _ in range(3))
    slopes = torch.tensor(alibi_slopes(H)) if alibi else None
    outs = {}
    for bucketed in (False, True):
        packing = Packing.from_lengths(lengths)
        layout = PaddedLayout.of(packing, bucketed)
        outs[bucketed] = _sdpa_attention(q, k, v, packing, hd ** -0.5, slopes)
        assert (layout.rows, layout.length) == ((33, 37) if not bucketed else (34, 48))
    assert torch.isfinite(outs[True]).all()
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-6, atol=1e-6)


def test_dnabert_s_bert_prefix_and_ignored_heads(tmp_path, dnabert_tiny):
    """DNABERT-2 files carry a `bert.` prefix and an MLM head; both load."""
    import shutil

    d = tmp_path / "prefixed"
    shutil.copytree(dnabert_tiny, d)
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    state = {"bert." + k: v for k, v in state.items()} | {"cls.predictions.bias": torch.zeros(3)}
    torch.save(state, d / "pytorch_model.bin")
    seqs = random_dna(3, 20, 80, seed=1)
    a = ours_pooled(load_dnabert_s(d), DNABERTSTokenizer(d), seqs)
    b = ours_pooled(load_dnabert_s(dnabert_tiny), DNABERTSTokenizer(dnabert_tiny), seqs)
    assert torch.equal(a, b)


def test_dnabert_tokenizer_template_truncation_and_pickle(dnabert_tiny):
    tok = DNABERTSTokenizer(dnabert_tiny, truncation_seq_length=5)
    tokens, lengths, truncated = tok.encode(["ACGT" * 50, "A"])
    assert truncated.tolist() == [True, False]
    assert lengths[0] == 7 and tokens[0] == tok.cls_id and tokens[6] == tok.sep_id
    again = pickle.loads(pickle.dumps(tok))
    assert np.array_equal(again.encode(["ACGTNNAC"])[0], tok.encode(["ACGTNNAC"])[0])


def test_resolve_model_detects_family(esm_tiny, dnabert_tiny, tmp_path, monkeypatch):
    assert resolve_model(esm_tiny).family == "esm2"
    assert resolve_model(dnabert_tiny).family == "dnabert_s"
    # a relative path is made absolute here: actors and replicas run in another working directory
    monkeypatch.chdir(esm_tiny.parent)
    relative = resolve_model(esm_tiny.name)
    assert relative.path == esm_tiny.absolute() and relative.name == esm_tiny.name
    # named checkpoints come from the torch hub cache, HF ids from the HF cache; nothing downloads
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "esm2_t6_8M_UR50D.pt").write_bytes(esm_tiny.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert resolve_model("esm2_t6_8M_UR50D").path == hub / "esm2_t6_8M_UR50D.pt"
    snap = tmp_path / "hf" / "hub" / "models--zhihan1996--DNABERT-S" / "snapshots" / "abc"
    snap.parent.parent.joinpath("refs").mkdir(parents=True)
    snap.parent.parent.joinpath("refs", "main").write_text("abc")
    import shutil
    shutil.copytree(dnabert_tiny, snap)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert resolve_model("zhihan1996/DNABERT-S").path == snap
    with pytest.raises(CheckpointError, match="not in the torch hub cache"):
        resolve_model("esm2_t36_3B_UR50D")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_model("someone/else")


def test_bad_checkpoints_are_refused(tmp_path, esm_tiny):
    wrong_shape = tmp_path / "esm2_bad.pt"
    data = torch.load(esm_tiny, weights_only=False)
    data["model"]["encoder.sentence_encoder.layers.0.fc1.weight"] = torch.zeros(3, 3)
    torch.save(data, wrong_shape)
    with pytest.raises(CheckpointError, match="fc1.weight has shape"):
        load_esm2(wrong_shape)
    not_esm = tmp_path / "other.pt"
    torch.save({"model": {"foo": torch.zeros(1)}}, not_esm)
    with pytest.raises(CheckpointError, match="not an ESM-2 checkpoint"):
        load_esm2(not_esm)
    with pytest.raises(CheckpointError, match="no such"):
        load_esm2(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/virnucpro-pwned",))


def test_checkpoint_loader_never_unpickles_code(tmp_path):
    path = tmp_path / "esm2_evil.pt"
    torch.save({"model": {"embed_tokens.weight": torch.zeros(33, 8)}, "cfg": _Evil()}, path)
    with pytest.raises(CheckpointError):
        load_esm2(path)
    import os
    assert not os.path.exists("/tmp/virnucpro-pwned")


def test_load_model_and_tokenizer_by_source(esm_tiny, dnabert_tiny):
    for spec in (esm_tiny, dnabert_tiny):
        src = resolve_model(spec)
        model = load_model(src, "cpu", torch.float32)
        tok = load_tokenizer(src)
        out = ours_pooled(model, tok, ["ACGTACGT", "MKV"] if src.family == "dnabert_s" else ["MKV", "ACDE"])
        assert out.shape == (2, model.dim) and torch.isfinite(out).all()


def test_family_registry_describes_each_model(esm_tiny, dnabert_tiny):
    from virnucpro.models.registry import ModelFamily
    from virnucpro.io.alphabet import DNA, PROTEIN

    assert (ESM2_FAMILY, DNABERT_S_FAMILY) == ("esm2", "dnabert_s")
    assert list(FAMILIES) == ["esm2", "dnabert_s"]
    assert all(isinstance(f, ModelFamily) and FAMILIES[f.name] is f for f in FAMILIES.values())
    esm, dna = resolve_model(esm_tiny), resolve_model(dnabert_tiny)
    assert (esm.model_family, dna.model_family) == (FAMILIES["esm2"], FAMILIES["dnabert_s"])
    assert (esm.sequence_kind, dna.sequence_kind) == (PROTEIN, DNA)
    assert (check_model(esm), check_model(dna)) == (64, 48)  # conftest's tiny models
    assert isinstance(load_tokenizer(esm, 100), ESM2Tokenizer) and load_tokenizer(esm, 100).max_residues == 100
    assert isinstance(load_tokenizer(dna), DNABERTSTokenizer)
    # a model directory is claimed by its config.json: transformers' ESM for ESM-2 (tests/test_hf_esm2.py)
    esm_claims = FAMILIES["esm2"].claims_dir
    assert esm_claims({"model_type": "esm"}) and esm_claims({"architectures": ["EsmForMaskedLM"]})
    assert not esm_claims({"model_type": "bert", "hidden_size": 768})
    claims = FAMILIES["dnabert_s"].claims_dir
    assert claims({"model_type": "bert", "hidden_size": 768}) and claims({"hidden_size": 768})
    assert not claims({"model_type": "gpt2", "hidden_size": 768}) and not claims({"model_type": "bert"})


def test_default_token_budgets():
    esm = ModelSource(ESM2_FAMILY, Path("m.pt"), "m", PROTEIN)
    dna = ModelSource(DNABERT_S_FAMILY, Path("d"), "d", DNA)
    assert [default_toks_per_batch(s, "cpu") for s in (esm, dna)] == [4096, 4096]
    assert [default_toks_per_batch(s, "cuda") for s in (esm, dna)] == [65536, 262144]


def test_packed_alibi_probe_accepts_the_right_bias_and_names_a_wrong_one():
    """The load-time check that decides whether a packed ALiBi kernel (FlashAttention-2's slopes, our
    Triton kernel) is used: a kernel computing -slope * |i - j| passes, one with the wrong sign or a
    one-sided distance is refused with a reason, and one that raises is refused with its error."""
    from virnucpro.kernels.attention import _packed_kernel_fails, _triton_fails

    def by_hand(sign, distance):
        def kernel(q, k, v, cu, max_seqlen, scale, slopes):
            out = torch.empty_like(q)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
                pos = torch.arange(b - a)
                bias = sign * slopes[:, None, None] * distance(pos[None, :] - pos[:, None])
                qs, ks, vs = (t[a:b].transpose(0, 1).float() for t in (q, k, v))
                out[a:b] = (torch.softmax(qs @ ks.transpose(1, 2) * scale + bias, -1) @ vs).transpose(0, 1)
            return out
        return kernel

    def raises(*args):
        raise RuntimeError("This flash attention build does not support alibi.")

    cpu = torch.device("cpu")
    assert _packed_kernel_fails(by_hand(-1, torch.abs), cpu, torch.float32, 16, alibi=True) is None
    assert "differs" in _packed_kernel_fails(by_hand(+1, torch.abs), cpu, torch.float32, 16, alibi=True)
    assert "differs" in _packed_kernel_fails(by_hand(-1, lambda d: d.clamp(min=0)), cpu, torch.float32, 16, alibi=True)
    assert "does not support alibi" in _packed_kernel_fails(raises, cpu, torch.float32, 16, alibi=True)
    assert "power of two" in _triton_fails(cpu, torch.bfloat16, 48, alibi=True)


def test_packed_kernel_probe_without_alibi_checks_plain_attention_and_sequence_bounds():
    """Without ALiBi (ESM-2), the same load-time check gets slopes=None and wants plain softmax attention
    within each sequence: a kernel that adds a bias anyway, or attends across the packed sequences'
    boundary, is refused."""
    from virnucpro.kernels.attention import _packed_kernel_fails

    def plain(q, k, v, cu, max_seqlen, scale, slopes, across=False, bias=0.0):
        assert slopes is None
        out = torch.empty_like(q)
        spans = [(0, int(cu[-1]))] if across else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
        for a, b in spans:
            pos = torch.arange(b - a)
            qs, ks, vs = (t[a:b].transpose(0, 1).float() for t in (q, k, v))
            scores = qs @ ks.transpose(1, 2) * scale - bias * (pos[None, :] - pos[:, None]).abs()
            out[a:b] = (torch.softmax(scores, -1) @ vs).transpose(0, 1)
        return out

    cpu = torch.device("cpu")
    assert _packed_kernel_fails(plain, cpu, torch.float32, 16, alibi=False) is None
    assert "softmax(q k^T * scale) v" in _packed_kernel_fails(
        lambda *a: plain(*a, across=True), cpu, torch.float32, 16, alibi=False)
    assert "differs" in _packed_kernel_fails(lambda *a: plain(*a, bias=0.1), cpu, torch.float32, 16, alibi=False)


@pytest.mark.parametrize("triton_ok,varlen,requested,alibi,want,note", [
    (True, True, "auto", False, "triton", ""),  # ESM-2 on CUDA: our kernel
    (False, True, "auto", False, "flash", "our Triton kernel: no Triton"),  # its fallback says why
    (True, True, "flash", False, "flash", "requested"),
    (True, False, "flash", False, "triton", "this torch has no varlen kernel"),
    (False, False, "auto", False, "sdpa", "no torch.nn.attention.varlen"),
    (True, True, "flex", False, "triton", "--attention flex applies to DNABERT-S only"),
    (True, True, "sdpa", False, "sdpa", "requested"),
    (True, True, "auto", True, "triton", "ALiBi"),  # DNABERT-S: our kernel with the bias
    (True, True, "flash", True, "triton", "--attention flash applies to ESM-2 only"),
    (True, True, "flex", True, "flex", ""),
    (False, True, "auto", True, "sdpa", "padded grid"),
])
def test_select_backend_on_a_gpu(monkeypatch, triton_ok, varlen, requested, alibi, want, note):
    """Which kernel each model gets on a CUDA GPU (mocked: this is a CPU test) for each --attention
    value, whether our Triton kernel passes its load-time check and whether torch has FA2's varlen
    kernel; the reason printed at load names a request that does not apply to the model."""
    import virnucpro.kernels.attention as attention_mod

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(attention_mod, "_triton_fails", lambda *a, **k: None if triton_ok else "no Triton")
    monkeypatch.setattr(attention_mod, "_varlen_attn", lambda: object() if varlen else None)
    monkeypatch.setattr(attention_mod, "_flash_alibi_fails", lambda *a, **k: "no ALiBi slopes")
    backend = attention_mod.select_backend(torch.device("cuda"), torch.bfloat16, alibi=alibi, requested=requested,
                                           head_dim=64)
    assert backend.name == want, backend.describe()
    assert note in backend.describe(), backend.describe()
    if want == "triton":
        assert backend.describe().startswith("FlashAttention: enabled, our packed kernel in Triton")


# Before 3.8, Triton's interpreter cannot run our kernels' scalar loads with numpy 2.
TRITON_INTERPRETER_FLOOR = (3, 8)


def triton_for_the_interpreter():
    """Triton, for the tests that run our kernels under its CPU interpreter, or why not. CI (`make test` on
    a fresh Linux x86_64 machine) installs a CPU torch, which pins no Triton, so the test extras bring the
    newest: there a missing Triton, or one older than the floor, is a broken install and fails the test,
    as docs/design.md says CI checks the kernels' indexing this way. Beside a CUDA or ROCm torch (which
    pins a Triton of its own, possibly older) or on another platform (no Triton wheels), it skips, saying
    why: the GPU tests check the kernels there."""
    import platform
    import sys

    ci_like = (sys.platform == "linux" and platform.machine() == "x86_64" and torch.version.cuda is None
               and getattr(torch.version, "hip", None) is None)
    try:
        import triton
    except ImportError as e:
        why = f"no Triton ({e})"
    else:
        if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= TRITON_INTERPRETER_FLOOR:
            return triton
        why = f"Triton {triton.__version__}: its interpreter before 3.8 cannot run the kernels with numpy 2"
    if ci_like:
        pytest.fail(f"{why}; with a CPU torch on Linux x86_64 the test extras install Triton >= 3.8 "
                    "(pip install -e \".[test]\"), and these tests are CI's check of the kernels' indexing")
    pytest.skip(why)


TRITON_ON_THE_CPU = """
import torch
from virnucpro.kernels.attention import _packed_kernel_fails, alibi_by_hand, alibi_slopes
from virnucpro.kernels.triton_attention import packed_attention

lengths, H, hd = [1, 2, 63, 64, 65, 130], 2, 16  # around the kernel's 64-token blocks
g = torch.Generator().manual_seed(0)
q, k, v = torch.randn(sum(lengths), 3, H, hd, generator=g).unbind(1)  # strided views, as the models pass them
cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
slopes = torch.tensor(alibi_slopes(H))
for alibi in (True, False):
    got = packed_attention(q, k, v, cu, max(lengths), hd ** -0.5, slopes if alibi else None)
    want = alibi_by_hand(q, k, v, cu, hd ** -0.5, slopes if alibi else None)
    err = float((got - want).abs().max())
    assert err < 1e-5, (alibi, err)
    # the load-time check passes the real kernel
    assert _packed_kernel_fails(packed_attention, torch.device("cpu"), torch.float32, 32, alibi) is None
print("ok")
"""


def test_triton_kernel_runs_right_on_the_cpu_interpreter():
    """Our Triton attention kernel, the real one, checked in CI without a GPU: Triton's interpreter
    runs it on the CPU (TRITON_INTERPRET=1, read when the kernel is defined: so in a process of its
    own). Packed sequences of 1-130 tokens around its 64-token block edges, with and without the ALiBi
    bias, against attention by hand in float32; and the load-time check accepts it. The GPU tests check
    the compiled kernel in bf16/fp16."""
    import os
    import subprocess
    import sys

    triton_for_the_interpreter()
    result = subprocess.run([sys.executable, "-c", TRITON_ON_THE_CPU], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


FUSED_ON_THE_CPU = """
import sys
import numpy as np
import torch
import torch.nn.functional as F
from virnucpro.kernels.attention import Packing
from virnucpro.models.dnabert_s import load_dnabert_s
from virnucpro.models.tokenizers import DNABERTSTokenizer
from virnucpro.kernels.triton_elementwise import add_layer_norm, gated_gelu

torch.set_grad_enabled(False)
g = torch.Generator().manual_seed(0)
for rows in (1, 5, 37):  # around the kernels' 2- and 8-row tiles
    h = torch.randn(rows, 2 * 1100, generator=g)  # a width that is not a multiple of the 1024-column tile
    err = (gated_gelu(h) - F.gelu(h[:, :1100]) * h[:, 1100:]).abs().max()
    assert err < 1e-5, ("gated_gelu", rows, float(err))
    x, r = torch.randn(2, rows, 96, generator=g) * 3
    norm = torch.nn.LayerNorm(96, eps=1e-12)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2, generator=g)
    torch.nn.init.normal_(norm.bias, 0.0, 0.2, generator=g)
    err = (add_layer_norm(x, r, norm) - norm(x + r)).abs().max()
    assert err < 1e-5, ("add_layer_norm", rows, float(err))
# the whole model: the fused path computes what PyTorch's ops do, sequence by sequence in a packed batch
model, tok = load_dnabert_s(sys.argv[1]), DNABERTSTokenizer(sys.argv[1])
rng = np.random.default_rng(1)
seqs = ["".join(rng.choice(list("ACGT"), n)) for n in (3, 40, 150, 299)]
tokens, lengths, _ = tok.encode(seqs)
packing = Packing.from_lengths(torch.from_numpy(lengths))
with torch.no_grad():
    plain = model.embed(torch.from_numpy(tokens).long(), packing)
    model.fused = True
    fused = model.embed(torch.from_numpy(tokens).long(), packing)
err = ((fused.double() - plain.double()).norm(dim=-1) / plain.double().norm(dim=-1)).max()
assert err < 1e-5, float(err)
print("ok")
"""


def test_fused_elementwise_kernels_run_right_on_the_cpu_interpreter(dnabert_tiny):
    """DNABERT-S's fused Triton kernels (gated GELU; residual add + LayerNorm), the real ones, run by
    Triton's interpreter on the CPU in float32: against PyTorch's ops on rows around the tile edges, and
    the whole model's pooled embeddings with them against without them (relative error < 1e-5).
    The GPU tests check them compiled, in bf16, against the float32 reference."""
    import os
    import subprocess
    import sys

    triton_for_the_interpreter()
    result = subprocess.run([sys.executable, "-c", FUSED_ON_THE_CPU, str(dnabert_tiny)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_fused_elementwise_kernels_only_on_a_cuda_gpu():
    """The load-time check says why the fused kernels are off on a CPU (the models then use PyTorch's ops)."""
    from virnucpro.models.dnabert_s import fused_kernels_fail

    assert "CUDA" in fused_kernels_fail(torch.device("cpu"), torch.float32, 768, 3072)


def test_compiled_layer_is_one_graph_through_the_packed_attention_op(dnabert_tiny, monkeypatch):
    """The GPU kernels (flash, triton) reach torch.compile as one custom op, so each compiled layer is a
    single graph, shared by all layers, with no graph break (four graphs with one): less for dynamo to
    trace when an actor compiles. The Triton kernel is stood in for by the float32 reference on the CPU."""
    import sys
    import types

    from torch._dynamo.utils import counters

    from virnucpro.kernels.attention import Backend, alibi_by_hand

    fake = types.ModuleType("virnucpro.kernels.triton_attention")
    fake.packed_attention = lambda q, k, v, cu, m, scale, slopes: alibi_by_hand(q, k, v, cu, scale, slopes).to(q.dtype)
    monkeypatch.setitem(sys.modules, "virnucpro.kernels.triton_attention", fake)
    model, tok = load_dnabert_s(dnabert_tiny), DNABERTSTokenizer(dnabert_tiny)
    seqs = random_dna(6, 3, 300, seed=4)
    expected = ours_pooled(model, tok, seqs)  # sdpa, eager
    model.backend = Backend("triton", "the float32 reference standing in for the kernel")
    layers = model.compiled_layers()
    torch._dynamo.reset()
    counters.clear()
    tokens, lengths, _ = tok.encode(seqs)
    for batch in ([0, 1, 2, 3], [4], [5]):  # several sequences, then one alone: no recompile for either
        keep = np.isin(np.repeat(np.arange(len(seqs)), lengths), batch)
        lens = torch.from_numpy(lengths[batch]).long()
        with torch.inference_mode():
            got = model.embed(torch.from_numpy(tokens[keep]).long(), Packing.from_lengths(lens), layers)
        assert rel_err(got, expected[batch]).max() < TOL
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_layers_reduce_rows_up_to_2048_wide_persistently(esm_tiny):
    """ESM-2 650M's LayerNorms are 1280 wide: Inductor's default reduces them in a loop (two reads of
    each row), ours in one persistent pass; wider rows (3B's 2560) keep the default. The choice is set
    in the thread that compiles, an actor's compile thread, and the compile's options carry it (it is
    part of Inductor's cache key)."""
    import threading
    import types

    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    from virnucpro.kernels.compiling import WideRowChoices

    def features(width):
        return types.SimpleNamespace(get_reduction_hint=lambda: ReductionHint.INNER, reduction_numel=width)

    graph = types.SimpleNamespace(sizevars=types.SimpleNamespace(statically_known_leq=lambda a, b: a <= b))
    with V.set_graph_handler(graph):
        assert WideRowChoices.should_use_persistent_reduction(features(1280), False)
        assert not InductorChoices.should_use_persistent_reduction(features(1280), False)
        assert WideRowChoices.should_use_persistent_reduction(features(768), False)
        assert not WideRowChoices.should_use_persistent_reduction(features(2560), False)

    model = load_esm2(esm_tiny)
    seen = {}

    def compile_thread():
        seen["layers"] = model.compiled_layers()
        seen["choices"] = V.choices

    t = threading.Thread(target=compile_thread)
    t.start()
    t.join()
    assert isinstance(seen["choices"], WideRowChoices)
    if hasattr(torch._inductor.config, "inductor_choices_class"):
        assert "WideRowChoices" in repr(seen["layers"][0].get_compiler_config())


def test_wide_row_kernels_have_a_cache_key_of_their_own(tmp_path, monkeypatch):
    """Inductor's disk cache must not hand kernels compiled under its default heuristics to our
    compile (or ours to a plain one): the same graph misses once under each, then hits."""
    from torch._dynamo.utils import counters

    from virnucpro.kernels.compiling import compiled

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    block = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
    outcomes = []
    for how in ("plain", "ours", "ours", "plain"):
        torch._dynamo.reset()
        counters.clear()
        layer = torch.compile(block, dynamic=True) if how == "plain" else compiled([block])[0]
        with torch.inference_mode():
            layer(torch.randn(5, 16))
        outcomes.append("hit" if counters["inductor"]["fxgraph_cache_hit"] else "miss")
    assert outcomes == ["miss", "miss", "hit", "hit"], outcomes


def test_kernel_checks_run_in_a_thread_of_their_own():
    """The loaders check their kernels in a thread beside the weights' copy: the check's result, or its
    exception, comes back through the future; a load that fails waits for its check."""
    import threading
    import time

    from virnucpro.kernels.attention import in_background

    cpu = torch.device("cpu")
    with in_background(cpu, lambda x: (threading.get_ident(), x), 3) as check:
        pass
    ident, value = check.result()
    assert ident != threading.get_ident() and value == 3
    with in_background(cpu, int, "not a number") as check:
        pass
    with pytest.raises(ValueError):
        check.result()
    with pytest.raises(OSError), in_background(cpu, time.sleep, 0.2) as check:
        raise OSError("the copy failed")
    assert check.done()
