"""What a MODEL argument is: its family, its files, its tokenizer. Plain data and no torch, so that the
command line checks a model before anything starts and a driver that sends its batches to a running
service never imports torch.

A MODEL argument is one of:
  * a fair-esm checkpoint name (`esm2_t36_3B_UR50D`), looked up in the torch hub cache
    (`$TORCH_HOME/hub/checkpoints/NAME.pt`, TORCH_HOME defaulting to ~/.cache/torch);
  * a path to a fair-esm `.pt` file;
  * a Hugging Face id (`zhihan1996/DNABERT-S`, `facebook/esm2_t33_650M_UR50D`), looked up in the HF
    cache (HF_HUB_CACHE, or HF_HOME/hub, or ~/.cache/huggingface/hub); nothing is downloaded;
  * a local directory with `config.json` and weights (DNABERT-S: and `tokenizer.json`; Hugging Face
    ESM-2: and `vocab.txt`, checked against fair-esm's alphabet when present).

What differs between model families (tokenizer, loader, checker, input alphabet, default batch size,
which model directories are theirs) is each family's `ModelFamily`, listed in FAMILIES below; the
model code of a family (and torch) is imported only where its weights are checked or loaded.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from virnucpro.errors import CheckpointError
from virnucpro.io.alphabet import DNA, PROTEIN
from virnucpro.models.tokenizers import DNABERTSTokenizer, ESM2Tokenizer, check_esm_vocab

# a batch's token budget on CPU, for every family: CPU batches stay small for memory locality
CPU_TOKS_PER_BATCH = 4096


@dataclass(frozen=True)
class ModelFamily:
    """What the rest of the package needs to know about one kind of model; `module` holds its code."""

    name: str  # recorded in ModelSource.family, the manifest and the service's labels
    title: str  # for messages
    sequence_kind: str  # virnucpro.io.alphabet.PROTEIN or DNA: the alphabet its input is validated against
    # (model path, truncation_seq_length) -> tokenizer: cheap, picklable, no torch
    tokenizer: Callable[[Path, int | None], Any]
    # the token budget of a batch on a GPU when --toks-per-batch is not given (CPU: CPU_TOKS_PER_BATCH)
    gpu_toks_per_batch: int
    # config.json of a model directory -> whether it is this family's; None: never read from a directory
    claims_dir: Callable[[dict], bool] | None
    # the module of its model code (torch): `load(path, device, dtype, attention_backend)` -> the model in
    # eval mode, and `describe(path)` -> its shape, from the weights' names and shapes without loading them
    module: str

    def load(self, path: Path, device, dtype, attention_backend: str = "auto"):
        return importlib.import_module(self.module).load(path, device, dtype, attention_backend)

    def describe(self, path: Path) -> ModelShape:
        return ModelShape(**importlib.import_module(self.module).describe(path))


@dataclass(frozen=True)
class ModelShape:
    """What a checkpoint holds, read from its names and shapes (`describe_model`)."""

    dim: int  # embedding width
    layers: int  # transformer layers (`--repr-layers` are 0..layers)
    logits: bool  # an LM head (`--include logits`)
    bos_name: str  # the first token's output column: "bos" (ESM-2's <cls>) or "cls" (DNABERT-S's [CLS])


@dataclass(frozen=True)
class ModelSource:
    """A MODEL argument resolved (`resolve_model`): plain data, so that a driver can receive it from a
    service without importing the model code (and torch)."""

    family: str  # a key of FAMILIES: "esm2" or "dnabert_s"
    path: Path  # the .pt file or the model directory
    name: str  # what the user asked for, recorded in the output
    sequence_kind: str  # its family's: the alphabet input is validated against

    @property
    def model_family(self) -> ModelFamily:
        return FAMILIES[self.family]


def _esm_tokenizer(path: Path, truncation_seq_length: int | None) -> ESM2Tokenizer:
    if path.is_dir():
        check_esm_vocab(path)  # an HF directory's vocab.txt must be the fixed alphabet the tokenizer has
    return ESM2Tokenizer(truncation_seq_length)


def _claims_esm_dir(config: dict) -> bool:
    """transformers' ESM config.json (model_type "esm"; or, without one, Esm* architectures). ESM-1b and
    ESMFold configs say "esm" too: they are claimed here and refused by the loader with the reason."""
    model_type = str(config.get("model_type", "")).lower()
    return model_type == "esm" or (not model_type and any(
        str(a).startswith("Esm") for a in config.get("architectures") or []))


def _claims_dnabert_dir(config: dict) -> bool:
    """A BERT-style config.json (DNABERT-S's says model_type "bert"; some copies say nothing) with a width."""
    return str(config.get("model_type", "")).lower() in ("bert", "") and "hidden_size" in config


FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (
    # on a GPU the actor's budget is what fills the chip (see bench/) without risking memory on 40 GB cards
    ModelFamily("esm2", "ESM-2", PROTEIN, _esm_tokenizer, 65536, _claims_esm_dir, "virnucpro.models.esm2"),
    # DNABERT-S does ~25x fewer FLOPs a token than ESM-2 3B: bigger batches keep the GPU busy while the
    # per-batch host work (reading, tokenising, the Parquet part) stays the same
    ModelFamily("dnabert_s", "DNABERT-S", DNA, DNABERTSTokenizer, 262144, _claims_dnabert_dir,
                "virnucpro.models.dnabert_s"),
)}
ESM2_FAMILY = "esm2"
DNABERT_S_FAMILY = "dnabert_s"


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


def describe_model(source: ModelSource) -> ModelShape:
    """Check the model's weights (names and shapes) against its architecture without loading them; its
    width, layers and LM head. The driver calls this before the actors start, so a wrong or damaged
    checkpoint fails at once with a CheckpointError. Imports the family's model code (torch)."""
    return source.model_family.describe(source.path)


def check_model(source: ModelSource) -> int:
    """`describe_model`'s check; the embedding width."""
    return describe_model(source).dim


def load_model(source: ModelSource, device, dtype, attention_backend: str = "auto"):
    """The model on `device` in eval mode (actor side). Imports the family's model code (torch)."""
    return source.model_family.load(source.path, device, dtype, attention_backend)


def default_toks_per_batch(source: ModelSource, device: str) -> int:
    """Tokens per batch when --toks-per-batch is not given: on a GPU ("cuda") the family's budget,
    elsewhere CPU_TOKS_PER_BATCH."""
    return source.model_family.gpu_toks_per_batch if device == "cuda" else CPU_TOKS_PER_BATCH
