"""Driver side of VirNucPro: the `virnucpro` CLI, the embedding driver, predict and the cluster configs.

    from cluster import embed, predict

Names are imported on first use, so that `virnucpro --help` does not wait for torch and Ray.
"""

import importlib

_EXPORTS = {"embed": "cluster.driver", "EmbedResult": "cluster.driver", "EmbedError": "cluster.scheduling",
            "EmbedOptions": "virnucpro.options", "predict": "cluster.pipeline",
            "PredictResult": "cluster.pipeline", "PredictError": "cluster.pipeline",
            "embed_sequences": "cluster.in_memory"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
