"""Sanity tests of the DNABERT-S reference forward (tests/reference_dnabert.py) itself.

Everything runs on CPU against tiny random checkpoints that the tests write themselves
(config.json + model.safetensors / pytorch_model.bin + a tokenizer.json trained here).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from tests.reference_dnabert import (
    alibi_bias,
    alibi_slopes,
    load_reference_model,
    load_reference_tokenizer,
    reference_dnabert_embed,
    reference_dnabert_hidden,
)

SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]


# ----------------------------------------------------------------------------- helpers


def random_dna(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("ACGT") for _ in range(n))


def write_tokenizer(model_dir: Path, *, stored_padding: bool = True) -> Tokenizer:
    """A DNABERT-2-style BPE tokenizer: specials 0..4, then A C G T, a few learned merges."""
    rng = random.Random(1234)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=40,
        special_tokens=SPECIALS,
        initial_alphabet=["A", "C", "G", "T"],
        show_progress=False,
    )
    tok.train_from_iterator([random_dna(rng, 300) for _ in range(60)], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    if stored_padding:
        # What a hub tokenizer.json may carry; the reference must switch both off.
        tok.enable_padding(pad_id=3, pad_token="[PAD]", length=96)
        tok.enable_truncation(max_length=12)
    tok.save(str(model_dir / "tokenizer.json"))
    return tok


def tiny_config(**over) -> dict:
    cfg = {
        "hidden_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,  # not a power of two: exercises the mixed slope set
        "intermediate_size": 20,
        "vocab_size": 48,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "alibi_starting_size": 512,
        "max_position_embeddings": 512,
    }
    cfg.update(over)
    return cfg


def random_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, I, V, T = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["type_vocab_size"]

    def r(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    def ln():
        return 1.0 + r(H, std=0.1), r(H, std=0.1)

    s = {
        "embeddings.word_embeddings.weight": r(V, H, std=1.0),
        "embeddings.token_type_embeddings.weight": r(T, H, std=0.5),
    }
    s["embeddings.LayerNorm.weight"], s["embeddings.LayerNorm.bias"] = ln()
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        s[p + "attention.self.Wqkv.weight"] = r(3 * H, H)
        s[p + "attention.self.Wqkv.bias"] = r(3 * H, std=0.1)
        s[p + "attention.output.dense.weight"] = r(H, H)
        s[p + "attention.output.dense.bias"] = r(H, std=0.1)
        s[p + "attention.output.LayerNorm.weight"], s[p + "attention.output.LayerNorm.bias"] = ln()
        s[p + "mlp.gated_layers.weight"] = r(2 * I, H)
        s[p + "mlp.wo.weight"] = r(H, I)
        s[p + "mlp.wo.bias"] = r(H, std=0.1)
        s[p + "mlp.layernorm.weight"], s[p + "mlp.layernorm.bias"] = ln()
    s["pooler.dense.weight"] = r(H, H)
    s["pooler.dense.bias"] = r(H, std=0.1)
    return {k: v.contiguous() for k, v in s.items()}


def write_checkpoint(
    model_dir: Path,
    cfg: dict,
    state: dict[str, torch.Tensor],
    *,
    fmt: str = "safetensors",
    prefix: str = "",
) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    prefixed = {prefix + k: v for k, v in state.items()}
    if fmt == "safetensors":
        save_file(prefixed, str(model_dir / "model.safetensors"))
    else:
        torch.save(prefixed, str(model_dir / "pytorch_model.bin"))
    write_tokenizer(model_dir)
    return model_dir


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    cfg = tiny_config()
    return write_checkpoint(tmp_path / "tiny", cfg, random_state(cfg, seed=0))


@pytest.fixture
def seqs() -> list[str]:
    rng = random.Random(7)
    return [random_dna(rng, n) for n in (1, 5, 37, 120, 301)] + ["ACGTNNACGT", "ACGT"]


def token_ids(model_dir: Path, seq: str) -> list[int]:
    return load_reference_tokenizer(model_dir).encode(seq).ids


# ----------------------------------------------------------------------------- ALiBi slopes


def test_slopes_12_heads_exactly_as_reference_md():
    expected = [2.0**-k for k in (1, 2, 3, 4, 5, 6, 7, 8)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    assert alibi_slopes(12) == expected


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_slopes_power_of_two_are_geometric(n):
    got = alibi_slopes(n)
    assert got == [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    # Geometric with first term = ratio = 2^(-8/n), written the way the ALiBi paper does.
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    for i, s in enumerate(got):
        assert s == pytest.approx(start * start**i, rel=1e-12)


def test_slopes_8_and_16_heads_values():
    assert alibi_slopes(8) == [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
    assert alibi_slopes(16) == [2.0 ** (-k / 2) for k in range(1, 17)]
    assert alibi_slopes(16)[1::2] == alibi_slopes(8)


@pytest.mark.parametrize("n", [3, 5, 6, 12, 20, 24, 40])
def test_slopes_non_power_of_two(n):
    p = 2 ** math.floor(math.log2(n))
    got = alibi_slopes(n)
    assert len(got) == n
    assert got[:p] == alibi_slopes(p)
    assert got[p:] == alibi_slopes(2 * p)[0::2][: n - p]
    assert all(0.0 < s < 1.0 for s in got)


def test_alibi_bias_matrix():
    b = alibi_bias(6, 5)
    assert b.shape == (6, 5, 5)
    slopes = alibi_slopes(6)
    for h in range(6):
        for i in range(5):
            for j in range(5):
                assert b[h, i, j].item() == pytest.approx(-slopes[h] * abs(i - j), abs=1e-7)
    assert torch.equal(b, b.transpose(1, 2))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_stored_padding_switched_off(tiny_model):
    raw = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert [raw.token_to_id(t) for t in SPECIALS + ["A", "C", "G", "T"]] == list(range(9))
    assert raw.padding is not None and raw.truncation is not None  # stored in the file
    seq = "ACGT" * 20
    ids = token_ids(tiny_model, seq)
    assert ids[0] == 1 and ids[-1] == 2
    assert 3 not in ids  # no [PAD]
    assert len(ids) > 12  # not truncated to the stored max_length
    hidden = reference_dnabert_hidden(tiny_model, seq)
    assert hidden.shape == (len(ids), 24)


# ----------------------------------------------------------------------------- tiny random model


def test_tiny_model_shape_finite_deterministic(tiny_model, seqs):
    a = reference_dnabert_embed(tiny_model, seqs)
    b = reference_dnabert_embed(tiny_model, seqs)
    assert a.shape == (len(seqs), 24)
    assert a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    # Distinct sequences give distinct embeddings.
    assert not torch.allclose(a[2], a[3])


def test_embedding_is_mean_over_all_tokens_including_cls_sep(tiny_model, seqs):
    emb = reference_dnabert_embed(tiny_model, seqs)
    for i, s in enumerate(seqs):
        h = reference_dnabert_hidden(tiny_model, s)
        assert h.shape[0] == len(token_ids(tiny_model, s))
        assert torch.allclose(emb[i], h.mean(dim=0), atol=1e-6)
        assert not torch.allclose(emb[i], h[1:-1].mean(dim=0), atol=1e-4)


def test_padding_free_per_sequence(tiny_model, seqs):
    together = reference_dnabert_embed(tiny_model, seqs)
    for i, s in enumerate(seqs):
        alone = reference_dnabert_embed(tiny_model, [s])
        assert torch.equal(together[i], alone[0])
    shuffled = list(reversed(seqs))
    rev = reference_dnabert_embed(tiny_model, shuffled)
    assert torch.equal(rev, torch.flip(together, dims=[0]))
    # A long neighbour does not change a short sequence's embedding.
    mixed = reference_dnabert_embed(tiny_model, ["ACGTACGT" * 60, seqs[1]])
    assert torch.equal(mixed[1], together[1])


def test_float64_compute_close_to_float32(tiny_model, seqs):
    a = reference_dnabert_embed(tiny_model, seqs)
    b = reference_dnabert_embed(tiny_model, seqs, dtype=torch.float64)
    assert b.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-4)


def test_empty_list(tiny_model):
    assert reference_dnabert_embed(tiny_model, []).shape == (0, 24)


def test_pytorch_model_bin_with_bert_prefix(tmp_path, seqs):
    cfg = tiny_config()
    state = random_state(cfg, seed=3)
    st_dir = write_checkpoint(tmp_path / "st", cfg, state)
    bin_dir = write_checkpoint(tmp_path / "bin", cfg, state, fmt="bin", prefix="bert.")
    assert not (bin_dir / "model.safetensors").exists()
    _, loaded = load_reference_model(bin_dir)
    assert "embeddings.word_embeddings.weight" in loaded
    assert torch.equal(reference_dnabert_embed(st_dir, seqs), reference_dnabert_embed(bin_dir, seqs))


def test_missing_key_is_reported(tmp_path):
    cfg = tiny_config()
    state = random_state(cfg)
    del state["encoder.layer.1.mlp.wo.bias"]
    d = write_checkpoint(tmp_path / "broken", cfg, state)
    with pytest.raises(KeyError, match="lacks 1 keys"):
        load_reference_model(d)


# ----------------------------------------------------------------------------- hand checks


def _ln(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _embeddings(state, ids, eps):
    x = state["embeddings.word_embeddings.weight"][ids] + state["embeddings.token_type_embeddings.weight"][0]
    return _ln(x, state["embeddings.LayerNorm.weight"], state["embeddings.LayerNorm.bias"], eps)


def test_hand_check_zero_attention_output_and_zero_mlp(tmp_path):
    """With dense.weight = 0 and a zero MLP, one layer is LayerNorm(LayerNorm(LayerNorm(emb) + b) + b')."""
    eps = 1e-5
    cfg = tiny_config(num_hidden_layers=1, layer_norm_eps=eps)
    state = random_state(cfg, seed=11)
    p = "encoder.layer.0."
    state[p + "attention.output.dense.weight"].zero_()  # attention contributes only dense.bias
    state[p + "mlp.gated_layers.weight"].zero_()  # GELU(0) * 0 = 0
    state[p + "mlp.wo.weight"].zero_()  # the MLP contributes only wo.bias
    d = write_checkpoint(tmp_path / "ln", cfg, state)

    seq = "ACGTTGCAAC" * 3
    ids = torch.tensor(token_ids(d, seq))
    e = _embeddings(state, ids, eps)
    h1 = _ln(
        e + state[p + "attention.output.dense.bias"],
        state[p + "attention.output.LayerNorm.weight"],
        state[p + "attention.output.LayerNorm.bias"],
        eps,
    )
    h2 = _ln(h1 + state[p + "mlp.wo.bias"], state[p + "mlp.layernorm.weight"], state[p + "mlp.layernorm.bias"], eps)

    got = reference_dnabert_hidden(d, seq)
    assert got.shape == h2.shape
    assert torch.allclose(got, h2, atol=1e-5)
    assert torch.allclose(reference_dnabert_embed(d, [seq])[0], h2.mean(dim=0), atol=1e-5)


def test_hand_check_pure_alibi_attention(tmp_path):
    """Q = K = 0: attention weights are softmax_j(-slope_h |i - j|), written out by hand."""
    eps = 1e-12
    cfg = tiny_config(num_hidden_layers=1)
    H, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d_head = H // n_heads
    state = random_state(cfg, seed=5)
    p = "encoder.layer.0."
    state[p + "attention.self.Wqkv.weight"][: 2 * H].zero_()  # Q and K rows
    state[p + "attention.self.Wqkv.bias"][: 2 * H].zero_()
    state[p + "mlp.gated_layers.weight"].zero_()
    d = write_checkpoint(tmp_path / "alibi", cfg, state)

    seq = "GATTACA" * 4
    ids = torch.tensor(token_ids(d, seq))
    L = len(ids)
    x = _embeddings(state, ids, eps).double()
    v = x @ state[p + "attention.self.Wqkv.weight"][2 * H :].double().t() + state[p + "attention.self.Wqkv.bias"][
        2 * H :
    ].double()
    # 6 heads: the 4-head set 2^-2, 2^-4, 2^-6, 2^-8, then 2^-1, 2^-3 from the 8-head set.
    slopes = [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    ctx = torch.zeros(L, H, dtype=torch.float64)
    for h in range(n_heads):
        for i in range(L):
            weights = [math.exp(-slopes[h] * abs(i - j)) for j in range(L)]
            total = sum(weights)
            for j in range(L):
                ctx[i, h * d_head : (h + 1) * d_head] += weights[j] / total * v[j, h * d_head : (h + 1) * d_head]
    attn = ctx @ state[p + "attention.output.dense.weight"].double().t() + state[p + "attention.output.dense.bias"]
    h1 = _ln(
        attn + x,
        state[p + "attention.output.LayerNorm.weight"].double(),
        state[p + "attention.output.LayerNorm.bias"].double(),
        eps,
    )
    h2 = _ln(
        h1 + state[p + "mlp.wo.bias"].double(),
        state[p + "mlp.layernorm.weight"].double(),
        state[p + "mlp.layernorm.bias"].double(),
        eps,
    )
    got = reference_dnabert_hidden(d, seq, dtype=torch.float64)
    assert torch.allclose(got.double(), h2, atol=1e-5)


def test_hand_check_gated_mlp_first_half_through_gelu(tmp_path):
    """Attention output zeroed; the MLP must be GELU(first I columns) * (second I columns)."""
    eps = 1e-12
    cfg = tiny_config(num_hidden_layers=1)
    I = cfg["intermediate_size"]
    state = random_state(cfg, seed=9)
    p = "encoder.layer.0."
    state[p + "attention.output.dense.weight"].zero_()
    state[p + "attention.output.dense.bias"].zero_()
    d = write_checkpoint(tmp_path / "glu", cfg, state)

    seq = "CCGGAATT" * 5
    ids = torch.tensor(token_ids(d, seq))
    e = _embeddings(state, ids, eps)
    h1 = _ln(e, state[p + "attention.output.LayerNorm.weight"], state[p + "attention.output.LayerNorm.bias"], eps)
    g = h1 @ state[p + "mlp.gated_layers.weight"].t()

    def finish(m):
        out = m @ state[p + "mlp.wo.weight"].t() + state[p + "mlp.wo.bias"]
        return _ln(out + h1, state[p + "mlp.layernorm.weight"], state[p + "mlp.layernorm.bias"], eps)

    expected = finish(F.gelu(g[:, :I], approximate="none") * g[:, I:])
    swapped = finish(F.gelu(g[:, I:], approximate="none") * g[:, :I])
    tanh_gelu = finish(F.gelu(g[:, :I], approximate="tanh") * g[:, I:])
    got = reference_dnabert_hidden(d, seq)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, swapped, atol=1e-3)
    assert (got - tanh_gelu).abs().max() > 0  # exact erf GELU, not the tanh approximation
