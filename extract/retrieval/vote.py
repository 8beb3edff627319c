"""Initial ranking by nearest-neighbour votes of DeLF local features ("vote"; ASMK* is
extract/retrieval/asmk/).

The vote index keeps every database descriptor (unit length, float32) and searches them with
faiss (extract/retrieval/faiss_search.py): exactly for small databases, through an inverted file
for large ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from extract.errors import InputMismatch
from extract.retrieval.faiss_search import IndexConfig, KnnIndex, as_rows


class DescriptorIndex:
    """The database descriptors of many images (kept in their original order, for
    verification), searchable by k-NN through a faiss index (extract/retrieval/faiss_search.py)."""

    def __init__(self, descriptors: Sequence[np.ndarray], nlist: int = 0) -> None:
        """``descriptors[i]``: (n_i, D) unit descriptors of image i; ``nlist`` 0: auto (exact
        search for small databases)."""
        counts = np.array([len(d) for d in descriptors], dtype=np.int64)
        self.num_images = len(descriptors)
        self.image_offsets = np.concatenate([[0], np.cumsum(counts)])
        dims = {np.shape(d)[1] for d in descriptors if len(d)}
        if len(dims) > 1:
            raise InputMismatch(f"database descriptors have different dimensions: {sorted(dims)}")
        self.dim = dims.pop() if dims else 0
        self.x = np.concatenate([as_rows(d, self.dim) for d in descriptors]) if descriptors \
            else np.empty((0, 0), np.float32)
        self.image = np.repeat(np.arange(self.num_images, dtype=np.int64), counts)
        self.knn = KnnIndex(self.x, IndexConfig(nlist=nlist))

    @property
    def nlist(self) -> int:
        """IVF cells (1: exact search)."""
        return self.knn.nlist

    @property
    def nbytes(self) -> int:
        """Memory held by the index: descriptors, their images, image offsets, the faiss
        structure."""
        return self.x.nbytes + self.image.nbytes + self.image_offsets.nbytes + self.knn.nbytes

    def image_descriptors(self, i: int) -> np.ndarray:
        """The descriptors of database image ``i``, in their original order."""
        return self.x[self.image_offsets[i]:self.image_offsets[i + 1]]

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k most similar database descriptors (inner product) of each query descriptor:
        (similarities (n, k) float32 descending, database images (n, k) int64; -1 where fewer
        than k candidates). faiss's threads: its default ($OMP_NUM_THREADS or all cores)."""
        sims, rows = self.knn.search(as_rows(queries, self.dim), k, nprobe)
        return sims, np.where(rows >= 0, self.image[np.maximum(rows, 0)], -1)


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


@dataclass
class Database:
    """Database images' keypoints and their descriptor index."""

    keypoints: list[np.ndarray]
    index: DescriptorIndex

    def features(self, i: int) -> dict[str, np.ndarray]:
        """Keypoints and descriptors of database image ``i`` (held in memory)."""
        return {"keypoints": self.keypoints[i], "descriptors": self.index.image_descriptors(i)}

    def initial_scores(self, queries: Sequence[np.ndarray], k: int, nprobe: int,
                       batch: int = 64) -> np.ndarray:
        """Vote scores (num queries, num database images) of each query's descriptors; queries
        are searched ``batch`` at a time, so each IVF cell is scanned once per batch."""
        scores = np.zeros((len(queries), self.index.num_images))
        for b in range(0, len(queries), batch):
            group = [as_rows(d, self.index.dim) for d in queries[b:b + batch]]
            sims, images = self.index.search(np.concatenate(group), k, nprobe)
            ends = np.cumsum([len(d) for d in group])
            for i, (lo, hi) in enumerate(zip(np.r_[0, ends[:-1]], ends, strict=True)):
                scores[b + i] = vote_scores(sims[lo:hi], images[lo:hi], self.index.num_images)
        return scores
