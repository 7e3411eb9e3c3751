"""The service's HTTP ingress without a cluster: its answers when replicas die under a request's batches,
when the request timeout passes, when the body is over the limit; the JSON it writes. The model
deployment is a stand-in whose calls die, hang, fail or answer as each test scripts them;
tests/test_service.py runs the ingress in Serve, in front of real replicas."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from ray.exceptions import ActorDiedError
from starlette.requests import Request

import actors.ingress as ingress_module
from actors.ingress import EmbeddingIngress, IngressConfig, Limits
from tests.conftest import random_proteins
from virnucpro.batching import BatchError
from virnucpro.models import load_tokenizer, resolve_model

DIM = 8


class Model:
    """A model deployment's handle whose `compute` calls follow `script`, one outcome a call ("die",
    "hang", "fail", "oom"; None or the script's end: answer); each answer is a function of the batch's
    tokens, so a batch computed twice answers the same."""

    def __init__(self, script=()):
        self.script, self.calls, self.cancelled = list(script), [], 0

    @property
    def compute(self):
        return self

    def remote(self, batch):
        self.calls.append(batch.batch_id)
        return self._answer(batch, self.script.pop(0) if self.script else None)

    async def _answer(self, batch, outcome):
        await asyncio.sleep(0)
        if outcome == "die":
            raise ActorDiedError()
        if outcome == "fail":
            raise RuntimeError("torch.AcceleratorError: injected")
        if outcome == "oom":
            raise BatchError("batch 0: out of memory")
        if outcome == "hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return expected(batch.tokens, batch.seq_tokens)


def expected(tokens: np.ndarray, seq_tokens: np.ndarray) -> np.ndarray:
    starts = np.concatenate(([0], np.cumsum(seq_tokens)))
    return np.stack([np.linspace(tokens[a:b].sum(), b - a, DIM, dtype=np.float32) / 7
                     for a, b in zip(starts[:-1], starts[1:])])


@pytest.fixture(scope="module")
def config(esm_tiny) -> IngressConfig:
    source = resolve_model(str(esm_tiny))
    return IngressConfig(source, load_tokenizer(source), toks_per_batch=256,
                         limits=Limits(max_request_bytes=4096, request_timeout_s=5, attempts=3))


@pytest.fixture(autouse=True)
def token_accepted(monkeypatch):
    monkeypatch.setattr(ingress_module, "_refused", lambda header: None)


def request(body: bytes, content_type: str = "application/json", declare_length: bool = True,
            chunk: int = 1024) -> tuple[Request, list]:
    """A Starlette request whose body arrives in `chunk`-byte messages; the list holds the messages not
    yet read."""
    messages = [{"type": "http.request", "body": body[i:i + chunk], "more_body": i + chunk < len(body)}
                for i in range(0, max(len(body), 1), chunk)]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    headers = [(b"content-type", content_type.encode())]
    if declare_length:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": "POST", "path": "/svc", "headers": headers, "query_string": b""}
    return Request(scope, receive), messages


def call(config: IngressConfig, model: Model, body: bytes, **kwargs):
    """(response, its JSON, the body's unread messages). `model.cancelled` counts the calls cancelled
    by the time of the answer (and a moment after), not those that `asyncio.run` cancels at its end."""
    req, unread = request(body, **kwargs)

    async def answer():
        response = await EmbeddingIngress(config, model)(req)
        await asyncio.sleep(0.05)
        model.cancelled_at_answer = model.cancelled
        return response

    response = asyncio.run(answer())
    return response, json.loads(response.body) if response.media_type == "application/json" else None, unread


def proteins_body(n: int, seed: int) -> tuple[bytes, list[str]]:
    seqs = random_proteins(n, 20, 60, seed=seed)
    return json.dumps({"sequences": [{"id": f"p{i}", "sequence": s} for i, s in enumerate(seqs)]}).encode(), seqs


def test_batches_are_answered_in_order_as_float32_json(config):
    body, seqs = proteins_body(12, seed=71)
    model = Model()
    response, reply, _ = call(config, model, body)
    assert response.status_code == 200 and len(set(model.calls)) > 1  # several batches
    tokens, seq_tokens, _ = config.tokenizer.encode(seqs)
    got = np.array(reply["embeddings"], np.float32)
    # the numbers read back as the same float32s the replicas computed, in the request's order
    np.testing.assert_array_equal(got, expected(tokens, seq_tokens))
    assert reply["ids"] == [f"p{i}" for i in range(12)] and reply["dim"] == DIM


def test_a_batch_whose_replica_dies_is_computed_again_elsewhere(config):
    body, _ = proteins_body(12, seed=72)
    clean = call(config, Model(), body)[1]["embeddings"]
    model = Model(["die", "die"])  # the first two calls lose their replica
    response, reply, _ = call(config, model, body)
    assert response.status_code == 200 and reply["embeddings"] == clean
    assert len(model.calls) == len(set(model.calls)) + 2


@pytest.mark.parametrize("outcome,status", [("die", 503), ("fail", 500)])
def test_a_batch_lost_on_every_try_is_503_with_retry_after_and_an_error_500(config, outcome, status):
    body, _ = proteins_body(3, seed=73)
    model = Model([outcome] * config.limits.attempts)
    response, reply, _ = call(config, model, body)
    assert response.status_code == status and len(model.calls) == config.limits.attempts
    if status == 503:
        assert response.headers["retry-after"] == str(config.limits.retry_after_s)
        assert reply["error"].startswith("a replica computing this request was lost on each of its 3 tries (The "
                                         "actor died")
        assert reply["error"].endswith(f"retry after {config.limits.retry_after_s} s")
    else:
        assert "retry-after" not in response.headers and reply["error"] == "torch.AcceleratorError: injected"


def test_a_batch_error_is_not_retried_and_stops_the_other_batches(config):
    model = Model(["oom"] + ["hang"] * 100)
    response, reply, _ = call(config, model, proteins_body(12, seed=74)[0])
    assert (response.status_code, reply["error"]) == (500, "batch 0: out of memory")
    assert model.calls[0] == 0 and len(model.calls) == len(set(model.calls)) > 1  # each batch once
    assert model.cancelled_at_answer == len(model.calls) - 1  # the others leave the replicas' queues


def test_the_request_timeout_answers_503_and_cancels_the_batches(config):
    limits = Limits(request_timeout_s=0.3)
    model = Model(["hang"] * 100)
    start = time.perf_counter()
    response, reply, _ = call(IngressConfig(config.source, config.tokenizer, 256, limits), model,
                              proteins_body(12, seed=75)[0])
    assert response.status_code == 503 and time.perf_counter() - start < 3
    assert response.headers["retry-after"] == str(limits.retry_after_s)
    assert reply["error"].startswith("not answered within the service's request timeout (0.3 s)")
    assert model.cancelled_at_answer == len(model.calls) > 1  # no batch left computing for nobody


@pytest.mark.parametrize("declare_length", [True, False])
def test_a_body_over_the_limit_is_read_to_its_end_and_answered_413(config, declare_length):
    body = b">p\n" + b"M" * 5000 + b"\n"
    response, reply, unread = call(config, Model(), body, content_type="text/x-fasta",
                                   declare_length=declare_length)
    assert response.status_code == 413 and unread == []
    assert reply["error"] == f"request of {len(body)} bytes; at most 4096 bytes (0.00390625 MiB) per request"


def test_bad_input_is_400_before_any_batch(config):
    model = Model()
    response, reply, _ = call(config, model, b">x\nMK1V\n", content_type="text/x-fasta")
    assert response.status_code == 400 and model.calls == []
    assert reply["error"] == "request: record 'x': character '1' at position 3 is not a valid protein letter"
