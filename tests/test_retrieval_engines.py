"""The retrieval engines: faiss k-NN and k-means (extract/retrieval/faiss_search.py), ASMK* and its
codebook store (extract/retrieval/asmk/), checked against brute force and against the asmk package."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import faiss
import h5py
import numpy as np
import pytest
import torch
from asmk import ASMKMethod
from asmk.codebook import Codebook
from asmk.index import initialize_index

import extract.retrieval.asmk.codebook as codebook_module
from extract.config import AsmkConfig, IndexConfig
from extract.errors import InputMismatch, OptionError
from extract.evaluation.asmk_database import CODEBOOK_LEGACY
from extract.retrieval.asmk.codebook import CodebookError, VisualWords, codebook, load_codebook, save_codebook
from extract.retrieval.asmk.kernel import aggregate, code_columns
from extract.retrieval.asmk.memory_index import AsmkIndex
from extract.retrieval.faiss_search import KnnIndex, auto_nlist, faiss_gpu, faiss_threads, kmeans
from tests.utils import held_bytes, unit


def assert_counts_faiss_memory(index: KnnIndex) -> None:
    """``index.nbytes`` is the faiss index's size as faiss serialises it (every array it holds)
    but for the serialisation's own bookkeeping: a header and each inverted list's length."""
    overhead = len(faiss.serialize_index(index.index)) - index.nbytes
    assert 0 <= overhead <= 256 + 8 * index.nlist, overhead


def exact16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to float16, as float32: ASMK* sees these descriptors as they are (it rounds
    to float16 first), the asmk package too."""
    return x.astype(np.float16).astype(np.float32)


def clustered(rng: np.random.Generator, n: int, dim: int, centres: int, noise: float) -> np.ndarray:
    """(n, dim) unit rows around ``centres`` random ones, float16-exact (:func:`exact16`)."""
    c = unit(rng.normal(size=(centres, dim)))
    return exact16(unit(c[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, dim))))


# --- faiss k-NN --------------------------------------------------------------------------------
def test_flat_search_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    x, q = unit(rng.normal(size=(300, 24))), unit(rng.normal(size=(40, 24)))
    index = KnnIndex(x)
    assert index.kind == "flat" and index.nlist == 1 and index.nbytes == 0
    sims, ids = index.search(q, 7)
    ref = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(q @ x.T, ref, 1), atol=1e-5)
    sims, ids = index.search(q[:2], 305)            # more neighbours than rows: padded
    assert (ids[:, 300:] == -1).all() and np.isneginf(sims[:, 300:]).all()
    assert sorted(ids[0, :300]) == list(range(300))
    assert index.search(np.zeros((0, 24)), 3)[1].shape == (0, 3)
    with pytest.raises(InputMismatch, match="query vectors are 8-d, the index's 24-d"):
        index.search(q[:, :8], 3)
    with pytest.raises(OptionError, match="index kind 'hnsw'"):
        KnnIndex(x, IndexConfig(kind="hnsw"))


def test_ivf_and_ivfpq() -> None:
    """IVF-Flat finds the exact neighbours when every cell is probed and nearly all with a few;
    IVF-PQ (8 bytes per row) finds rows of the right cluster."""
    rng = np.random.default_rng(1)
    x = clustered(rng, 20000, 32, 200, 0.05)
    q = unit(x[::500] + 0.02 * rng.normal(size=(40, 32)))
    exact = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    ivf = KnnIndex(x, IndexConfig(kind="ivf", nlist=64))
    assert ivf.kind == "ivf" and ivf.nlist == 64
    assert_counts_faiss_memory(ivf)
    _, ids = ivf.search(q, 10, nprobe=64)
    assert np.mean([len(set(a) & set(b)) for a, b in zip(ids, exact, strict=True)]) >= 9.9
    _, ids = ivf.search(q, 10, nprobe=8)
    assert np.mean(ids[:, 0] == exact[:, 0]) >= 0.9
    pq = KnnIndex(x, IndexConfig(kind="ivfpq", nlist=64, pq_m=8))
    assert_counts_faiss_memory(pq)
    assert pq.nbytes < ivf.nbytes / 5
    _, ids = pq.search(q, 10, nprobe=64)
    true_sims = q @ x.T
    best, found = true_sims.max(1), np.take_along_axis(true_sims, ids[:, :1], 1)[:, 0]
    # a row of the query's cluster (similarity ~0.95; other clusters' rows ~0 +- 0.2)
    assert (found > 0.85).all() and (best > 0.98).all()
    with pytest.raises(OptionError, match="5 sub-quantisers do not divide 32"):
        KnnIndex(x, IndexConfig(kind="ivfpq", nlist=64, pq_m=5))
    assert auto_nlist(1 << 18) == 1 and auto_nlist(5_000_000) == 4096
    auto = KnnIndex(x[:5000], IndexConfig(exact_max=100))
    assert auto.kind == "ivf" and auto.nlist == 4


