"""The embedding driver: check, index, plan, start actors, deal batch descriptions, collect parts.

    embed(input, out_dir, model, **options)    # the Python API of `virnucpro embed`

The driver stays light however large the input: it indexes (in Ray tasks beside the actors, for an
input of more than one range: `virnucpro.io.index`), plans and deals. A batch travels to its actor as a
description (`BatchSpec`: byte offsets and lengths of its records), and the actor reads, tokenises,
computes and writes the Parquet part itself, so reading, tokenising and the embeddings never pass
through the driver. Input and output may be local, on a shared filesystem or on an object store.

Why not Ray Data's `map_batches(...).write_parquet(...)`: it batches by row count, not by tokens; its
output files are not tied to a deterministic plan, so a killed run cannot resume without redoing or
duplicating rows. What this needs is small: a deterministic token-budget plan (`BatchPlan`), a work
queue that deals batches longest-first to whichever actor is free (`scheduling.Scheduler` over a
`pool.ActorPool`), part files named by batch id, and a manifest. Ray core gives the rest.

Memory. The driver holds no sequences and no embeddings: the index and the plan are int64 columns in
memory-mapped scratch files. The plan is saved in OUT_DIR/.work/plan, so `--resume` maps it back and
deals what is left without reading the input again.

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
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray

# Nothing here imports torch: a job through a running service (--service) needs none of it. A job with
# its own actors imports the model code (and torch) where it checks the model and defines the actors.
from virnucpro.batching import BatchPlan, Plan, plan_fingerprint, token_counts
from virnucpro.models.registry import ModelSource
from virnucpro.io.index import RANGE_BYTES, FastaIndex, plain_copy, serial
from virnucpro.options import EmbedOptions, OptionError
from virnucpro.io.output import (MANIFEST, PART_NAME, Manifest, OutputLocation,
                             default_columns, plan_columns)
from virnucpro.io.storage import InputFile, Location
from virnucpro.io.tables import COLUMNS_NAME, convert_table, kept_columns
from virnucpro.io.tables import FASTA_NAME as TABLE_FASTA

from .dispatch import Dispatcher, Totals, collect
from .indexing import RangeTasks
from .outdir import WORK_DIR, complete, file_in, finished_batches, prepare_out_dir, resumable_manifest
from .checks import check_embed, table_input
from .pool import ActorPool
from .progress import Timeline
from .scheduling import EmbedError
from .session import Placement, RaySession, local_dashboard

if TYPE_CHECKING:
    from actors.embedder import ActorConfig

log = logging.getLogger("virnucpro")

CALIBRATION_RECORDS = 256  # records the driver tokenises to estimate a BPE model's tokens per base
TASK_INDEX_BYTES = 16 << 20  # an input this large is indexed by Ray tasks on the nodes, a smaller one here


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
    first_part_seconds: float = 0.0  # from the first batch dealt to the first part written (pipeline fill)
    # seconds from the process's start to the end of each start-up phase, up to the first part written,
    # then to the last part written and to the run's end (actors and Ray shut down, output completed)
    timeline: dict[str, float] = field(default_factory=dict)
    service: str | None = None  # the service whose replicas computed the batches, if any
    index_nodes: list[str] = field(default_factory=list)  # Ray nodes whose tasks indexed the input (none: the driver)

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

    input and out_dir are local paths or URIs on any pyarrow/fsspec filesystem (`s3://bucket/in.fa.gz`,
    `s3://bucket/run`). Options are the fields of `virnucpro.options.EmbedOptions`; a value out of range
    raises `OptionError` before anything starts. `actor_class`: the actor run on each worker, `Embedder`
    (the default) or a subclass of it (the tests inject faults this way). `model` None: `service=NAME`'s.
    `timeline`: where start-up phases are marked (default: from this call's start). Returns an `EmbedResult`; read the rows with
    `virnucpro.io.output.read_embeddings(out_dir)` or `pyarrow.parquet.read_table(out_dir)`.
    """
    return run_embed(input, out_dir, None if model is None else str(model), EmbedOptions(**options),
                     actor_class, timeline)


