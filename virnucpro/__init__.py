"""VirNucPro's library (no Ray), by layer: `io` (inputs anywhere, FASTA and its index, tables, the Parquet
output and its manifest), `models` (the registry of model families, tokenizers, ESM-2, DNABERT-S), `kernels`
(attention backends, Triton kernels, compiling), `pipeline` (VirNucPro: chunking and translation, the
classifier, prediction and training stages, plots), and beside them `batching` (plans and batches),
`options` and `errors`. The Ray driver and actors live in `cluster` and `actors`; the functions below are
the face a notebook needs."""

__version__ = "0.1.0"


def embed_sequences(sequences, model=None, *, service=None, **options):
    """Embed sequences held in memory (a list, (id, sequence) pairs, or a DataFrame / pyarrow Table with
    `id` and `sequence` columns) through a running `service` or on actors of this call; a pyarrow Table in
    their order. The driver's (`cluster.in_memory.embed_sequences`, which has the details): this package
    holds no Ray, so it is imported here on the call."""
    from cluster.in_memory import embed_sequences as embed

    return embed(sequences, model, service=service, **options)


def read_embeddings(out_dir):
    """All rows of a finished run in OUT_DIR (a path or a URI), in input order, as a pyarrow Table."""
    from .io.output import read_embeddings as read

    return read(out_dir)


def to_numpy(table, column: str = "embedding"):
    """An embedding column of a table (`embed_sequences`, `read_embeddings`) as a float array [N, D]."""
    from virnucpro.io.output import to_numpy as as_array

    return as_array(table, column)
