"""`predict --esm-service NAME`: ESM-2 embedded by a running service, DNABERT-S by the run's own actors,
on CPU with tiny models. The predictions match a run without the service; a service of the wrong
model family, or a model that contradicts the service's, is refused in one line before preprocessing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from cluster.cli import main
from cluster.pipeline import PredictError, predict
from cluster.service import start_service, stop_service
from virnucpro.pipeline.classifier import MLPClassifier
from virnucpro.options import EmbedOptions
from virnucpro.io.output import Manifest
from virnucpro.pipeline.classify import EMBED_DIRS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DNA_DIM, ESM_DIM = 48, 64  # conftest's dnabert_tiny and esm_tiny
COMPUTE = dict(device="cpu", toks_per_batch=2048, progress=False)
_RAY_FORWARDED = re.compile(r"(\x1b\[[0-9;]*m)?\((ServeReplica|ServeController|raylet|pid=)")  # a worker's line


@pytest.fixture(scope="module")
def esm_service(esm_tiny):
    """One Ray session (3 CPUs: the service's replica, the DNABERT-S actor, the driver) and one tiny
    ESM-2 service with the same batch budget as the run without it."""
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING")
    start_service(str(esm_tiny), "esm", opts=EmbedOptions(device="cpu", toks_per_batch=2048), http_port=8932)
    yield "esm"
    from ray import serve

    stop_service("esm")
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A state dict of the MLP whose scores spread over (0, 1)."""
    torch.manual_seed(0)
    model = MLPClassifier(DNA_DIM + ESM_DIM, 32, 2)
    for _ in range(3):  # non-trivial BatchNorm running statistics
        model(torch.randn(128, DNA_DIM + ESM_DIM) * 0.5)
    model.eval()
    with torch.no_grad():
        model.output_layer.weight *= 8
    path = tmp_path_factory.mktemp("classifier") / "500_model.pth"
    torch.save(model.state_dict(), path)
    return path


def _predictions(out: Path) -> tuple[list[str], list[str], np.ndarray]:
    t = pq.read_table(out / "predictions.parquet")
    scores = np.stack([t.column("score1").to_numpy(), t.column("score2").to_numpy()], 1)
    return t.column("frame_id").to_pylist(), t.column("label").to_pylist(), scores


def test_esm_service_gives_the_predictions_of_a_run_without_it(esm_service, esm_tiny, dnabert_tiny, classifier,
                                                                  tmp_path):
    contigs = ROOT / "examples" / "contigs.fasta"
    served = predict(contigs, tmp_path / "served", classifier, dnabert_model=dnabert_tiny, esm_service=esm_service,
                     keep_embeddings=True, plots=False, **COMPUTE)
    own = predict(contigs, tmp_path / "own", classifier, esm_tiny, dnabert_tiny, plots=False, **COMPUTE)
    assert served.frames == own.frames > 20
    assert served.stages["esm2"] == "computed" and served.stages["dnabert_s"] == "computed"
    assert len(served.embeddings["esm2"].actors) == 1  # the service's replica, no actor of the run's own
    ids, labels, scores = _predictions(tmp_path / "served")
    own_ids, own_labels, own_scores = _predictions(tmp_path / "own")
    assert ids == own_ids and labels == own_labels
    np.testing.assert_allclose(scores, own_scores, atol=1e-5)
    assert np.ptp(scores[:, 1]) > 0.1  # a comparison of spread scores, not of all ~0.5
    for name in ("prediction_results.txt", "prediction_results_highestscore.csv", "contig_predictions.tsv"):
        assert (tmp_path / "served" / name).is_file()
    manifest = Manifest.load(tmp_path / "served" / EMBED_DIRS["esm2"])
    assert manifest.complete and manifest.model == str(esm_tiny) and manifest.num_sequences == served.frames
    # resume: the service's embeddings are recognised as complete, nothing is recomputed
    again = predict(contigs, tmp_path / "served", classifier, dnabert_model=dnabert_tiny, esm_service=esm_service,
                    keep_embeddings=True, plots=False, resume=True, **COMPUTE)
    assert again.stages["classify"] == "reused"
    # the service's model named as --esm-model too: accepted
    predict(contigs, tmp_path / "named", classifier, esm_tiny, dnabert_tiny, esm_service=esm_service,
            plots=False, **COMPUTE)
    assert _predictions(tmp_path / "named")[1] == own_labels


def test_wrong_family_or_contradicting_model_refused_before_preprocessing(esm_service, dnabert_tiny, classifier,
                                                                          tmp_path, capsys):
    contigs = ROOT / "examples" / "contigs.fasta"
    code = main(["predict", str(contigs), "-o", str(tmp_path / "a"), "--classifier", str(classifier),
                 "--chunk-size", "500", "--esm-model", str(dnabert_tiny), "--dnabert-service", esm_service,
                 "--device", "cpu", "--no-plots"])
    # this process started the service, so Ray also forwards the replicas' request log lines here, as they
    # arrive: "(ServeReplica:esm:...) INFO ... CALL describe OK"; the command's own error is one line
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not _RAY_FORWARDED.match(ln)]
    assert code == 1 and len(lines) == 1, lines
    err = lines[0]
    assert err.startswith("virnucpro: error: --dnabert-service esm: the service embeds with") and "an ESM-2 model" in err
    assert not (tmp_path / "a").exists()
    with pytest.raises(PredictError, match="--esm-model .* but --esm-service esm serves"):
        predict(contigs, tmp_path / "b", classifier, dnabert_tiny, dnabert_tiny, esm_service=esm_service, **COMPUTE)
    assert not (tmp_path / "b").exists()
    with pytest.raises(TypeError, match="service"):  # one service per model, not one for both
        predict(contigs, tmp_path / "c", classifier, service=esm_service)
