"""The embedding driver: plan, start actors, deal batches, collect parts, write the manifest.

Why not Ray Data's `map_batches(...).write_parquet(...)`: it batches by row count, not by tokens; its
output files are not tied to a deterministic plan, so a killed run cannot resume without redoing or
duplicating rows; and it routes every embedding through its own operators. What this needs is small:
a deterministic token-budget plan, a work queue that deals batches longest-first to whichever actor
is free, part files named by batch id, and a manifest. Ray core (actors, `ray.wait`, restarts)
gives the rest.

Memory. The driver holds no sequences and no embeddings: the FASTA index and the plan's record order
are int64 columns in memory-mapped scratch files (`FastaIndex`, `Plan`), the plan's batches are two
small arrays, and loader threads read and tokenise only the batches inside a bounded window ahead of
the actors (backpressure: nothing more is read until a batch finishes). Actors write the embeddings
to the output location themselves.

Faults. A batch whose actor dies (process killed, node lost) goes back to the front of the queue and
another actor takes it; the dead actor is probed without blocking the loop: Ray restarts it
(`max_restarts`), possibly on another node, and it rejoins the pool; when Ray gives up on it, a new
actor replaces it. Part files are named by batch id and written atomically, so a batch computed twice
replaces its own file: no sequence is lost or written twice. A batch that raises inside the actor is
dealt again when the error may not recur (`failure_kind`: up to MAX_ERROR_RETRIES times); one that
cannot succeed (bad input, CUDA out of memory, a full disk or a permission error writing its part)
stops the run at once with a message naming the batch and the cause; the manifest stays incomplete
and `--resume` finishes the run once the cause is fixed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.exceptions import (ActorDiedError, ActorUnavailableError, ObjectLostError, RayActorError,
                            RayTaskError, WorkerCrashedError)

from actors.embedder import BatchError, Embedder, PartResult
from virnucpro.batching import Plan, TokenBatch, make_batch, plan_fingerprint, token_counts
from virnucpro.models import DNABERT_S_FAMILY, ModelSource, check_model, load_tokenizer, resolve_model
from virnucpro.output import MANIFEST, Manifest, OutputLocation
from virnucpro.sequences import FastaIndex, SequenceError

log = logging.getLogger("virnucpro")

# Token budgets when --toks-per-batch is not given: CPU batches stay small for memory locality; on a
# GPU the actor's budget is what fills the chip (see bench/) without risking memory on 40 GB cards.
DEFAULT_TOKS = {"cpu": 4096, "cuda": 65536}
# DNABERT-S does ~25x fewer FLOPs a token than ESM-2 3B: bigger batches keep the GPU busy while the
# per-batch host work (reading, tokenising, the Parquet part) stays the same.
DEFAULT_TOKS_DNABERT_S_CUDA = 262144


def default_toks_per_batch(source: ModelSource, device: str) -> int:
    if device == "cuda" and source.family == DNABERT_S_FAMILY:
        return DEFAULT_TOKS_DNABERT_S_CUDA
    return DEFAULT_TOKS[device]


MAX_BATCH_RETRIES = 3  # a batch whose actor died this many times in a row fails the run
MAX_ACTOR_RESTARTS = 3  # Ray restarts a dead actor this many times, then the pool replaces it
MAX_REPLACEMENTS_PER_ACTOR = 3  # new actors the pool may start, per actor of the run
ACTOR_WAIT_SECONDS = 900  # no usable actor for this long (all restarting, none schedulable): give up
STOP_WAIT_SECONDS = 30  # a failed run waits this long for the batches its actors are computing
_PART = re.compile(r"part-(\d{6,})\.parquet")
_TEMPORARY = re.compile(r"\.(part-\d{6,}\.parquet|_manifest\.json)\..+\.tmp")  # a write cut short
_TRANSIENT = (RayActorError, ObjectLostError, WorkerCrashedError)  # the actor, not the batch, failed
MAX_ERROR_RETRIES = 2  # a batch that raised an unexpected error is dealt again this many times, then the run fails
# The output cannot be written (disk full, quota, permissions, read-only): retrying will not help, but
# finished parts stay and --resume finishes the run once the cause is fixed.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


class EmbedError(RuntimeError):
    """A run that cannot finish: the message says which batch or actor, and why."""


@dataclass
class EmbedOptions:
    device: str = "auto"  # auto, cuda, cpu
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    num_actors: int | None = None  # default: one per GPU (or per --gpus-per-actor share), one on CPU
    # Ray GPU resource each actor reserves; default 1 with device cuda, 0 with cpu. A fraction shares a
    # GPU (0.5: two actors per GPU). Honoured with device cpu too: placement is decided by Ray resources
    # alone, which is how it is tested on machines without GPUs (fake `num_gpus` resources).
    gpus_per_actor: float | None = None
    address: str | None = None  # Ray address; default RAY_ADDRESS or a local Ray
    toks_per_batch: int | None = None
    truncation_seq_length: int = 1022
    dataloader_workers: int | None = None  # default min(cpu_count // num_gpus, 8)
    pin_memory: bool = True
    expandable_segments: bool = False
    cuda_streams: int = 2
    attention: str = "auto"  # auto, sdpa (force the fallback) or flex (DNABERT-S on CUDA)
    compile: bool | None = None  # torch.compile the layers; default: on CUDA
    profile: str | None = None  # directory for torch profiler traces of each actor's first batches
    resume: bool = False
    overwrite: bool = False
    progress: bool | None = None  # default: when stderr is a terminal
    verbose: bool = False
    # where a local Ray started by the driver serves its dashboard and job API; loopback by default
    # (reachable from this machine, or through an SSH tunnel). "0.0.0.0" exposes it to the network.
    dashboard_host: str = "127.0.0.1"
    # Python API only: extra Ray actor options for actor i, merged over the defaults (e.g. a
    # placement-group bundle, so that two embed jobs share GPUs as `cluster.predict` arranges)
    actor_options: Callable[[int], dict] | None = None
    actor_wait_seconds: float = ACTOR_WAIT_SECONDS  # give up when no actor is usable for this long
    max_actor_restarts: int = MAX_ACTOR_RESTARTS  # Ray's restarts of one actor (-1: no limit), then a new one


@dataclass
class EmbedResult:
    out_dir: Path | str  # a Path for a local directory, else the URI
    num_sequences: int
    num_batches: int
    batches_computed: int  # fewer than num_batches when a run was resumed
    tokens_computed: int
    compute_seconds: float  # from the first batch dealt to the last part written
    seconds: float  # the whole call: indexing, Ray and actor start-up included
    actors: list[dict] = field(default_factory=list)
    batches_retried: int = 0  # batches dealt again because their actor died
    batches_retried_after_errors: int = 0  # batches dealt again after an error that may not recur
    actors_replaced: int = 0  # actors Ray gave up on, replaced by new ones
    # summed over batches (concurrent batches of one actor overlap, so these can exceed compute_seconds):
    forward_seconds: float = 0.0  # copy to the device, forward pass, embeddings back to the host
    write_seconds: float = 0.0  # Parquet parts encoded and written
    first_part_seconds: float = 0.0  # from the first batch read to the first part written (pipeline fill)

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
        return (f"{self.num_sequences} sequences ({self.batches_computed} of {self.num_batches} batches "
                f"computed, {self.tokens_computed} tokens) in {self.seconds:.1f} s; embedding "
                f"{self.tokens_per_second / 1e3:.1f} K tokens/s on {len(self.actors)} actor(s){faults} "
                f"-> {self.out_dir}")


def default_dataloader_workers(num_gpus: int) -> int:
    return max(1, min((os.cpu_count() or 1) // max(1, num_gpus), 8))


def embed(input: str | Path, out_dir: str | Path, model: str | Path, **options) -> EmbedResult:
    """Embed every sequence of a FASTA file into Parquet under out_dir (the Python API of `virnucpro embed`).

    out_dir is a local directory or a URI on any pyarrow/fsspec filesystem (`s3://bucket/run`).
    Options are those of `EmbedOptions`. Returns an `EmbedResult`; read the rows with
    `virnucpro.output.read_embeddings(out_dir)` or `pyarrow.parquet.read_table(out_dir)`.
    """
    return run_embed(Path(input), out_dir, str(model), EmbedOptions(**options))


def run_embed(input: Path, out_dir: str | Path, model: str, opts: EmbedOptions) -> EmbedResult:
    start = time.perf_counter()
    source = resolve_model(model)
    tokenizer = load_tokenizer(source, opts.truncation_seq_length)
    dim = check_model(source)  # a wrong or damaged checkpoint fails here, before Ray and the actors
    out = OutputLocation.parse(out_dir)
    _prepare_out_dir(out, opts)
    scratch = _scratch_dir(out)
    index = FastaIndex.build(input, source.sequence_kind, scratch)

    started_ray = _init_ray(opts)
    pool: _ActorPool | None = None
    dispatcher: _Dispatcher | None = None
    manifest: Manifest | None = None
    try:
        device, num_actors, gpus_per_actor, cluster_gpus = _placement(opts)
        toks = opts.toks_per_batch or default_toks_per_batch(source, device)
        plan = Plan.build(lambda a, b: token_counts(tokenizer, index.lengths[a:b]), toks, len(index), scratch)
        fingerprint = plan_fingerprint(source.name, source.family, opts.truncation_seq_length, toks,
                                       index.lengths, index.offsets)
        manifest = _open_manifest(out, opts, source, dim, input, fingerprint, index, len(plan), toks)
        done = _finished_batches(out, manifest, plan)
        todo = np.flatnonzero(~done)
        if done.any():
            log.info("resuming: %d of %d batches already done, %d to go", int(done.sum()), len(plan), len(todo))
        # the plan's first batch holds its longest sequences: the one most demanding of GPU memory
        largest = token_counts(tokenizer, index.lengths[plan[0]]) if len(plan) else None
        pool = _ActorPool(source, out, opts, device, num_actors, gpus_per_actor, largest)
        workers = opts.dataloader_workers or default_dataloader_workers(int(cluster_gpus) if device == "cuda" else 0)
        dispatcher = _Dispatcher(pool, index, tokenizer, plan, workers,
                                 opts.cuda_streams if device == "cuda" else 1, opts.actor_wait_seconds)
        dispatcher.prefetch(todo)  # the first batches are read and tokenised while the actors load
        infos = pool.start() if len(todo) else []
        progress = _Progress(int(plan.tokens.sum()), len(index), int(plan.tokens[done].sum()),
                             manifest.rows_done, opts.progress, opts.verbose)
        tokens_computed, forward_seconds, write_seconds, first_part = 0, 0.0, 0.0, 0.0
        compute_start = time.perf_counter()
        for result in dispatcher.run(todo):
            manifest.parts[result.file] = result.rows
            tokens_computed += result.tokens
            forward_seconds += result.forward_seconds
            write_seconds += result.write_seconds
            first_part = first_part or time.perf_counter() - compute_start
            progress.advance(result.tokens, result.rows, pool.usable, len(pool.slots))
            if progress.due_for_save():
                manifest.save(out)
        progress.close()
        compute_seconds = time.perf_counter() - compute_start
    except BaseException:
        if manifest is not None:  # what finished stays finished: --resume starts from here
            try:
                manifest.save(out)
            except Exception:  # noqa: BLE001 - the original error matters more
                log.warning("could not save the manifest", exc_info=True)
        raise
    finally:
        if dispatcher is not None:
            dispatcher.close()
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
        if out.local_path is None:  # a temporary scratch directory: nothing in it is worth keeping
            shutil.rmtree(scratch, ignore_errors=True)

    if manifest.rows_done != len(index) or len(manifest.parts) != len(plan):
        manifest.save(out)
        raise EmbedError(f"{out}: {manifest.rows_done} rows in {len(manifest.parts)} parts, expected "
                         f"{len(index)} rows in {len(plan)} parts; the run is not complete")
    manifest.complete, manifest.finished = True, time.time()
    manifest.save(out)
    shutil.rmtree(scratch, ignore_errors=True)
    result = EmbedResult(out.local_path or out.uri, len(index), len(plan), len(todo), tokens_computed,
                         compute_seconds, time.perf_counter() - start, infos,
                         batches_retried=dispatcher.retried, actors_replaced=pool.replaced,
                         batches_retried_after_errors=dispatcher.retried_after_errors,
                         forward_seconds=forward_seconds, write_seconds=write_seconds, first_part_seconds=first_part)
    log.info("done: %s", result.summary())
    return result


# --- output location and manifest ---------------------------------------------------------------------

def _prepare_out_dir(out: OutputLocation, opts: EmbedOptions) -> None:
    try:
        out.make_dirs()
        out.write_atomic(".write-test", lambda f: f.write(b""))
        out.delete(".write-test")
        files = out.list_files()
    except Exception as e:  # noqa: BLE001 - OSError locally, pyarrow / fsspec errors elsewhere
        raise EmbedError(f"{out}: output directory is not writable ({getattr(e, 'strerror', None) or e})") from None
    parts = [name for name in files if _PART.fullmatch(name)]
    previous = MANIFEST in files or bool(parts)
    if opts.resume or opts.overwrite:  # temporaries of writes a killed run left behind
        for name in files:
            if _TEMPORARY.fullmatch(name):
                out.delete(name)
    if previous and opts.overwrite:
        for name in parts:
            out.delete(name)
        out.delete(MANIFEST)
    elif previous and not opts.resume:
        raise EmbedError(f"{out}: holds the output of a previous run; use --resume to finish it or "
                         f"--overwrite to replace it")


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
        m = _PART.fullmatch(name)
        b = int(m.group(1)) if m else -1
        if name in files and 0 <= b < len(plan) and manifest.parts[name] == plan.rows(b):
            done[b] = True
        else:
            del manifest.parts[name]
    for name in files:
        m = _PART.fullmatch(name)
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


# --- Ray ----------------------------------------------------------------------------------------------

def _init_ray(opts: EmbedOptions) -> bool:
    """Join the given or RAY_ADDRESS cluster (a `ray job submit` entry point finds RAY_ADDRESS set), or
    start a local one. True when this call connected (and so should disconnect at the end)."""
    if ray.is_initialized():
        return False
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    # A local Ray: token authentication on (Ray >= 2.52 turns it on for a new local cluster unless
    # RAY_AUTH_MODE says otherwise; the token is ~/.ray/auth_token, created if missing, or
    # RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH), and the dashboard and job API on loopback unless
    # --dashboard-host says otherwise. Turning either off is the user's explicit choice, and is logged.
    if opts.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the Ray dashboard and job API listen on %s, not only on loopback", opts.dashboard_host)
    ray.init(include_dashboard=None, dashboard_host=opts.dashboard_host, logging_level=logging.WARNING,
             log_to_driver=True)
    if not token_auth_enabled():
        log.warning("the local Ray runs without token authentication (RAY_AUTH_MODE=%s, Ray %s): any process "
                    "that reaches its ports can run code as you", os.environ.get("RAY_AUTH_MODE", "unset"),
                    ray.__version__)
    _protect_token_file(Path.home() / ".ray" / "auth_token")
    return True


def _protect_token_file(path: Path) -> None:
    """Ray writes ~/.ray/auth_token with the default umask (often world-readable): anyone who can read
    it can run code on the cluster as you. Make it readable by its owner alone."""
    try:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.chmod(0o600)
            log.info("%s: made readable by its owner only (it was mode %o)", path, st.st_mode & 0o777)
    except OSError:
        pass


def token_auth_enabled() -> bool:
    """Whether this process's Ray uses token authentication (False on Ray versions without it)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return False
    return bool(is_token_auth_enabled())


