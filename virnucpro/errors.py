"""What a user can fix, as one family of errors: `VirNucProError`.

Each says in one line what is wrong and what to do (an input, an option, a model, the output, the
cluster): the command line prints that line alone (exit 2 for an option, 1 otherwise). Any other
exception is a bug, and the command line keeps its traceback and says so. The kinds subclass the
built-in error they have always been (ValueError, RuntimeError), so code that caught those still does.
"""

from __future__ import annotations


class VirNucProError(Exception):
    """Something the user can fix, said in one line."""


class OptionError(VirNucProError, ValueError):
    """An option out of range, or options that contradict each other: names the option and what is allowed."""


class SequenceError(VirNucProError, ValueError):
    """Bad input: names the file (or table, or request), the record and the cause."""


class CheckpointError(VirNucProError, ValueError):
    """A model file that is missing, of another family, or of unexpected shapes."""


class ClassifierError(VirNucProError, ValueError):
    """A classifier file that cannot be loaded as VirNucPro's MLP, or is not the one the run needs."""


class EmbedError(VirNucProError, RuntimeError):
    """A run that cannot finish (the output, the cluster, a batch that keeps failing): says which, and why."""


class BatchError(VirNucProError, RuntimeError):
    """A batch that cannot be computed anywhere: not worth retrying elsewhere (bad input, out of memory)."""


class PredictError(VirNucProError, RuntimeError):
    """`predict` or `train` refused: its input, models, classifier or output directory."""


class PlotError(VirNucProError, RuntimeError):
    """The figures cannot be drawn (no matplotlib, nothing to draw)."""


__all__ = ["VirNucProError", "OptionError", "SequenceError", "CheckpointError", "ClassifierError", "EmbedError",
           "BatchError", "PredictError", "PlotError"]
