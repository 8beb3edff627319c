"""The ASMK* index on disk: built once per (codebook, database features), reused by every
evaluation, grown when database images are added.

A folder (evaluate.py: repo/<expr>/asmk/index_<codebook>_<database>/) holds two stores of plain
arrays (never a pickle):

- ``forward/``: what aggregation produced, appended image by image in database order, so that a
  killed build resumes. ``words.bin`` uint32 (E,) and ``codes.bin`` uint8 (E, ceil(D / 8)): the
  (visual word, binary residual) entries of each image, words increasing within an image;
  ``counts.bin`` uint32 (N,): entries per image; ``keys.txt``: the images' keys, one a line.
  ``manifest.json`` (replaced atomically after the data files are synced) records the committed
  image, entry and key-byte counts and the index's identity; a rerun truncates the files to it.
- ``inverted/``: the inverted file made from the complete forward store (rebuilt when it grew;
  written to a temporary folder renamed into place). Per visual word, its entries sorted by
  image: ``codes.npy`` uint8 (E, B); ``offsets.npy`` int64 (K + 1,) each word's first entry;
  ``ids.npy`` uint8: each list's image ids as LEB128 varints of their differences (the first
  one as is; 7 bits a byte, low bits first, the top bit set on every byte but a value's last);
  ``id_offsets.npy`` int64 (K + 1,) each list's first byte; ``counts.npy`` uint32 (N,) words per
  image (the images' norms); ``meta.json``. Queries memory-map the big arrays and read only the
  lists of their words.

The identity (the codebook's sha256, the aggregation parameters, the features' extraction
attributes) is compared on reuse; an index made otherwise is refused with the differences.
Concurrent builds of one folder are refused by a lock (train/outputs.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from extract.config import AsmkConfig
from extract.errors import UserError
from extract.retrieval.asmk.codebook import DESCRIPTOR_ROUNDING, HNSW_STORAGE, VisualWords
from extract.retrieval.asmk.kernel import (
    code_record,
    concat_ranges,
    image_norms,
    kernel_scores,
    represent,
    similarity_kernel,
)
from train.outputs import OutputInUse, OutputLock, atomic_path

FORWARD_FORMAT = "delf-pytorch asmk forward store 1"
INVERTED_FORMAT = "delf-pytorch asmk inverted file 1"
# entries handled at once when the inverted file is made (bounded memory at any database size)
CHUNK_ENTRIES = 1 << 22


class AsmkIndexError(UserError):
    """A stored ASMK* index is unreadable, made otherwise, or in use; the message names the file
    and the reason in one line."""


def fix_hint(folder: Path) -> str:
    return (f"delete {folder} to rebuild the index (or pass --overwrite, which also extracts the "
            "features again)")


def codebook_sha256(centroids: np.ndarray) -> str:
    """sha256 of the codebook's (K, D) float32 centroids, C order."""
    return hashlib.sha256(np.ascontiguousarray(centroids, np.float32).tobytes()).hexdigest()


def index_identity(words: VisualWords, config: AsmkConfig, features: Mapping[str, Any]) -> dict[str, Any]:
    """What the stored entries depend on: the codebook, the database's word assignment (its kind,
    its parameters) and ``features`` (e.g. the feature files' extraction attributes). The
    similarity's parameters (alpha, threshold, Hamming normalisation, query assignments) are
    applied at query time and not part of it."""
    assignment = {"assignment": words.kind, "db_assignments": config.db_assignments}
    if words.kind == "hnsw":
        assignment.update(hnsw_neighbors=config.hnsw_neighbors, hnsw_ef_construction=config.hnsw_ef_construction,
                          hnsw_ef_search=config.hnsw_ef_search, hnsw_storage=HNSW_STORAGE)
    return {"codebook_sha256": codebook_sha256(words.centroids), "codebook_size": words.size, "dim": words.dim,
            "descriptor_rounding": DESCRIPTOR_ROUNDING, **assignment,
            **{f"features.{k}": v for k, v in features.items()}}


def _json_value(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists, numpy scalars Python ones)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else list(v)))


def _differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    now = _json_value(dict(now))
    return [f"{k}: {stored.get(k)!r} in the index, {v!r} now" for k, v in now.items() if stored.get(k) != v] + \
        [f"{k}: {stored[k]!r} in the index, not set now" for k in stored if k not in now]