def _placement(opts: EmbedOptions) -> tuple[str, int, float, float]:
    """(device, number of actors, GPUs each actor reserves, GPUs in the cluster)."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    device = opts.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus == 0:
        raise EmbedError("--device cuda, but the Ray cluster has no GPU resources")
    share = opts.gpus_per_actor
    if share is None:
        share = 1.0 if device == "cuda" else 0.0
    if share < 0 or (share > 1 and share != int(share)):
        raise EmbedError(f"--gpus-per-actor {share}: give a fraction of one GPU (0.5) or a whole number")
    if device == "cuda" and share == 0:
        raise EmbedError("--device cuda needs --gpus-per-actor > 0 (Ray assigns GPUs by that resource)")
    if share > gpus:
        raise EmbedError(f"--gpus-per-actor {share:g}, but the Ray cluster has {gpus:g} GPU(s)")
    if opts.num_actors:
        n = opts.num_actors
    elif share > 0:
        n = max(1, int(gpus / share + 1e-9))
    else:
        n = 1
    return device, n, share, gpus


class _Slot:
    """One place in the actor pool: the current actor for it and what the driver knows about it."""

    def __init__(self, number: int, actor):
        self.number, self.actor = number, actor
        self.generation = 0  # bumped when the actor is replaced: results of the old one don't count here
        self.state = "starting"  # starting -> ready; ready -> probing (after a failure) -> ready | replaced
        self.busy = 0  # batches dealt to it and not finished
        self.probe: ray.ObjectRef | None = None
        self.probe_after = 0.0  # next probe time while Ray restarts the actor
        self.info: dict = {}
        self.seen_generation = 0  # the generation `info` came from

    def info_generation_seen(self) -> bool:
        return self.seen_generation == self.generation


class _ActorPool:
    """The embedding actors. Ray restarts a dead one (`max_restarts`) where resources allow; the pool
    notices through a probe (`info`) that never blocks the dispatch loop, and replaces an actor Ray
    has given up on."""

    def __init__(self, source: ModelSource, out: OutputLocation, opts: EmbedOptions, device: str,
                 num_actors: int, gpus_per_actor: float, largest_batch: np.ndarray | None = None):
        self.source, self.out, self.opts, self.device = source, out, opts, device
        self.largest_batch = largest_batch  # each GPU actor warms up on this batch shape before it is ready
        self.streams = opts.cuda_streams if device == "cuda" else 1
        env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"} if opts.expandable_segments else {}
        if device == "cpu":
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // num_actors)
            env["OMP_NUM_THREADS"] = str(cpus)  # torch's intra-op threads in each CPU actor
        # test hooks (actors/embedder.py) reach the actors from the driver's environment
        env.update({k: v for k, v in os.environ.items() if k.startswith("VIRNUCPRO_TEST_")})
        self.options = dict(
            num_gpus=gpus_per_actor,
            num_cpus=1,
            max_concurrency=self.streams,
            max_restarts=opts.max_actor_restarts,
            max_task_retries=0,  # the dispatcher deals a failed batch again, to any actor
            scheduling_strategy="SPREAD",  # actors over nodes; CUDA_VISIBLE_DEVICES is Ray's to set
            runtime_env={"env_vars": env} if env else None,
        )
        self.num_actors = num_actors
        self.slots: list[_Slot] = []
        self.replaced = 0

    def _new_actor(self, number: int):
        extra = self.opts.actor_options(number) if self.opts.actor_options else {}
        level = logging.DEBUG if self.opts.verbose else logging.INFO
        return ray.remote(Embedder).options(**{**self.options, **extra}).remote(
            self.source, self.out.uri, self.device, self.opts.dtype, self.streams, self.opts.pin_memory,
            self.opts.attention, self.opts.compile, level, self.opts.profile, largest_batch=self.largest_batch)

    def start(self) -> list[dict]:
        self.slots = [_Slot(i, self._new_actor(i)) for i in range(self.num_actors)]
        try:
            infos = ray.get([s.actor.info.remote() for s in self.slots])
        except (RayTaskError, RayActorError) as e:
            self.shutdown()
            raise EmbedError(f"an actor could not load model '{self.source.name}': {_cause(e)}") from None
        for s, info in zip(self.slots, infos):
            s.state, s.info = "ready", info
        first = infos[0]
        nodes = len({i["node_id"] for i in infos})
        log.info("%d actor(s) on %d node(s), %s, %s%s, %s", len(infos), nodes, first["gpu"], first["dtype"],
                 ", compiled" if first["compiled"] else "", first["attention"])
        return infos

    @property
    def usable(self) -> int:
        return sum(s.state == "ready" for s in self.slots)

    def failed(self, slot: _Slot) -> None:
        """A batch on this slot's actor failed because the actor died: stop dealing to it and probe."""
        if slot.state == "ready":
            slot.state, slot.probe, slot.probe_after = "probing", None, 0.0

    def probes(self) -> list:
        """Send the probes that are due; return the outstanding ones (for ray.wait)."""
        now = time.monotonic()
        for s in self.slots:
            if s.state == "probing" and s.probe is None and now >= s.probe_after:
                s.probe = s.actor.info.remote()  # queued by Ray until the actor is back
        return [s.probe for s in self.slots if s.probe is not None]

    def probe_done(self, ref) -> bool:
        slot = next((s for s in self.slots if s.probe is not None and s.probe == ref), None)
        if slot is None:
            return False
        slot.probe = None
        try:
            info = ray.get(ref)
        except ActorUnavailableError:  # still restarting: ask again shortly
            slot.probe_after = time.monotonic() + 1.0
        except (ActorDiedError, RayActorError, RayTaskError) as e:
            self._replace(slot, e)
        else:
            moved = info.get("node_id") != slot.info.get("node_id")
            what = "its replacement is up" if slot.generation and not slot.info_generation_seen() else "is back"
            slot.state, slot.info, slot.seen_generation = "ready", info, slot.generation
            log.warning("actor %d: %s (%s%s)", slot.number, what, info["actor"], ", on another node" if moved else "")
        return True

    def _replace(self, slot: _Slot, e: Exception) -> None:
        if self.replaced >= self.num_actors * MAX_REPLACEMENTS_PER_ACTOR:
            slot.state = "dead"
            log.warning("actor %d is gone for good (%s); %d usable", slot.number, _cause(e), self.usable)
            return
        self.replaced += 1
        log.warning("actor %d is gone for good (%s); starting a replacement", slot.number, _cause(e))
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        slot.actor, slot.state, slot.busy = self._new_actor(slot.number), "probing", 0
        slot.generation += 1
        slot.probe_after = 0.0

    def shutdown(self) -> None:
        for s in self.slots:
            try:
                ray.kill(s.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass


def failure_kind(cause: BaseException | None) -> str:
    """How the driver treats an exception a batch raised in its actor:
    "permanent": retrying cannot help (a BatchError: out of memory, a batch that cannot be computed;
    bad input) - the run stops; "storage": the part could not be written for a reason retrying will
    not fix (disk full, quota, permissions, read-only) - the run stops, resumable once fixed;
    "retry": anything else (an I/O hiccup on network storage, a transient library error) - the batch
    is dealt again, up to MAX_ERROR_RETRIES times, then the run stops naming the cause."""
    if isinstance(cause, (BatchError, SequenceError)):
        return "permanent"
    if isinstance(cause, OSError) and cause.errno in _STORAGE_ERRNOS:
        return "storage"
    return "retry"


def _cause(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, RayActorError):
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class _DriverMetrics:
    """The driver's Ray metrics: queue depth, batches in flight, usable actors, failures."""

    def __init__(self, model: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"model": model}
        keys = ("model",)
        self.queue = Gauge("virnucpro_queue_depth", "batches planned and not yet dealt to an actor", keys)
        self.in_flight = Gauge("virnucpro_batches_in_flight", "batches dealt to actors and not finished", keys)
        self.actors = Gauge("virnucpro_actors_usable", "embedding actors taking batches", keys)
        self.remaining = Gauge("virnucpro_batches_remaining", "batches of the run not yet written", keys)
        self.failures = Counter("virnucpro_driver_failures", "batch failures seen by the driver",
                                keys + ("reason",))
        self.last = 0.0

    def update(self, queue: int, in_flight: int, actors: int, remaining: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 1.0:
            return
        self.last = now
        self.queue.set(queue, self.tags)
        self.in_flight.set(in_flight, self.tags)
        self.actors.set(actors, self.tags)
        self.remaining.set(remaining, self.tags)

    def failure(self, reason: str) -> None:
        self.failures.inc(1, {**self.tags, "reason": reason})


class _Dispatcher:
    """Deals batches to free actors from a bounded queue, longest first, dealing the batches of dead
    actors again."""

    def __init__(self, pool: _ActorPool, index: FastaIndex, tokenizer, plan: Plan, workers: int,
                 in_flight_per_actor: int, actor_wait_seconds: float = ACTOR_WAIT_SECONDS):
        self.pool = pool
        self.index, self.tokenizer, self.plan = index, tokenizer, plan
        self.workers = workers
        self.per_actor = in_flight_per_actor + 1  # one queued behind the running ones hides dispatch latency
        self.actor_wait_seconds = actor_wait_seconds
        self.retried = 0
        self.retried_after_errors = 0
        self.metrics = _DriverMetrics(pool.source.name)
        self.loader = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="virnucpro-loader")
        self.loading: deque[tuple[int, Future]] = deque()  # batches being read and tokenised, in order
        self.cursor = 0  # todo[cursor:] not yet submitted to the loader

    def _window(self) -> int:
        """Batches read ahead of the actors: as many as they can take, plus one per loader thread."""
        return self.pool.num_actors * self.per_actor + self.workers

    def _load_ahead(self, todo: np.ndarray, window: int, held: int) -> None:
        while self.cursor < len(todo) and len(self.loading) + held < window:
            b = int(todo[self.cursor])
            self.cursor += 1
            self.loading.append((b, self.loader.submit(make_batch, self.index, self.plan[b], self.tokenizer, b)))

    def close(self) -> None:
        """Stop the loader threads: queued loads are dropped, running ones end on their own."""
        self.loader.shutdown(wait=False, cancel_futures=True)

    def prefetch(self, todo: np.ndarray) -> None:
        """Start reading and tokenising the first window of batches (call while the actors load)."""
        self._load_ahead(todo, self._window(), 0)

    def run(self, todo: np.ndarray):
        """Yield PartResults as batches finish; raise EmbedError on a failure that retrying won't fix."""
        loading = self.loading
        ready: deque[tuple[int, ray.ObjectRef]] = deque()  # loaded, in the object store, not dealt
        running: dict[ray.ObjectRef, tuple[int, ray.ObjectRef, _Slot, int]] = {}
        failures: dict[int, int] = {}  # batch -> times its actor died under it
        errors: dict[int, int] = {}  # batch -> times it raised an error worth retrying
        dealt: dict[int, int] = {}  # batch -> times dealt (the attempt number the actor sees)
        remaining = len(todo)
        idle_since: float | None = None
        try:
            while remaining:
                # backpressure: read ahead only as far as the actors can take
                self._load_ahead(todo, self._window(), len(ready))
                while loading and loading[0][1].done():
                    b, fut = loading.popleft()
                    ready.append((b, ray.put(self._loaded(b, fut))))
                for slot in self.pool.slots:
                    while ready and slot.state == "ready" and slot.busy < self.per_actor:
                        b, ref = ready.popleft()
                        attempt = dealt.get(b, 0)
                        dealt[b] = attempt + 1
                        running[slot.actor.embed.remote(ref, attempt)] = (b, ref, slot, slot.generation)
                        slot.busy += 1
                probes = self.pool.probes()
                self.metrics.update(len(todo) - self.cursor + len(loading) + len(ready), len(running),
                                    self.pool.usable, remaining)
                if not running and not probes:
                    if loading and not ready:
                        self._loaded(*loading[0])  # wait for the loader (or its error)
                        continue
                    if all(s.state == "dead" for s in self.pool.slots):
                        raise EmbedError(f"every actor died and none could be replaced; {remaining} batches "
                                         f"left: see the Ray logs (`ray logs`) for why, then rerun with --resume")
                if self.pool.usable or running:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self.actor_wait_seconds:
                    states = ", ".join(f"actor {s.number}: {s.state}" for s in self.pool.slots)
                    raise EmbedError(f"no embedding actor usable for {self.actor_wait_seconds:.0f} s ({states}); "
                                     f"{remaining} batches left: the cluster may lack the resources to restart "
                                     f"them (see `ray status`); rerun with --resume")
                if not running and not probes:
                    time.sleep(0.2)
                    continue
                refs = list(running) + probes
                finished, _ = ray.wait(refs, num_returns=1, timeout=0.5)
                if finished:
                    more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                    finished = list({*finished, *more})
                for ref in finished:
                    if ref not in running:
                        self.pool.probe_done(ref)
                        continue
                    b, batch_ref, slot, generation = running.pop(ref)
                    if generation == slot.generation:
                        slot.busy -= 1
                    try:
                        result: PartResult = ray.get(ref)
                    except _TRANSIENT as e:
                        failures[b] = failures.get(b, 0) + 1
                        self.metrics.failure("actor_died")
                        if failures[b] > MAX_BATCH_RETRIES:
                            raise EmbedError(f"batch {b} failed {failures[b]} times because its actor died "
                                             f"(last: {_cause(e)}); see the Ray logs (`ray logs`) for why") from None
                        log.warning("actor %d died during batch %d (%s); dealing the batch to another actor",
                                    slot.number, b, _cause(e))
                        self.retried += 1
                        ready.appendleft((b, batch_ref))
                        if generation == slot.generation:  # not a late failure of a replaced actor
                            self.pool.failed(slot)
                    except RayTaskError as e:
                        kind = failure_kind(getattr(e, "cause", None))
                        if kind == "retry" and errors.get(b, 0) < MAX_ERROR_RETRIES:
                            errors[b] = errors.get(b, 0) + 1
                            self.metrics.failure("error_retried")
                            log.warning("batch %d failed on actor %d (%s); dealing it again (retry %d of %d)",
                                        b, slot.number, _cause(e), errors[b], MAX_ERROR_RETRIES)
                            self.retried_after_errors += 1
                            ready.appendleft((b, batch_ref))
                            continue
                        self.metrics.failure("batch_error")
                        raise EmbedError(self._task_failure(b, batch_ref, e, kind, errors.get(b, 0) + 1)) from None
                    else:
                        remaining -= 1
                        yield result
            self.metrics.update(0, 0, self.pool.usable, 0, force=True)
        finally:
            self.close()
            if running:  # the run stops early: let the dealt batches end (their parts are whole and
                # found by --resume), so that no part appears after embed() has raised; then the actors go
                for ref in running:
                    ray.cancel(ref, force=False)  # batches still queued in an actor do not start
                ray.wait(list(running), num_returns=len(running), timeout=STOP_WAIT_SECONDS)

    @staticmethod
    def _loaded(b: int, fut: Future) -> TokenBatch:
        try:
            return fut.result()
        except Exception as e:  # noqa: BLE001 - e.g. the input changed since it was indexed
            raise EmbedError(f"batch {b}: reading and tokenising its sequences failed: {e}") from e

    @staticmethod
    def _task_failure(b: int, batch_ref, e: RayTaskError, kind: str, attempts: int) -> str:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BatchError):
            return str(cause)
        batch: TokenBatch = ray.get(batch_ref)
        if kind == "storage":
            return (f"{batch.describe()}: writing its part failed: {_cause(e)}. Finished parts are kept and the "
                    f"run is not complete: free space or fix permissions, then rerun with --resume")
        tried = f"{attempts} attempts" if attempts > 1 else "not retried"
        return f"{batch.describe()} failed: {_cause(e)} ({tried}); fix the cause, then rerun with --resume"


