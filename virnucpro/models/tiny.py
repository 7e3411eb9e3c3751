"""Tiny random-weight models written in the real checkpoint formats.

This machine cannot download weights, so the demo, the tests and the benchmarks make their own
models: a fair-esm `.pt` checkpoint (fair-esm's parameter names, prefixes and Namespace cfg) and a
DNABERT-S directory (`config.json`, weights, a BPE `tokenizer.json` built with HF tokenizers). They
go through exactly the loading code real checkpoints go through. Their embeddings mean nothing.

The same functions write random models of the real shapes for benchmarks
(e.g. `write_esm2_checkpoint(path, 36, 2560, 40)`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from virnucpro.models.tokenizers import ALPHABET

SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]


def _randn(gen: torch.Generator, *shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std + mean


def esm2_state_dict(num_layers: int, embed_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ESM-2 parameters under fair-esm's checkpoint names (before its prefix upgrade)."""
    g = torch.Generator().manual_seed(seed)
    d, v = embed_dim, len(ALPHABET)
    enc = "encoder.sentence_encoder."
    sd = {enc + "embed_tokens.weight": _randn(g, v, d, std=1.0)}
    for i in range(num_layers):
        p = f"{enc}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = _randn(g, d, d, std=d ** -0.5)
            sd[p + f"self_attn.{proj}.bias"] = _randn(g, d)
        sd[p + "self_attn.rot_emb.inv_freq"] = torch.zeros(1)  # fair-esm saves it; loaders ignore it
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            sd[p + f"{ln}.weight"] = _randn(g, d, std=0.1, mean=1.0)
            sd[p + f"{ln}.bias"] = _randn(g, d, std=0.1)
        sd[p + "fc1.weight"] = _randn(g, 4 * d, d, std=d ** -0.5)
        sd[p + "fc1.bias"] = _randn(g, 4 * d)
        sd[p + "fc2.weight"] = _randn(g, d, 4 * d, std=(4 * d) ** -0.5)
        sd[p + "fc2.bias"] = _randn(g, d)
    sd[enc + "emb_layer_norm_after.weight"] = _randn(g, d, std=0.1, mean=1.0)
    sd[enc + "emb_layer_norm_after.bias"] = _randn(g, d, std=0.1)
    # the LM head, present in every real checkpoint and unused for embeddings
    sd["encoder.lm_head.dense.weight"] = _randn(g, d, d)
    sd["encoder.lm_head.dense.bias"] = torch.zeros(d)
    sd["encoder.lm_head.layer_norm.weight"] = torch.ones(d)
    sd["encoder.lm_head.layer_norm.bias"] = torch.zeros(d)
    sd["encoder.lm_head.weight"] = sd[enc + "embed_tokens.weight"]
    sd["encoder.lm_head.bias"] = torch.zeros(v)
    return sd


def write_esm2_checkpoint(path: str | Path, num_layers: int = 2, embed_dim: int = 64,
                          attention_heads: int = 4, seed: int = 0) -> Path:
    """Write a random ESM-2 `.pt` checkpoint in fair-esm's format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = argparse.Namespace(encoder_layers=num_layers, encoder_embed_dim=embed_dim,
                             encoder_ffn_embed_dim=4 * embed_dim, encoder_attention_heads=attention_heads,
                             token_dropout=True, arch="ESM-1b")
    torch.save({"model": esm2_state_dict(num_layers, embed_dim, seed), "cfg": {"model": cfg},
                "args": None}, path)
    return path


def build_dna_tokenizer(vocab_size: int = 64, seed: int = 0):
    """A BPE tokenizer shaped like DNABERT-2's: specials 0-4, then A C G T, then learned merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    rng = np.random.default_rng(seed)
    corpus = ["".join(rng.choice(list("ACGT"), size=200)) for _ in range(200)]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=list("ACGT"), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return tok


def dnabert_s_state_dict(hidden: int, layers: int, intermediate: int, vocab: int,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "embeddings.word_embeddings.weight": _randn(g, vocab, hidden, std=1.0),
        "embeddings.token_type_embeddings.weight": _randn(g, 2, hidden, std=0.1),
        "embeddings.LayerNorm.weight": _randn(g, hidden, std=0.1, mean=1.0),
        "embeddings.LayerNorm.bias": _randn(g, hidden, std=0.1),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        sd[p + "attention.self.Wqkv.weight"] = _randn(g, 3 * hidden, hidden, std=hidden ** -0.5)
        sd[p + "attention.self.Wqkv.bias"] = _randn(g, 3 * hidden)
        sd[p + "attention.output.dense.weight"] = _randn(g, hidden, hidden, std=hidden ** -0.5)
        sd[p + "attention.output.dense.bias"] = _randn(g, hidden)
        sd[p + "attention.output.LayerNorm.weight"] = _randn(g, hidden, std=0.1, mean=1.0)
        sd[p + "attention.output.LayerNorm.bias"] = _randn(g, hidden, std=0.1)
        sd[p + "mlp.gated_layers.weight"] = _randn(g, 2 * intermediate, hidden, std=hidden ** -0.5)
        sd[p + "mlp.wo.weight"] = _randn(g, hidden, intermediate, std=intermediate ** -0.5)
        sd[p + "mlp.wo.bias"] = _randn(g, hidden)
        sd[p + "mlp.layernorm.weight"] = _randn(g, hidden, std=0.1, mean=1.0)
        sd[p + "mlp.layernorm.bias"] = _randn(g, hidden, std=0.1)
    sd["pooler.dense.weight"] = _randn(g, hidden, hidden)  # in the real files, unused for embeddings
    sd["pooler.dense.bias"] = torch.zeros(hidden)
    return sd


def write_dnabert_s_dir(path: str | Path, hidden: int = 48, layers: int = 2, heads: int = 12,
                        intermediate: int = 96, vocab_size: int = 64, seed: int = 0,
                        safetensors: bool = False) -> Path:
    """Write a random DNABERT-S model directory: config.json, weights, tokenizer.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_dna_tokenizer(vocab_size, seed)
    tok.save(str(path / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    config = {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": intermediate,
        "vocab_size": vocab, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "alibi_starting_size": 512,
        "hidden_act": "gelu", "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.1,
        "pad_token_id": 0, "max_position_embeddings": 512,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    sd = dnabert_s_state_dict(hidden, layers, intermediate, vocab, seed)
    if safetensors:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    else:
        torch.save(sd, path / "pytorch_model.bin")
    return path
