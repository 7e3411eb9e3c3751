"""virnucpro.pipeline.classifier: loading upstream-style pickles safely, inference, upstream's output formats."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import UPSTREAM_CLASSIFIER_CLASS
from virnucpro.pipeline.classifier import (ClassifierLoadError, MLPClassifier, highest_scores,
                                  load_classifier, predict_proba, write_highest_scores,
                                  write_prediction_results)

# Upstream's train.py defines the class in the script it runs, so torch.save(model) records it as
# `__main__.MLPClassifier`. This script does the same in a fresh interpreter, and also saves an
# input batch and the original model's outputs on it.
UPSTREAM_SAVE = UPSTREAM_CLASSIFIER_CLASS + textwrap.dedent("""

    torch.manual_seed(0)
    model = MLPClassifier(3328, 512, 2)
    model.train()
    for _ in range(3):  # non-trivial BatchNorm running statistics
        model(torch.randn(64, 3328) * 2 + 0.5)
    model.eval()
    out = sys.argv[1]
    torch.save(model, out + "/model.pth")
    torch.save(model, out + "/model_legacy.pth", _use_new_zipfile_serialization=False)
    x = torch.randn(300, 3328)
    with torch.no_grad():
        torch.save({"x": x, "logits": model(x), "probs": F.softmax(model(x), dim=1)}, out + "/io.pt")
""")


@pytest.fixture(scope="module")
def upstream_files(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("upstream")
    subprocess.run([sys.executable, "-c", UPSTREAM_SAVE, str(out)], check=True, cwd=out)
    return out


@pytest.mark.parametrize("name", ["model.pth", "model_legacy.pth"])
def test_loads_upstream_pickled_module(upstream_files, name):
    model = load_classifier(upstream_files / name)
    io = torch.load(upstream_files / "io.pt")
    assert isinstance(model, MLPClassifier) and not model.training
    with torch.no_grad():
        assert torch.equal(model(io["x"]), io["logits"])
    probs = predict_proba(model, io["x"].numpy(), batch_size=64)
    assert probs.dtype == np.float32 and probs.shape == (300, 2)
    np.testing.assert_allclose(probs, io["probs"].numpy(), rtol=0, atol=1e-6)


def test_state_dict_keys_are_upstreams():
    assert list(MLPClassifier().state_dict()) == [
        "hidden_layer.weight", "hidden_layer.bias", "bn1.weight", "bn1.bias", "bn1.running_mean",
        "bn1.running_var", "bn1.num_batches_tracked", "output_layer.weight", "output_layer.bias"]


def test_loads_state_dicts(tmp_path, upstream_files):
    ref = load_classifier(upstream_files / "model.pth")
    x = torch.load(upstream_files / "io.pt")["x"]
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "sd.pth")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save({"model_state_dict": sd, "best_acc": np.float64(0.93), "epoch": 7}, tmp_path / "wrapped2.pth")
    for name in ("sd.pth", "wrapped.pth", "wrapped2.pth"):
        model = load_classifier(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(model(x), ref(x)), name


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_global_is_refused_and_not_run(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"hidden_layer.weight": torch.zeros(2, 2), "x": _Exploit(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    with pytest.raises(ClassifierLoadError, match=r"system"):
        load_classifier(path)
    assert not marker.exists()


def test_other_globals_are_refused(tmp_path):
    torch.save({"w": torch.nn.Conv1d(1, 1, 1)}, tmp_path / "conv.pth")
    with pytest.raises(ClassifierLoadError, match="torch.nn.modules.conv.Conv1d"):
        load_classifier(tmp_path / "conv.pth")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script, deprecated in 2.13
def test_torchscript_is_refused(tmp_path):
    torch.jit.script(MLPClassifier(8, 4, 2)).save(str(tmp_path / "ts.pt"))
    with pytest.raises(ClassifierLoadError, match="TorchScript"):
        load_classifier(tmp_path / "ts.pt")


def test_wrong_contents_are_refused(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "nodict.pth")
    torch.save({"foo.weight": torch.zeros(2, 2)}, tmp_path / "badkeys.pth")
    sd = MLPClassifier().state_dict()
    sd["hidden_layer.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "badshape.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    for name in ("nodict.pth", "badkeys.pth", "badshape.pth", "garbage.pth"):
        with pytest.raises(ClassifierLoadError):
            load_classifier(tmp_path / name)
    with pytest.raises(ClassifierLoadError):
        load_classifier(tmp_path / "missing.pth")


def test_predict_proba_batches_and_empty():
    torch.manual_seed(1)
    model = MLPClassifier(16, 8, 2).eval()
    x = torch.randn(100, 16)
    a = predict_proba(model, x, batch_size=7)
    b = predict_proba(model, x.double().numpy())
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a.sum(1), 1, atol=1e-6)
    assert predict_proba(model, np.zeros((0, 16), np.float32)).shape == (0, 2)


# -----------------------------------------------------------------------------
# output files

IDS = ["b_chunk_2F1", "b_chunk_2R3", "a_chunk_10F2", "a_chunk_9R1", "a_chunk_9F3", "b_chunk_1F1"]
PROBS = np.array([[0.1, 0.9], [0.75, 0.25], [0.5, 0.5], [0.99999, 1e-05], [0.6, 0.4], [0.3, 0.7]],
                 dtype=np.float32)


def test_prediction_results_format(tmp_path):
    path = tmp_path / "prediction_results.txt"
    write_prediction_results(path, IDS, PROBS)
    # scores are str(numpy.float32): shortest digits; a tie is "others" (torch.max's first index)
    assert path.read_text() == (
        "Sequence_ID\tPrediction\tscore1\tscore2\n"
        "b_chunk_2F1\tvirus\t0.1\t0.9\n"
        "b_chunk_2R3\tothers\t0.75\t0.25\n"
        "a_chunk_10F2\tothers\t0.5\t0.5\n"
        "a_chunk_9R1\tothers\t0.99999\t1e-05\n"
        "a_chunk_9F3\tothers\t0.6\t0.4\n"
        "b_chunk_1F1\tvirus\t0.3\t0.7\n")


def test_highest_scores_format(tmp_path):
    path = tmp_path / "prediction_results_highestscore.csv"
    write_highest_scores(path, IDS, torch.from_numpy(PROBS))
    # one row per chunk, sorted as pandas' groupby sorts (a_chunk_10 before a_chunk_9); a tie of
    # the maxima counts as virus (>=); maxima are taken per column over the chunk's frames
    assert path.read_text() == (
        "Modified_ID\tIs_Virus\n"
        "a_chunk_10\tTrue\n"
        "a_chunk_9\tFalse\n"
        "b_chunk_1\tTrue\n"
        "b_chunk_2\tTrue\n")
    # b_chunk_2: max score1 0.75 (R3) vs max score2 0.9 (F1)
    assert highest_scores(["c_chunk_1F1", "c_chunk_1R1"], [[0.8, 0.2], [0.3, 0.7]]) == [("c_chunk_1", False)]


def test_writers_reject_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError):
        write_prediction_results(tmp_path / "x", IDS[:2], PROBS)
