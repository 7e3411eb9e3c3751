"""Finding a model, telling its family, and loading its tokenizer (driver side) or weights (actor side).

A MODEL argument is one of:
  * a fair-esm checkpoint name (`esm2_t36_3B_UR50D`), looked up in the torch hub cache
    (`$TORCH_HOME/hub/checkpoints/NAME.pt`, TORCH_HOME defaulting to ~/.cache/torch);
  * a path to a fair-esm `.pt` file;
  * a Hugging Face id (`zhihan1996/DNABERT-S`, `facebook/esm2_t33_650M_UR50D`), looked up in the HF
    cache (HF_HUB_CACHE, or HF_HOME/hub, or ~/.cache/huggingface/hub); nothing is downloaded;
  * a local directory with `config.json` and weights (DNABERT-S: and `tokenizer.json`; Hugging Face
    ESM-2: and `vocab.txt`, checked against fair-esm's alphabet when present).

What differs between model families (tokenizer, loader, checker, input alphabet, default batch size,
which model directories are theirs) is each family's `ModelFamily`, defined in its module and listed
in FAMILIES below; the functions here look it up by `ModelSource.family`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..attention import Packing
from ..checkpoint import CheckpointError, ModelSource
from ..output import Column
from . import dnabert_s, esm2
from .dnabert_s import DNABERTS
from .esm2 import ESM2
from .family import ModelFamily

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (
    esm2.FAMILY,
    dnabert_s.FAMILY,
)}
ESM2_FAMILY = esm2.FAMILY.name  # "esm2"
DNABERT_S_FAMILY = dnabert_s.FAMILY.name  # "dnabert_s"
# a batch's token budget on CPU, for every family: CPU batches stay small for memory locality
CPU_TOKS_PER_BATCH = 4096


def _torch_hub_dir() -> Path:
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(home) / "hub" / "checkpoints"


def _hf_snapshot(repo_id: str) -> Path | None:
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if snap.is_dir():
            return snap
    snaps = sorted((repo / "snapshots").glob("*"))
    return snaps[-1] if snaps else None


def _family_of_dir(path: Path) -> str:
    """The family whose model directory this is, by its config.json."""
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path}: a model directory needs config.json and weights")
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config}: not readable ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config}: not a model config (a JSON object)")
    model_type = str(raw.get("model_type", "")).lower()
    for family in FAMILIES.values():
        if family.claims_dir is not None and family.claims_dir(raw):
            return family.name
    readers = " or ".join(f.title for f in FAMILIES.values() if f.claims_dir is not None)
    raise CheckpointError(f"{path}: config.json describes a '{model_type}' model, not {readers}")


def _source(family: str, path: Path, name: str) -> ModelSource:
    return ModelSource(family, path, name, FAMILIES[family].sequence_kind)


def resolve_model(spec: str | Path) -> ModelSource:
    """Turn a MODEL argument into a local file or directory and a family (see module docstring)."""
    text = str(spec)
    # absolute: actors and service replicas resolve a relative path in their own working directory
    # (where `ray start` ran), not the user's
    path = Path(text).expanduser().absolute()
    if path.is_file():
        if path.suffix != ".pt":
            raise CheckpointError(f"{path}: expected a fair-esm .pt file or a model directory")
        return _source(ESM2_FAMILY, path, text)
    if path.is_dir():
        return _source(_family_of_dir(path), path, text)
    if text.startswith("esm") and "/" not in text:
        hub = _torch_hub_dir() / f"{text.removesuffix('.pt')}.pt"
        if hub.is_file():
            return _source(ESM2_FAMILY, hub, text)
        raise CheckpointError(f"model '{text}': not in the torch hub cache ({hub}); nothing is downloaded - "
                              f"fetch it there first or give a path")
    if text.count("/") == 1 and not text.startswith((".", "/")):
        snap = _hf_snapshot(text)
        if snap is not None:
            return _source(_family_of_dir(snap), snap, text)
        raise CheckpointError(f"model '{text}': not in the Hugging Face cache; nothing is downloaded - "
                              f"fetch it first (huggingface-cli download {text}) or give a directory")
    raise CheckpointError(f"model '{text}': no such file or directory, and not a known checkpoint name")


def load_tokenizer(source: ModelSource, truncation_seq_length: int | None = 1022):
    """The tokenizer alone: cheap and picklable; the driver plans with it, each actor tokenises its batches."""
    return source.model_family.tokenizer(source.path, truncation_seq_length)


def load_model(source: ModelSource, device: torch.device | str, dtype: torch.dtype,
               attention_backend: str = "auto") -> ESM2 | DNABERTS:
    return source.model_family.load(source.path, device, dtype, attention_backend)


def check_model(source: ModelSource) -> int:
    """Check the model's weights (names and shapes) against its architecture without loading them;
    returns the embedding width. The driver calls this before starting Ray, so a wrong or damaged
    checkpoint fails at once with a CheckpointError, not after the actors are up."""
    return source.model_family.check(source.path)


def compute_columns(model: ESM2 | DNABERTS, tokens: torch.Tensor, packing: Packing, columns: list[Column],
                    dtype: torch.dtype = torch.float32, layers: list | None = None) -> dict[str, torch.Tensor]:
    """Each output column of one packed batch, on the model's device, in `dtype`: [B, D] for a
    per-sequence column, [R, D] for a per-token one (the residues of every sequence in order, without
    the model's special tokens at either end: `model.specials`). Only the layers needed are run.
    Means are taken in float32 whatever the model's dtype. `layers`: compiled versions of the layers."""
    need = tuple(sorted({c.layer for c in columns}))
    hidden = model.hidden_states(tokens, packing, need, layers)
    first, last = model.specials
    residue = (packing.position >= first) & (packing.position < packing.lengths[packing.seq_index] - last)
    out = {}
    for c in columns:
        h = hidden[c.layer]
        if c.what == "mean":
            value = packing.mean(h, first, last)
        elif c.what == "bos":
            value = h[packing.cu_seqlens[:-1].long()]
        elif c.what == "per_token":
            value = h[residue]
        else:  # logits, of the residues only (per_token's rows)
            value = model.logits(h[residue])
        out[c.name] = value.to(dtype)
    return out


def residue_counts(model: ESM2 | DNABERTS, seq_tokens: np.ndarray) -> np.ndarray:
    """Rows each sequence has in per-token columns: its tokens less the model's special ones."""
    return np.maximum(np.asarray(seq_tokens, np.int64) - sum(model.specials), 0)


def default_toks_per_batch(source: ModelSource, device: str) -> int:
    """Tokens per batch when --toks-per-batch is not given: on a GPU ("cuda") the family's budget,
    elsewhere CPU_TOKS_PER_BATCH."""
    return source.model_family.gpu_toks_per_batch if device == "cuda" else CPU_TOKS_PER_BATCH


__all__ = ["compute_columns", "residue_counts", "ModelSource", "ModelFamily", "FAMILIES", "resolve_model", "load_tokenizer", "load_model",
           "check_model", "default_toks_per_batch", "CheckpointError", "CPU_TOKS_PER_BATCH",
           "ESM2", "DNABERTS", "ESM2_FAMILY", "DNABERT_S_FAMILY"]
