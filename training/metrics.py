"""Ranking metrics used by evaluation (pure functions, tested on hand-computed cases)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence


def dcg(gains: Sequence[float], k: int) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))


def ndcg_at(ranked_ids: Sequence[str], gains: dict[str, float], k: int = 10) -> float:
    """nDCG@k of a ranking; gains of unjudged ids are 0; the ideal uses every judged gain."""
    ideal = dcg(sorted(gains.values(), reverse=True), k)
    if ideal <= 0:
        return 0.0
    return dcg([gains.get(i, 0.0) for i in ranked_ids], k) / ideal


def recall_at(ranked_ids: Sequence[str], relevant: Iterable[str], k: int = 100) -> float:
    relevant = set(relevant)
    if not relevant:
        return 0.0
    return len(relevant & set(ranked_ids[:k])) / len(relevant)
