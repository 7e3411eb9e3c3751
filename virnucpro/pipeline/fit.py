"""Training VirNucPro's classifier, without Ray: the labelled features, upstream's recipe, the metrics.

`cluster.training` preprocesses and embeds the two labelled sets as `predict` does (OUT_DIR/virus/ and
OUT_DIR/others/, each laid out as a predict run's OUT_DIR) and then calls this module:

  * `set_features`: one set's frames as [DNABERT-S | ESM-2] rows (upstream's order, 768 + 2560 =
    3328 for the real models), joined by frame index and checked by id, as `predict` joins them;
  * `fit`: upstream train.py's recipe (`virnucpro.options.TrainOptions` holds its numbers): a seeded
    random 90/10 split of the frames, the MLP with Xavier-uniform weights, cross-entropy, SGD
    (lr 2e-4, momentum 0.9) in batches of 32, StepLR (step 10, gamma 0.85) per epoch, early
    stopping after 5 epochs without a lower validation loss, at most 200 epochs;
  * `binary_metrics`: accuracy, precision, recall, F1 (virus is the positive class) and ROC AUC
    (rank formula, ties averaged), as upstream reports them with sklearn.

Where this differs from upstream's train.py, on purpose:
  * the weights kept are the best epoch's. Upstream's early stopping keeps `model.state_dict()`,
    whose tensors are the live parameters, so it restores (and saves) the last epoch's weights;
    and a run that reaches 200 epochs saves nothing. Here the best epoch's weights are copied,
    restored and saved, and the metrics reported are that epoch's.
  * the validation loss is the mean over frames (upstream: the mean of per-batch means).
  * a last training batch of a single frame is skipped (BatchNorm cannot train on one row;
    upstream's loader stops with an error there).
  * training frames are every stop-free frame of each chunk, as `predict` classifies them. Upstream's
    data scripts keep only frames found in a RefSeq protein of the genome's annotation, and drop
    chunks holding IUPAC codes; that needs GenBank annotation, which a FASTA does not have.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from virnucpro.pipeline.classifier import HIDDEN_DIM, NUM_CLASSES, MLPClassifier
from virnucpro.models import DNABERT_S_FAMILY, ESM2_FAMILY
from virnucpro.options import TrainOptions
from virnucpro.io.output import read_embeddings
from virnucpro.errors import OptionError, PredictError

log = logging.getLogger("virnucpro")

FEATURE_ORDER = (DNABERT_S_FAMILY, ESM2_FAMILY)  # upstream's merge: DNABERT-S first
METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")


# -----------------------------------------------------------------------------
# features

def set_features(embed_dirs: dict[str, Path]) -> tuple[list[str], np.ndarray]:
    """(frame ids, features [n, dna + esm] float32) of one set's two complete embedding runs.

    Rows are matched by `index` (the frame's record ordinal, the same in nucleotide.fasta and
    protein.faa) and each match is checked by id, as predict's join does.
    """
    tables = {f: read_embeddings(embed_dirs[f]) for f in FEATURE_ORDER}  # each sorted by index
    dna, esm = (tables[f] for f in FEATURE_ORDER)
    ids = dna.column("id").to_pylist()
    if dna.num_rows != esm.num_rows or ids != esm.column("id").to_pylist() or not np.array_equal(
            dna.column("index").to_numpy(), esm.column("index").to_numpy()):
        raise PredictError(f"{embed_dirs[DNABERT_S_FAMILY]} and {embed_dirs[ESM2_FAMILY]}: the two embedding "
                         f"runs hold different frames ({dna.num_rows} and {esm.num_rows} rows)")
    blocks = [np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32, copy=False)
              if t.num_rows else np.zeros((0, 0), np.float32) for t in (dna, esm)]
    return ids, np.concatenate(blocks, axis=1)


def labelled(virus: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets' features stacked, virus first, and their labels (1 = virus, 0 = others)."""
    if virus.shape[1] != others.shape[1]:
        raise PredictError(f"the sets' features differ in width: virus {virus.shape[1]}, others {others.shape[1]}")
    y = np.concatenate([np.ones(len(virus), np.int64), np.zeros(len(others), np.int64)])
    return np.concatenate([virus, others]), y


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices: a seeded random permutation, the first floor(n * val_fraction)
    rows for validation, as upstream's `int(total * 0.1)` after a shuffle."""
    order = np.random.default_rng(seed).permutation(n)
    k = int(n * val_fraction)
    return order[k:], order[:k]


# -----------------------------------------------------------------------------
# metrics

def roc_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve by the rank (Mann-Whitney U) formula, tied scores given their mean
    rank; None when one class is absent (sklearn raises there)."""
    y, score = np.asarray(y).astype(bool), np.asarray(score, np.float64)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score))
    # each run of equal scores [start, end) gets the mean of ranks start+1 .. end
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(score)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def binary_metrics(y: np.ndarray, prob_virus: np.ndarray, predicted: np.ndarray) -> dict[str, float | None]:
    """accuracy, precision, recall, F1 (virus = positive; 0 where undefined, as sklearn's default)
    and ROC AUC of `prob_virus` (None with one class only)."""
    y, predicted = np.asarray(y).astype(bool), np.asarray(predicted).astype(bool)
    tp = int((y & predicted).sum())
    precision = tp / int(predicted.sum()) if predicted.any() else 0.0
    recall = tp / int(y.sum()) if y.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = float((y == predicted).mean()) if len(y) else 0.0
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1,
            "roc_auc": roc_auc(y, prob_virus)}


# -----------------------------------------------------------------------------
# the training loop

class EarlyStopping:
    """Stop after `patience` epochs in a row without a validation loss below the best so far; keeps
    a copy of the best epoch's weights (not the live tensors: see the module's notes)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    def __call__(self, epoch: int, loss: float, model: nn.Module) -> bool:
        """Record epoch `epoch`'s validation loss; True when training should stop."""
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience


