"""Sequences from Python, embeddings back as a table: no FASTA to write, no output directory to read.

    import virnucpro
    table = virnucpro.embed_sequences(["MKTAYIAK...", ...], service="esm")        # a running service
    table = virnucpro.embed_sequences(df, model="esm2_t33_650M_UR50D")           # actors of this call
    vectors = virnucpro.to_numpy(table)                                          # [N, D] float32

`sequences` is a list of strings (ids `seq0`, `seq1`, ...), a list of (id, sequence) pairs, or a pandas
DataFrame or pyarrow Table with `id` and `sequence` columns (other names: `id_column=`,
`sequence_column=`). They are validated as `virnucpro embed` validates a FASTA's records, and come back
in their order: columns `id`, `index` (the position in `sequences`), `length`, `truncated`, `model`,
`embedding` (the mean of the last layer, float32).

Through a service the call sends the sequences to its ingress, which batches them, retries a batch whose
replica dies and returns the embeddings: it imports no torch and starts nothing. Without one it starts
its own actors (one per GPU, or one on CPU) for the call, as `embed` does, and stops them at the end:
for many calls, start a service (`virnucpro serve start`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from virnucpro.batching import token_batches
from virnucpro.models.registry import ModelSource, load_tokenizer, resolve_model
from virnucpro.options import EmbedOptions, OptionError
from virnucpro.io.output import embedding_schema
from virnucpro.io.alphabet import SequenceError, normalise

log = logging.getLogger("virnucpro")


def embed_sequences(sequences, model: str | None = None, *, service: str | None = None, id_column: str = "id",
                    sequence_column: str = "sequence", **options) -> pa.Table:
    """Embed sequences held in memory; a pyarrow Table in their order (see the module docstring). `model`:
    a MODEL as `virnucpro embed` takes it, for actors of this call; `service`: a running service's name
    instead. Other options are `EmbedOptions` fields (device, dtype, toks_per_batch, address, ...)."""
    if (model is None) == (service is None):
        raise OptionError("give model=MODEL or service=NAME (a running service's model), not both")
    opts = EmbedOptions(service=service, **options)
    ids, raw = records(sequences, id_column, sequence_column)
    if service:
        return _through_service(ids, raw, opts)
    return _on_own_actors(ids, raw, resolve_model(model), opts)


def records(sequences, id_column: str = "id", sequence_column: str = "sequence") -> tuple[list[str], list[str]]:
    """(ids, sequences) of the forms `embed_sequences` takes."""
    if isinstance(sequences, (str, bytes)):
        raise TypeError("sequences: give a list of sequences (a single string is one sequence: [seq])")
    if hasattr(sequences, "to_pandas") or hasattr(sequences, "columns"):  # a pyarrow Table or a pandas DataFrame
        table = sequences if isinstance(sequences, pa.Table) else pa.Table.from_pandas(sequences, preserve_index=False)
        for column in (id_column, sequence_column):
            if column not in table.column_names:
                raise OptionError(f"sequences: no column '{column}' (columns: {', '.join(table.column_names)}); "
                                 f"name them with id_column= and sequence_column=")
        return [str(i) for i in table.column(id_column).to_pylist()], table.column(sequence_column).to_pylist()
    items = list(sequences)
    if items and all(isinstance(x, (tuple, list)) and len(x) == 2 for x in items):
        return [str(i) for i, _ in items], [s for _, s in items]
    return [f"seq{i}" for i in range(len(items))], items


def _validated(ids: list[str], raw: Iterable, kind: str) -> list[bytes]:
    """Each sequence in its model's alphabet, by the rules of a FASTA input (a one-line SequenceError)."""
    out = []
    for rid, seq in zip(ids, raw):
        if not isinstance(seq, (str, bytes)) or not seq:
            raise SequenceError(f"sequences: '{rid}' is not a sequence (an empty one, or {type(seq).__name__})")
        data = seq.encode("ascii", "replace") if isinstance(seq, str) else seq
        out.append(normalise(data.translate(None, b" \t\r\n"), kind, rid, "sequences"))
    if not out:
        raise SequenceError("sequences: none given")
    return out


def _table(ids: list[str], sequences: list[bytes], embeddings: np.ndarray, model: str, truncated: np.ndarray
           ) -> pa.Table:
    lengths = np.array([len(s) for s in sequences], np.int32)
    flat = pa.array(np.ascontiguousarray(embeddings, np.float32).reshape(-1))
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(np.arange(len(ids)), pa.int64()), pa.array(lengths),
         pa.array(truncated), pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(ids), np.int8)), pa.array([model])),
         pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1])],
        schema=embedding_schema(embeddings.shape[1]))


def _through_service(ids: list[str], raw: list, opts: EmbedOptions) -> pa.Table:
    """The service's ingress batches the sequences for its replicas (retrying those whose replica dies)."""
    from ray import serve

    from .service import INGRESS, connect, describe_service

    connect(opts.address)  # this machine's Ray, RAY_ADDRESS or address=: where the service runs
    info = describe_service(opts.service)  # its model; refused if another VirNucPro runs it
    source: ModelSource = info["source"]
    sequences = _validated(ids, raw, source.sequence_kind)
    handle = serve.get_deployment_handle(INGRESS, app_name=opts.service)
    embeddings = handle.sequences.remote([s.decode("ascii") for s in sequences]).result()
    truncated = info["tokenizer"].encode(sequences)[2]  # (the service's truncation)
    return _table(ids, sequences, embeddings, source.name, truncated)


def _on_own_actors(ids: list[str], raw: list, source: ModelSource, opts: EmbedOptions) -> pa.Table:
    """Actors of this call (one per GPU, or one on CPU) compute the batches; stopped at the end."""
    import ray

    from actors.embedder import ActorConfig, Embedder
    from virnucpro.models.registry import default_toks_per_batch

    from .session import Placement, RaySession

    sequences = _validated(ids, raw, source.sequence_kind)
    session = RaySession(opts.address, opts.dashboard_host, dashboard=False)
    session.wait()
    actors = []
    try:
        place = Placement.of(opts)
        tokenizer = load_tokenizer(source, opts.truncation_seq_length)
        batches = token_batches(sequences, tokenizer, opts.toks_per_batch or default_toks_per_batch(source, place.device))
        n = min(place.num_actors, len(batches))
        remote = ray.remote(Embedder).options(num_gpus=place.gpus_per_actor, num_cpus=1)
        config = ActorConfig(source, None, place.device, opts, cpu_threads=max(1, int(place.cluster_cpus) // n))
        actors = [remote.remote(config) for _ in range(n)]
        refs = [actors[i % n].compute.remote(batch) for i, batch in enumerate(batches)]
        embeddings, truncated = None, np.zeros(len(sequences), bool)
        for batch, values in zip(batches, ray.get(refs)):
            if embeddings is None:
                embeddings = np.empty((len(sequences), values.shape[1]), np.float32)
            embeddings[batch.index], truncated[batch.index] = values, batch.truncated
    finally:
        for actor in actors:
            ray.kill(actor)
        session.close()
    return _table(ids, sequences, embeddings, source.name, truncated)


__all__ = ["embed_sequences", "records"]
