"""Shared fixtures: tiny random models in the real checkpoint formats, and the fair-esm reference."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import pytest
import torch

from virnucpro.models.tiny import esm2_state_dict, write_dnabert_s_dir, write_esm2_checkpoint

AMINO = list("ACDEFGHIKLMNPQRSTVWY")

# Upstream VirNucPro's classifier as its training script defines it: in `__main__`, so that
# `torch.save(model)` pickles it as `__main__.MLPClassifier`. Tests append what to save and run the
# script in a fresh interpreter.
UPSTREAM_CLASSIFIER_CLASS = textwrap.dedent("""
    import sys, torch
    import torch.nn.functional as F
    from torch import nn

    class MLPClassifier(nn.Module):
        def __init__(self, input_dim, hidden_dim, num_class):
            super(MLPClassifier, self).__init__()
            self.hidden_layer = nn.Linear(input_dim, hidden_dim)
            self.bn1 = nn.BatchNorm1d(hidden_dim)
            self.output_layer = nn.Linear(hidden_dim, num_class)
            self.dropout = nn.Dropout(0.5)

        def forward(self, x):
            x = F.relu(self.bn1(self.hidden_layer(x)))
            return self.output_layer(self.dropout(x))
""")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_proteins(n: int, low: int, high: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(AMINO, int(rng.integers(low, high + 1)))) for _ in range(n)]


def random_dna(n: int, low: int, high: int, seed: int = 0, alphabet: str = "ACGT") -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(alphabet), int(rng.integers(low, high + 1)))) for _ in range(n)]


def write_fasta(path, seqs: list[str], prefix: str = "seq") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(len(seqs))]
    with open(path, "w") as f:
        for rid, s in zip(ids, seqs):
            f.write(f">{rid} description\n")
            for j in range(0, len(s), 60):
                f.write(s[j:j + 60] + "\n")
    return ids


def fair_esm_reference(num_layers: int, embed_dim: int, heads: int, seed: int):
    """fair-esm's own ESM2 holding the weights that write_esm2_checkpoint writes for the same seed."""
    import esm

    model = esm.model.esm2.ESM2(num_layers, embed_dim, heads, esm.data.Alphabet.from_architecture("ESM-1b"))
    state = {re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", k): v
             for k, v in esm2_state_dict(num_layers, embed_dim, seed).items()}
    state = {k: v for k, v in state.items() if not k.endswith("rot_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rot_emb" in k or "contact_head" in k for k in missing)
    return model.eval()


def fair_esm_pooled(model, seqs: list[str], layer: int | None = None) -> torch.Tensor:
    """fair-esm's padded batch forward, mean over residues 1..len (as extract.py / VirNucPro)."""
    import esm

    layer = layer or model.num_layers
    converter = esm.data.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    _, _, tokens = converter([(str(i), s) for i, s in enumerate(seqs)])
    with torch.no_grad():
        rep = model(tokens, repr_layers=[layer])["representations"][layer]
    return torch.stack([rep[i, 1:len(s) + 1].mean(0) for i, s in enumerate(seqs)])


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for a test module (2 CPUs, no dashboard): the driver joins it instead of starting one."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def esm_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "esm2_tiny.pt"
    return write_esm2_checkpoint(path, num_layers=2, embed_dim=64, attention_heads=4, seed=3)


@pytest.fixture(scope="session")
def dnabert_tiny(tmp_path_factory):
    return write_dnabert_s_dir(tmp_path_factory.mktemp("models") / "dnabert_s", seed=5)
