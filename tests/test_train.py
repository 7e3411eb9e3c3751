"""`virnucpro train`: the whole pipeline carries a learnable signal, and its parts.

End to end (one Ray session, tiny random models on CPU): two families of contigs that differ only in
composition (GC-rich vs AT-rich codons, one open frame each) are trained on as virus and others;
validation ROC AUC must reach 0.95, and `predict` with the saved classifier must label held-out
contigs of each family correctly. Then, without Ray: the metrics against hand counts, early
stopping, the split, both save formats, and predict's chunk-size refusal.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cluster.cli import main
from cluster.pipeline import PredictError, predict
from cluster.training import CLASSIFIER, METRICS_JSON, train, upstream_name
from tests.conftest import UPSTREAM_CLASSIFIER_CLASS
from virnucpro.pipeline.classifier import (ClassifierLoadError, MLPClassifier, classifier_chunk_size, classifier_metadata,
                                  classifier_record, load_classifier, save_classifier, save_upstream_classifier)
from virnucpro.options import OptionError, TrainOptions
from virnucpro.pipeline.fit import EarlyStopping, binary_metrics, fit, new_classifier, roc_auc, split

CHUNK = 120  # neither of upstream's sizes
# stop-free codons of each family: one GC-rich, one AT-rich; any chunk of a contig made of them has an open frame
GC_CODONS = "GCC GCG GGC GGG CGC CCG CCC GAC GAG CAG CAC ACC TCC GTC CTG".split()
AT_CODONS = "AAA AAT ATA ATT TTT TTA TAT TTC ATC AAC GAT CAT ACT AGT TCT".split()


def family_contigs(codons: list[str], n: int, seed: int, prefix: str) -> str:
    """n contigs of 240-420 bases drawn from `codons`, as FASTA text."""
    rng = np.random.default_rng(seed)
    return "".join(f">{prefix}{i}\n{''.join(rng.choice(codons, int(rng.integers(80, 141))))}\n" for i in range(n))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, local_ray, esm_tiny, dnabert_tiny):
    """One training run through the CLI (the only Ray run of this file but predict's)."""
    d = tmp_path_factory.mktemp("train")
    (d / "virus.fasta").write_text(family_contigs(GC_CODONS, 24, 1, "v"))
    (d / "others.fasta").write_text(family_contigs(AT_CODONS, 24, 2, "o"))
    out = d / "out"
    rc = main(["train", "--virus", str(d / "virus.fasta"), "--others", str(d / "others.fasta"), "-o", str(out),
               "--chunk-size", str(CHUNK), "--esm-model", str(esm_tiny), "--dnabert-model", str(dnabert_tiny),
               "--device", "cpu", "--toks-per-batch", "4096", "--no-progress", "--upstream-format"])
    assert rc == 0
    return d, out


def test_pipeline_carries_the_signal_and_predict_uses_the_classifier(trained, esm_tiny, dnabert_tiny):
    d, out = trained
    report = json.loads((out / METRICS_JSON).read_text())
    val = report["validation"]
    assert val["roc_auc"] >= 0.95, val
    assert val["accuracy"] >= 0.9 and set(val) == {"loss", "accuracy", "precision", "recall", "f1", "roc_auc"}
    frames = report["training"]["data"]
    assert frames["virus"]["frames"] > 0 and frames["others"]["frames"] > 0
    assert report["val_frames"] == int((frames["virus"]["frames"] + frames["others"]["frames"]) * 0.1)
    assert 1 <= report["best_epoch"] <= report["epochs"] <= 200
    assert report["history"][report["best_epoch"] - 1]["val_loss"] == min(h["val_loss"] for h in report["history"])

    record = json.loads((out / "classifier.json").read_text())
    assert record == classifier_metadata(out / CLASSIFIER)  # the header holds the same record
    assert record["chunk_size"] == CHUNK and record["input_dim"] == 48 + 64 and record["hidden_dim"] == 512
    assert [f["family"] for f in record["features"]] == ["dnabert_s", "esm2"]  # upstream's order
    assert record["training"]["recipe"]["lr"] == 2e-4 and record["training"]["recipe"]["seed"] == 42

    # held-out contigs of each family (other seeds), classified by predict with the safetensors file
    held = d / "held_out.fasta"
    held.write_text(family_contigs(GC_CODONS, 3, 11, "hv") + family_contigs(AT_CODONS, 3, 12, "ho"))
    res = predict(held, d / "pred", out / CLASSIFIER, esm_tiny, dnabert_tiny, chunk_size=CHUNK, device="cpu",
                  toks_per_batch=4096, progress=False, plots=False)
    rows = [line.split("\t") for line in (d / "pred" / "contig_predictions.tsv").read_text().splitlines()[1:]]
    labels = {r[0]: r[-1] for r in rows}
    assert labels == {**{f"hv{i}": "virus" for i in range(3)}, **{f"ho{i}": "others" for i in range(3)}}, rows
    assert res.contigs == 6

    # the upstream-format copy holds the same weights
    upstream, safe = load_classifier(out / upstream_name(CHUNK)), load_classifier(out / CLASSIFIER)
    assert all(torch.equal(a, b) for a, b in zip(upstream.state_dict().values(), safe.state_dict().values()))


def test_resume_reuses_the_embeddings_and_retrains_the_same(trained, esm_tiny, dnabert_tiny, caplog):
    d, out = trained
    first = json.loads((out / METRICS_JSON).read_text())
    with pytest.raises(PredictError, match="--resume"):  # a second run into OUT_DIR must say what to do
        train(d / "virus.fasta", d / "others.fasta", out, esm_tiny, dnabert_tiny, chunk_size=CHUNK, device="cpu")
    res = train(d / "virus.fasta", d / "others.fasta", out, esm_tiny, dnabert_tiny, chunk_size=CHUNK, device="cpu",
                resume=True, progress=False)
    assert {k: v for k, v in res.stages.items() if k.endswith(("preprocess", "esm2", "dnabert_s"))} == {
        f"{s} {k}": "reused" for s in ("virus", "others") for k in ("preprocess", "esm2", "dnabert_s")}
    again = json.loads((out / METRICS_JSON).read_text())
    assert again["validation"] == first["validation"]  # seeded: the same split, weights and batches
    assert res.summary().startswith("trained on ")


def test_predict_refuses_a_classifier_of_another_chunk_size(trained, tmp_path, esm_tiny, dnabert_tiny, capsys):
    d, out = trained
    for classifier in (out / CLASSIFIER, out / upstream_name(CHUNK)):  # the record says it; the name implies it
        rc = main(["predict", str(d / "virus.fasta"), "-o", str(tmp_path / classifier.suffix), "--classifier",
                   str(classifier), "--chunk-size", "300", "--esm-model", str(esm_tiny), "--dnabert-model",
                   str(dnabert_tiny), "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and "\n" not in err, err
        assert f"trained on {CHUNK} bp chunks, but --chunk-size is 300" in err
        assert not (tmp_path / classifier.suffix).exists()  # before anything is written


# -----------------------------------------------------------------------------
# without Ray

def test_metrics_match_hand_counts():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    predicted = np.array([1, 0, 1, 0, 1, 0, 0, 1])  # tp 3, fp 1, fn 1, tn 3
    m = binary_metrics(y, np.linspace(0, 1, 8), predicted)
    assert m["accuracy"] == 6 / 8 and m["precision"] == 3 / 4 and m["recall"] == 3 / 4
    assert m["f1"] == pytest.approx(0.75)
    # AUC: the share of (virus, others) pairs ranked right, a tie counting half
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == (1 + 1 + 0.5 + 1) / 4
    assert roc_auc([1, 1, 0], [3, 2, 1]) == 1.0 and roc_auc([0, 0], [1, 2]) is None
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 500), rng.integers(0, 20, 500).astype(float)  # many ties
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]]
    assert roc_auc(y, s) == pytest.approx(np.mean(pairs))
    assert binary_metrics([0, 0], [0.1, 0.2], [0, 0])["precision"] == 0.0  # no positive call: 0, as sklearn


