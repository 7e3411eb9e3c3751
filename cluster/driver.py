"""The embedding driver: plan, start actors, deal batches, collect parts, write the manifest.

Why not Ray Data's `map_batches(...).write_parquet(...)`: it batches by row count, not by tokens; its
output files are not tied to a deterministic plan, so a killed run cannot resume without redoing or
duplicating rows; and it routes every embedding through its own operators. What this needs is small:
a deterministic token-budget plan, a work queue that deals batches longest-first to whichever actor
is free, part files named by batch id, and a manifest. Ray core (actors, `ray.wait`, restarts)
gives the rest.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.embedder import BatchError, Embedder, PartResult
from virnucpro.batching import TokenBatch, make_batch, plan_batches, plan_fingerprint
from virnucpro.models import ModelSource, load_tokenizer, model_dim, resolve_model
from virnucpro.output import MANIFEST, Manifest, part_name
from virnucpro.sequences import FastaIndex

log = logging.getLogger("virnucpro")

# Token budgets when --toks-per-batch is not given: CPU batches stay small for memory locality; on a
# GPU the actor's budget is what fills the chip (see bench/) without risking memory on 40 GB cards.
DEFAULT_TOKS = {"cpu": 4096, "cuda": 65536}
MAX_BATCH_RETRIES = 3


class EmbedError(RuntimeError):
    """A run that cannot finish: the message says which batch or actor, and why."""


@dataclass
class EmbedOptions:
    device: str = "auto"  # auto, cuda, cpu
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    num_actors: int | None = None  # default: one per GPU (or per --gpus-per-actor share), one on CPU
    gpus_per_actor: float = 1.0
    address: str | None = None  # Ray address; default RAY_ADDRESS or a local Ray
    toks_per_batch: int | None = None
    truncation_seq_length: int = 1022
    dataloader_workers: int | None = None  # default min(cpu_count // num_gpus, 8)
    pin_memory: bool = True
    expandable_segments: bool = False
    cuda_streams: int = 2
    attention: str = "auto"  # auto, sdpa (force the fallback) or flex (DNABERT-S on CUDA)
    compile: bool | None = None  # torch.compile the layers; default: on CUDA
    resume: bool = False
    overwrite: bool = False
    progress: bool | None = None  # default: when stderr is a terminal
    verbose: bool = False
    # Python API only: extra Ray actor options for actor i, merged over the defaults (e.g. a
    # placement-group bundle, so that two embed jobs share GPUs as `cluster.predict` arranges)
    actor_options: Callable[[int], dict] | None = None


@dataclass
class EmbedResult:
    out_dir: Path
    num_sequences: int
    num_batches: int
    batches_computed: int  # fewer than num_batches when a run was resumed
    tokens_computed: int
    compute_seconds: float  # from the first batch dealt to the last part written
    seconds: float  # the whole call: indexing, Ray and actor start-up included
    actors: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_computed / self.compute_seconds if self.compute_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.num_sequences} sequences ({self.batches_computed} of {self.num_batches} batches "
                f"computed, {self.tokens_computed} tokens) in {self.seconds:.1f} s; embedding "
                f"{self.tokens_per_second / 1e3:.1f} K tokens/s on {len(self.actors)} actor(s) -> {self.out_dir}")


def default_dataloader_workers(num_gpus: int) -> int:
    return max(1, min((os.cpu_count() or 1) // max(1, num_gpus), 8))


def embed(input: str | Path, out_dir: str | Path, model: str | Path, **options) -> EmbedResult:
    """Embed every sequence of a FASTA file into Parquet under out_dir (the Python API of `virnucpro embed`).

    Options are those of `EmbedOptions`. Returns an `EmbedResult`; read the rows with
    `virnucpro.output.read_embeddings(out_dir)` or `pyarrow.parquet.read_table(out_dir)`.
    """
    return run_embed(Path(input), Path(out_dir), str(model), EmbedOptions(**options))


def run_embed(input: Path, out_dir: Path, model: str, opts: EmbedOptions) -> EmbedResult:
    start = time.perf_counter()
    source = resolve_model(model)
    tokenizer = load_tokenizer(source, opts.truncation_seq_length)
    _prepare_out_dir(out_dir, opts)

    index = FastaIndex.build(input, source.sequence_kind, out_dir / ".work")
    num_tokens = np.fromiter((tokenizer.num_tokens(int(n)) for n in index.lengths), np.int64, len(index))

    started_ray = _init_ray(opts)
    try:
        device, num_actors, num_gpus = _placement(opts)
        toks = opts.toks_per_batch or DEFAULT_TOKS[device]
        plan = plan_batches(num_tokens, toks)
        fingerprint = plan_fingerprint(source.name, source.family, opts.truncation_seq_length, toks,
                                       index.lengths, index.offsets)
        manifest = _open_manifest(out_dir, opts, source, input, fingerprint, index, len(plan))
        done = _finished_batches(out_dir, manifest, plan)
        todo = [b for b in range(len(plan)) if b not in done]
        if done:
            log.info("resuming: %d of %d batches already done, %d to go", len(done), len(plan), len(todo))
        actors, infos = _start_actors(source, out_dir, opts, device, num_actors)
        workers = opts.dataloader_workers or default_dataloader_workers(num_gpus)
        done_tokens = sum(int(num_tokens[plan[b]].sum()) for b in done)
        progress = _Progress(int(num_tokens.sum()), len(index), done_tokens, manifest.rows_done, opts.progress)
        dispatcher = _Dispatcher(actors, index, tokenizer, plan, workers, opts.cuda_streams if device == "cuda" else 1)
        tokens_computed = 0
        compute_start = time.perf_counter()
        for result in dispatcher.run(todo):
            manifest.parts[result.file] = result.rows
            tokens_computed += result.tokens
            progress.advance(result.tokens, result.rows)
            if progress.due_for_save():
                manifest.save(out_dir)
        progress.close()
        compute_seconds = time.perf_counter() - compute_start
    finally:
        if started_ray:
            ray.shutdown()

    if manifest.rows_done != len(index) or len(manifest.parts) != len(plan):
        manifest.save(out_dir)
        raise EmbedError(f"{out_dir}: {manifest.rows_done} rows in {len(manifest.parts)} parts, expected "
                         f"{len(index)} rows in {len(plan)} parts; the run is not complete")
    manifest.complete, manifest.finished = True, time.time()
    manifest.save(out_dir)
    shutil.rmtree(out_dir / ".work", ignore_errors=True)
    result = EmbedResult(out_dir, len(index), len(plan), len(todo), tokens_computed, compute_seconds,
                         time.perf_counter() - start, infos)
    log.info("done: %s", result.summary())
    return result


# --- output directory and manifest ------------------------------------------------------------------

def _prepare_out_dir(out_dir: Path, opts: EmbedOptions) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise EmbedError(f"{out_dir}: output directory is not writable ({e.strerror or e})") from None
    previous = (out_dir / MANIFEST).is_file() or any(out_dir.glob("part-*.parquet"))
    if previous and opts.overwrite:
        for p in out_dir.glob("part-*.parquet"):
            p.unlink()
        (out_dir / MANIFEST).unlink(missing_ok=True)
    elif previous and not opts.resume:
        raise EmbedError(f"{out_dir}: holds the output of a previous run; use --resume to finish it or "
                         f"--overwrite to replace it")


def _open_manifest(out_dir: Path, opts: EmbedOptions, source: ModelSource, input: Path, fingerprint: str,
                   index: FastaIndex, num_batches: int) -> Manifest:
    old = Manifest.load(out_dir) if opts.resume else None
    if old is not None:
        if old.fingerprint != fingerprint:
            raise EmbedError(f"{out_dir}: holds a different run (model, input or batching options differ: "
                             f"{old.model} on {old.input}); use --overwrite to replace it")
        return old
    manifest = Manifest(model=source.name, family=source.family, dim=model_dim(source), input=str(input),
                        fingerprint=fingerprint, num_sequences=len(index), num_batches=num_batches,
                        skipped_empty=index.skipped_empty)
    manifest.save(out_dir)
    return manifest


def _finished_batches(out_dir: Path, manifest: Manifest, plan: list[np.ndarray]) -> set[int]:
    """Parts that need no recomputation: listed in the manifest, or on disk whole but not yet listed
    (the driver died between an actor's write and its own manifest update)."""
    done = set()
    for b, positions in enumerate(plan):
        name = part_name(b)
        path = out_dir / name
        if not path.is_file():
            manifest.parts.pop(name, None)
            continue
        try:
            rows = pq.read_metadata(path).num_rows
        except Exception:  # noqa: BLE001 - a damaged file is recomputed
            rows = -1
        if rows == len(positions):
            manifest.parts[name] = rows
            done.add(b)
        else:
            manifest.parts.pop(name, None)
    return done


# --- Ray ----------------------------------------------------------------------------------------------

def _init_ray(opts: EmbedOptions) -> bool:
    """Join the given or RAY_ADDRESS cluster, or start a local one. True when we started it."""
    if ray.is_initialized():
        return False
    address = opts.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}} if opts.expandable_segments else None
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return True
    ray.init(runtime_env=env, include_dashboard=None, dashboard_host="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=True)
    return True


def _placement(opts: EmbedOptions) -> tuple[str, int, int]:
    """(device, number of actors, GPUs in the cluster)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = opts.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus == 0:
        raise EmbedError("--device cuda, but the Ray cluster has no GPU resources")
    if opts.num_actors:
        n = opts.num_actors
    elif device == "cuda":
        n = max(1, int(gpus / opts.gpus_per_actor))
    else:
        n = 1
    return device, n, gpus if device == "cuda" else 0


def _start_actors(source: ModelSource, out_dir: Path, opts: EmbedOptions, device: str,
                  num_actors: int) -> tuple[list, list[dict]]:
    streams = opts.cuda_streams if device == "cuda" else 1
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if opts.expandable_segments else {}
    if device == "cpu":
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // num_actors)
        env["OMP_NUM_THREADS"] = str(cpus)  # torch's intra-op threads in each CPU actor
    options = dict(
        num_gpus=opts.gpus_per_actor if device == "cuda" else 0,
        num_cpus=1,
        max_concurrency=streams,
        max_restarts=MAX_BATCH_RETRIES,  # a dead actor (killed, node lost) comes back and takes work again
        scheduling_strategy="SPREAD",
        runtime_env={"env_vars": env} if env else None,
    )
    cls = ray.remote(Embedder)
    extra = opts.actor_options or (lambda i: {})
    level = logging.DEBUG if opts.verbose else logging.INFO
    actors = [cls.options(**{**options, **extra(i)}).remote(
        source, str(out_dir.resolve()), device, opts.dtype, streams, opts.pin_memory, opts.attention,
        opts.compile, level) for i in range(num_actors)]
    try:
        infos = ray.get([a.info.remote() for a in actors])
    except (RayTaskError, RayActorError) as e:
        for a in actors:
            ray.kill(a)
        raise EmbedError(f"an actor could not load model '{source.name}': {_cause(e)}") from None
    first = infos[0]
    log.info("%d actor(s) on %s, %s%s, %s", len(infos), first["gpu"], first["dtype"],
             ", compiled" if first["compiled"] else "", first["attention"])
    return actors, infos


def _cause(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


class _Dispatcher:
    """Deals batches to free actors from a queue, longest first, re-queueing those of dead actors."""

    def __init__(self, actors: list, index: FastaIndex, tokenizer, plan: list[np.ndarray],
                 workers: int, in_flight_per_actor: int):
        self.actors = actors
        self.index, self.tokenizer, self.plan = index, tokenizer, plan
        self.loader = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="virnucpro-loader")
        self.per_actor = in_flight_per_actor + 1  # one queued behind the running ones hides dispatch latency
        self.prefetch = len(actors) * self.per_actor + workers

    def run(self, todo: list[int]):
        """Yield PartResults as batches finish; raise EmbedError on a failure that retrying won't fix."""
        waiting: deque[int] = deque(todo)
        loading: deque[tuple[int, Future]] = deque()
        ready: deque[tuple[int, ray.ObjectRef]] = deque()
        running: dict[ray.ObjectRef, tuple[int, ray.ObjectRef, object]] = {}
        busy = {id(a): 0 for a in self.actors}
        retries: dict[int, int] = {}
        try:
            while waiting or loading or ready or running:
                while waiting and len(loading) + len(ready) < self.prefetch:
                    b = waiting.popleft()
                    loading.append((b, self.loader.submit(make_batch, self.index, self.plan[b], self.tokenizer, b)))
                while loading and loading[0][1].done():
                    b, fut = loading.popleft()
                    ready.append((b, ray.put(fut.result())))
                for actor in self.actors:
                    while ready and busy[id(actor)] < self.per_actor:
                        b, ref = ready.popleft()
                        running[actor.embed.remote(ref)] = (b, ref, actor)
                        busy[id(actor)] += 1
                if not running:
                    if loading:
                        loading[0][1].result()
                    continue
                finished, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                for ref in finished:
                    b, batch_ref, actor = running.pop(ref)
                    busy[id(actor)] -= 1
                    try:
                        yield ray.get(ref)
                    except RayActorError as e:
                        retries[b] = retries.get(b, 0) + 1
                        if retries[b] > MAX_BATCH_RETRIES:
                            raise EmbedError(f"batch {b} failed {retries[b]} times because its actor died: "
                                             f"{_cause(e)}") from None
                        log.warning("actor died during batch %d (%s); handing the batch to another actor",
                                    b, _cause(e))
                        ready.appendleft((b, batch_ref))
                        self._drop_if_dead(actor)
                    except RayTaskError as e:
                        raise EmbedError(self._task_failure(b, batch_ref, e)) from None
        finally:
            self.loader.shutdown(wait=False, cancel_futures=True)
            for ref in running:
                ray.cancel(ref, force=False)

    def _drop_if_dead(self, actor) -> None:
        """Ray restarts a killed actor (max_restarts); one whose restarts are spent leaves the pool."""
        try:
            ray.get(actor.info.remote(), timeout=120)
        except Exception:  # noqa: BLE001
            self.actors = [a for a in self.actors if a is not actor]
            log.warning("an actor is gone for good; %d left", len(self.actors))
            if not self.actors:
                raise EmbedError("every actor died; see the Ray logs for why") from None

    @staticmethod
    def _task_failure(b: int, batch_ref, e: RayTaskError) -> str:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BatchError):
            return str(cause)
        batch: TokenBatch = ray.get(batch_ref)
        return f"{batch.describe()} failed: {_cause(e)}"


