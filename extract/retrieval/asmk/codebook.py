"""ASMK*'s visual-word codebook: k-means training, the codebook file, and word assignment
(:class:`VisualWords`).

Word assignment is exact (extract/retrieval/asmk/assignment.py) or approximate (an HNSW graph
over the centroids, faiss: the default for large low-dimensional codebooks on a CPU; see
:class:`VisualWords`).

Descriptors are rounded to float16 (numpy's round to nearest) before codebook training, word
assignment and aggregation: a feature file that stores them as float16 (``--descriptor_dtype
float16``) then gives the codebook, the index and the scores of its float32 original, bit for bit.
Without it, a residual sum's component within float16's rounding of 0 flips its sign bit, and
images of near-equal scores swap places. The asmk package binarises the float32 sums: the scores
equal its own on descriptors that float16 holds exactly (the tests use such) and differ in a few
sign bits otherwise (docs/evaluation.md gives how many).

The codebook is plain arrays in HDF5 (``centroids`` (K, D) float32 and attributes saying how it
was made), written atomically and reused when present. asmk's own caches are pickles and are
never used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import faiss
import h5py
import numpy as np
import torch

from extract.config import ASSIGNMENTS, HNSW_MAX_DIM, HNSW_MIN_WORDS, AsmkConfig
from extract.errors import OptionError
from extract.extraction.feature_file import plain_attr, storable_attr
from extract.retrieval.asmk.assignment import NearestWords
from extract.retrieval.faiss_search import as_rows, faiss_threads, kmeans
from train.outputs import atomic_path

CODEBOOK_FORMAT = "delf-pytorch asmk codebook 1"


# the precision descriptors are rounded to before ASMK* sees them (the module's doc)
DESCRIPTOR_ROUNDING = "float16"


# how the HNSW graph holds the centroids it compares (VisualWords: faiss's QT_fp16)
HNSW_STORAGE = "float16"


class CodebookError(RuntimeError):
    """A codebook file is unreadable or was made with other parameters; the message says which."""


# --- codebook ----------------------------------------------------------------------------------
def rounded(descriptors: np.ndarray, dim: int | None = None) -> np.ndarray:
    """(n, D) descriptors rounded to DESCRIPTOR_ROUNDING, as float32 rows (:func:`as_rows`)."""
    return as_rows(as_rows(descriptors, dim).astype(DESCRIPTOR_ROUNDING))


def train_codebook(descriptors: np.ndarray, config: AsmkConfig | None = None, gpu: int | None = None) -> np.ndarray:
    """k-means centroids (codebook_size, D) float32 of (n, D) descriptors, :func:`rounded` (faiss;
    on faiss's GPU ``gpu``, see :func:`extract.retrieval.faiss_search.faiss_gpu`)."""
    config = config or AsmkConfig()
    return kmeans(rounded(descriptors), config.codebook_size, niter=config.kmeans_iters, seed=config.seed, gpu=gpu)


def codebook_attrs(config: AsmkConfig) -> dict[str, Any]:
    """The attributes that say how a codebook was trained (compared on reuse)."""
    return {"codebook_size": config.codebook_size, "kmeans_iters": config.kmeans_iters,
            "seed": config.seed, "descriptor_rounding": DESCRIPTOR_ROUNDING}


def save_codebook(path: Path, centroids: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """Write ``centroids`` and ``attrs`` to HDF5 atomically (never a partial file at ``path``)."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("centroids", data=as_rows(centroids))
            f.attrs.update({k: storable_attr(v) for k, v in {"format": CODEBOOK_FORMAT, **attrs}.items()})


def load_codebook(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(centroids (K, D) float32, attributes) of a codebook file; CodebookError naming the file
    and the reason when it is not one."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
            centroids = f["centroids"][()] if "centroids" in f else None
    except OSError as e:
        raise CodebookError(f"{path}: not a readable HDF5 file ({e})") from None
    if attrs.get("format") != CODEBOOK_FORMAT or centroids is None:
        raise CodebookError(f"{path}: not an ASMK codebook of this project")
    if centroids.ndim != 2 or not np.isfinite(centroids).all():
        raise CodebookError(f"{path}: centroids are not a finite (K, D) array")
    return np.ascontiguousarray(centroids, dtype=np.float32), attrs


def codebook(path: Path, descriptors: Callable[[], np.ndarray], config: AsmkConfig | None = None,
             attrs: Mapping[str, Any] | None = None, legacy: Mapping[str, Any] | None = None,
             gpu: int | None = None) -> np.ndarray:
    """The codebook stored at ``path`` when it was made the same way (``config``'s training
    parameters and ``attrs``, e.g. the descriptors' extraction parameters), else trained on
    ``descriptors()`` (on faiss's GPU ``gpu``, None: the CPU) and stored there. A stored codebook
    made otherwise is refused; ``legacy`` gives the value of attributes that files written before
    they existed lack."""
    config = config or AsmkConfig()
    wanted = {**codebook_attrs(config), **(attrs or {})}
    if path.is_file():
        centroids, stored = load_codebook(path)
        stored = {**(legacy or {}), **stored}
        now = {k: plain_attr(storable_attr(v)) for k, v in wanted.items()}
        diffs = [f"{k}: {stored.get(k)!r} in the file, {v!r} now" for k, v in now.items() if stored.get(k) != v]
        if diffs:
            raise CodebookError(f"{path}: codebook made with other parameters ("
                                + "; ".join(diffs) + "): delete it to train a new one")
        return centroids
    x = as_rows(descriptors())
    centroids = train_codebook(x, config, gpu)
    save_codebook(path, centroids, {**wanted, "dim": x.shape[1], "num_descriptors": len(x)})
    return centroids


class VisualWords:
    """A codebook's centroids and nearest-word assignment (L2). Exact: :class:`NearestWords`
    (extract/retrieval/asmk/assignment.py: a blocked bfloat16 product certified by an exact
    re-ranking where the device multiplies bfloat16 natively, else float32 or faiss's flat search;
    the same words whichever, faiss ``IndexFlatL2``'s). HNSW: a faiss IndexHNSWSQ graph over the
    centroids held as float16 (HNSW_STORAGE: half the memory the search walks, so faster, and the
    same recall on the bench), built here in memory (never stored) on one thread, so that the same
    centroids give the same graph and the same words; approximate. On the bench's synthetic 65 536
    words (tests/bench/bench_retrieval.py) at 40-D with the defaults (48 links, efConstruction 160,
    efSearch 32): faster than exact and nearly the same words; at 128-D markedly fewer equal
    (docs/benchmarks.md). ``config.assignment`` auto: HNSW for codebooks of at least HNSW_MIN_WORDS
    words of at most HNSW_MAX_DIM dimensions on the CPU, else exact. ``gpu``: the CUDA device index
    of the run (:func:`extract.retrieval.faiss_search.faiss_gpu`), where numpy rows are assigned;
    None: the CPU. A torch tensor is assigned on its own device."""

    def __init__(self, centroids: np.ndarray, config: AsmkConfig | None = None, gpu: int | None = None) -> None:
        config = config or AsmkConfig()
        self.centroids = as_rows(centroids)
        self.size, self.dim = self.centroids.shape
        if config.assignment not in ASSIGNMENTS:
            raise OptionError(f"word assignment {config.assignment!r}: expected one of "
                              f"{', '.join(ASSIGNMENTS)}")
        self.kind = config.assignment
        if self.kind == "auto":
            large = self.size >= HNSW_MIN_WORDS and self.dim <= HNSW_MAX_DIM
            self.kind = "hnsw" if large and gpu is None else "exact"
        self.exact = NearestWords(self.centroids, device="cpu" if gpu is None else f"cuda:{gpu}")
        self.ef_search = config.hnsw_ef_search
        if self.kind == "hnsw":
            self._hnsw = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_fp16, config.hnsw_neighbors)
            self._hnsw.hnsw.efConstruction = config.hnsw_ef_construction
            with faiss_threads(1):
                self._hnsw.train(self.centroids)
                self._hnsw.add(self.centroids)

    def assign(self, x: np.ndarray | torch.Tensor, m: int) -> np.ndarray | torch.Tensor:
        """The ``m`` nearest words (n, min(m, K)) int64 of each row of ``x`` (n, D), nearest
        first: numpy for a numpy array; for a torch tensor, a tensor on its device (exact words
        are computed there). HNSW marks words it did not reach (fewer than ``m`` found, e.g. in a
        part of the graph its search cannot get to) with -1: such rows get their exact words."""
        if isinstance(x, torch.Tensor):
            if self.kind == "exact":
                return self.exact(x, min(m, self.size))
            return torch.from_numpy(self.assign(x.cpu().numpy(), m)).to(x.device)
        m = min(m, self.size)
        x = as_rows(x)
        if not len(x):
            return np.empty((0, m), np.int64)
        if self.kind == "exact":
            return self.exact(x, m)
        self._hnsw.hnsw.efSearch = max(self.ef_search, m)
        words = self._hnsw.search(x, m)[1].astype(np.int64, copy=False)
        short = (words < 0).any(axis=1)
        if short.any():
            words[short] = self.exact(x[short], m)
        return words