def run_embed(input: str | Path, out_dir: str | Path, model: str | None, opts: EmbedOptions,
              actor_class: type | None = None, timeline: Timeline | None = None,
              session: RaySession | None = None, stop: threading.Event | None = None) -> EmbedResult:
    """`embed` with its options parsed. `model` None: the service's (`opts.service`); `actor_class` None:
    `Embedder`. `session`: Ray being started in the background, as the command line does before its
    imports; by default it is started here, at once. `stop`: set from another thread, the run stops
    within a second or so as Ctrl-C stops it (KeyboardInterrupt), its finished parts kept."""
    return EmbedJob(str(input), out_dir, model, opts, actor_class, timeline, session, stop).run()


class EmbedJob:
    """One embedding run, as the steps a user waits through: check (model, input, output: before Ray is
    needed), connect and launch the actors (they load the model while the rest goes on), plan (index and
    cut into batches, or the saved plan of a run being resumed), deal, and complete the output."""

    def __init__(self, input: str, out_dir: str | Path, model: str | None, opts: EmbedOptions,
                 actor_class: type | None = None, timeline: Timeline | None = None, session: RaySession | None = None,
                 stop: threading.Event | None = None):
        self.input, self.model, self.opts, self.actor_class, self.stop = input, model, opts, actor_class, stop
        self.out = OutputLocation.parse(out_dir)
        self.timeline = timeline or Timeline()
        self.session = session
        self.target: _Target | None = None
        self.source: InputFile | None = None
        self.pool: ActorPool | None = None
        self.plan: BatchPlan | None = None
        self.manifest: Manifest | None = None
        self.dispatcher: Dispatcher | None = None
        self.local_scratch: Path | None = None
        self.skipped_empty: list[str] = []  # empty records the index skipped (a resumed run keeps its manifest's)
        self.table = None  # a table input's columns (`virnucpro.io.tables.TableInput`), None for FASTA
        self.kept = None  # a table input's kept columns (pyarrow Table, row i = record i), handed out per batch
        self.created_out = False  # OUT_DIR did not exist before this run
        self.resumed = False  # a previous run's manifest is this run's
        self.index_nodes: list[str] = []  # Ray nodes that indexed ranges of the input (none: the driver did)

    # -- the steps ------------------------------------------------------------------------------------

    def run(self) -> EmbedResult:
        opts = self.opts
        self.timeline.mark("driver_started")  # imports done, arguments parsed
        # options, input, output and the model's files: milliseconds, before Ray is started
        self.source, model_source = check_embed(self.input, self.out.uri, self.model, opts)
        # Ray takes seconds to start: meanwhile the model's weights are checked and the output prepared. A
        # service runs on this machine's Ray.
        own_session = self.session is None
        self.session = self.session or RaySession(
            opts.address or ("auto" if opts.service else None), opts.dashboard_host,
            local_dashboard(opts.dashboard, self.input), on_ready=lambda: self.timeline.mark("ray_up"))
        try:
            self._check(model_source)
        except BaseException:
            # a command exits at once; a call waits for Ray's start to end before it disconnects
            self.session.close(wait=own_session)
            raise
        todo = np.zeros(0, np.int64)
        try:
            self._connect()
            todo = self._plan()
            if todo is None:  # --resume of a run that is complete
                return self._nothing_to_do()
            totals = self._deal(todo)
        except BaseException:
            self._keep_what_finished()
            raise
        finally:
            self._close()
        self._complete()
        self.timeline.mark("done")
        return self._result(todo, totals)

    def _check(self, model_source: ModelSource | None) -> None:
        """What can be known before Ray is up: the model's weights (names and shapes) and the output columns
        asked of it; the output directory, prepared."""
        if model_source is not None:  # (a service's model is checked by the service)
            self.target = _Target.local(model_source, self.opts)  # a bad checkpoint fails here
        self.timeline.mark("model_checked")
        self.created_out = not self.out.exists_dir()
        prepare_out_dir(self.out, self.opts)
        self.local_scratch = (self.out.local_path / WORK_DIR if self.out.local_path is not None
                              else Path(tempfile.mkdtemp(prefix="virnucpro-work-")))

    def _keep_what_finished(self) -> None:
        """After a failure or Ctrl-C: a run with finished parts keeps them and its manifest (--resume
        finishes it); a run that wrote no part leaves nothing behind (a rerun needs no --overwrite)."""
        parts = self.manifest is not None and any(PART_NAME.fullmatch(f) for f in self.out.list_files())
        if self.manifest is not None and (parts or self.resumed):  # (parts its actors wrote as it stopped, too)
            try:
                self.manifest.save(self.out)
            except Exception:  # noqa: BLE001 - the original error matters more
                log.warning("could not save the manifest", exc_info=True)
            return
        if self.manifest is not None:
            self.out.delete(MANIFEST)
        self.out.child(WORK_DIR).delete_tree()
        if self.local_scratch is not None:
            shutil.rmtree(self.local_scratch, ignore_errors=True)
        if self.created_out:
            self.out.delete_dir_if_empty()

    def _connect(self) -> None:
        """Ray up; the actors launched (they load their model while the input is indexed and planned)."""
        self.session.wait()  # (its on_ready marked "ray_up" when it was)
        if self.opts.service:
            self.target, self.pool = _Target.service(self.opts, self.out)
            self.pool.stop = self.stop
            return
        from actors.embedder import ActorConfig, Embedder

        self.target.place(self.opts)
        config = ActorConfig(self.target.source, self.out.uri, self.target.device, self.opts)
        self.pool = _new_pool(self.actor_class or Embedder, config, self.target, self.opts)
        self.pool.stop = self.stop
        self.pool.launch()

    def _plan(self) -> np.ndarray | None:
        """The plan (made now, or the saved one of the run being resumed) and the manifest; returns the
        batches still to compute (None: the run being resumed is complete)."""
        target, opts, out = self.target, self.opts, self.out
        source = target.source
        toks = opts.toks_per_batch or target.toks_per_batch
        outputs = (opts.repr_layers, opts.include, opts.output_dtype)
        self.table = table_input(self.input, opts)
        fingerprint = plan_fingerprint(source.name, source.family, target.truncation, toks, self.source.identity(),
                                       *(() if default_columns(*outputs) else (outputs,)),
                                       *((self.table,) if self.table else ()))
        old = resumable_manifest(out, fingerprint) if opts.resume else None
        self.resumed = old is not None
        if old is not None and old.complete:
            self.manifest = old
            return None
        work = out.child(WORK_DIR)
        self.plan = BatchPlan.fetch(work.child("plan"), fingerprint, self.local_scratch / "plan") if old else None
        if self.plan is not None:
            # the records are where they were, in the input as it is named now (or its plain copy)
            self.plan.input = self._readable(work)
            self.kept = kept_columns(file_in(work, COLUMNS_NAME)) if self.table and self.table.keep else None
            log.info("resuming from the saved plan (%d batches): the input is not read again", len(self.plan))
            self.timeline.mark("indexed")
            if target.tokenizer is not None and self.plan.bases_per_token:
                target.tokenizer.bases_per_token = self.plan.bases_per_token
        else:
            self.plan = self._index_and_plan(toks, fingerprint, work)
        manifest = old or Manifest(model=source.name, family=source.family, dim=target.dim, input=self.source.uri,
                                   fingerprint=fingerprint, num_sequences=self.plan.num_sequences,
                                   num_batches=len(self.plan), skipped_empty=self.skipped_empty, toks_per_batch=toks)
        manifest.complete = False
        manifest.save(out)
        self.manifest = manifest
        done = finished_batches(out, manifest, self.plan)
        todo = np.flatnonzero(~done)
        if done.any():
            log.info("resuming: %d of %d batches already done, %d to go", int(done.sum()), len(self.plan), len(todo))
        self.timeline.mark("planned")
        return todo

    def _index_and_plan(self, toks: int, fingerprint: str, work: Location) -> BatchPlan:
        """Index the input (from TASK_INDEX_BYTES on, in Ray tasks on the cluster's nodes, a range of
        RANGE_BYTES each, or one task for a gzip stream; a smaller input here, where a task's start would
        cost more than it saves), then plan and save the plan beside the output."""
        target = self.target
        tasks = RangeTasks() if self.source.size >= TASK_INDEX_BYTES else None
        start = time.perf_counter()
        fasta = self.source.uri
        if self.table:  # its ids and sequences as FASTA, its kept columns as Arrow, in .work/
            fasta, columns = (tasks.convert if tasks else convert_table)(self.source.uri, self.table, work.uri)
            self.kept = kept_columns(columns) if columns else None
        index = FastaIndex.build(fasta, target.source.sequence_kind, self.local_scratch, copy_to=work.uri,
                                 map_ranges=tasks or serial, range_bytes=RANGE_BYTES)
        self.skipped_empty = index.skipped_empty
        self.timeline.mark("indexed")
        where = f"{tasks.ranges} range(s) on {len(tasks.nodes)} node(s)" if tasks else "in the driver"
        log.info("indexed %d sequences (%s) in %.1f s", len(index), where, time.perf_counter() - start)
        self.index_nodes = sorted(tasks.nodes) if tasks else []
        tokenizer = target.tokenizer
        if not tokenizer.exact:  # a BPE model: its tokens per base, from a sample, for the plan's estimates
            sample = index.read(np.arange(min(len(index), CALIBRATION_RECORDS)), tokenizer.max_residues)
            log.debug("planning with %.2f bases per token", tokenizer.calibrate([r.sequence for r in sample]))
        plan = Plan.build(lambda a, b: token_counts(tokenizer, index.lengths[a:b]), toks, len(index),
                          self.local_scratch)
        batches = BatchPlan.gather(index, plan, self.local_scratch / "plan", getattr(tokenizer, "bases_per_token", None))
        batches.save(work.child("plan"), fingerprint, self.local_scratch / "plan")
        return batches

    def _deal(self, todo: np.ndarray) -> Totals:
        self.dispatcher = Dispatcher(self.pool, self.plan, todo, self.opts.actor_wait_seconds, self.stop, self.kept)
        if len(todo):
            # the plan's first batch holds its longest sequences: each actor warms up on its shape
            largest = token_counts(self.target.tokenizer, self.plan.spec(0).lengths)
            infos = self.pool.start(self.opts.actor_wait_seconds, ready_call=lambda actor: actor.prepare.remote(largest))
            for phase, at in infos[0]["timeline"].items() if not self.opts.service else ():
                self.timeline.mark(phase, at)  # the first actor ready: when it was placed, loaded, ...
        return collect(self.dispatcher, self.manifest, self.out, self.plan, self.opts, self.timeline)

    def _close(self) -> None:
        closing = time.perf_counter()
        if self.dispatcher is not None:
            self.dispatcher.close()
        elif self.pool is not None:
            self.pool.shutdown()
        actors_stopped = time.perf_counter()
        ray_seconds = self.session.close()
        closed = time.perf_counter()  # a slow shutdown is wall clock the user waits for: say so
        log.log(logging.INFO if closed - closing >= 1 else logging.DEBUG, "shut down in %.1f s (actors %.1f s, Ray %.1f s)",
                closed - closing, actors_stopped - closing, ray_seconds)

    def _complete(self) -> None:
        """Mark the run complete, after counting every input sequence in the finished parts; then the
        scratch space goes."""
        complete(self.out, self.manifest, self.plan.num_sequences, len(self.plan))
        self.out.child(WORK_DIR).delete_tree()
        shutil.rmtree(self.local_scratch, ignore_errors=True)

    def _readable(self, work: Location) -> str:
        """What the records are read from: the input, or the plain FASTA made of it in .work/ (a gzip
        stream's copy, a table's ids and sequences)."""
        if self.table:
            return file_in(work, TABLE_FASTA)
        return plain_copy(work, self.source) if self.source.gzip else self.source.uri

    def _nothing_to_do(self) -> EmbedResult:
        m = self.manifest
        log.info("%s: the run is complete already; nothing to do", self.out)
        self.timeline.mark("done")
        return EmbedResult(self.out.local_path or self.out.uri, m.num_sequences, m.num_batches, 0, 0, 0.0,
                           time.time() - self.timeline.origin, timeline=self.timeline.marks, service=self.opts.service)

    def _result(self, todo: np.ndarray, totals: Totals) -> EmbedResult:
        run, pool = self.dispatcher, self.pool
        result = EmbedResult(self.out.local_path or self.out.uri, self.plan.num_sequences, len(self.plan), len(todo),
                             totals.tokens, totals.elapsed(), time.time() - self.timeline.origin, pool.infos(),
                             batches_retried=run.scheduler.retried, actors_replaced=pool.replaced,
                             batches_retried_after_errors=run.scheduler.retried_after_errors,
                             forward_seconds=totals.forward, write_seconds=totals.write,
                             first_part_seconds=totals.first_part, timeline=self.timeline.marks, service=self.opts.service,
                             index_nodes=self.index_nodes)
        log.info("done: %s", result.summary())
        return result


