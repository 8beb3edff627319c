"""Global-descriptor retrieval: exact inner-product ranking (faiss) and its input checks."""
from __future__ import annotations

import numpy as np
import pytest

from extract.errors import InputMismatch
from extract.retrieval.global_ranking import global_matrix, global_scores
from extract.retrieval.vote import rank
from tests.utils import unit


def test_ranking_equals_brute_force_with_ties_by_index() -> None:
    rng = np.random.default_rng(0)
    db = unit(rng.normal(size=(60, 16)))
    db[9] = db[4]  # a tie: index 4 first
    queries = unit(rng.normal(size=(5, 16)))
    queries[0] = db[4]
    scores = global_scores(db, queries)
    ranks = np.stack([rank(s) for s in scores], axis=1)  # as evaluate.py ranks them
    np.testing.assert_allclose(scores, queries @ db.T, atol=1e-6)
    np.testing.assert_array_equal(ranks, np.argsort(-(queries @ db.T), axis=1, kind="stable").T)
    assert ranks.shape == (60, 5) and list(ranks[:2, 0]) == [4, 9]


def test_empty_and_mismatched_inputs() -> None:
    assert global_scores(np.zeros((0, 8)), np.zeros((2, 8))).shape == (2, 0)
    with pytest.raises(InputMismatch, match="not \\(n, D\\) of one D"):
        global_scores(np.zeros((3, 8)), np.zeros((2, 4)))


def test_global_matrix_names_the_missing_descriptor() -> None:
    assert global_matrix([np.ones(4), np.zeros(4)]).shape == (2, 4)
    with pytest.raises(InputMismatch, match="query features have no global_descriptor: extract them with a DELG"):
        global_matrix([np.ones(4), None], "query")
    with pytest.raises(InputMismatch, match="different shapes"):
        global_matrix([np.ones(4), np.ones(3)])
