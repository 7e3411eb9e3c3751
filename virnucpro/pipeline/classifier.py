"""VirNucPro's classifier: the MLP over [DNABERT-S 768 | ESM-2 2560] features, its safe loader and
savers, batched inference, and the two result files in upstream's exact formats.

Upstream (github.com/Li-Jing-1997/VirNucPro, `train.py` / `prediction.py`) ships `300_model.pth` and
`500_model.pth` written by `torch.save(model)`: a whole pickled module whose class lived in
`__main__`. Unpickling such a file normally imports and calls whatever globals it names, so
`load_classifier` uses a restricted unpickler that resolves only an explicit allow-list.

`virnucpro train` saves a classifier as safetensors (tensors only, nothing to unpickle) whose header
holds a small JSON record: the layer widths, the chunk size it was trained for and where it came
from (`save_classifier`; the same record is written beside it as `<name>.json` for people).
`save_upstream_classifier` writes upstream's pickled form, for upstream's own prediction.py.
`classifier_chunk_size` says which chunk size a file was trained for, when the file says so.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import copy
import csv
import json
import os
import pickle
import re
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from virnucpro.pipeline.ids import chunk_of
from virnucpro.io.storage import atomic_write
from virnucpro.errors import ClassifierError  # noqa: F401 - also imported from here

INPUT_DIM = 3328  # 768 DNABERT-S + 2560 ESM-2 (esm2_t36_3B_UR50D)
HIDDEN_DIM = 512
NUM_CLASSES = 2  # 0 = others, 1 = virus
LABELS = ("others", "virus")


ClassifierLoadError = ClassifierError  # (the name this module's callers know)


class MLPClassifier(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Dropout(0.5) -> Linear, as upstream's `MLPClassifier`.

    Attribute names (hence state_dict keys `hidden_layer.*`, `bn1.*`, `output_layer.*`) and the
    constructor's argument names are upstream's, so its weights load unchanged.
    """

    def __init__(self, input_dim: int = INPUT_DIM, hidden_dim: int = HIDDEN_DIM,
                 num_class: int = NUM_CLASSES):
        super().__init__()
        self.hidden_layer = nn.Linear(input_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, num_class)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.hidden_layer(x)))
        return self.output_layer(self.dropout(x))


# -----------------------------------------------------------------------------
# restricted loading

class _PickledClassifier(nn.Module):
    """Stand-in for upstream's pickled `__main__.MLPClassifier`.

    Unpickling builds it with `__new__` and `Module.__setstate__` (no code of ours or theirs runs);
    we only read its tensors and load them into a fresh `MLPClassifier`, so nothing that came out
    of the file is handed back to the caller as live code.
    """


# Where upstream's class may be recorded: scripts run as `python train.py` pickle it as
# `__main__`; imported, as the script's module name. Our own class is accepted too.
_CLASSIFIER_NAMES = [(m, "MLPClassifier") for m in ("__main__", "train", "prediction", __name__)]


