"""How the models' layers are compiled: `torch.compile` for any token count, the attention kernels
opaque to it (`attention.keep_out_of_compile`), and Inductor told to reduce rows up to 2048 wide in one
pass. Imported only by a process that compiles: torch._inductor takes seconds to import.

Inductor keeps a row in registers (a "persistent" reduction: one read of the row) only up to 1024
elements, so ESM-2 650M's LayerNorms, 1280 wide, ran as looped reductions that read each row twice.
Raised to 2048, which bench/probe_inductor.py found faster (bench/README.md, "Where the time goes");
3B's rows (2560) stay looped; DNABERT-S's (768) were persistent already.

Inductor reads its heuristics from a per-thread handler. `compiled` sets ours in the calling thread,
which is where the layers must first run (an actor's compile thread, a script's main thread); it stays
set for that thread's later compiles. A recompile in another thread gets it from the compile's
options where torch has `inductor_choices_class` (and that thread compiled nothing before), else
Inductor's default: slower LayerNorms, the same results. A no-op graph pass in the options puts this
file's hash into Inductor's cache key, so kernels compiled under other heuristics are never loaded in
their place.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._inductor.choices import InductorChoices
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from virnucpro.kernels.attention import keep_out_of_compile

WIDE_ROWS = 2048


class WideRowChoices(InductorChoices):
    """Inductor's heuristics, but rows up to `WIDE_ROWS` wide are reduced persistently."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        if (features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, WIDE_ROWS)):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:  # what torch >= 2.12 puts in the cache key for inductor_choices_class
        return _KEY


_KEY = get_hash_for_files((__file__,)).hex()


class _Keyed(CustomGraphPass):
    """Changes nothing; its uuid puts our heuristics into Inductor's cache key, also on a torch whose key
    leaves out `inductor_choices_class` (checked on torch 2.13 by a CPU test; not yet on 2.11)."""

    def __call__(self, graph) -> None:
        return None

    def uuid(self) -> str:
        return _KEY


def _prepare() -> dict:
    keep_out_of_compile()
    V.set_choices_handler(WideRowChoices())
    options = {"post_grad_custom_post_pass": _Keyed()}
    if hasattr(torch._inductor.config, "inductor_choices_class"):
        options["inductor_choices_class"] = WideRowChoices
    return options


def compiled(layers: list[nn.Module]) -> list[nn.Module]:
    """Each layer under torch.compile, sharing its weights; nothing compiles until a layer first runs,
    which must be in this thread."""
    options = _prepare()
    return [torch.compile(layer, dynamic=True, options=options) for layer in layers]


def compile_in_place(layers: list[nn.Module]) -> None:
    """The same, in place (scripts that compile before they run anything)."""
    options = _prepare()
    for layer in layers:
        layer.compile(dynamic=True, options=options)
