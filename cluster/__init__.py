"""Driver side of VirNucPro: the `virnucpro` CLI, the embedding driver and the cluster configs."""

from .driver import EmbedOptions, EmbedResult, EmbedError, embed
from .predict import PredictError, PredictResult, predict

__all__ = ["embed", "EmbedOptions", "EmbedResult", "EmbedError", "predict", "PredictResult", "PredictError"]
