"""The stored ASMK* index (extract/retrieval/asmk/stored_index.py): varints by hand, scores equal to the in-memory
index, resumed and grown builds equal to one build, refusals and corrupt files in one line,
bytes per entry on clustered data."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest

import extract.retrieval.asmk.stored_index as stored_index_module
import train.outputs as outputs_module
from extract.config import AsmkConfig
from extract.retrieval.asmk import scan
from extract.retrieval.asmk.codebook import VisualWords
from extract.retrieval.asmk.memory_index import AsmkIndex
from extract.retrieval.asmk.scan import scan_lists, stripes
from extract.retrieval.asmk.stored_index import (
    AsmkIndexError,
    ForwardStore,
    IndexBuild,
    StoredIndex,
    block_crcs,
    crc_blocks,
    encode_varints,
    update_index,
    varint_sizes,
)
from tests.utils import unit
from train.outputs import OutputLock, OutputLockUnavailable, OutputWriteError

ROOT = Path(__file__).resolve().parents[1]
INVERTED = ("codes.npy", "ids.npy", "offsets.npy", "id_offsets.npy", "counts.npy", "block_crc.npy", "keys.txt",
            "meta.json")


def clustered(rng: np.random.Generator, n: int, dim: int, centres: int, noise: float) -> np.ndarray:
    c = unit(rng.normal(size=(centres, dim)))
    return unit(c[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, dim))).astype(np.float32)


def database(seed: int = 0, images: int = 24, dim: int = 40, words: int = 64
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Centroids and ``images`` images of 30-90 clustered descriptors (image "i05" has none)."""
    rng = np.random.default_rng(seed)
    x = clustered(rng, 4000, dim, 120, 0.3)
    centroids = x[rng.choice(len(x), words, replace=False)]
    db = {f"i{i:02d}": x[rng.choice(len(x), int(rng.integers(30, 90)), replace=False)] for i in range(images)}
    db["i05"] = np.empty((0, dim), np.float32)
    return centroids, db


def reader(db: dict[str, np.ndarray], log: list[str] | None = None):
    def descriptors(keys: Sequence[str]) -> Iterator[np.ndarray]:
        for k in keys:
            if log is not None:
                log.append(k)
            yield db[k]
    return descriptors


def files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / "inverted" / name).read_bytes() for name in INVERTED}


def test_varints_by_hand() -> None:
    values = np.array([0, 1, 127, 128, 300, 2**32 - 1], np.uint64)
    expected = [0, 1, 127, 0x80, 0x01, 0xAC, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]
    assert encode_varints(values).tolist() == expected
    assert varint_sizes(values).tolist() == [1, 1, 1, 2, 2, 5]
    assert len(encode_varints(np.empty(0, np.int64))) == 0


# a hand-made inverted file of 8-D residuals (one byte each): word 0 lists images 3, 200 and 1000
# (differences 3, 197, 800), word 1 image 200 (LEB128: 197 = 0xC5 0x01, 800 = 0xA0 0x06, 200 = 0xC8 0x01)
HAND_IDS = [3, 0xC5, 0x01, 0xA0, 0x06, 0xC8, 0x01]
HAND_CODES = [[0b00000000], [0b11110000], [0b00000001], [0b11111111]]


def hand_scan(ids: list[int] = HAND_IDS, offsets: tuple[int, ...] = (0, 3, 4), images: int = 1001, dim: int = 8,
              codes: list[list[int]] = HAND_CODES, bounds: list[int] | None = None) -> tuple[int, int, np.ndarray]:
    """scan_lists of the query words (1, 0) with residuals 0b00001111 and 0 and the kernel 2^-h;
    with ``bounds``, the threads' stripes of images given (any number, whatever the machine's)."""
    scores, words = np.zeros(images), np.array([1, 0])
    arrays = (np.array(ids, np.uint8), np.array([0, 5, 7]), np.array(codes, np.uint8), np.array(offsets), words,
              np.array([[0b00001111], [0]], np.uint8), 0.5 ** np.arange(9), dim, scores)
    if bounds is None:
        problem, word = scan_lists(*arrays)
    else:
        problem, i = scan._scan(*arrays, np.array(bounds), scan.last_word_mask(1))
        word = int(words[i]) if problem != scan.OK else -1
    return problem, word, scores


def test_stripes_by_hand() -> None:
    """Thread t's stripe: (a^t - a^(t+1)) / (1 - a^T) of the images, a = 0.7: 0.3 / 0.51 of 1001
    images is 588.8; 0.3 / 0.657 and 0.51 / 0.657 of 1000 are 456.6 and 776.3."""
    assert scan.DECODE_SHARE == 0.3
    assert stripes(1001, 2).tolist() == [0, 588, 1001]
    assert stripes(1000, 3).tolist() == [0, 456, 776, 1000]
    assert stripes(10, 1).tolist() == [0, 10]