# --- the actors ------------------------------------------------------------------------------------------

@dataclass
class _Target:
    """What the batches go to: the model (to plan and fingerprint) and where it runs."""

    source: ModelSource
    tokenizer: object
    dim: int
    truncation: int  # --truncation-seq-length the tokenizer applies
    toks_per_batch: int  # the default budget for this model on this device
    device: str = "cpu"
    num_gpus: int = 0
    placement: Placement | None = None

    @classmethod
    def local(cls, source: ModelSource, opts: EmbedOptions) -> _Target:
        """The job's own actors will load `source`; checked here (names and shapes, and the output columns
        asked of it), before they start."""
        from virnucpro.models import describe_model, load_tokenizer

        shape = describe_model(source)
        try:
            plan_columns(opts.repr_layers, opts.include, shape.layers, shape.bos_name, shape.logits)
        except ValueError as e:
            raise OptionError(str(e)) from None
        return cls(source, load_tokenizer(source, opts.truncation_seq_length), shape.dim, opts.truncation_seq_length, 0)

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
        pool = service_pool(opts.service, out.uri, options.cuda_streams + SERVICE_LOADS_AHEAD,
                            (opts.repr_layers, opts.include, opts.output_dtype))
        target = cls(source, info["tokenizer"], info["dim"], options.truncation_seq_length,
                     info["toks_per_batch"], info["info"]["device"].split(":")[0], pool.size)
        log.info("service '%s': %s on %d replica(s)", opts.service, source.name, pool.size)
        return target, pool


