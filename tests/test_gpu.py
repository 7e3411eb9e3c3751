"""GPU checks (marked `gpu`, skipped without CUDA): the bf16 packed paths against float32 references,
that the fast kernels are really the ones running, and the out-of-memory report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import virnucpro.kernels.attention as attention_mod
from tests.conftest import fair_esm_pooled, fair_esm_reference, random_dna, random_proteins, write_fasta
from tests.reference_dnabert import reference_dnabert_embed
from virnucpro.kernels.attention import Packing
from virnucpro.models.dnabert_s import DNABERTSTokenizer, load_dnabert_s
from virnucpro.models.esm2 import ESM2Tokenizer, load_esm2
from virnucpro.models.tiny import write_dnabert_s_dir, write_esm2_checkpoint

pytestmark = pytest.mark.gpu
MIN_COSINE = 0.9995


def pooled_on_gpu(model, tokenizer, seqs):
    tokens, lengths, _ = tokenizer.encode(seqs)
    packing = Packing.from_lengths(torch.from_numpy(lengths).cuda())
    with torch.inference_mode():
        return model.embed(torch.from_numpy(tokens).long().cuda(), packing).cpu()


class CallCounter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("layers,dim,heads,compiled,attention", [
    (6, 320, 20, False, "auto"), (2, 2560, 40, False, "auto"), (6, 320, 20, True, "auto"),
    (2, 2560, 40, False, "flash"), (6, 320, 20, True, "flash"), (2, 480, 20, False, "auto")])
def test_esm2_bf16_packed_attention_matches_fp32_fair_esm(tmp_path, monkeypatch, layers, dim, heads, compiled,
                                                          attention):
    """auto: our packed Triton kernel (head dims 16 and 64 here), FlashAttention-2's varlen kernel for
    a head dim that is not a power of two (ESM-2 35M's 24); flash: FlashAttention-2's varlen kernel."""
    path = write_esm2_checkpoint(tmp_path / "esm2_gpu.pt", layers, dim, heads, seed=21)
    model = load_esm2(path, "cuda", torch.bfloat16, attention_backend=attention)
    head_dim = dim // heads
    name = "triton" if attention == "auto" and head_dim & (head_dim - 1) == 0 else "flash"
    assert model.backend.name == name, model.backend.describe()
    if name == "triton":
        import virnucpro.kernels.triton_attention as module
        counter = CallCounter(module.packed_attention)
    else:
        counter = CallCounter(attention_mod._varlen_attn())
    epilogue = CallCounter(torch.ops.aten._addmm_activation)
    torch._dynamo.utils.counters.clear()
    if compiled:
        model.compile_layers()
    elif name == "triton":
        monkeypatch.setattr(module, "packed_attention", counter)
        monkeypatch.setattr(torch.ops.aten, "_addmm_activation", epilogue)
    else:
        monkeypatch.setattr(attention_mod, "_varlen_attn", lambda: counter)
        monkeypatch.setattr(torch.ops.aten, "_addmm_activation", epilogue)
    # VirNucPro-like lengths, plus long ones (rotary positions > 256 must stay exact)
    seqs = random_proteins(40, 30, 166, seed=1) + random_proteins(4, 600, 1022, seed=2)
    if compiled:  # compile outside the profile, its code kept
        from torch._inductor.utils import run_and_get_code

        with torch._inductor.config.patch(force_disable_caches=True):
            _, code = run_and_get_code(pooled_on_gpu, model, ESM2Tokenizer(), seqs[:3])
        # Inductor kept fc1 + GELU as cuBLASLt's epilogue call, not a GEMM and a GELU kernel of its own
        assert "aten._addmm_activation" in "".join(code), "".join(code)[:3000]
    else:  # (not importing Inductor here: its lowerings would register the counter standing in for the op)
        pooled_on_gpu(model, ESM2Tokenizer(), seqs[:3])
    counter.calls = epilogue.calls = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = pooled_on_gpu(model, ESM2Tokenizer(), seqs)
    kernels = {e.name for e in prof.events()}
    kernel = "_packed_attention_fwd" if name == "triton" else "flash"
    assert any(kernel in k.lower() for k in kernels), sorted(kernels)[:20]  # the chosen kernel ran
    assert compiled or counter.calls == layers  # one packed attention call per layer
    assert compiled or epilogue.calls == layers  # and fc1 with its GELU in cuBLASLt's epilogue
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    want = fair_esm_pooled(fair_esm_reference(layers, dim, heads, seed=21), seqs)
    cos = F.cosine_similarity(got.double(), want.double(), dim=-1)
    print(f"ESM-2 {layers}x{dim}{' compiled' if compiled else ''}: bf16 {name} vs fp32 fair-esm cosine min {cos.min():.6f} mean {cos.mean():.6f}")
    assert cos.min() >= MIN_COSINE


@pytest.mark.parametrize("attention,compiled", [("auto", True), ("auto", False), ("sdpa", False), ("flex", False)])
def test_dnabert_s_bf16_matches_fp32_reference(tmp_path, monkeypatch, attention, compiled):
    """auto: varlen FlashAttention-2 with its ALiBi slopes where torch's build has them (PyTorch 2.11's
    does not: "This flash attention build does not support alibi"), else our Triton kernel, else SDPA
    with the bias over a padded grid; sdpa: that fallback on request; flex: on request."""
    name = expected_alibi_kernel(torch.device("cuda")) if attention == "auto" else attention
    path = write_dnabert_s_dir(tmp_path / "dnabert", hidden=768, layers=4, heads=12, intermediate=3072,
                               vocab_size=512, seed=4)
    model = load_dnabert_s(path, "cuda", torch.bfloat16, attention_backend=attention)
    assert model.backend.name == name, model.backend.describe()
    assert model.fused, "the fused elementwise kernels failed their load-time check"
    if compiled:
        model.compile_layers()
    module, kernel = {"flash": (attention_mod, "_flash_alibi"), "triton": (triton_module(), "packed_attention"),
                      "sdpa": (attention_mod, "_sdpa_attention"), "flex": (attention_mod, "_flex_attention")}[name]
    counter = CallCounter(getattr(module, kernel))
    monkeypatch.setattr(module, kernel, counter)
    # uncompiled layers run the fused elementwise kernels; compiled ones leave those steps to Inductor
    import virnucpro.kernels.triton_elementwise as elementwise
    gated = CallCounter(elementwise.gated_gelu)
    monkeypatch.setattr(elementwise, "gated_gelu", gated)
    seqs = random_dna(48, 300, 520, seed=3)
    got = pooled_on_gpu(model, DNABERTSTokenizer(path), seqs)
    assert compiled or counter.calls == 4
    assert gated.calls == (0 if compiled else 4)
    want = reference_dnabert_embed(path, seqs)
    cos = F.cosine_similarity(got.double(), want.double(), dim=-1)
    print(f"DNABERT-S: bf16 {name}{' compiled' if compiled else ''} vs fp32 reference cosine min "
          f"{cos.min():.6f} mean {cos.mean():.6f}")
    assert cos.min() >= MIN_COSINE


def expected_alibi_kernel(device: torch.device) -> str:
    """The kernel `--attention auto` must give DNABERT-S (ALiBi, head dim 64, bf16) on this GPU. On Hopper
    (sm_90: H100, H200) our Triton kernel runs, so it is expected there whatever its load-time check
    says: a check that wrongly rejected it must fail this test, not set its expectation. Only
    FlashAttention-2 with its own ALiBi slopes would come before it, on a torch build that has them (none
    so far) and whose probe passes; the cosine check then covers that kernel. On other GPUs the probes
    decide, and the test checks that the pick follows them."""
    flash = attention_mod._flash_alibi_fails(device, torch.bfloat16)
    triton = attention_mod._triton_fails(device, torch.bfloat16, 64, alibi=True)
    capability = torch.cuda.get_device_capability(device)
    print(f"ALiBi kernels on sm_{capability[0]}{capability[1]}: flash {flash or 'available'}; "
          f"triton {triton or 'available'}")
    if flash is None:
        return "flash"
    if capability == (9, 0):
        assert triton is None, f"our Triton ALiBi kernel was rejected on {torch.cuda.get_device_name(device)}, " \
                               f"where it runs: {triton}"
        return "triton"
    return "triton" if triton is None else "sdpa"


def triton_module():
    import virnucpro.kernels.triton_attention
    return virnucpro.kernels.triton_attention


@pytest.mark.parametrize("dtype,alibi", [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)])
def test_triton_kernel_matches_attention_by_hand(dtype, alibi):
    """Our packed kernel against softmax(q k^T * scale - slope |i - j|) v in float32 (slope 0 without
    ALiBi), per sequence, for lengths around its 64-token blocks and past DNABERT-S's usual ~110 tokens
    and ESM-2's 1024; q, k, v as the models pass them: strided views of one fused QKV tensor."""
    pytest.importorskip("triton")
    from virnucpro.kernels.attention import alibi_by_hand, alibi_slopes
    from virnucpro.kernels.triton_attention import packed_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [1, 2, 63, 64, 65, 110, 127, 128, 129, 300, 517, 1024]
    H, hd = 12, 64
    qkv = torch.randn(sum(lengths), 3, H, hd, device="cuda", dtype=dtype, generator=g) * 2
    q, k, v = qkv.unbind(1)
    slopes = torch.tensor(alibi_slopes(H), device="cuda", dtype=torch.float32)
    cu = F.pad(torch.tensor(lengths, device="cuda").cumsum(0), (1, 0)).int()
    out = packed_attention(q, k, v, cu, max(lengths), hd ** -0.5, slopes if alibi else None)
    want = alibi_by_hand(q, k, v, cu, hd ** -0.5, slopes if alibi else None)  # per sequence
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
    worst = float(F.cosine_similarity(out.float().reshape(-1, hd), want.reshape(-1, hd), dim=-1).min())
    print(f"Triton kernel {dtype}{' ALiBi' if alibi else ''}: worst per-row cosine to float32 {worst:.6f}")
    assert worst > 0.999


