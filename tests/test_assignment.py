"""Exact word assignment (extract/retrieval/asmk/assignment.py): the certified bfloat16 and float32
products give faiss ``IndexFlatL2``'s words on random data, on near-ties built so that float32
computes every distance exactly, and the margin is what keeps them exact."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

import extract.retrieval.asmk.assignment as assignment
import train.runtime
from extract.config import AsmkConfig
from extract.retrieval.asmk.assignment import NearestWords, default_method, kept_groups, shortlist
from extract.retrieval.asmk.codebook import VisualWords
from tests.utils import unit


def flat_l2(centroids: np.ndarray, x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss IndexFlatL2's (distances, words) of the m nearest centroids of each row of ``x``."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    return index.search(x, m)


def brute_force(centroids: np.ndarray, x: np.ndarray, m: int) -> np.ndarray:
    """The m nearest words by float64 squared distances rounded to float32, ties to the lower index."""
    d = ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1).astype(np.float32)
    return np.argsort(d, axis=1, kind="stable")[:, :m]


def codebook_like(rng: np.random.Generator, words: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, 1000 descriptors): centroids of unit descriptors spread around 2000 parts (as
    k-means makes them), descriptors near random centroids, as float16 (as ASMK* rounds them)."""
    parts = unit(rng.normal(size=(2000, dim)))
    centroids = unit(parts[rng.integers(0, 2000, words)] + 0.6 / np.sqrt(dim) * rng.normal(size=(words, dim)))
    x = unit(centroids[rng.integers(0, words, 1000)] + 0.5 / np.sqrt(dim) * rng.normal(size=(1000, dim)))
    return centroids.astype(np.float32), x.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("method", ["bf16", "fp32"])
@pytest.mark.parametrize("dim", [40, 128])
@pytest.mark.parametrize("data", ["uniform", "codebook"])
def test_words_equal_faiss_flat_on_random_data(method: str, dim: int, data: str) -> None:
    rng = np.random.default_rng(dim)
    if data == "uniform":
        centroids = unit(rng.normal(size=(20000, dim))).astype(np.float32)   # 5 blocks, the last padded
        x = unit(rng.normal(size=(1000, dim))).astype(np.float32)
    else:
        centroids, x = codebook_like(rng, 20000, dim)
    words = NearestWords(centroids, method)
    for m in (1, 5):
        got = words(x, m)
        assert got.shape == (1000, m) and got.dtype == np.int64
        np.testing.assert_array_equal(got, flat_l2(centroids, x, m)[1])
        # the short lists do the work: nearly every descriptor's certifies (the first list most)
        prep = words.prepared(torch.device("cpu"))
        first, last = (shortlist(torch.from_numpy(x), prep, m, keep)[1].float().mean() for keep in kept_groups(m))
        assert first >= 0.6 and last >= 0.99, (first, last)


