"""Faults the tests inject: `Embedder` subclasses handed to `embed(..., actor_class=...)`.

Production code reads no test switches; a test that needs a slow batch, a batch that fails, or a part
write that fails passes one of these classes instead of the real actor. Each factory makes a new class
(unique name, so Ray ships it by value to its workers) with the fault's parameters as class attributes.

Run as a module, this is `virnucpro` with slow batches, for tests that need a slow run in another
process (a submitted Ray job, a driver that gets killed):

    python -m tests.faults DELAY_SECONDS embed IN -o OUT --model M ...
"""

from __future__ import annotations

import errno
import itertools
import os
import sys
import time

from actors.embedder import Embedder
from virnucpro.io.output import part_name

_names = itertools.count()


def _subclass(base: type, **attrs) -> type:
    return type(f"{base.__name__}_{next(_names)}", (base,), attrs)


class _Slow(Embedder):
    delay = 0.0

    def _compute(self, batch, columns, dtype, attempt=0):
        time.sleep(self.delay)
        return super()._compute(batch, columns, dtype, attempt)


class _FailingBatch(Embedder):
    batch_id = -1
    first_attempt_only = False  # True: a transient error (the driver deals the batch again)

    def _compute(self, batch, columns, dtype, attempt=0):
        if batch.batch_id == self.batch_id and not (self.first_attempt_only and attempt):
            kind = "transient failure" if self.first_attempt_only else "failure"
            raise (RuntimeError if self.first_attempt_only else ValueError)(
                f"injected {kind} (batch {batch.batch_id})")
        return super()._compute(batch, columns, dtype, attempt)


class _FailingWrite(Embedder):
    batch_id = -1
    code = errno.ENOSPC

    def _write(self, batch, values, columns, out):
        if batch.batch_id != self.batch_id:
            return super()._write(batch, values, columns, out)

        name = part_name(batch.batch_id)

        def partial(f) -> None:  # part of the temporary file is written, then the disk fills up
            f.write(b"PAR1" + bytes(4096))
            raise OSError(self.code, os.strerror(self.code), out.join(name))

        out.write_atomic(name, partial)


def slow(delay: float) -> type:
    """Every batch takes `delay` seconds longer (so that a kill lands mid-run)."""
    return _subclass(_Slow, delay=delay)


def failing_batch(batch_id: int, first_attempt_only: bool = False) -> type:
    """Computing `batch_id` raises: every time (ValueError), or only on its first attempt (RuntimeError)."""
    return _subclass(_FailingBatch, batch_id=batch_id, first_attempt_only=first_attempt_only)


def failing_write(batch_id: int, code: int = errno.ENOSPC) -> type:
    """Writing `batch_id`'s part starts, then fails with OSError(code) (a full disk, a permission taken away)."""
    return _subclass(_FailingWrite, batch_id=batch_id, code=code)


if __name__ == "__main__":
    from cluster.cli import main

    sys.exit(main(sys.argv[2:], actor_class=slow(float(sys.argv[1]))))