def test_faiss_threads_restores() -> None:
    before = faiss.omp_get_max_threads()
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before


def test_kmeans_finds_separated_clusters_and_is_seeded() -> None:
    rng = np.random.default_rng(2)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)
    x = (centres[rng.integers(0, 4, 800)] + 0.1 * rng.normal(size=(800, 2))).astype(np.float32)
    c = kmeans(x, 4, niter=20, seed=0)       # (some seeds start two centroids in one cluster)
    assert c.shape == (4, 2) and c.dtype == np.float32
    found = sorted(map(tuple, np.round(c).astype(int).tolist()))
    assert found == [(0, 0), (0, 10), (10, 0), (10, 10)]
    np.testing.assert_array_equal(kmeans(x, 4, niter=20, seed=0), c)
    assert not np.array_equal(kmeans(x, 4, niter=20, seed=1), c)
    with pytest.raises(InputMismatch, match="k-means of 3 vectors into 4 clusters"):
        kmeans(x[:3], 4)


# --- ASMK* -------------------------------------------------------------------------------------
def test_aggregate_by_hand() -> None:
    centroids = np.array([[0, 0, 0], [10, 10, 10]], np.float32)
    x = np.array([[1, -1, 2], [2, 3, -1], [9, 12, 10]], np.float32)
    codes, words = aggregate(x, np.array([[0], [0], [1]]), centroids)
    # word 0: (1,-1,2) + (2,3,-1) = (3,2,1) -> bits 111; word 1: (-1,2,0) -> 010 (0 is not > 0)
    np.testing.assert_array_equal(words, [0, 1])
    np.testing.assert_array_equal(codes, [[0b11100000], [0b01000000]])
    # two words per descriptor, with a third centroid (0, 10, 0): descriptors 0 and 1 in words 0
    # and 2, descriptor 2 in words 2 and 1 (the order within a row does not matter)
    centroids = np.array([[0, 0, 0], [10, 10, 10], [0, 10, 0]], np.float32)
    codes, words = aggregate(x, np.array([[0, 2], [0, 2], [2, 1]]), centroids)
    # word 0: (3,2,1) -> 111; word 1: (-1,2,0) -> 010;
    # word 2: (1,-11,2) + (2,-7,-1) + (9,2,10) = (12,-16,11) -> 101
    np.testing.assert_array_equal(words, [0, 1, 2])
    np.testing.assert_array_equal(codes, [[0b11100000], [0b01000000], [0b10100000]])


def test_code_columns_keep_bits_and_bytes() -> None:
    rng = np.random.default_rng(8)
    a, b = rng.integers(0, 256, (2, 50, 15), dtype=np.uint8)
    ca, cb = code_columns(a), code_columns(b)
    assert [c.dtype for c in ca] == [np.uint64, np.uint32, np.uint16, np.uint8]   # 15 = 8 + 4 + 2 + 1
    assert sum(c.nbytes for c in ca) == a.nbytes
    hamming = sum(np.bitwise_count(x ^ y).astype(int) for x, y in zip(ca, cb, strict=True))
    np.testing.assert_array_equal(hamming, np.unpackbits(a ^ b, axis=1).sum(1))
    assert [c.dtype for c in code_columns(a[:, :5])] == [np.uint32, np.uint8]


# D -> B of the Hamming similarity 1 - 2 h / B: asmk packs D sign bits into 32-bit words
HAMMING_BITS = {"asmk": {40: 64, 64: 64, 120: 128}, "dim": {40: 40, 64: 64, 120: 120}}