class _Progress:
    """A one-line progress display on a terminal; silent otherwise (logs only)."""

    def __init__(self, total_tokens: int, total_seqs: int, done_tokens: int, done_seqs: int,
                 enabled: bool | None):
        self.total_tokens, self.total_seqs = total_tokens, total_seqs
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.tokens, self.seqs = done_tokens, done_seqs
        self.base_tokens = done_tokens  # work done before a resume does not count in the rate
        self.start = self.last_draw = self.last_save = time.perf_counter()

    def advance(self, tokens: int, seqs: int) -> None:
        self.tokens += tokens
        self.seqs += seqs
        now = time.perf_counter()
        if self.enabled and now - self.last_draw > 0.5:
            self.last_draw = now
            rate = (self.tokens - self.base_tokens) / max(now - self.start, 1e-9)
            eta = (self.total_tokens - self.tokens) / rate if rate > 0 else float("inf")
            sys.stderr.write(f"\r[virnucpro] {self.seqs}/{self.total_seqs} sequences  "
                             f"{rate / 1e3:.1f} K tokens/s  ETA {eta:.0f} s   ")
            sys.stderr.flush()

    def due_for_save(self) -> bool:
        now = time.perf_counter()
        if now - self.last_save > 2.0:
            self.last_save = now
            return True
        return False

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