# the threads' stripes of images: one thread; the machine's; image 200 first of a stripe; empty stripes
BOUNDS = [None, [0, 1001], [0, 588, 1001], [0, 200, 1001], [0, 3, 4, 201, 1001], [0, 0, 1000, 1000, 1001]]


@pytest.mark.parametrize("bounds", BOUNDS)
def test_scan_by_hand(bounds: list[int] | None) -> None:
    """Word 1 first: image 200 at distance 4 (1/16); then word 0: image 3 at 0 (1), image 200 at 4
    (1/16 more), image 1000 at 1 (1/2); the same however the images are shared among threads."""
    assert encode_varints(np.array([3, 197, 800, 200])).tolist() == HAND_IDS
    problem, word, scores = hand_scan(bounds=bounds)
    assert (problem, word) == (scan.OK, -1)
    assert {int(i): float(scores[i]) for i in np.flatnonzero(scores)} == {3: 1.0, 200: 0.125, 1000: 0.5}


@pytest.mark.parametrize("bounds", BOUNDS)
@pytest.mark.parametrize(("damage", "problem", "word"), [
    ({"ids": [3, 0xC5, 0x01, 0xA0, 0x86, 0xC8, 0x01]}, scan.CONTINUES, 0),   # the list's last byte goes on
    ({"offsets": (0, 3, 5)}, scan.COUNT, 1),                                  # word 1: 2 entries, 1 id
    ({"images": 700}, scan.DIFFERENCE_RANGE, 0),                              # the difference 800
    ({"images": 1000}, scan.ID_RANGE, 0),                                     # image 200 + 800
    ({"ids": [3, 0x00, 0xA0, 0x86, 0x00, 0xC8, 0x01]}, scan.NOT_INCREASING, 0),   # 3, 0, 800 (in 3 bytes)
    ({"dim": 3}, scan.CODE_BITS, 1),                                          # distance 4 for a 3-D residual
    # word 0: image 3 at distance 4 (entry 0) before image 1000 beyond 1000 images (entry 2): the first
    ({"dim": 3, "images": 1000, "codes": [[0b11110000], [0], [0], [0b00001111]]}, scan.CODE_BITS, 0),
])
def test_scan_reports_the_first_problem_and_its_word(damage: dict, problem: int, word: int,
                                                     bounds: list[int] | None) -> None:
    if bounds is not None:
        bounds = [min(b, damage.get("images", 1001)) for b in bounds]
    assert hand_scan(**damage, bounds=bounds)[:2] == (problem, word)


@pytest.mark.parametrize("dim", [8, 40, 72, 128])
@pytest.mark.parametrize("bounds", [None, (0.3, 0.5)])
def test_scan_is_bit_identical_to_the_in_memory_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dim: int,
                                                       bounds: tuple[float, float] | None) -> None:
    """The scan's scores equal the in-memory index's (np.bincount in entry order) bit for bit at
    codes of 1, 5, 9 and 16 bytes (one 8-byte load, a load and a byte, two loads); with
    ``bounds``, three threads' stripes cut at those fractions of the images, on any machine."""
    if bounds is not None:
        monkeypatch.setattr(scan, "THREADED_ENTRIES", 0)
        monkeypatch.setattr(scan, "stripes", lambda n, _: np.array([0, int(bounds[0] * n), int(bounds[1] * n), n]))
    cfg = AsmkConfig(codebook_size=64)
    centroids, db = database(dim=dim)
    words = VisualWords(centroids, cfg)
    index, _, _ = update_index(tmp_path / "ix", words, cfg, list(db), reader(db))
    memory = AsmkIndex(words, list(db.values()), cfg)
    queries = [db["i03"][:20], db["i17"], unit(np.random.default_rng(9).normal(size=(25, dim)))]
    expected = memory.scores(queries)
    assert np.array_equal(index.scores(queries), expected) and (expected > 0).sum() > 40


@pytest.mark.skipif("NUMBA_THREADING_LAYER" in os.environ, reason="NUMBA_THREADING_LAYER chooses the layer")
def test_scan_threads_are_numbas_own_pool() -> None:
    """The scan runs on numba's workqueue pool, not its OpenMP layer, whose thread count faiss and
    torch set (a scan then ran on one thread)."""
    import numba

    assert hand_scan(bounds=[0, 500, 1001])[0] == scan.OK
    assert numba.threading_layer() == "workqueue"