def _numpy_scalar_globals() -> dict[tuple[str, str], Any]:
    # training checkpoints often carry numpy scalars (an epoch's accuracy, ...): numpy's scalar
    # rebuild function and dtype only build plain values. numpy 1 pickles name numpy.core,
    # numpy 2 numpy._core; both map to whichever this numpy has.
    multiarray = getattr(np, "_core", None) or np.core
    scalar = multiarray.multiarray.scalar
    # protocol 2 pickles a scalar's raw bytes as _codecs.encode(text, "latin1")
    return {("numpy.core.multiarray", "scalar"): scalar, ("numpy._core.multiarray", "scalar"): scalar,
            ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Every global a torch.save'd MLPClassifier or state dict needs, and nothing else.

    Storage classes (`torch.FloatStorage`, `torch.LongStorage`, ...) do not come through here:
    torch.load's own find_class wrapper maps any name containing "Storage" to a dtype marker.
    """
    objs: list[Any] = [
        OrderedDict, set, frozenset,  # module hook dicts, `_non_persistent_buffers_set`
        torch.Size,
        torch._utils._rebuild_tensor, torch._utils._rebuild_tensor_v2,
        torch._utils._rebuild_parameter,
        nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Sequential,
    ]
    # present in newer torch only; looked up by name so that torch 2.4 imports this file too
    for name in ("_rebuild_tensor_v3", "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            objs.append(getattr(torch._utils, name))
    allowed = {(o.__module__, o.__qualname__): o for o in objs}
    allowed.update({key: _PickledClassifier for key in _CLASSIFIER_NAMES})
    allowed.update(_numpy_scalar_globals())
    return allowed


_ALLOWED = _allowed_globals()


def _normalise(module: str, name: str) -> tuple[str, str]:
    # protocol-2 pickles (torch.save's default) name Python 2 modules, e.g. `__builtin__ set`
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals from `_ALLOWED` only; never imports anything."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get(_normalise(module, name))
        if obj is None:
            raise ClassifierLoadError(
                f"refusing to unpickle global {module}.{name}: a VirNucPro classifier file holds "
                "only torch tensors, torch.nn layers, numpy scalars and the MLPClassifier class")
        return obj


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# Passed to torch.load as `pickle_module`. Why not weights_only=True with safe_globals? Mapping a
# pickled `__main__.MLPClassifier` onto another class needs the (obj, "module.name") form of
# safe_globals, which torch 2.4 lacks, and the weights-only unpickler's rules change between
# releases. torch.load has long taken a `pickle_module` and subclassed its Unpickler, adding only
# storage handling (checked in 2.13's source), so this works the same on torch 2.4 .. 2.13. It
# needs weights_only=False, which is safe here: our find_class is the only way a global resolves.
# (TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes torch refuse a custom pickle_module; that surfaces as a
# ClassifierLoadError.)
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="virnucpro.pipeline.classifier._restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=_restricted_load,
)


def _is_torchscript(path: str | os.PathLike) -> bool:
    # torch.load hands TorchScript archives to torch.jit.load, bypassing our unpickler
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def _load_object(path: str | os.PathLike) -> Any:
    if str(path).endswith(SAFETENSORS_SUFFIX):
        try:  # tensors and a JSON header only: nothing is unpickled
            return safetensors.torch.load_file(path, device="cpu")
        except (OSError, safetensors.SafetensorError) as e:
            raise ClassifierLoadError(f"{path}: cannot read classifier file: {e}") from e
    if _is_torchscript(path):
        raise ClassifierLoadError(f"{path}: TorchScript archives are not accepted")
    try:
        with warnings.catch_warnings():
            # legacy-format files carry the class's source; ours differs from upstream's by design
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            return torch.load(path, map_location="cpu", pickle_module=_RESTRICTED_PICKLE,
                              weights_only=False)
    except ClassifierLoadError as e:
        raise ClassifierLoadError(f"{path}: {e}") from None
    except (OSError, EOFError) as e:
        raise ClassifierLoadError(f"{path}: cannot read classifier file: {e}") from e
    except Exception as e:  # corrupt pickle, a forced weights-only load, ...
        raise ClassifierLoadError(f"{path}: cannot load classifier file: {e}") from e


def _module_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """state_dict of an unpickled module, read from its attribute dicts.

    module.state_dict() would run the state-dict hooks stored in the pickle; walking `_parameters`,
    `_buffers` and `_modules` directly runs nothing from the file.
    """
    attrs = vars(module)
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, t in dict(attrs.get(group) or {}).items():
            if isinstance(t, torch.Tensor):
                out[prefix + name] = t
    for name, child in dict(attrs.get("_modules") or {}).items():
        if isinstance(child, nn.Module):
            out.update(_module_tensors(child, f"{prefix}{name}."))
    return out


def _state_dict_of(obj: Any, path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return _module_tensors(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    raise ClassifierLoadError(
        f"{path}: expected a pickled MLPClassifier, a state dict, or a dict with a 'state_dict' / "
        f"'model_state_dict' entry; found {type(obj).__name__}")


def load_classifier(path: str | os.PathLike) -> MLPClassifier:
    """Load upstream's `300_model.pth` / `500_model.pth`, a state dict, or a `.safetensors` file of
    `save_classifier`, as an MLPClassifier in eval mode.

    Layer sizes are read from the weights. Raises ClassifierLoadError for a file holding any other
    global, any other structure, or weights that do not fit the MLP.
    """
    state = dict(_state_dict_of(_load_object(path), path))
    if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        hidden, input_dim = state["hidden_layer.weight"].shape
        num_class = state["output_layer.weight"].shape[0]
        model = MLPClassifier(input_dim, hidden, num_class)
        model.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ClassifierLoadError(f"{path}: weights do not fit VirNucPro's MLPClassifier: {e}") from e
    return model.eval()


# -----------------------------------------------------------------------------
# saving, and what a file says it was trained for

SAFETENSORS_SUFFIX = ".safetensors"
METADATA_FORMAT = "virnucpro-classifier"
_METADATA_KEY = "virnucpro"  # the safetensors header entry holding the JSON record
_UPSTREAM_NAME = re.compile(r"(\d+)_model\.pth?")  # upstream's 300_model.pth, 500_model.pth


def classifier_record(model: MLPClassifier, chunk_size: int, **extra: Any) -> dict:
    """The JSON record saved with a classifier: format, layer widths, labels, chunk size, and `extra`
    (provenance: models, training data, recipe, metrics)."""
    return {"format": METADATA_FORMAT, "version": 1, "input_dim": model.hidden_layer.in_features,
            "hidden_dim": model.hidden_layer.out_features, "num_classes": model.output_layer.out_features,
            "labels": list(LABELS), "chunk_size": int(chunk_size), **extra}


def save_classifier(model: MLPClassifier, path: str | os.PathLike, record: dict) -> None:
    """Write `model` as safetensors at `path` (which must end in .safetensors), `record` (see
    `classifier_record`) in its header, and the same record as `<path minus suffix>.json`.

    The header copy is the one `classifier_metadata` reads, so the file alone says what it is; the
    JSON beside it is for people and tools that do not read safetensors headers.
    """
    path = os.fspath(path)
    if not path.endswith(SAFETENSORS_SUFFIX):
        raise ValueError(f"{path}: a safe classifier file must end in {SAFETENSORS_SUFFIX}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    text = json.dumps(record, indent=1)
    # the bytes, written as every other output is (atomically, permissions from the umask): safetensors'
    # own save_file creates its file readable by its owner alone
    data = safetensors.torch.save(state, metadata={_METADATA_KEY: text})
    atomic_write(path, lambda f: f.write(data))
    with open(path[:-len(SAFETENSORS_SUFFIX)] + ".json", "w", encoding="utf-8") as f:
        f.write(text + "\n")


def save_upstream_classifier(model: MLPClassifier, path: str | os.PathLike) -> None:
    """Write `model` as upstream's train.py does: `torch.save` of the whole module, pickled as
    `__main__.MLPClassifier`, which upstream's prediction.py (defining that class in its `__main__`)
    loads with a plain `torch.load`; `load_classifier` loads it too.

    Pickle records a class by the module and name it is found under, and checks that this lookup
    gives the same class; so a subclass named `__main__.MLPClassifier` is put in `__main__` for the
    duration of the save (the previous attribute, if any, is restored).
    """
    upstream_class = type("MLPClassifier", (MLPClassifier,), {"__module__": "__main__"})
    clone = copy.deepcopy(model).cpu().eval()
    clone.__class__ = upstream_class
    main = sys.modules["__main__"]
    previous = vars(main).get("MLPClassifier", upstream_class)
    main.MLPClassifier = upstream_class
    try:
        torch.save(clone, path)
    finally:
        if previous is upstream_class:
            del main.MLPClassifier
        else:
            main.MLPClassifier = previous


def classifier_metadata(path: str | os.PathLike) -> dict:
    """The record in a `.safetensors` classifier's header ({} when there is none, or for a pickle)."""
    if not os.fspath(path).endswith(SAFETENSORS_SUFFIX):
        return {}
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(_METADATA_KEY)
    except (OSError, safetensors.SafetensorError) as e:
        raise ClassifierLoadError(f"{path}: cannot read classifier file: {e}") from e
    try:
        record = json.loads(text) if text else {}
    except ValueError as e:
        raise ClassifierLoadError(f"{path}: the header's {_METADATA_KEY} record is not JSON: {e}") from e
    return record if isinstance(record, dict) else {}


def classifier_chunk_size(path: str | os.PathLike) -> int | None:
    """The chunk size a classifier file was trained for, when it says: a safetensors header's
    `chunk_size`, or upstream's file name `<N>_model.pth`; else None."""
    size = classifier_metadata(path).get("chunk_size")
    if size is None:
        m = _UPSTREAM_NAME.fullmatch(os.path.basename(path))
        size = m and m.group(1)
    return int(size) if size is not None else None


# -----------------------------------------------------------------------------
# inference

@torch.inference_mode()
def predict_proba(model: nn.Module, features: np.ndarray | torch.Tensor,
                  batch_size: int = 65536) -> np.ndarray:
    """Softmax class probabilities, float32 [N, 2]: column 0 = others, column 1 = virus.

    Puts the model in eval mode (BatchNorm running statistics, no dropout), as upstream's predict
    does. Features go to the model's device in batches of `batch_size` rows.
    """
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D [N, dim], got shape {tuple(x.shape)}")
    model.eval()
    param = next(model.parameters())
    chunks = [F.softmax(model(x[i:i + batch_size].to(param.device, param.dtype)), dim=1)
              .float().cpu() for i in range(0, x.shape[0], batch_size)]
    if not chunks:
        return np.empty((0, NUM_CLASSES), dtype=np.float32)
    return torch.cat(chunks).numpy()


# -----------------------------------------------------------------------------
# result files

def _float32_columns(probs: np.ndarray | torch.Tensor, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if p.ndim != 2 or p.shape[1] != NUM_CLASSES or p.shape[0] != n_ids:
        raise ValueError(f"probs must be [{n_ids}, {NUM_CLASSES}], got shape {p.shape}")
    p = p.astype(np.float32, copy=False)  # upstream's softmax output is float32
    return p[:, 0], p[:, 1]


PREDICTION_HEADER = "Sequence_ID\tPrediction\tscore1\tscore2\n"
HIGHEST_SCORE_HEADER = ("Modified_ID", "Is_Virus")


def prediction_lines(ids: Sequence[str], probs: np.ndarray | torch.Tensor) -> str:
    """Rows of `prediction_results.txt` (no header) for a batch of frames, as one string.

    Scores are written as str() of numpy float32 (shortest round-trip digits, e.g. `0.1`, `1e-05`),
    as upstream's `'\\t'.join(map(str, probability))` does. Prediction is `virus` only if
    score2 > score1: upstream takes torch.max's index, which is the first (others) on a tie.
    """
    others, virus = _float32_columns(probs, len(ids))
    return "".join([f"{seq_id}\t{LABELS[int(p1 > p0)]}\t{str(p0)}\t{str(p1)}\n"
                    for seq_id, p0, p1 in zip(ids, others, virus)])


def write_prediction_results(path: str | os.PathLike, ids: Sequence[str],
                             probs: np.ndarray | torch.Tensor) -> None:
    """`prediction_results.txt`: `Sequence_ID, Prediction, score1, score2`, tab-separated.

    One row per frame in the given order; see `prediction_lines` for the number format.
    """
    lines = prediction_lines(ids, probs)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(PREDICTION_HEADER)
        f.write(lines)


class ChunkMaxima:
    """Per chunk (`virnucpro.pipeline.ids.chunk_of` a frame id), the maxima of score1 and of score2.

    Fed frame batches in any order (`update`); `rows()` gives upstream's `Is_Virus` per chunk:
    max score2 >= max score1. Memory: one entry per chunk that has frames.
    """

    def __init__(self) -> None:
        self._best: dict[str, list] = {}

    def update(self, ids: Sequence[str], probs: np.ndarray | torch.Tensor) -> None:
        others, virus = _float32_columns(probs, len(ids))
        best = self._best
        for seq_id, p0, p1 in zip(ids, others, virus):
            chunk = chunk_of(seq_id)
            m = best.get(chunk)
            if m is None:
                best[chunk] = [p0, p1]
            else:
                m[0], m[1] = max(m[0], p0), max(m[1], p1)

    def maxima(self, chunk_id: str) -> tuple[float, float] | None:
        """(max score1, max score2) of a chunk, or None when it had no frame."""
        m = self._best.get(chunk_id)
        return None if m is None else (m[0], m[1])

    def __len__(self) -> int:
        return len(self._best)

    def rows(self) -> list[tuple[str, bool]]:
        """(chunk id, Is_Virus), sorted by chunk id.

        Upstream re-reads prediction_results.txt with pandas and groups by the chunk id; groupby
        sorts its keys, so rows come in lexicographic order, not input order. Comparing float32
        values here orders exactly as comparing the float64 values pandas parses back from their
        shortest repr.
        """
        return [(chunk, bool(m[1] >= m[0])) for chunk, m in sorted(self._best.items())]


def highest_scores(ids: Sequence[str], probs: np.ndarray | torch.Tensor) -> list[tuple[str, bool]]:
    """Per chunk (`virnucpro.pipeline.ids.chunk_of` a frame id): max score2 >= max score1, sorted by id."""
    maxima = ChunkMaxima()
    maxima.update(ids, probs)
    return maxima.rows()


def write_highest_score_rows(path: str | os.PathLike, rows: Iterable[tuple[str, bool]]) -> None:
    """Write `(chunk id, Is_Virus)` rows as upstream's `prediction_results_highestscore.csv`.

    Tab-separated (despite the name), written as pandas' `to_csv(sep='\\t', index=False)` does: csv
    quoting only where a field needs it; booleans as True/False.
    """
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(HIGHEST_SCORE_HEADER)
        w.writerows(rows)


def write_highest_scores(path: str | os.PathLike, ids: Sequence[str],
                         probs: np.ndarray | torch.Tensor) -> None:
    """`prediction_results_highestscore.csv`: tab-separated `Modified_ID, Is_Virus` (True/False)."""
    write_highest_score_rows(path, highest_scores(ids, probs))
