"""How the models' layers are compiled: `torch.compile` for any token count, the attention kernels
opaque to it (`attention.keep_out_of_compile`), and Inductor told to reduce rows up to 2048 wide in one
pass. Imported only by a process that compiles: torch._inductor takes seconds to import.

Inductor keeps a row in registers (a "persistent" reduction: one read of the row) only up to 1024
elements, so ESM-2 650M's LayerNorms, 1280 wide, ran as looped reductions that read each row twice, at
about 40% of the memory bandwidth (bench_profile). Raised to 2048: 650M 341.8 K -> 359.6 K tokens/s, and
with the GELU in fc1's GEMM epilogue (esm2.TransformerLayer) 385.8 K; 3B unchanged (2560 wide, looped
either way); DNABERT-S (768) was persistent already (one H200, bench/results/probe-inductor-*.json).
"""

from __future__ import annotations

import torch
from torch import nn
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from virnucpro.attention import keep_out_of_compile

WIDE_ROWS = 2048


class WideRowChoices(InductorChoices):
    """Inductor's heuristics, but rows up to `WIDE_ROWS` wide are reduced persistently."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        if (features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, WIDE_ROWS)):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:  # what Inductor's cache key holds for this choice (torch >= 2.12 asks for it)
        return f"virnucpro.WideRowChoices({WIDE_ROWS})"


def _options() -> dict:
    # In Inductor's config the choices class is part of the compile's cache key, so kernels compiled
    # without it are not loaded in its place; a torch without that setting just gets the handler below.
    return {"inductor_choices_class": WideRowChoices} if hasattr(torch._inductor.config, "inductor_choices_class") else {}


def _prepare() -> dict:
    keep_out_of_compile()
    # Inductor reads its choices handler per thread, once: set it in the thread that compiles (an
    # actor's compile thread, a script's main thread), whatever that thread compiled before.
    V.set_choices_handler(WideRowChoices())
    return _options()


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
