"""What a MODEL argument resolves to, and the error for a bad one: plain data, no torch.

`virnucpro.models.resolve_model` makes a `ModelSource`; the model code (and torch) is imported only
where a model is checked or loaded. A driver that sends its batches to a running service receives
the service's `ModelSource` and tokenizer (`virnucpro.tokenization`) and imports neither: importing
torch is 2.2-2.5 s of a driver's start on an H200 host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models.family import ModelFamily


class CheckpointError(ValueError):
    """A model file that is missing, of another family, or of unexpected shapes."""


@dataclass(frozen=True)
class ModelSource:
    """A MODEL argument resolved (`virnucpro.models.resolve_model`): plain data, so that a driver can
    receive it from a service without importing the model code (and torch)."""

    family: str  # a key of virnucpro.models.FAMILIES: "esm2" or "dnabert_s"
    path: Path  # the .pt file or the model directory
    name: str  # what the user asked for, recorded in the output
    sequence_kind: str  # its family's: the alphabet input is validated against

    @property
    def model_family(self) -> ModelFamily:
        from .models import FAMILIES  # the families' modules import torch: only where a model is checked or loaded

        return FAMILIES[self.family]
