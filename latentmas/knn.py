"""kNN filtering: which cached tokens survive a hand-off."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import KNN_STRATEGIES
from .similarity import mode_names


@dataclass
class KnnFilter:
    """Keep k = min(T, max(floor(T·percentage), min_keep)) of a row's T real columns.

    The min_keep most recent columns always stay; the rest are chosen from the
    older ones by `strategy`: "top" (most similar to the query), "bottom" (least
    similar) or "random" (seeded per problem, so a batch never changes the pick).

    score: the similarity mode whose middle-layer row ranks the columns (a name from
    `latentmas.similarity`); `latent_mas` computes it before the trim. Prefill modes
    ("query", "attention") need the incoming prompt's queries, so they cost a scoring
    pass (`latentmas.prefill.score_prompt`: the prompt runs on the untrimmed cache up to
    the middle layer, then the cache is restored). "random" needs no scores at all.
    """

    percentage: float = 0.8
    min_keep: int = 5
    strategy: str = "top"
    score: str = "seed"

    def __post_init__(self):
        if not 0 < self.percentage <= 1:
            raise ValueError(f"knn percentage must be in (0, 1], got {self.percentage}")
        if self.min_keep < 0:
            raise ValueError(f"knn min_keep must be >= 0, got {self.min_keep}")
        if self.strategy not in KNN_STRATEGIES:
            raise ValueError(f"unknown knn strategy {self.strategy!r}; choose top, bottom or random")
        if self.score not in mode_names():
            raise ValueError(f"unknown knn score {self.score!r}; choose from {', '.join(mode_names())}")

    @property
    def needs_scores(self) -> bool:
        """False for "random", which ignores the scores."""
        return self.strategy != "random"

    def keep_mask(self, scores: torch.Tensor, mask: torch.Tensor, generators=None) -> torch.Tensor:
        """scores, mask: [batch, T] (mask True for real columns) -> bool [batch, T] of columns to keep.

        generators: one `torch.Generator` per row, needed for strategy "random".
        """
        mask = mask.bool()
        real = mask.sum(dim=1)  # [B]
        wanted = torch.floor(real.double() * self.percentage + 1e-9).long()
        k = torch.minimum(real, wanted.clamp_min(self.min_keep))
        recent_count = real.clamp_max(self.min_keep)
        # rank of each real column counted from the newest (1 = newest)
        from_newest = mask.flip(1).long().cumsum(1).flip(1)
        recent = mask & (from_newest <= recent_count[:, None])
        older = mask & ~recent
        key = self._key(scores.float(), mask, generators).masked_fill(~older, -math.inf)
        rank = key.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        chosen = older & (rank < (k - recent_count)[:, None])
        return recent | chosen

    def _key(self, scores: torch.Tensor, mask: torch.Tensor, generators) -> torch.Tensor:
        """Higher key = kept first. Random keys are drawn for a row's real columns only,
        so neither the draw nor the generator's state depends on the batch's padding."""
        if self.strategy == "top":
            return scores
        if self.strategy == "bottom":
            return -scores
        if generators is None or len(generators) != scores.shape[0]:
            raise ValueError("knn strategy 'random' needs one generator per batch row")
        key = torch.zeros_like(scores)
        for row, generator in enumerate(generators):
            real = mask[row]
            key[row, real] = torch.rand(int(real.sum()), generator=generator, device=scores.device)
        return key