def test_split_is_seeded_and_holds_out_a_tenth():
    train_idx, val_idx = split(105, 0.1, 42)
    assert len(val_idx) == 10 and sorted(np.r_[train_idx, val_idx]) == list(range(105))
    assert np.array_equal(split(105, 0.1, 42)[1], val_idx) and not np.array_equal(split(105, 0.1, 7)[1], val_idx)


def test_early_stopping_keeps_a_copy_of_the_best_weights():
    model = MLPClassifier(4, 8, 2)
    stop = EarlyStopping(patience=2)
    assert not stop(1, 1.0, model)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.hidden_layer.weight += 1  # training goes on, in place
    assert not stop(2, 1.5, model) and stop(3, 1.0, model)  # two epochs without a lower loss (a tie is none)
    assert stop.best_epoch == 1
    assert torch.equal(stop.best_state["hidden_layer.weight"], best["hidden_layer.weight"])


def test_fit_stops_early_and_restores_the_best_epoch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = rng.integers(0, 2, 200)  # no signal: validation loss soon stops falling
    res = fit(x, y, TrainOptions(epochs=200, patience=3, lr=0.05, train_device="cpu"))
    assert res.stopped_early and res.epochs == res.best_epoch + 3 < 200
    assert res.metrics["loss"] == min(h["val_loss"] for h in res.history)
    assert res.train_frames == 180 and res.val_frames == 20
    # the returned model is the best epoch's: its validation loss is that epoch's
    _, val_idx = split(200, 0.1, 42)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(res.model(torch.from_numpy(x[val_idx])), torch.from_numpy(y[val_idx]))
    assert loss.item() == pytest.approx(res.metrics["loss"], abs=1e-5)
    # a separable signal is learnt with upstream's own recipe
    x[:, 0] += 3 * (2 * y - 1)
    assert fit(x, y, TrainOptions(train_device="cpu")).metrics["roc_auc"] > 0.99


