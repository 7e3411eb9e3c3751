"""The embedding service: a Ray Serve deployment whose replicas keep a model loaded between jobs.

Each replica holds one `Embedder`. Jobs (`virnucpro embed --service NAME`) deal it their planned
batches through a deployment handle, as they deal batches to actors of their own: the replica writes
the Parquet part into the job's output directory and returns a `PartResult`, so output, manifest,
resume and exactly-once are the job's as always. Notebooks and web pages POST sequences over HTTP
(JSON or FASTA text) and get the embeddings back (JSON, or Arrow IPC for speed); the cluster's token
is required. Serve gives the rest: replicas restarted when they die, health checks, the HTTP proxy
and the Serve page of the Ray dashboard.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from virnucpro.batching import PartResult, Plan, TokenBatch, interface_fingerprint
from virnucpro.models import load_tokenizer
from virnucpro.sequences import SequenceError, iter_fasta

from .embedder import ActorConfig, Embedder

log = logging.getLogger(__name__)

ARROW_STREAM = "application/vnd.apache.arrow.stream"


@dataclass(frozen=True)
class ServiceConfig:
    """What a replica is built from: the model and its options, and the HTTP request limits."""

    actor: ActorConfig  # out_dir None: each job's batches say where their parts go
    max_request_sequences: int = 10_000
    max_request_bytes: int = 16 << 20
    toks_per_batch: int = 65536  # budget of the batches an HTTP request is cut into
    actor_class: type = Embedder  # what each replica runs (a subclass, in the tests' fault injection)


class EmbeddingService:
    """One replica: `embed` for jobs' batches, `__call__` for HTTP, `describe` for drivers."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.embedder = config.actor_class(config.actor)
        self.embedder.prepare()
        self.tokenizer = load_tokenizer(config.actor.source, config.actor.options.truncation_seq_length)

    async def describe(self) -> dict:
        """The interface this replica's VirNucPro speaks, as a plain string. A driver checks it before it
        asks for `description`, whose objects a driver of another VirNucPro may not deserialise
        (`cluster.service.describe_service`)."""
        return {"interface": interface_fingerprint()}

    async def description(self) -> dict:
        """What a job's driver needs: the model (to plan and fingerprint), its tokenizer, the replica.
        (A second call rather than a `ray.put` ref nested in `describe`'s answer: a ref the replica
        owns was once freed before the driver fetched it, Ray's ReferenceCountingAssertionError in CI.)"""
        with _torch_free_errors("description"):
            return {"source": self.config.actor.source, "tokenizer": self.tokenizer, "dim": self.embedder.model.dim,
                    "options": self.config.actor.options, "toks_per_batch": self.config.toks_per_batch,
                    "info": self.embedder.info()}

    async def prepare(self, largest_batch: np.ndarray | None = None) -> dict:
        with _torch_free_errors("prepare"):
            return await asyncio.to_thread(self.embedder.prepare, largest_batch)

    async def embed(self, batch: TokenBatch, attempt: int, out_dir: str, outputs: tuple | None = None) -> PartResult:
        """A job's batch: computed and written into `out_dir` like an actor of the job's own would, with
        that job's output columns (`outputs`: its repr_layers, include, output_dtype)."""
        import ray

        if isinstance(batch, ray.ObjectRef):
            batch = await batch
        with _torch_free_errors("embed"):
            return await asyncio.to_thread(self.embedder.embed, batch, attempt, out_dir, outputs)

    def check_health(self) -> None:
        """Serve's health check: the GPU still answers (a replica whose CUDA context broke is replaced)."""
        self.embedder.info()

    # -- HTTP ---------------------------------------------------------------------------------------

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        denied = _refused(request.headers.get("authorization", ""))
        if denied:
            return JSONResponse({"error": denied[1]}, status_code=denied[0])
        size = int(request.headers.get("content-length") or 0)
        if size > self.config.max_request_bytes:
            return JSONResponse({"error": f"request of {size} bytes; at most {self.config.max_request_bytes}"},
                                status_code=413)
        body = await request.body()
        try:
            ids, sequences = self.parse(body, request.headers.get("content-type", ""))
        except (ValueError, SequenceError) as e:
            return JSONResponse({"error": " ".join(str(e).split())}, status_code=400)
        if len(sequences) > self.config.max_request_sequences:
            return JSONResponse({"error": f"{len(sequences)} sequences in one request; at most "
                                          f"{self.config.max_request_sequences}"}, status_code=413)
        embeddings, lengths = await asyncio.to_thread(self.embed_sequences, sequences)
        table = pa.table({"id": pa.array(ids, pa.string()), "length": pa.array(lengths, pa.int32()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)),
                                                                         embeddings.shape[1])})
        if ARROW_STREAM in request.headers.get("accept", ""):
            sink = io.BytesIO()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            return Response(sink.getvalue(), media_type=ARROW_STREAM)
        return JSONResponse({"model": self.config.actor.source.name, "dim": int(embeddings.shape[1]), "ids": ids,
                             "embeddings": embeddings.tolist()})

    def parse(self, body: bytes, content_type: str) -> tuple[list[str], list[str]]:
        """(ids, sequences) of a request body: JSON {"sequences": [{"id", "sequence"}, ...]} (or a list of
        sequence strings), or FASTA text; validated by the same rules and messages as `virnucpro embed`."""
        if "json" in content_type:
            try:
                items = json.loads(body).get("sequences")
            except (ValueError, AttributeError):
                raise ValueError("request: expected JSON {\"sequences\": [{\"id\": ..., \"sequence\": ...}]}") from None
            if not isinstance(items, list) or not items:
                raise ValueError("request: 'sequences' must be a non-empty list")
            records = [(str(x.get("id", f"seq{i}")), x.get("sequence")) if isinstance(x, dict) else (f"seq{i}", x)
                       for i, x in enumerate(items, 1)]
            if any(not isinstance(seq, str) or not seq for _, seq in records):
                raise ValueError("request: every sequence must be a non-empty string")
            body = "".join(f">{rid}\n{seq}\n" for rid, seq in records).encode()
        # one reader for every input: the request goes through the FASTA scanner the CLI uses
        with tempfile.NamedTemporaryFile(suffix=".fasta") as f:
            f.write(body)
            f.flush()
            try:
                records = [(r.id, r.sequence) for r in iter_fasta(f.name, self.config.actor.source.sequence_kind)]
            except SequenceError as e:
                raise SequenceError(str(e).replace(f.name, "request")) from None
        if not records:
            raise ValueError("request: no sequences")
        return [r[0] for r in records], [r[1] for r in records]

    def embed_sequences(self, sequences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pooled embeddings [N, D] float32 of validated sequences, in order, and their lengths."""
        tokens, seq_tokens, truncated = self.tokenizer.encode(sequences)
        lengths = np.array([len(s) for s in sequences], np.int64)
        plan = Plan.build(seq_tokens.astype(np.int64), self.config.toks_per_batch)
        starts = np.concatenate(([0], np.cumsum(seq_tokens)))
        out = np.empty((len(sequences), self.embedder.model.dim), np.float32)
        for b, rows in enumerate(plan):
            batch = TokenBatch(b, [""] * len(rows), rows, lengths[rows].astype(np.int32), truncated[rows],
                               np.concatenate([tokens[starts[i]:starts[i + 1]] for i in rows]), seq_tokens[rows])
            out[rows] = self.embedder.compute(batch)
        return out, lengths


@contextmanager
def _torch_free_errors(call: str):
    """Errors of torch's own classes leave the replica as a RuntimeError naming them. Ray pickles a
    replica's exception for the job's driver, and unpickling a torch class imports torch there, which a
    job through a service never does otherwise (`cluster/driver.py`). A RuntimeError is what the
    driver's scheduler treats them as anyway (worth a retry, as from an actor of the job's own); the
    traceback stays in the replica's log. Other errors (BatchError, OSError, ...) pass unchanged."""
    try:
        yield
    except Exception as e:
        if not any(c.__module__.startswith("torch") for c in type(e).__mro__):  # torchvision's too: it imports torch
            raise
        log.exception("replica: %s failed", call)
        raise RuntimeError(f"{type(e).__module__}.{type(e).__qualname__}: {e}") from None


def _refused(header: str) -> tuple[int, str] | None:
    """(status, message) when the request lacks the cluster's token, else None. Ray's own check: the
    token that the dashboard and job API require (~/.ray/auth_token or RAY_AUTH_TOKEN)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled, validate_request_token
    except ImportError:
        return 403, "this Ray has no token authentication, so the HTTP endpoint stays closed"
    if not is_token_auth_enabled():
        return 403, "this Ray cluster runs without token authentication, so the HTTP endpoint stays closed"
    if not header or not validate_request_token(header):
        return 401, "missing or wrong token: send 'Authorization: Bearer <the cluster's token>' (~/.ray/auth_token)"
    return None


__all__ = ["EmbeddingService", "ServiceConfig", "ARROW_STREAM"]
