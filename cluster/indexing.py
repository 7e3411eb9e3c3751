"""Indexing an input on the cluster's nodes: its byte ranges (and a table input's conversion) as Ray tasks.

The driver plans from the index, but what reads the input runs where the actors run: one task per
32 MiB range of a plain FASTA (`virnucpro.io.index.index_range`), one for a gzip stream or a table,
spread over the nodes. Results come back in order, as `FastaIndex.build`'s `map_ranges` wants them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import ray
from ray.exceptions import RayTaskError

from virnucpro.errors import SequenceError
from virnucpro.io.index import RangeIndex, index_range
from virnucpro.io.tables import convert_table


class RangeTasks:
    """`index_range(*job)` of each job as a Ray task on the cluster's nodes, results in job order.

    At most half the cluster's CPUs' worth run at once. The tasks reserve no CPU: actors hold theirs for
    the whole run, so a task that waited for one could wait for ever (predict's two jobs on a small
    machine); the bound on tasks in flight keeps them from crowding the actors instead."""

    def __init__(self):
        self.nodes: set[str] = set()  # where the ranges were indexed
        self.ranges = 0

    def convert(self, *args) -> tuple[str, str | None]:
        """A table input's `convert_table(*args)` as one Ray task on a node."""
        task = ray.remote(_convert_on_node).options(num_cpus=0, scheduling_strategy="SPREAD", max_retries=2)
        try:
            node, paths = ray.get(task.remote(*args))
        except RayTaskError as e:
            if isinstance(e.cause, SequenceError):
                raise e.cause from None
            raise
        self.nodes.add(node)
        return paths

    def __call__(self, jobs: list[tuple]) -> Iterator[RangeIndex]:
        task = ray.remote(_index_on_node).options(num_cpus=0, scheduling_strategy="SPREAD", max_retries=2)
        limit = max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)
        pending: deque = deque()
        jobs_left = iter(jobs)
        for job in jobs_left:
            pending.append(task.remote(*job))
            if len(pending) >= limit:
                break
        while pending:
            try:
                node, result = ray.get(pending.popleft())
            except RayTaskError as e:  # the input's own error, as the range raised it (renumbered by the caller)
                if isinstance(e.cause, SequenceError):
                    raise e.cause from None
                raise
            for job in jobs_left:
                pending.append(task.remote(*job))
                break
            self.nodes.add(node)
            self.ranges += 1
            yield result


def _convert_on_node(*args) -> tuple[str, tuple[str, str | None]]:
    """(this node's id, `convert_table(*args)`): a Ray task."""
    return ray.get_runtime_context().get_node_id(), convert_table(*args)


def _index_on_node(*job) -> tuple[str, RangeIndex]:
    """(this node's id, `index_range(*job)`): a Ray task."""
    return ray.get_runtime_context().get_node_id(), index_range(*job)


__all__ = ["RangeTasks"]
