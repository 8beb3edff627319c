"""The stored index's scan, compiled: a query's inverted lists read from the memory-mapped
``ids.npy`` and ``codes.npy`` (the formats: stored_index.py), each entry's image id decoded from its
varint, its Hamming distance to the query's residual looked up in the kernel and added to its
image's score.

The scores are bit-identical to :func:`extract.retrieval.asmk.kernel.kernel_scores` (and so to the
in-memory index and the asmk package): each image's float64 sum is accumulated in the same order,
the query's words in the order given, each list's entries in image order, starting from 0.0.

Threads (numba's, ``numba.set_num_threads``) share the images, not the lists: thread t adds the
terms of the images of its stripe of ids, reading every list in the query's order, so each image's
sum is made by one thread in the same order whatever the number of threads. A list's ids are
differences, so a thread decodes each list from its start up to the end of its stripe (the last
thread: all of it) and computes Hamming distances only within its stripe; the stripes narrow from
the first to the last thread so that their work evens out (:data:`DECODE_SHARE`).

Every list read is checked on the way, as the structure demands: its varints end within its bytes,
it holds as many ids as the offsets say, each difference is positive and every id below the image
count, and no residual has bits set past its D dimensions (the packed codes' padding is zero). A
problem stops the scan; :data:`PROBLEMS` says what the first one in the query's word order (then
in the list's order) was, for the caller's one-line error.
"""
from __future__ import annotations

import numba
import numpy as np

# the problems scan_lists reports (its first return value; OK when none), and what each says
OK, CONTINUES, COUNT, DIFFERENCE_RANGE, NOT_INCREASING, ID_RANGE, CODE_BITS = range(7)
PROBLEMS = {CONTINUES: "a list's last id continues past its bytes",
            COUNT: "a list holds another number of ids than offsets.npy says",
            DIFFERENCE_RANGE: "an id or difference not below the image count {images}",
            NOT_INCREASING: "ids not strictly increasing",
            ID_RANGE: "an id not below the image count {images}",
            CODE_BITS: "a Hamming distance above D = {dim}: bits set in a residual's padding"}

# set bits of each byte value
BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], np.int64)
# the share of an entry's cost that decoding its id takes (the rest: its Hamming distance and its
# score), which sets the stripes: a thread decodes the stripes before its own too (tests/bench/
# bench_retrieval.py --part stored prints each thread count's time)
DECODE_SHARE = 0.3


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _list_problem(id_bytes: np.ndarray, lo: int, hi: int, length: int) -> int:
    """What is wrong with the varints id_bytes[lo:hi] of a list of ``length`` ids, before they are
    decoded (so that decoding stays within them): the last byte must end a value, as many bytes
    must end one as the list holds ids."""
    if hi > lo and id_bytes[hi - 1] >= 128:
        return CONTINUES
    ends = 0
    for p in range(lo, hi):
        ends += id_bytes[p] < 128
    return COUNT if ends != length else OK


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _scan_list(id_bytes: np.ndarray, p: int, hi: int, codes: np.ndarray, entry: int, length: int,
               query_code: np.ndarray, kernel: np.ndarray, dim: int, scores: np.ndarray, first: int,
               end: int) -> tuple[int, int]:
    """Add to ``scores`` the terms of the images first..end - 1 in the list of ``length`` entries
    whose ids are id_bytes[p:hi] and residuals codes[entry:entry + length], decoding it up to
    there. Returns (problem, the entry where it was met: -1 for the list as a whole)."""
    problem = _list_problem(id_bytes, p, hi, length)
    if problem != OK:
        return problem, -1
    num_images, code_bytes = len(scores), codes.shape[1]
    image, count = -1, 0
    while p < hi:
        value, shift, byte = 0, 0, 128
        while byte >= 128:
            byte = id_bytes[p]
            p += 1
            if shift > 56:   # past 63 bits: certainly beyond any image count
                return DIFFERENCE_RANGE, count
            value |= np.int64(byte & 127) << shift
            shift += 7
        if value >= num_images:
            return DIFFERENCE_RANGE, count
        if image < 0:
            image = value
        elif value == 0:
            return NOT_INCREASING, count
        else:
            image += value
            if image >= num_images:
                return ID_RANGE, count
        if image >= end:
            return OK, count
        if image >= first:
            distance = 0
            for k in range(code_bytes):
                distance += BYTE_BITS[query_code[k] ^ codes[entry + count, k]]
            if distance > dim:
                return CODE_BITS, count
            scores[image] += kernel[distance]
        count += 1
    return OK, count