FUZZ = """
import sys
import numpy as np
sys.path.insert(0, {root!r})
from extract.retrieval.asmk import scan
rng = np.random.default_rng(0)
seen = set()
for trial in range(400):
    images, lists, code_bytes = int(rng.integers(1, 300)), int(rng.integers(1, 6)), int(rng.integers(1, 18))
    lengths = rng.integers(0, 40, lists)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = [np.sort(rng.choice(images, min(n, images), replace=False)) for n in lengths]
    data = [np.diff(i, prepend=0) for i in ids]
    id_bytes = (rng.integers(0, 256, int(lengths.sum()) * 2) if trial % 2 else
                np.concatenate([np.minimum(d, 255) for d in data] + [np.zeros(0, np.int64)])).astype(np.uint8)
    id_offsets = np.sort(rng.integers(0, len(id_bytes) + 1, lists + 1))
    id_offsets[0], id_offsets[-1] = 0, len(id_bytes)
    codes = rng.integers(0, 256, (int(offsets[-1]), code_bytes)).astype(np.uint8)
    query = rng.integers(0, 256, (lists, code_bytes)).astype(np.uint8)
    threads = int(rng.integers(1, 5))
    bounds = np.sort(rng.integers(0, images + 1, threads + 1))
    bounds[0], bounds[-1] = 0, images
    scores = np.zeros(images)
    problem, i = scan._scan(id_bytes, id_offsets, codes, offsets, np.arange(lists), query, np.ones(8 * code_bytes + 1),
                            8 * code_bytes, scores, bounds, scan.last_word_mask(code_bytes))
    seen.add(int(problem))
print(sorted(seen))
"""


def test_damaged_lists_never_index_out_of_bounds(tmp_path: Path) -> None:
    """Random bytes as lists (and lists whose differences were cut to a byte), random stripes:
    with numba's bounds checks on (NUMBA_BOUNDSCHECK=1; compiled apart in a fresh cache), every
    scan returns, reporting a problem or none, and never indexes an array out of bounds."""
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", FUZZ.format(root=str(ROOT))], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert {scan.OK, scan.CONTINUES, scan.COUNT} <= seen and len(seen) >= 5, seen


@pytest.mark.parametrize("cfg", [AsmkConfig(codebook_size=64),
                                 AsmkConfig(codebook_size=64, alpha=1.0, similarity_threshold=0.2, query_assignments=2,
                                            hamming_norm="dim")])
def test_stored_scores_equal_the_in_memory_index(tmp_path: Path, cfg: AsmkConfig) -> None:
    centroids, db = database()
    words = VisualWords(centroids, cfg)
    keys = list(db)
    index, order, report = update_index(tmp_path / "ix", words, cfg, keys, reader(db), {"pca_dims": 40}, chunk=7)
    assert order == keys and (report.added, report.reused) == (len(keys), 0)
    memory = AsmkIndex(words, [db[k] for k in keys], cfg)
    queries = [db["i03"][:20], db["i17"], unit(np.random.default_rng(9).normal(size=(25, 40))),
               np.empty((0, 40), np.float32)]
    expected = memory.scores(queries)
    got = index.scores(queries)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert int(np.argmax(got[0])) == 3 and int(np.argmax(got[1])) == 17 and not got[3].any()
    assert index.num_entries == memory.num_entries and isinstance(index.codes, np.memmap)
    assert index.nbytes == sum((tmp_path / "ix" / "inverted" / n).stat().st_size for n in INVERTED)
    # a second call reuses it: nothing aggregated, nothing read
    again, _, report = update_index(tmp_path / "ix", words, cfg, keys, reader({}), {"pca_dims": 40})
    assert (report.added, report.reused) == (0, len(keys))
    np.testing.assert_array_equal(again.scores(queries), got)


def test_killed_build_resumes_and_equals_one_build(tmp_path: Path) -> None:
    cfg = AsmkConfig(codebook_size=64)
    centroids, db = database(1)
    words, keys = VisualWords(centroids, cfg), list(db)
    update_index(tmp_path / "whole", words, cfg, keys, reader(db))

    def failing(keys: Sequence[str]) -> Iterator[np.ndarray]:
        for i, k in enumerate(keys):
            if i == 8:
                raise KeyboardInterrupt
            yield db[k]

    with pytest.raises(KeyboardInterrupt):
        update_index(tmp_path / "part", words, cfg, keys, failing, commit_every=3)
    read: list[str] = []
    _, order, report = update_index(tmp_path / "part", words, cfg, keys, reader(db, read), commit_every=3)
    assert report.reused == 6 and read == keys[6:] and order == keys   # images 6 and 7 were not committed
    assert files(tmp_path / "part") == files(tmp_path / "whole")


KILLED = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {root!r})
from extract.retrieval.asmk.codebook import VisualWords
from extract.retrieval.asmk.stored_index import update_index
from extract.config import AsmkConfig
data = np.load({data!r})
keys = [f"i{{i:02d}}" for i in range(len(data.files) - 1)]
def descriptors(todo):
    for i, k in enumerate(todo):
        if i == 7:
            os.kill(os.getpid(), signal.SIGKILL)
        yield data[k]
