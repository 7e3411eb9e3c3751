"""VirNucPro's library (no Ray): sequence input and validation, VirNucPro preprocessing, tokenisation
and packing, the ESM-2 and DNABERT-S models and their checkpoint loaders, attention backends, the
classifier and the output schema. The Ray driver and actors live in `cluster` and `actors`."""

__version__ = "0.1.0"


def embed_sequences(sequences, model=None, *, service=None, **options):
    """Embed sequences held in memory (a list, (id, sequence) pairs, or a DataFrame / pyarrow Table with
    `id` and `sequence` columns) through a running `service` or on actors of this call; a pyarrow Table in
    their order. The driver's (`cluster.in_memory.embed_sequences`, which has the details): this package
    holds no Ray, so it is imported here on the call."""
    from cluster.in_memory import embed_sequences as embed

    return embed(sequences, model, service=service, **options)


def to_numpy(table, column: str = "embedding"):
    """An embedding column of a table (`embed_sequences`, `read_embeddings`) as a float array [N, D]."""
    from .output import to_numpy as as_array

    return as_array(table, column)