@pytest.mark.parametrize("norm", ["asmk", "dim"])
@pytest.mark.parametrize("dim", [40, 64, 120])
def test_asmk_scores_equal_brute_force(dim: int, norm: str) -> None:
    """Every (query, image) score from the aggregated codes by hand: per shared word the Hamming
    similarity s = 1 - 2 h / B of the unpacked bits, s^alpha where s >= the threshold, summed and
    divided by sqrt(query words * image words)."""
    rng = np.random.default_rng(dim)
    x = clustered(rng, 20 * 60, dim, 150, 0.3)
    centroids = x[rng.choice(len(x), 96, replace=False)]
    cfg = AsmkConfig(codebook_size=96, alpha=3.0, similarity_threshold=0.1, query_assignments=3,
                     hamming_norm=norm)
    bits = HAMMING_BITS[norm][dim]
    db = list(np.split(x, 20))
    index = AsmkIndex(centroids, db, cfg)
    words = VisualWords(centroids, cfg)
    reps = [aggregate(d, words.assign(d, 1), centroids) for d in db]
    for q in (db[4][:30], exact16(unit(rng.normal(size=(40, dim))))):
        qc, qw = aggregate(q, words.assign(q, 3), centroids)
        expected = np.zeros(len(db))
        for i, (c, w) in enumerate(reps):
            for j, word in enumerate(qw):
                k = np.flatnonzero(w == word)
                if len(k):
                    s = 1 - 2 * np.unpackbits(qc[j] ^ c[k[0]])[:dim].sum() / bits
                    expected[i] += s ** 3 if s >= 0.1 else 0.0
            expected[i] /= np.sqrt(len(qw) * len(w))
        np.testing.assert_allclose(index.query(q), expected, rtol=1e-12, atol=1e-15)
        assert expected.any()


def reference_scores(centroids: np.ndarray, db: list[np.ndarray], queries: list[np.ndarray],
                     cfg: AsmkConfig) -> np.ndarray:
    """asmk's own ASMKMethod (binary kernel, no IDF) built in memory from the same centroids."""
    params = {"index": {"gpu_id": None},
              "train_codebook": {"codebook": {"size": len(centroids)}},
              "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                            "quantize": {"multiple_assignment": cfg.db_assignments},
                            "aggregate": {}},
              "query_ivf": {"quantize": {"multiple_assignment": cfg.query_assignments},
                            "aggregate": {}, "search": {"topk": None},
                            "similarity": {"similarity_threshold": cfg.similarity_threshold,
                                           "alpha": cfg.alpha}}}
    book = Codebook(initialize_index(gpu_id=None), size=len(centroids))
    book.index(centroids)
    method = ASMKMethod(params, {}, codebook=book).build_ivf(
        np.concatenate(db), np.repeat(np.arange(len(db)), [len(d) for d in db]))
    _, qids, ranks, scores = method.query_ivf(
        np.concatenate(queries), np.repeat(np.arange(len(queries)), [len(q) for q in queries]))
    out = np.zeros((len(queries), len(db)))
    for qi, r, s in zip(qids, ranks, scores, strict=True):
        out[qi, r] = s
    return out


@pytest.mark.parametrize("dim", [40, 64])
@pytest.mark.parametrize("cfg", [AsmkConfig(codebook_size=128),
                                 AsmkConfig(codebook_size=128, alpha=1.0,
                                            similarity_threshold=0.2, query_assignments=2)])
def test_asmk_scores_equal_the_asmk_package(cfg: AsmkConfig, dim: int) -> None:
    """The default Hamming normalisation is asmk's at any D; the paper's (by D) gives the same
    scores at 64-D and others at 40-D."""
    rng = np.random.default_rng(4)
    x = clustered(rng, 30 * 120, dim, 300, 0.3)
    centroids = x[rng.choice(len(x), 128, replace=False)]
    db = list(np.split(x, 30))
    queries = [exact16(unit(db[i][:60] + 0.1 * rng.normal(size=(60, dim)))) for i in (0, 7, 21)]
    reference = reference_scores(centroids, db, queries, cfg)
    index = AsmkIndex(centroids, db, cfg)
    mine = index.scores(queries)
    np.testing.assert_allclose(mine, reference, atol=1e-7)
    assert [int(np.argmax(s)) for s in mine] == [0, 7, 21]
    by_dim = AsmkIndex(centroids, db, replace(cfg, hamming_norm="dim")).scores(queries)
    if dim == 64:
        np.testing.assert_allclose(by_dim, reference, atol=1e-7)
    else:
        assert np.abs(by_dim - reference).max() > 0.01
    assert index.nbytes == held_bytes(index) > index.num_entries * 4   # the codebook not counted