def _read_json(path: Path, fmt: str, folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AsmkIndexError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             f"{fix_hint(folder)}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise AsmkIndexError(f"{path}: not a {fmt!r} file; {fix_hint(folder)}")
    return data


def _counts(data: Mapping[str, Any], keys: Sequence[str], path: Path, folder: Path) -> tuple[int, ...]:
    """The non-negative integers ``data[k]`` of ``keys``; AsmkIndexError naming ``path`` when one
    is missing or not such a number."""
    values = tuple(data.get(k) for k in keys)
    if not all(isinstance(v, int) and v >= 0 for v in values):
        raise AsmkIndexError(f"{path}: lacks the counts {', '.join(keys)}; {fix_hint(folder)}")
    return values


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


# --- varints ------------------------------------------------------------------------------------
def varint_sizes(values: np.ndarray) -> np.ndarray:
    """Bytes (n,) int64 of each non-negative value's LEB128 encoding (7 bits a byte)."""
    values = np.asarray(values, np.uint64)
    sizes = np.ones(len(values), np.int64)
    for k in range(1, 10):
        sizes += values >= np.uint64(1 << (7 * k))
    return sizes


def encode_varints(values: np.ndarray) -> np.ndarray:
    """LEB128 encoding (uint8) of non-negative integers, concatenated: low 7 bits first, the top
    bit set on every byte but a value's last."""
    values = np.asarray(values, np.uint64)
    sizes = varint_sizes(values)
    out = np.empty(int(sizes.sum()), np.uint8)
    start = np.cumsum(sizes) - sizes
    for k in range(int(sizes.max()) if len(sizes) else 0):
        has = sizes > k
        byte = (values[has] >> np.uint64(7 * k)) & np.uint64(127)
        out[start[has] + k] = byte.astype(np.uint8) | np.where(sizes[has] > k + 1, 128, 0).astype(np.uint8)
    return out


def decode_varints(data: np.ndarray) -> np.ndarray:
    """The int64 values of concatenated LEB128 encodings (:func:`encode_varints`)."""
    data = np.asarray(data, np.uint8)
    ends = np.flatnonzero(data < 128)      # each value's last byte
    if len(ends) == len(data):             # one byte each (most of an index's differences)
        return data.astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    sizes = ends - starts + 1
    values = (data[starts] & 127).astype(np.int64)
    for k in range(1, int(sizes.max())):
        longer = np.flatnonzero(sizes > k)
        values[longer] |= (data[starts[longer] + k] & 127).astype(np.int64) << (7 * k)
    return values


# --- forward store -------------------------------------------------------------------------------
class ForwardStore:
    """The aggregated database images in order (layout: the module's doc), appended and committed;
    a context manager. An existing store is resumed from its last commit when its identity equals
    ``identity``, else refused."""

    FILES = ("words.bin", "codes.bin", "counts.bin", "keys.txt")

    def __init__(self, folder: Path, identity: Mapping[str, Any], code_bytes: int) -> None:
        self.folder, self.code_bytes = Path(folder), code_bytes
        self.manifest = self.folder / "manifest.json"
        self.identity = _json_value(dict(identity))
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.manifest.exists():
            state = _read_json(self.manifest, FORWARD_FORMAT, self.folder.parent)
            diffs = _differences(state.get("identity", {}), self.identity)
            if diffs:
                raise AsmkIndexError(f"{self.manifest}: index made from another codebook or other features ("
                                     + "; ".join(diffs) + f"): {fix_hint(self.folder.parent)}")
            self.num_images, self.num_entries, keys_bytes = _counts(state, ("images", "entries", "keys_bytes"),
                                                                    self.manifest, self.folder.parent)
        else:
            self.num_images = self.num_entries = keys_bytes = 0
        committed = {"words.bin": 4 * self.num_entries, "codes.bin": code_bytes * self.num_entries,
                     "counts.bin": 4 * self.num_images, "keys.txt": keys_bytes}
        for name, size in committed.items():
            path = self.folder / name
            if path.exists() and path.stat().st_size < size or not path.exists() and size:
                raise AsmkIndexError(f"{path}: shorter than {self.manifest} records ({size} bytes); "
                                     f"{fix_hint(self.folder.parent)}")
            with open(path, "ab") as f:   # drop what the last commit did not cover
                f.truncate(size)
        try:
            self.keys = (self.folder / "keys.txt").read_bytes().decode().split("\n")[:-1]
        except UnicodeDecodeError as e:
            raise AsmkIndexError(f"{self.folder / 'keys.txt'}: not UTF-8 text ({e.reason}); "
                                 f"{fix_hint(self.folder.parent)}") from None
        if len(self.keys) != self.num_images:
            raise AsmkIndexError(f"{self.folder / 'keys.txt'}: {len(self.keys)} keys, {self.manifest} records "
                                 f"{self.num_images} images; {fix_hint(self.folder.parent)}")
        self._keys_bytes = keys_bytes
        self._files = {name: open(self.folder / name, "ab") for name in self.FILES}  # noqa: SIM115
        if not self.manifest.exists():
            self.commit()

    def append(self, key: str, codes: np.ndarray, words: np.ndarray) -> None:
        """Add one image (``codes`` (W, B) uint8, ``words`` (W,) increasing) under ``key``;
        kept by the next :meth:`commit`."""
        if "\n" in key:
            raise AsmkIndexError(f"{key!r}: an image key with a line break cannot be stored")
        line = (key + "\n").encode()
        self._files["words.bin"].write(np.asarray(words, np.uint32).tobytes())
        self._files["codes.bin"].write(np.ascontiguousarray(codes, np.uint8).tobytes())
        self._files["counts.bin"].write(np.uint32(len(words)).tobytes())
        self._files["keys.txt"].write(line)
        self.keys.append(key)
        self.num_images += 1
        self.num_entries += len(words)
        self._keys_bytes += len(line)

    def commit(self) -> None:
        """Sync the data files, then record their committed sizes (atomically)."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        _write_json(self.manifest, {"format": FORWARD_FORMAT, "images": self.num_images,
                                    "entries": self.num_entries, "keys_bytes": self._keys_bytes,
                                    "code_bytes": self.code_bytes, "identity": self.identity})

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The committed (words (E,) uint32, codes (E, B) uint8, counts (N,) uint32),
        memory-mapped (read-only)."""
        def mapped(name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
            if not shape[0]:
                return np.empty(shape, dtype)
            return np.memmap(self.folder / name, dtype, "r", shape=shape)

        return (mapped("words.bin", np.uint32, (self.num_entries,)),
                mapped("codes.bin", np.uint8, (self.num_entries, self.code_bytes)),
                mapped("counts.bin", np.uint32, (self.num_images,)))

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> ForwardStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- inverted file ------------------------------------------------------------------------------
def _word_chunks(offsets: np.ndarray, chunk: int) -> Iterator[tuple[int, int]]:
    """Word ranges [w0, w1) of about ``chunk`` entries each (at least one word)."""
    w0, size = 0, len(offsets) - 1
    while w0 < size:
        w1 = max(w0 + 1, int(np.searchsorted(offsets, offsets[w0] + chunk, "right")) - 1)
        w1 = min(w1, size)
        yield w0, w1
        w0 = w1


def _list_deltas(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per list (consecutive runs of ``lengths``), its first id and the differences of the
    others (int64)."""
    ids = ids.astype(np.int64)
    deltas = np.diff(ids, prepend=0)
    starts = (np.cumsum(lengths) - lengths)[lengths > 0]
    deltas[starts] = ids[starts]
    return deltas


def build_inverted(forward: ForwardStore, out: Path, num_words: int, chunk: int = CHUNK_ENTRIES) -> None:
    """The inverted file of ``forward``'s committed images in the folder ``out`` (replaced
    atomically): a counting sort of the entries by word in chunks of ``chunk`` entries, then
    each list's image ids delta- and varint-coded."""
    words, codes, counts = forward.arrays()
    entries = len(words)
    per_word = np.zeros(num_words, np.int64)
    for s in range(0, entries, chunk):
        per_word += np.bincount(words[s:s + chunk], minlength=num_words)
    offsets = np.concatenate([[0], np.cumsum(per_word)]).astype(np.int64)
    image_start = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sorted_codes = np.lib.format.open_memmap(tmp / "codes.npy", "w+", np.uint8, (entries, forward.code_bytes))
    sorted_ids = (np.memmap(tmp / "ids.tmp", np.uint32, "w+", shape=(entries,)) if entries
                  else np.empty(0, np.uint32))
    cursor = offsets[:-1].copy()
    for s in range(0, entries, chunk):   # counting sort: entries stay in image order within a word
        w = words[s:s + chunk].astype(np.int64)
        order = np.argsort(w, kind="stable")
        ws = w[order]
        dest = cursor[ws] + np.arange(len(ws)) - np.searchsorted(ws, ws, "left")
        sorted_codes[dest] = codes[s:s + chunk][order]
        sorted_ids[dest] = (np.searchsorted(image_start, np.arange(s, s + len(w)), "right") - 1)[order]
        cursor += np.bincount(w, minlength=num_words)
    id_bytes = np.zeros(num_words, np.int64)
    for w0, w1 in _word_chunks(offsets, chunk):
        deltas = _list_deltas(sorted_ids[offsets[w0]:offsets[w1]], per_word[w0:w1])
        id_bytes[w0:w1] = np.bincount(np.repeat(np.arange(w1 - w0), per_word[w0:w1]), varint_sizes(deltas),
                                      minlength=w1 - w0)
    id_offsets = np.concatenate([[0], np.cumsum(id_bytes)]).astype(np.int64)
    ids = np.lib.format.open_memmap(tmp / "ids.npy", "w+", np.uint8, (int(id_offsets[-1]),))
    for w0, w1 in _word_chunks(offsets, chunk):
        deltas = _list_deltas(sorted_ids[offsets[w0]:offsets[w1]], per_word[w0:w1])
        ids[id_offsets[w0]:id_offsets[w1]] = encode_varints(deltas)
    for array in (sorted_codes, ids):
        array.flush()
    del sorted_codes, ids, sorted_ids
    (tmp / "ids.tmp").unlink(missing_ok=True)
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "id_offsets.npy", id_offsets)
    np.save(tmp / "counts.npy", np.asarray(counts, np.uint32))
    _write_json(tmp / "meta.json", {"format": INVERTED_FORMAT, "images": forward.num_images, "entries": entries,
                                    "code_bytes": forward.code_bytes, "identity": forward.identity})
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


class StoredIndex:
    """An inverted file on disk (:func:`build_inverted`), memory-mapped: a query reads the lists
    of its words only. Scores equal :class:`extract.retrieval.asmk.memory_index.AsmkIndex`'s on the same images."""

    def __init__(self, folder: Path, words: VisualWords, config: AsmkConfig | None = None,
                 identity: Mapping[str, Any] | None = None) -> None:
        """``identity``: when given, the index's must equal it (else AsmkIndexError)."""
        self.folder, self.words, self.config = Path(folder), words, config or AsmkConfig()
        self.dim = words.dim
        meta = _read_json(self.folder / "meta.json", INVERTED_FORMAT, self.folder.parent)
        if identity is not None:
            diffs = _differences(meta.get("identity", {}), identity)
            if diffs:
                raise AsmkIndexError(f"{self.folder / 'meta.json'}: index made from another codebook or other "
                                     "features (" + "; ".join(diffs) + f"): {fix_hint(self.folder.parent)}")
        self.num_images, self.num_entries = _counts(meta, ("images", "entries"), self.folder / "meta.json",
                                                    self.folder.parent)
        code_bytes = (self.dim + 7) // 8
        lists = (words.size + 1,)
        expected = {"codes.npy": (np.uint8, (self.num_entries, code_bytes)), "offsets.npy": (np.int64, lists),
                    "id_offsets.npy": (np.int64, lists), "counts.npy": (np.uint32, (self.num_images,)),
                    "ids.npy": (np.uint8, None)}
        arrays = {name: self._load(name, dtype, shape) for name, (dtype, shape) in expected.items()}
        self.codes, self.ids = arrays["codes.npy"], arrays["ids.npy"]
        # plain ndarray views of the maps, gathered with np.take (several times faster than a
        # memmap's or a 2-D array's fancy indexing); gathered codes are viewed as records whose
        # fields are code_columns' words
        self._code_rows, self._id_bytes = np.asarray(self.codes), np.asarray(self.ids)
        self._record = code_record(code_bytes)
        self.offsets, self.id_offsets = np.array(arrays["offsets.npy"]), np.array(arrays["id_offsets.npy"])
        counts = np.array(arrays["counts.npy"], np.int64)
        checks = {"offsets.npy": self.offsets[-1] == self.num_entries and (np.diff(self.offsets) >= 0).all(),
                  "id_offsets.npy": self.id_offsets[-1] == len(self.ids) and (np.diff(self.id_offsets) >= 0).all(),
                  "counts.npy": counts.sum() == self.num_entries}
        for name, ok in checks.items():
            if not ok:
                raise AsmkIndexError(f"{self.folder / name}: inconsistent with the index's other files; "
                                     f"{fix_hint(self.folder.parent)}")
        self.norm = image_norms(counts)
        self.kernel = similarity_kernel(self.dim, self.config)

    def _load(self, name: str, dtype: type, shape: tuple[int, ...] | None) -> np.ndarray:
        path = self.folder / name
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise AsmkIndexError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                 f"{fix_hint(self.folder.parent)}") from None
        if array.dtype != dtype or (shape is not None and array.shape != shape) or (shape is None and array.ndim != 1):
            raise AsmkIndexError(f"{path}: {array.dtype} {array.shape}, expected {np.dtype(dtype)} "
                                 f"{shape or '(n,)'}; {fix_hint(self.folder.parent)}")
        return array

    @property
    def nbytes(self) -> int:
        """The inverted file's size on disk (bytes)."""
        return sum(p.stat().st_size for p in self.folder.iterdir())

    def search(self, codes: np.ndarray, words: np.ndarray) -> np.ndarray:
        """ASMK* similarity (num database images,) float64 of an aggregated query (as
        :meth:`extract.retrieval.asmk.memory_index.AsmkIndex.search`)."""
        lo = self.offsets[words]
        lengths = self.offsets[words + 1] - lo
        entry = concat_ranges(lo, lengths)
        byte_lo = self.id_offsets[words]
        deltas = decode_varints(np.take(self._id_bytes, concat_ranges(byte_lo, self.id_offsets[words + 1] - byte_lo)))
        # each list's ids are the running sum of its deltas (its first delta is its first id): one
        # running sum over all lists, each list's first delta less the previous list's last id
        starts = (np.cumsum(lengths) - lengths)[lengths > 0]
        if len(starts) > 1:
            deltas[starts[1:]] -= np.add.reduceat(deltas, starts)[:-1]
        images = np.cumsum(deltas)
        records = np.take(self._code_rows, entry, axis=0).view(self._record)[:, 0]
        return kernel_scores(codes, lengths, [records[name] for name in records.dtype.names], images,
                             self.kernel, self.norm)

    def query(self, descriptors: np.ndarray) -> np.ndarray:
        """ASMK* similarity (num database images,) float64 of one query's (n, D) descriptors."""
        return self.search(*represent(self.words, descriptors, self.config.query_assignments, "query"))

    def scores(self, queries: Iterable[np.ndarray]) -> np.ndarray:
        """ASMK* similarities (num queries, num database images) float64."""
        rows = [self.query(q) for q in queries]
        return np.stack(rows) if rows else np.zeros((0, self.num_images))


