"""The HTTP side of a service: a light CPU deployment in front of the model replicas.

Notebooks and web pages POST sequences (JSON or FASTA text) with the cluster's token and get the
embeddings back (JSON, or Arrow IPC for speed). The ingress checks the token and the limits, parses
and validates the input, tokenises it and cuts it into token-budget batches, which it hands to the
model deployment (`actors.service.EmbeddingService.compute`) through a Serve deployment handle, a
few at a time. A batch whose replica dies under it goes to another replica, as a job deals a dead
replica's batches again, so a replica's death costs a request time, not an answer. When the service
cannot answer (every try of a batch lost its replica, the operator's request timeout passed, the
queue of requests is full), the client gets 503 with `Retry-After`; wrong input its 400; a request
over the limits 413 naming the limit.

It loads no model and imports no torch: its process is small, and it starts in a second.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
from dataclasses import dataclass

import numpy as np

from virnucpro.batching import BatchError, TokenBatch, token_batches
from virnucpro.models.registry import ModelSource
from virnucpro.errors import SequenceError
from virnucpro.io.fasta import iter_fasta

log = logging.getLogger(__name__)

ARROW_STREAM = "application/vnd.apache.arrow.stream"


@dataclass(frozen=True)
class Limits:
    """What one request may ask, how long it may take, and how many the service holds at once."""

    max_request_sequences: int = 10_000
    max_request_bytes: int = 16 << 20
    request_timeout_s: float = 300.0  # from the request's arrival at the ingress to its answer
    retry_after_s: int = 5  # what a 503 tells the client to wait
    max_requests: int = 32  # requests one ingress replica works on at once (Serve's max_ongoing_requests)
    max_queued_requests: int = 64  # requests waiting for the ingress; one more is answered 503 at once
    batches_in_flight: int = 8  # per request: a large request does not fill the replicas' queues alone
    attempts: int = 3  # tries of a batch whose replica dies (or raises an error worth a retry)


@dataclass(frozen=True)
class IngressConfig:
    """What the ingress needs of the model (its name, input alphabet and tokenizer), its batch budget,
    and the limits the operator sets."""

    source: ModelSource
    tokenizer: object  # the model's, as a job's driver has it (no torch)
    toks_per_batch: int
    limits: Limits = Limits()


class Unavailable(Exception):
    """No replica could take the request's batches: the client should retry (503)."""


