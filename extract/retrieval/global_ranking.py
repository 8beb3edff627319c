"""Retrieval with DELG global descriptors: exact inner products (faiss) of unit global descriptors
give the initial ranking; its top may then be re-ranked by RANSAC inliers of the local features
(evaluate.py ``--method global+sp``), as in the DELG paper."""
from __future__ import annotations

import faiss
import numpy as np

from extract.errors import InputMismatch


def global_matrix(descriptors: list[np.ndarray], what: str = "database") -> np.ndarray:
    """The (n, D) float32 matrix of n global descriptors (D,); a clear error when one is missing
    (features extracted with a DeLF, not a DELG, checkpoint) or the dimensions differ."""
    if any(d is None for d in descriptors):
        raise InputMismatch(f"the {what} features have no global_descriptor: extract them with a DELG "
                            "(--stage delg) checkpoint")
    dims = {np.asarray(d).shape for d in descriptors}
    if len(dims) > 1:
        raise InputMismatch(f"the {what} global descriptors have different shapes: {sorted(dims)}")
    return np.ascontiguousarray(np.stack(descriptors), dtype=np.float32)


def global_scores(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Inner products (Q, N) float32 of unit global descriptors ``queries`` (Q, D) with ``db``
    (N, D), exact (faiss's blocked BLAS), in database order."""
    db = np.ascontiguousarray(db, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if db.ndim != 2 or queries.ndim != 2 or db.shape[1] != queries.shape[1]:
        raise InputMismatch(f"database {db.shape} and queries {queries.shape} are not (n, D) of one D")
    if len(db) == 0 or len(queries) == 0:
        return np.zeros((len(queries), len(db)), np.float32)
    return np.asarray(faiss.pairwise_distances(queries, db, metric=faiss.METRIC_INNER_PRODUCT), np.float32)

