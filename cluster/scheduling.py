"""Which batch goes out next, and what a failed batch means: the run's decisions, with no Ray in them.

The driver's loop (`cluster/driver.py`) reports events to a `Scheduler` (a batch was loaded, dealt,
finished or failed) and does what it answers; the scheduler owns the queue and the retry counts. Kept
free of Ray so that every path (an actor that keeps dying under one batch, an error that may not
recur, a full disk) is tested without a cluster.

Failure kinds (`failure_kind` tells them apart from the exception a batch raised in its actor):
  actor_died  the actor, not the batch, failed (process killed, node lost): deal the batch again, to
              any actor, up to `max_actor_deaths` times
  retry       an error that may not recur (an I/O hiccup on network storage, a transient library
              error): deal it again up to `max_error_retries` times, then stop
  permanent   retrying cannot help (bad input, CUDA out of memory): stop at once
  storage     the part cannot be written (disk full, quota, permissions, read-only): stop at once;
              finished parts stay and --resume finishes the run once the cause is fixed
"""

from __future__ import annotations

import errno
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from virnucpro.batching import BatchError
from virnucpro.io.alphabet import SequenceError
from virnucpro.errors import EmbedError  # noqa: F401 - also imported from here

ACTOR_DIED, RETRY, PERMANENT, STORAGE = "actor_died", "retry", "permanent", "storage"
MAX_ACTOR_DEATHS = 3  # a batch whose actor died this many times in a row fails the run
MAX_ERROR_RETRIES = 2  # a batch that raised an error worth retrying is dealt again this many times
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}




def failure_kind(cause: BaseException | None) -> str:
    """PERMANENT, STORAGE or RETRY for the exception a batch raised inside its actor (see module doc)."""
    if isinstance(cause, (BatchError, SequenceError)):
        return PERMANENT
    if isinstance(cause, OSError) and cause.errno in _STORAGE_ERRNOS:
        return STORAGE
    return RETRY


@dataclass(frozen=True)
class Decision:
    """The scheduler's answer to a failure: deal the batch again, or stop the run."""

    again: bool
    kind: str
    attempts: int  # times the batch failed this way, this failure included


class Scheduler:
    """A work queue of batch ids, in plan order (longest first), with retry counts.

    >>> s = Scheduler([7, 8])
    >>> s.deal()                     # (batch, attempt): the attempt number the actor sees
    (7, 0)
    >>> s.fail(7, ACTOR_DIED).again  # back to the front of the queue
    True
    >>> s.deal(), s.deal()
    ((7, 1), (8, 0))
    >>> s.complete(7); s.complete(8); s.done
    True
    """

    def __init__(self, batches: Iterable[int], max_actor_deaths: int = MAX_ACTOR_DEATHS,
                 max_error_retries: int = MAX_ERROR_RETRIES):
        # the batches to deal, as an array walked by a cursor: a run of 10^6 batches holds no Python
        # object per batch until it is dealt
        self.planned = np.fromiter(batches, np.int64) if not isinstance(batches, np.ndarray) else batches
        self.cursor = 0
        self.remaining = len(self.planned)
        self.max_actor_deaths, self.max_error_retries = max_actor_deaths, max_error_retries
        self.again: deque[int] = deque()  # batches to deal again, before the rest
        self.in_flight: set[int] = set()
        self.dealt: Counter[int] = Counter()  # batch -> times dealt (counted once a batch is dealt twice)
        self.failures: dict[str, Counter[int]] = {ACTOR_DIED: Counter(), RETRY: Counter()}
        self.retried = 0  # batches dealt again because their actor died
        self.retried_after_errors = 0  # batches dealt again after an error that may not recur

    @property
    def done(self) -> bool:
        return self.remaining == 0

    @property
    def waiting(self) -> int:
        """Batches not yet dealt (or to deal again)."""
        return len(self.again) + len(self.planned) - self.cursor

    def deal(self) -> tuple[int, int] | None:
        """The next batch for a free actor and its attempt number, or None when none is waiting."""
        if self.again:
            batch = self.again.popleft()
            attempt = self.dealt[batch] = self.dealt[batch] + 1
        elif self.cursor < len(self.planned):
            batch, attempt = int(self.planned[self.cursor]), 0
            self.cursor += 1
        else:
            return None
        self.in_flight.add(batch)
        return batch, attempt

    def complete(self, batch: int) -> None:
        """The batch's part is written."""
        self.in_flight.remove(batch)
        self.remaining -= 1

    def fail(self, batch: int, kind: str) -> Decision:
        """The batch failed with `kind`: requeue it at the front, or say the run must stop."""
        self.in_flight.remove(batch)
        counts = self.failures.get(kind)
        if counts is None:  # PERMANENT or STORAGE: retrying cannot help
            return Decision(False, kind, 1)
        counts[batch] += 1
        limit = self.max_actor_deaths if kind == ACTOR_DIED else self.max_error_retries
        if counts[batch] > limit:
            return Decision(False, kind, counts[batch])
        if kind == ACTOR_DIED:
            self.retried += 1
        else:
            self.retried_after_errors += 1
        self.again.appendleft(batch)
        return Decision(True, kind, counts[batch])