cfg = AsmkConfig(codebook_size=64)
update_index({folder!r}, VisualWords(data["centroids"], cfg), cfg, keys, descriptors, commit_every=2)
"""


def test_sigkilled_build_resumes(tmp_path: Path) -> None:
    cfg = AsmkConfig(codebook_size=64)
    centroids, db = database(2)
    words, keys = VisualWords(centroids, cfg), list(db)
    np.savez(tmp_path / "data.npz", centroids=centroids, **db)
    script = KILLED.format(root=str(ROOT), data=str(tmp_path / "data.npz"), folder=str(tmp_path / "killed"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr
    assert not (tmp_path / "killed" / "inverted").exists()
    read: list[str] = []
    _, _, report = update_index(tmp_path / "killed", words, cfg, keys, reader(db, read))
    assert report.reused == 6 and read == keys[6:]
    update_index(tmp_path / "whole", words, cfg, keys, reader(db))
    assert files(tmp_path / "killed") == files(tmp_path / "whole")


def test_appended_images_equal_one_build(tmp_path: Path) -> None:
    cfg = AsmkConfig(codebook_size=64)
    centroids, db = database(3)
    words, keys = VisualWords(centroids, cfg), list(db)
    update_index(tmp_path / "whole", words, cfg, keys, reader(db))
    first, order, _ = update_index(tmp_path / "grown", words, cfg, keys[:10], reader(db))
    assert first.num_images == 10 and order == keys[:10]
    read: list[str] = []
    grown, order, report = update_index(tmp_path / "grown", words, cfg, keys, reader(db, read))
    assert (report.added, report.reused) == (len(keys) - 10, 10) and read == keys[10:] and order == keys
    assert files(tmp_path / "grown") == files(tmp_path / "whole")
    # new keys come after the stored ones, whatever their place in the list; any character but a line
    # feed may be in a key
    shuffled = keys[10:] + keys[:10]
    _, order, _ = update_index(tmp_path / "grown", words, cfg, shuffled, reader({}))
    assert order == keys


def test_changed_codebook_features_or_database_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = AsmkConfig(codebook_size=64)
    centroids, db = database(4)
    keys, folder = list(db), tmp_path / "ix"
    update_index(folder, VisualWords(centroids, cfg), cfg, keys, reader(db), {"pca_dims": 40})
    manifest = folder / "forward" / "manifest.json"
    with pytest.raises(AsmkIndexError, match=rf"^{manifest}: index made from another codebook or other features "
                                             r"\(codebook_sha256: '[0-9a-f]{64}' in the index, '[0-9a-f]{64}' now\)"):
        update_index(folder, VisualWords(centroids * 0.5, cfg), cfg, keys, reader(db), {"pca_dims": 40})
    with pytest.raises(AsmkIndexError, match=r"\(features.pca_dims: 40 in the index, 16 now\): delete .*ix to rebuild"):
        update_index(folder, VisualWords(centroids, cfg), cfg, keys, reader(db), {"pca_dims": 16})
    hnsw = replace(cfg, assignment="hnsw")
    with pytest.raises(AsmkIndexError, match="assignment: 'exact' in the index, 'hnsw' now"):
        update_index(folder, VisualWords(centroids, hnsw), hnsw, keys, reader(db), {"pca_dims": 40})
    update_index(tmp_path / "graph", VisualWords(centroids, hnsw), hnsw, keys, reader(db), {"pca_dims": 40})
    with monkeypatch.context() as m, pytest.raises(AsmkIndexError, match="hnsw_storage: 'float16' in the index, "
                                                                           "'float32' now"):
        m.setattr(stored_index_module, "HNSW_STORAGE", "float32")   # a graph comparing the centroids otherwise
        update_index(tmp_path / "graph", VisualWords(centroids, hnsw), hnsw, keys, reader(db), {"pca_dims": 40})
    with pytest.raises(AsmkIndexError, match=rf"^{folder}: holds 1 images that the database does not have now "
                                             r"\(e.g. 'i00'\)"):
        update_index(folder, VisualWords(centroids, cfg), cfg, keys[1:], reader(db), {"pca_dims": 40})
    # the similarity's parameters are not part of the index: another alpha reuses it
    other = replace(cfg, alpha=1.0, hamming_norm="dim")
    _, _, report = update_index(folder, VisualWords(centroids, other), other, keys, reader({}), {"pca_dims": 40})
    assert report.added == 0
    with OutputLock(folder), pytest.raises(AsmkIndexError, match=rf"^{folder}: in use by another process \(pid "
                                                                  rf"{os.getpid()}, since .*\); wait for it"):
        update_index(folder, VisualWords(centroids, cfg), cfg, keys, reader(db), {"pca_dims": 40})


WHOLE = "delete {folder} to rebuild the index (or pass --overwrite, which also extracts the features again)"
INVERTED_HINT = "delete {folder}/inverted to remake it from the forward store, or " + WHOLE


@pytest.mark.parametrize("damage", ["codes", "offsets", "meta", "manifest", "words", "counts", "format"])
def test_corrupt_files_are_named_in_one_line(tmp_path: Path, damage: str) -> None:
    cfg = AsmkConfig(codebook_size=64)
    centroids, db = database(5)
    words, keys, folder = VisualWords(centroids, cfg), list(db), tmp_path / "ix"
    update_index(folder, words, cfg, keys, reader(db))
    path, message = {
        "codes": (folder / "inverted" / "codes.npy", "damaged (14 bytes, meta.json records "),
        "offsets": (folder / "inverted" / "offsets.npy", "damaged (its crc32 is "),
        "meta": (folder / "inverted" / "meta.json", "unreadable"),
        "manifest": (folder / "forward" / "manifest.json", "unreadable"),
        "words": (folder / "forward" / "words.bin", "shorter than"),
        "counts": (folder / "forward" / "manifest.json", "damaged (its contents do not match their crc32)"),
        "format": (folder / "forward" / "manifest.json", "an index of another version of this code "
                                                         "('delf-pytorch asmk forward store 1'; this one reads "
                                                         "'delf-pytorch asmk forward store 2')"),
    }[damage]
    if damage == "counts":
        path.write_text(path.read_text().replace('"entries"', '"entry"'))
    elif damage == "format":
        path.write_text(path.read_text().replace("forward store 2", "forward store 1"))
    elif damage == "offsets":
        np.save(path, np.zeros(65, np.int64))
    elif damage == "words":
        with open(path, "r+b") as f:
            f.truncate(8)
    else:
        path.write_bytes(b"\x93NUMPY garbage" if path.suffix == ".npy" else b"{not json")
    with pytest.raises(AsmkIndexError) as e:
        update_index(folder, words, cfg, keys, reader(db))
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)
    hint = INVERTED_HINT if path.parent.name == "inverted" else WHOLE
    assert str(e.value).endswith(hint.format(folder=folder))
    if damage in ("codes", "offsets"):   # the inverted file alone: loading it fails the same way
        with pytest.raises(AsmkIndexError, match=f"^{path}"):
            StoredIndex(folder / "inverted", words, cfg)


def built(tmp_path: Path, seed: int = 5) -> tuple[AsmkConfig, VisualWords, dict[str, np.ndarray], Path]:
    """A tiny index of :func:`database` (64 words) in tmp_path / "ix": (config, words, images, folder)."""
    cfg = AsmkConfig(codebook_size=64)
    centroids, db = database(seed)
    words, folder = VisualWords(centroids, cfg), tmp_path / "ix"
    update_index(folder, words, cfg, list(db), reader(db))
    return cfg, words, db, folder


def every_list_queries(words: VisualWords, db: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Queries that read every word's list: the centroids (each assigned to its own word), and two images."""
    return [words.centroids, db["i03"], db["i11"]]


