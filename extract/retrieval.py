"""Image retrieval with DeLF local features: a descriptor index, initial ranking by
nearest-neighbour votes, and re-ranking by RANSAC inliers (as the DeLF paper and the official
image_reranking.py; matching defaults in extract/config.py, MatchConfig).

The index holds every database descriptor (unit length). Small databases are searched exactly
(chunked matrix products); large ones through an inverted file (IVF): descriptors are grouped by
their nearest of ``nlist`` k-means centroids and a query descriptor scans the ``nprobe`` cells
whose centroids are most similar. The centroids come from a two-level k-means (sqrt(nlist)
coarse clusters, each split again), so building for millions of descriptors takes seconds, not
minutes. Many query descriptors are searched at once: each cell is then scanned once for all the
query descriptors that probe it, which keeps Python overhead per query small.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from extract.config import EvalConfig, MatchConfig
from extract.matching import match_features
from train.runtime import limit_threads

EXACT_MAX = 1 << 18          # databases up to this many descriptors are searched exactly
_QUERY_BLOCK = 4096          # query descriptors per matrix product
_ROW_BLOCK = 8192            # database descriptors (or centroids) per matrix product


def _matrix(d: Any, dim: int) -> np.ndarray:
    """Descriptors as a float32 (n, dim) array; empty input of any shape gives (0, dim)."""
    d = np.asarray(d, dtype=np.float32)
    return d.reshape(len(d), -1) if d.size else np.empty((0, dim), np.float32)


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest centroid (L2), in blocks."""
    c_sq = (centroids * centroids).sum(1)
    return torch.cat([torch.addmm(c_sq, x[s:s + _ROW_BLOCK], centroids.T, alpha=-2).argmin(1)
                      for s in range(0, len(x), _ROW_BLOCK)])


def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means from k random points; an empty cluster restarts at a random point."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, len(x))
    centroids = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = _nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0
        centroids = sums / counts.clamp(min=1)[:, None]
        if empty.any():
            centroids[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=g)]
    return centroids


def auto_nlist(num_descriptors: int) -> int:
    """1 (exact search) up to EXACT_MAX descriptors, else about one cell per 1000 descriptors
    (a power of two): 4096 cells for 5M descriptors."""
    if num_descriptors <= EXACT_MAX:
        return 1
    return 1 << round(math.log2(num_descriptors / 1000))


