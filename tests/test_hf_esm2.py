"""Hugging Face ESM-2 directories and cached ids, against transformers' own EsmModel (float32, CPU).

Tiny random models are built with transformers and saved as the hub holds them: `save_pretrained`
(safetensors, one file or shards), a `pytorch_model.bin` of the state dict, EsmModel and EsmForMaskedLM
names, vocab.txt from EsmTokenizer, and an HF cache (`models--org--name/snapshots/<rev>/`, files linked
to blobs). Ours must give the same per-token hidden states and residue means, within 1e-5 relative L2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import random_proteins
from virnucpro.kernels.attention import Packing
from virnucpro.models import CheckpointError, check_model, load_model, load_tokenizer, resolve_model
from virnucpro.models.esm2 import ALPHABET, MASK, read_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers builds the reference ESM-2 models")

TOL = 1e-5
SEQS = random_proteins(6, 1, 70, seed=5) + ["MKV" + "XBZUO" * 3, "W"]  # mixed lengths, rare tokens


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per row."""
    return (a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)


def hf_esm2(cls_name: str, layers: int, dim: int, heads: int, seed: int = 0, **config):
    """A transformers ESM-2 with random weights (large enough that attention and norms matter), in eval mode."""
    settings = dict(vocab_size=33, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=4 * dim, position_embedding_type="rotary", token_dropout=True,
                    emb_layer_norm_before=False, layer_norm_eps=1e-5, mask_token_id=MASK, pad_token_id=1,
                    max_position_embeddings=1026)  # as facebook/esm2_* config.json say
    cfg = transformers.EsmConfig(**{**settings, **config})
    model = getattr(transformers, cls_name)(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = name.endswith(("LayerNorm.weight", "layer_norm.weight", "layer_norm_after.weight"))
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if is_norm_weight else 0.0))
    return model


def save_as_hub(model, path: Path, fmt: str) -> Path:
    """The model as a hub directory: `save_pretrained` safetensors (`sharded`: small shards and an index),
    or `bin`: pytorch_model.bin of the state dict; and EsmTokenizer's vocab.txt of fair-esm's alphabet."""
    import esm

    if fmt == "bin":
        path.mkdir(parents=True)
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(path, max_shard_size="40KB" if fmt == "sharded" else "50GB")
    vocab = path.parent / f"{path.name}-vocab.txt"
    vocab.write_text("\n".join(esm.data.Alphabet.from_architecture("ESM-1b").all_toks) + "\n")
    transformers.EsmTokenizer(str(vocab)).save_pretrained(path)
    return path


def hf_reference(model, tokenizer_dir: Path, seqs: list[str], mask_at: dict[int, list[int]]):
    """transformers' EsmModel on a padded batch: token ids per sequence and last_hidden_state per sequence."""
    esm_model = getattr(model, "esm", model)  # EsmForMaskedLM holds an EsmModel
    batch = transformers.EsmTokenizer.from_pretrained(tokenizer_dir)(seqs, padding=True, return_tensors="pt")
    ids = batch["input_ids"].clone()
    for i, positions in mask_at.items():
        ids[i, positions] = MASK
    with torch.no_grad():
        hidden = esm_model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
    lengths = batch["attention_mask"].sum(1).tolist()
    return [ids[i, :n] for i, n in enumerate(lengths)], [hidden[i, :n] for i, n in enumerate(lengths)]


def ours(source, seqs: list[str], mask_at: dict[int, list[int]]):
    """Our tokenizer and packed model: token ids, per-token hidden states [T, D] and residue means [B, D]."""
    tokens, lengths, _ = load_tokenizer(source).encode(seqs)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for i, positions in mask_at.items():
        tokens[starts[i] + np.asarray(positions)] = MASK
    model = load_model(source, "cpu", torch.float32)
    tokens_t, packing = torch.from_numpy(tokens).long(), Packing.from_lengths(torch.from_numpy(lengths))
    with torch.no_grad():
        return tokens_t, model(tokens_t, packing), model.embed(tokens_t, packing), lengths


