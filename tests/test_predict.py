"""`virnucpro predict` end to end on CPU: tiny random models, a classifier saved the upstream way.

Checks the outputs against independent computations: frames from protein.faa, scores from the
embeddings joined by id and a hand-written forward pass of the MLP, upstream's per-chunk rule, and
the contig rule; then resume, threshold changes, the CLI, and the errors a user can hit.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster.pipeline import PredictError, predict
from tests.conftest import UPSTREAM_CLASSIFIER_CLASS
from virnucpro.pipeline.classifier import ChunkMaxima, MLPClassifier
from virnucpro.io.fasta import fasta_ids, iter_records
from virnucpro.io.output import Manifest, read_embeddings
from virnucpro.pipeline.classify import CONTIG_COLUMNS, EMBED_DIRS, contig_rows
from virnucpro.pipeline.preprocess import chunk_bounds

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DNA_DIM, ESM_DIM = 48, 64  # conftest's dnabert_tiny and esm_tiny

# Upstream's train.py defines MLPClassifier in the script it runs and saves with torch.save(model):
# the pickle names `__main__.MLPClassifier`. Same here, in a fresh interpreter; the raw tensors are
# saved too, for the hand-written forward pass below.
UPSTREAM_SAVE = UPSTREAM_CLASSIFIER_CLASS + textwrap.dedent("""

    torch.manual_seed(0)
    model = MLPClassifier(int(sys.argv[2]), 32, 2)
    model.train()
    for _ in range(3):  # non-trivial BatchNorm running statistics
        model(torch.randn(128, int(sys.argv[2])) * 0.5)
    model.eval()
    with torch.no_grad():
        model.output_layer.weight *= 8  # spread the scores over (0, 1)
    torch.save(model, sys.argv[1] + "/500_model.pth")
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, sys.argv[1] + "/tensors.pt")
""")

EXTRA = (">odd_chunk_7 a contig id that itself contains _chunk_\n"
         "ATGAAACCCGGGTTTAAACCCGGGTTTCATCATGCATGCAAACCCTTTGGGAAACCCTTTGGGCATCATCGATCGATTTCCCAAA"
         "GGGTTTCCCAAAGGGATGCATGCCCGGGAAATTTCCCGGGAAATTTCATCATGCAGCAGGGACCAGGAACCGGAACCAGGAAA\n"
         ">tiny_one\nACGTACG\n")


@pytest.fixture(scope="module")
def upstream_classifier(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("classifier")
    subprocess.run([sys.executable, "-c", UPSTREAM_SAVE, str(out), str(DNA_DIM + ESM_DIM)], check=True, cwd=out)
    return out / "500_model.pth"


@pytest.fixture(scope="module")
def contigs(tmp_path_factory) -> Path:
    """examples/contigs.fasta (gene-dense, no-frame, short, N-run, soft-masked contigs) and two more."""
    path = tmp_path_factory.mktemp("input") / "contigs.fasta"
    path.write_text((ROOT / "examples" / "contigs.fasta").read_text() + EXTRA)
    return path


@pytest.fixture(scope="module")
def run1(tmp_path_factory, local_ray, contigs, upstream_classifier, esm_tiny, dnabert_tiny):
    out = tmp_path_factory.mktemp("run1") / "out"
    result = predict(contigs, out, upstream_classifier, esm_tiny, dnabert_tiny, chunk_size=500,
                     keep_embeddings=True, device="cpu", toks_per_batch=2048, progress=False)
    return out, result


# -----------------------------------------------------------------------------
# independent computations

def read_tsv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def mlp_forward(tensors: dict, x: np.ndarray) -> np.ndarray:
    """Linear -> BatchNorm (running stats) -> ReLU -> Linear -> softmax, written out in torch."""
    t = {k: v.double() for k, v in tensors.items()}
    h = torch.from_numpy(x).double() @ t["hidden_layer.weight"].T + t["hidden_layer.bias"]
    h = (h - t["bn1.running_mean"]) / torch.sqrt(t["bn1.running_var"] + 1e-5) * t["bn1.weight"] + t["bn1.bias"]
    logits = torch.relu(h) @ t["output_layer.weight"].T + t["output_layer.bias"]
    return torch.softmax(logits, dim=1).numpy()


def expected_scores(out: Path, classifier: Path) -> tuple[list[str], np.ndarray]:
    """Frame ids from protein.faa and their scores from the kept embeddings, joined by id."""
    ids = [rid for rid, _ in iter_records(out / "protein.faa")]
    by_id = {}
    for family in ("dnabert_s", "esm2"):
        table = read_embeddings(out / EMBED_DIRS[family])
        by_id[family] = dict(zip(table.column("id").to_pylist(),
                                 np.stack(table.column("embedding").to_numpy(zero_copy_only=False))))
        assert len(by_id[family]) == len(ids)
    x = np.stack([np.concatenate([by_id["dnabert_s"][i], by_id["esm2"][i]]) for i in ids])  # DNABERT-S first
    assert x.shape == (len(ids), DNA_DIM + ESM_DIM)
    return ids, mlp_forward(torch.load(classifier.parent / "tensors.pt"), x)


# -----------------------------------------------------------------------------
# the main run

def test_upstream_files_and_every_frame_once(run1, upstream_classifier):
    out, result = run1
    ids, want = expected_scores(out, upstream_classifier)
    assert len(ids) == len(set(ids)) == result.frames > 20

    rows = read_tsv(out / "prediction_results.txt")
    assert rows[0] == ["Sequence_ID", "Prediction", "score1", "score2"]
    assert [r[0] for r in rows[1:]] == ids  # every kept frame exactly once, in protein.faa order
    got = np.array([[float(r[2]), float(r[3])] for r in rows[1:]])
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert [r[1] for r in rows[1:]] == ["virus" if b > a else "others" for a, b in got]
    assert np.ptp(got[:, 1]) > 0.1  # the scores are spread, not all about 0.5
    assert result.virus_frames == sum(r[1] == "virus" for r in rows[1:])

    table = pq.read_table(out / "predictions.parquet")
    assert table.column_names == ["frame_id", "chunk_id", "contig_id", "score1", "score2", "label"]
    assert table.schema.field("score2").type == pa.float32()
    assert table.column("frame_id").to_pylist() == ids
    assert table.column("chunk_id").to_pylist() == [i[:-2] for i in ids]
    assert "odd_chunk_7" in table.column("contig_id").to_pylist()  # rsplit on the last `_chunk_`
    np.testing.assert_array_equal(np.stack([table.column("score1").to_numpy(), table.column("score2").to_numpy()], 1),
                                  got.astype(np.float32))
    assert table.column("label").to_pylist() == [r[1] for r in rows[1:]]

    # upstream's per-chunk file: one row per chunk that has frames, sorted by chunk id
    hs = read_tsv(out / "prediction_results_highestscore.csv")
    assert hs[0] == ["Modified_ID", "Is_Virus"]
    chunks = sorted({i[:-2] for i in ids})
    assert [r[0] for r in hs[1:]] == chunks
    best = {c: [max(got[k, 0] for k, i in enumerate(ids) if i[:-2] == c),
                max(got[k, 1] for k, i in enumerate(ids) if i[:-2] == c)] for c in chunks}
    assert [r[1] for r in hs[1:]] == [str(best[c][1] >= best[c][0]) for c in chunks]
    assert result.virus_chunks == sum(r[1] == "True" for r in hs[1:])

    assert result.stages == {"preprocess": "computed", "esm2": "computed", "dnabert_s": "computed",
                             "classify": "computed"}
    for family in EMBED_DIRS:  # kept
        assert Manifest.load(out / EMBED_DIRS[family]).complete
    assert not (out / ".work").exists()


def test_contig_table(run1, contigs):
    out, result = run1
    rows = read_tsv(out / "contig_predictions.tsv")
    assert tuple(rows[0]) == CONTIG_COLUMNS
    records = [(rid, seq) for rid, seq in iter_records(contigs)]
    assert [r[0] for r in rows[1:]] == [rid for rid, seq in records if seq]
    frames = read_tsv(out / "prediction_results.txt")[1:]
    chunk_score: dict[str, float] = {}
    for fid, _, _, s2 in frames:
        chunk_score[fid[:-2]] = max(chunk_score.get(fid[:-2], 0.0), float(s2))
    by_contig = {r[0]: r for r in rows[1:]}
    for rid, seq in records:
        row = by_contig[rid]
        n = len(chunk_bounds(len(seq), 500))
        scores = [chunk_score[f"{rid}_chunk_{k}"] for k in range(1, n + 1) if f"{rid}_chunk_{k}" in chunk_score]
        assert int(row[1]) == n and int(row[2]) == len(scores)
        if not scores:
            assert row[3:] == ["0", "NA", "NA", "NA", "unclassified"]
            continue
        mean = sum(scores) / len(scores)
        assert int(row[3]) == sum(s >= 0.5 for s in scores)
        assert float(row[5]) == pytest.approx(mean, abs=1e-6) and float(row[6]) == pytest.approx(max(scores), abs=1e-6)
        assert row[7] == ("virus" if mean >= 0.5 else "others")
    # the examples' no-frame contigs, and one too short to translate (tiny_one, 7 bp, keeps frames)
    unclassified = {r[0] for r in rows[1:] if r[7] == "unclassified"}
    assert {"contig17", "contig18", "contig19", "contig22"} <= unclassified and "tiny_one" not in unclassified
    assert sum(result.contig_labels.values()) == len(rows) - 1 and result.contig_labels["unclassified"] == 4


def test_resume_after_deleting_predictions_reuses_embeddings(run1, tmp_path, upstream_classifier,
                                                             esm_tiny, dnabert_tiny, contigs):
    src, _ = run1
    out = tmp_path / "out"
    shutil.copytree(src, out)
    for name in ("prediction_results.txt", "prediction_results_highestscore.csv", "predictions.parquet",
                 "contig_predictions.tsv"):
        (out / name).unlink()
    result = predict(contigs, out, upstream_classifier, esm_tiny, dnabert_tiny, chunk_size=500,
                     resume=True, device="cpu", toks_per_batch=2048, progress=False)
    assert result.stages == {"preprocess": "reused", "esm2": "reused", "dnabert_s": "reused",
                             "classify": "computed"}
    assert result.embeddings == {}  # no embed job ran
    for name in ("prediction_results.txt", "prediction_results_highestscore.csv", "contig_predictions.tsv"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert pq.read_table(out / "predictions.parquet").equals(pq.read_table(src / "predictions.parquet"))
    assert not (out / "embeddings").exists()  # --keep-embeddings off: removed at the end


def test_resume_finishes_an_interrupted_embedding(run1, tmp_path, upstream_classifier, esm_tiny,
                                                  dnabert_tiny, contigs, local_ray):
    src, _ = run1
    out = tmp_path / "out"
    shutil.copytree(src, out)
    for name in ("prediction_results.txt", "predictions.parquet", "_predict.json"):
        (out / name).unlink()
    esm_dir = out / EMBED_DIRS["esm2"]
    manifest = Manifest.load(esm_dir)
    assert manifest.num_batches >= 2
    (esm_dir / "part-000001.parquet").unlink()  # as if the run died before this batch
    manifest.complete = False
    manifest.done[1] = False
    manifest.save(esm_dir)
    result = predict(contigs, out, upstream_classifier, esm_tiny, dnabert_tiny, chunk_size=500,
                     resume=True, keep_embeddings=True, device="cpu", toks_per_batch=2048, progress=False)
    assert result.stages["dnabert_s"] == "reused"
    assert result.stages["esm2"] == f"resumed (1 of {manifest.num_batches} batches computed)"
    assert result.embeddings["esm2"].batches_computed == 1
    assert (out / "prediction_results.txt").read_bytes() == (src / "prediction_results.txt").read_bytes()
    assert (out / EMBED_DIRS["esm2"] / "part-000001.parquet").is_file()


@pytest.mark.parametrize("where", ["zero", "median", "one"])
def test_threshold_changes_only_the_contig_verdicts(run1, tmp_path, upstream_classifier, esm_tiny,
                                                    dnabert_tiny, contigs, where):
    src, _ = run1
    out = tmp_path / "out"
    shutil.copytree(src, out)
    shutil.rmtree(out / "embeddings")  # a complete run is not recomputed, so they are not needed
    means = sorted(float(r[5]) for r in read_tsv(src / "contig_predictions.tsv")[1:] if r[5] != "NA")
    threshold = {"zero": 0.0, "median": means[len(means) // 2], "one": 1.0}[where]
    result = predict(contigs, out, upstream_classifier, esm_tiny, dnabert_tiny, chunk_size=500,
                     resume=True, threshold=threshold, device="cpu")
    assert result.stages == {"preprocess": "reused", "embed": "skipped", "classify": "reused"}
    for name in ("prediction_results.txt", "prediction_results_highestscore.csv"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    rows = read_tsv(out / "contig_predictions.tsv")[1:]
    labels = {r[0]: r[7] for r in rows if r[7] != "unclassified"}
    assert labels == {r[0]: "virus" if float(r[5]) >= threshold else "others" for r in rows if r[5] != "NA"}
    assert set(labels.values()) == {"zero": {"virus"}, "median": {"virus", "others"}, "one": {"others"}}[where]
    if where == "zero":
        assert all(r[3] == r[2] for r in rows)  # every classified chunk is viral


def test_contig_rule_at_the_threshold():
    maxima = ChunkMaxima()
    ids = ["a_chunk_1F1", "a_chunk_1R2", "a_chunk_2F3", "b_chunk_1F1", "b_chunk_3R1"]
    probs = np.array([[0.875, 0.125], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [0.25, 0.75]], np.float32)
    maxima.update(ids, probs)
    chunks = ["a_chunk_1", "a_chunk_2", "b_chunk_1", "b_chunk_2", "b_chunk_3", "c_chunk_1"]
    rows = {r[0]: r for r in contig_rows(chunks, maxima, threshold=0.625)}
    # a: chunk scores 0.75 (its best frame) and 0.5 -> mean 0.625 >= 0.625 -> virus; 1 viral chunk of 2
    assert rows["a"][:4] == ("a", 2, 2, 1) and rows["a"][4:] == ("0.5000", "0.625000", "0.750000", "virus")
    # b: 0.25 and 0.75 (b_chunk_2 has no frame) -> mean 0.5 -> others, though one chunk passes
    assert rows["b"][:4] == ("b", 3, 2, 1) and rows["b"][-1] == "others"
    assert rows["c"] == ("c", 1, 0, 0, "NA", "NA", "NA", "unclassified")


def _embedding_run(path: Path, ids: list[str], emb: np.ndarray, family: str, parts: list[list[int]]) -> None:
    """An embedding run as the driver writes it: parts holding the given frame indices, a manifest."""
    from virnucpro.io.output import Manifest, write_part

    path.mkdir(parents=True)
    names = {}
    for b, index in enumerate(parts):
        index = np.array(index)
        name, rows = write_part(path, b, [ids[i] for i in index], index, np.full(len(index), 10),
                                np.zeros(len(index), bool), emb[index], family)
        names[name] = rows
    manifest = Manifest(family, family, emb.shape[1], "in", "f", len(ids), len(parts), complete=True)
    for name, rows in names.items():
        manifest.mark_done(int(name[5:11]), rows)
    manifest.save(path)


def test_classification_joins_by_index_without_ray(tmp_path):
    """Stages 3-4 on hand-made embedding runs: rows joined by index whatever the parts' order, scores
    as the MLP gives them, the marker, and an ESM-2 run of other frames refused."""
    from virnucpro.pipeline.classifier import predict_proba
    from virnucpro.pipeline.classify import Classification

    out = tmp_path / "out"
    out.mkdir()
    ids = [f"c{k}_chunk_{j}{f}" for k in (1, 2) for j in (1, 2) for f in ("F1", "R3")]
    (out / "protein.faa").write_text("".join(f">{i}\nMKV\n" for i in ids))
    (out / "chunks.fasta").write_text("".join(f">c{k}_chunk_{j}\nACGT\n" for k in (1, 2, 3) for j in (1, 2)))
    rng = np.random.default_rng(0)
    dna, esm = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 6)).astype(np.float32)
    _embedding_run(out / EMBED_DIRS["dnabert_s"], ids, dna, "dnabert_s", [[5, 0, 7], [1, 2, 3, 4, 6]])
    _embedding_run(out / EMBED_DIRS["esm2"], ids, esm, "esm2", [[3, 2], [7, 6, 5, 4, 1, 0]])
    torch.manual_seed(0)
    model = MLPClassifier(10, 8, 2).eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")
    cls = Classification(out, tmp_path / "m.pth", model, {"dnabert_s": "d", "esm2": "e"}, {"dnabert_s": 4, "esm2": 6})

    probs = cls.classify(len(ids))
    np.testing.assert_allclose(probs, predict_proba(model, np.concatenate([dna, esm], axis=1)), atol=1e-6)
    maxima, virus = cls.write_frame_outputs(probs)
    assert [r[0] for r in read_tsv(out / "prediction_results.txt")[1:]] == ids
    assert virus == int((probs[:, 1] > probs[:, 0]).sum()) and len(maxima) == 4
    assert cls.write_highest_scores(maxima) == sum(v for _, v in maxima.rows())
    labels = cls.write_contig_table(maxima, 0.5)
    assert sum(labels.values()) == 3 and labels.get("unclassified") == 1  # c3 has no frame
    assert not cls.reusable(len(ids))
    cls.save_marker(len(ids))
    assert cls.reusable(len(ids)) and not cls.reusable(len(ids) + 1)

    shutil.rmtree(out / EMBED_DIRS["esm2"])
    _embedding_run(out / EMBED_DIRS["esm2"], ids[::-1], esm, "esm2", [list(range(8))])
    with pytest.raises(PredictError, match="has no DNABERT-S row with the same id"):
        cls.classify(len(ids))


# -----------------------------------------------------------------------------
# errors, and the command line

def test_classifier_dims_must_match_the_models(tmp_path, contigs, esm_tiny, dnabert_tiny):
    torch.save(MLPClassifier().state_dict(), tmp_path / "real_dims.pth")  # 3328 inputs
    with pytest.raises(PredictError, match=r"3328 input features.*gives 48.*gives 64.*48 \+ 64 = 112"):
        predict(contigs, tmp_path / "out", tmp_path / "real_dims.pth", esm_tiny, dnabert_tiny, device="cpu")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_models_must_be_of_the_right_family(tmp_path, contigs, upstream_classifier, esm_tiny, dnabert_tiny):
    with pytest.raises(PredictError, match="--esm-model .* is a DNABERT-S model; --esm-model takes an ESM-2 model"):
        predict(contigs, tmp_path / "out", upstream_classifier, dnabert_tiny, dnabert_tiny, device="cpu")


def test_previous_run_needs_resume_or_overwrite(run1, upstream_classifier, esm_tiny, dnabert_tiny, contigs):
    out, _ = run1
    with pytest.raises(PredictError, match="--resume.*--overwrite"):
        predict(contigs, out, upstream_classifier, esm_tiny, dnabert_tiny, device="cpu")


def test_no_frames_writes_empty_tables_without_ray(tmp_path, upstream_classifier, esm_tiny, dnabert_tiny):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">r1\n" + "AACT" * 200 + "\n>r2\nAC\n")  # stops in all six frames; too short
    classifier = tmp_path / "300_model.pth"  # upstream names its classifiers by chunk size
    shutil.copy(upstream_classifier, classifier)
    result = predict(fasta, tmp_path / "out", classifier, esm_tiny, dnabert_tiny, chunk_size=300,
                     device="cpu", address="ray://nowhere:1")  # would fail if Ray were started
    assert result.frames == 0 and result.stages["embed"].startswith("skipped")
    assert (tmp_path / "out" / "prediction_results.txt").read_text() == "Sequence_ID\tPrediction\tscore1\tscore2\n"
    assert (tmp_path / "out" / "prediction_results_highestscore.csv").read_text() == "Modified_ID\tIs_Virus\n"
    assert pq.read_table(tmp_path / "out" / "predictions.parquet").num_rows == 0
    rows = read_tsv(tmp_path / "out" / "contig_predictions.tsv")
    assert [(r[0], r[1], r[-1]) for r in rows[1:]] == [("r1", "3", "unclassified"), ("r2", "1", "unclassified")]


GPU_LAYOUT_CHECK = textwrap.dedent("""
    import collections, json, ray
    from cluster.pipeline import gpu_layout
    ray.init(address="local", num_cpus=4, num_gpus=3, include_dashboard=False, logging_level="ERROR")  # fake GPUs

    @ray.remote
    class Probe:
        def gpu(self):
            return ray.get_gpu_ids()

    layout, pg = gpu_layout(3, wait_seconds=60)
    actors = []
    for family in ("dnabert_s", "esm2"):  # small model first: without the group, its actors could pack
        o = layout[family]
        assert o["device"] == "cuda"
        for i in range(o["num_actors"]):
            actors.append((family, Probe.options(num_gpus=o["gpus_per_actor"], **o["actor_options"](i)).remote()))
    placed = collections.defaultdict(list)
    for family, a in actors:
        placed[str(ray.get(a.gpu.remote(), timeout=60))].append(family)
    print(json.dumps(placed))
