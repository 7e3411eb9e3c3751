"""Dealing a run's batches: the loop between the scheduler and Ray, and the parts as they come back.

`Dispatcher` deals each batch's description (`BatchPlan.spec`) to whichever actor the pool hands out,
waits on what is in flight, and tells the scheduler what finished or failed; `collect` marks finished
batches in the manifest (saved every few seconds) and draws the progress line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from virnucpro.batching import BatchPlan, PartResult
from virnucpro.errors import BatchError, EmbedError
from virnucpro.io.alphabet import RecordError
from virnucpro.io.output import Manifest, OutputLocation
from virnucpro.options import EmbedOptions

from .pool import ActorPool, Lease, cause
from .progress import DriverMetrics, Progress, Timeline
from .scheduling import ACTOR_DIED, STORAGE, Scheduler, failure_kind

log = logging.getLogger("virnucpro")

STOP_WAIT_SECONDS = 30  # a failed run waits this long for the batches its actors are computing
_ACTOR_FAILED = (RayActorError, ObjectLostError, WorkerCrashedError)  # the actor, not the batch, failed


def collect(run: Dispatcher, manifest: Manifest, out: OutputLocation, plan: BatchPlan, opts: EmbedOptions,
             timeline: Timeline) -> Totals:
    """Record each part in the manifest as it comes (saved every few seconds), with progress."""
    done = manifest.done
    progress = Progress(int(plan.tokens.sum()), plan.num_sequences, int(plan.tokens[done].sum()), manifest.rows_done,
                        opts.progress, opts.verbose)
    totals = Totals()
    for result in run.results():
        manifest.mark_done(result.batch_id, result.rows)
        totals.add(result)
        if "first_part" not in timeline.marks:
            timeline.mark("first_part")
            log.info("first part written; start-up: %s", timeline.text())
        progress.advance(int(plan.tokens[result.batch_id]), result.rows, run.pool.usable, run.pool.size)
        if progress.due_for_save():
            manifest.save(out)
    totals.stop()  # the rate counts computing, not shutting the actors and Ray down
    if "first_part" in timeline.marks:  # (a resumed run may have had nothing left to write)
        timeline.mark("last_part")
    progress.close()
    return totals


class Totals:
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


class Dispatcher:
    """The loop between the scheduler and Ray: deals what the scheduler says to the actors the pool hands
    out, as descriptions (`BatchPlan.spec`), and reports what comes back."""

    def __init__(self, pool: ActorPool, plan: BatchPlan, todo: np.ndarray, actor_wait_seconds: float,
                 stop: threading.Event | None = None, kept=None):
        self.pool, self.plan, self.stop, self.kept = pool, plan, stop, kept
        self.scheduler = Scheduler(todo)
        self.actor_wait_seconds = actor_wait_seconds
        self.metrics = DriverMetrics(pool.name)
        self.running: dict[ray.ObjectRef, tuple[int, Lease]] = {}
        self.idle_since: float | None = None

    def close(self) -> None:
        """Stop the actors."""
        self.pool.shutdown()

    def results(self) -> Iterator[PartResult]:
        """Yield PartResults as batches finish; raise EmbedError when the scheduler says to stop, and
        KeyboardInterrupt when `stop` is set (another thread's Ctrl-C)."""
        try:
            while not self.scheduler.done:
                if self.stop is not None and self.stop.is_set():
                    raise KeyboardInterrupt("stopped")
                self._deal()
                probes = self.pool.probes()
                self.metrics.update(self.scheduler.waiting, len(self.running), self.pool.usable,
                                    self.scheduler.remaining)
                self._check_progress_possible()
                for ref in self._wait(list(self.running) + probes):
                    if ref in self.running:
                        result = self._finished(ref)
                        if result is not None:
                            yield result
                    else:
                        self.pool.probe_done(ref)
            self.metrics.update(0, 0, self.pool.usable, 0, force=True)
        except KeyboardInterrupt:  # Ctrl-C: stop now (a part cut short is found and redone by --resume)
            self._stop(0)
            raise
        except BaseException:
            self._stop(STOP_WAIT_SECONDS)
            raise

    def _deal(self) -> None:
        while self.scheduler.waiting:
            lease = self.pool.acquire()
            if lease is None:
                return
            b, attempt = self.scheduler.deal()
            spec = self.plan.spec(b)
            if self.kept is not None:  # a table input's kept values of the batch's records travel with it
                spec = replace(spec, extra=self.kept.take(spec.ordinals))
            self.running[lease.actor.embed.remote(spec, attempt)] = (b, lease)

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
            time.sleep(0.2)  # no actor ready yet
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
        if isinstance(inner, (BatchError, RecordError)):
            return str(inner)
        spec = self.plan.spec(b)
        what = spec.describe(spec.first_id())
        if kind == STORAGE:
            return (f"{what}: writing its part failed: {cause(e)}. Finished parts are kept and the "
                    f"run is not complete: free space or fix permissions, then rerun with --resume")
        tried = f"{attempts} attempts" if attempts > 1 else "not retried"
        return f"{what} failed: {cause(e)} ({tried}); fix the cause, then rerun with --resume"

    def _stop(self, wait_seconds: float) -> None:
        """A run that stops early lets its dealt batches end for up to `wait_seconds` (their parts are
        whole and found by --resume), so that no part appears after embed() has raised."""
        if self.running:
            for ref in self.running:
                ray.cancel(ref, force=False)  # batches still queued in an actor do not start
            if wait_seconds:
                ray.wait(list(self.running), num_returns=len(self.running), timeout=wait_seconds)


__all__ = ["Dispatcher", "Totals", "collect", "STOP_WAIT_SECONDS"]