@pytest.mark.parametrize("cls_name,fmt,shape", [
    ("EsmModel", "safetensors", (2, 64, 4)),
    ("EsmForMaskedLM", "safetensors", (3, 120, 20)),
    ("EsmForMaskedLM", "bin", (2, 64, 4)),
    ("EsmModel", "bin", (2, 40, 5)),
    ("EsmForMaskedLM", "sharded", (2, 64, 4)),
])
def test_hf_esm2_matches_transformers(tmp_path, cls_name, fmt, shape):
    model = hf_esm2(cls_name, *shape, seed=sum(shape))
    model_dir = save_as_hub(model, tmp_path / "esm2", fmt)
    if fmt == "sharded":
        assert (model_dir / "model.safetensors.index.json").is_file()
    source = resolve_model(model_dir)
    assert source.family == "esm2" and check_model(source) == shape[1]
    mask_at = {0: [1, 3], 2: [2]}  # <mask> tokens: ESM-2's token-dropout rescaling must agree too
    want_ids, want_hidden = hf_reference(model, model_dir, SEQS, mask_at)
    tokens, hidden, means, lengths = ours(source, SEQS, mask_at)
    assert torch.equal(tokens, torch.cat(want_ids))  # the same tokenizer: <cls> residues <eos>
    per_token = rel_err(hidden, torch.cat(want_hidden))
    assert per_token.max() < TOL, per_token.max()
    want_means = torch.stack([h[1:-1].mean(0) for h in want_hidden])  # residues: no <cls>, no <eos>
    pooled = rel_err(means, want_means)
    assert pooled.max() < TOL, pooled.max()
    assert hidden.shape == (int(lengths.sum()), shape[1])


