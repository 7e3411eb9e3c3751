"""The options of `virnucpro embed`, `predict` and `train`, each defined once.

An option is a dataclass field whose metadata holds its help text, choices and bounds. From these the
command line is built (`add_arguments`, `from_args`), the keyword API is the dataclass itself
(`EmbedOptions(toks_per_batch=8192)`), and `__post_init__` refuses an out-of-range value with a
one-line `OptionError` before anything starts, whichever way the options came in. Adding an option is
one field here and the code that uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from virnucpro.errors import OptionError  # noqa: F401 - also imported from here

INCLUDE = ("mean", "bos", "cls", "per-token", "logits")  # --include (virnucpro.io.output.plan_columns)




def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
           check: Callable[[Any], str | None] | None = None, short: str | None = None,
           metavar: str | None = None, cli: bool = True) -> Any:
    """A dataclass field with what the command line and the range check need.

    `min`: the smallest value allowed (None, meaning "the default", is always allowed). `check`: a
    function returning what is wrong with a value, or None. `cli=False`: Python API only."""
    meta = dict(help=help, choices=choices, min=min, check=check, short=short, metavar=metavar, cli=cli)
    return field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _validate(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if value is None or not meta:
            continue
        problem = None
        if meta["choices"] is not None and value not in meta["choices"]:
            problem = f"choose from {', '.join(map(str, meta['choices']))}"
        elif meta["min"] is not None and value < meta["min"]:
            problem = f"must be at least {meta['min']:g}"
        elif meta["check"] is not None:
            problem = meta["check"](value)
        if problem:
            raise OptionError(f"{_flag(f.name)} {_shown(value)}: {problem}")


def _base_type(annotation: Any) -> type:
    """int for `int | None`, and so on; Callable and other non-CLI types come back as they are."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  only: tuple[str, ...] | None = None, required: tuple[str, ...] = ()) -> None:
    """Add one command-line flag per CLI field of the options dataclass `cls` (or those in `only`)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta or not meta["cli"] or (only is not None and f.name not in only):
            continue
        kind = _base_type(hints[f.name])
        names = [_flag(f.name)] + ([meta["short"]] if meta["short"] else [])
        kw: dict[str, Any] = dict(dest=f.name, help=meta["help"])
        if kind is bool:
            kw["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
            kw["default"] = f.default
            if f.default is not None and "default" not in kw["help"]:
                kw["help"] += f" (default: {'on' if f.default else 'off'})"
        else:
            if typing.get_origin(kind) is tuple:  # tuple[str, ...]: one or more values
                kw["nargs"], kind = "+", typing.get_args(kind)[0]
            metavar = meta["metavar"] or {int: "N", float: "X"}.get(kind)
            kw.update(type=kind, choices=meta["choices"], metavar=metavar)
            if f.name in required:
                kw["required"] = True
            else:
                kw["default"] = f.default
                if f.default is not None and "default" not in kw["help"]:
                    kw["help"] += " (default: %(default)s)"
        parser.add_argument(*names, **kw)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """The options dataclass `cls` from a parsed namespace (fields the parser lacks keep their default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def _gpu_share(share: float) -> str | None:
    if share > 1 and share != int(share):
        return "give a fraction of one GPU (0.5) or a whole number"
    return None


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


@dataclass(frozen=True)
class EmbedOptions:
    """How an embedding run computes: `virnucpro embed` flags and `cluster.embed(...)` keywords alike."""

    device: str = option("auto", "where actors run (auto: GPUs when the Ray cluster has any)",
                         choices=("auto", "cuda", "cpu"))
    dtype: str = option("auto", "auto: bfloat16 on Ampere or newer GPUs, float16 on older ones, float32 on CPU",
                        choices=("auto", "float32", "bfloat16", "float16"))
    num_actors: int | None = option(None, "model replicas (default: one per visible GPU, or one on CPU)", min=1)
    # Ray's GPU resource each actor reserves. Honoured with device cpu too: placement follows Ray
    # resources alone, which is how placement is tested on machines without GPUs (fake GPU resources).
    gpus_per_actor: float | None = option(
        None, "Ray GPU resource each actor reserves (default 1 with --device cuda, 0 on CPU); 0.5 puts two "
              "actors of a small model on one GPU", min=0, check=_gpu_share)
    address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS if set, else the Ray started on "
                                       "this machine with `ray start` if any, else a local Ray for this run; with "
                                       "--service, the Ray running on this machine)")
    service: str | None = option(None, "send the batches to the running service NAME (virnucpro serve start), "
                                       "whose replicas keep the model loaded, instead of starting actors",
                                 metavar="NAME")
    dashboard_host: str = option(
        "127.0.0.1", "where a local Ray started by this command serves its dashboard and job API; 0.0.0.0 "
                     "exposes it to the network (token authentication stays on)")
    dashboard: bool | None = option(
        None, "start the Ray dashboard with a local Ray started by this command (default: for an input of 16 MiB "
              "or more; a smaller run ends in seconds, less than the time the dashboard adds to Ray's start)")
    toks_per_batch: int | None = option(
        None, "token budget of a packed batch (default: 4096 on CPU; on GPU 65536 for ESM-2, 262144 for "
              "DNABERT-S)", min=1)
    truncation_seq_length: int = option(
        1022, "longest sequence embedded, in residues (ESM-2) or tokens (DNABERT-S); longer ones are "
              "truncated and flagged in the 'truncated' column", min=1)
    dataloader_workers: int | None = option(
        None, "threads in each actor that read and tokenise its next batches while its streams compute "
              "(default min(cpu_count // num_gpus, 8) of the actor's node)", min=1)
    pin_memory: bool = option(True, "page-locked host buffers for asynchronous host-to-GPU copies")
    expandable_segments: bool = option(
        False, "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the actors: less fragmentation with "
               "varying batch shapes, most useful on GPUs with little memory headroom")
    cuda_streams: int = option(2, "concurrent batches per GPU actor, each on its own copy and compute streams",
                               min=1)
    attention: str = option(
        "auto", "auto: FlashAttention over packed sequences where the GPU supports it, in our Triton kernel "
                "(with DNABERT-S's ALiBi bias; else FlashAttention-2 for ESM-2, SDPA with the bias for DNABERT-S); "
                "flash: PyTorch's FlashAttention-2 varlen kernel for ESM-2; sdpa: force the PyTorch SDPA "
                "fallback; flex: FlexAttention for DNABERT-S",
        choices=("auto", "flash", "sdpa", "flex"))
    repr_layers: tuple[int, ...] | None = option(
        None, "layers to output, numbered as fair-esm does: 0 the embedding output, N the last layer (after "
              "the final layer norm), negative from the end; several at once (default: the last)",
        metavar="L")
    include: tuple[str, ...] | None = option(
        None, "what each layer gives: mean, bos (ESM-2's <cls>; cls for DNABERT-S), per-token (each residue; "
              "each token for DNABERT-S), logits (ESM-2's LM head); comma- or space-separated. Columns mean_<L>, "
              "bos_<L>/cls_<L>, per_token_<L>, logits. Default: one column, embedding, the mean of the last "
              "layer", check=lambda v: _one_of(v, INCLUDE))
    output_dtype: str = option("float32", "float type of the embedding columns (float16 halves per-token output)",
                               choices=("float32", "float16"))
    id_column: str = option("id", "a table input (.parquet, .csv, .tsv): the column of the ids", metavar="C")
    sequence_column: str = option("sequence", "a table input: the column of the sequences", metavar="C")
    keep_columns: tuple[str, ...] | None = option(
        None, "a table input: columns copied into the output rows beside the embeddings (labels, organism); "
              "comma- or space-separated", metavar="C")
    compile: bool | None = option(None, "torch.compile the model layers (default: on for CUDA, except DNABERT-S "
                                        "where its fused Triton kernels load; off on CPU)")
    profile: str | None = option(
        None, "write torch profiler traces of each actor's first 3 batches to DIR on the actor's node (open "
              "them in Perfetto)", metavar="DIR")
    resume: bool = option(False, "finish a previous run in OUT_DIR")
    overwrite: bool = option(False, "replace a previous run in OUT_DIR")
    progress: bool | None = option(None, "progress line on the terminal (default: when stderr is a terminal)")
    verbose: bool = option(False, "debug logging (streams, batches)", short="-v")
    actor_wait_seconds: float = option(
        900.0, "give up when no actor is usable for this long (all restarting, none schedulable)",
        check=_positive)
    max_actor_restarts: int = option(3, "Ray's restarts of one dead actor (-1: no limit), then the pool "
                                        "starts a new one", min=-1)
    # Python API only: extra Ray actor options for actor i, merged over the defaults (e.g. a
    # placement-group bundle, so that two embed jobs share GPUs as `cluster.pipeline` arranges)
    actor_options: Callable[[int], dict] | None = option(None, "extra Ray actor options for actor i", cli=False)

    def __post_init__(self) -> None:
        # `--include mean,per-token`, `--include mean per-token` and include="mean,per-token" alike
        if isinstance(self.include, str) or self.include is not None:
            items = [self.include] if isinstance(self.include, str) else self.include
            object.__setattr__(self, "include", tuple(p for i in items for p in str(i).replace(",", " ").split()))
        if self.keep_columns is not None:  # `--keep-columns a,b` and keep_columns=["a", "b"] alike
            items = [self.keep_columns] if isinstance(self.keep_columns, str) else self.keep_columns
            object.__setattr__(self, "keep_columns", tuple(p for i in items for p in str(i).replace(",", " ").split()))
        if self.repr_layers is not None:  # an int, or the list argparse gives: a tuple (hashable)
            layers = (self.repr_layers,) if isinstance(self.repr_layers, int) else self.repr_layers
            object.__setattr__(self, "repr_layers", tuple(int(v) for v in layers))
        _validate(self)
        if self.resume and self.overwrite:
            raise OptionError("--resume and --overwrite exclude each other")

    def replace(self, **changes: Any) -> EmbedOptions:
        return dataclasses.replace(self, **changes)