class EmbeddingIngress:
    """The application's ingress: `__call__` answers HTTP; `model` is the model deployment's handle."""

    def __init__(self, config: IngressConfig, model):
        self.config, self.limits, self.model = config, config.limits, model

    async def __call__(self, request):
        from starlette.responses import Response

        denied = _refused(request.headers.get("authorization", ""))
        if denied:
            await _drain(request)
            return _error(*denied)
        limit = self.limits.max_request_bytes
        body, size = await _body(request, limit)
        if body is None:  # read to its end all the same: a client cut off mid-send sees a reset, not 413
            return _error(413, f"request of {size} bytes; at most {limit} bytes ({limit / 2**20:g} MiB) per request")
        try:
            ids, sequences = await asyncio.to_thread(self.parse, body, request.headers.get("content-type", ""))
        except (ValueError, SequenceError) as e:
            return _error(400, " ".join(str(e).split()))
        if len(sequences) > self.limits.max_request_sequences:
            return _error(413, f"{len(sequences)} sequences in one request; at most "
                               f"{self.limits.max_request_sequences} per request")
        try:
            embeddings = await asyncio.wait_for(self.embed(sequences), self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            return self._unavailable(f"not answered within the service's request timeout "
                                     f"({self.limits.request_timeout_s:g} s): its replicas are busy or starting")
        except Unavailable as e:
            return self._unavailable(str(e))
        except (BatchError, RuntimeError) as e:  # a replica's error, retried to no avail: the service's fault
            return _error(500, _line(e))
        lengths = np.array([len(s) for s in sequences], np.int32)
        arrow = ARROW_STREAM in request.headers.get("accept", "")
        encode = _arrow if arrow else self._json
        content = await asyncio.to_thread(encode, ids, lengths, embeddings)
        return Response(content, media_type=ARROW_STREAM if arrow else "application/json")

    def parse(self, body: bytes, content_type: str) -> tuple[list[str], list[str]]:
        """(ids, sequences) of a request body: JSON {"sequences": [{"id", "sequence"}, ...]} (or a list of
        sequence strings), or FASTA text; validated by the same rules and messages as `virnucpro embed`."""
        if "json" in content_type:
            body = _json_as_fasta(body)
        # one reader for every input: the request goes through the FASTA scanner the CLI uses
        with tempfile.NamedTemporaryFile(suffix=".fasta") as f:
            f.write(body)
            f.flush()
            try:
                records = [(r.id, r.sequence) for r in iter_fasta(f.name, self.config.source.sequence_kind)]
            except SequenceError as e:
                raise SequenceError(str(e).replace(f.name, "request")) from None
        if not records:
            raise ValueError("request: no sequences")
        return [r[0] for r in records], [r[1] for r in records]

    async def embed(self, sequences: list[str]) -> np.ndarray:
        """Pooled embeddings [N, D] float32 of validated sequences, in order: tokenised, cut into batches
        of the service's budget, computed by the replicas, `batches_in_flight` at a time."""
        batches = await asyncio.to_thread(self.batches, sequences)
        window = asyncio.Semaphore(self.limits.batches_in_flight)
        results = await _all(self._compute(batch, window) for batch in batches)
        out = np.empty((len(sequences), results[0].shape[1]), np.float32)
        for batch, values in zip(batches, results):
            out[batch.index] = values
        return out

    def batches(self, sequences: list[str]) -> list[TokenBatch]:
        return token_batches(sequences, self.config.tokenizer, self.config.toks_per_batch)

    async def sequences(self, sequences: list[str]) -> np.ndarray:
        """Pooled embeddings [N, D] float32 of sequences already validated (`virnucpro.embed_sequences`
        through a service): the HTTP path's batching and retries, without HTTP."""
        return await asyncio.wait_for(self.embed(sequences), self.limits.request_timeout_s)

    async def _compute(self, batch: TokenBatch, window: asyncio.Semaphore) -> np.ndarray:
        """One batch's embeddings from a replica. A replica that dies under it (or raises an error that
        another replica may not: a RuntimeError, not a BatchError) costs a try; Serve routes the next
        try to a replica that is alive, or holds it until one is up."""
        from ray.exceptions import RayActorError

        async with window:
            for attempt in range(1, self.limits.attempts + 1):
                try:
                    return await self.model.compute.remote(batch)
                except RayActorError as e:  # the replica died, or cannot be reached
                    lost, cause = True, e
                except BatchError:  # bad input or out of memory: the same anywhere
                    raise
                except RuntimeError as e:
                    lost, cause = False, e
                log.warning("request batch %d (%d sequences), try %d of %d: %s", batch.batch_id, len(batch.index),
                            attempt, self.limits.attempts, _line(cause))
                await asyncio.sleep(min(0.2 * attempt, 1.0))  # Serve learns of the death meanwhile
        if lost:
            raise Unavailable(f"a replica computing this request was lost on each of its {self.limits.attempts} "
                              f"tries ({_line(cause)})")
        raise cause

    def _json(self, ids: list[str], lengths: np.ndarray, embeddings: np.ndarray) -> bytes:
        """orjson writes the float32 array directly, each number in the shortest text that reads back
        as the same float32: several times faster and half the size of Python floats through `json`."""
        import orjson

        return orjson.dumps({"model": self.config.source.name, "dim": int(embeddings.shape[1]), "ids": ids,
                             "embeddings": embeddings}, option=orjson.OPT_SERIALIZE_NUMPY)

    def _unavailable(self, message: str):
        log.warning("request answered 503: %s", message)
        return _error(503, f"{message}; retry after {self.limits.retry_after_s} s", self.limits.retry_after_s)


def _json_as_fasta(body: bytes) -> bytes:
    """A JSON request's records as FASTA text, for the one reader that validates every input."""
    import orjson

    try:
        data = orjson.loads(body)
        items = data if isinstance(data, list) else data.get("sequences")  # a bare list of sequences, too
    except (ValueError, AttributeError):
        raise ValueError("request: expected JSON {\"sequences\": [{\"id\": ..., \"sequence\": ...}]} or a list "
                         "of sequences") from None
    if not isinstance(items, list) or not items:
        raise ValueError("request: 'sequences' must be a non-empty list")
    records = [(str(x.get("id", f"seq{i}")), x.get("sequence")) if isinstance(x, dict) else (f"seq{i}", x)
               for i, x in enumerate(items, 1)]
    if any(not isinstance(seq, str) or not seq for _, seq in records):
        raise ValueError("request: every sequence must be a non-empty string")
    return "".join(f">{rid}\n{seq}\n" for rid, seq in records).encode()


def _arrow(ids: list[str], lengths: np.ndarray, embeddings: np.ndarray) -> bytes:
    import pyarrow as pa

    table = pa.table({"id": pa.array(ids, pa.string()), "length": pa.array(lengths, pa.int32()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)),
                                                                     embeddings.shape[1])})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


async def _all(coroutines) -> list:
    """Results of the coroutines, run together; when one raises (or the caller is cancelled, at its
    timeout), the others are cancelled with it, so their batches leave the replicas' queues."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _body(request, limit: int) -> tuple[bytes | None, int]:
    """(body, size) of the request, body None when it is over `limit` bytes. A body over the limit is
    still read to its end, and dropped as it comes: answered before the client has sent it all, the
    server would close a connection with unread data, which resets it (the client never sees the 413)."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit:
        await _drain(request)
        return None, declared
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif chunks:
            chunks.clear()
    return (b"".join(chunks), size) if size <= limit else (None, size)


async def _drain(request) -> None:
    async for _ in request.stream():
        pass


def _error(status: int, message: str, retry_after_s: int | None = None):
    from starlette.responses import JSONResponse

    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def _refused(header: str) -> tuple[int, str] | None:
    """(status, message) when the request lacks the cluster's token, else None. Ray's own check: the
    token that the dashboard and job API require (~/.ray/auth_token or RAY_AUTH_TOKEN)."""
    from .ray_internals import token_auth_enabled, token_valid

    if not token_auth_enabled():
        return 403, "this Ray cluster runs without token authentication, so the HTTP endpoint stays closed"
    if not token_valid(header):
        return 401, "missing or wrong token: send 'Authorization: Bearer <the cluster's token>' (~/.ray/auth_token)"
    return None


__all__ = ["EmbeddingIngress", "IngressConfig", "Limits", "ARROW_STREAM"]
