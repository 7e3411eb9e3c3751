"""What loading any checkpoint needs: weights read without running code (weights-only, memory-mapped), the
architecture built without memory on the meta device to check names and shapes, and tensors copied to
their device in their stored precision. ESM-2 and DNABERT-S read their own formats with these."""

from __future__ import annotations

import contextlib
import re
import threading
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from virnucpro.errors import CheckpointError


def check_state_dict(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], where: object,
                     family: str) -> None:
    """Every parameter the architecture has is in the file, none is left over, every shape matches."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: parameters do not match {family} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if given[k].shape != v.shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(given[k].shape)}, expected {tuple(v.shape)}")


def load_error(e: BaseException) -> str:
    """torch.load's failure in one line: a weights-only refusal names the global it refused (its full
    message is a page of advice to load the file unsafely, which is the one thing not to do)."""
    text = str(e)
    refused = re.search(r"(?:Unsupported (?:global|operand)|Trying to load unsupported)[^\n]*?(?=\.(?:\s|$)|\n|$)",
                        text)
    if refused:
        return f"weights-only load refused it: {refused.group(0).strip()}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


@contextlib.contextmanager
def on_meta_device():
    """Modules built here get meta parameters (shapes, no memory) and skip their random initialisation:
    their weights come from a checkpoint. Skipping it matters: nn.Embedding's normal_ on the meta device
    runs through torch._refs, which imports torch._dynamo, 3 s of a driver that only checks names and
    shapes. (transformers' `no_init_weights` does the same.)"""
    skip = {name: (lambda tensor, *args, **kwargs: tensor) for name in ("normal_", "uniform_", "kaiming_uniform_")}
    with _NN_INIT_PATCH, torch.device("meta"), mock.patch.multiple(nn.init, **skip):
        yield


# The device context is per thread, but the nn.init patch is process-wide: two threads inside at once
# (predict checks both models from two threads) would restore each other's no-ops, leaving nn.init
# patched for the process (a classifier trained afterwards then starts from uninitialised biases).
_NN_INIT_PATCH = threading.RLock()


def to_device(state: dict[str, torch.Tensor], device: torch.device | str,
              dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each tensor copied to `device` as stored, then converted there: a checkpoint read from the page
    cache goes to the GPU in its own (often half) precision, and the GPU converts it, not the CPU."""
    return {k: v.to(device).to(dtype) if v.is_floating_point() else v.to(device) for k, v in state.items()}


def load_weights_only(path: Path, mmap: bool) -> object:
    """`torch.load` with weights_only, memory-mapped when asked (nothing is read until used), except
    for legacy (pre-zip) files, which cannot be memory-mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if not mmap or "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


__all__ = ["check_state_dict", "load_error", "on_meta_device", "to_device", "load_weights_only"]