def index_file_names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_index_files_are_the_documented_ones(tmp_path: Path) -> None:
    _, _, _, folder = built(tmp_path)
    assert index_file_names(folder) == sorted(
        [f"forward/{n}" for n in ("words.bin", "codes.bin", "counts.bin", "keys.txt", "manifest.json")]
        + [f"inverted/{n}" for n in INVERTED])


def flipped_positions(size: int) -> list[int]:
    """Where one test flips a byte of a file of ``size`` bytes: its first and last byte and six between."""
    return sorted({0, size - 1, *np.linspace(0, size - 1, 8).astype(int).tolist()})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny index, queries that read every list, its scores, and the scores once it grew by one
    image ("new")."""
    tmp = tmp_path_factory.mktemp("pristine")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(stored_index_module, "CRC_BLOCK_BYTES", 256)   # a few blocks
        cfg, words, db, folder = built(tmp)
    queries = every_list_queries(words, db)
    extra = {**db, "new": db["i07"][:40]}
    grown = update_index(tmp / "grown", words, cfg, [*extra], reader(extra))[0].scores(queries)
    return {"cfg": cfg, "words": words, "db": extra, "folder": folder, "queries": queries, "grown": grown,
            "scores": StoredIndex(folder / "inverted", words, cfg).scores(queries)}


@pytest.mark.parametrize("name", [f"forward/{n}" for n in ("words.bin", "codes.bin", "counts.bin", "keys.txt",
                                                            "manifest.json")] + [f"inverted/{n}" for n in INVERTED])
def test_a_flipped_byte_is_refused_in_one_line_never_other_scores(tmp_path: Path, pristine: dict, name: str) -> None:
    """One byte of one index file changed (its top bit, or its low bit: a varint's continuation,
    an id lowered by one), at eight places: the index is refused in one line naming the file, or
    it scores as before; never other scores. Every flip in the inverted file is refused by queries
    that read every list; every flip in the forward store by the time the index grows (it reads
    the forward store's words and residuals then, not before)."""
    cfg, words, db, queries = pristine["cfg"], pristine["words"], pristine["db"], pristine["queries"]
    keys = [k for k in db if k != "new"]
    data = (pristine["folder"] / name).read_bytes()
    refusals = {"reuse": 0, "grow": 0}
    for i, at in enumerate(flipped_positions(len(data))):
        work = tmp_path / f"work{i}"
        shutil.copytree(pristine["folder"], work)
        damaged = bytearray(data)
        damaged[at] ^= 0x80 if i % 2 else 0x01
        (work / name).write_bytes(bytes(damaged))
        for step, database_keys, expected in (("reuse", keys, pristine["scores"]),
                                              ("grow", [*keys, "new"], pristine["grown"])):
            try:
                scores = update_index(work, words, cfg, database_keys, reader(db))[0].scores(queries)
            except AsmkIndexError as e:
                assert str(e).startswith(f"{work / name}: ") and "\n" not in str(e), (at, str(e))
                refusals[step] += 1
                break   # refused: nothing was changed, the next step would be refused alike
            np.testing.assert_array_equal(scores, expected, err_msg=f"byte {at} of {name}")
    flips = len(flipped_positions(len(data)))
    if name.startswith("inverted/"):
        assert refusals["reuse"] == flips
    else:
        assert refusals["reuse"] + refusals["grow"] == flips


def resign(inverted: Path) -> None:
    """Record the inverted file's present bytes as its checksums (as a build with a bug would):
    then only the structure checks stand between damage and the scores."""
    arrays = {n: np.load(inverted / n, mmap_mode="r") for n in ("codes.npy", "ids.npy", "offsets.npy",
                                                                 "id_offsets.npy")}
    meta = json.loads((inverted / "meta.json").read_text())
    first_words = crc_blocks(arrays["offsets.npy"], arrays["id_offsets.npy"], 5, meta["crc_block_bytes"])
    np.save(inverted / "block_crc.npy", block_crcs(arrays["codes.npy"], arrays["ids.npy"], arrays["offsets.npy"],
                                                   arrays["id_offsets.npy"], first_words,
                                                   np.arange(len(first_words) - 1)))
    del meta["json_crc32"]
    for name in meta["files"]:
        size = (inverted / name).stat().st_size
        data = arrays[name].nbytes if name in ("codes.npy", "ids.npy") else 0
        meta["files"][name] = {"bytes": size, "crc32": stored_index_module.crc32_file(inverted / name, 0, size - data)}
    stored_index_module._write_json(inverted / "meta.json", meta)


@pytest.mark.parametrize("damage", ["continued", "repeated", "beyond", "shorter", "offsets"])
def test_list_structure_is_checked_on_every_read(tmp_path: Path, damage: str) -> None:
    """Damage that the checksums were made to accept (re-signed): a list read is refused in one
    line naming ids.npy when its last id continues into the next list, an id repeats, an id is
    beyond the image count, or it holds fewer ids than the offsets say; offsets that disagree with
    the files, on loading."""
    cfg, words, db, folder = built(tmp_path)
    inverted = folder / "inverted"
    ids = np.load(inverted / "ids.npy")
    id_offsets, offsets = np.load(inverted / "id_offsets.npy"), np.load(inverted / "offsets.npy")
    lengths = np.diff(offsets)
    w = int(np.argmax(lengths))   # the longest list: a few one-byte differences, then the next list
    lo, hi = int(id_offsets[w]), int(id_offsets[w + 1])
    assert (ids[lo:hi] < 128).all() and hi - lo == lengths[w] >= 3
    path, message = inverted / "ids.npy", None
    if damage == "continued":
        ids[hi - 1] |= 0x80
        message = "a list's last id continues past its bytes"
    elif damage == "repeated":
        ids[lo + 1] = 0
        message = "ids not strictly increasing"
    elif damage == "beyond":
        ids[lo] = len(db)
        message = f"an id or difference not below the image count {len(db)}"
    elif damage == "shorter":   # the second and third ids read as one
        ids[lo + 1] |= 0x80
        message = "a list holds another number of ids than offsets.npy says"
    if damage == "offsets":
        offsets[-1] += 1
        np.save(inverted / "offsets.npy", offsets)
        path, message = inverted / "offsets.npy", "damaged (inconsistent with the index's other files)"
    else:
        np.save(inverted / "ids.npy", ids)
    resign(inverted)
    with pytest.raises(AsmkIndexError) as e:
        index = StoredIndex(inverted, words, cfg)
        index.scores(every_list_queries(words, db))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).endswith(INVERTED_HINT.format(folder=folder))
    if damage != "offsets":
        assert f", in the list of visual word {w})" in str(e.value)


