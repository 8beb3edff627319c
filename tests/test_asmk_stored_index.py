"""The stored ASMK* index (extract/retrieval/asmk/stored_index.py): varints by hand, scores equal to the in-memory
index, resumed and grown builds equal to one build, refusals and corrupt files in one line,
bytes per entry on clustered data."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest

import extract.retrieval.asmk.stored_index as stored_index_module
from extract.config import AsmkConfig
from extract.retrieval.asmk.codebook import VisualWords
from extract.retrieval.asmk.memory_index import AsmkIndex
from extract.retrieval.asmk.stored_index import (
    AsmkIndexError,
    StoredIndex,
    decode_varints,
    encode_varints,
    update_index,
    varint_sizes,
)
from tests.utils import unit
from train.outputs import OutputLock

ROOT = Path(__file__).resolve().parents[1]
INVERTED = ("codes.npy", "ids.npy", "offsets.npy", "id_offsets.npy", "counts.npy", "meta.json")


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
    assert decode_varints(np.array(expected, np.uint8)).tolist() == values.tolist()
    rng = np.random.default_rng(0)
    many = rng.integers(0, 2**40, 5000) >> rng.integers(0, 40, 5000)
    np.testing.assert_array_equal(decode_varints(encode_varints(many)), many)
    assert len(encode_varints(np.empty(0, np.int64))) == 0 and len(decode_varints(np.empty(0, np.uint8))) == 0


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


@pytest.mark.parametrize("damage", ["codes", "offsets", "meta", "manifest", "words", "counts"])
def test_corrupt_files_are_named_in_one_line(tmp_path: Path, damage: str) -> None:
    cfg = AsmkConfig(codebook_size=64)
    centroids, db = database(5)
    words, keys, folder = VisualWords(centroids, cfg), list(db), tmp_path / "ix"
    update_index(folder, words, cfg, keys, reader(db))
    path, message = {
        "codes": (folder / "inverted" / "codes.npy", "unreadable"),
        "offsets": (folder / "inverted" / "offsets.npy", "inconsistent with the index's other files"),
        "meta": (folder / "inverted" / "meta.json", "unreadable"),
        "manifest": (folder / "forward" / "manifest.json", "unreadable"),
        "words": (folder / "forward" / "words.bin", "shorter than"),
        "counts": (folder / "forward" / "manifest.json", "lacks the counts images, entries, keys_bytes"),
    }[damage]
    if damage == "counts":
        path.write_text(path.read_text().replace('"entries"', '"entry"'))
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
    assert str(e.value).endswith(f"delete {folder} to rebuild the index (or pass --overwrite, which also extracts "
                                 "the features again)")
    if damage in ("codes", "offsets"):   # the inverted file alone: loading it fails the same way
        with pytest.raises(AsmkIndexError, match=f"^{path}"):
            StoredIndex(folder / "inverted", words, cfg)


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
