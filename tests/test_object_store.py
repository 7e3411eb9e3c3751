"""Input and output on an object store: an S3 API server (moto) on loopback, credentials and endpoint from
the standard AWS_* variables, as a cluster's nodes would have them.

`embed` streams a FASTA (plain or gzip) from s3://, writes its parts back to s3://, and resumes a run
there from the plan it saved beside the output, without reading the input again.
"""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests import faults
from tests.conftest import random_dna, random_proteins, write_fasta

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """An S3 API on loopback with bucket `bkt`; AWS_* set in this process (and so in the Ray it starts)."""
    pytest.importorskip("moto.server", reason="moto[server] is in the test extras")
    import boto3

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        client = boto3.client("s3")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket="bkt")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.monotonic() > deadline or server.poll() is not None:
                    server.kill()
                    raise
                time.sleep(0.2)
        try:
            yield client, env
        finally:
            server.terminate()
            server.wait(10)


@pytest.fixture(scope="module")
def s3_ray(s3):
    """A local Ray started after the AWS_* variables are set: its workers inherit them."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="bkt", Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _assert_exactly_once(uri: str, ids: list[str]) -> None:
    from virnucpro.io.output import read_embeddings

    table = read_embeddings(uri)
    counts = Counter(table.column("id").to_pylist())
    assert sorted(counts) == sorted(ids) and max(counts.values()) == 1


def test_cli_embeds_a_gzip_fasta_from_s3_into_s3(s3, esm_tiny, tmp_path):
    """As a user runs it: `virnucpro embed s3://.../in.faa.gz -o s3://.../run`, with its own Ray. The gzip
    stream's plain copy lives beside the output (no copy on the driver's disk) and is gone at the end."""
    client, env = s3
    ids = write_fasta(tmp_path / "in.faa", random_proteins(200, 10, 120, seed=31))
    client.put_object(Bucket="bkt", Key="in/proteins.faa.gz", Body=gzip.compress((tmp_path / "in.faa").read_bytes()))
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "embed", "s3://bkt/in/proteins.faa.gz",
                           "-o", "s3://bkt/out/run", "--model", str(esm_tiny), "--device", "cpu",
                           "--toks-per-batch", "1024"],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "200 sequences" in proc.stdout
    _assert_exactly_once("s3://bkt/out/run", ids)
    keys = _keys(client, "out/run/")
    assert "out/run/_manifest.parquet" in keys and not [k for k in keys if "/.work/" in k or k.endswith(".tmp")]


def test_a_run_on_s3_resumes_from_its_saved_plan_without_reading_the_input_again(s3, s3_ray, esm_tiny, tmp_path,
                                                                                    monkeypatch):
    """A batch that fails stops the run; the plan stays in OUT_DIR/.work/plan on the object store, and
    --resume deals the batches left from it: no index pass over the input, only the missing parts."""
    from cluster import driver
    from cluster.driver import EmbedError, embed

    client, _ = s3
    ids = write_fasta(tmp_path / "in.faa", random_proteins(150, 10, 120, seed=32))
    client.put_object(Bucket="bkt", Key="in/p.faa", Body=(tmp_path / "in.faa").read_bytes())
    opts = dict(device="cpu", toks_per_batch=512, progress=False)
    with pytest.raises(EmbedError, match="injected failure"):
        embed("s3://bkt/in/p.faa", "s3://bkt/out/resumed", esm_tiny, actor_class=faults.failing_batch(3), **opts)
    assert "out/resumed/.work/plan/plan.json" in _keys(client, "out/resumed/.work/")
    done_before = len([k for k in _keys(client, "out/resumed/part-")])
    assert done_before >= 1

    def no_index(*args, **kwargs):
        raise AssertionError("the input was indexed again")

    monkeypatch.setattr(driver.FastaIndex, "build", no_index)
    result = embed("s3://bkt/in/p.faa", "s3://bkt/out/resumed", esm_tiny, resume=True, **opts)
    assert result.batches_computed == result.num_batches - done_before
    _assert_exactly_once("s3://bkt/out/resumed", ids)
    assert not _keys(client, "out/resumed/.work/")  # the scratch space goes with the completed run


def test_plain_dna_from_s3_is_read_by_byte_range(s3, s3_ray, dnabert_tiny, tmp_path):
    """A plain FASTA on the object store is indexed as it streams and its records read back by byte
    ranges, several records a request (`RecordReader`): the embeddings equal those of the same file on disk."""
    import numpy as np

    from cluster.driver import embed
    from virnucpro.io.output import read_embeddings

    client, _ = s3
    write_fasta(tmp_path / "in.fa", random_dna(120, 50, 900, seed=33))
    client.put_object(Bucket="bkt", Key="in/d.fa", Body=(tmp_path / "in.fa").read_bytes())
    opts = dict(device="cpu", toks_per_batch=2048, progress=False)
    embed("s3://bkt/in/d.fa", "s3://bkt/out/dna", dnabert_tiny, **opts)
    embed(tmp_path / "in.fa", tmp_path / "local", dnabert_tiny, **opts)
    remote, local = read_embeddings("s3://bkt/out/dna"), read_embeddings(tmp_path / "local")
    assert remote.column("id").to_pylist() == local.column("id").to_pylist()
    assert np.array_equal(np.stack(remote.column("embedding").to_numpy(zero_copy_only=False)),
                          np.stack(local.column("embedding").to_numpy(zero_copy_only=False)))


def test_predict_reads_its_contigs_from_s3(s3, s3_ray, esm_tiny, dnabert_tiny, tmp_path):
    """`predict` streams a gzip FASTA of contigs from s3:// (preprocessing reads it once, as it goes) and
    gives the predictions of the same file read from disk; a --resume reuses its preprocessing."""
    import torch

    from cluster.pipeline import predict
    from virnucpro.pipeline.classifier import MLPClassifier

    client, _ = s3
    contigs = (ROOT / "examples" / "contigs.fasta").read_bytes()
    client.put_object(Bucket="bkt", Key="in/contigs.fasta.gz", Body=gzip.compress(contigs))
    (tmp_path / "contigs.fasta").write_bytes(contigs)
    torch.manual_seed(0)
    torch.save(MLPClassifier(48 + 64, 32, 2).eval().state_dict(), tmp_path / "500_model.pth")
    opts = dict(chunk_size=500, device="cpu", toks_per_batch=4096, progress=False, plots=False)
    remote = predict("s3://bkt/in/contigs.fasta.gz", tmp_path / "remote", tmp_path / "500_model.pth", esm_tiny,
                     dnabert_tiny, **opts)
    local = predict(tmp_path / "contigs.fasta", tmp_path / "local", tmp_path / "500_model.pth", esm_tiny,
                    dnabert_tiny, **opts)
    assert remote.frames == local.frames > 0
    for name in ("prediction_results.txt", "prediction_results_highestscore.csv", "contig_predictions.tsv"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    again = predict("s3://bkt/in/contigs.fasta.gz", tmp_path / "remote", tmp_path / "500_model.pth", esm_tiny,
                    dnabert_tiny, resume=True, **opts)
    assert again.stages["preprocess"] == "reused"