def test_triton_kernel_addresses_batches_past_2_gib():
    """A batch whose fused QKV tensor has more than 2^31 elements (ESM-2 3B's shape: 40 heads of 64,
    300,000 tokens): the kernel's offsets must not wrap. The last sequences, whose offsets pass 2^31,
    are checked against attention by hand."""
    pytest.importorskip("triton")
    from virnucpro.kernels.attention import alibi_by_hand
    from virnucpro.kernels.triton_attention import packed_attention

    H, hd, L, B = 40, 64, 150, 2000
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(L * B, 3, H, hd, device="cuda", dtype=torch.bfloat16, generator=g)
    assert qkv.numel() > 2 ** 31
    q, k, v = qkv.unbind(1)
    cu = torch.arange(0, L * B + 1, L, device="cuda", dtype=torch.int32)
    out = packed_attention(q, k, v, cu, L, hd ** -0.5)
    last = slice(L * (B - 3), L * B)
    want = alibi_by_hand(q[last], k[last], v[last], cu[-4:] - cu[-4], hd ** -0.5, None)
    torch.testing.assert_close(out[last].float(), want, atol=3e-2, rtol=3e-2)


def test_embed_through_ray_on_gpu(tmp_path):
    import pyarrow.parquet as pq

    from cluster.driver import embed

    path = write_esm2_checkpoint(tmp_path / "esm2_e2e.pt", 4, 320, 20, seed=8)
    seqs = random_proteins(300, 20, 400, seed=5)
    ids = write_fasta(tmp_path / "in.faa", seqs)
    result = embed(tmp_path / "in.faa", tmp_path / "out", path, device="cuda", toks_per_batch=8192,
                   progress=False)
    assert "FlashAttention: enabled, our packed kernel in Triton" in result.actors[0]["attention"]
    table = pq.read_table(tmp_path / "out").sort_by("index")
    assert table.column("id").to_pylist() == ids
    got = torch.from_numpy(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)))
    want = fair_esm_pooled(fair_esm_reference(4, 320, 20, seed=8), seqs)
    assert F.cosine_similarity(got.double(), want.double(), dim=-1).min() >= MIN_COSINE


