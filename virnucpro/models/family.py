"""`ModelFamily`: what the rest of the package needs to know about one kind of model.

Each model module defines one (`esm2.FAMILY`, `dnabert_s.FAMILY`) next to the code it points to, and
`virnucpro.models` lists them; nothing else branches on a family's name. A new family is a new
module with its `FAMILY` and one line in that list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelFamily:
    name: str  # recorded in ModelSource.family, the manifest and the service's labels
    title: str  # for messages
    sequence_kind: str  # virnucpro.sequences.PROTEIN or DNA: the alphabet its input is validated against
    # (model path, truncation_seq_length) -> tokenizer: cheap, picklable, used by the driver's workers
    tokenizer: Callable[[Path, int | None], Any]
    # (model path, device, dtype, attention backend) -> the model in eval mode (actor side)
    load: Callable[[Path, Any, Any, str], Any]
    # model path -> embedding width, from the weights' names and shapes without loading them
    check: Callable[[Path], int]
    # the token budget of a batch on a GPU when --toks-per-batch is not given (CPU: models.CPU_TOKS_PER_BATCH)
    gpu_toks_per_batch: int
    # config.json of a model directory -> whether it is this family's; None: never read from a directory
    claims_dir: Callable[[dict], bool] | None = None