def test_descriptors_are_rounded_to_float16_first() -> None:
    """The codebook and the scores of float32 descriptors equal those of their float16 rounding
    (what a float16 feature file holds); aggregated without the rounding, some residual sums'
    sign bits differ."""
    rng = np.random.default_rng(8)
    c = unit(rng.normal(size=(200, 40)))
    x = unit(c[rng.integers(0, 200, 12 * 500)] + 0.1 * rng.normal(size=(12 * 500, 40)))
    x16 = exact16(x)
    assert (x != x16).mean() > 0.9
    cfg = AsmkConfig(codebook_size=512)
    centroids = codebook_module.train_codebook(x, cfg)
    np.testing.assert_array_equal(centroids, codebook_module.train_codebook(x16, cfg))
    db, db16 = np.split(x, 12), np.split(x16, 12)
    scores = AsmkIndex(centroids, db, cfg).scores(db[:4])
    np.testing.assert_array_equal(scores, AsmkIndex(centroids, db16, cfg).scores(db16[:4]))
    assert [int(np.argmax(s)) for s in scores] == [0, 1, 2, 3]
    words = VisualWords(centroids, cfg)
    flips = sum(int(np.unpackbits(aggregate(d, w, centroids)[0] ^ aggregate(e, w, centroids)[0]).sum())
                for d, e in zip(db, db16, strict=True) for w in [words.assign(e, 1)])
    assert flips > 100


def test_asmk_copies_rank_first_and_edge_cases() -> None:
    rng = np.random.default_rng(5)
    x = clustered(rng, 12 * 80, 40, 100, 0.3)
    centroids = x[rng.choice(len(x), 64, replace=False)]
    db = list(np.split(x, 12)) + [np.empty((0, 40), np.float32)]
    index = AsmkIndex(VisualWords(centroids), db, AsmkConfig(codebook_size=64))
    scores = index.scores([db[3], db[9], np.empty((0, 40), np.float32)])
    assert scores.shape == (3, 13)
    assert np.argmax(scores[0]) == 3 and np.argmax(scores[1]) == 9
    # (40-D residuals compared over asmk's 64 bits: word pairs count up to h = 32 of 40, a wide margin still)
    assert scores[0, 3] > 1.4 * np.sort(scores[0])[-2]
    assert not scores[2].any() and not scores[:, 12].any()   # empty query / database image
    streamed = AsmkIndex(centroids, iter(db), AsmkConfig(codebook_size=64))   # images read one by one
    assert streamed.num_images == 13
    np.testing.assert_array_equal(streamed.scores([db[3]]), scores[:1])
    np.testing.assert_array_equal(index.scores(d for d in (db[3], db[9])), scores[:2])   # queries read one by one
    assert index.scores([]).shape == (0, 13)
    with pytest.raises(InputMismatch, match="query: descriptors are 8-d, the codebook's 40-d"):
        index.query(x[:5, :8])
    with pytest.raises(InputMismatch, match="database image 1: descriptors are 8-d"):
        AsmkIndex(centroids, [x[:5], x[:5, :8]])
    with pytest.raises(OptionError, match="Hamming normalisation 'bits': expected one of asmk, dim"):
        AsmkIndex(centroids, [x[:5]], AsmkConfig(hamming_norm="bits"))


