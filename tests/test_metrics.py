"""revisitop metrics against hand-computed cases and a definition-level reference."""
from __future__ import annotations

import math

import numpy as np
import pytest

from extract.errors import InputMismatch
from extract.evaluation.metrics import check_ranks, compute_map, evaluate, format_table, protocol_gnd


def one_query(ranking: list[int], ok: list[int], junk: list[int] = ()) -> tuple[float, np.ndarray]:
    """(AP, P@[1, 5, 10]) of a single query."""
    m, aps, pr, prs = compute_map(np.array(ranking)[:, None],
                                  [{"ok": np.array(ok), "junk": np.array(junk, dtype=int)}])
    assert m == pytest.approx(aps[0]) and np.allclose(pr, prs[0])
    return m, pr


def test_perfect_and_reversed() -> None:
    ap, pr = one_query([2, 4, 0, 1, 3], ok=[2, 4])
    assert ap == pytest.approx(1.0)
    np.testing.assert_allclose(pr, [1, 1, 1])  # P@5, P@10 capped at the last positive (rank 2)
    ap, pr = one_query([3, 1, 0, 4, 2], ok=[2, 4])  # positives at ranks 3, 4
    # (0/3 + 1/4)/2 + (1/4 + 2/5)/2 = 0.125 + 0.325, over 2 positives
    assert ap == pytest.approx(0.225)
    np.testing.assert_allclose(pr, [0, 2 / 5, 2 / 5])


def test_junk_before_between_and_after_positives() -> None:
    # junk first: positives at 1, 3 become 0, 2 -> (1 + 1)/2 + (1/2 + 2/3)/2, over 2
    ap, pr = one_query([0, 1, 2, 3, 4, 5], ok=[1, 3], junk=[0])
    assert ap == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 2)
    np.testing.assert_allclose(pr, [1, 2 / 3, 2 / 3])
    # junk between two positives: removed, so the ranking is perfect
    ap, pr = one_query([1, 0, 3, 2, 4, 5], ok=[1, 3], junk=[0])
    assert ap == pytest.approx(1.0)
    np.testing.assert_allclose(pr, [1, 1, 1])
    # junk after the positives changes nothing
    assert one_query([1, 3, 0, 2], ok=[1, 3], junk=[0])[0] == pytest.approx(1.0)
    # same ranking with junk counted as a negative instead
    assert one_query([1, 0, 3, 2], ok=[1, 3])[0] == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2)


def test_precision_at_k_beyond_positives() -> None:
    # one positive at (1-based) rank 3: P@1 = 0, P@5 = P@10 = 1/3 (k capped at 3)
    ap, pr = one_query(list(range(12)), ok=[2])
    assert ap == pytest.approx((0 / 2 + 1 / 3) / 2)
    np.testing.assert_allclose(pr, [0, 1 / 3, 1 / 3])
    # positives at ranks 1 and 12 of 12: P@10 = 1/10
    _, pr = one_query(list(range(12)), ok=[0, 11])
    np.testing.assert_allclose(pr, [1, 1 / 5, 1 / 10])


def test_queries_without_positives_are_excluded() -> None:
    ranks = np.array([[0, 0, 1], [1, 1, 0], [2, 2, 2]])
    gnd = [{"ok": np.array([0])}, {"ok": np.array([], int), "junk": np.array([1])},
           {"ok": np.array([0])}]
    m, aps, pr, prs = compute_map(ranks, gnd)
    assert math.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert m == pytest.approx((1.0 + 0.25) / 2)  # query 2: positive at rank 1 -> (0 + 1/2)/2
    np.testing.assert_allclose(pr, [0.5, 0.75, 0.75])
    m, _, pr, _ = compute_map(ranks[:, 1:2], gnd[1:2])
    assert math.isnan(m) and np.isnan(pr).all()


def reference_ap(ranking: np.ndarray, ok: set[int], junk: set[int]) -> float:
    """revisitop's definition: drop junk, then trapezoids between adjacent precision points."""
    kept = [x for x in ranking if x not in junk]
    ap, found = 0.0, 0
    for r, x in enumerate(kept):
        if x in ok:
            left = 1.0 if r == 0 else found / r
            found += 1
            ap += (left + found / (r + 1)) / 2 / len(ok)
    return ap


def test_matches_definition_on_random_rankings() -> None:
    rng = np.random.default_rng(0)
    db, nq = 60, 25
    ranks = np.stack([rng.permutation(db) for _ in range(nq)], axis=1)
    gnd = []
    for _ in range(nq):
        ids = rng.permutation(db)
        a, b, c = rng.integers(0, 8, 3)
        gnd.append({"easy": ids[:a], "hard": ids[a:a + b], "junk": ids[a + b:a + b + c]})
    for protocol in ("easy", "medium", "hard"):
        g = protocol_gnd(gnd, protocol)
        _, aps, _, _ = compute_map(ranks, g)
        for i in range(nq):
            if len(g[i]["ok"]):
                assert aps[i] == pytest.approx(reference_ap(ranks[:, i], set(g[i]["ok"]),
                                                            set(g[i]["junk"])))


def test_protocols_and_percent_table() -> None:
    gnd = [{"easy": np.array([0]), "hard": np.array([1]), "junk": np.array([2])}]
    assert [sorted(g["ok"]) for g in (protocol_gnd(gnd, p)[0] for p in ("easy", "medium", "hard"))] \
        == [[0], [0, 1], [1]]
    assert sorted(protocol_gnd(gnd, "easy")[0]["junk"]) == [1, 2]
    assert sorted(protocol_gnd(gnd, "hard")[0]["junk"]) == [0, 2]
    ranks = np.array([[2, 1, 3, 0]]).T  # junk, hard, negative, easy
    res = evaluate(ranks, gnd)
    # easy: junk 2 and hard 1 dropped -> [3, 0]: positive at rank 1 -> (0 + 1/2)/2
    assert res["easy"]["mAP"] == pytest.approx(25.0)
    # medium: junk 2 dropped -> [1, 3, 0]: positives at ranks 0 and 2
    assert res["medium"]["mAP"] == pytest.approx(100 * ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert res["hard"]["mAP"] == pytest.approx(100.0)
    assert res["hard"]["mP@10"] == pytest.approx(100.0)
    assert set(res["medium"]) == {"mAP", "mP@1", "mP@5", "mP@10"}
    per = evaluate({"easy": ranks, "medium": ranks, "hard": ranks[::-1].copy()}, gnd)
    assert per["easy"] == res["easy"] and per["hard"]["mAP"] < 100.0
    table = format_table(res)
    assert "medium" in table and "mP@10" in table and "25.00" in table


def test_check_ranks() -> None:
    good = np.stack([np.arange(4), np.arange(4)[::-1]], axis=1)
    assert check_ranks(good, 4, 2).dtype == np.int64
    with pytest.raises(InputMismatch, match=r"shape \(2, 4\).*\(4, 2\)"):
        check_ranks(good.T, 4, 2)
    with pytest.raises(InputMismatch, match="integer"):
        check_ranks(good.astype(float), 4, 2)
    bad = good.copy()
    bad[0, 1] = 0
    with pytest.raises(InputMismatch, match="column 1 .* not a permutation"):
        check_ranks(bad, 4, 2)
