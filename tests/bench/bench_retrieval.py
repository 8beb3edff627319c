"""Benchmark: the retrieval engines at Revisited-Oxford size (5,000 database images x 1,000
descriptors) on synthetic clustered descriptors.

- knn: faiss k-NN for the vote ranking: IVF build, search time and recall@10 against exact
  search for several nprobe (the default nprobe is the smallest with recall >= 0.95), memory
  per database image.
- codebook: k-means (faiss) of 1M 128-D descriptors into 65,536 and 8,192 words, measured on
  a sample and for a few iterations, extrapolated linearly (points x words x iterations).
- asmk: ASMK* index build, initial ranking of 70 queries (word assignment, aggregation and
  inverted-file scan apart) with exact and with HNSW word assignment, database assignment time,
  HNSW's words against the exact ones (m = 1 and 5) and its rankings against exact assignment's
  (top-1, top-10 overlap), index memory per image, extrapolation to ROxf+1M.
- assign: exact word assignment of one image (1,000 descriptors) against 65,536 words at each
  --asmk_dims, on a k-means-like codebook and on uniformly random unit vectors: faiss's flat search
  (IndexFlatL2, k = 1 and 5: the exact assignment before extract/retrieval/asmk/assignment.py),
  the certified bfloat16 and float32 products (m = 1 and 5) and the bare bfloat16 product alone
  (the floor: the full output, and blocked as the certified product does it), interleaved in one
  run, with the ratios, whether the words equal faiss's and how many short lists certify.
- stored: the ASMK* index on disk (extract/retrieval/asmk/stored_index.py) of a synthetic database whose images
  share visual words as real ones do (each image draws its words from one of a few hundred
  scenes' pools of Zipf-popular words; the distinct words per image are printed), built to the
  first --stored_images size, queried, then grown to the next: build and growth time (and that
  of remaking the inverted file alone, as growth does), size on disk and bytes per (image,
  word), query time (HNSW assignment, 40-D) and the querying process's RSS (a fresh process:
  the index memory-mapped), the checks' cost (loading; the scan when each block of lists is
  checked against its crc32s at its first read, and again once they all are; StoredIndex.verify(), every byte),
  the compiled scan (extract/retrieval/asmk/scan.py, on 1 thread and on numba's) against the previous
  numpy scan (kept here for the comparison: previous_scan), interleaved in one process, with whether
  their scores are bit-identical, the bytes of lists a query reads and the memory bandwidth (np.copyto),
  extrapolated to ROxf+1M; and the feature file's size with float32 and float16 descriptors.
- real: how real extracted features share words within an image, on the outputs of `make demo`
  (--demo_expr under repo/ or $DELF_REPO_DIR; skipped with a note when they are absent):
  DeLF features of the demo's training and query images extracted as the demo did (the
  settings its PCA file records) into a temporary folder, codebooks of a few sizes trained on
  the training images' descriptors, and per query image its descriptors and distinct words
  (nearest word, as database images are assigned) beside uniformly random words and the stored
  part's generator with the same codebook size and descriptor count; and how many sign bits of
  the aggregated residuals, and nearest words, ASMK*'s rounding of descriptors to float16 changes.

faiss's OpenMP threads follow --threads; the BLAS behind exact search and word assignment
follows OMP_NUM_THREADS / OPENBLAS_NUM_THREADS as set when the script starts.

Goals on a 2-core CPU: ASMK* <= 50 ms per query at 5,000 images (40-D, HNSW), the stored ASMK*
index <= D/8 + 1.5 bytes per (image, word) on average, faiss search at least as fast as the
previous home-made IVF at the same recall.

The home-made IVF (two-level k-means, torch scans) that faiss replaced, measured before its
removal on the knn part's data (40-D, one thread, shared 2-core AMD EPYC, load 3.5-7):
- 5,000 images, 4,096 cells: build 15.0 s, 176 kB per image; per 1,000-descriptor query 604 ms
  at nprobe 8 (recall@10 0.59), 686 ms at 16 (0.70), 1,266 ms at 32 (0.79), 2,120 ms at 64 (0.88).
- 2,000 images, both on one thread, CPU time per query descriptor: old 146 / 221 / 287 / 606 us
  at nprobe 8 / 16 / 32 / 64 (recall 0.55 / 0.67 / 0.78 / 0.88); faiss (2,048 cells) 89 / 166 /
  338 / 1,048 us (recall 0.75 / 0.84 / 0.91 / 0.96). At equal recall faiss is ~2.5x faster
  (0.88: ~250 us vs 606 us); its build is slower (11.9 s vs 2.5 s CPU: one flat k-means level).

    .venv/bin/python tests/bench/bench_retrieval.py [--part all|knn|codebook|asmk|assign|stored|real]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import dataclasses
import multiprocessing
import tempfile
from dataclasses import replace
from functools import partial
from typing import Callable, Iterator, Sequence

import faiss
import numba
import numpy as np
import torch

from extract.config import AsmkConfig, ExtractionConfig, IndexConfig, with_recorded
from extract.extraction.extract_features import extract_features, load_extractor
from extract.extraction.feature_file import FeatureWriter, iter_features, plain_attr
from extract.extraction.pca import load_pca
from extract.retrieval.asmk.assignment import NearestWords, Prepared, default_method, kept_groups, shortlist
from extract.retrieval.asmk.codebook import VisualWords, codebook, rounded
from extract.retrieval.asmk.kernel import aggregate, code_columns
from extract.retrieval.asmk.memory_index import AsmkIndex
from extract.retrieval.asmk.stored_index import ForwardStore, StoredIndex, build_inverted, index_identity, update_index
from extract.retrieval.faiss_search import KnnIndex, faiss_threads, kmeans
from extract.retrieval.vote import rank
from tests.bench.common import compare, machine_report, timed, unit
from train.runtime import repo_dir

PER_IMAGE = 1000
ROXF_1M = 4993 + 1_000_000


def clustered(n: int, dim: int, seed: int = 0, centres: int = 20000,
              noise: float = 0.6) -> np.ndarray:
    """(n, dim) unit descriptors, each a random 'part' centre plus noise (norm ~ ``noise``)."""
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, dim), dtype=np.float32))
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 1 << 20):
        m = min(1 << 20, n - s)
        g = rng.standard_normal((m, dim), dtype=np.float32)
        out[s:s + m] = unit(c[rng.integers(0, centres, m)] + noise / np.sqrt(dim) * g)
    return out


def noisy(x: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    return unit(x + noise / np.sqrt(x.shape[1]) * rng.standard_normal(x.shape, dtype=np.float32))


# --- knn ---------------------------------------------------------------------------------------
def bench_knn(args: argparse.Namespace) -> None:
    n, dim = args.images * PER_IMAGE, args.dim
    x = clustered(n, dim)
    rng = np.random.default_rng(1)
    q = noisy(x[rng.choice(n, args.query_descriptors, replace=False)], 0.3, rng)
    print(f"\n[knn] {args.images} images x {PER_IMAGE} x {dim}-d, {len(q)} query descriptors, "
          f"faiss threads {args.threads}")
    with faiss_threads(args.threads):
        (_, ref), t_exact, _ = timed(faiss.knn, q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        print(f"exact (faiss.knn): {t_exact / len(q) * 1e6 * PER_IMAGE / 1e3:.0f} ms per "
              f"{PER_IMAGE}-descriptor query")
        index, t_build, c_build = timed(KnnIndex, x, IndexConfig())
        per_image = (x.nbytes + n * 8 + index.nbytes) / args.images
        print(f"IVF-Flat build: {t_build:.1f} s (CPU {c_build:.1f} s), {index.nlist} cells; vote "
              f"index (descriptors + image ids + IVF) {per_image / 1e3:.0f} kB per image")
        chosen = None
        for nprobe in args.nprobe:
            (_, ids), t, c = timed(index.search, q, 10, nprobe)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref, strict=True)])
            ms = t / len(q) * PER_IMAGE * 1e3
            print(f"nprobe {nprobe:4d}: {ms:6.0f} ms per {PER_IMAGE}-descriptor query "
                  f"(CPU {c / len(q) * PER_IMAGE * 1e3:.0f} ms), recall@10 {recall:.3f}")
            if chosen is None and recall >= 0.95:
                chosen = nprobe
        print(f"smallest nprobe with recall@10 >= 0.95: {chosen} (default "
              f"{IndexConfig.nprobe})")


# --- codebook ----------------------------------------------------------------------------------
def bench_codebook(args: argparse.Namespace) -> None:
    print(f"\n[codebook] k-means of 1M 128-d descriptors, {args.kmeans_iters} iterations, "
          f"faiss threads {args.threads}: measured on a sample, extrapolated")
    with faiss_threads(args.threads):
        for words, sample in ((8192, 100_000), (65536, 131_072)):
            x = clustered(sample, 128, seed=2)
            _, t, c = timed(kmeans, x, words, niter=args.sample_iters,
                            max_points_per_centroid=sample // words + 1)
            scale = (1_000_000 / sample) * (args.kmeans_iters / args.sample_iters)
            print(f"{words:6d} words: {sample} points x {args.sample_iters} iteration(s) "
                  f"{t:.1f} s (CPU {c:.1f} s) -> 1M x {args.kmeans_iters} iterations "
                  f"~{t * scale / 60:.0f} min")


# --- asmk --------------------------------------------------------------------------------------
class GeneratedWords(VisualWords):
    """The database's word of each descriptor is the one it was generated from (exact
    assignment of 5M descriptors to 65,536 words takes ~10 min on 2 shared cores; its cost
    per image is measured apart)."""

    def __init__(self, centroids: np.ndarray, words: list[np.ndarray]) -> None:
        super().__init__(centroids, AsmkConfig(assignment="exact"))
        self._pending = iter(words)

    def assign(self, x: np.ndarray, m: int) -> np.ndarray:
        return next(self._pending)[:, None]


def assign_all(words: VisualWords, queries: list[np.ndarray], m: int) -> list[np.ndarray]:
    return [words.assign(q, m) for q in queries]


def aggregate_all(queries: list[np.ndarray], words: list[np.ndarray],
                  centroids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [aggregate(q, w, centroids) for q, w in zip(queries, words, strict=True)]


def search_all(index: AsmkIndex, aggregated: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.stack([index.search(*a) for a in aggregated])


def bench_asmk(args: argparse.Namespace) -> None:
    cfg = AsmkConfig(codebook_size=args.codebook_size)
    for dim in args.asmk_dims:
        rng = np.random.default_rng(3)
        centroids = clustered(cfg.codebook_size, dim, seed=4)
        db_words = [rng.integers(0, cfg.codebook_size, PER_IMAGE) for _ in range(args.images)]
        db = [noisy(centroids[w], 0.5, rng) for w in db_words]
        print(f"\n[asmk] {args.images} images x {PER_IMAGE} x {dim}-d, {cfg.codebook_size} words, "
              f"faiss threads {args.threads}")
        with faiss_threads(args.threads):
            words = {"exact": VisualWords(centroids, AsmkConfig(assignment="exact"))}
            words["hnsw"], t, c = timed(VisualWords, centroids, replace(cfg, assignment="hnsw"))
            print(f"HNSW graph (M {cfg.hnsw_neighbors}, efConstruction {cfg.hnsw_ef_construction}, one "
                  f"thread): built in {t:.1f} s (CPU {c:.1f} s); efSearch {cfg.hnsw_ef_search}")
            sample = db[:args.assign_images]
            db_assigned = {}
            for kind, w in words.items():
                db_assigned[kind], t, c = timed(assign_all, w, sample, cfg.db_assignments)
                print(f"database image, {kind} word assignment: {t / len(sample) * 1e3:.0f} ms (CPU "
                      f"{c / len(sample) * 1e3:.0f} ms) per image -> {c / len(sample) * args.images / 60:.1f} "
                      f"CPU min for {args.images}, {c / len(sample) * ROXF_1M / 3600:.0f} CPU h for ROxf+1M")
            index, t, _ = timed(AsmkIndex, GeneratedWords(centroids, db_words), db, cfg)
            per_image = index.nbytes / args.images
            print(f"index build in memory (words given): {t:.1f} s; {index.num_entries / args.images:.0f} "
                  f"words per image, {per_image / 1e3:.1f} kB per image ({(dim + 7) // 8 + 4} bytes per word: "
                  f"residual and uint32 image id; the stored index's bytes per word: --part stored)")
            targets = rng.choice(args.images, args.queries, replace=False)
            # rounded as ASMK* rounds them (represent), once here, outside the timed steps
            queries = [rounded(np.concatenate([noisy(db[i][:PER_IMAGE // 2], 0.3, rng),
                                               clustered(PER_IMAGE // 2, dim, seed=5 + j)]))
                       for j, i in enumerate(targets)]
            ranks, assigned, all_scores = {}, {}, {}
            for kind, w in words.items():
                index.words = w
                assigned[kind], t_assign, c_assign = timed(assign_all, w, queries, cfg.query_assignments)
                aggregated, t_agg, c_agg = timed(aggregate_all, queries, assigned[kind], centroids)
                scores, t_scan, c_scan = timed(search_all, index, aggregated)
                all_scores[kind], ranks[kind] = scores, np.stack([rank(s) for s in scores])
                top1 = np.mean(ranks[kind][:, 0] == targets)
                n = len(queries)
                per_query, cpu = (t_assign + t_agg + t_scan) / n, (c_assign + c_agg + c_scan) / n
                print(f"query, {kind} assignment: {per_query * 1e3:.0f} ms (CPU {cpu * 1e3:.0f} ms) = word "
                      f"assignment x{cfg.query_assignments} {t_assign / n * 1e3:.0f} ms (CPU "
                      f"{c_assign / n * 1e3:.0f}) + aggregation {t_agg / n * 1e3:.1f} ms (CPU "
                      f"{c_agg / n * 1e3:.1f}) + inverted-file scan {t_scan / n * 1e3:.1f} ms (CPU "
                      f"{c_scan / n * 1e3:.1f}); top-1 {top1:.0%}; goal <= 50 ms: "
                      f"{'met' if per_query <= 0.05 else 'NOT met'}")
                grow = ROXF_1M / args.images
                print(f"  ROxf+1M: query ~{(c_assign + c_agg + c_scan * grow) / n:.1f} s CPU (the scan "
                      f"grows with the database)")
        print(f"ROxf+1M: index {per_image * ROXF_1M / 2**30:.1f} GiB")
        db_ref, db_hnsw = np.concatenate(db_assigned["exact"]), np.concatenate(db_assigned["hnsw"])
        q_ref, q_hnsw = np.concatenate(assigned["exact"]), np.concatenate(assigned["hnsw"])
        print(f"HNSW vs exact words: database (m 1) {np.mean(db_hnsw[:, 0] == db_ref[:, 0]):.3f} equal; "
              f"queries: nearest word {np.mean(q_hnsw[:, 0] == q_ref[:, 0]):.3f} equal, "
              f"{np.mean([len(set(a) & set(b)) for a, b in zip(q_hnsw, q_ref, strict=True)]) / 5:.3f} "
              f"of the exact 5 found")
        overlap = np.mean([len(set(a[:10]) & set(b[:10])) / 10
                           for a, b in zip(ranks["hnsw"], ranks["exact"], strict=True)])
        corr = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(all_scores["hnsw"], all_scores["exact"],
                                                                  strict=True)])
        rows = np.arange(len(targets))
        target = np.mean(all_scores["hnsw"][rows, targets] / all_scores["exact"][rows, targets])
        print(f"ASMK* rankings, HNSW vs exact query assignment: top-1 equal "
              f"{np.mean(ranks['hnsw'][:, 0] == ranks['exact'][:, 0]):.0%}, top-10 overlap {overlap:.3f} "
              f"(below the target image the synthetic ranking is chance word collisions), score "
              f"correlation {corr:.3f}, target's score {target:.3f} of exact's")
        with faiss_threads(args.threads):
            for ef in args.ef_search:
                w = words["hnsw"]
                w.ef_search = ef
                got, t, c = timed(assign_all, w, queries, cfg.query_assignments)
                got = np.concatenate(got)
                print(f"efSearch {ef:4d}: query word assignment x{cfg.query_assignments} "
                      f"{t / len(queries) * 1e3:.0f} ms (CPU {c / len(queries) * 1e3:.0f} ms), nearest word "
                      f"{np.mean(got[:, 0] == q_ref[:, 0]):.3f} equal, "
                      f"{np.mean([len(set(a) & set(b)) for a, b in zip(got, q_ref, strict=True)]) / 5:.3f} "
                      f"of the exact 5 found")


# --- assign ------------------------------------------------------------------------------------
def blocked_product(x: torch.Tensor, prep: Prepared) -> None:
    """The bfloat16 product alone, as :func:`shortlist` blocks it (into one reused block of keys)."""
    aug = torch.cat([x.to(torch.bfloat16), torch.ones((len(x), 4), dtype=torch.bfloat16)], 1)
    keys = torch.empty((prep.tile, len(x)), dtype=torch.bfloat16)
    for s in range(0, len(prep.augmented), prep.tile):
        torch.mm(prep.augmented[s:s + prep.tile], aug.T, out=keys)


def bench_assign(args: argparse.Namespace) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        assign_parts(args)
    finally:
        torch.set_num_threads(before)


def assign_parts(args: argparse.Namespace) -> None:
    print(f"\n[assign] exact word assignment of one image ({PER_IMAGE} descriptors, rounded to float16 as ASMK* "
          f"does) against {args.codebook_size} words; faiss and torch threads {args.threads}; medians of "
          f"{args.repeats} interleaved rounds; this CPU's exact method: {default_method(torch.device('cpu'), 128)} "
          f"at 128-D, {default_method(torch.device('cpu'), 40)} at 40-D")
    rng = np.random.default_rng(11)
    for dim in args.asmk_dims:
        for data in ("codebook", "uniform"):
            if data == "codebook":   # k-means-like: centroids around parts, descriptors near centroids
                centroids = clustered(args.codebook_size, dim, seed=4)
                x = noisy(centroids[rng.integers(0, args.codebook_size, PER_IMAGE)], 0.5, rng)
            else:
                centroids = unit(rng.standard_normal((args.codebook_size, dim), dtype=np.float32))
                x = unit(rng.standard_normal((PER_IMAGE, dim), dtype=np.float32))
            x = rounded(x)
            flat = faiss.IndexFlatL2(dim)
            flat.add(centroids)
            exact = {method: NearestWords(centroids, method) for method in ("bf16", "fp32")}
            prep = exact["bf16"].prepared(torch.device("cpu"))
            xt, cb, xb = torch.from_numpy(x), torch.from_numpy(centroids).bfloat16(), torch.from_numpy(x).bfloat16()
            fns = {"faiss flat k=1": partial(flat.search, x, 1), "faiss flat k=5": partial(flat.search, x, 5)}
            for method, words in exact.items():
                fns[f"{method} m=1"] = partial(words, x, 1)
                fns[f"{method} m=5"] = partial(words, x, 5)
            fns["bf16 product alone, (1000, 65536) out"] = partial(torch.mm, xb, cb.T)
            fns["bf16 product alone, blocked"] = partial(blocked_product, xt, prep)
            with faiss_threads(args.threads):
                times = compare(fns, args.repeats)
                same = {m: {method: int((words(x, m) != flat.search(x, m)[1]).any(1).sum())
                            for method, words in exact.items()} for m in (1, 5)}
            certified = {m: [float(shortlist(xt, prep, m, keep)[1].float().mean()) for keep in kept_groups(m)]
                         for m in (1, 5)}
            print(f"{dim}-D, {data} data: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items()))
            for m in (1, 5):
                base = times[f"faiss flat k={m}"]
                print(f"  m={m}: faiss flat / bf16 {base / times[f'bf16 m={m}']:.2f}x, faiss flat / fp32 "
                      f"{base / times[f'fp32 m={m}']:.2f}x (goal on an AMX CPU: >= {2.5 if dim <= 64 else 1.5}x); "
                      f"rows whose words differ from faiss's: bf16 {same[m]['bf16']}, fp32 {same[m]['fp32']}; "
                      f"certified by bf16 short lists of {' / '.join(map(str, kept_groups(m)))} groups: "
                      f"{' / '.join(f'{c:.3f}' for c in certified[m])}")


# --- stored index ------------------------------------------------------------------------------
class SceneDatabase:
    """Synthetic images that share visual words within a scene (the demo's real features share
    more: --part real compares the distinct words per image): word popularity is Zipf-like
    (exponent 0.8 over the codebook); each of ``scenes`` scenes has a pool of ``pool`` words
    (default 1,500) drawn by popularity; image i shows scene i mod ``scenes`` and draws its
    ``per_image`` descriptors' words (default 1,000) from that pool (bursts: a word recurs), each
    descriptor its word's centroid plus noise. Image i is generated from the seed and i alone."""

    POOL = 1500

    def __init__(self, centroids: np.ndarray, scenes: int = 400, seed: int = 7, pool: int = POOL,
                 per_image: int = PER_IMAGE) -> None:
        self.centroids, self.seed, self.per_image = centroids, seed, per_image
        rng = np.random.default_rng(seed)
        popularity = 1.0 / np.arange(1, len(centroids) + 1) ** 0.8
        popularity = popularity[rng.permutation(len(centroids))]
        self.pools = [rng.choice(len(centroids), pool, replace=False, p=popularity / popularity.sum())
                      for _ in range(scenes)]

    def image(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(words (per_image,), descriptors (per_image, D)) of image ``i``."""
        rng = np.random.default_rng((self.seed, i))
        words = rng.choice(self.pools[i % len(self.pools)], self.per_image)
        return words, noisy(self.centroids[words], 0.5, rng)

    def reader(self, words: GivenWords) -> Callable[[Sequence[str]], Iterator[np.ndarray]]:
        """update_index's reader of images by key (str(i)); sets each image's words in ``words``."""
        def descriptors(keys: Sequence[str]) -> Iterator[np.ndarray]:
            for key in keys:
                words.pending, x = self.image(int(key))
                yield x
        return descriptors


class GivenWords(VisualWords):
    """Exact assignment in name (the stored index records it), but the word of each database
    descriptor is the one it was generated from (``pending``): exact assignment of 100M
    descriptors to 65,536 words would take days here; its cost per image is measured apart."""

    pending: np.ndarray

    def assign(self, x: np.ndarray, m: int) -> np.ndarray:
        return self.pending[:, None]


# --- the previous scan, for the comparison only: numpy, one slice per list -------------------------
def _previous_varints(data: np.ndarray) -> np.ndarray:
    """LEB128 values (int64) of concatenated encodings, each value's last byte read for all."""
    ends = np.flatnonzero(data < 128)
    values = data[ends].astype(np.int64)
    longer = np.flatnonzero(np.diff(ends, prepend=-1) > 1)
    if len(longer):
        last = ends[longer]
        sizes = last - np.concatenate([[-1], ends])[longer]
        more = values[longer] << 7 * (sizes - 1)
        for k in range(int(sizes.max()) - 1):
            has = np.flatnonzero(sizes > k + 1)
            more[has] |= (data[last[has] - (sizes[has] - 1) + k] & 127).astype(np.int64) << (7 * k)
        values[longer] = more
    return values


def _previous_record(code_bytes: int) -> np.dtype:
    """code_columns' words as the fields of a structured dtype of ``code_bytes`` bytes."""
    names, formats, offsets, start = [], [], [], 0
    for dtype in (np.uint64, np.uint32, np.uint16, np.uint8):
        while code_bytes - start >= np.dtype(dtype).itemsize:
            names.append(f"c{len(names)}")
            formats.append(dtype)
            offsets.append(start)
            start += np.dtype(dtype).itemsize
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": code_bytes})


def previous_scan(index: StoredIndex, codes: np.ndarray, words: np.ndarray) -> np.ndarray:
    """StoredIndex.search before the compiled scan (the commit before extract/retrieval/asmk/scan.py),
    its checks included: the lists' bytes gathered one slice per list, the varints decoded and
    summed per list with numpy, the Hamming distances of 8/4/2/1-byte columns with
    np.bitwise_count, the kernel's values summed per image with np.bincount."""
    def gather(array: np.ndarray, lo: np.ndarray, n: np.ndarray) -> np.ndarray:
        return np.concatenate([array[a:a + k] for a, k in zip(lo.tolist(), n.tolist(), strict=True)])

    words = np.asarray(words, np.int64)
    lo, lengths = index.offsets[words], index.offsets[words + 1] - index.offsets[words]
    byte_lo = index.id_offsets[words]
    byte_len = index.id_offsets[words + 1] - byte_lo
    data = gather(index._id_bytes, byte_lo, byte_len)
    deltas = _previous_varints(data)
    bounds = np.cumsum(byte_len)
    count = np.diff(np.searchsorted(np.flatnonzero(data < 128), bounds), prepend=0)
    assert not (data[bounds[byte_len > 0] - 1] >= 128).any() and np.array_equal(count, lengths)
    starts = (np.cumsum(lengths) - lengths)[lengths > 0]
    assert int(deltas.max()) < index.num_images
    assert np.count_nonzero(deltas == 0) == np.count_nonzero(deltas[starts] == 0)
    last = np.add.reduceat(deltas, starts)
    assert int(last.max()) < index.num_images
    deltas[starts[1:]] -= last[:-1]
    images = np.cumsum(deltas)
    records = gather(index._code_rows, lo, lengths).view(_previous_record(codes.shape[1]))[:, 0]
    count = np.uint8 if 8 * codes.shape[1] < 256 else np.intp   # the largest distance fits
    hamming = sum(np.bitwise_count(np.repeat(q, lengths) ^ records[name]).astype(count, copy=False)
                  for q, name in zip(code_columns(codes), records.dtype.names, strict=True))
    scores = np.bincount(images, index.kernel[hamming], minlength=index.num_images)
    return scores / index.norm / np.sqrt(len(codes))


def memory_bandwidth(nbytes: int = 1 << 28) -> float:
    """Bytes per second of np.copyto between two ``nbytes`` arrays (read + write counted), best of 5."""
    a, b = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    return 2 * nbytes / min(timed(np.copyto, b, a)[1] for _ in range(5))


def rss_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process, MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def query_stored(folder: str, centroids: np.ndarray, queries: list[np.ndarray], cfg: AsmkConfig,
                 threads: int, repeats: int) -> dict[str, float | np.ndarray]:
    """In a fresh process: the index memory-mapped, HNSW query assignment; times (s per query)
    and RSS (MiB) before and after the queries; the scans compared (:func:`compare_scans`)."""
    with faiss_threads(threads):
        words = VisualWords(centroids, replace(cfg, assignment="hnsw"))
        index, t_load, _ = timed(StoredIndex, Path(folder), words, cfg)
        before = rss_mib()[0]
        assigned, t_assign, _ = timed(assign_all, words, queries, cfg.query_assignments)
        aggregated, t_agg, _ = timed(aggregate_all, queries, assigned, centroids)
        scores, t_scan, _ = timed(search_all, index, aggregated)   # each block's crc32s checked at its first read
        checked = (int(index._checked.sum()), len(index._checked))
        after, peak = rss_mib()
        _, t_again, _ = timed(search_all, index, aggregated)      # every list read checked already
        _, t_verify, c_verify = timed(index.verify)
        scans = compare_scans(index, aggregated, repeats)
    n = len(queries)
    return {"assign": t_assign / n, "aggregate": t_agg / n, "scan": t_scan / n, "scan_again": t_again / n,
            "load": t_load, "verify": t_verify, "verify_cpu": c_verify, "checked_blocks": checked,
            "rss_before": before, "rss_after": after, "rss_peak": peak, "top1": np.argmax(scores, axis=1), **scans}


def compare_scans(index: StoredIndex, aggregated: list[tuple[np.ndarray, np.ndarray]], repeats: int
                  ) -> dict[str, float | bool]:
    """The previous numpy scan against the compiled one on 1 thread and on numba's threads,
    interleaved (s per query, median of ``repeats`` rounds of all queries); whether their scores
    are bit-identical; the bytes of lists a query reads; the memory bandwidth."""
    threads = numba.get_num_threads()

    def compiled(n: int) -> Callable[[], None]:
        def run() -> None:
            numba.set_num_threads(n)
            try:
                search_all(index, aggregated)
            finally:
                numba.set_num_threads(threads)
        return run

    same = all(np.array_equal(index.search(*a), previous_scan(index, *a)) for a in aggregated)
    times = compare({"previous": lambda: [previous_scan(index, *a) for a in aggregated],
                     "compiled_1": compiled(1), "compiled_n": compiled(threads)}, repeats)
    lengths = [index.offsets[w + 1] - index.offsets[w] for _, w in aggregated]
    id_bytes = [index.id_offsets[w + 1] - index.id_offsets[w] for _, w in aggregated]
    read = np.mean([n.sum() * c.shape[1] + b.sum() for n, b, (c, _) in zip(lengths, id_bytes, aggregated, strict=True)])
    return {**{f"scan_{k}": v / len(aggregated) for k, v in times.items()}, "scan_threads": threads,
            "scan_identical": same, "scan_entries": float(np.mean([n.sum() for n in lengths])), "scan_bytes": read,
            "bandwidth": memory_bandwidth()}


def bench_stored(args: argparse.Namespace) -> None:
    cfg = AsmkConfig(codebook_size=args.codebook_size)
    for dim in args.stored_dims:
        centroids = clustered(cfg.codebook_size, dim, seed=4)
        data = SceneDatabase(centroids)
        words = GivenWords(centroids, AsmkConfig(assignment="exact"))
        rng = np.random.default_rng(8)
        targets = rng.choice(min(args.stored_images), args.queries, replace=False)
        queries = [rounded(np.concatenate([noisy(data.image(int(i))[1][:PER_IMAGE // 2], 0.3, rng),   # as ASMK* does
                                           clustered(PER_IMAGE // 2, dim, seed=50 + j)]))
                   for j, i in enumerate(targets)]
        print(f"\n[stored] {dim}-d, {cfg.codebook_size} words, {PER_IMAGE} descriptors per image, "
              f"{len(data.pools)} scenes; faiss threads {args.threads}")
        with faiss_threads(args.threads):
            hnsw = VisualWords(centroids, replace(cfg, assignment="hnsw"))
            sample = [data.image(i)[1] for i in range(args.assign_images)]
            _, _, c_assign = timed(assign_all, hnsw, sample, cfg.db_assignments)
        assign_cpu = c_assign / len(sample)
        print(f"database word assignment (HNSW, measured on {len(sample)} images): {assign_cpu * 1e3:.0f} ms CPU "
              "per image (not part of the build times below: the words are given)")
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            folder, built = Path(tmp) / "index", 0
            for size in sorted(args.stored_images):
                keys = [str(i) for i in range(size)]
                (index, _, report), t, c = timed(update_index, folder, words, cfg, keys, data.reader(words))
                forward = sum(p.stat().st_size for p in (folder / "forward").iterdir())
                with ForwardStore(folder / "forward", index_identity(words, cfg, {}), (dim + 7) // 8) as store:
                    _, t_inverted, c_inverted = timed(build_inverted, store, Path(tmp) / "again", cfg.codebook_size)
                per_entry = index.nbytes / index.num_entries
                words_per_image = index.num_entries / index.num_images
                print(f"{size} images: {'built' if not built else f'grown from {built}'} in {t:.0f} s (CPU {c:.0f} s;"
                      f" {report.added} images aggregated and appended, the inverted file made from all); "
                      f"{words_per_image:.0f} distinct words per image; inverted file {index.nbytes / 2**20:.0f} MiB "
                      f"= {per_entry:.2f} B per (image, word) (bound D/8 + 1.5 = {dim / 8 + 1.5:.1f}: "
                      f"{'met' if per_entry <= dim / 8 + 1.5 else 'NOT met'}); forward store "
                      f"{forward / 2**20:.0f} MiB; the inverted file alone (re)made from the forward store in "
                      f"{t_inverted:.1f} s (CPU {c_inverted:.1f} s)")
                ctx = multiprocessing.get_context("spawn")
                with ctx.Pool(1) as pool:
                    q = pool.apply(query_stored, (str(folder / "inverted"), centroids, queries, cfg, args.threads,
                                                  args.scan_repeats))
                total = q["assign"] + q["aggregate"] + q["scan"]
                print(f"  query (HNSW x{cfg.query_assignments}): {total * 1e3:.0f} ms = assignment "
                      f"{q['assign'] * 1e3:.0f} + aggregation {q['aggregate'] * 1e3:.1f} + memory-mapped scan "
                      f"{q['scan'] * 1e3:.1f} ms; top-1 {np.mean(q['top1'] == targets):.0%}; RSS {q['rss_before']:.0f}"
                      f" MiB loaded, {q['rss_after']:.0f} MiB after {len(queries)} queries (peak {q['rss_peak']:.0f})")
                print(f"  checks: loading {q['load'] * 1e3:.0f} ms (small files' crc32s, headers, offsets); the "
                      f"queries' first pass checked {q['checked_blocks'][0]} of {q['checked_blocks'][1]} blocks' "
                      f"crc32s, {q['scan'] * 1e3:.1f} ms per scan; again, every block checked already "
                      f"{q['scan_again'] * 1e3:.1f} ms; verify() (every byte, page cache hot) {q['verify']:.2f} s "
                      f"(CPU {q['verify_cpu']:.2f} s, {index.nbytes / q['verify'] / 1e9:.2f} GB/s)")
                bw, ms = q["bandwidth"], q["scan_bytes"] / q["bandwidth"] * 1e3
                print(f"  scan per query (interleaved, median of {args.scan_repeats}): previous numpy scan "
                      f"{q['scan_previous'] * 1e3:.1f} ms; compiled on 1 thread {q['scan_compiled_1'] * 1e3:.1f} ms "
                      f"({q['scan_previous'] / q['scan_compiled_1']:.2f}x), on {q['scan_threads']} threads "
                      f"{q['scan_compiled_n'] * 1e3:.1f} ms ({q['scan_previous'] / q['scan_compiled_n']:.2f}x); "
                      f"scores {'bit-identical' if q['scan_identical'] else 'DIFFERENT'}; "
                      f"{q['scan_entries'] / 1e6:.2f} M entries, {q['scan_bytes'] / 1e6:.1f} MB of lists read: "
                      f"{ms:.1f} ms at the measured memory bandwidth {bw / 1e9:.1f} GB/s (np.copyto, 256 MiB)")
                built = size
            grow = ROXF_1M / size
            append_cpu = c / max(report.added, 1)
            disk = (per_entry * words_per_image * ROXF_1M / 2**30, forward / size * ROXF_1M / 2**30)
            build_h = (assign_cpu * ROXF_1M / 3600, append_cpu * ROXF_1M / 3600)
            scan_ms = (q["scan_compiled_n"] * grow * 1e3, q["scan_previous"] * grow * 1e3)
            query_ms = (q["assign"] + q["aggregate"]) * 1e3 + scan_ms[0]
            # the mapped pages the queries touch grow with the lists, up to the whole inverted file
            rss = q["rss_before"] + min((q["rss_after"] - q["rss_before"]) * grow, disk[0] * 1024)
            print(f"ROxf+1M (linear in the database from {size} images): inverted file {disk[0]:.1f} GiB + forward "
                  f"store {disk[1]:.1f} GiB on disk; build ~{sum(build_h):.0f} CPU h (word assignment "
                  f"{build_h[0]:.0f} h + aggregation, append and inverted file {build_h[1]:.1f} h); query "
                  f"~{query_ms:.0f} ms, of which the scan ~{scan_ms[0]:.0f} ms on {q['scan_threads']} threads "
                  f"(the previous numpy scan ~{scan_ms[1]:.0f} ms; ~{q['scan_bytes'] * grow / 1e6:.0f} MB of lists "
                  f"read, ~{q['scan_bytes'] * grow / q['bandwidth'] * 1e3:.0f} ms of memory bandwidth); "
                  f"RSS ~{rss:.0f} MiB after the queries (the "
                  f"touched lists grow with the database, up to the whole inverted file); verify() "
                  f"~{q['verify'] * grow:.0f} s from the page cache (more from a cold disk)")
        bench_feature_files(dim, args)


def bench_feature_files(dim: int, args: argparse.Namespace) -> None:
    """Feature-file bytes per image with float32 and float16 descriptors (100 images)."""
    rng = np.random.default_rng(9)
    sizes = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for dtype in ("float32", "float16"):
            path = Path(tmp) / f"{dtype}.h5"
            with FeatureWriter(path, {"descriptor_dtype": dtype}) as w:
                for i in range(100):
                    w.write(f"img{i:03d}.jpg", {
                        "keypoints": rng.random((PER_IMAGE, 2)) * 1000,
                        "descriptors": clustered(PER_IMAGE, dim, seed=i, centres=100), "scores": rng.random(PER_IMAGE),
                        "scales": rng.random(PER_IMAGE), "image_size": [1024, 768]})
            sizes[dtype] = path.stat().st_size / 100
    print(f"feature file, {PER_IMAGE} {dim}-d features per image: float32 {sizes['float32'] / 1e3:.0f} kB, "
          f"float16 {sizes['float16'] / 1e3:.0f} kB per image ({sizes['float16'] / sizes['float32']:.0%}); "
          f"1M distractors: {sizes['float32'] * 1e6 / 1e9:.0f} GB vs {sizes['float16'] * 1e6 / 1e9:.0f} GB")


# --- real features ----------------------------------------------------------------------------
def demo_inputs(expr: str) -> tuple[dict[str, Path], list[Path]]:
    """The outputs of `make demo` for experiment ``expr`` that the real part reads (checkpoint,
    PCA file, training and query image folders), and those of them that are missing."""
    root = repo_dir() / expr
    inputs = {"checkpoint": root / "keypoint" / "ckpt" / "fix.pth.tar", "pca": root / "pca" / "pca.h5",
              "train": root / "data" / "train", "query": root / "data" / "query"}
    missing = [p for k, p in inputs.items()
               if not (any(p.glob("*/*.jpg")) if k in ("train", "query") else p.is_file())]
    return inputs, missing


def demo_extraction(pca: Path) -> ExtractionConfig:
    """The extraction the demo ran: the settings its PCA file records (the demo fits the PCA and
    extracts its query features with the same ones), the PCA dimension and the rest by default."""
    names = {f.name for f in dataclasses.fields(ExtractionConfig)}
    recorded = {k: plain_attr(v) for k, v in load_pca(pca)["attrs"].items() if k in names}
    return with_recorded(ExtractionConfig(), recorded)


def uniform_distinct(words: int, n: float) -> float:
    """Expected distinct words of ``n`` descriptors assigned uniformly at random over ``words``."""
    return words * (1 - (1 - 1 / words) ** n)


def synthetic_distinct(words: int, dim: int, per_image: int, images: int) -> tuple[float, int]:
    """(mean distinct words per image, scene pool size) of the stored part's generator
    (:class:`SceneDatabase`, its words as generated) over ``images`` images of ``per_image``
    descriptors, with ``words`` random centroids; a pool holds at most the whole codebook."""
    rng = np.random.default_rng(10)
    pool = min(SceneDatabase.POOL, words)
    data = SceneDatabase(unit(rng.standard_normal((words, dim), dtype=np.float32)), pool=pool, per_image=per_image)
    return float(np.mean([len(np.unique(data.image(i)[0])) for i in range(images)])), pool


def rounding_changes(words: VisualWords, images: list[np.ndarray]) -> tuple[float, float]:
    """What ASMK*'s rounding of descriptors to float16 changes against float32 over ``images``
    (n_i, D) descriptors: (fraction of sign bits of the aggregated residuals that differ, the
    words given the same, fraction of nearest words that differ)."""
    flipped = bits = moved = descriptors = 0
    for x in images:
        exact, near = words.assign(rounded(x), 1), words.assign(x, 1)
        codes = [aggregate(d, exact, words.centroids)[0] for d in (x, rounded(x))]
        flipped += int(np.unpackbits(codes[0] ^ codes[1], axis=1)[:, :words.dim].sum())
        bits += codes[0].shape[0] * words.dim
        moved += int((exact != near).sum())
        descriptors += len(x)
    return flipped / max(bits, 1), moved / max(descriptors, 1)


def bench_real(args: argparse.Namespace) -> None:
    inputs, missing = demo_inputs(args.demo_expr)
    if missing:
        note = (f"[real] skipped: no `make demo` outputs for experiment {args.demo_expr!r} under {repo_dir()} "
                f"({missing[0]} missing)")
        if args.part == "real":
            raise SystemExit(note)
        print(f"\n{note}")
        return
    conf = demo_extraction(inputs["pca"])
    cfg = AsmkConfig(assignment="exact")
    min_per_word = faiss.ClusteringParameters().min_points_per_centroid
    print(f"\n[real] `make demo` outputs in {repo_dir() / args.demo_expr}, extracted as the demo does (attention "
          f"threshold {conf.attn_thres}, top {conf.top_k}, {len(conf.scale_list)} scales, PCA {conf.pca_dims}-d); "
          f"query descriptors get their nearest word, as database ones; faiss threads {args.threads}")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        ex = load_extractor(conf, inputs["checkpoint"], inputs["pca"])
        feats = {}
        for part in ("train", "query"):
            output = Path(tmp) / f"{part}.h5"
            _, t, _ = timed(extract_features, conf, inputs["checkpoint"], inputs[part], output,
                            pca_path=inputs["pca"], extractor=ex)
            feats[part] = [f["descriptors"] for _, f in iter_features(output)]
            count = sum(len(d) for d in feats[part])
            print(f"{part}: {len(feats[part])} images, {count} descriptors ({count / len(feats[part]):.0f} per "
                  f"image), extracted in {t:.0f} s")
        train = np.concatenate(feats["train"])
        queries = feats["query"]
        n = np.array([len(q) for q in queries])
        with faiss_threads(args.threads):
            for words in sorted(args.real_words):
                if len(train) < words * min_per_word:
                    print(f"{words:5d} words: skipped ({len(train)} training descriptors, fewer than "
                          f"{min_per_word} per word)")
                    continue
                size = replace(cfg, codebook_size=words)
                centroids = codebook(Path(tmp) / f"codebook_{words}.h5", lambda: train, size)
                assigned = VisualWords(centroids, size)
                distinct = np.array([len(np.unique(assigned.assign(q, cfg.db_assignments))) for q in queries])
                bits, moved = rounding_changes(assigned, queries)
                uniform = np.mean([uniform_distinct(words, k) for k in n])
                synthetic, pool = synthetic_distinct(words, train.shape[1], round(n.mean()), len(queries))
                print(f"{words:5d} words: {n.mean():.0f} descriptors per query image, {distinct.mean():.0f} distinct "
                      f"words ({distinct.mean() / n.mean():.2f} of the descriptors; min {distinct.min()}, max "
                      f"{distinct.max()}); uniformly random words {uniform:.0f} ({uniform / n.mean():.2f}); the "
                      f"stored part's generator {synthetic:.0f} ({synthetic / n.mean():.2f}; pools of {pool} words"
                      f"{', the whole codebook' if pool == words else ''}); float16 rounding vs float32: "
                      f"{bits * 1e4:.1f} in 10,000 sign bits of the aggregated residuals and {moved * 1e4:.1f} in "
                      f"10,000 nearest words differ")
    synthetic, pool = synthetic_distinct(args.codebook_size, train.shape[1], round(n.mean()), len(queries))
    uniform = uniform_distinct(args.codebook_size, n.mean())
    print(f"the stored part's generator at {args.codebook_size} words, {n.mean():.0f} descriptors per image: "
          f"{synthetic:.0f} distinct words ({synthetic / n.mean():.2f}; pools of {pool}); uniformly random "
          f"{uniform:.0f} ({uniform / n.mean():.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "knn", "codebook", "asmk", "assign", "stored", "real"), default="all")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--dim", type=int, default=40, help="descriptor dimension for knn")
    p.add_argument("--asmk_dims", type=int, nargs="+", default=[40, 128])
    p.add_argument("--threads", type=int, default=2, help="faiss threads")
    p.add_argument("--query_descriptors", type=int, default=4000)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--codebook_size", type=int, default=AsmkConfig.codebook_size)
    p.add_argument("--ef_search", type=int, nargs="*", default=[16, 32, 64, 128],
                   help="asmk: HNSW efSearch values whose query assignment is timed")
    p.add_argument("--queries", type=int, default=70)
    p.add_argument("--assign_images", type=int, default=50, help="database images timed for word assignment")
    p.add_argument("--repeats", type=int, default=7, help="assign: interleaved rounds per timing")
    p.add_argument("--kmeans_iters", type=int, default=AsmkConfig.kmeans_iters)
    p.add_argument("--sample_iters", type=int, default=1)
    p.add_argument("--stored_images", type=int, nargs="+", default=[5000, 100_000],
                   help="stored: database sizes, built then grown in turn")
    p.add_argument("--stored_dims", type=int, nargs="+", default=[40])
    p.add_argument("--scan_repeats", type=int, default=5, help="stored: interleaved rounds of the scans compared")
    p.add_argument("--tmp", help="stored: folder for the index; real: for the extracted features (default: "
                   "the system's temporary folder)")
    p.add_argument("--demo_expr", default="demo", help="real: the `make demo` experiment whose outputs are read")
    p.add_argument("--real_words", type=int, nargs="+", default=[256, 512, 1024, 4096],
                   help="real: codebook sizes (those with too few training descriptors per word are skipped)")
    args = p.parse_args()
    print(f"{machine_report()}; faiss {faiss.__version__}")
    for part, f in (("knn", bench_knn), ("codebook", bench_codebook), ("asmk", bench_asmk), ("assign", bench_assign),
                    ("stored", bench_stored), ("real", bench_real)):
        if args.part in ("all", part):
            f(args)


if __name__ == "__main__":
    main()
