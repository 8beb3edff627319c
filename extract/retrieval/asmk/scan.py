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

Codes are compared 8 bytes a load (unaligned, little-endian: x86 and ARM), ids summed 8 a load
where 8 bytes hold 8 one-byte values.

Every list read is checked on the way, as the structure demands: its varints end within its bytes,
it holds as many ids as the offsets say, each difference is positive and every id below the image
count, and no residual has bits set past its D dimensions (the packed codes' padding is zero). A
problem stops the scan; :data:`PROBLEMS` says what the first one in the query's word order (then
in the list's order) was, for the caller's one-line error.
"""
from __future__ import annotations

import os
import sys

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# numba's threads: its own pool (workqueue) unless NUMBA_THREADING_LAYER says otherwise. Its OpenMP
# layer shares libgomp's thread count with faiss and torch, which this project sets per step
# (faiss_threads, limit_threads): the scan then ran on one thread. The workqueue pool serves one
# parallel call at a time (the scans of one process run one after another).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
if sys.byteorder != "little":
    raise ImportError("extract/retrieval/asmk/scan.py reads codes 8 bytes a load: a little-endian CPU is needed")

# the problems scan_lists reports (its first return value; OK when none), and what each says
OK, CONTINUES, COUNT, DIFFERENCE_RANGE, NOT_INCREASING, ID_RANGE, CODE_BITS = range(7)
PROBLEMS = {CONTINUES: "a list's last id continues past its bytes",
            COUNT: "a list holds another number of ids than offsets.npy says",
            DIFFERENCE_RANGE: "an id or difference not below the image count {images}",
            NOT_INCREASING: "ids not strictly increasing",
            ID_RANGE: "an id not below the image count {images}",
            CODE_BITS: "a Hamming distance above D = {dim}: bits set in a residual's padding"}

# the share of an entry's cost that decoding its id takes (the rest: its Hamming distance and its
# score), which sets the stripes: a thread decodes the stripes before its own too (tests/bench/
# bench_retrieval.py --part stored prints each thread count's time)
DECODE_SHARE = 0.3
# scans of fewer entries run on one thread (starting the others costs more than they save)
THREADED_ENTRIES = 1 << 19


@intrinsic
def _load_u64(typingctx, data, at):  # noqa: ARG001 (numba's signature)
    """data[at:at + 8] of a 1-D uint8 array as a little-endian uint64 (an unaligned load; the
    caller keeps at + 8 <= len(data))."""
    def codegen(context, builder, signature, args):  # noqa: ARG001
        array = context.make_array(signature.args[0])(context, builder, args[0])
        address = builder.bitcast(builder.gep(array.data, [args[1]]), ir.IntType(64).as_pointer())
        return builder.load(address, align=1)
    return types.uint64(data, at), codegen


@intrinsic
def _popcount(typingctx, x):  # noqa: ARG001
    """The set bits of a uint64 (LLVM's ctpop: one instruction where the CPU has popcnt)."""
    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _words(code: np.ndarray) -> np.ndarray:
    """A packed code (B,) uint8 as ceil(B / 8) little-endian uint64 words, zero-padded."""
    words = np.zeros((len(code) + 7) // 8, np.uint64)
    for k in range(len(code)):
        words[k // 8] |= np.uint64(code[k]) << np.uint64(8 * (k % 8))
    return words


def last_word_mask(code_bytes: int) -> np.uint64:
    """The bits of a code's last 8-byte word (:func:`_words`) that hold its bytes."""
    width = code_bytes - 8 * ((code_bytes - 1) // 8)
    return np.uint64((1 << 8 * width) - 1)


# uint64 masks of each byte's top bit, of every other byte
TOP_BITS, EVEN_BYTES = np.uint64(0x8080808080808080), np.uint64(0x00FF00FF00FF00FF)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _list_problem(id_bytes: np.ndarray, lo: int, hi: int, length: int) -> int:
    """What is wrong with the varints id_bytes[lo:hi] of a list of ``length`` ids, before they are
    decoded (so that decoding stays within them): the last byte must end a value, as many bytes
    must end one (top bit clear; counted 8 bytes a load) as the list holds ids."""
    if hi > lo and id_bytes[hi - 1] >= 128:
        return CONTINUES
    ends, p = 0, lo
    while p + 8 <= hi:
        ends += np.int64(_popcount(~_load_u64(id_bytes, p) & TOP_BITS))
        p += 8
    while p < hi:
        ends += id_bytes[p] < 128
        p += 1
    return COUNT if ends != length else OK


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _byte_sum(x: np.uint64) -> int:
    """The sum of the 8 bytes of ``x``, each below 128."""
    pairs = (x & EVEN_BYTES) + ((x >> np.uint64(8)) & EVEN_BYTES)   # 4 sums of 16 bits
    return np.int64((pairs * np.uint64(0x0001000100010001)) >> np.uint64(48))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _scan_list(id_bytes: np.ndarray, p: int, hi: int, codes: np.ndarray, code_bytes: int, entry: int,
               length: int, query: np.ndarray, mask: np.uint64, kernel: np.ndarray, dim: int,
               scores: np.ndarray, first: int, end: int) -> tuple[int, int]:
    """Add to ``scores`` the terms of the images first..end - 1 in the list of ``length`` entries
    whose ids are id_bytes[p:hi] and residuals the codes entry..entry + length - 1 in ``codes``
    (flat, ``code_bytes`` each), decoding it up to there; ``query``: the query's residual
    (:func:`_words`), ``mask``: :func:`last_word_mask`. Returns (problem, the entry where it was
    met: -1 for the list as a whole).

    The ids of images before ``first`` are only summed, unchecked (8 at a time where 8 bytes hold
    8 values): each entry is checked by the thread whose stripe holds the image before it (the
    first entry by the first thread), so the first problem of a list is met by a thread that
    checks it, whatever the damage. Whatever the bytes, scores and codes are only indexed within
    their arrays."""
    problem = _list_problem(id_bytes, p, hi, length)
    if problem != OK:
        return problem, -1
    num_images, size, last = len(scores), len(codes), len(query) - 1
    query_last = query[last]
    image, count = 0, 0
    while p < hi:   # the entry `count`
        if image < first and p + 8 <= hi:   # before the stripe: 8 at a time where 8 bytes hold 8 values
            x = _load_u64(id_bytes, p)
            if x & TOP_BITS == 0:
                step = _byte_sum(x)
                if image + step < first:
                    image += step
                    p += 8
                    count += 8
                    continue
        value, shift, byte = 0, 0, 128
        while byte >= 128:
            byte = id_bytes[p]
            p += 1
            value |= np.int64(byte & 127) << (shift & 63)
            shift += 7
        image += value
        if image < first and shift <= 63:   # before the stripe: unchecked
            count += 1
            continue
        if shift > 63 or value >= num_images:
            return DIFFERENCE_RANGE, count
        if count and value == 0:
            return NOT_INCREASING, count
        if image >= num_images:
            return ID_RANGE, count
        if image >= end:
            return OK, count
        at = (entry + count) * code_bytes   # the Hamming distance, 8 bytes a load
        distance = 0
        for k in range(last):
            distance += np.int64(_popcount(_load_u64(codes, at + 8 * k) ^ query[k]))
        at += 8 * last
        if at + 8 <= size:
            x = _load_u64(codes, at)
        else:   # the last codes: byte by byte within the array
            x = np.uint64(0)
            for j in range(code_bytes - 8 * last):
                x |= np.uint64(codes[at + j]) << np.uint64(8 * j)
        distance += np.int64(_popcount((x & mask) ^ query_last))
        if distance > dim:
            return CODE_BITS, count
        scores[image] += kernel[distance]
        count += 1
    return OK, count


@numba.njit(cache=True, nogil=True, parallel=True, boundscheck=False)
def _scan(id_bytes: np.ndarray, id_offsets: np.ndarray, codes: np.ndarray, offsets: np.ndarray,
          words: np.ndarray, query_codes: np.ndarray, kernel: np.ndarray, dim: int, scores: np.ndarray,
          bounds: np.ndarray, mask: np.uint64) -> tuple[int, int]:
    """:func:`scan_lists`, thread t adding the images bounds[t]..bounds[t + 1] - 1; (problem,
    index in ``words`` of its list)."""
    threads, num_words, code_bytes = len(bounds) - 1, len(words), codes.shape[1]
    flat = codes.reshape(-1)
    queries = np.empty((num_words, (code_bytes + 7) // 8), np.uint64)
    for i in range(num_words):
        queries[i] = _words(query_codes[i])
    found = np.full((threads, 3), num_words, np.int64)   # each thread's (list, entry, problem)
    for t in numba.prange(threads):
        for i in range(num_words):
            w = words[i]
            problem, at = _scan_list(id_bytes, id_offsets[w], id_offsets[w + 1], flat, code_bytes, offsets[w],
                                     offsets[w + 1] - offsets[w], queries[i], mask, kernel, dim,
                                     scores, bounds[t], bounds[t + 1])
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
    its entry offsets (K + 1,). Runs on numba's threads (one below :data:`THREADED_ENTRIES`
    entries). Returns (problem, visual word): (OK,
    -1), or the first problem in the order of ``words`` (:data:`PROBLEMS`) and the word whose list
    has it; the scores are then incomplete."""
    words = np.asarray(words, np.int64)
    entries = int((offsets[words + 1] - offsets[words]).sum())
    threads = numba.get_num_threads() if entries >= THREADED_ENTRIES else 1
    problem, i = _scan(id_bytes, id_offsets, codes, offsets, words, query_codes, kernel, dim, scores,
                       stripes(len(scores), min(threads, max(len(scores), 1))), last_word_mask(codes.shape[1]))
    return (OK, -1) if problem == OK else (problem, int(words[i]))
