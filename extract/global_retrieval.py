"""Retrieval with DELG global descriptors: exact inner-product search (faiss) over unit global
descriptors gives the initial ranking; the top of it may then be re-ranked by RANSAC inliers of
the local features (``global+sp``), as in the DELG paper."""
from __future__ import annotations

import faiss
import numpy as np


def global_matrix(descriptors: list[np.ndarray], what: str = "database") -> np.ndarray:
    """The (n, D) float32 matrix of n global descriptors (D,); a clear error when one is missing
    (features extracted with a DeLF, not a DELG, checkpoint) or the dimensions differ."""
    if any(d is None for d in descriptors):
        raise ValueError(f"the {what} features have no global_descriptor: extract them with a DELG "
                         "(--stage delg) checkpoint")
    dims = {np.asarray(d).shape for d in descriptors}
    if len(dims) > 1:
        raise ValueError(f"the {what} global descriptors have different shapes: {sorted(dims)}")
    return np.ascontiguousarray(np.stack(descriptors), dtype=np.float32)


def global_ranks(db: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product ranking of the whole database for each query.

    ``db`` (N, D) and ``queries`` (Q, D) are unit global descriptors. Returns ranks (N, Q),
    0-based database indices best first (revisitop's convention; ties by index), and the
    similarities (Q, N) in database order.
    """
    db = np.ascontiguousarray(db, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if db.ndim != 2 or queries.ndim != 2 or db.shape[1] != queries.shape[1]:
        raise ValueError(f"database {db.shape} and queries {queries.shape} are not (n, D) of one D")
    n = len(db)
    if n == 0 or len(queries) == 0:
        return np.empty((n, len(queries)), np.int64), np.empty((len(queries), n), np.float32)
    sims, ids = faiss.knn(queries, db, n, metric=faiss.METRIC_INNER_PRODUCT)
    ids = np.asarray(ids, np.int64)
    # faiss orders equal similarities arbitrarily: a stable sort makes ties go by index
    order = np.lexsort((ids, -np.asarray(sims)), axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    by_index = np.empty((len(queries), n), np.float32)
    np.put_along_axis(by_index, ids, np.take_along_axis(np.asarray(sims, np.float32), order, axis=1), axis=1)
    return np.ascontiguousarray(ids.T), by_index
