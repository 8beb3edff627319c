"""ASMK* initial ranking (aggregated selective match kernel with binarised residuals; Tolias,
Avrithis and Jégou, ICCV 2013), as jenicek/asmk (the ``asmk`` package) computes it.

Each descriptor is assigned to its nearest visual word(s) of a k-means codebook; per image and
word the residuals to the word's centroid are summed and binarised (sign bits); two images are
compared word by word through the Hamming similarity s = 1 - 2 h / B (B: below) of their binary
residuals, kept where s >= ``similarity_threshold`` and raised to ``alpha``; the sum over words
is divided by sqrt(number of words) of either image (no IDF). The defaults of
:class:`AsmkConfig` are the reference parameters of the published DELF-ASMK*, HOW and FIRe
setups.

The Hamming normalisation B (``AsmkConfig.hamming_norm``): the asmk package packs the sign bits
into 32-bit words and divides h by the packed width, D rounded up to a multiple of 32 ("asmk",
the default); the ASMK paper divides by D ("dim"). They agree when D is a multiple of 32, as in
every published setup (128-D); at this project's 40-D default, "asmk" gives s = 1 - 2 h / 64 in
[-0.25, 1] and keeps a word pair (s >= 0) up to h = 32, "dim" up to h = 20.

Word assignment is exact (asmk's Codebook, faiss) or approximate (an HNSW graph over the
centroids, faiss: the default for large codebooks; see :class:`VisualWords`). Aggregation and the inverted file are
vectorised numpy here: asmk's own loop over words in Python costs about 0.25 s per query with
5 assignments, and its lists are over-allocated Python objects. With exact assignment and
``hamming_norm`` "asmk" the scores equal asmk's ASMKMethod at any D (on float16-exact
descriptors, below; tests/test_retrieval_engines.py).

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
from typing import Any, Callable, Iterable, Mapping

import faiss
import h5py
import numpy as np
from asmk.codebook import Codebook
from asmk.index import initialize_index

from extract.config import ASSIGNMENTS, HAMMING_NORMS, HNSW_MAX_DIM, HNSW_MIN_WORDS, AsmkConfig
from extract.errors import InputMismatch, OptionError
from extract.features import plain_attr, storable_attr
from extract.index import as_rows, faiss_threads, kmeans, use_gpu
from train.checkpoint import atomic_path

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


def train_codebook(descriptors: np.ndarray, config: AsmkConfig | None = None) -> np.ndarray:
    """k-means centroids (codebook_size, D) float32 of (n, D) descriptors, :func:`rounded` (faiss)."""
    config = config or AsmkConfig()
    return kmeans(rounded(descriptors), config.codebook_size, niter=config.kmeans_iters, seed=config.seed)


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
             attrs: Mapping[str, Any] | None = None, legacy: Mapping[str, Any] | None = None) -> np.ndarray:
    """The codebook stored at ``path`` when it was made the same way (``config``'s training
    parameters and ``attrs``, e.g. the descriptors' extraction parameters), else trained on
    ``descriptors()`` and stored there. A stored codebook made otherwise is refused; ``legacy``
    gives the value of attributes that files written before they existed lack."""
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
    centroids = train_codebook(x, config)
    save_codebook(path, centroids, {**wanted, "dim": x.shape[1], "num_descriptors": len(x)})
    return centroids


# --- index -------------------------------------------------------------------------------------
def hamming_bits(dim: int, norm: str) -> int:
    """The B of the Hamming similarity 1 - 2 h / B of ``dim``-bit residuals: ``dim`` rounded up
    to a multiple of 32 for ``norm`` "asmk", ``dim`` for "dim"."""
    if norm not in HAMMING_NORMS:
        raise OptionError(f"Hamming normalisation {norm!r}: expected one of {', '.join(HAMMING_NORMS)}")
    return -(-dim // 32) * 32 if norm == "asmk" else dim


WORD_DTYPES = (np.uint64, np.uint32, np.uint16, np.uint8)


def code_columns(codes: np.ndarray) -> list[np.ndarray]:
    """Packed codes (n, B) uint8 as 1-D columns of 8-, 4-, 2- and 1-byte unsigned words, B's
    binary decomposition (5 bytes: a uint32 and a uint8 column; 16: two uint64): the same bits
    and bytes, and the Hamming scan gathers 1-D arrays, several times faster than rows of
    bytes."""
    columns, start = [], 0
    for dtype in WORD_DTYPES:
        width = np.dtype(dtype).itemsize
        while codes.shape[1] - start >= width:
            columns.append(np.ascontiguousarray(codes[:, start:start + width]).view(dtype)[:, 0])
            start += width
    return columns


def code_record(code_bytes: int) -> np.dtype:
    """A structured dtype of ``code_bytes`` bytes whose fields are :func:`code_columns`' words
    (same offsets and types): a (n, B) uint8 array viewed with it gives the columns as fields
    without a copy."""
    names, formats, offsets, start = [], [], [], 0
    for dtype in WORD_DTYPES:
        width = np.dtype(dtype).itemsize
        while code_bytes - start >= width:
            names.append(f"c{len(names)}")
            formats.append(dtype)
            offsets.append(start)
            start += width
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": code_bytes})


class VisualWords:
    """A codebook's centroids and nearest-word assignment (L2). Exact: asmk's Codebook (a flat
    faiss index over the centroids, on the GPU when faiss-gpu sees one). HNSW: a faiss
    IndexHNSWSQ graph over the centroids held as float16 (HNSW_STORAGE: half the memory the
    search walks, so faster, and the same recall on the bench), built here in memory (never
    stored) on one thread, so that the same centroids give the same graph and the same words;
    approximate. On the bench's synthetic 65 536 words (tests/bench/bench_retrieval.py) at 40-D
    with the defaults (48 links, efConstruction 160, efSearch 32): several times faster than exact
    and nearly the same words; at 128-D faster but markedly fewer equal (docs/benchmarks.md).
    ``config.assignment`` auto: HNSW for codebooks of at least HNSW_MIN_WORDS words of at most
    HNSW_MAX_DIM dimensions on the CPU, else exact (cheap for small codebooks; a flat GPU search
    is fast)."""

    def __init__(self, centroids: np.ndarray, config: AsmkConfig | None = None) -> None:
        config = config or AsmkConfig()
        self.centroids = as_rows(centroids)
        self.size, self.dim = self.centroids.shape
        if config.assignment not in ASSIGNMENTS:
            raise OptionError(f"word assignment {config.assignment!r}: expected one of "
                              f"{', '.join(ASSIGNMENTS)}")
        self.kind = config.assignment
        if self.kind == "auto":
            large = self.size >= HNSW_MIN_WORDS and self.dim <= HNSW_MAX_DIM
            self.kind = "hnsw" if large and not use_gpu() else "exact"
        self.ef_search = config.hnsw_ef_search
        if self.kind == "hnsw":
            self._hnsw = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_fp16, config.hnsw_neighbors)
            self._hnsw.hnsw.efConstruction = config.hnsw_ef_construction
            with faiss_threads(1):
                self._hnsw.train(self.centroids)
                self._hnsw.add(self.centroids)
        else:
            self._book = Codebook(initialize_index(gpu_id=0 if use_gpu() else None), size=self.size)
            self._book.index(self.centroids)

    def assign(self, x: np.ndarray, m: int) -> np.ndarray:
        """The ``m`` nearest words (n, min(m, K)) int64 of each row of ``x`` (n, D), nearest
        first. HNSW marks words it did not reach (fewer than ``m`` found, e.g. in a part of the
        graph its search cannot get to) with -1: such rows get their exact words."""
        m = min(m, self.size)
        x = as_rows(x)
        if not len(x):
            return np.empty((0, m), np.int64)
        if self.kind == "exact":
            return self._book.quantize(x, multiple_assignment=m)[1]
        self._hnsw.hnsw.efSearch = max(self.ef_search, m)
        words = self._hnsw.search(x, m)[1].astype(np.int64, copy=False)
        short = (words < 0).any(axis=1)
        if short.any():
            words[short] = faiss.knn(x[short], self.centroids, m)[1]
        return words


def aggregate(x: np.ndarray, words: np.ndarray, centroids: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """One image's ASMK* representation: per distinct visual word w among ``words`` (n, m) of
    descriptors ``x`` (n, D), the sign bits of sum_i (x_i - c_w) over the descriptors assigned
    to w, packed 8 per byte, first dimension in the top bit: (codes (W, ceil(D / 8)) uint8, words
    (W,) int64 increasing)."""
    flat = words.reshape(-1)
    rows = np.repeat(np.arange(len(words)), words.shape[1] if words.ndim == 2 else 1)
    order = np.argsort(flat, kind="stable")
    flat, rows = flat[order], rows[order]
    uniq, start = np.unique(flat, return_index=True)
    if not len(uniq):
        return np.empty((0, (x.shape[1] + 7) // 8), np.uint8), uniq.astype(np.int64)
    sums = np.add.reduceat(x[rows] - centroids[flat], start, axis=0)
    return np.packbits(sums > 0, axis=1), uniq.astype(np.int64)


def represent(words: VisualWords, d: np.ndarray, m: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`aggregate` of the (n, D) descriptors ``d``, :func:`rounded`, assigned to their ``m``
    nearest words; InputMismatch naming ``what`` when D is not the codebook's."""
    d = rounded(d, words.dim)
    if d.shape[1] != words.dim:
        raise InputMismatch(f"{what}: descriptors are {d.shape[1]}-d, the codebook's {words.dim}-d")
    return aggregate(d, words.assign(d, m), words.centroids)


def similarity_kernel(dim: int, config: AsmkConfig) -> np.ndarray:
    """The kernel (dim + 1,) float64 of each Hamming distance h = 0..dim: s = 1 - 2 h / B
    (:func:`hamming_bits`), s^alpha where s >= the similarity threshold, else 0."""
    sim = 1.0 - 2.0 * np.arange(dim + 1) / hamming_bits(dim, config.hamming_norm)
    return np.where(sim >= config.similarity_threshold, sim ** config.alpha, 0.0)


def image_norms(word_counts: np.ndarray) -> np.ndarray:
    """sqrt(number of words) of each image (at least 1): without IDF, its self-similarity."""
    return np.sqrt(np.maximum(word_counts, 1))


def concat_ranges(lo: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices lo[j] .. lo[j] + lengths[j] - 1 of every j, concatenated (int64)."""
    lengths = np.asarray(lengths, np.int64)
    index = np.arange(int(lengths.sum()), dtype=np.int64)
    return index + np.repeat(np.asarray(lo, np.int64) - (np.cumsum(lengths) - lengths), lengths)


def kernel_scores(codes: np.ndarray, lengths: np.ndarray, entry_columns: list[np.ndarray],
                  entry_images: np.ndarray, kernel: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """ASMK* similarity (len(norm),) float64 of a query's words: ``codes`` (W, B) uint8 its
    binary residuals, ``lengths`` (W,) the entries of each word's list, concatenated in
    ``entry_columns`` (:func:`code_columns` of their residuals) and ``entry_images``; per entry
    ``kernel`` of the Hamming distance, summed per image and divided by ``norm`` and
    sqrt(W)."""
    if not len(entry_images):
        return np.zeros(len(norm))
    count = np.uint8 if 8 * codes.shape[1] < 256 else np.intp   # the largest distance fits
    hamming = sum(np.bitwise_count(np.repeat(q, lengths) ^ c).astype(count, copy=False)
                  for q, c in zip(code_columns(codes), entry_columns, strict=True))
    scores = np.bincount(entry_images, kernel[hamming], minlength=len(norm))
    return scores / norm / np.sqrt(len(codes))


class AsmkIndex:
    """ASMK* inverted file of database images: per visual word, the (image, binary residual)
    pairs of the images that have it, stored contiguously (entries sorted by word)."""

    def __init__(self, words: VisualWords | np.ndarray, descriptors: Iterable[np.ndarray],
                 config: AsmkConfig | None = None) -> None:
        """``words``: the codebook (or its (K, D) centroids); ``descriptors``: the (n_i, D)
        descriptors of database image i = 0, 1, ... (any iterable: images are read one at a
        time; an image without descriptors scores 0)."""
        self.config = config or AsmkConfig()
        self.words = words if isinstance(words, VisualWords) else VisualWords(words, self.config)
        self.dim = self.words.dim
        codes, word_ids, images = [], [], []
        self.num_images = 0
        for i, d in enumerate(descriptors):
            c, w = represent(self.words, d, self.config.db_assignments, f"database image {i}")
            codes.append(c)
            word_ids.append(w)
            images.append(np.full(len(w), i, np.int32))
            self.num_images = i + 1
        word_ids_all = np.concatenate(word_ids) if word_ids else np.empty(0, np.int64)
        order = np.argsort(word_ids_all, kind="stable")
        self.codes = code_columns((np.concatenate(codes) if codes else
                                   np.empty((0, (self.dim + 7) // 8), np.uint8))[order])
        self.images = (np.concatenate(images) if images else np.empty(0, np.int32))[order]
        self.offsets = np.concatenate([[0], np.cumsum(np.bincount(word_ids_all,
                                                                  minlength=self.words.size))])
        # no IDF: an image's self-similarity is its number of words
        self.norm = image_norms(np.bincount(self.images, minlength=self.num_images))
        self.kernel = similarity_kernel(self.dim, self.config)

    @property
    def num_entries(self) -> int:
        """(image, visual word) pairs stored."""
        return len(self.images)

    @property
    def nbytes(self) -> int:
        """Memory of the inverted file (codes, image ids, word offsets, image norms, the kernel's
        table); the codebook (shared by every database) not counted."""
        return (sum(c.nbytes for c in self.codes) + self.images.nbytes + self.offsets.nbytes
                + self.norm.nbytes + self.kernel.nbytes)

    def query(self, descriptors: np.ndarray) -> np.ndarray:
        """ASMK* similarity (num database images,) float64 of one query's (n, D) descriptors."""
        return self.search(*represent(self.words, descriptors, self.config.query_assignments, "query"))

    def search(self, codes: np.ndarray, words: np.ndarray) -> np.ndarray:
        """ASMK* similarity (num database images,) float64 of an aggregated query (``codes``,
        ``words`` as :func:`aggregate` returns them): per shared word, s = 1 - 2 hamming / B
        (:func:`hamming_bits`), kept where s >= the threshold and raised to alpha, summed per
        image and divided by sqrt(words of the query * words of the image)."""
        lo = self.offsets[words]
        lengths = self.offsets[words + 1] - lo
        entry = concat_ranges(lo, lengths)
        return kernel_scores(codes, lengths, [c[entry] for c in self.codes], self.images[entry],
                             self.kernel, self.norm)

    def scores(self, queries: Iterable[np.ndarray]) -> np.ndarray:
        """ASMK* similarities (num queries, num database images) float64 of queries' (n, D)
        descriptors (any iterable: read one at a time)."""
        rows = [self.query(q) for q in queries]
        return np.stack(rows) if rows else np.zeros((0, self.num_images))
