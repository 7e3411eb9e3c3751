"""`virnucpro train`: train VirNucPro's classifier on labelled viral and non-viral sequences.

Stages (OUT_DIR/virus/ and OUT_DIR/others/ are each laid out as a predict run's OUT_DIR):

1. preprocess  each set as `predict` does: chunks of `chunk_size` bases, six-frame translation, every
               stop-free frame kept (virnucpro.pipeline.preprocess).
2. embed       each set's frames with DNABERT-S and ESM-2, both jobs at once, by `predict`'s own code
               (cluster.pipeline's run: the same models, placement, services and resume); one Ray
               session serves both sets. The embeddings are kept: `resume=True` reuses each finished
               stage, so a second training run (other seed, other recipe) embeds nothing.
3. train       [DNABERT-S | ESM-2] per frame (upstream's order), label 1 for virus and 0 for others;
               upstream's recipe (virnucpro.pipeline.fit, virnucpro.options.TrainOptions); GPU when there is one.
4. save        classifier.safetensors (+ classifier.json): weights, widths, chunk size, provenance;
               with `upstream_format`, also <chunk size>_model.pth as upstream's train.py writes it;
               metrics.json: the validation metrics, the epochs, the provenance.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import virnucpro
from virnucpro.pipeline.classifier import classifier_record, save_classifier, save_upstream_classifier
from virnucpro.models import DNABERT_S_FAMILY, ESM2_FAMILY
from virnucpro.io.storage import InputFile, is_uri, resolve
from virnucpro.options import PIPELINE_EMBED_OPTIONS, TrainOptions
from virnucpro.pipeline.classify import EMBED_DIRS, PredictError, prepare_out_dir
from virnucpro.pipeline.fit import FEATURE_ORDER, FitResult, fit, format_metrics, labelled, set_features

from .driver import EmbedOptions
from .pipeline import PipelineRun, services_cluster
from .session import RaySession, local_dashboard

log = logging.getLogger("virnucpro")

SETS = ("virus", "others")  # OUT_DIR/<set>/: a predict-style OUT_DIR of each labelled set
CLASSIFIER = "classifier.safetensors"
CLASSIFIER_JSON = "classifier.json"
METRICS_JSON = "metrics.json"


def upstream_name(chunk_size: int) -> str:
    """Upstream's name for a classifier of this chunk size, which `predict` reads the size from."""
    return f"{chunk_size}_model.pth"


@dataclass
class TrainResult:
    out_dir: Path
    classifier: Path  # classifier.safetensors
    upstream_classifier: Path | None  # <chunk size>_model.pth, with upstream_format
    metrics: dict  # validation metrics of the kept epoch, and its loss
    frames: dict[str, int]  # set -> frames
    best_epoch: int
    epochs: int
    stages: dict[str, str] = field(default_factory=dict)  # "<set> <stage>" -> computed / reused / ...
    seconds: float = 0.0

    def summary(self) -> str:
        sets = ", ".join(f"{n} {s}" for s, n in self.frames.items())
        reused = sorted({k for k, v in self.stages.items() if v == "reused"})
        return (f"trained on {sets} frames; best epoch {self.best_epoch} of {self.epochs}; validation: "
                f"{format_metrics(self.metrics)}{'; reused: ' + ', '.join(reused) if reused else ''}; "
                f"{self.seconds:.1f} s -> {self.classifier}")


class TrainingSetRun(PipelineRun):
    """predict's stages 1 and 2 for one labelled set: its checks, preprocessing and embedding; no classifier."""

    def _classification(self) -> None:
        return None

    def preprocess_and_embed(self) -> int:
        """Both stages (each reused when finished and resuming); returns the set's frames."""
        prepare_out_dir(self.out, self.opts.resume, self.opts.overwrite)
        pre = self._preprocess()
        if pre["frames"] == 0:
            raise PredictError(f"{self.input}: no chunk of {self.chunk_size} bases has a frame without a stop "
                               f"codon, so there is nothing to train on")
        self._embed(pre, reuse_complete=self.stages["preprocess"] == "reused")
        return pre["frames"]