""")


def test_gpu_layout_puts_one_actor_of_each_model_on_every_gpu():
    proc = subprocess.run([sys.executable, "-c", GPU_LAYOUT_CHECK], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    placed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(placed) == 3 and all(sorted(v) == ["dnabert_s", "esm2"] for v in placed.values()), placed


def test_cli_predict(tmp_path, contigs, upstream_classifier, esm_tiny, dnabert_tiny):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cluster.cli", "predict", str(contigs), "-o", str(out), "--chunk-size", "500",
           "--classifier", str(upstream_classifier), "--esm-model", str(esm_tiny), "--dnabert-model",
           str(dnabert_tiny), "--device", "cpu", "--threshold", "0.4", "--toks-per-batch", "2048"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frames classified" in proc.stdout and "contigs:" in proc.stdout
    for name in ("chunks.fasta", "nucleotide.fasta", "protein.faa", "prediction_results.txt",
                 "prediction_results_highestscore.csv", "predictions.parquet", "contig_predictions.tsv"):
        assert (out / name).is_file(), name
    assert not (out / "embeddings").exists()  # no --keep-embeddings
    frames = [fid for fid in fasta_ids(out / "protein.faa")]
    assert pq.read_table(out / "predictions.parquet").column("frame_id").to_pylist() == frames
    # a second run into the same directory is refused with a one-line message
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert again.returncode == 1 and "--resume" in again.stderr and "Traceback" not in again.stderr
