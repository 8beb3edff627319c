"""Revisited Oxford / Paris metrics, computed exactly as revisitop's evaluate.py.

Rankings follow revisitop: ``ranks`` has shape (database size, number of queries), 0-based
database indices, best first. Ground truth: per query ``easy``, ``hard``, ``junk`` index arrays.
Protocols: Easy counts easy images as positives (hard ones are junk), Medium easy + hard, Hard
only hard ones (easy ones are junk). AP drops the junk images from the ranking, then sums
trapezoids between adjacent precision points; mP@k as revisitop (see compute_map).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from extract.errors import InputMismatch

PROTOCOLS = ("easy", "medium", "hard")
KAPPAS = (1, 5, 10)


def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """Average precision by the trapezoid rule, given the 0-based ranks (junk already removed) of
    the retrieved positives, in increasing order, and the number of positives ``nres``."""
    ranks = np.asarray(ranks, dtype=np.float64)
    j = np.arange(len(ranks), dtype=np.float64)
    left = np.divide(j, ranks, out=np.ones_like(j), where=ranks != 0)
    right = (j + 1) / (ranks + 1)
    return float(((left + right) / 2.0).sum() / nres)


def positive_ranks(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in ``ranking`` once junk images are dropped."""
    pos = np.flatnonzero(np.isin(ranking, ok))
    junk_pos = np.flatnonzero(np.isin(ranking, junk))
    return pos - np.searchsorted(junk_pos, pos)


def compute_map(ranks: np.ndarray, gnd: Sequence[Mapping[str, np.ndarray]],
                kappas: Sequence[int] = KAPPAS) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's compute_map: (mAP, AP per query, mP@kappas, P@kappas per query).

    ``gnd[i]`` holds ``ok`` and optionally ``junk``. Queries without positives get NaN and are
    left out of the means (NaN means when no query has a positive). P@k uses revisitop's
    convention: k is capped at the (1-based, junk-free) rank of the last positive.
    """
    nq = ranks.shape[1]
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"])
        if ok.size == 0:
            continue
        pos = positive_ranks(ranks[:, i], ok, np.asarray(gnd[i].get("junk", [])))
        aps[i] = compute_ap(pos, ok.size)
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(int(pos1.max()), k)
            prs[i, j] = (pos1 <= kq).sum() / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return math.nan, aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def protocol_gnd(gnd: Sequence[Mapping[str, np.ndarray]], protocol: str) -> list[dict]:
    """Positives (``ok``) and ``junk`` of one protocol: Easy counts hard images as junk, Medium
    takes easy + hard as positives, Hard counts easy images as junk."""
    ok_keys, junk_keys = {"easy": (("easy",), ("junk", "hard")),
                          "medium": (("easy", "hard"), ("junk",)),
                          "hard": (("hard",), ("junk", "easy"))}[protocol]

    def cat(g: Mapping[str, np.ndarray], keys: tuple[str, ...]) -> np.ndarray:
        return np.concatenate([np.asarray(g[k], dtype=np.int64).ravel() for k in keys])

    return [{"ok": cat(g, ok_keys), "junk": cat(g, junk_keys)} for g in gnd]


def check_ranks(ranks: np.ndarray, db_size: int, nq: int) -> np.ndarray:
    """``ranks`` as int64 (db_size, nq), each column a permutation of the database; else
    InputMismatch saying what is wrong."""
    ranks = np.asarray(ranks)
    if ranks.shape != (db_size, nq):
        raise InputMismatch(f"ranks have shape {ranks.shape}, expected (database size, number of "
                            f"queries) = ({db_size}, {nq})")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise InputMismatch(f"ranks must be integer database indices, got {ranks.dtype}")
    ranks = ranks.astype(np.int64)
    expected = np.arange(db_size)[:, None]
    bad = np.flatnonzero((np.sort(ranks, axis=0) != expected).any(axis=0))
    if bad.size:
        raise InputMismatch(f"ranks column {bad[0]} (query {bad[0]}) is not a permutation of "
                            f"0..{db_size - 1} ({bad.size} such columns)")
    return ranks


def evaluate(ranks: Mapping[str, np.ndarray] | np.ndarray, gnd: Sequence[Mapping[str, np.ndarray]],
             kappas: Sequence[int] = KAPPAS) -> dict[str, dict[str, float]]:
    """mAP and mP@k in percent for each protocol: ``{"easy": {"mAP", "mP@1", ...}, ...}``.

    ``ranks`` is one array for all protocols, or a mapping protocol -> array (re-ranking removes
    each protocol's junk before verification, so the rankings differ).
    """
    out = {}
    for protocol in PROTOCOLS:
        r = ranks[protocol] if isinstance(ranks, Mapping) else ranks
        m, _, mp, _ = compute_map(r, protocol_gnd(gnd, protocol), kappas)
        out[protocol] = {"mAP": 100.0 * m, **{f"mP@{k}": 100.0 * float(v)
                                               for k, v in zip(kappas, mp, strict=True)}}
    return out


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table: one row per protocol, one column per metric."""
    cols = list(next(iter(results.values())))
    lines = [f"{'':8s}" + "".join(f"{c:>9s}" for c in cols)]
    for protocol, row in results.items():
        lines.append(f"{protocol:8s}" + "".join(f"{row[c]:9.2f}" for c in cols))
    return "\n".join(lines)


def format_rows(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One row per method, as the Revisited Oxford/Paris paper's tables: mAP of Easy, Medium and
    Hard, mP@10 of Medium and Hard."""
    cols = [("E mAP", "easy", "mAP"), ("M mAP", "medium", "mAP"), ("M mP@10", "medium", "mP@10"),
            ("H mAP", "hard", "mAP"), ("H mP@10", "hard", "mP@10")]
    width = max(12, *(len(name) + 2 for name in rows))
    lines = [f"{'':{width}s}" + "".join(f"{c:>9s}" for c, _, _ in cols)]
    for name, res in rows.items():
        lines.append(f"{name:{width}s}" + "".join(f"{res[p][k]:9.2f}" for _, p, k in cols))
    return "\n".join(lines)