@numba.njit(cache=True, nogil=True, parallel=True, boundscheck=False)
def _scan(id_bytes: np.ndarray, id_offsets: np.ndarray, codes: np.ndarray, offsets: np.ndarray,
          words: np.ndarray, query_codes: np.ndarray, kernel: np.ndarray, dim: int, scores: np.ndarray,
          bounds: np.ndarray) -> tuple[int, int]:
    """:func:`scan_lists`, thread t adding the images bounds[t]..bounds[t + 1] - 1; (problem,
    index in ``words`` of its list)."""
    threads, num_words = len(bounds) - 1, len(words)
    found = np.full((threads, 3), num_words, np.int64)   # each thread's (list, entry, problem)
    for t in numba.prange(threads):
        for i in range(num_words):
            w = words[i]
            problem, at = _scan_list(id_bytes, id_offsets[w], id_offsets[w + 1], codes, offsets[w],
                                     offsets[w + 1] - offsets[w], query_codes[i], kernel, dim, scores,
                                     bounds[t], bounds[t + 1])
            if problem != OK:
                found[t, 0], found[t, 1], found[t, 2] = i, at, problem
                break
    best = 0
    for t in range(1, threads):
        if (found[t, 0], found[t, 1]) < (found[best, 0], found[best, 1]):
            best = t
    return (OK, -1) if found[best, 0] == num_words else (found[best, 2], found[best, 0])


def stripes(num_images: int, threads: int) -> np.ndarray:
    """The first image of each thread's stripe, then ``num_images`` ((threads + 1,) int64): thread
    t's stripe holds the fraction (1 - a^(t+1)) - (1 - a^t) of the images over (1 - a^threads),
    a = 1 - DECODE_SHARE, which evens out its work (decoding the stripes before its own, then
    its own in full) if entries spread evenly over the images."""
    a = 1.0 - DECODE_SHARE
    bounds = np.floor((1.0 - a ** np.arange(threads + 1)) / (1.0 - a ** threads) * num_images).astype(np.int64)
    bounds[-1] = num_images
    return bounds


def scan_lists(id_bytes: np.ndarray, id_offsets: np.ndarray, codes: np.ndarray, offsets: np.ndarray,
               words: np.ndarray, query_codes: np.ndarray, kernel: np.ndarray, dim: int,
               scores: np.ndarray) -> tuple[int, int]:
    """Add to ``scores`` (N,) float64 (zeros on entry) each image's sum over the lists of
    ``words`` (W,) int64, in that order, of ``kernel`` (dim + 1,) float64 at the Hamming distance
    between the list's entry codes and ``query_codes`` (W, B) uint8, the query's residual of that
    word. ``id_bytes``/``id_offsets``/``codes``/``offsets``: the inverted file's ids.npy (LEB128
    differences, each list's first id as is), its byte offsets (K + 1,), codes.npy (E, B) and
    its entry offsets (K + 1,). Runs on numba's threads. Returns (problem, visual word): (OK,
    -1), or the first problem in the order of ``words`` (:data:`PROBLEMS`) and the word whose list
    has it; the scores are then incomplete."""
    words = np.asarray(words, np.int64)
    problem, i = _scan(id_bytes, id_offsets, codes, offsets, words, query_codes, kernel, dim, scores,
                       stripes(len(scores), min(numba.get_num_threads(), max(len(scores), 1))))
    return (OK, -1) if problem == OK else (problem, int(words[i]))
