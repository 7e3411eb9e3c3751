"""The models: what a MODEL argument is (`registry`: torch-free, so that the command line and a driver
through a service check and plan without torch), their tokenizers, and their code: ESM-2 (`esm2`),
DNABERT-S (`dnabert_s`), the output columns of a batch (`columns`). Importing this package imports no
torch; `check_model` and `load_model` import a family's code where they are called."""

from virnucpro.models.registry import (CPU_TOKS_PER_BATCH, DNABERT_S_FAMILY, ESM2_FAMILY, FAMILIES, CheckpointError, ModelFamily,
                       ModelShape, ModelSource, check_model, default_toks_per_batch, describe_model, load_model,
                       load_tokenizer, resolve_model)

__all__ = ["ModelSource", "ModelFamily", "ModelShape", "FAMILIES", "resolve_model", "load_tokenizer", "load_model",
           "check_model", "describe_model", "default_toks_per_batch", "CheckpointError", "CPU_TOKS_PER_BATCH",
           "ESM2_FAMILY", "DNABERT_S_FAMILY"]
