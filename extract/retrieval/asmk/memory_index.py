"""ASMK* index held in memory (:class:`AsmkIndex`): the aggregated database as vectorised numpy
arrays, scored query by query. The stored index for large databases is stored_index.py."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from extract.config import AsmkConfig
from extract.retrieval.asmk.codebook import VisualWords
from extract.retrieval.asmk.kernel import (
    code_columns,
    concat_ranges,
    image_norms,
    kernel_scores,
    represent,
    similarity_kernel,
)


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