# --- build and reuse ----------------------------------------------------------------------------
@dataclass
class BuildReport:
    """What a build (:class:`IndexBuild`, :func:`update_index`) did: images aggregated now,
    images found in the store."""

    added: int
    reused: int


class IndexBuild:
    """The index folder ``folder`` held by this process (its lock) with its forward store open
    (resumed from its last commit): images are aggregated and appended as they come, committed
    every ``commit_every``; :meth:`finish` makes the inverted file. A context manager. Refused
    (AsmkIndexError) when the index was made from another codebook, assignment or ``features``,
    or when another process holds ``folder``."""

    def __init__(self, folder: str | Path, words: VisualWords, config: AsmkConfig,
                 features: Mapping[str, Any] | None = None, commit_every: int = 1000) -> None:
        self.folder, self.words, self.config, self.commit_every = Path(folder), words, config, commit_every
        self.identity = index_identity(words, config, features or {})
        try:
            self._lock = OutputLock(self.folder, hint="choose another --load_expr")
        except OutputInUse as e:
            raise AsmkIndexError(str(e)) from None
        try:
            self.store = ForwardStore(self.folder / "forward", self.identity, (words.dim + 7) // 8)
        except BaseException:
            self._lock.release()
            raise
        self.stored = set(self.store.keys)
        self.reused, self.added = self.store.num_images, 0
        if len(self.stored) != len(self.store.keys):
            self.close()
            raise AsmkIndexError(f"{self.store.folder / 'keys.txt'}: an image key appears twice; "
                                 f"{fix_hint(self.folder)}")

    def check(self, keys: Sequence[str]) -> None:
        """Refuse an index holding images not in ``keys`` (the database now)."""
        wanted = set(keys)
        gone = [k for k in self.store.keys if k not in wanted]
        if gone:
            raise AsmkIndexError(f"{self.folder}: holds {len(gone)} images that the database does not have now "
                                 f"(e.g. {gone[0]!r}); {fix_hint(self.folder)}")

    def append(self, key: str, descriptors: np.ndarray) -> None:
        """Aggregate one image's (n, D) descriptors and append them under ``key`` (not stored yet)."""
        self.store.append(key, *represent(self.words, descriptors, self.config.db_assignments,
                                          f"database image {key!r}"))
        self.stored.add(key)
        self.added += 1
        if self.added % self.commit_every == 0:
            self.store.commit()

    def append_missing(self, keys: Sequence[str], descriptors: Callable[[Sequence[str]], Iterable[np.ndarray]]
                       ) -> None:
        """Append the images of ``keys`` not stored, in ``keys`` order (``descriptors(missing keys)``
        yields their (n, D) descriptors in that order; not called when none is missing), then commit."""
        missing = [k for k in keys if k not in self.stored]
        if missing:
            for key, d in zip(missing, descriptors(missing), strict=True):
                self.append(key, d)
        self.store.commit()

    def finish(self, keys: Sequence[str], chunk: int = CHUNK_ENTRIES) -> tuple[StoredIndex, list[str], BuildReport]:
        """The index of the database images ``keys`` (all appended by now): the inverted file (re)made when
        the forward store grew; returns it, its image order (image i of the scores is key i) and
        a report."""
        self.check(keys)
        self.store.commit()
        inverted = self.folder / "inverted"
        current = False
        if (inverted / "meta.json").exists():
            meta = _read_json(inverted / "meta.json", INVERTED_FORMAT, self.folder)
            current = meta.get("images") == self.store.num_images and meta.get("identity") == self.store.identity
        if not current:
            build_inverted(self.store, inverted, self.words.size, chunk)
        # mapped while no other build can move it
        index = StoredIndex(inverted, self.words, self.config, self.identity)
        return index, list(self.store.keys), BuildReport(self.added, self.reused)

    def close(self) -> None:
        """Close the forward store (uncommitted images are dropped by the next build) and release the lock."""
        try:
            self.store.close()
        finally:
            self._lock.release()

    def __enter__(self) -> IndexBuild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def update_index(folder: str | Path, words: VisualWords, config: AsmkConfig, keys: Sequence[str],
                 descriptors: Callable[[Sequence[str]], Iterable[np.ndarray]],
                 features: Mapping[str, Any] | None = None, commit_every: int = 1000,
                 chunk: int = CHUNK_ENTRIES) -> tuple[StoredIndex, list[str], BuildReport]:
    """The stored index of the database images ``keys`` in ``folder``: the images it lacks are
    aggregated (``descriptors(missing keys)`` yields their (n, D) descriptors in that order) and
    appended, committed every ``commit_every`` images; then the inverted file is (re)made when
    the forward store grew. Returns the index, its image order (the stored keys, then the new
    ones in ``keys`` order: image i of the scores is key i) and a report. Refused
    (AsmkIndexError) as :class:`IndexBuild`, and when the index holds images not in ``keys``."""
    with IndexBuild(folder, words, config, features, commit_every) as build:
        build.check(keys)
        build.append_missing(keys, descriptors)
        return build.finish(keys, chunk)