def test_crc_blocks_by_hand() -> None:
    """Blocks: the consecutive words whose lists start in one window of the lists' bytes (codes
    and ids together); word 3's list starts at byte 5 * 10 + 9 = 59, in the fourth 16-byte window."""
    offsets, id_offsets = np.array([0, 2, 2, 10, 11]), np.array([0, 2, 2, 9, 10])
    assert crc_blocks(offsets, id_offsets, 5, 16).tolist() == [0, 3, 4]
    assert crc_blocks(offsets, id_offsets, 5, 1 << 12).tolist() == [0, 4]
    assert crc_blocks(offsets, id_offsets, 5, 1).tolist() == [0, 1, 3, 4]   # words 1 and 2 start at one byte
    codes, ids = np.arange(55, dtype=np.uint8).reshape(11, 5), np.arange(10, dtype=np.uint8)
    got = block_crcs(codes, ids, offsets, id_offsets, np.array([0, 3, 4]), np.array([1, 0]))
    assert got.tolist() == [[zlib.crc32(codes[10:].tobytes()), zlib.crc32(ids[9:].tobytes())],
                            [zlib.crc32(codes[:10].tobytes()), zlib.crc32(ids[:9].tobytes())]]


def test_verify_reads_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify() finds damage in a list no query read, and in the forward store's residuals."""
    monkeypatch.setattr(stored_index_module, "CRC_BLOCK_BYTES", 64)   # many blocks in a tiny index
    cfg, words, db, folder = built(tmp_path)
    index = StoredIndex(folder / "inverted", words, cfg)
    index.verify()
    assert json.loads((folder / "inverted" / "meta.json").read_text())["crc_block_bytes"] == 64
    offsets = np.load(folder / "inverted" / "offsets.npy")
    w = int(np.flatnonzero(np.diff(offsets))[-1])   # the last word with a list
    codes = folder / "inverted" / "codes.npy"
    data = bytearray(codes.read_bytes())
    data[len(data) - 1] ^= 1   # the last list's last byte
    codes.write_bytes(bytes(data))
    index = StoredIndex(folder / "inverted", words, cfg)
    index.search(np.zeros((1, 5), np.uint8), np.array([0]))   # another block: read and checked alone
    assert index._checked.sum() == 1 and len(index._checked) > 10
    with pytest.raises(AsmkIndexError, match=rf"^{codes}: damaged \(the lists of visual words \d+..{w} do not match "
                                             r"their crc32 in block_crc.npy\); delete "):
        index.verify()
    with ForwardStore(folder / "forward", stored_index_module.index_identity(words, cfg, {}), 5) as store:
        store.verify()
        path = folder / "forward" / "codes.bin"
        data = bytearray(path.read_bytes())
        data[7] ^= 0x10
        path.write_bytes(bytes(data))
        with pytest.raises(AsmkIndexError, match=rf"^{path}: damaged \(its crc32 is [0-9a-f]{{8}}, manifest.json "
                                                 r"records [0-9a-f]{8}\); delete "):
            store.verify()


