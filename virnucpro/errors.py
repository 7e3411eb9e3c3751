"""The errors a user can fix, each a one-line message naming what to fix."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A model file that is missing, of another family, or of unexpected shapes."""