@dataclass
class FitResult:
    model: MLPClassifier  # the best epoch's weights, in eval mode, on the CPU
    metrics: dict[str, float | None]  # validation metrics of the best epoch, and its `loss`
    best_epoch: int
    epochs: int  # epochs run
    stopped_early: bool
    train_frames: int
    val_frames: int
    device: str
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val loss and metrics, lr

    def report(self) -> dict:
        """What metrics.json holds besides the provenance."""
        return {"validation": self.metrics, "best_epoch": self.best_epoch, "epochs": self.epochs,
                "stopped_early": self.stopped_early, "train_frames": self.train_frames,
                "val_frames": self.val_frames, "device": self.device, "history": self.history}


def new_classifier(input_dim: int, seed: int) -> MLPClassifier:
    """The MLP as upstream's train.py builds it: Xavier-uniform weights of both linear layers
    (biases as torch initialises them), drawn from `seed`."""
    torch.manual_seed(seed)
    model = MLPClassifier(input_dim, HIDDEN_DIM, NUM_CLASSES)
    nn.init.xavier_uniform_(model.hidden_layer.weight)
    nn.init.xavier_uniform_(model.output_layer.weight)
    return model


def train_device(choice: str) -> torch.device:
    """`TrainOptions.train_device` as a torch device (auto: a GPU when there is one)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise OptionError("--train-device cuda: no CUDA GPU is visible")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> dict:
    """Validation loss (mean over rows) and `binary_metrics`, in eval mode (BatchNorm's running
    statistics, no dropout); a row is virus when its virus logit is the larger (ties: others, as
    torch.max's first index)."""
    model.eval()
    device = next(model.parameters()).device
    logits = torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
    loss = F.cross_entropy(logits, y).item()
    prob = F.softmax(logits, dim=1)[:, 1].numpy()
    predicted = (logits[:, 1] > logits[:, 0]).numpy()
    return {"loss": loss, **binary_metrics(y.numpy(), prob, predicted)}


def _train_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                 batch_size: int, gen: torch.Generator) -> float:
    """One pass over the training rows in a shuffled order; mean loss over batches (upstream's figure)."""
    model.train()
    device = next(model.parameters()).device
    order = torch.randperm(len(x), generator=gen)
    losses = []
    for i in range(0, len(x), batch_size):
        rows = order[i:i + batch_size]
        if len(rows) < 2:  # BatchNorm cannot normalise one row
            continue
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[rows].to(device, non_blocking=True)), y[rows].to(device))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else math.nan


def fit(x: np.ndarray, y: np.ndarray, opts: TrainOptions,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train the MLP on features `x` [n, d] and labels `y` (1 = virus) with upstream's recipe (`opts`).

    Seeded by `opts.seed`: the split, the initial weights, dropout and the batch order (on a GPU,
    cuBLAS may still vary in the last bits). `on_epoch` gets each epoch's history row.
    """
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
    train_idx, val_idx = split(len(x), opts.val_fraction, opts.seed)
    if len(val_idx) == 0 or len(train_idx) < 2:
        raise PredictError(f"{len(x)} frames are too few to hold out {opts.val_fraction:g} for validation "
                         f"and train on the rest")
    device = train_device(opts.train_device)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    x_train, y_train, x_val, y_val = xt[train_idx], yt[train_idx], xt[val_idx], yt[val_idx]
    if device.type == "cuda":
        x_train, y_train = x_train.to(device), y_train.to(device)  # batches are then gathered on the GPU
    model = new_classifier(x.shape[1], opts.seed).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=opts.lr_step, gamma=opts.lr_gamma)
    gen = torch.Generator().manual_seed(opts.seed)
    stop = EarlyStopping(opts.patience)
    history: list[dict] = []
    stopped = False
    for epoch in range(1, opts.epochs + 1):
        lr = opt.param_groups[0]["lr"]
        train_loss = _train_epoch(model, x_train, y_train, opt, opts.batch_size, gen)
        val = evaluate(model, x_val, y_val)
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()}})
        if on_epoch:
            on_epoch(history[-1])
        if stop(epoch, val["loss"], model):
            stopped = True
            break
        sched.step()
    if stop.best_state is not None:
        model.load_state_dict(stop.best_state)
    best = history[stop.best_epoch - 1] if stop.best_epoch else history[-1]
    metrics = {"loss": best["val_loss"], **{k: best[f"val_{k}"] for k in METRICS}}
    return FitResult(model.cpu().eval(), metrics, best["epoch"], len(history), stopped, len(train_idx),
                     len(val_idx), str(device), history)


def format_metrics(metrics: dict) -> str:
    """`accuracy 0.9712, precision ...` for the summary line."""
    return ", ".join(f"{k} {metrics[k]:.4f}" if metrics.get(k) is not None else f"{k} n/a" for k in METRICS)


__all__ = ["set_features", "labelled", "split", "roc_auc", "binary_metrics", "EarlyStopping", "FitResult",
           "new_classifier", "evaluate", "fit", "format_metrics", "FEATURE_ORDER", "METRICS"]
