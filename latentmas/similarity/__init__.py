"""Similarity modes: how an incoming agent's query relates to each cached token, per layer.

    from latentmas.similarity import get_mode
    mode = get_mode("query")      # a registered SimilarityMode
    mode.needs_prefill, mode.value_range, mode.score(...)

Built in: `seed` (seed.py), `query` (query.py), `attention` (attention.py). A new mode is one
file with one subclass of `HandoffMode` or `PrefillMode` (see base.py); the maths they share
is in maths.py. Importing this package does not import torch; `get_mode` does.
"""

from .base import HandoffMode, PrefillMode, SimilarityMode, get_mode, mode_names, unregister

__all__ = ["SimilarityMode", "HandoffMode", "PrefillMode", "get_mode", "mode_names", "unregister"]
