"""The embedding service's model: a Ray Serve deployment whose replicas keep a model loaded between jobs.

Each replica holds one `Embedder`. Jobs (`virnucpro embed --service NAME`) deal it their planned
batches through a deployment handle, as they deal batches to actors of their own: the replica writes
the Parquet part into the job's output directory and returns a `PartResult`, so output, manifest,
resume and exactly-once are the job's as always. HTTP requests reach it through the service's ingress
(`actors.ingress`), which hands it token batches (`compute`) and gets their embeddings back. Serve
gives the rest: replicas restarted when they die, health checks, autoscaling on the queue, the HTTP
proxy and the Serve page of the Ray dashboard.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from virnucpro.batching import PartResult, TokenBatch, interface_fingerprint
from virnucpro.models import load_tokenizer

from .embedder import ActorConfig, Embedder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    """What a replica is built from: the model and its options."""

    actor: ActorConfig  # out_dir None: each job's batches say where their parts go
    toks_per_batch: int = 65536  # the budget jobs plan with, and HTTP requests are cut by
    actor_class: type = Embedder  # what each replica runs (a subclass, in the tests' fault injection)
    max_replicas: int = 1  # the most replicas Serve may run (autoscaling): how many a job fills


class EmbeddingService:
    """One replica: `embed` for jobs' batches, `compute` for HTTP requests' batches, `describe` for drivers."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.embedder = config.actor_class(config.actor)
        self.embedder.prepare()
        self.tokenizer = load_tokenizer(config.actor.source, config.actor.options.truncation_seq_length)
        self.streams = self.embedder.streams.qsize()  # all of them: no batch has taken one yet
        self.turns: asyncio.Semaphore | None = None  # HTTP batches' turns at the streams (`compute`)

    async def describe(self) -> dict:
        """The interface this replica's VirNucPro speaks, as a plain string. A driver checks it before it
        asks for `description`, whose objects a driver of another VirNucPro may not deserialise
        (`cluster.service.describe_service`). With it, the most replicas the service may run (its jobs
        fill as many)."""
        return {"interface": interface_fingerprint(), "max_replicas": self.config.max_replicas}

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

    async def compute(self, batch: TokenBatch) -> np.ndarray:
        """Pooled embeddings [B, D] float32 of one batch of an HTTP request (from the ingress), nothing written.
        The batches go to their threads in the order they came, as many at once as the replica has streams:
        threads waiting on the embedder's pool of streams would take them in no particular order, and a
        request is answered only when its last batch is."""
        if self.turns is None:  # made here, on the replica's event loop
            self.turns = asyncio.Semaphore(self.streams)
        async with self.turns:
            with _torch_free_errors("compute"):
                return await asyncio.to_thread(self.embedder.compute, batch)


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


__all__ = ["EmbeddingService", "ServiceConfig"]
