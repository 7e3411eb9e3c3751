"""The scheduler's decisions, without Ray: dealing order, retries, and when a run must stop."""

from __future__ import annotations

import doctest
import errno

import pytest

import cluster.scheduling as scheduling
from virnucpro.batching import BatchError
from cluster.scheduling import ACTOR_DIED, PERMANENT, RETRY, STORAGE, Scheduler, failure_kind
from virnucpro.io.alphabet import SequenceError


def test_docstring_example_runs():
    assert doctest.testmod(scheduling).failed == 0


def test_deals_in_plan_order_and_finishes_when_all_complete():
    s = Scheduler([5, 3, 9])
    assert [s.deal(), s.deal(), s.deal(), s.deal()] == [(5, 0), (3, 0), (9, 0), None]
    assert s.in_flight == {5, 3, 9} and not s.done
    for b in (3, 9, 5):
        s.complete(b)
    assert s.done and s.remaining == 0 and not s.in_flight


def test_a_batch_whose_actor_died_goes_first_with_its_attempt_number():
    s = Scheduler([1, 2, 3])
    s.deal(), s.deal()
    d = s.fail(2, ACTOR_DIED)
    assert d.again and d.kind == ACTOR_DIED and d.attempts == 1
    assert s.deal() == (2, 1)  # before batch 3, which comes earlier in the plan
    assert s.deal() == (3, 0)
    assert s.retried == 1 and s.retried_after_errors == 0


def test_actor_deaths_under_one_batch_are_limited():
    s = Scheduler([7], max_actor_deaths=3)
    for attempt in range(3):
        assert s.deal() == (7, attempt)
        assert s.fail(7, ACTOR_DIED).again
    s.deal()
    d = s.fail(7, ACTOR_DIED)
    assert not d.again and d.attempts == 4
    assert s.retried == 3 and not s.done


def test_errors_that_may_not_recur_are_retried_then_stop():
    s = Scheduler([4], max_error_retries=2)
    s.deal()
    assert s.fail(4, RETRY).again
    s.deal()
    assert s.fail(4, RETRY).again
    s.deal()
    d = s.fail(4, RETRY)
    assert not d.again and d.attempts == 3 and s.retried_after_errors == 2


def test_deaths_and_errors_are_counted_apart():
    s = Scheduler([4], max_actor_deaths=1, max_error_retries=1)
    s.deal()
    assert s.fail(4, RETRY).again
    s.deal()
    assert s.fail(4, ACTOR_DIED).again  # the error retry does not use up the death allowance
    s.deal()
    assert not s.fail(4, RETRY).again


@pytest.mark.parametrize("kind", [PERMANENT, STORAGE])
def test_permanent_and_storage_failures_stop_at_once(kind):
    s = Scheduler([0, 1])
    s.deal()
    d = s.fail(0, kind)
    assert not d.again and d.attempts == 1 and s.waiting == 1  # batch 0 is not requeued


def test_which_errors_are_retried():
    """BatchError (out of memory) and bad input are permanent; a full disk, a quota, a permission error,
    a read-only filesystem stop the run (resumable); anything else is dealt again, then fails."""
    assert failure_kind(BatchError("CUDA out of memory")) == PERMANENT
    assert failure_kind(SequenceError("in.fa: record 'x': character '1'")) == PERMANENT
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
        assert failure_kind(OSError(code, "x")) == STORAGE
    for e in (OSError(errno.EIO, "x"), ConnectionResetError(), TimeoutError(), RuntimeError("x"), ValueError("x"), None):
        assert failure_kind(e) == RETRY


def test_completing_a_batch_that_is_not_in_flight_is_a_bug():
    s = Scheduler([1])
    with pytest.raises(KeyError):
        s.complete(1)  # never dealt