OUTPUT_OPTIONS = ("repr_layers", "include", "output_dtype")  # embed's output columns
TABLE_OPTIONS = ("id_column", "sequence_column", "keep_columns")  # embed's table input
# The EmbedOptions that predict and train take: they read the default `embedding` column, so not the
# output columns; their input is FASTA, so not the table options; and they name a service per model
# (esm_service, dnabert_service), so not `service`.
PIPELINE_EMBED_OPTIONS = tuple(f.name for f in dataclasses.fields(EmbedOptions)
                               if f.name not in (*OUTPUT_OPTIONS, *TABLE_OPTIONS, "service"))


def _one_of(values: tuple[str, ...], allowed: tuple[str, ...]) -> str | None:
    wrong = [v for v in values if v not in allowed]
    if not wrong:
        return None
    return f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not one of {', '.join(allowed)}"


def _shown(value: Any) -> str:
    """A value as the user typed it: `--include foo bar`, `--dtype fp8`."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _threshold(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be within [0, 1]"


@dataclass(frozen=True)
class PredictOptions:
    """What `virnucpro predict` (and `preprocess`) adds to the embedding options."""

    chunk_size: int = option(500, "chunk length in bases, any N >= 1; must be what the classifier was trained "
                                  "on (upstream's 300_model.pth / 500_model.pth: 300 / 500)", min=1)
    chunking: str = option("compat", "compat: upstream VirNucPro's split, quirks included; even: overlap "
                                     "spread evenly", choices=("compat", "even"))
    workers: int | None = option(None, "preprocessing processes (default: 1 below ~64 Mbp of input, else one "
                                       "per CPU, at most 8)", min=1)
    threshold: float = option(0.5, "contig verdict: virus when the mean chunk virus score >= this; a chunk's "
                                   "score is its best frame's P(virus)", check=_threshold)
    keep_embeddings: bool = option(False, "keep OUT_DIR/embeddings/{dnabert_s,esm2} (Parquet) for reuse")
    plot_contigs: tuple[str, ...] | None = option(
        None, "contigs drawn in OUT_DIR/prediction.png (default: the first 5 with a classified chunk)",
        metavar="ID")
    plots: bool = option(True, "draw prediction.png and contig_scores.png at the end (needs matplotlib: pip "
                               "install matplotlib; `virnucpro plot OUT_DIR` redraws them)")

    def __post_init__(self) -> None:
        _validate(self)


def _fraction(value: float) -> str | None:
    return None if 0.0 < value < 1.0 else "must be within (0, 1)"


@dataclass(frozen=True)
class TrainOptions:
    """`virnucpro train`'s recipe; the defaults are upstream VirNucPro's train.py."""

    epochs: int = option(200, "most training epochs", min=1)
    patience: int = option(5, "stop after this many epochs without a lower validation loss (the best epoch's "
                              "weights are kept)", min=1)
    batch_size: int = option(32, "training batch size (BatchNorm needs 2 or more)", min=2)
    lr: float = option(2e-4, "SGD learning rate", check=_positive)
    momentum: float = option(0.9, "SGD momentum", min=0)
    lr_step: int = option(10, "StepLR: multiply the learning rate by --lr-gamma every this many epochs", min=1)
    lr_gamma: float = option(0.85, "StepLR factor", check=_positive)
    val_fraction: float = option(0.1, "frames held out at random for validation", check=_fraction)
    seed: int = option(42, "seed of the split, the initial weights, dropout and the batch order")
    train_device: str = option("auto", "where the classifier trains (auto: a GPU when this machine has one)",
                               choices=("auto", "cuda", "cpu"))
    upstream_format: bool = option(False, "also save upstream's pickled model, <chunk size>_model.pth, which "
                                          "upstream's prediction.py loads (torch.save of the whole module)")

    def __post_init__(self) -> None:
        _validate(self)


__all__ = ["EmbedOptions", "PredictOptions", "TrainOptions", "OptionError", "add_arguments", "from_args", "option"]