def test_lm_head_is_read_under_fair_esm_names(tmp_path):
    """The translated state dict is fair-esm's whole ESM-2 (LM and contact heads included): fair-esm's own
    model holding it gives transformers' logits, so a later `logits` output can use lm_head.* as read."""
    esm = pytest.importorskip("esm")
    model = hf_esm2("EsmForMaskedLM", 2, 64, 4, seed=9)
    config, state = read_checkpoint(save_as_hub(model, tmp_path / "esm2", "safetensors"))
    ref = esm.model.esm2.ESM2(config.num_layers, config.embed_dim, config.attention_heads,
                              esm.data.Alphabet.from_architecture("ESM-1b"), token_dropout=config.token_dropout)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("rot_emb.inv_freq") for k in missing), (missing, unexpected)
    ids = torch.tensor([[0, 20, 15, 7, 5, 23, 2], [0, 4, MASK, 6, 2, 1, 1]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=(ids != 1).long()).logits
        got = ref.eval()(ids)["logits"]
    valid = ids != 1
    assert rel_err(got[valid], want[valid]).max() < TOL


def test_hf_cache_id(tmp_path, monkeypatch):
    """`facebook/esm2_...` from the HF cache as the hub client leaves it: snapshot files linked to blobs."""
    model = hf_esm2("EsmForMaskedLM", 2, 64, 4, seed=2)
    saved = save_as_hub(model, tmp_path / "download", "safetensors")
    repo = tmp_path / "hf" / "hub" / "models--facebook--esm2_t2_tiny_UR50D"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(saved.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    source = resolve_model("facebook/esm2_t2_tiny_UR50D")
    assert (source.family, source.path, source.name) == ("esm2", snap, "facebook/esm2_t2_tiny_UR50D")
    assert check_model(source) == 64
    _, hidden, _, _ = ours(source, SEQS, {})
    _, by_dir, _, _ = ours(resolve_model(saved), SEQS, {})
    assert torch.equal(hidden, by_dir)


def test_check_reads_no_weights(tmp_path, monkeypatch):
    """The driver's check sees names and shapes only: no tensor is taken from a safetensors file, and a
    .bin is only memory-mapped."""
    import safetensors

    real = safetensors.safe_open

    class NoTensors:
        def __init__(self, *args, **kwargs):
            self.handle = real(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return self.inner.get_slice(name)

        def get_tensor(self, name):
            raise AssertionError(f"the check read tensor {name}")

    model = hf_esm2("EsmModel", 2, 48, 4, seed=4)
    st_dir = save_as_hub(model, tmp_path / "st", "safetensors")
    bin_dir = save_as_hub(model, tmp_path / "bin", "bin")
    monkeypatch.setattr(safetensors, "safe_open", NoTensors)
    assert check_model(resolve_model(st_dir)) == 48
    loads = []
    real_load = torch.load

    def mmap_only(*args, **kwargs):
        loads.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", mmap_only)
    assert check_model(resolve_model(bin_dir)) == 48
    assert loads == [True]
    with pytest.raises(CheckpointError, match="read tensor"):  # the spy does catch a load
        load_model(resolve_model(st_dir), "cpu", torch.float32)


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change,message", [
    (dict(position_embedding_type="absolute"), r"position_embedding_type 'absolute': ESM-2 has rotary positions"),
    (dict(emb_layer_norm_before=True), r"emb_layer_norm_before is true: ESM-2 has no embedding layer norm"),
    (dict(intermediate_size=100), r"intermediate_size 100 is not 4 x hidden_size 64"),
    (dict(is_folding_model=True), r"an ESMFold model"),
    (dict(vocab_size=35), r"vocab_size 35: ESM-2 has 33 tokens"),
    (dict(layer_norm_eps=1e-12), r"layer_norm_eps 1e-12: ESM-2's is 1e-05"),
    (dict(num_hidden_layers=3), r"config.json \(3 layers, hidden_size 64\) disagrees with the weights \(2 layers"),
    (dict(hidden_size=None), r"needs integer num_hidden_layers, hidden_size"),
])
def test_refused_configs(tmp_path, change, message):
    model_dir = save_as_hub(hf_esm2("EsmModel", 2, 64, 4), tmp_path / "esm", "safetensors")
    _edit_config(model_dir, **change)
    with pytest.raises(CheckpointError, match=message) as e:
        check_model(resolve_model(model_dir))
    assert "\n" not in str(e.value) and str(model_dir) in str(e.value)


def test_absolute_position_model_is_refused_on_load_too(tmp_path):
    """An ESM-1b style model (absolute positions, embedding layer norm) as transformers saves it."""
    model = hf_esm2("EsmModel", 2, 64, 4, position_embedding_type="absolute", emb_layer_norm_before=True)
    source = resolve_model(save_as_hub(model, tmp_path / "esm1b", "safetensors"))
    assert source.family == "esm2"  # claimed as an ESM config.json, then refused with the reason
    for attempt in (check_model, lambda s: load_model(s, "cpu", torch.float32)):
        with pytest.raises(CheckpointError, match="position_embedding_type 'absolute'") as e:
            attempt(source)
        assert "\n" not in str(e.value)


def test_vocab_must_be_fair_esm_alphabet(tmp_path):
    model_dir = save_as_hub(hf_esm2("EsmModel", 2, 64, 4), tmp_path / "esm", "safetensors")
    swapped = ALPHABET.copy()
    swapped[4], swapped[5] = swapped[5], swapped[4]
    (model_dir / "vocab.txt").write_text("\n".join(swapped) + "\n")
    source = resolve_model(model_dir)
    for attempt in (check_model, load_tokenizer):
        with pytest.raises(CheckpointError, match=r"vocab.txt: not ESM-2's alphabet \(33 tokens; token 4 is 'A', "
                                                  r"expected 'L'\)") as e:
            attempt(source)
        assert "\n" not in str(e.value)
    (model_dir / "vocab.txt").unlink()  # without one, the alphabet is fair-esm's (config says 33 tokens)
    assert check_model(source) == 64 and load_tokenizer(source).encode(["MK"])[0].tolist() == [0, 20, 15, 2]
