"""The embedding actors of one run: acquire a free one, release it, and keep the pool whole.

Like Ray's `ray.util.ActorPool`, the surface is small; unlike it, the pool survives its actors. Ray
restarts a dead actor (`max_restarts`) where resources allow; the pool notices through a probe (the
actor's `info`) that never blocks the caller, and replaces an actor Ray has given up on.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from .scheduling import EmbedError

log = logging.getLogger("virnucpro")

MAX_REPLACEMENTS_PER_ACTOR = 3  # new actors the pool may start, per actor of the run
STARTING, READY, PROBING, DEAD = "starting", "ready", "probing", "dead"


def cause(e: Exception) -> str:
    """One line saying why a Ray call failed: the remote exception if there is one. An actor whose
    constructor raised dies with that exception only in its traceback's text: its last line says it
    (`CheckpointError: ...: no such ESM-2 checkpoint file`), not the first."""
    inner = getattr(e, "cause", None)
    if inner is not None and not isinstance(inner, RayActorError):
        return f"{type(inner).__name__}: {inner}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raised = [line for line in lines if _RAISED.match(line)]
    line = raised[-1] if raised else lines[0] if lines else type(e).__name__
    return line[:300]


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit): ")


class _Slot:
    """One place in the pool: the current actor for it and what the driver knows about it."""

    def __init__(self, number: int, actor):
        self.number, self.actor = number, actor
        self.generation = 0  # bumped when the actor is replaced: results of the old one don't count here
        self.state = STARTING  # starting -> ready; ready -> probing (after a failure) -> ready | replaced
        self.busy = 0  # batches dealt to it and not finished
        self.probe: ray.ObjectRef | None = None
        self.probe_after = 0.0  # next probe time while Ray restarts the actor
        self.info: dict = {}
        self.seen_generation = 0  # the generation `info` came from


@dataclass(frozen=True)
class Lease:
    """An actor handed out by `acquire`, as it was then (a replaced actor's late results are told apart)."""

    slot: _Slot
    generation: int

    @property
    def actor(self):
        return self.slot.actor

    @property
    def number(self) -> int:
        return self.slot.number


class ActorPool:
    """A fixed number of actor slots, each taking up to `per_actor` batches at once.

    >>> pool = ActorPool(lambda i: Embedder.remote(config), size=2, per_actor=3, name="esm2")
    >>> pool.launch()                     # actors start loading their model; go on meanwhile
    >>> infos = pool.start()              # returns once an actor is ready
    >>> lease = pool.acquire()            # a ready actor with room, or None
    >>> ref = lease.actor.embed.remote(batch_ref)
    >>> pool.release(lease)               # when ref is done (or pool.actor_died(lease) if it died)
    """

    def __init__(self, new_actor: Callable[[int], object], size: int, per_actor: int, name: str = "model",
                 resources: dict | None = None, kill: Callable[[object], None] | None = None):
        self.new_actor, self.size, self.per_actor, self.name = new_actor, size, per_actor, name
        self.kill = kill or (lambda actor: ray.kill(actor, no_restart=True))
        self.resources = resources or {}  # what each actor asks Ray for (shown while one waits)
        self.slots: list[_Slot] = []
        self.replaced = 0
        self.ready_call = lambda actor: actor.info.remote()  # what says an actor is ready (returns its info)
        self.stop = None  # a threading.Event: once set, `start` stops waiting (KeyboardInterrupt)

    def launch(self) -> None:
        """Create the actors: Ray places them and they load their model while the caller goes on."""
        if not self.slots:
            self.slots = [_Slot(i, self.new_actor(i)) for i in range(self.size)]

    def start(self, wait_seconds: float = 900.0, ready_call: Callable | None = None) -> list[dict]:
        """Launch the actors if not yet done and return once one is ready, with the `info()` of those ready.

        `ready_call(actor)`: the call whose result says an actor is ready (default `actor.info.remote()`);
        also used to probe actors after a failure. The others join as Ray places them (an autoscaling
        cluster adds nodes); until then they are logged as pending, with what they wait for. A model
        that fails to load fails the start; no actor placed within `wait_seconds` fails it too."""
        self.ready_call = ready_call or self.ready_call
        self.launch()
        for s in self.slots:
            s.probe = self.ready_call(s.actor)
        start = time.monotonic()
        report = start + 10.0
        while not self.usable:
            if self.stop is not None and self.stop.is_set():
                raise KeyboardInterrupt("stopped")
            ready, _ = ray.wait([s.probe for s in self.slots if s.probe is not None], num_returns=1, timeout=1.0)
            for ref in ready:
                self.probe_done(ref)
            now = time.monotonic()
            if not self.usable and now > start + wait_seconds:
                self.shutdown()
                raise EmbedError(f"no actor could be placed in {wait_seconds:.0f} s: {self.pending_text()}; "
                                 f"see `ray status`, or ask for fewer actors (--num-actors)")
            if not self.usable and now > report:
                report = now + 30.0
                log.warning("waiting for an actor to be placed: %s", self.pending_text())
        infos = self.infos()
        first = infos[0]
        log.info("%d of %d actor(s) ready on %d node(s), %s, %s%s, %s", len(infos), self.size,
                 len({i["node_id"] for i in infos}), first["gpu"], first["dtype"],
                 ", compiled" if first["compiled"] else ", compiling (eager meanwhile)" if first.get("compiling")
                 else ", uncompiled with fused Triton elementwise kernels" if first.get("fused") else "",
                 first["attention"])
        if len(infos) < self.size and self.resources:  # (a service's replicas are all running: no warning)
            # nodes that can hold them all: the others are loading, or wait for resources another job holds
            # (`make demo` on 2 CPUs: loading); news, not a warning. Otherwise some wait for a node that
            # may never come (or that an autoscaler adds).
            fits = self.cluster_holds_all()
            (log.info if fits else log.warning)("starting with %d of %d actors; the others join when %s: %s",
                                                len(infos), self.size, "ready" if fits else "Ray places them",
                                                self.pending_text())
        return infos

    def cluster_holds_all(self) -> bool:
        """Whether the cluster's nodes, were nothing else running, could hold all the pool's actors at once
        (each actor on one node: a node's CPUs do not make up for another's GPUs).

        >>> pool.resources, pool.size, [n["Resources"]["CPU"] for n in ray.nodes()]
        ({'CPU': 1}, 2, [2.0])
        >>> pool.cluster_holds_all()
        True
        """
        room = 0
        for node in ray.nodes():
            if node.get("Alive"):
                total = node.get("Resources", {})
                room += min(int(total.get(k, 0.0) / v + 1e-9) for k, v in self.resources.items())
        return room >= self.size

    def infos(self) -> list[dict]:
        """`info()` of every actor that has been ready, in slot order."""
        return [s.info for s in self.slots if s.info]

    def pending_text(self) -> str:
        """Which actors are not ready (waiting to be placed, or loading the model) and what each needs,
        beside what the cluster has free."""
        waiting = [s.number for s in self.slots if s.state == STARTING]
        free = {k: round(v, 2) for k, v in sorted(ray.available_resources().items()) if k in ("CPU", "GPU")}
        return (f"actor(s) {', '.join(map(str, waiting))} of {self.size} not ready (being placed or loading the "
                f"model), each needs "
                f"{self.resources}; " + (f"the cluster has {free} free" if free else
                                         "waiting for the cluster's CPUs or GPUs to free up"))

    def acquire(self) -> Lease | None:
        """A ready actor with room for one more batch (the least busy), or None."""
        free = [s for s in self.slots if s.state == READY and s.busy < self.per_actor]
        if not free:
            return None
        slot = min(free, key=lambda s: s.busy)
        slot.busy += 1
        return Lease(slot, slot.generation)

    def release(self, lease: Lease) -> None:
        """The batch dealt under `lease` has ended (finished or failed)."""
        if lease.generation == lease.slot.generation:
            lease.slot.busy -= 1

    def actor_died(self, lease: Lease) -> None:
        """A batch under `lease` failed because its actor died: stop dealing to it and probe it."""
        slot = lease.slot
        if lease.generation == slot.generation and slot.state == READY:
            slot.state, slot.probe, slot.probe_after = PROBING, None, 0.0

    @property
    def usable(self) -> int:
        return sum(s.state == READY for s in self.slots)

    @property
    def all_dead(self) -> bool:
        return all(s.state == DEAD for s in self.slots)

    def states(self) -> str:
        return ", ".join(f"actor {s.number}: {s.state}" for s in self.slots)

    def probes(self) -> list:
        """Send the probes that are due; return the outstanding ones (for ray.wait)."""
        now = time.monotonic()
        for s in self.slots:
            if s.state == PROBING and s.probe is None and now >= s.probe_after:
                s.probe = self.ready_call(s.actor)  # queued by Ray until the actor is back
        return [s.probe for s in self.slots if s.probe is not None]

    def probe_done(self, ref) -> None:
        """A probe returned: the actor is back, still restarting, or gone (then it is replaced)."""
        slot = next((s for s in self.slots if s.probe is not None and s.probe == ref), None)
        if slot is None:
            return
        slot.probe = None
        try:
            info = ray.get(ref)
        except ActorUnavailableError:  # still restarting: ask again shortly
            slot.probe_after = time.monotonic() + 1.0
        except (ActorDiedError, RayActorError, RayTaskError) as e:
            if slot.state != STARTING:
                self._replace(slot, e)
            elif not self.usable:  # the model does not load: every actor would fail the same way
                self.shutdown()
                raise EmbedError(f"an actor could not load model '{self.name}': {cause(e)}") from None
            else:
                slot.state = DEAD
                log.warning("actor %d could not load model '%s' (%s); going on with %d", slot.number,
                            self.name, cause(e), self.usable)
        else:
            if slot.state == STARTING:
                slot.state, slot.info = READY, info
                if self.usable > 1:
                    log.info("actor %d joined (%s); %d of %d ready", slot.number, info["actor"], self.usable,
                             self.size)
                return
            moved = info.get("node_id") != slot.info.get("node_id")
            what = "its replacement is up" if slot.generation and slot.seen_generation != slot.generation else "is back"
            slot.state, slot.info, slot.seen_generation = READY, info, slot.generation
            log.warning("actor %d: %s (%s%s)", slot.number, what, info["actor"], ", on another node" if moved else "")

    def _replace(self, slot: _Slot, e: Exception) -> None:
        if self.replaced >= self.size * MAX_REPLACEMENTS_PER_ACTOR:
            slot.state = DEAD
            log.warning("actor %d is gone for good (%s); %d usable", slot.number, cause(e), self.usable)
            return
        self.replaced += 1
        log.warning("actor %d is gone for good (%s); starting a replacement", slot.number, cause(e))
        try:
            self.kill(slot.actor)
        except Exception:  # noqa: BLE001 - already dead
            pass
        slot.actor, slot.state, slot.busy = self.new_actor(slot.number), PROBING, 0
        slot.generation += 1
        slot.probe_after = 0.0

    def shutdown(self) -> None:
        for s in self.slots:
            try:
                self.kill(s.actor)
            except Exception:  # noqa: BLE001 - already dead
                pass
