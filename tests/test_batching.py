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


def _greedy_one_by_one(num_tokens: np.ndarray, budget: int) -> list[np.ndarray]:
    """The plan's definition, walked record by record (the reference for the grouped cut)."""
    order = np.argsort(-num_tokens, kind="stable")
    batches, start, total = [], 0, 0
    for i, n in enumerate(num_tokens[order].tolist()):
        if total + n > budget and i > start:
            batches.append(order[start:i])
            start, total = i, 0
        total += n
    batches.append(order[start:])
    return batches


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=300), st.integers(1, 4096), st.integers(1, 64))
def test_grouped_plan_equals_record_by_record_greedy(sizes, budget, chunk):
    from virnucpro.batching import Plan

    tokens = np.array(sizes)
    plan = Plan.build(lambda a, b: tokens[a:b], budget, num_records=len(tokens), chunk=chunk)
    want = _greedy_one_by_one(tokens, budget)
    assert len(plan) == len(want)
    assert all(np.array_equal(x, y) for x, y in zip(plan, want))
    assert plan.tokens.tolist() == [int(tokens[b].sum()) for b in want]
    assert [plan.rows(b) for b in range(len(plan))] == [len(b) for b in want]


def test_plan_order_can_live_in_a_scratch_file(tmp_path):
    from virnucpro.batching import Plan

    tokens = np.random.default_rng(1).integers(3, 100, 5000)
    plan = Plan.build(tokens, 512, scratch_dir=tmp_path)
    assert isinstance(plan.order, np.memmap) and not list(tmp_path.iterdir())  # unlinked, mapped
    assert all(np.array_equal(x, y) for x, y in zip(plan, _greedy_one_by_one(tokens, 512)))


def test_long_records_are_read_only_as_far_as_the_tokenizer_uses_them(tmp_path, esm_tiny, dnabert_tiny):
    """make_batch reads max_residues of a long record; tokens are those of the whole sequence truncated,
    and `length` / `truncated` come from the true length."""
    from tests.conftest import random_dna, random_proteins, write_fasta
    from virnucpro.batching import make_batch
    from virnucpro.models import load_tokenizer, resolve_model
    from virnucpro.io.index import FastaIndex
    from virnucpro.io.alphabet import DNA, PROTEIN

    for spec, kind, seqs in [(esm_tiny, PROTEIN, random_proteins(3, 1, 40, seed=1) + random_proteins(2, 3000, 5000)),
                             (dnabert_tiny, DNA, random_dna(3, 1, 40, seed=1) + random_dna(2, 20000, 30000))]:
        write_fasta(tmp_path / "in.fa", seqs)
        index = FastaIndex.build(tmp_path / "in.fa", kind, tmp_path / "scratch")
        tok = load_tokenizer(resolve_model(spec), 100)
        assert tok.max_residues is not None and tok.max_residues < 20000
        batch = make_batch(index, np.arange(len(seqs)), tok, 0)
        tokens, seq_tokens, truncated = tok.encode(seqs)
        assert np.array_equal(batch.tokens, tokens) and np.array_equal(batch.seq_tokens, seq_tokens)
        assert batch.truncated.tolist() == truncated.tolist() == [False] * 3 + [True] * 2
        assert batch.length.tolist() == [len(s) for s in seqs]