def test_out_of_memory_is_reported_with_a_recommendation(tmp_path):
    from actors.embedder import ActorConfig, BatchError, Embedder
    from virnucpro.options import EmbedOptions
    from virnucpro.batching import make_batch
    from virnucpro.models import resolve_model
    from virnucpro.io.index import FastaIndex

    path = write_esm2_checkpoint(tmp_path / "esm2_oom.pt", 2, 2560, 40, seed=1)
    write_fasta(tmp_path / "in.faa", random_proteins(64, 1000, 1022, seed=1))
    index = FastaIndex.build(tmp_path / "in.faa", "protein", tmp_path)
    # uncompiled: no compile thread allocating beside the batch
    actor = Embedder(ActorConfig(resolve_model(path), str(tmp_path), "cuda", EmbedOptions(dtype="bfloat16", compile=False)))
    batch = make_batch(index, np.arange(len(index)), ESM2Tokenizer(), 0)
    torch.cuda.empty_cache()  # what earlier tests left cached in this process would serve the batch
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - (actor.weight_bytes // 2 + (1 << 30)), dtype=torch.uint8, device="cuda")
    try:
        with pytest.raises(BatchError, match=r"CUDA out of memory .*peak .* GiB.*Try --toks-per-batch \d+"):
            actor.embed(batch)
    finally:
        del hog


def test_budget_that_cannot_fit_fails_at_start_up(tmp_path):
    """The actor tries the plan's largest batch before it reports ready: a budget too big for the GPU
    fails there, with the out-of-memory report, before any batch is dealt."""
    from actors.embedder import ActorConfig, BatchError, Embedder
    from virnucpro.options import EmbedOptions
    from virnucpro.models import resolve_model

    path = write_esm2_checkpoint(tmp_path / "esm2_oom.pt", 2, 2560, 40, seed=1)
    torch.cuda.empty_cache()  # what earlier tests left cached in this process counts as used
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - (6 << 30), dtype=torch.uint8, device="cuda")  # leaves ~6 GiB
    opts = EmbedOptions(dtype="bfloat16", compile=False)
    try:
        with pytest.raises(BatchError, match=r"CUDA out of memory .*largest batch .*tried at start-up.*"
                                             r"Try --toks-per-batch \d+"):
            Embedder(ActorConfig(resolve_model(path), str(tmp_path), "cuda", opts)).prepare(np.full(400, 1024))
        actor = Embedder(ActorConfig(resolve_model(path), str(tmp_path), "cuda", opts))
        assert actor.prepare(np.full(4, 1024))["dim"] == 2560  # a budget that fits starts
    finally:
        del hog


