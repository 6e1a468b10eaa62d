"""`seed`: the seed's cosine between the incoming prompt's mean embedding and head-averaged keys."""

from __future__ import annotations

from .base import HandoffMode
from .maths import layer_similarities


class SeedSimilarity(HandoffMode):
    name = "seed"
    description = ("cosine between the incoming prompt's mean input embedding, cut into head-sized chunks, "
                   "and the head-averaged cached keys")
    label = "cosine similarity"
    value_range = (-1.0, 1.0)
    default_cmap = "RdYlGn"

    def score(self, keys, query):
        return layer_similarities(keys, query)
