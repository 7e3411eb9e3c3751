"""The embedding driver: index, plan, start actors, deal batches, collect parts, write the manifest.

    embed(input, out_dir, model, **options)    # the Python API of `virnucpro embed`

Why not Ray Data's `map_batches(...).write_parquet(...)`: it batches by row count, not by tokens; its
output files are not tied to a deterministic plan, so a killed run cannot resume without redoing or
duplicating rows; and it routes every embedding through its own operators. What this needs is small:
a deterministic token-budget plan (`virnucpro.batching.Plan`), a work queue that deals batches
longest-first to whichever actor is free (`scheduling.Scheduler` over a `pool.ActorPool`), part files
named by batch id, and a manifest. Ray core (actors, `ray.wait`, restarts) gives the rest.

Memory. The driver holds no sequences and no embeddings: the FASTA index and the plan's record order
are int64 columns in memory-mapped scratch files, and loader threads read and tokenise only the
batches inside a bounded window ahead of the actors (nothing more is read until a batch finishes).
Actors write the embeddings to the output location themselves.

Faults. A batch whose actor dies goes back to the front of the queue and another actor takes it;
Ray restarts the actor or the pool replaces it. Part files are named by batch id and written
atomically, so a batch computed twice replaces its own file: no sequence is lost or written twice.
What a batch's own error means is the scheduler's decision (`cluster/scheduling.py`). A run that
stops keeps its finished parts in the manifest; `--resume` finishes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

# Nothing here imports torch: a job through a running service (--service) needs none of it, and
# importing it is 2.2-2.5 s of a driver's start on an H200 host. A job with its own actors imports
# the model code (and torch) where it checks the model and defines the actors.
from virnucpro.batching import BatchError, PartResult, Plan, TokenBatch, make_batch, plan_fingerprint, token_counts
from virnucpro.checkpoint import ModelSource
from virnucpro.options import EmbedOptions, default_dataloader_workers
from virnucpro.output import (LEGACY_MANIFEST, MANIFEST, PART_NAME, PREVIOUS_RUN, WRITE_TEST, Manifest, OutputLocation,
                             default_columns, is_cut_short, part_schema)
from virnucpro.sequences import FastaIndex

from .pool import ActorPool, Lease, cause
from .progress import DriverMetrics, Progress, Timeline
from .scheduling import ACTOR_DIED, STORAGE, EmbedError, Scheduler, failure_kind
from .session import Placement, local_dashboard, start_ray

if TYPE_CHECKING:
    from actors.embedder import ActorConfig

log = logging.getLogger("virnucpro")

STOP_WAIT_SECONDS = 30  # a failed run waits this long for the batches its actors are computing
_ACTOR_FAILED = (RayActorError, ObjectLostError, WorkerCrashedError)  # the actor, not the batch, failed


@dataclass
class EmbedResult:
    out_dir: Path | str  # a Path for a local directory, else the URI
    num_sequences: int
    num_batches: int
    batches_computed: int  # fewer than num_batches when a run was resumed
    tokens_computed: int
    compute_seconds: float  # from the first batch dealt to the last part written
    seconds: float  # from the timeline's origin (the command's start, or the call's) to the end: all of start-up included
    actors: list[dict] = field(default_factory=list)
    batches_retried: int = 0  # batches dealt again because their actor died
    batches_retried_after_errors: int = 0  # batches dealt again after an error that may not recur
    actors_replaced: int = 0  # actors Ray gave up on, replaced by new ones
    # summed over batches (concurrent batches of one actor overlap, so these can exceed compute_seconds):
    forward_seconds: float = 0.0  # copy to the device, forward pass, embeddings back to the host
    write_seconds: float = 0.0  # Parquet parts encoded and written
    first_part_seconds: float = 0.0  # from the first batch read to the first part written (pipeline fill)
    # seconds from the process's start to the end of each start-up phase, up to the first part written,
    # then to the last part written and to the run's end (actors and Ray shut down, output completed)
    timeline: dict[str, float] = field(default_factory=dict)
    service: str | None = None  # the service whose replicas computed the batches, if any

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_computed / self.compute_seconds if self.compute_seconds > 0 else 0.0

    def summary(self) -> str:
        faults = ""
        if self.batches_retried or self.actors_replaced:
            faults = (f"; {self.batches_retried} batch(es) dealt again after actor failures, "
                      f"{self.actors_replaced} actor(s) replaced")
        if self.batches_retried_after_errors:
            faults += f"; {self.batches_retried_after_errors} batch(es) retried after errors"
        first = f" (first part after {self.timeline['first_part']:.1f} s)" if "first_part" in self.timeline else ""
        return (f"{self.num_sequences} sequences ({self.batches_computed} of {self.num_batches} batches "
                f"computed, {self.tokens_computed} tokens) in {self.seconds:.1f} s{first}; embedding "
                f"{self.tokens_per_second / 1e3:.1f} K tokens/s on {len(self.actors)} "
                f"{f'replica(s) of service {self.service!r}' if self.service else 'actor(s)'}{faults} "
                f"-> {self.out_dir}")


def embed(input: str | Path, out_dir: str | Path, model: str | Path | None, *, actor_class: type | None = None,
          timeline: Timeline | None = None, **options) -> EmbedResult:
    """Embed every sequence of a FASTA file into Parquet under out_dir (the Python API of `virnucpro embed`).

    out_dir is a local directory or a URI on any pyarrow/fsspec filesystem (`s3://bucket/run`).
    Options are the fields of `virnucpro.options.EmbedOptions`; a value out of range raises
    `OptionError` before anything starts. `actor_class`: the actor run on each worker, `Embedder` (the
    default) or a subclass of it (the tests inject faults this way). `model` None: `service=NAME`'s.
    `timeline`: where start-up phases are marked (default: from this call's start). Returns an `EmbedResult`; read the rows with
    `virnucpro.output.read_embeddings(out_dir)` or `pyarrow.parquet.read_table(out_dir)`.
    """
    return run_embed(Path(input), out_dir, None if model is None else str(model), EmbedOptions(**options),
                     actor_class, timeline)


def run_embed(input: Path, out_dir: str | Path, model: str | None, opts: EmbedOptions, actor_class: type | None = None,
              timeline: Timeline | None = None, ray_up: Future | None = None) -> EmbedResult:
    """`embed` with its options parsed. `model` None: the service's (`opts.service`); `actor_class` None:
    `Embedder`. `ray_up`: Ray being started in the background (`start_ray`),
    as the command line does before its imports; by default it is started here, at once."""
    timeline = timeline or Timeline()
    timeline.mark("driver_started")  # imports done, arguments parsed
    # Ray takes seconds to start: meanwhile the model is checked. A service runs on this machine's Ray.
    ray_up = ray_up or start_ray(opts.address or ("auto" if opts.service else None), opts.dashboard_host,
                                 on_ready=lambda: timeline.mark("ray_up"), dashboard=local_dashboard(opts.dashboard, input))
    try:
        target = None if opts.service else _Target.local(model, opts)  # a bad checkpoint fails here
        timeline.mark("model_checked")
        out = OutputLocation.parse(out_dir)
        _prepare_out_dir(out, opts)
    except BaseException:
        _close_ray(ray_up)
        raise
    scratch = _scratch_dir(out)
    started_ray, pool, run, manifest = False, None, None, None
    try:
        started_ray = ray_up.result()  # (its on_ready marked "ray_up" when it was)
        if opts.service:
            target, pool = _Target.service(opts, out)
        else:
            from actors.embedder import ActorConfig, Embedder

            target.place(opts)
            pool = _new_pool(actor_class or Embedder, ActorConfig(target.source, out.uri, target.device, opts),
                             target, opts)
            pool.launch()  # the actors load their model while the input is indexed and planned
        source, tokenizer, dim = target.source, target.tokenizer, target.dim
        index = FastaIndex.build(input, source.sequence_kind, scratch)
        timeline.mark("indexed")
        toks = opts.toks_per_batch or target.toks_per_batch
        plan = Plan.build(lambda a, b: token_counts(tokenizer, index.lengths[a:b]), toks, len(index), scratch)
        outputs = (opts.repr_layers, opts.include, opts.output_dtype)
        fingerprint = plan_fingerprint(source.name, source.family, target.truncation, toks, index.lengths,
                                       index.offsets,  # --resume: the same columns (default ones: as before)
                                       *(() if default_columns(*outputs) else (outputs,)))
        manifest = _open_manifest(out, opts, source, dim, input, fingerprint, index, len(plan), toks)
        done = _finished_batches(out, manifest, plan)
        todo = np.flatnonzero(~done)
        if done.any():
            log.info("resuming: %d of %d batches already done, %d to go", int(done.sum()), len(plan), len(todo))
        run = _Dispatcher(pool, index, tokenizer, plan, todo,
                          opts.dataloader_workers or default_dataloader_workers(target.num_gpus),
                          opts.actor_wait_seconds)
        run.prefetch()  # the first batches are read and tokenised while the actors load
        timeline.mark("planned")
        if len(todo):
            # the plan's first batch holds its longest sequences: each actor warms up on its shape
            largest = token_counts(tokenizer, index.lengths[plan[0]])
            infos = pool.start(opts.actor_wait_seconds, ready_call=lambda actor: actor.prepare.remote(largest))
            for phase, at in infos[0]["timeline"].items() if not opts.service else ():
                timeline.mark(phase, at)  # the first actor ready: when it was placed, loaded, ...
        totals = _collect(run, manifest, out, plan, done, len(index), opts, timeline)
    except BaseException:
        if manifest is not None:  # what finished stays finished: --resume starts from here
            try:
                manifest.save(out)
            except Exception:  # noqa: BLE001 - the original error matters more
                log.warning("could not save the manifest", exc_info=True)
        raise
    finally:
        closing = time.perf_counter()
        if run is not None:
            run.close()
        elif pool is not None:
            pool.shutdown()
        actors_stopped = time.perf_counter()
        if started_ray:
            ray.shutdown()
        closed = time.perf_counter()  # a slow shutdown is wall clock the user waits for: say so
        log.log(logging.INFO if closed - closing >= 1 else logging.DEBUG, "shut down in %.1f s (actors %.1f s, Ray %.1f s)",
                closed - closing, actors_stopped - closing, closed - actors_stopped)
        if out.local_path is None:  # a temporary scratch directory: nothing in it is worth keeping
            shutil.rmtree(scratch, ignore_errors=True)

    _complete(out, manifest, len(index), len(plan))
    shutil.rmtree(scratch, ignore_errors=True)
    timeline.mark("done")
    result = EmbedResult(out.local_path or out.uri, len(index), len(plan), len(todo), totals.tokens,
                         totals.elapsed(), time.time() - timeline.origin, pool.infos(),
                         batches_retried=run.scheduler.retried, actors_replaced=pool.replaced,
                         batches_retried_after_errors=run.scheduler.retried_after_errors,
                         forward_seconds=totals.forward, write_seconds=totals.write,
                         first_part_seconds=totals.first_part, timeline=timeline.marks, service=opts.service)
    log.info("done: %s", result.summary())
    return result


def _close_ray(ray_up: Future) -> None:
    """A run that failed before it needed Ray: disconnect once the background start is done."""
    try:
        if ray_up.result():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - the run's own error is the one to report
        log.debug("Ray start failed too", exc_info=True)


def _collect(run: _Dispatcher, manifest: Manifest, out: OutputLocation, plan: Plan, done: np.ndarray,
             num_sequences: int, opts: EmbedOptions, timeline: Timeline) -> _Totals:
    """Record each part in the manifest as it comes (saved every few seconds), with progress."""
    progress = Progress(int(plan.tokens.sum()), num_sequences, int(plan.tokens[done].sum()), manifest.rows_done,
                        opts.progress, opts.verbose)
    totals = _Totals()
    for result in run.results():
        manifest.parts[result.file] = result.rows
        totals.add(result)
        if "first_part" not in timeline.marks:
            timeline.mark("first_part")
            log.info("first part written; start-up: %s", timeline.text())
        progress.advance(result.tokens, result.rows, run.pool.usable, run.pool.size)
        if progress.due_for_save():
            manifest.save(out)
    totals.stop()  # the rate counts computing, not shutting the actors and Ray down
    if "first_part" in timeline.marks:  # (a resumed run may have had nothing left to write)
        timeline.mark("last_part")
    progress.close()
    return totals


class _Totals:
    """Sums over the parts a run wrote, and when the first one came."""

    def __init__(self):
        self.start, self.end = time.perf_counter(), None
        self.tokens, self.forward, self.write, self.first_part = 0, 0.0, 0.0, 0.0

    def add(self, r: PartResult) -> None:
        self.tokens += r.tokens
        self.forward += r.forward_seconds
        self.write += r.write_seconds
        self.first_part = self.first_part or self.elapsed()

    def stop(self) -> None:
        self.end = time.perf_counter()

    def elapsed(self) -> float:
        return (self.end or time.perf_counter()) - self.start


@dataclass
class _Target:
    """What the batches go to: the model (to tokenise, plan and fingerprint) and where it runs."""

    source: ModelSource
    tokenizer: object
    dim: int
    truncation: int  # --truncation-seq-length the tokenizer applies
    toks_per_batch: int  # the default budget for this model on this device
    device: str = "cpu"
    num_gpus: int = 0  # what the dataloader-worker default divides by
    placement: Placement | None = None

    @classmethod
    def local(cls, model: str, opts: EmbedOptions) -> _Target:
        """The job's own actors will load `model`; checked here (names and shapes), before they start."""
        from virnucpro.models import check_model, load_tokenizer, resolve_model

        source = resolve_model(model)
        return cls(source, load_tokenizer(source, opts.truncation_seq_length), check_model(source),
                   opts.truncation_seq_length, 0)

    def place(self, opts: EmbedOptions) -> None:
        """Once Ray is up: the device and actor count from the cluster's resources."""
        from virnucpro.models import default_toks_per_batch

        self.placement = place = Placement.of(opts)
        self.device, self.num_gpus = place.device, place.num_gpus
        self.toks_per_batch = default_toks_per_batch(self.source, place.device)

    @classmethod
    def service(cls, opts: EmbedOptions, out: OutputLocation) -> tuple[_Target, ActorPool]:
        """A running service's model, and a pool over its replicas."""
        from .service import describe_service, service_pool

        info = describe_service(opts.service)
        source, options = info["source"], info["options"]
        if options.truncation_seq_length != opts.truncation_seq_length:
            log.info("service '%s' truncates at %d (its own --truncation-seq-length)", opts.service,
                     options.truncation_seq_length)
        pool = service_pool(opts.service, out.uri, options.cuda_streams + 1,
                            (opts.repr_layers, opts.include, opts.output_dtype))
        target = cls(source, info["tokenizer"], info["dim"], options.truncation_seq_length,
                     info["toks_per_batch"], info["info"]["device"].split(":")[0], pool.size)
        log.info("service '%s': %s on %d replica(s)", opts.service, source.name, pool.size)
        return target, pool


def _new_pool(actor_class: type, config: ActorConfig, target: _Target, opts: EmbedOptions) -> ActorPool:
    """The run's actors: `place.num_actors` of `actor_class`, each taking its CUDA streams' worth of
    batches plus one queued behind them (which hides the dispatch latency)."""
    place = target.placement
    streams = opts.cuda_streams if place.device == "cuda" else 1
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if opts.expandable_segments else {}
    if place.device == "cpu":  # torch's intra-op threads in each CPU actor: its share of the node
        config = replace(config, cpu_threads=max(1, int(place.cluster_cpus) // place.num_actors))
    options = dict(
        num_gpus=place.gpus_per_actor,
        num_cpus=1,
        max_concurrency=streams + _writers(opts),
        max_restarts=opts.max_actor_restarts,
        max_task_retries=0,  # the scheduler deals a failed batch again, to any actor
        scheduling_strategy="SPREAD",  # actors over nodes; CUDA_VISIBLE_DEVICES is Ray's to set
        runtime_env={"env_vars": env} if env else None,
    )
    remote = ray.remote(actor_class)

    def new_actor(i: int):
        extra = opts.actor_options(i) if opts.actor_options else {}
        return remote.options(**{**options, **extra}).remote(config)

    resources = {"CPU": options["num_cpus"], **({"GPU": place.gpus_per_actor} if place.gpus_per_actor else {})}
    return ActorPool(new_actor, place.num_actors, streams + _writers(opts) + 1, config.source.name, resources)


PER_TOKEN_WRITERS = 12  # at most, batches an actor writes while its streams compute others (per-token output)


def _writers(opts: EmbedOptions) -> int:
    """Batches an actor may hold beyond its CUDA streams' worth, being written. Per-token columns are
    ~100x the bytes of pooled ones, and Parquet encodes nested lists at ~50 K residues/s per thread
    (bench/README.md, "Per-token output"): several parts written at once keep up with the GPU."""
    per_token = any(i in ("per-token", "logits") for i in opts.include or ())
    if not per_token or opts.device == "cpu":
        return 0
    # one thread a part; the node's cores are shared with the driver's loaders and the other actors
    return max(2, min(PER_TOKEN_WRITERS, (os.cpu_count() or 4) - 4))


# --- output location, manifest and resume ---------------------------------------------------------------

def _prepare_out_dir(out: OutputLocation, opts: EmbedOptions) -> None:
    try:
        out.make_dirs()
        out.write_atomic(WRITE_TEST, lambda f: f.write(b""))
        out.delete(WRITE_TEST)
        files = out.list_files()
    except Exception as e:  # noqa: BLE001 - OSError locally, pyarrow / fsspec errors elsewhere
        raise EmbedError(f"{out}: output directory is not writable ({getattr(e, 'strerror', None) or e})") from None
    parts = [name for name in files if PART_NAME.fullmatch(name)]
    previous = out.holds_run(files)
    if opts.resume or opts.overwrite:  # temporaries of writes a killed run left behind
        _remove_temporaries(out, files)
    if previous and opts.overwrite:
        for name in parts:
            out.delete(name)
        out.delete(MANIFEST)
        out.delete(LEGACY_MANIFEST)
    elif previous and not opts.resume:
        raise EmbedError(f"{out}: {PREVIOUS_RUN}")


def _remove_temporaries(out: OutputLocation, files: dict[str, int]) -> None:
    """Delete what writes cut short left (an actor killed while it wrote a part): nothing else."""
    for name in files:
        if is_cut_short(name):
            out.delete(name)


def _scratch_dir(out: OutputLocation) -> Path:
    """Local scratch space (gzip input decompressed, index and plan columns): OUT_DIR/.work for a local
    output directory, else a temporary directory on this machine."""
    local = out.local_path
    if local is not None:
        return local / ".work"
    return Path(tempfile.mkdtemp(prefix="virnucpro-work-"))


def _open_manifest(out: OutputLocation, opts: EmbedOptions, source: ModelSource, dim: int, input: Path,
                   fingerprint: str, index: FastaIndex, num_batches: int, toks: int) -> Manifest:
    old = Manifest.load(out) if opts.resume else None
    if old is not None:
        if old.fingerprint != fingerprint:
            raise EmbedError(f"{out}: holds a different run (model, input or batching options differ: "
                             f"{old.model} on {old.input}); use --overwrite to replace it")
        old.complete = False
        return old
    manifest = Manifest(model=source.name, family=source.family, dim=dim, input=str(input),
                        fingerprint=fingerprint, num_sequences=len(index), num_batches=num_batches,
                        skipped_empty=index.skipped_empty, toks_per_batch=toks)
    manifest.save(out)
    return manifest


def _finished_batches(out: OutputLocation, manifest: Manifest, plan: Plan) -> np.ndarray:
    """Batches that need no recomputation (a bool mask): parts listed in the manifest and present, or
    present and whole but not yet listed (the driver died between an actor's write and its own
    manifest update). One directory listing; only unlisted parts are opened."""
    files = out.list_files()
    done = np.zeros(len(plan), bool)
    for name in list(manifest.parts):
        m = PART_NAME.fullmatch(name)
        b = int(m.group(1)) if m else -1
        if name in files and 0 <= b < len(plan) and manifest.parts[name] == plan.rows(b):
            done[b] = True
        else:
            del manifest.parts[name]
    for name in files:
        m = PART_NAME.fullmatch(name)
        if not m or name in manifest.parts or int(m.group(1)) >= len(plan):
            continue
        b = int(m.group(1))
        try:
            rows = pq.read_metadata(out.join(name), filesystem=out.fs).num_rows
        except Exception:  # noqa: BLE001 - a damaged file is recomputed
            rows = -1
        if rows == plan.rows(b):
            manifest.parts[name] = rows
            done[b] = True
    return done


def _complete(out: OutputLocation, manifest: Manifest, num_sequences: int, num_batches: int) -> None:
    """Mark the run complete, after counting every input sequence in the finished parts."""
    if manifest.rows_done != num_sequences or len(manifest.parts) != num_batches:
        manifest.save(out)
        raise EmbedError(f"{out}: {manifest.rows_done} rows in {len(manifest.parts)} parts, expected "
                         f"{num_sequences} rows in {num_batches} parts; the run is not complete")
    _remove_temporaries(out, out.list_files())  # a reader of OUT_DIR by its path sees parts alone
    if manifest.parts:  # the manifest's schema is the parts' (see Manifest), as they were written
        manifest.schema = part_schema(out, min(manifest.parts))
    manifest.complete, manifest.finished = True, time.time()
    manifest.save(out)


# --- dealing batches ----------------------------------------------------------------------------------

class _Dispatcher:
    """The loop between the scheduler and Ray: loads batches ahead of the actors, deals what the
    scheduler says to the actors the pool hands out, and reports what comes back."""

    def __init__(self, pool: ActorPool, index: FastaIndex, tokenizer, plan: Plan, todo: np.ndarray,
                 workers: int, actor_wait_seconds: float):
        self.pool, self.index, self.tokenizer, self.plan = pool, index, tokenizer, plan
        self.todo = [int(b) for b in todo]
        self.scheduler = Scheduler(self.todo)
        self.actor_wait_seconds = actor_wait_seconds
        self.metrics = DriverMetrics(pool.name)
        self.workers = workers
        self.loader = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="virnucpro-loader")
        self.loading: deque[tuple[int, Future]] = deque()  # batches being read and tokenised, in order
        self.cursor = 0  # todo[cursor:] not yet submitted to the loader
        self.refs: dict[int, ray.ObjectRef] = {}  # loaded batches in the object store, until written
        self.running: dict[ray.ObjectRef, tuple[int, Lease]] = {}
        self.idle_since: float | None = None

    def prefetch(self) -> None:
        """Start reading and tokenising the first window of batches (call while the actors load)."""
        self._load_ahead()

    def close(self) -> None:
        """Stop the loader threads (queued loads are dropped) and the actors."""
        self.loader.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown()

    def results(self) -> Iterator[PartResult]:
        """Yield PartResults as batches finish; raise EmbedError when the scheduler says to stop."""
        try:
            while not self.scheduler.done:
                self._load_ahead()
                self._collect_loaded()
                self._deal()
                probes = self.pool.probes()
                self.metrics.update(len(self.todo) - self.cursor + len(self.loading) + self.scheduler.waiting,
                                    len(self.running), self.pool.usable, self.scheduler.remaining)
                self._check_progress_possible()
                for ref in self._wait(list(self.running) + probes):
                    if ref in self.running:
                        result = self._finished(ref)
                        if result is not None:
                            yield result
                    else:
                        self.pool.probe_done(ref)
            self.metrics.update(0, 0, self.pool.usable, 0, force=True)
        finally:
            self._stop()

    # -- loading ahead of the actors (backpressure: only as far as they can take)

    def _window(self) -> int:
        """Batches read ahead of the actors: as many as they can take, plus one per loader thread."""
        return self.pool.size * self.pool.per_actor + self.workers

    def _load_ahead(self) -> None:
        while self.cursor < len(self.todo) and len(self.loading) + self.scheduler.waiting < self._window():
            b = self.todo[self.cursor]
            self.cursor += 1
            self.loading.append((b, self.loader.submit(make_batch, self.index, self.plan[b], self.tokenizer, b)))

    def _collect_loaded(self, block: bool = False) -> None:
        """Move loaded batches, in plan order, into the object store and the scheduler's queue."""
        while self.loading and (self.loading[0][1].done() or block):
            b, fut = self.loading.popleft()
            self.refs[b] = ray.put(_loaded(b, fut))
            self.scheduler.add(b)
            block = False

    # -- dealing and collecting

    def _deal(self) -> None:
        while self.scheduler.waiting:
            lease = self.pool.acquire()
            if lease is None:
                return
            b, attempt = self.scheduler.deal()
            self.running[lease.actor.embed.remote(self.refs[b], attempt)] = (b, lease)

    def _check_progress_possible(self) -> None:
        """Stop when no actor can take work: all dead, or none usable for actor_wait_seconds."""
        remaining = self.scheduler.remaining
        if not self.running and self.pool.all_dead:
            raise EmbedError(f"every actor died and none could be replaced; {remaining} batches left: see "
                             f"the Ray logs (`ray logs`) for why, then rerun with --resume")
        if self.pool.usable or self.running:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = time.monotonic()
        elif time.monotonic() - self.idle_since > self.actor_wait_seconds:
            raise EmbedError(f"no embedding actor usable for {self.actor_wait_seconds:.0f} s "
                             f"({self.pool.states()}); {remaining} batches left: the cluster may lack the "
                             f"resources to restart them (see `ray status`); rerun with --resume")

    def _wait(self, refs: list) -> list:
        if not refs:
            if self.loading and not self.scheduler.waiting:
                self._collect_loaded(block=True)  # nothing to wait for but the loader (or its error)
            else:
                time.sleep(0.2)
            return []
        finished, _ = ray.wait(refs, num_returns=1, timeout=0.5)
        if finished:  # take everything that is ready, not one at a time
            finished, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return finished

    def _finished(self, ref) -> PartResult | None:
        """A dealt batch came back: its PartResult, or None when it was requeued after a failure."""
        b, lease = self.running.pop(ref)
        self.pool.release(lease)
        try:
            result: PartResult = ray.get(ref)
        except _ACTOR_FAILED as e:
            self._failed(b, lease, ACTOR_DIED, e)
            self.pool.actor_died(lease)
            return None
        except RayTaskError as e:
            self._failed(b, lease, failure_kind(getattr(e, "cause", None)), e)
            return None
        self.scheduler.complete(b)
        del self.refs[b]
        return result

    def _failed(self, b: int, lease: Lease, kind: str, e: Exception) -> None:
        decision = self.scheduler.fail(b, kind)
        self.metrics.failure({ACTOR_DIED: "actor_died"}.get(kind, "error_retried" if decision.again else "batch_error"))
        if decision.again and kind == ACTOR_DIED:
            log.warning("actor %d died during batch %d (%s); dealing the batch to another actor",
                        lease.number, b, cause(e))
        elif decision.again:
            log.warning("batch %d failed on actor %d (%s); dealing it again (retry %d of %d)",
                        b, lease.number, cause(e), decision.attempts, self.scheduler.max_error_retries)
        elif kind == ACTOR_DIED:
            raise EmbedError(f"batch {b} failed {decision.attempts} times because its actor died "
                             f"(last: {cause(e)}); see the Ray logs (`ray logs`) for why") from None
        else:
            raise EmbedError(self._failure_message(b, e, kind, decision.attempts)) from None

    def _failure_message(self, b: int, e: Exception, kind: str, attempts: int) -> str:
        inner = getattr(e, "cause", None)
        if isinstance(inner, BatchError):
            return str(inner)
        batch: TokenBatch = ray.get(self.refs[b])
        if kind == STORAGE:
            return (f"{batch.describe()}: writing its part failed: {cause(e)}. Finished parts are kept and the "
                    f"run is not complete: free space or fix permissions, then rerun with --resume")
        tried = f"{attempts} attempts" if attempts > 1 else "not retried"
        return f"{batch.describe()} failed: {cause(e)} ({tried}); fix the cause, then rerun with --resume"

    def _stop(self) -> None:
        """A run that stops early lets its dealt batches end (their parts are whole and found by
        --resume), so that no part appears after embed() has raised."""
        self.loader.shutdown(wait=False, cancel_futures=True)
        if self.running:
            for ref in self.running:
                ray.cancel(ref, force=False)  # batches still queued in an actor do not start
            ray.wait(list(self.running), num_returns=len(self.running), timeout=STOP_WAIT_SECONDS)


def _loaded(b: int, fut: Future) -> TokenBatch:
    try:
        return fut.result()
    except Exception as e:  # noqa: BLE001 - e.g. the input changed since it was indexed
        raise EmbedError(f"batch {b}: reading and tokenising its sequences failed: {e}") from e


__all__ = ["embed", "run_embed", "EmbedResult", "EmbedError", "EmbedOptions"]
