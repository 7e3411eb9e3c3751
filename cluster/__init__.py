"""Driver side of VirNucPro: the `virnucpro` CLI, the embedding driver and the cluster configs."""

from .driver import EmbedOptions, EmbedResult, EmbedError, embed

__all__ = ["embed", "EmbedOptions", "EmbedResult", "EmbedError"]