def test_hnsw_assignment_agrees_with_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    x = clustered(rng, 20000, 32, 400, 0.3)
    centroids = x[rng.choice(len(x), 2048, replace=False)]
    q = unit(x[rng.choice(len(x), 1000, replace=False)] + 0.05 * rng.normal(size=(1000, 32)))
    exact = VisualWords(centroids, AsmkConfig(assignment="exact"))
    hnsw = VisualWords(centroids, AsmkConfig(assignment="hnsw"))
    assert (exact.kind, hnsw.kind) == ("exact", "hnsw")
    ref = exact.assign(q, 5)
    np.testing.assert_array_equal(ref, np.argsort(((q[:, None] - centroids[None]) ** 2).sum(-1),
                                                  axis=1, kind="stable")[:, :5])
    words = hnsw.assign(q, 5)
    assert words.shape == (1000, 5) and words.dtype == np.int64
    assert np.mean(words[:, 0] == ref[:, 0]) >= 0.95
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(words, ref, strict=True)]) >= 0.9
    np.testing.assert_array_equal(hnsw.assign(q, 1), words[:, :1])   # nearest first
    # the graph compares the centroids as float16 (half the memory its search walks)
    other = unit(rng.normal(size=(256, 32)))   # not float16-exact
    dist, found = VisualWords(other, AsmkConfig(assignment="hnsw"))._hnsw.search(q[:20], 1)
    np.testing.assert_allclose(dist[:, 0], ((q[:20] - exact16(other[found[:, 0]])) ** 2).sum(1), rtol=1e-5)
    assert np.abs(dist[:, 0] - ((q[:20] - other[found[:, 0]]) ** 2).sum(1)).max() > 1e-5
    # built on one thread from the centroids alone: the same graph, the same words
    with faiss_threads(2):
        np.testing.assert_array_equal(VisualWords(centroids, AsmkConfig(assignment="hnsw")).assign(q, 5),
                                      words)
    assert hnsw.assign(q[:0], 5).shape == (0, 5) and hnsw.assign(q[:3], 9000).shape == (3, 2048)
    # auto: HNSW from HNSW_MIN_WORDS words of at most HNSW_MAX_DIM dimensions (exact otherwise)
    assert VisualWords(centroids).kind == "exact"
    monkeypatch.setattr(codebook_module, "HNSW_MIN_WORDS", 2048)
    assert VisualWords(centroids).kind == "hnsw"
    monkeypatch.setattr(codebook_module, "HNSW_MAX_DIM", 31)
    assert VisualWords(centroids).kind == "exact"
    assert AsmkIndex(centroids, [x[:100]], AsmkConfig(assignment="exact")).words.kind == "exact"
    with pytest.raises(OptionError, match="word assignment 'fast': expected one of auto, hnsw, exact"):
        VisualWords(centroids, AsmkConfig(assignment="fast"))


def test_hnsw_rows_with_unreached_words_are_assigned_exactly() -> None:
    """faiss's HNSW search gives -1 for the words it did not reach. With every link of the graph
    cut it reaches only its entry point: asked for five words, each row has four -1, and gets
    its exact five; asked for one, it finds one (the entry point), kept as HNSW found it."""
    rng = np.random.default_rng(9)
    centroids = unit(rng.normal(size=(300, 16)))
    q = unit(rng.normal(size=(50, 16)))
    exact = VisualWords(centroids, AsmkConfig(assignment="exact")).assign(q, 5)
    hnsw = VisualWords(centroids, AsmkConfig(assignment="hnsw"))
    graph = hnsw._hnsw.hnsw
    links = faiss.vector_to_array(graph.neighbors)
    faiss.copy_array_to_vector(np.full_like(links, -1), graph.neighbors)
    found = hnsw._hnsw.search(q, 5)[1]
    assert (found[:, 0] == graph.entry_point).all() and (found[:, 1:] == -1).all()
    np.testing.assert_array_equal(hnsw.assign(q, 5), exact)
    np.testing.assert_array_equal(hnsw.assign(q, 1), np.full((50, 1), graph.entry_point))
    assert AsmkIndex(hnsw, [q[:20]], AsmkConfig(query_assignments=5)).query(q[:20])[0] > 0


