"""ASMK*'s kernel: per image and visual word, the residuals' sum binarised (sign bits), and the
similarity of two images word by word through the Hamming similarity s = 1 - 2 h / B of their
binary residuals, kept where s >= ``similarity_threshold`` and raised to ``alpha``; the sum over
words is divided by sqrt(number of words) of either image (no IDF). The package's overview is
extract/retrieval/asmk/__init__.py.

The Hamming normalisation B (``AsmkConfig.hamming_norm``): the asmk package packs the sign bits
into 32-bit words and divides h by the packed width, D rounded up to a multiple of 32 ("asmk",
the default); the ASMK paper divides by D ("dim"). They agree when D is a multiple of 32, as in
every published setup (128-D); at this project's 40-D default, "asmk" gives s = 1 - 2 h / 64 in
[-0.25, 1] and keeps a word pair (s >= 0) up to h = 32, "dim" up to h = 20.
"""
from __future__ import annotations

import numpy as np

from extract.config import HAMMING_NORMS, AsmkConfig
from extract.errors import InputMismatch, OptionError
from extract.retrieval.asmk.codebook import VisualWords, rounded


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
