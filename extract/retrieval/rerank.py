"""Re-ranking a shortlist by RANSAC inliers, as the DeLF paper and the official
image_reranking.py (matching defaults: extract/config.py, MatchConfig)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np

from extract.config import MatchConfig
from extract.matching.verification import match_features


class Verifier:
    """RANSAC inlier counts of one query against database images, computed once per image."""

    def __init__(self, query: Mapping[str, np.ndarray], database: Callable[[int], Mapping[str, Any]],
                 conf: MatchConfig | None = None) -> None:
        self.query, self.database, self.conf = query, database, conf or MatchConfig()
        self._inliers: dict[int, int] = {}

    def __call__(self, i: int) -> int:
        if i not in self._inliers:
            self._inliers[i] = self._count(self.database(i))
        return self._inliers[i]

    def _count(self, db: Mapping[str, Any]) -> int:
        # as image_reranking.py: query descriptors matched into the database image, and
        # <= 3 putative matches count 0
        res = match_features(db, self.query, self.conf)
        return 0 if len(res.matches) <= 3 else res.num_inliers


def rerank(order: np.ndarray, scores: np.ndarray, inliers: Callable[[int], int], top: int,
           junk: Iterable[int] = ()) -> np.ndarray:
    """Re-rank by (RANSAC inliers, initial score): the first ``top`` non-junk images of ``order``
    are verified, every other image counts 0 inliers; ties by increasing index."""
    is_junk = np.zeros(len(order), dtype=bool)
    is_junk[np.asarray(list(junk), dtype=np.int64)] = True
    counts = np.zeros(len(order), dtype=np.int64)
    for i in order[~is_junk[order]][:top]:
        counts[i] = inliers(int(i))
    return np.lexsort((np.arange(len(order)), -scores, -counts))