def test_a_key_is_stored_once(tmp_path: Path) -> None:
    """The forward store refuses a key it holds; an index build ignores an image appended again
    (its stored entries kept, counted) and a key listed twice; the index's bytes do not change."""
    cfg, words, db, folder = built(tmp_path)
    keys = list(db)
    before = {n: (folder / n).read_bytes() for n in index_file_names(folder)}
    with ForwardStore(folder / "forward", stored_index_module.index_identity(words, cfg, {}), 5) as store:
        with pytest.raises(AsmkIndexError, match=rf"^'i03': already in the index {folder} \(an image is stored "
                                                 r"once\)$"):
            store.append("i03", np.zeros((1, 5), np.uint8), np.array([4]))
    with IndexBuild(folder, words, cfg) as build:
        for key in ("i03", "i17"):   # features extracted again: other descriptors, kept as stored
            build.append(key, db["i00"])
        build.append_missing([*keys, "i03"], reader({}))
        _, order, report = build.finish(keys)
    assert order == keys and (report.added, report.reused, report.repeated) == (0, len(keys), 2)
    assert {n: (folder / n).read_bytes() for n in index_file_names(folder)} == before
    # a key listed twice in one build: stored once
    read: list[str] = []
    _, order, report = update_index(tmp_path / "twice", words, cfg, [*keys, *keys[:3]], reader(db, read))
    assert order == keys and read == keys and report.added == len(keys)
    assert files(tmp_path / "twice") == files(folder)


