"""Nearest neighbours and k-means on faiss (faiss-cpu, or faiss-gpu where installed).

Vectors are float32 rows; similarity is the inner product (cosine for unit vectors). Small sets
are searched exactly (``faiss.knn`` over the caller's array, no copy); large ones through an
inverted file: rows are grouped by their nearest of ``nlist`` k-means centroids and a query scans
the ``nprobe`` most similar cells, storing the rows as they are (IVF-Flat) or product-quantised
(IVF-PQ, ``pq_m`` bytes per row). faiss's OpenMP pool sets the threads (``faiss_threads``).

k-means and ASMK*'s exact word assignment run on the run's GPU when faiss has GPU support
(faiss-gpu): :func:`faiss_gpu` maps the run's device to the GPU faiss uses, and None (the CPU) for
a CPU run, never GPU 0 or every GPU by default.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import faiss
import numpy as np
import torch

from extract.config import INDEX_KINDS, IndexConfig
from extract.errors import InputMismatch, OptionError


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """faiss's OpenMP threads set to ``n`` inside the block (n <= 0: unchanged)."""
    before = faiss.omp_get_max_threads()
    if n > 0:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def faiss_gpu(device: str | torch.device | None) -> int | None:
    """The GPU faiss runs on for a run on ``device``: its index when ``device`` is a CUDA device
    and this faiss has GPU support that sees it (faiss-gpu), else None (the CPU). faiss numbers the
    GPUs as torch does (both after CUDA_VISIBLE_DEVICES); "cuda" alone is torch's current GPU."""
    if device is None or torch.device(device).type != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        return None
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return index if index < faiss.get_num_gpus() else None


def as_rows(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, dim) array (no copy when it already is one)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size == 0:
        return np.empty((0, dim if dim is not None else (x.shape[-1] if x.ndim == 2 else 0)),
                        np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {x.shape}")
    return x


def kmeans(x: np.ndarray, k: int, niter: int = 10, seed: int = 0,
           max_points_per_centroid: int = 256, gpu: int | None = None) -> np.ndarray:
    """k-means (L2) centroids (k, D) float32 of the rows of ``x`` (faiss.Kmeans), on faiss's GPU
    ``gpu`` (:func:`faiss_gpu`; None: the CPU). At most ``max_points_per_centroid`` * k rows are
    used (a random sample), as faiss does."""
    x = as_rows(x)
    if len(x) < k:
        raise InputMismatch(f"k-means of {len(x)} vectors into {k} clusters: need at least {k} vectors")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                      verbose=False)
    if gpu is not None:  # faiss.Kmeans(gpu=True) would spread it over every GPU
        resources = faiss.StandardGpuResources()  # kept alive while the index is used
        km.index = faiss.index_cpu_to_gpu(resources, gpu, km.index)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def auto_nlist(n: int, exact_max: int = IndexConfig.exact_max) -> int:
    """1 (exact search) up to ``exact_max`` rows, else about one cell per 1000 rows (a power of
    two): 4096 cells for 5M rows."""
    if n <= exact_max:
        return 1
    return 1 << round(math.log2(n / 1000))


class KnnIndex:
    """Inner-product k-NN over the rows of one (n, D) float32 array."""

    def __init__(self, x: np.ndarray, config: IndexConfig | None = None) -> None:
        config = config or IndexConfig()
        if config.kind not in INDEX_KINDS:
            raise OptionError(f"index kind {config.kind!r}: expected one of {', '.join(INDEX_KINDS)}")
        self.config = config
        self.x = as_rows(x)
        self.ntotal, self.dim = self.x.shape
        nlist = config.nlist or auto_nlist(self.ntotal, config.exact_max)
        kind = config.kind
        if kind == "auto":
            kind = "flat" if nlist <= 1 else "ivf"
        if kind != "flat":
            nlist = min(max(nlist, 2), self.ntotal)
            if nlist < 2:
                kind = "flat"
        self.kind, self.nlist = kind, (1 if kind == "flat" else nlist)
        self.index: faiss.Index | None = None
        if kind != "flat":
            self.index = self._build_ivf()

    def _build_ivf(self) -> faiss.Index:
        quantizer = faiss.IndexFlatIP(self.dim)
        if self.kind == "ivfpq":
            if self.dim % self.config.pq_m:
                raise OptionError(f"IVF-PQ: {self.config.pq_m} sub-quantisers do not divide "
                                  f"{self.dim} dimensions")
            index = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.config.pq_m, 8,
                                     faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed, index.cp.niter = self.config.seed, self.config.train_iters
        rng = np.random.default_rng(self.config.seed)
        n_train = min(self.ntotal, max(self.config.train_per_cell * self.nlist, 256 * 40))
        sample = self.x[np.sort(rng.choice(self.ntotal, n_train, replace=False))]
        index.cp.max_points_per_centroid = max(1, math.ceil(n_train / self.nlist))
        index.train(sample)
        index.add(self.x)
        return index

    @property
    def nbytes(self) -> int:
        """Memory of the search structure: inverted lists (codes and ids), centroids and, for
        IVF-PQ, the sub-quantisers' codebooks; the flat kind searches the caller's array and
        holds nothing of its own."""
        if self.index is None:
            return 0
        codes = self.ntotal * (self.index.invlists.code_size + 8)
        pq = self.index.pq.centroids.size() * 4 if self.kind == "ivfpq" else 0
        return codes + self.nlist * self.dim * 4 + pq

    def search(self, q: np.ndarray, k: int, nprobe: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar rows of each query row: (similarities (n, k) float32 descending,
        row ids (n, k) int64; -1 and similarity -inf where fewer than k were found)."""
        q = as_rows(q, self.dim)
        if q.shape[1] != self.dim:
            raise InputMismatch(f"query vectors are {q.shape[1]}-d, the index's {self.dim}-d")
        if len(q) == 0 or self.ntotal == 0 or k <= 0:
            return (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
        if self.index is None:
            sims, ids = faiss.knn(q, self.x, min(k, self.ntotal), metric=faiss.METRIC_INNER_PRODUCT)
        else:
            self.index.nprobe = min(nprobe or self.config.nprobe, self.nlist)
            sims, ids = self.index.search(q, k)
        sims, ids = np.asarray(sims, np.float32), np.asarray(ids, np.int64)
        if sims.shape[1] < k:
            pad = k - sims.shape[1]
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        sims[ids < 0] = -np.inf
        return sims, ids