def test_dnabert_s_actor_runs_uncompiled_with_fused_kernels_by_default(tmp_path):
    """A DNABERT-S actor on a GPU does not compile (its fused elementwise kernels run within 1% of the
    compiled layers) and says so in its info; its embeddings match the float32 reference."""
    from actors.embedder import ActorConfig, Embedder
    from virnucpro.batching import make_batch
    from virnucpro.models import resolve_model
    from virnucpro.options import EmbedOptions
    from virnucpro.io.index import FastaIndex

    path = write_dnabert_s_dir(tmp_path / "dnabert", hidden=768, layers=4, heads=12, intermediate=3072,
                               vocab_size=512, seed=4)
    seqs = random_dna(40, 300, 520, seed=6)
    write_fasta(tmp_path / "in.fna", seqs)
    index = FastaIndex.build(tmp_path / "in.fna", "dna", tmp_path)
    actor = Embedder(ActorConfig(resolve_model(path), None, "cuda", EmbedOptions(dtype="bfloat16")))
    info = actor.info()
    assert info["fused"] and not info["compiled"] and not info["compiling"], info
    got = torch.from_numpy(actor.compute(make_batch(index, np.arange(len(index)), DNABERTSTokenizer(path), 0)))
    cos = F.cosine_similarity(got.double(), reference_dnabert_embed(path, seqs).double(), dim=-1)
    assert cos.min() >= MIN_COSINE, float(cos.min())


def test_actor_embeds_eagerly_while_it_compiles_then_compiled(tmp_path):
    """A GPU actor answers at once with its eager layers while a thread compiles them, then switches:
    both give the float32 reference's embeddings."""
    import time

    from actors.embedder import ActorConfig, Embedder
    from virnucpro.batching import make_batch
    from virnucpro.models import resolve_model
    from virnucpro.options import EmbedOptions
    from virnucpro.io.index import FastaIndex

    path = write_esm2_checkpoint(tmp_path / "esm2_bg.pt", 4, 320, 20, seed=5)
    seqs = random_proteins(24, 30, 400, seed=5)
    write_fasta(tmp_path / "in.faa", seqs)
    index = FastaIndex.build(tmp_path / "in.faa", "protein", tmp_path)
    batch = make_batch(index, np.arange(len(index)), ESM2Tokenizer(), 0)
    actor = Embedder(ActorConfig(resolve_model(path), None, "cuda", EmbedOptions(dtype="bfloat16")))
    eager = torch.from_numpy(actor.compute(batch))
    deadline = time.monotonic() + 300
    while actor.layers is None and actor.compiled and time.monotonic() < deadline:
        time.sleep(0.2)
    assert actor.layers is not None and actor.info()["compiled"], "the background compile did not finish"
    compiled = torch.from_numpy(actor.compute(batch))
    want = fair_esm_pooled(fair_esm_reference(4, 320, 20, seed=5), seqs)
    for got in (eager, compiled):
        assert F.cosine_similarity(got.double(), want.double(), dim=-1).min() >= MIN_COSINE