def test_models_skipping_init_in_two_threads_leave_nn_init_whole():
    """predict and train check both models from two threads; the init-skipping patch of one must not
    outlive both (it did: a classifier trained afterwards started from uninitialised biases)."""
    import threading

    from virnucpro.models.loading import on_meta_device

    original = torch.nn.init.uniform_
    inside, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first():
        with on_meta_device():
            inside.set()
            release.wait(5)

    def second():
        with on_meta_device():
            second_in.set()

    a, b = threading.Thread(target=first), threading.Thread(target=second)
    a.start()
    inside.wait(5)
    b.start()
    assert not second_in.wait(0.3)  # the second waits for the first to leave
    release.set()
    a.join(), b.join()
    assert second_in.is_set() and torch.nn.init.uniform_ is original
    assert torch.isfinite(new_classifier(8, 0).hidden_layer.bias).all()


def test_train_options_are_checked():
    for bad in ({"val_fraction": 1.0}, {"batch_size": 1}, {"lr": 0.0}, {"train_device": "tpu"}):
        with pytest.raises(OptionError):
            TrainOptions(**bad)


# -----------------------------------------------------------------------------
# save and load

UPSTREAM_LOAD = UPSTREAM_CLASSIFIER_CLASS + textwrap.dedent("""
    model = torch.load(sys.argv[1], weights_only=False)  # upstream's prediction.py: torch.load(model_path)
    assert type(model) is MLPClassifier, type(model)
    x = torch.load(sys.argv[2])
    torch.save(model.eval()(x), sys.argv[3])
""")


def _trained_like_model() -> MLPClassifier:
    torch.manual_seed(0)
    model = MLPClassifier(20, 16, 2)
    model.train()
    model(torch.randn(64, 20) * 3 + 1)  # non-trivial BatchNorm statistics
    return model.eval()


def test_safetensors_round_trip(tmp_path):
    model = _trained_like_model()
    save_classifier(model, tmp_path / "c.safetensors", classifier_record(model, 250, note="x"))
    back = load_classifier(tmp_path / "c.safetensors")
    x = torch.randn(10, 20)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert classifier_chunk_size(tmp_path / "c.safetensors") == 250
    meta = json.loads((tmp_path / "c.json").read_text())
    assert meta == classifier_metadata(tmp_path / "c.safetensors")
    assert (meta["input_dim"], meta["hidden_dim"], meta["num_classes"], meta["note"]) == (20, 16, 2, "x")
    with pytest.raises(ValueError):
        save_classifier(model, tmp_path / "c.pth", {})
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ClassifierLoadError):
        load_classifier(tmp_path / "bad.safetensors")


def test_upstream_format_round_trip_and_upstreams_own_load(tmp_path):
    model = _trained_like_model()
    path = tmp_path / "300_model.pth"
    save_upstream_classifier(model, path)
    assert "MLPClassifier" not in vars(sys.modules["__main__"])  # __main__ left as it was
    back = load_classifier(path)  # our restricted unpickler
    x = torch.randn(10, 20)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(back(x), want)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", UPSTREAM_LOAD, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "y.pt"), want)
    assert classifier_chunk_size(path) == 300 and classifier_chunk_size(tmp_path / "model.pth") is None