SERVICE_LOADS_AHEAD = 2  # batches a job keeps at each replica beyond its CUDA streams: being read and tokenised


def _new_pool(actor_class: type, config: ActorConfig, target: _Target, opts: EmbedOptions) -> ActorPool:
    """The run's actors: `place.num_actors` of `actor_class`, each taking its CUDA streams' worth of batches
    plus those its loader threads read and tokenise meanwhile (`--dataloader-workers`)."""
    place = target.placement
    streams = opts.cuda_streams if place.device == "cuda" else 1
    loaders = opts.dataloader_workers or place.dataloader_workers
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if opts.expandable_segments else {}
    if place.device == "cpu":  # torch's intra-op threads in each CPU actor: its share of the node
        config = replace(config, cpu_threads=max(1, int(place.cluster_cpus) // place.num_actors))
    per_actor = streams + loaders + _writers(opts)
    options = dict(
        num_gpus=place.gpus_per_actor,
        num_cpus=1,
        max_concurrency=per_actor,  # each call reads and tokenises, then waits for a stream pair
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
    return ActorPool(new_actor, place.num_actors, per_actor, config.source.name, resources)


PER_TOKEN_WRITERS = 12  # at most, batches an actor writes while its streams compute others (per-token output)


def _writers(opts: EmbedOptions) -> int:
    """Batches an actor may hold beyond its streams and loaders, being written. Per-token columns are
    ~100x the bytes of pooled ones, and Parquet encodes nested lists slowly (bench/README.md, "Per-token
    output"): several parts written at once keep up with the GPU."""
    per_token = any(i in ("per-token", "logits") for i in opts.include or ())
    if not per_token or opts.device == "cpu":
        return 0
    # one thread a part; the node's cores are shared with the loaders and the other actors
    return max(2, min(PER_TOKEN_WRITERS, (os.cpu_count() or 4) - 4))


__all__ = ["embed", "run_embed", "EmbedJob", "EmbedResult", "EmbedError", "EmbedOptions"]