def test_esm2_bf16_per_residue_columns_match_fp32_fair_esm(tmp_path):
    """Every --include column of layers 3 and 6 in bf16 on the GPU against fair-esm in float32: per
    residue cosine >= 0.999, pooled >= MIN_COSINE."""
    import esm

    from virnucpro.models.columns import compute_columns, residue_counts
    from virnucpro.io.output import plan_columns

    path = write_esm2_checkpoint(tmp_path / "esm2_cols.pt", 6, 320, 20, seed=23)
    model = load_esm2(path, "cuda", torch.bfloat16)
    seqs = random_proteins(30, 30, 400, seed=9)
    columns = plan_columns((3, -1), ("mean", "bos", "per-token", "logits"), 6, "bos", has_logits=True)
    tokens, lengths, _ = ESM2Tokenizer().encode(seqs)
    with torch.inference_mode():
        got = compute_columns(model, torch.from_numpy(tokens).long().cuda(),
                              Packing.from_lengths(torch.from_numpy(lengths).cuda()), columns)
    counts = residue_counts(model, lengths).tolist()
    ref = fair_esm_reference(6, 320, 20, seed=23)
    _, _, batch = esm.data.Alphabet.from_architecture("ESM-1b").get_batch_converter()(list(enumerate(seqs)))
    with torch.no_grad():
        out = ref(batch, repr_layers=[3, 6])
    for c in columns:
        rep = out["logits"] if c.what == "logits" else out["representations"][c.layer]
        per_seq = [rep[i, 1:len(s) + 1] for i, s in enumerate(seqs)]
        mine = got[c.name].float().cpu()
        if c.what == "mean":
            want, bar = torch.stack([r.mean(0) for r in per_seq]), MIN_COSINE
        elif c.what == "bos":
            want, bar = rep[:, 0], 0.999
        else:
            want, bar = torch.cat(per_seq), 0.999
            assert mine.shape[0] == sum(counts)
        cos = F.cosine_similarity(mine.double(), want.double(), dim=-1)
        print(f"{c.name}: cosine min {cos.min():.5f}")
        assert cos.min() >= bar, c.name


def test_dnabert_s_bf16_per_token_matches_fp32_reference(tmp_path):
    from tests.reference_dnabert import load_reference_model, load_reference_tokenizer, reference_forward
    from virnucpro.models.columns import compute_columns
    from virnucpro.io.output import plan_columns

    path = write_dnabert_s_dir(tmp_path / "dnabert_cols", hidden=768, layers=4, heads=12, intermediate=3072, seed=4)
    model = load_dnabert_s(path, "cuda", torch.bfloat16)
    seqs = random_dna(20, 300, 520, seed=3)
    columns = plan_columns((2, -1), ("per-token",), 4, "cls")
    tokens, lengths, _ = DNABERTSTokenizer(path).encode(seqs)
    with torch.inference_mode():
        got = compute_columns(model, torch.from_numpy(tokens).long().cuda(),
                              Packing.from_lengths(torch.from_numpy(lengths).cuda()), columns)
    cfg, state = load_reference_model(path)
    tok = load_reference_tokenizer(path)
    for c in columns:
        want = torch.cat([reference_forward({**cfg, "num_hidden_layers": c.layer}, state, tok.encode(s).ids)
                          for s in seqs])
        cos = F.cosine_similarity(got[c.name].double().cpu(), want.double(), dim=-1)
        print(f"DNABERT-S {c.name}: cosine min {cos.min():.5f}")
        assert cos.min() >= 0.999, c.name
