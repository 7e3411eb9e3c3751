"""What the user and the dashboard see of a run: a progress line, the driver's Ray metrics, and the
start-up timeline (when each phase before the first result ended, from the process's start)."""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("virnucpro")


def process_start_time() -> float:
    """When this process started (wall clock), from /proc on Linux: what a user's wait begins with.
    Elsewhere, when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


class Timeline:
    """Seconds from the start (of the `virnucpro` process, or of the API call) to the end of each
    start-up phase (`mark("ray_up")` -> `marks == {"ray_up": 1.92}`): what a user waits for before the
    first result, phase by phase."""

    def __init__(self, origin: float | None = None):
        self.origin = time.time() if origin is None else origin  # wall clock; the command line's: process start
        self.marks: dict[str, float] = {}

    def mark(self, phase: str, at: float | None = None) -> None:
        """`phase` ended now, or at wall-clock time `at` (an actor's own clock)."""
        self.marks[phase] = round((time.time() if at is None else at) - self.origin, 3)

    def text(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in sorted(self.marks.items(), key=lambda kv: kv[1]))


class Progress:
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


class DriverMetrics:
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