# --- codebook store ----------------------------------------------------------------------------
def test_codebook_trained_once_stored_and_reused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    x = clustered(rng, 2000, 16, 50, 0.2)
    cfg = AsmkConfig(codebook_size=32)
    path = tmp_path / "asmk" / "codebook.h5"
    calls: list[int] = []

    def descriptors() -> np.ndarray:
        calls.append(1)
        return x

    c = codebook(path, descriptors, cfg, {"pca_dims": 16, "source": "/data/rparis6k"})
    assert c.shape == (32, 16) and calls == [1]
    stored, attrs = load_codebook(path)
    np.testing.assert_array_equal(stored, c)
    assert attrs["codebook_size"] == 32 and attrs["dim"] == 16 and attrs["num_descriptors"] == 2000
    assert attrs["source"] == "/data/rparis6k"
    np.testing.assert_array_equal(kmeans(x, 32, niter=cfg.kmeans_iters, seed=cfg.seed), c)
    # reused: no descriptors read, no training
    monkeypatch.setattr(codebook_module, "train_codebook", lambda *a: pytest.fail("retrained"))
    again = codebook(path, descriptors, cfg, {"pca_dims": 16, "source": "/data/rparis6k"})
    np.testing.assert_array_equal(again, c)
    assert calls == [1]
    with pytest.raises(CodebookError, match=r"codebook\.h5: codebook made with other parameters "
                       r"\(pca_dims: 16 in the file, 40 now\)"):
        codebook(path, descriptors, cfg, {"pca_dims": 40, "source": "/data/rparis6k"})
    with pytest.raises(CodebookError, match="codebook_size: 32 in the file, 64 now"):
        codebook(path, descriptors, AsmkConfig(codebook_size=64), {"pca_dims": 16,
                                                                  "source": "/data/rparis6k"})
    # an attribute the file predates: its legacy value is compared (e.g. float32 descriptors)
    legacy = {"features.descriptor_dtype": "float32"}
    attrs = {"pca_dims": 16, "source": "/data/rparis6k"}
    np.testing.assert_array_equal(codebook(path, descriptors, cfg, {**attrs, **legacy}, legacy), c)
    with pytest.raises(CodebookError, match="features.descriptor_dtype: 'float32' in the file, 'float16' now"):
        codebook(path, descriptors, cfg, {**attrs, "features.descriptor_dtype": "float16"}, legacy)
    with pytest.raises(CodebookError, match="features.descriptor_dtype: None in the file, 'float32' now"):
        codebook(path, descriptors, cfg, {**attrs, **legacy})
    # a codebook trained before descriptors were rounded to float16 is refused with evaluate.py's legacy values
    with h5py.File(path, "a") as f:
        del f.attrs["descriptor_rounding"]
    with pytest.raises(CodebookError, match="descriptor_rounding: 'none' in the file, 'float16' now"):
        codebook(path, descriptors, cfg, {**attrs, **legacy}, CODEBOOK_LEGACY)


def test_codebook_file_errors_and_atomic_write(tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(CodebookError, match="bad.h5: not a readable HDF5 file"):
        load_codebook(bad)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["centroids"] = np.zeros((4, 2), np.float32)
    with pytest.raises(CodebookError, match="other.h5: not an ASMK codebook of this project"):
        load_codebook(other)
    target = tmp_path / "cb.h5"
    with pytest.raises(TypeError):
        save_codebook(target, np.zeros((4, 2), np.float32), {"bad": object()})
    assert not target.exists() and list(tmp_path.glob(".cb.h5*")) == []


def test_faiss_gpu_follows_the_runs_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """With faiss-gpu (faked: its GPU calls record the GPU and run on the CPU) k-means runs on the
    run's GPU, not GPU 0 or every GPU, and the exact word assignment is set on that GPU's torch
    device; a CPU run stays on the CPU (and may use HNSW), as does a GPU that faiss does not see."""
    used: list[tuple[str, int]] = []

    def index_cpu_to_gpu(resources: object, device: int, index: faiss.Index) -> faiss.Index:
        used.append(("k-means", device))
        return index

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
    assert [faiss_gpu(d) for d in ("cpu", torch.device("cpu"), "cuda:1", torch.device("cuda", 0), "cuda:2", None)] \
        == [None, None, 1, 0, None, None]

    rng = np.random.default_rng(3)
    x = clustered(rng, 4000, 16, 64, 0.2)
    on_gpu = kmeans(x, 64, niter=5, seed=0, gpu=1)
    assert used == [("k-means", 1)]
    np.testing.assert_array_equal(on_gpu, kmeans(x, 64, niter=5, seed=0))
    assert used == [("k-means", 1)]  # the CPU run touched no GPU
    words = VisualWords(on_gpu, AsmkConfig(codebook_size=64), gpu=1)
    assert words.kind == "exact" and words.exact.device == torch.device("cuda", 1)
    assert VisualWords(on_gpu, AsmkConfig(codebook_size=64)).exact.device == torch.device("cpu")
    monkeypatch.setattr(codebook_module, "HNSW_MIN_WORDS", 64)  # auto: HNSW on the CPU, exact on a GPU
    assert (VisualWords(on_gpu).kind, VisualWords(on_gpu, gpu=0).kind) == ("hnsw", "exact")
    assert used == [("k-means", 1)]
