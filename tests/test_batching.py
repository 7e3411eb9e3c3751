"""Token-budget planning: every sequence once, budgets kept, longest first, deterministic."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from virnucpro.batching import plan_batches, plan_fingerprint


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=300), st.integers(1, 4096))
def test_plan_covers_everything_once_within_budget(sizes, budget):
    tokens = np.array(sizes)
    plan = plan_batches(tokens, budget)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(len(sizes)))
    for batch in plan:
        assert tokens[batch].sum() <= budget or len(batch) == 1  # oversize sequences travel alone
    firsts = [tokens[b[0]] for b in plan]
    assert firsts == sorted(firsts, reverse=True)  # longest batches first


def test_plan_is_deterministic_and_fingerprinted():
    tokens = np.random.default_rng(0).integers(1, 500, 1000)
    a, b = plan_batches(tokens, 2048), plan_batches(tokens, 2048)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert plan_fingerprint("m", 2048, tokens) == plan_fingerprint("m", 2048, tokens.copy())
    assert plan_fingerprint("m", 2048, tokens) != plan_fingerprint("m", 4096, tokens)