def near_ties(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (5000, 8), descriptors (600, 8)) on a grid of 2^-10 in about [-0.5, 0.5] (up to
    ten significant bits: bfloat16 rounds a quarter of the values), coarse enough that float32
    computes every squared distance exactly (faiss too), so equal distances are equal there too:
    centroids 0-99 again at 1000-1099 and 4900-4999 (another block), 200 descriptors near them;
    200 descriptors midway between two centroids (``x = c_a + v``, ``c_b = c_a + 2 v``); 200 near
    random centroids."""
    c = rng.integers(-512, 513, (5000, 8))
    c[1000:1100] = c[4900:5000] = c[:100]
    a, b = rng.choice(np.arange(100, 1000), 200, replace=False), rng.choice(np.arange(1100, 4900), 200, replace=False)
    v = rng.integers(-3, 4, (200, 8))
    c[b] = c[a] + 2 * v
    x = np.concatenate([c[rng.integers(0, 100, 200)] + rng.integers(-2, 3, (200, 8)), c[a] + v,
                        c[rng.integers(0, 5000, 200)] + rng.integers(-8, 9, (200, 8))])
    return (c / 1024).astype(np.float32), (x / 1024).astype(np.float32)


@pytest.mark.parametrize("method", ["bf16", "fp32"])
def test_words_equal_faiss_flat_on_near_ties(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assignment, "TILE", 1024)   # 5 blocks of 1024 words
    centroids, x = near_ties(np.random.default_rng(0))
    assert (torch.from_numpy(centroids).bfloat16().float().numpy() != centroids).mean() > 0.2
    words = NearestWords(centroids, method)
    for m in (1, 5):
        dist, ref = flat_l2(centroids, x, m + 1)
        # faiss's float32 distances are the exact ones: its ties are real ties
        exact = ((x[:, None].astype(np.float64) - centroids[ref].astype(np.float64)) ** 2).sum(-1)
        np.testing.assert_array_equal(dist, exact)
        ties = (dist[:, m - 1] == dist[:, m]).sum()   # the m-th word is tied with the next one
        assert ties >= (300 if m == 1 else 10), ties
        got = words(x, m)
        np.testing.assert_array_equal(got, ref[:, :m])
        np.testing.assert_array_equal(got, brute_force(centroids, x, m))
    # the duplicates come in index order: descriptors nearest to centroid i < 100 get i, 1000 + i, 4900 + i
    got = words(x[:200], 5)
    dup = got[:, 0] < 100
    assert dup.sum() >= 150
    np.testing.assert_array_equal(got[dup, 1:3], np.stack([got[dup, 0] + 1000, got[dup, 0] + 4900], 1))


def misleading_row() -> tuple[np.ndarray, np.ndarray, int]:
    """(centroids (5000, 16), one descriptor (1, 16), its nearest word) where bfloat16 misleads:
    the descriptor is e_0; the nearest word, 25, is e_0 + 2^-9 e_0 (squared distance 2^-18), which
    bfloat16 rounds onto e_0 + 0 and so sees 2^-8 farther than it is; words 1-20 (other groups)
    are e_0 +- s e_j with s = (1 + i/16) 2^-6, bfloat16-exact, squared distances 2^-12 to 2^-10:
    farther than word 25, nearer in bfloat16. The rest are random unit vectors (~2 away)."""
    rng = np.random.default_rng(3)
    centroids = unit(rng.normal(size=(5000, 16)))
    e0 = np.eye(16)[0]
    centroids[25] = e0 * (1 + 2.0 ** -9)
    for i in range(20):
        centroids[1 + i] = e0 + (-1) ** i * (1 + i / 16) * 2.0 ** -6 * np.eye(16)[1 + i % 15]
    return centroids.astype(np.float32), e0[None].astype(np.float32), 25


@pytest.mark.parametrize("scale", [0.0, 0.01])
def test_a_too_small_margin_gives_wrong_words(scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    centroids, x, nearest = misleading_row()
    words = NearestWords(centroids, "bf16")
    prep = words.prepared(torch.device("cpu"))
    for m in (1, 5):
        ref = flat_l2(centroids, x, m)[1]
        assert ref[0, 0] == nearest
        # the right margin does not certify the first list (word 25 is outside it); a list it certifies holds it
        lists = [shortlist(torch.from_numpy(x), prep, m, keep) for keep in kept_groups(m)]
        assert not lists[0][1][0]
        assert all(found[0, 0] == nearest for found, certified in lists if certified[0])
        np.testing.assert_array_equal(words(x, m), ref)
    right = assignment.margin
    monkeypatch.setattr(assignment, "margin", lambda *args: scale * right(*args))
    for m in (1, 5):
        got = words(x, m)
        # certified without the nearest word: the m nearest of the others
        others = flat_l2(np.delete(centroids, nearest, 0), x, m)[1][0]
        np.testing.assert_array_equal(got[0], others + (others >= nearest))


def test_inputs_outputs_and_small_codebooks() -> None:
    rng = np.random.default_rng(5)
    centroids = unit(rng.normal(size=(40, 16))).astype(np.float32)
    x = unit(rng.normal(size=(30, 16))).astype(np.float32)
    words = NearestWords(centroids)
    # 40 words: one group per 8, too few groups for a short list of 5 words: all distances
    np.testing.assert_array_equal(words(x, 5), flat_l2(centroids, x, 5)[1])
    np.testing.assert_array_equal(words(x, 1), flat_l2(centroids, x, 1)[1])
    assert words(x, 100).shape == (30, 40)
    assert words(x[:0], 5).shape == (0, 5) and words(x[:0], 5).dtype == np.int64
    tensor = words(torch.from_numpy(x), 5)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.int64
    np.testing.assert_array_equal(tensor.numpy(), words(x, 5))
    np.testing.assert_array_equal(words(x.astype(np.float64), 5), words(x, 5))
    np.testing.assert_array_equal(NearestWords(centroids, "faiss")(x, 5), flat_l2(centroids, x, 5)[1])
    with pytest.raises(ValueError, match="exact assignment 'int8': expected one of bf16, fp32, faiss"):
        NearestWords(centroids, "int8")


def test_method_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for flags, low, high in (({"avx2", "avx512f"}, "fp32", "faiss"), ({"avx512f", "avx512_bf16"}, "bf16", "bf16"),
                             ({"amx_tile", "amx_bf16"}, "bf16", "bf16"), (set(), "fp32", "faiss")):
        monkeypatch.setattr(train.runtime, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert (default_method(cpu, 40), default_method(cpu, 128)) == (low, high)
        assert NearestWords(np.eye(128, dtype=np.float32)).method(cpu) == high
    assert NearestWords(np.eye(128, dtype=np.float32), "fp32").method(cpu) == "fp32"


def test_visual_words_use_exact_assignment_and_keep_tensors() -> None:
    rng = np.random.default_rng(6)
    centroids, x = codebook_like(rng, 3000, 40)
    words = VisualWords(centroids, AsmkConfig(assignment="exact"))
    np.testing.assert_array_equal(words.assign(x, 5), flat_l2(centroids, x, 5)[1])
    got = words.assign(torch.from_numpy(x), 5)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), flat_l2(centroids, x, 5)[1])
    hnsw = VisualWords(centroids, AsmkConfig(assignment="hnsw"))
    np.testing.assert_array_equal(hnsw.assign(torch.from_numpy(x), 5).numpy(), hnsw.assign(x, 5))


@pytest.mark.cuda
def test_cuda_tensors_are_assigned_on_their_device() -> None:
    """The words are assigned where the descriptors already are, and equal the CPU's."""
    rng = np.random.default_rng(7)
    for dim in (40, 128):
        centroids, x = codebook_like(rng, 20000, dim)
        words = NearestWords(centroids)
        assert words.method(torch.device("cuda")) == "bf16"
        for m in (1, 5):
            got = words(torch.from_numpy(x).cuda(), m)
            assert got.device.type == "cuda" and got.dtype == torch.int64
            np.testing.assert_array_equal(got.cpu().numpy(), NearestWords(centroids, device="cpu")(x, m))
            np.testing.assert_array_equal(got.cpu().numpy(), flat_l2(centroids, x, m)[1])
        visual = VisualWords(centroids)
        assert visual.kind == "exact"   # auto: exact where torch sees a GPU
        assert visual.assign(torch.from_numpy(x).cuda(), 5).device.type == "cuda"