def train(virus: str | Path, others: str | Path, out_dir: str | Path, esm_model: str | Path | None = None,
          dnabert_model: str | Path | None = None, *, chunk_size: int, chunking: str = "compat",
          esm_service: str | None = None, dnabert_service: str | None = None, workers: int | None = None,
          **options) -> TrainResult:
    """Train a VirNucPro classifier for `chunk_size` on the contigs of `virus` and `others` (FASTA) into
    `out_dir` (the API of `virnucpro train`).

    Models and services as `cluster.pipeline.predict`. Other options are `TrainOptions` fields (epochs,
    patience, batch_size, lr, ..., seed, train_device, upstream_format) and `EmbedOptions` fields
    (device, dtype, num_actors, toks_per_batch, resume, overwrite, ...) for the embedding.
    """
    start = time.perf_counter()
    train_names = {f.name for f in fields(TrainOptions)}
    embed_names = set(PIPELINE_EMBED_OPTIONS)
    unknown = set(options) - train_names - embed_names
    if unknown:
        raise TypeError(f"train() got unexpected option(s): {', '.join(sorted(unknown))}")
    topts = TrainOptions(**{k: v for k, v in options.items() if k in train_names})
    eopts = EmbedOptions(**{k: v for k, v in options.items() if k in embed_names})
    out = Path(out_dir)
    inputs = {"virus": str(virus), "others": str(others)}  # local paths or URIs
    if resolve(inputs["virus"])[1] == resolve(inputs["others"])[1] and is_uri(virus) == is_uri(others):
        raise PredictError(f"{virus}: given as both --virus and --others")
    models = {ESM2_FAMILY: esm_model, DNABERT_S_FAMILY: dnabert_model}
    services = {f: n for f, n in ((ESM2_FAMILY, esm_service), (DNABERT_S_FAMILY, dnabert_service)) if n}
    with services_cluster(eopts.address) if services else nullcontext():
        # every check (inputs, chunk size, models, services) before anything is written
        runs = {s: TrainingSetRun(inputs[s], out / s, None, models, services, chunk_size, chunking, 0.5, True, workers,
                           eopts) for s in SETS}
        _prepare_top(out, eopts.resume, eopts.overwrite, chunk_size)
        session = RaySession(eopts.address, eopts.dashboard_host,  # one session for both sets
                             local_dashboard(eopts.dashboard, *inputs.values()))
        try:
            session.wait()
            frames = {s: run.preprocess_and_embed() for s, run in runs.items()}
        finally:
            session.close()
    stages = {f"{s} {k}": v for s, run in runs.items() for k, v in run.stages.items()}

    features = {s: set_features({f: out / s / EMBED_DIRS[f] for f in FEATURE_ORDER})[1] for s in SETS}
    x, y = labelled(features["virus"], features["others"])
    del features
    log.info("training on %d virus and %d others frames, %d features each", frames["virus"], frames["others"],
             x.shape[1])
    result = fit(x, y, topts, on_epoch=_log_epoch(topts.epochs))
    log.info("kept epoch %d of %d%s", result.best_epoch, result.epochs,
             " (early stopping)" if result.stopped_early else "")

    provenance = _provenance(runs["virus"], inputs, frames, topts, result)
    save_classifier(result.model, out / CLASSIFIER, classifier_record(result.model, chunk_size, **provenance))
    upstream = None
    if topts.upstream_format:
        upstream = out / upstream_name(chunk_size)
        save_upstream_classifier(result.model, upstream)
    report = {**result.report(), **provenance, "classifier": CLASSIFIER,
              "upstream_classifier": upstream and upstream.name, "stages": stages}
    (out / METRICS_JSON).write_text(json.dumps(report, indent=1) + "\n")
    res = TrainResult(out, out / CLASSIFIER, upstream, result.metrics, frames, result.best_epoch, result.epochs,
                      stages, time.perf_counter() - start)
    log.info("done: %s", res.summary())
    return res


def _top_files(out: Path, chunk_size: int) -> list[Path]:
    return [out / n for n in (CLASSIFIER, CLASSIFIER_JSON, METRICS_JSON, upstream_name(chunk_size))]


def _prepare_top(out: Path, resume: bool, overwrite: bool, chunk_size: int) -> None:
    """OUT_DIR's own files: a previous run's are replaced with --resume or --overwrite, else an error.
    (Each set's directory is checked the same way by predict's `prepare_out_dir`.)"""
    out.mkdir(parents=True, exist_ok=True)
    previous = [p for p in _top_files(out, chunk_size) if p.exists()]
    if previous and not (resume or overwrite):
        raise PredictError(f"{out}: holds the output of a previous run ({previous[0].name}); use --resume to reuse "
                           f"its embeddings or --overwrite to replace it")
    if overwrite:
        for p in previous:
            p.unlink()


def _log_epoch(epochs: int):
    def log_row(row: dict) -> None:
        log.info("epoch %d/%d: train loss %.4f, validation loss %.4f, accuracy %.4f, ROC AUC %s", row["epoch"],
                 epochs, row["train_loss"], row["val_loss"], row["val_accuracy"],
                 "n/a" if row["val_roc_auc"] is None else f"{row['val_roc_auc']:.4f}")
    return log_row


def _provenance(first: TrainingSetRun, inputs: dict[str, str], frames: dict[str, int], topts: TrainOptions,
                result: FitResult) -> dict:
    """Where the classifier came from: models, data, recipe, result (classifier.json and metrics.json)."""
    data = {}
    for s, path in inputs.items():
        source = InputFile.open(path)
        data[s] = {"path": source.uri, "bytes": source.size, "mtime_ns": source.mtime_ns, "frames": frames[s],
                   "label": int(s == "virus")}
    return {
        "chunking": first.chunking,
        "features": [{"family": f, "model": first.sources[f].name, "dim": first.dims[f]} for f in FEATURE_ORDER],
        "training": {"data": data, "recipe": {k: v for k, v in asdict(topts).items() if k != "upstream_format"},
                     "validation": result.metrics, "best_epoch": result.best_epoch, "epochs": result.epochs,
                     "device": result.device},
        "software": {"virnucpro": virnucpro.__version__, "torch": torch.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


__all__ = ["train", "TrainResult", "CLASSIFIER", "METRICS_JSON", "upstream_name"]