def test_deleted_parts_cost_what_the_docs_say(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """inverted/ deleted: remade from forward/, the same bytes, no image read. forward/ deleted:
    the inverted file serves the same scores, said in the log; a new image is refused in one line
    (no image read); deleting the folder rebuilds it all."""
    cfg, words, db, folder = built(tmp_path)
    keys, queries = list(db), every_list_queries(words, db)
    expected = StoredIndex(folder / "inverted", words, cfg).scores(queries)
    pristine = files(folder)
    shutil.rmtree(folder / "inverted")
    _, order, report = update_index(folder, words, cfg, keys, reader({}))
    assert files(folder) == pristine and order == keys and report.reused == len(keys)
    shutil.rmtree(folder / "forward")
    with caplog.at_level(logging.INFO, logger="delf"):
        index, order, report = update_index(folder, words, cfg, keys, reader({}))
    assert order == keys and (report.added, report.reused) == (0, len(keys))
    np.testing.assert_array_equal(index.scores(queries), expected)
    assert f"ASMK* index {folder}: no forward store (forward/ deleted)" in caplog.text
    assert not (folder / "forward").exists()
    with pytest.raises(AsmkIndexError) as e:
        update_index(folder, words, cfg, [*keys, "new"], reader({}))
    assert str(e.value) == (f"{folder / 'forward'}: deleted, so the index cannot take 1 new images (e.g. 'new'); its "
                            f"inverted file serves the {len(keys)} images it holds; to add images, "
                            + WHOLE.format(folder=folder) + ", which aggregates every image again")


def test_renames_are_followed_by_a_folder_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The inverted file's folder renamed into place, then the index folder synced; a manifest
    replaced (atomic_path), then its folder synced."""
    synced: list[tuple[Path, bool, bool]] = []
    replaced: list[tuple[Path, list[str]]] = []
    fsync_folder = outputs_module.fsync_folder

    def spy(folder: Path) -> None:
        folder = Path(folder)
        synced.append((folder, (folder / "inverted" / "meta.json").exists(), (folder / ".inverted.tmp").exists()))
        fsync_folder(folder)

    def atomic_spy(folder: Path) -> None:
        replaced.append((Path(folder), sorted(p.name for p in Path(folder).iterdir())))
        fsync_folder(folder)

    monkeypatch.setattr(stored_index_module, "fsync_folder", spy)
    monkeypatch.setattr(outputs_module, "fsync_folder", atomic_spy)
    _, _, _, folder = built(tmp_path)
    assert synced[-1] == (folder, True, False)   # after the rename, before anything else
    forward = [names for f, names in replaced if f == folder / "forward"]
    assert forward and all("manifest.json" in names and not any(n.endswith(".tmp") for n in names) for names in forward)


def test_a_filesystem_without_flock_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(outputs_module.fcntl, "flock", no_flock)
    lock = tmp_path / "out.lock"
    line = (f"{lock}: cannot lock it ({os.strerror(errno.ENOLCK)}): this filesystem gives no flock, so two runs "
            "could write one output; put the output on a local filesystem")
    with pytest.raises(OutputLockUnavailable) as e:
        OutputLock(tmp_path / "out")
    assert str(e.value) == line and e.value.errno == errno.ENOLCK
    assert isinstance(e.value, OSError) and isinstance(e.value, OutputWriteError)
    cfg = AsmkConfig(codebook_size=64)
    centroids, db = database(7, images=3)
    with pytest.raises(AsmkIndexError) as e:
        update_index(tmp_path / "ix", VisualWords(centroids, cfg), cfg, list(db), reader(db))
    assert str(e.value) == line.replace(str(lock), str(tmp_path / "ix.lock"))
    assert not (tmp_path / "ix").exists()


def test_entry_bytes_on_clustered_data(tmp_path: Path) -> None:
    """Images that share visual words, as real ones do: an entry costs its residual (D/8 bytes)
    and at most 1.5 bytes of image id and list bookkeeping."""
    rng = np.random.default_rng(6)
    dim, images = 40, 1500
    parts = unit(rng.normal(size=(300, dim))).astype(np.float32)
    centroids = unit(parts[rng.integers(0, 300, 256)] + 0.2 * rng.normal(size=(256, dim))).astype(np.float32)
    db = {}
    for i in range(images):   # each image shows ~40 of the 300 parts, 3-5 descriptors each
        shown = parts[rng.choice(300, 40, replace=False)]
        x = np.repeat(shown, rng.integers(3, 6, 40), axis=0)
        db[f"i{i:04d}"] = unit(x + 0.15 * rng.normal(size=x.shape)).astype(np.float32)
    cfg = AsmkConfig(codebook_size=256)
    index, _, _ = update_index(tmp_path / "ix", VisualWords(centroids, cfg), cfg, list(db), reader(db))
    per_entry = index.nbytes / index.num_entries
    assert index.num_entries > 30 * images
    assert dim / 8 < per_entry <= dim / 8 + 1.5, per_entry


def test_keys_keep_any_character_but_a_line_feed(tmp_path: Path) -> None:
    cfg = AsmkConfig(codebook_size=64)
    centroids, db = database(7, images=3)
    odd = dict(zip(["a\u2028b", "c\rd", "e\tf é"], list(db.values())[:3], strict=True))
    words = VisualWords(centroids, cfg)
    update_index(tmp_path / "ix", words, cfg, list(odd), reader(odd))
    _, order, report = update_index(tmp_path / "ix", words, cfg, list(odd), reader({}))
    assert order == list(odd) and report.reused == 3
    with pytest.raises(AsmkIndexError, match=r"^'x\\ny': an image key with a line break cannot be stored"):
        update_index(tmp_path / "ix", words, cfg, [*odd, "x\ny"], reader({"x\ny": db["i00"]}))
