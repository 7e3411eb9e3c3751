"""Deprecated: moved to `virnucpro.io.output` (read the output with `virnucpro.read_embeddings`). This name
stays for scripts written against VirNucPro 0.1, with a warning, until the next release."""

import warnings

from virnucpro.io.output import *  # noqa: F401,F403
from virnucpro.io.output import Manifest, part_metadata, read_embeddings  # noqa: F401

warnings.warn("virnucpro.output moved to virnucpro.io.output (virnucpro.read_embeddings reads a run)",
              DeprecationWarning, stacklevel=2)
