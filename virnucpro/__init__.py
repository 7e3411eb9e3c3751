"""VirNucPro's library (no Ray): sequence input and validation, VirNucPro preprocessing, tokenisation
and packing, the ESM-2 and DNABERT-S models and their checkpoint loaders, attention backends, the
classifier and the output schema. The Ray driver and actors live in `cluster` and `actors`."""

__version__ = "0.1.0"