class _Progress:
    """A progress bar on a terminal (sequences, tokens/s, ETA, usable actors); quiet otherwise, except
    for a log line every 30 s with --verbose. The end of a run prints a one-line summary instead."""

    WIDTH = 24

    def __init__(self, total_tokens: int, total_seqs: int, done_tokens: int, done_seqs: int,
                 enabled: bool | None, verbose: bool = False):
        self.total_tokens, self.total_seqs = total_tokens, total_seqs
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.verbose = verbose
        self.tokens, self.seqs = done_tokens, done_seqs
        self.base_tokens = done_tokens  # work done before a resume does not count in the rate
        self.start = self.last_draw = self.last_save = self.last_log = time.perf_counter()
        self.drawn = False

    def line(self, actors: int | None = None, total_actors: int | None = None) -> str:
        now = time.perf_counter()
        rate = (self.tokens - self.base_tokens) / max(now - self.start, 1e-9)
        left = self.total_tokens - self.tokens
        eta = _hms(left / rate) if rate > 0 else "--:--:--"
        frac = self.tokens / max(self.total_tokens, 1)
        fill = int(frac * self.WIDTH)
        bar = "=" * fill + (">" if fill < self.WIDTH else "") + " " * max(0, self.WIDTH - fill - 1)
        who = f"  actors {actors}/{total_actors}" if actors is not None else ""
        return (f"[{bar}] {100 * frac:3.0f}%  {self.seqs:,}/{self.total_seqs:,} sequences  "
                f"{rate / 1e3:,.1f} K tokens/s  ETA {eta}{who}")

    def advance(self, tokens: int, seqs: int, actors: int | None = None, total_actors: int | None = None) -> None:
        self.tokens += tokens
        self.seqs += seqs
        now = time.perf_counter()
        if self.enabled and (now - self.last_draw > 0.25 or self.seqs >= self.total_seqs):
            self.last_draw = now
            sys.stderr.write("\r\033[K" + self.line(actors, total_actors))
            sys.stderr.flush()
            self.drawn = True
        elif not self.enabled and self.verbose and now - self.last_log > 30:
            self.last_log = now
            log.info("progress: %s", self.line(actors, total_actors))

    def due_for_save(self) -> bool:
        now = time.perf_counter()
        if now - self.last_save > 2.0:
            self.last_save = now
            return True
        return False

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _hms(seconds: float) -> str:
    seconds = int(min(seconds, 99 * 3600 + 3599))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