class DescriptorIndex:
    """The database descriptors of many images, grouped by IVF cell, searchable by k-NN."""

    def __init__(self, descriptors: Sequence[np.ndarray], nlist: int = 0, seed: int = 0) -> None:
        """``descriptors[i]``: (n_i, D) unit descriptors of image i; ``nlist`` 0 = auto_nlist."""
        counts = np.array([len(d) for d in descriptors], dtype=np.int64)
        self.num_images = len(descriptors)
        self.image_offsets = np.concatenate([[0], np.cumsum(counts)])
        dims = {np.shape(d)[1] for d in descriptors if len(d)}
        if len(dims) > 1:
            raise ValueError(f"database descriptors have different dimensions: {sorted(dims)}")
        self.dim = dims.pop() if dims else 0
        x = torch.from_numpy(np.concatenate([_matrix(d, self.dim) for d in descriptors]))
        self.nlist = nlist or auto_nlist(len(x))
        if self.nlist > 1 and len(x) >= self.nlist:
            with limit_threads(1):
                self.centroids: torch.Tensor | None = self._train(x, self.nlist, seed)
                self.nlist = len(self.centroids)
                cell = self._assign(x)
        else:
            self.nlist, self.centroids = 1, None
            cell = torch.zeros(len(x), dtype=torch.long)
        order = torch.argsort(cell, stable=True)
        self.x = x.index_select(0, order)                   # descriptors sorted by cell
        del x
        image = torch.repeat_interleave(torch.arange(self.num_images), torch.from_numpy(counts))
        self.image = image[order].numpy()                   # image of each sorted row
        self.position = np.empty(len(order), dtype=np.int64)  # original row -> sorted row
        self.position[order.numpy()] = np.arange(len(order))
        self.cell_offsets = torch.cat([torch.zeros(1, dtype=torch.long),
                                       torch.bincount(cell, minlength=self.nlist).cumsum(0)])

    def _train(self, x: torch.Tensor, nlist: int, seed: int) -> torch.Tensor:
        """Two-level k-means centroids: sqrt(nlist) coarse clusters, each split in about
        sqrt(nlist) cells, trained on up to 32 points per cell."""
        g = torch.Generator().manual_seed(seed)
        sample = x[torch.randperm(len(x), generator=g)[:32 * nlist]]
        n_top = max(1, round(math.sqrt(nlist)))
        self._top = kmeans(sample, n_top, seed=seed)
        top = _nearest(sample, self._top)
        leaves, self._children, first = [], [], 0
        for t in range(len(self._top)):
            members = sample[top == t]
            part = kmeans(members, nlist // n_top, seed=seed + t + 1) if len(members) \
                else self._top[t:t + 1]
            self._children.append(torch.arange(first, first + len(part)))
            leaves.append(part)
            first += len(part)
        return torch.cat(leaves)

    def _assign(self, x: torch.Tensor) -> torch.Tensor:
        """Each descriptor's cell: nearest coarse cluster, then its nearest child cell."""
        top = _nearest(x, self._top)
        by_top = torch.argsort(top)
        ends = torch.bincount(top, minlength=len(self._top)).cumsum(0).tolist()
        cell = torch.empty(len(x), dtype=torch.long)
        for children, lo, hi in zip(self._children, [0] + ends[:-1], ends, strict=True):
            rows = by_top[lo:hi]
            cell[rows] = children[_nearest(x.index_select(0, rows), self.centroids[children])]
        return cell

    @property
    def nbytes(self) -> int:
        """Memory held by the index: descriptors, row maps, cell offsets, centroids (both levels)."""
        tensors = [self.x, self.cell_offsets]
        if self.centroids is not None:
            tensors += [self.centroids, self._top, *self._children]
        return (sum(t.numel() * t.element_size() for t in tensors) + self.image.nbytes + self.image_offsets.nbytes
                + self.position.nbytes)

    def image_descriptors(self, i: int) -> np.ndarray:
        """The descriptors of database image ``i``, in their original order."""
        rows = self.position[self.image_offsets[i]:self.image_offsets[i + 1]]
        return self.x.numpy()[rows]

    def search(self, queries: np.ndarray, k: int, nprobe: int = EvalConfig.nprobe) -> tuple[np.ndarray, np.ndarray]:
        """k most similar database descriptors (inner product) of each query descriptor:
        (similarities (n, k) float32 descending, database images (n, k) int64; -1 where fewer
        than k candidates)."""
        with limit_threads(1):
            return self._search(queries, k, nprobe)

    def _search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(_matrix(queries, self.dim)))
        n = len(q)
        if n and q.shape[1] != self.dim:
            raise ValueError(f"query descriptors are {q.shape[1]}-d, the database's {self.dim}-d")
        if n == 0 or len(self.x) == 0:
            return np.zeros((n, k), np.float32), np.full((n, k), -1, np.int64)
        if self.centroids is None:
            cells = torch.zeros((n, 1), dtype=torch.long)
        else:
            c, half_sq = self.centroids, 0.5 * (self.centroids ** 2).sum(1)
            cells = torch.cat([torch.addmm(-half_sq, q[b:b + _QUERY_BLOCK], c.T)
                               .topk(min(nprobe, self.nlist), 1)[1]
                               for b in range(0, n, _QUERY_BLOCK)])
        probes = cells.shape[1]
        best_v = torch.full((n, probes, k), -math.inf)
        best_r = torch.full((n, probes, k), -1, dtype=torch.long)
        flat = cells.reshape(-1)
        order = torch.argsort(flat, stable=True)
        uniq, sizes = torch.unique_consecutive(flat[order], return_counts=True)
        start = 0
        for c, size in zip(uniq.tolist(), sizes.tolist(), strict=True):
            lo, hi = int(self.cell_offsets[c]), int(self.cell_offsets[c + 1])
            if hi == lo:
                start += size
                continue
            for b in range(start, start + size, _QUERY_BLOCK):
                pairs = order[b:min(start + size, b + _QUERY_BLOCK)]
                qi, slot = pairs // probes, pairs % probes
                v, r = self._scan(q[qi], lo, hi, k)
                best_v[qi, slot, :v.shape[1]] = v
                best_r[qi, slot, :r.shape[1]] = r
            start += size
        v, j = best_v.reshape(n, -1).topk(k, 1)
        r = best_r.reshape(n, -1).gather(1, j).numpy()
        return v.numpy(), np.where(r >= 0, self.image[np.maximum(r, 0)], -1)

    def _scan(self, q: torch.Tensor, lo: int, hi: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (similarity, sorted row) of ``q`` among rows lo:hi, scanned in blocks."""
        v = r = None
        for s in range(lo, hi, _ROW_BLOCK):
            sims = q @ self.x[s:min(hi, s + _ROW_BLOCK)].T
            bv, br = sims.topk(min(k, sims.shape[1]), 1)
            if v is None:
                v, r = bv, br + s
            else:
                v, idx = torch.cat([v, bv], 1).topk(min(k, v.shape[1] + bv.shape[1]), 1)
                r = torch.cat([r, br + s], 1).gather(1, idx)
        return v, r


def vote_scores(sims: np.ndarray, images: np.ndarray, num_images: int) -> np.ndarray:
    """Initial score of each database image: over the query descriptors, the similarity of the
    best of its k nearest neighbours lying in that image (one vote per descriptor and image,
    negative similarities count 0)."""
    valid = images >= 0
    desc = np.broadcast_to(np.arange(len(images))[:, None], images.shape)[valid]
    key = desc.astype(np.int64) * num_images + images[valid]
    sim = sims[valid].astype(np.float64)
    order = np.lexsort((-sim, key))                  # by key, best similarity first
    key, sim = key[order], sim[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    return np.bincount(key[first] % num_images, weights=np.maximum(sim[first], 0.0),
                       minlength=num_images)


def rank(scores: np.ndarray) -> np.ndarray:
    """Database indices by decreasing score; ties by increasing index."""
    return np.lexsort((np.arange(len(scores)), -scores))


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


@dataclass
class Database:
    """Database images' keypoints and their descriptor index."""

    keypoints: list[np.ndarray]
    index: DescriptorIndex

    def features(self, i: int) -> dict[str, np.ndarray]:
        return {"keypoints": self.keypoints[i], "descriptors": self.index.image_descriptors(i)}

    def initial_scores(self, queries: Sequence[np.ndarray], k: int, nprobe: int,
                       batch: int = 64) -> np.ndarray:
        """Vote scores (num queries, num database images) of each query's descriptors; queries
        are searched ``batch`` at a time, so each IVF cell is scanned once per batch."""
        scores = np.zeros((len(queries), self.index.num_images))
        for b in range(0, len(queries), batch):
            group = [_matrix(d, self.index.dim) for d in queries[b:b + batch]]
            sims, images = self.index.search(np.concatenate(group), k, nprobe)
            ends = np.cumsum([len(d) for d in group])
            for i, (lo, hi) in enumerate(zip(np.r_[0, ends[:-1]], ends, strict=True)):
                scores[b + i] = vote_scores(sims[lo:hi], images[lo:hi], self.index.num_images)
        return scores
