"""Faults injected while a run is in flight, beyond those covered elsewhere:

  * an actor SIGKILLed, a node removed, an actor Ray gives up on: tests/test_fault_tolerance.py
  * the driver SIGKILLed, then `--resume`: tests/test_ray_jobs.py::test_driver_killed_then_resumed
  * a batch that fails on every attempt (named with its cause, then `--resume`):
    tests/test_embed.py::test_permanent_batch_failure_names_batch_and_cause_then_resume

Here: a part write failing with a full disk or a permission error (`tests.faults.failing_write`: the
actor's write of one batch's part fails after writing part of its temporary file), and a transient
error in an actor (`tests.faults.failing_batch(..., first_attempt_only=True)`). After
each: every input id exactly once in the output, or a failed run that says so, and never a manifest
that claims completeness over missing rows.
"""

from __future__ import annotations

import errno
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.driver import EmbedError, embed
from tests import faults
from tests.conftest import random_proteins, write_fasta
from virnucpro.io.output import Manifest, read_embeddings

pytestmark = pytest.mark.slow

OPTS = dict(device="cpu", toks_per_batch=512, progress=False, num_actors=2)


def _assert_exactly_once(out: Path, ids: list[str]) -> None:
    table = read_embeddings(out)  # refuses a run whose manifest is not complete
    counts = Counter(table.column("id").to_pylist())
    assert sorted(counts) == sorted(ids) and max(counts.values()) == 1
    assert pq.read_table(out, columns=["id"]).num_rows == len(ids)  # no stray rows in other files
    assert not list(out.glob(".*.tmp")), "a temporary part file was left behind"


def _assert_incomplete(out: Path, missing_part: str) -> Manifest:
    manifest = Manifest.load(out)
    assert not manifest.complete
    assert missing_part not in manifest.part_names() and not (out / missing_part).exists()
    assert manifest.rows_done < manifest.num_sequences
    with pytest.raises(FileNotFoundError, match="no complete run"):
        read_embeddings(out)
    return manifest


@pytest.mark.parametrize("code,message", [("ENOSPC", "No space left on device"), ("EACCES", "Permission denied")])
def test_part_write_fails_then_resume_after_the_cause_is_fixed(tmp_path, esm_tiny, local_ray,
                                                               code, message):
    ids = write_fasta(tmp_path / "in.faa", random_proteins(80, 10, 100, seed=41))
    out = tmp_path / "out"
    with pytest.raises(EmbedError) as info:
        embed(tmp_path / "in.faa", out, esm_tiny, actor_class=faults.failing_write(3, getattr(errno, code)), **OPTS)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("batch 3 (") and "writing its part failed" in text and message in text, text
    assert "part-000003.parquet" in text and "--resume" in text
    _assert_incomplete(out, "part-000003.parquet")
    # the disk has room again: --resume computes what is missing, keeps what was written
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    resumed = embed(tmp_path / "in.faa", out, esm_tiny, resume=True, **OPTS)
    assert resumed.batches_computed == resumed.num_batches - len(before)
    assert {k: (out / k).stat().st_mtime_ns for k in before} == before
    _assert_exactly_once(out, ids)


def test_transient_error_is_retried_and_the_run_completes(tmp_path, esm_tiny, local_ray, caplog):
    ids = write_fasta(tmp_path / "in.faa", random_proteins(80, 10, 100, seed=42))
    out = tmp_path / "out"
    result = embed(tmp_path / "in.faa", out, esm_tiny, actor_class=faults.failing_batch(2, first_attempt_only=True),
                   **OPTS)
    assert result.batches_retried_after_errors == 1 and result.batches_computed == result.num_batches
    assert "1 batch(es) retried after errors" in result.summary()
    assert "batch 2 failed on actor" in caplog.text and "injected transient failure" in caplog.text
    _assert_exactly_once(out, ids)
