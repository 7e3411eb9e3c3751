"""Driver memory does not grow with the input beyond a few bytes per record (bench/bench_driver_memory.py
runs the same measurement up to 10^6 sequences, one fresh process per size)."""

from __future__ import annotations

import pytest

from bench.bench_driver_memory import run_in_one_process

pytestmark = pytest.mark.slow


def test_driver_memory_is_flat_from_1e4_to_2e5_sequences(tmp_path, esm_tiny):
    # one driver process: a warm-up run (Ray's client buffers, allocator arenas), then 10^4 and 2x10^5
    _, small, large = run_in_one_process([2_000, 10_000, 200_000], tmp_path, esm_tiny, toks=16384, lengths=(6, 12))
    assert (small["sequences"], large["sequences"]) == (10_000, 200_000)
    # Anonymous memory (heap, numpy arrays) is what cannot be paged out; the index and the plan live in
    # memory-mapped files. What each run adds over its own start: per-record Python objects (a list of
    # ints, of ids, of sequences) would cost 50-200 bytes a record; allow 40 for allocator noise.
    added = [r["peak"]["RssAnon"] - r["baseline"]["RssAnon"] for r in (small, large)]
    per_record = (added[1] - added[0]) / 190_000
    assert per_record < 40, (f"a 2x10^5-sequence run added {added[1] / 2**20:.1f} MiB of driver anonymous memory, "
                             f"a 10^4 one {added[0] / 2**20:.1f} MiB ({per_record:.0f} bytes/record)")
