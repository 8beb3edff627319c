"""The ASMK* index on disk: built once per (codebook, database features), reused by every
evaluation, grown when database images are added.

A folder (evaluate.py: repo/<expr>/asmk/index_<codebook>_<database>/) holds two stores of plain
arrays (never a pickle):

- ``forward/``: what aggregation produced, appended image by image in database order, so that a
  killed build resumes. ``words.bin`` uint32 (E,) and ``codes.bin`` uint8 (E, ceil(D / 8)): the
  (visual word, binary residual) entries of each image, words increasing within an image;
  ``counts.bin`` uint32 (N,): entries per image; ``keys.txt``: the images' keys, one a line, each
  stored once. ``manifest.json`` (replaced atomically after the data files are synced) records the
  committed image and entry counts, each file's committed size and crc32, and the index's identity;
  a rerun truncates the files to it. It is needed to grow the index, not to query it. Under
  torchrun each process appends the images it aggregates to a part of its own,
  ``forward/parts/<rank>-of-<size>/`` (the same files and manifest, resumable alike); process 0
  merges the parts into ``forward/`` in the database's order (as one process appends them), then
  deletes them: the forward store and the inverted file are a one-process build's, byte for byte.
  A killed run's parts are merged by the next run, whatever its process count.
- ``inverted/``: the inverted file made from the complete forward store (rebuilt when it grew;
  written to a temporary folder renamed into place). Per visual word, its entries sorted by
  image: ``codes.npy`` uint8 (E, B); ``offsets.npy`` int64 (K + 1,) each word's first entry;
  ``ids.npy`` uint8: each list's image ids as LEB128 varints of their differences (the first
  one as is; 7 bits a byte, low bits first, the top bit set on every byte but a value's last);
  ``id_offsets.npy`` int64 (K + 1,) each list's first byte; ``counts.npy`` uint32 (N,) words per
  image (the images' norms); ``keys.txt`` the images' keys (as forward/'s); ``block_crc.npy``
  uint32 (blocks, 2) the crc32 of each block's bytes in codes.npy and in ids.npy (a block: the
  consecutive words whose lists start in one window of ``crc_block_bytes`` bytes of the two files'
  lists together, :func:`crc_blocks`); ``meta.json``. Queries memory-map the big arrays and read
  only the lists of their words, in one compiled pass (extract/retrieval/asmk/scan.py).

Checksums: each json file carries the crc32 of its own contents (``json_crc32``); a manifest
records each data file's size and crc32 — of the whole file, except codes.npy and ids.npy, whose
header it covers while block_crc.npy covers their lists. Loading the inverted file checks its
small files and keys in full, the sizes and headers of the big ones and their structure (offsets
increasing and consistent); a query checks the block of each list it reads against block_crc.npy
the first time it reads one of its lists, and the decoded ids of every list it reads (strictly
increasing, below the image count, as many as the offsets say). :meth:`StoredIndex.verify` and
:meth:`ForwardStore.verify` check everything (a full read). The forward store's residuals and
words are checked when the inverted file is made from them. Any mismatch is an AsmkIndexError
naming the file, in one line.

The identity (the codebook's sha256, the aggregation parameters, the features' extraction
attributes) is compared on reuse; an index made otherwise is refused with the differences.
Concurrent builds of one folder are refused by a lock (train/outputs.py; under torchrun, process
0's).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from extract.config import AsmkConfig
from extract.errors import UserError
from extract.extraction.workshare import WorkShare
from extract.retrieval.asmk.codebook import DESCRIPTOR_ROUNDING, HNSW_STORAGE, VisualWords
from extract.retrieval.asmk.kernel import image_norms, represent, similarity_kernel
from extract.retrieval.asmk.scan import CODE_BITS, OK, PROBLEMS, scan_lists
from train.outputs import OutputInUse, OutputLock, OutputLockUnavailable, atomic_path, fsync_folder

log = logging.getLogger("delf")

FORWARD_FORMAT = "delf-pytorch asmk forward store 2"
INVERTED_FORMAT = "delf-pytorch asmk inverted file 2"
# forward/<PARTS>/<rank>-of-<size>/: the part of the forward store each torchrun process appends to
PARTS = "parts"
# entries handled at once when the inverted file is made (bounded memory at any database size)
CHUNK_ENTRIES = 1 << 22
# bytes read at once when a file's crc32 is computed
CRC_READ = 1 << 24
# the inverted file's lists are checked by blocks of about this many bytes (recorded in meta.json):
# a page, which reading a list maps in anyway
CRC_BLOCK_BYTES = 1 << 12


class AsmkIndexError(UserError):
    """A stored ASMK* index is unreadable, damaged, made otherwise, or in use; the message names
    the file and the reason in one line."""


def fix_hint(folder: Path, inverted: bool = False) -> str:
    """How to go on from a damaged index ``folder``; ``inverted``: the damage is in its inverted
    file, which the forward store can remake."""
    whole = f"delete {folder} to rebuild the index (or pass --overwrite, which also extracts the features again)"
    return f"delete {folder / 'inverted'} to remake it from the forward store, or {whole}" if inverted else whole


def damaged(path: Path, what: str, hint: str) -> AsmkIndexError:
    """The error of a file whose contents do not match its checksum or structure; ``hint``: how
    to go on (:func:`fix_hint`)."""
    return AsmkIndexError(f"{path}: damaged ({what}); {hint}")


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


# --- checksums and json manifests ---------------------------------------------------------------
def crc32_file(path: Path, start: int = 0, stop: int | None = None) -> int:
    """crc32 of the bytes [start, stop) of a file (to its end when ``stop`` is None), read in
    blocks."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = None if stop is None else stop - start
        while left is None or left > 0:
            block = f.read(CRC_READ if left is None else min(CRC_READ, left))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            if left is not None:
                left -= len(block)
    return crc


def _json_crc(data: Mapping[str, Any]) -> int:
    """crc32 of ``data``'s canonical JSON (sorted keys, no spaces)."""
    return zlib.crc32(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """``data`` and the crc32 of its contents (``json_crc32``), written atomically."""
    data = _json_value(dict(data))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**data, "json_crc32": _json_crc(data)}, indent=1) + "\n")


def _read_json(path: Path, fmt: str, hint: str) -> dict[str, Any]:
    """The contents of a json file of format ``fmt`` written by :func:`_write_json`, its crc32
    checked; AsmkIndexError naming it, ending with ``hint``, otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AsmkIndexError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             f"{hint}") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != fmt:
        family = fmt.rsplit(" ", 1)[0]
        if isinstance(found, str) and found.rsplit(" ", 1)[0] == family:
            raise AsmkIndexError(f"{path}: an index of another version of this code ({found!r}; this one reads "
                                 f"{fmt!r}); {hint}")
        raise AsmkIndexError(f"{path}: not a {fmt!r} file; {hint}")
    stored = data.pop("json_crc32", None)
    if stored != _json_crc(data):
        raise damaged(path, "its contents do not match their crc32", hint)
    return data


def _counts(data: Mapping[str, Any], keys: Sequence[str], path: Path, hint: str) -> tuple[int, ...]:
    """The non-negative integers ``data[k]`` of ``keys``; AsmkIndexError naming ``path`` when one
    is missing or not such a number."""
    values = tuple(data.get(k) for k in keys)
    if not all(isinstance(v, int) and v >= 0 for v in values):
        raise AsmkIndexError(f"{path}: lacks the counts {', '.join(keys)}; {hint}")
    return values


def _file_records(data: Mapping[str, Any], names: Sequence[str], path: Path, hint: str
                  ) -> dict[str, tuple[int, int]]:
    """(bytes, crc32) of each file of ``names`` that the manifest ``data`` (file ``path``) records."""
    files = data.get("files")
    records = {}
    for name in names:
        record = files.get(name) if isinstance(files, dict) else None
        values = tuple(record.get(k) for k in ("bytes", "crc32")) if isinstance(record, dict) else ()
        if len(values) != 2 or not all(isinstance(v, int) and v >= 0 for v in values):
            raise AsmkIndexError(f"{path}: lacks the size and crc32 of {name}; {hint}")
        records[name] = values
    return records


def _check_crc(path: Path, crc: int, expected: int, manifest: Path, hint: str, part: str = "its crc32") -> None:
    """AsmkIndexError (:func:`damaged`) when ``crc`` (of ``path``'s bytes) is not the ``expected``
    one that ``manifest`` records."""
    if crc != expected:
        raise damaged(path, f"{part} is {crc:08x}, {manifest.name} records {expected:08x}", hint)


def _parse_keys(data: bytes, path: Path, count: int, hint: str) -> list[str]:
    """The image keys of a keys.txt's bytes (one a line), ``count`` of them, each once."""
    try:
        keys = data.decode().split("\n")[:-1]
    except UnicodeDecodeError as e:
        raise AsmkIndexError(f"{path}: not UTF-8 text ({e.reason}); {hint}") from None
    if len(keys) != count:
        raise AsmkIndexError(f"{path}: {len(keys)} keys, its manifest records {count} images; {hint}")
    if len(set(keys)) != len(keys):
        raise AsmkIndexError(f"{path}: an image key appears twice; {hint}")
    return keys


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


# --- forward store -------------------------------------------------------------------------------
class ForwardStore:
    """The aggregated database images in order (layout: the module's doc), appended and committed;
    a context manager. An existing store is resumed from its last commit when its identity equals
    ``identity``, else refused; its manifest, keys and counts are checked (crc32) on opening, its
    words and residuals when read (:func:`build_inverted`, :meth:`verify`). A key is stored once:
    appending a stored key is refused. ``index``: the index folder it belongs to (default: its
    parent; a part's is two levels up), named in messages; ``hint``: how to go on from damage
    (default :func:`fix_hint` of ``index``)."""

    FILES = ("words.bin", "codes.bin", "counts.bin", "keys.txt")

    def __init__(self, folder: Path, identity: Mapping[str, Any], code_bytes: int, index: Path | None = None,
                 hint: str | None = None) -> None:
        self.folder, self.code_bytes = Path(folder), code_bytes
        self.index = Path(index) if index is not None else self.folder.parent
        self.hint = hint = hint or fix_hint(self.index)
        self.manifest = self.folder / "manifest.json"
        self.identity = _json_value(dict(identity))
        new = not self.manifest.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        if new:
            self.num_images = self.num_entries = 0
            records = {name: (0, 0) for name in self.FILES}
        else:
            state = _read_json(self.manifest, FORWARD_FORMAT, hint)
            diffs = _differences(state.get("identity", {}), self.identity)
            if diffs:
                raise AsmkIndexError(f"{self.manifest}: index made from another codebook or other features ("
                                     + "; ".join(diffs) + f"): {hint}")
            self.num_images, self.num_entries = _counts(state, ("images", "entries"), self.manifest, hint)
            records = _file_records(state, self.FILES, self.manifest, hint)
        sizes = {"words.bin": 4 * self.num_entries, "codes.bin": code_bytes * self.num_entries,
                 "counts.bin": 4 * self.num_images}
        for name, size in sizes.items():
            if records[name][0] != size:
                raise AsmkIndexError(f"{self.manifest}: records {records[name][0]} bytes of {name}, its counts "
                                     f"{size}; {hint}")
        for name, (size, _) in records.items():
            path = self.folder / name
            if path.exists() and path.stat().st_size < size or not path.exists() and size:
                raise AsmkIndexError(f"{path}: shorter than {self.manifest} records ({size} bytes); {hint}")
        for name, (size, _) in records.items():
            with open(self.folder / name, "ab") as f:   # drop what the last commit did not cover
                f.truncate(size)
        self.sizes = {name: size for name, (size, _) in records.items()}
        self.crcs = {name: crc for name, (_, crc) in records.items()}
        keys = (self.folder / "keys.txt").read_bytes()
        for name, crc in (("keys.txt", zlib.crc32(keys)), ("counts.bin", crc32_file(self.folder / "counts.bin"))):
            _check_crc(self.folder / name, crc, self.crcs[name], self.manifest, hint)
        self.keys = _parse_keys(keys, self.folder / "keys.txt", self.num_images, hint)
        self.key_set = set(self.keys)
        self._files = {name: open(self.folder / name, "ab") for name in self.FILES}  # noqa: SIM115
        if new:
            self.commit()
            fsync_folder(self.folder.parent)

    def append(self, key: str, codes: np.ndarray, words: np.ndarray) -> None:
        """Add one image (``codes`` (W, B) uint8, ``words`` (W,) increasing) under ``key``, not
        stored yet (else AsmkIndexError naming it); kept by the next :meth:`commit`."""
        if "\n" in key:
            raise AsmkIndexError(f"{key!r}: an image key with a line break cannot be stored")
        if key in self.key_set:
            raise AsmkIndexError(f"{key!r}: already in the index {self.index} (an image is stored once)")
        codes = np.ascontiguousarray(codes, np.uint8)
        if codes.shape != (len(words), self.code_bytes):
            raise ValueError(f"{key!r}: codes {codes.shape} for {len(words)} words of {self.code_bytes} bytes")
        data = {"words.bin": np.asarray(words, np.uint32).tobytes(), "codes.bin": codes.tobytes(),
                "counts.bin": np.uint32(len(words)).tobytes(), "keys.txt": (key + "\n").encode()}
        for name, chunk in data.items():
            self._files[name].write(chunk)
            self.crcs[name] = zlib.crc32(chunk, self.crcs[name])
            self.sizes[name] += len(chunk)
        self.keys.append(key)
        self.key_set.add(key)
        self.num_images += 1
        self.num_entries += len(words)

    def commit(self) -> None:
        """Sync the data files, then record their committed sizes and crc32s (atomically)."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        _write_json(self.manifest, {"format": FORWARD_FORMAT, "images": self.num_images,
                                    "entries": self.num_entries, "code_bytes": self.code_bytes,
                                    "identity": self.identity,
                                    "files": {name: {"bytes": self.sizes[name], "crc32": self.crcs[name]}
                                              for name in self.FILES}})

    def verify(self) -> None:
        """Check every file against its crc32 (reads the whole store); AsmkIndexError naming the
        first damaged one."""
        for f in self._files.values():
            f.flush()
        for name in self.FILES:
            crc = crc32_file(self.folder / name, 0, self.sizes[name])
            _check_crc(self.folder / name, crc, self.crcs[name], self.manifest, self.hint)

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
# the inverted file's arrays: dtype, and shape from (images, entries, code bytes, words) (-1: any length)
INVERTED_ARRAYS: dict[str, tuple[type, Callable[[int, int, int, int], tuple[int, ...]]]] = {
    "codes.npy": (np.uint8, lambda n, e, b, k: (e, b)), "ids.npy": (np.uint8, lambda n, e, b, k: (-1,)),
    "offsets.npy": (np.int64, lambda n, e, b, k: (k + 1,)), "id_offsets.npy": (np.int64, lambda n, e, b, k: (k + 1,)),
    "counts.npy": (np.uint32, lambda n, e, b, k: (n,)), "block_crc.npy": (np.uint32, lambda n, e, b, k: (-1, 2))}
LISTS = ("codes.npy", "ids.npy")   # covered by block_crc.npy; the manifest's crc32 is their header's
INVERTED_FILES = (*INVERTED_ARRAYS, "keys.txt")


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


def _flat_bytes(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array (a memory map included), without a copy."""
    return memoryview(np.asarray(array).reshape(-1)).cast("B")


def crc_blocks(offsets: np.ndarray, id_offsets: np.ndarray, code_bytes: int, block_bytes: int) -> np.ndarray:
    """The first word of each crc32 block, then the number of words ((blocks + 1,) int64): a block
    is the consecutive words whose lists start in one window of ``block_bytes`` bytes of the
    lists' bytes in codes.npy and ids.npy together (a long list: a block of its own)."""
    window = (offsets[:-1] * code_bytes + id_offsets[:-1]) // block_bytes
    return np.concatenate([[0], np.flatnonzero(np.diff(window)) + 1, [len(offsets) - 1]]).astype(np.int64)


def block_crcs(codes: np.ndarray, ids: np.ndarray, offsets: np.ndarray, id_offsets: np.ndarray,
               first_words: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """(crc32 of the block's residuals in ``codes``, crc32 of its bytes in ``ids``) (len(blocks),
    2) uint32 of the blocks ``blocks`` of :func:`crc_blocks` ``first_words``."""
    code_bytes, id_bytes = _flat_bytes(codes), _flat_bytes(ids)
    b = codes.shape[1]
    first, end = first_words[blocks], first_words[blocks + 1]
    code_lo, code_hi = (offsets[first] * b).tolist(), (offsets[end] * b).tolist()
    id_lo, id_hi = id_offsets[first].tolist(), id_offsets[end].tolist()
    crcs = [(zlib.crc32(code_bytes[p:q]), zlib.crc32(id_bytes[r:t]))
            for p, q, r, t in zip(code_lo, code_hi, id_lo, id_hi, strict=True)]
    return np.array(crcs, np.uint32).reshape(len(crcs), 2)


def build_inverted(forward: ForwardStore, out: Path, num_words: int, chunk: int = CHUNK_ENTRIES) -> None:
    """The inverted file of ``forward``'s committed images in the folder ``out`` (replaced
    atomically, then its folder synced): a counting sort of the entries by word in chunks of
    ``chunk`` entries, then each list's image ids delta- and varint-coded; each block's crc32s
    (:func:`crc_blocks`), then each file's size and crc32 in meta.json. The forward store's words and residuals are
    checked against their crc32 as they are read: on a mismatch, AsmkIndexError naming the file
    and ``out`` left as it was."""
    words, codes, counts = forward.arrays()
    entries, hint = len(words), fix_hint(out.parent)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    per_word, crc = np.zeros(num_words, np.int64), 0
    for s in range(0, entries, chunk):
        block = words[s:s + chunk]
        crc = zlib.crc32(block, crc)
        found = np.bincount(block, minlength=num_words)
        if len(found) > num_words:
            raise damaged(forward.folder / "words.bin", f"a word beyond the codebook's {num_words}", hint)
        per_word += found
    _check_crc(forward.folder / "words.bin", crc, forward.crcs["words.bin"], forward.manifest, hint)
    if int(np.sum(counts, dtype=np.int64)) != entries:
        raise damaged(forward.folder / "counts.bin", f"its counts do not sum to the {entries} entries", hint)
    offsets = np.concatenate([[0], np.cumsum(per_word)]).astype(np.int64)
    image_start = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    tmp.mkdir(parents=True)
    try:
        sorted_codes = np.lib.format.open_memmap(tmp / "codes.npy", "w+", np.uint8, (entries, forward.code_bytes))
        sorted_ids = (np.memmap(tmp / "ids.tmp", np.uint32, "w+", shape=(entries,)) if entries
                      else np.empty(0, np.uint32))
        cursor, crc = offsets[:-1].copy(), 0
        for s in range(0, entries, chunk):   # counting sort: entries stay in image order within a word
            w = words[s:s + chunk].astype(np.int64)
            block = codes[s:s + chunk]
            crc = zlib.crc32(_flat_bytes(block), crc)
            order = np.argsort(w, kind="stable")
            ws = w[order]
            dest = cursor[ws] + np.arange(len(ws)) - np.searchsorted(ws, ws, "left")
            sorted_codes[dest] = block[order]
            sorted_ids[dest] = (np.searchsorted(image_start, np.arange(s, s + len(w)), "right") - 1)[order]
            cursor += np.bincount(w, minlength=num_words)
        _check_crc(forward.folder / "codes.bin", crc, forward.crcs["codes.bin"], forward.manifest, hint)
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
        first_words = crc_blocks(offsets, id_offsets, forward.code_bytes, CRC_BLOCK_BYTES)
        block_crc = block_crcs(sorted_codes, ids, offsets, id_offsets, first_words, np.arange(len(first_words) - 1))
        data_bytes = {"codes.npy": sorted_codes.nbytes, "ids.npy": ids.nbytes}
        del sorted_codes, ids, sorted_ids
        (tmp / "ids.tmp").unlink(missing_ok=True)
        for name, array in (("offsets.npy", offsets), ("id_offsets.npy", id_offsets),
                            ("counts.npy", np.asarray(counts, np.uint32)), ("block_crc.npy", block_crc)):
            np.save(tmp / name, array)
        (tmp / "keys.txt").write_bytes("".join(key + "\n" for key in forward.keys).encode())
        files = {}
        for name in INVERTED_FILES:
            path = tmp / name
            size = path.stat().st_size
            files[name] = {"bytes": size, "crc32": crc32_file(path, 0, size - data_bytes.get(name, 0))}
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _write_json(tmp / "meta.json", {"format": INVERTED_FORMAT, "images": forward.num_images, "entries": entries,
                                        "code_bytes": forward.code_bytes, "crc_block_bytes": CRC_BLOCK_BYTES,
                                        "identity": forward.identity, "files": files})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    fsync_folder(out.parent)
    shutil.rmtree(old, ignore_errors=True)


class StoredIndex:
    """An inverted file on disk (:func:`build_inverted`), memory-mapped: a query reads the lists
    of its words only. Scores equal :class:`extract.retrieval.asmk.memory_index.AsmkIndex`'s on
    the same images. Checked on loading (its small files and keys in full, the big ones' sizes
    and headers, the offsets' structure), each list's block against its crc32s the first time a
    query reads it, and the ids of every list read; :meth:`verify` checks every byte. Damage is an
    AsmkIndexError naming the file, never other scores."""

    def __init__(self, folder: Path, words: VisualWords, config: AsmkConfig | None = None,
                 identity: Mapping[str, Any] | None = None) -> None:
        """``identity``: when given, the index's must equal it (else AsmkIndexError)."""
        self.folder, self.words, self.config = Path(folder), words, config or AsmkConfig()
        self.dim = words.dim
        self.meta = self.folder / "meta.json"
        meta = _read_json(self.meta, INVERTED_FORMAT, self._hint)
        if identity is not None:
            diffs = _differences(meta.get("identity", {}), identity)
            if diffs:
                raise AsmkIndexError(f"{self.meta}: index made from another codebook or other "
                                     "features (" + "; ".join(diffs) + f"): {fix_hint(self.folder.parent)}")
        self.num_images, self.num_entries, block_bytes = _counts(meta, ("images", "entries", "crc_block_bytes"),
                                                                 self.meta, self._hint)
        self._files = _file_records(meta, INVERTED_FILES, self.meta, self._hint)
        code_bytes = (self.dim + 7) // 8
        self._expected = {name: (dtype, shape and shape(self.num_images, self.num_entries, code_bytes, words.size))
                          for name, (dtype, shape) in INVERTED_ARRAYS.items()}
        arrays = {name: self._load(name, *expected) for name, expected in self._expected.items()}
        self.codes, self.ids = arrays["codes.npy"], arrays["ids.npy"]
        # plain ndarray views of the maps (what the compiled scan takes)
        self._code_rows, self._id_bytes = np.asarray(self.codes), np.asarray(self.ids)
        self.offsets, self.id_offsets = arrays["offsets.npy"], arrays["id_offsets.npy"]
        self._block_crc = arrays["block_crc.npy"]
        counts = arrays["counts.npy"].astype(np.int64)
        self._check_structure(counts)
        self._first_words = crc_blocks(self.offsets, self.id_offsets, code_bytes, max(block_bytes, 1))
        if len(self._block_crc) != len(self._first_words) - 1:
            raise damaged(self.folder / "block_crc.npy", f"{len(self._block_crc)} blocks, the offsets make "
                          f"{len(self._first_words) - 1}", self._hint)
        self._block_of_word = np.repeat(np.arange(len(self._block_crc)), np.diff(self._first_words))
        self._checked = np.zeros(len(self._block_crc), bool)   # blocks whose crc32s a query checked
        self._keys_bytes()
        self.norm = image_norms(counts)
        self.kernel = similarity_kernel(self.dim, self.config)

    @property
    def _hint(self) -> str:
        return fix_hint(self.folder.parent, inverted=True)

    def _load(self, name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
        """The array ``name``, its size and crc32 checked against meta.json: a small one read (and
        checked) in full, a list file (codes.npy, ids.npy) memory-mapped, its header checked."""
        path = self.folder / name
        size, crc = self._files[name]
        try:
            found = path.stat().st_size
            if found != size:
                raise damaged(path, f"{found} bytes, {self.meta.name} records {size}", self._hint)
            if name in LISTS:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                _check_crc(path, crc32_file(path, 0, array.offset), crc, self.meta, self._hint, "its header's crc32")
            else:
                data = path.read_bytes()
                _check_crc(path, zlib.crc32(data), crc, self.meta, self._hint)
                array = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as e:
            if isinstance(e, AsmkIndexError):
                raise
            raise AsmkIndexError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                 f"{self._hint}") from None
        if array.dtype != dtype or len(array.shape) != len(shape) or any(
                n not in (found, -1) for found, n in zip(array.shape, shape, strict=True)):
            expected = str(shape).replace("-1", "n")
            raise AsmkIndexError(f"{path}: {array.dtype} {array.shape}, expected {np.dtype(dtype)} {expected}; "
                                 f"{self._hint}")
        return array

    def _check_structure(self, counts: np.ndarray) -> None:
        """The offsets increase from 0 to the entry and byte counts, each list's bytes can hold
        its ids, the images' word counts sum to the entries."""
        entries, id_bytes = np.diff(self.offsets), np.diff(self.id_offsets)
        most = int(varint_sizes(np.array([max(self.num_images - 1, 0)]))[0])   # bytes of the largest id
        checks = {"offsets.npy": self.offsets[0] == 0 and self.offsets[-1] == self.num_entries and (entries >= 0).all(),
                  "id_offsets.npy": (self.id_offsets[0] == 0 and self.id_offsets[-1] == len(self.ids)
                                     and (id_bytes >= entries).all() and (id_bytes <= most * entries).all()),
                  "counts.npy": counts.sum() == self.num_entries and (counts <= self.words.size).all()}
        for name, ok in checks.items():
            if not ok:
                raise damaged(self.folder / name, "inconsistent with the index's other files", self._hint)

    @property
    def nbytes(self) -> int:
        """The inverted file's size on disk (bytes)."""
        return sum(p.stat().st_size for p in self.folder.iterdir())

    def _keys_bytes(self) -> bytes:
        """keys.txt's bytes, checked against their crc32."""
        path = self.folder / "keys.txt"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise AsmkIndexError(f"{path}: unreadable ({e.strerror or e}); {self._hint}") from None
        _check_crc(path, zlib.crc32(data), self._files["keys.txt"][1], self.meta, self._hint)
        return data

    def keys(self) -> list[str]:
        """The images' keys (image i of the scores is key i), checked against their crc32."""
        return _parse_keys(self._keys_bytes(), self.folder / "keys.txt", self.num_images, self._hint)

    def _check_lists(self, words: np.ndarray) -> None:
        """Check the blocks of the lists of ``words`` not checked yet against block_crc.npy."""
        blocks = np.unique(self._block_of_word[words])
        todo = blocks[~self._checked[blocks]]
        if not len(todo):
            return
        crcs = block_crcs(self._code_rows, self._id_bytes, self.offsets, self.id_offsets, self._first_words, todo)
        bad = np.flatnonzero((crcs != self._block_crc[todo]).any(axis=1))
        if len(bad):
            block = int(todo[bad[0]])
            name = "codes.npy" if crcs[bad[0], 0] != self._block_crc[block, 0] else "ids.npy"
            first, end = int(self._first_words[block]), int(self._first_words[block + 1])
            raise damaged(self.folder / name, f"the lists of visual words {first}..{end - 1} do not match their "
                          "crc32 in block_crc.npy", self._hint)
        self._checked[todo] = True

    def search(self, codes: np.ndarray, words: np.ndarray) -> np.ndarray:
        """ASMK* similarity (num database images,) float64 of an aggregated query (as
        :meth:`extract.retrieval.asmk.memory_index.AsmkIndex.search`): the lists of ``words`` (W,)
        scanned in one compiled pass (:func:`~extract.retrieval.asmk.scan.scan_lists`), their
        structure checked; AsmkIndexError naming the file and the list when it is damaged."""
        words = np.asarray(words, np.int64)
        scores = np.zeros(self.num_images)
        if not len(words):
            return scores
        self._check_lists(words)
        problem, word = scan_lists(self._id_bytes, self.id_offsets, self._code_rows, self.offsets, words,
                                   np.ascontiguousarray(codes, np.uint8), self.kernel, self.dim, scores)
        if problem != OK:
            name = "codes.npy" if problem == CODE_BITS else "ids.npy"
            raise damaged(self.folder / name, PROBLEMS[problem].format(images=self.num_images, dim=self.dim)
                          + f", in the list of visual word {word}", self._hint)
        return scores / self.norm / np.sqrt(len(words))

    def query(self, descriptors: np.ndarray) -> np.ndarray:
        """ASMK* similarity (num database images,) float64 of one query's (n, D) descriptors."""
        return self.search(*represent(self.words, descriptors, self.config.query_assignments, "query"))

    def scores(self, queries: Iterable[np.ndarray]) -> np.ndarray:
        """ASMK* similarities (num queries, num database images) float64."""
        rows = [self.query(q) for q in queries]
        return np.stack(rows) if rows else np.zeros((0, self.num_images))

    def verify(self) -> None:
        """Check every byte of the inverted file against its checksums (reads all of it: its cost
        is in docs/benchmarks.md); AsmkIndexError naming the first damaged file."""
        for name, expected in self._expected.items():
            self._load(name, *expected)
        self._checked[:] = False
        self._check_lists(np.arange(self.words.size))
        self.keys()


# --- build and reuse ----------------------------------------------------------------------------
@dataclass
class BuildReport:
    """What a build (:class:`IndexBuild`, :func:`update_index`) did: images aggregated now,
    images found in the index, and images appended again though stored (kept as stored)."""

    added: int
    reused: int
    repeated: int = 0


class IndexBuild:
    """The index folder ``folder`` held by this run (its lock, held by process 0) with its forward
    store open (resumed from its last commit): images are aggregated and appended as they come,
    committed every ``commit_every``; :meth:`finish` makes the inverted file. A context manager.
    Refused (AsmkIndexError) when the index was made from another codebook, assignment or
    ``features``, or when another run holds ``folder``.

    Under torchrun (``share``: every process of the run makes one, with the same arguments), each
    process appends the images it aggregates to its own part of the forward store
    (:func:`part_folder`, a forward store of its own, resumable), and :meth:`finish` has process 0
    merge the parts into the forward store in the database's order, delete them and make the
    inverted file: the same bytes as one process's build. The parts of a killed run are kept
    whatever the process count of the next run (which merges them in the same order); a single
    process appends to a part of its own (0-of-1) while parts are pending, to the forward store
    otherwise.

    An image is stored once: appending a stored key does nothing (the image keeps its stored
    entries, e.g. when its feature file was deleted and its features extracted again). Without
    its forward store (forward/ deleted) the index serves queries from its inverted file as it
    is, and refuses new images: growing needs the forward store, and making it again means
    aggregating every image again (delete the folder)."""

    def __init__(self, folder: str | Path, words: VisualWords, config: AsmkConfig,
                 features: Mapping[str, Any] | None = None, commit_every: int = 1000,
                 share: WorkShare | None = None) -> None:
        self.folder, self.words, self.config, self.commit_every = Path(folder), words, config, commit_every
        self.share = share or WorkShare()
        self.identity = index_identity(words, config, features or {})
        self.code_bytes = (words.dim + 7) // 8
        self._lock: OutputLock | None = None
        self.main: ForwardStore | None = None    # the forward store (process 0)
        self.store: ForwardStore | None = None   # what this process appends to: the forward store or its part
        self.index: StoredIndex | None = None
        try:
            self.stored_keys, growable, pending = self.share.from_main(self._open)
            if not growable:
                if self.index is None:   # process 0 has it mapped already
                    self.index = StoredIndex(self.folder / "inverted", words, config, self.identity)
            elif self.share.distributed or pending:
                part = part_folder(self.folder, self.share.rank, self.share.size)
                self.store = ForwardStore(part, self.identity, self.code_bytes, self.folder, part_hint(part))
            else:
                self.store = self.main
        except BaseException:
            self.close()
            raise
        self.stored = set(self.stored_keys)
        self.reused, self.added, self.repeated = len(self.stored_keys), 0, 0
        self._appended: list[str] = []   # by this process since the last sync()

    def _open(self) -> tuple[list[str], bool, bool]:
        """(the stored keys: the forward store's, then its parts', whether the index can grow,
        whether parts are pending) after locking the folder and opening the forward store (process 0)."""
        try:
            self._lock = OutputLock(self.folder, hint="choose another --load_expr")
        except (OutputInUse, OutputLockUnavailable) as e:
            raise AsmkIndexError(str(e)) from None
        forward, inverted = self.folder / "forward", self.folder / "inverted"
        shutil.rmtree(forward / f".{PARTS}.old", ignore_errors=True)   # the parts of a merge killed while deleted
        if (inverted / "meta.json").exists() and not (forward / "manifest.json").exists():
            self.index = StoredIndex(inverted, self.words, self.config, self.identity)
            log.info("ASMK* index %s: no forward store (forward/ deleted): the inverted file of %d images serves "
                     "the queries; adding images needs the forward store (delete the folder to rebuild it, "
                     "aggregating every image again)", self.folder, self.index.num_images)
            return self.index.keys(), False, False
        self.main = ForwardStore(forward, self.identity, self.code_bytes)
        parts = self._parts()
        try:
            in_parts = [k for k in _locate(parts) if k not in self.main.key_set]
        finally:
            for part in parts:
                part.close()
        return [*self.main.keys, *in_parts], True, bool(parts)

    def _parts(self) -> list[ForwardStore]:
        """The forward store's parts (of any process count), opened: identity and manifest
        checked, resumed from their last commit."""
        root = self.folder / "forward" / PARTS
        folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        return [ForwardStore(p, self.identity, self.code_bytes, self.folder, part_hint(p)) for p in folders]

    def check(self, keys: Sequence[str]) -> None:
        """Refuse an index holding images not in ``keys`` (the database now)."""
        wanted = set(keys)
        gone = [k for k in self.stored_keys if k not in wanted]
        if gone:
            raise AsmkIndexError(f"{self.folder}: holds {len(gone)} images that the database does not have now "
                                 f"(e.g. {gone[0]!r}); {fix_hint(self.folder)}")

    def _cannot_grow(self, new: Sequence[str]) -> AsmkIndexError:
        return AsmkIndexError(
            f"{self.folder / 'forward'}: deleted, so the index cannot take {len(new)} new images (e.g. {new[0]!r}); "
            f"its inverted file serves the {len(self.stored_keys)} images it holds; to add images, "
            f"{fix_hint(self.folder)}, which aggregates every image again")

    def append(self, key: str, descriptors: np.ndarray) -> None:
        """Aggregate one image's (n, D) descriptors and append them under ``key`` (to this
        process's store); nothing when ``key`` is stored (counted in :attr:`repeated`)."""
        if key in self.stored:
            self.repeated += 1
            return
        if self.store is None:
            raise self._cannot_grow([key])
        self.store.append(key, *represent(self.words, descriptors, self.config.db_assignments,
                                          f"database image {key!r}"))
        self.stored.add(key)
        self._appended.append(key)
        self.added += 1
        if self.added % self.commit_every == 0:
            self.store.commit()

    def sync(self) -> None:
        """Learn the images the other processes appended since the last sync (a collective:
        every process calls it), e.g. before :meth:`append_share` after appending images each
        process chose itself."""
        for keys in self.share.gather(self._appended):
            self.stored.update(keys)
        self._appended = []

    def append_missing(self, keys: Sequence[str], descriptors: Callable[[Sequence[str]], Iterable[np.ndarray]]
                       ) -> None:
        """Append the images of ``keys`` not stored, each once, in ``keys`` order, in this process
        (``descriptors(missing keys)`` yields their (n, D) descriptors in that order; not called
        when none is missing), then commit."""
        missing = list(dict.fromkeys(k for k in keys if k not in self.stored))
        if missing:
            if self.store is None:
                raise self._cannot_grow(missing)
            for key, d in zip(missing, descriptors(missing), strict=True):
                self.append(key, d)
        if self.store is not None:
            self.store.commit()

    def append_share(self, keys: Sequence[str], descriptors: Callable[[Sequence[str]], Iterable[np.ndarray]]
                     ) -> None:
        """As :meth:`append_missing`, each process appending its share (every size-th, from its
        rank on) of the images of ``keys`` not stored; every process calls it with the same keys."""
        missing = list(dict.fromkeys(k for k in keys if k not in self.stored))
        if missing and self.store is None:   # on every process alike
            raise self._cannot_grow(missing)
        self.append_missing(self.share.share(missing), descriptors)

    def finish(self, keys: Sequence[str], chunk: int = CHUNK_ENTRIES) -> tuple[StoredIndex, list[str], BuildReport]:
        """The index of the database images ``keys`` (all appended by now, by some process):
        process 0 merges the parts, if any, and (re)makes the inverted file when the forward store
        grew; every process calls it and gets the index, its image order (image i of the scores is
        key i) and the run's report."""
        if self.store is not None:
            self.store.commit()
        counts = self.share.gather((self.added, self.repeated))   # every part committed
        report = BuildReport(sum(a for a, _ in counts), self.reused, sum(r for _, r in counts))
        order = self.share.from_main(lambda: self._complete(keys, chunk))
        if self.index is None:   # processes other than 0: mapped while process 0 holds the folder
            self.index = StoredIndex(self.folder / "inverted", self.words, self.config, self.identity)
        return self.index, order, report

    def _complete(self, keys: Sequence[str], chunk: int) -> list[str]:
        """The index's image order once the parts are merged and the inverted file is made from the
        complete forward store (process 0)."""
        self.check(keys)
        if self.main is None:
            assert self.index is not None
            return list(self.stored_keys)
        self._merge(keys)
        absent = [k for k in keys if k not in self.main.key_set]
        if absent:
            raise ValueError(f"{absent[0]!r}: not appended before finish()")
        inverted = self.folder / "inverted"
        current = False
        if (inverted / "meta.json").exists():
            meta = _read_json(inverted / "meta.json", INVERTED_FORMAT, fix_hint(self.folder, inverted=True))
            current = meta.get("images") == self.main.num_images and meta.get("identity") == self.main.identity
        if not current:
            build_inverted(self.main, inverted, self.words.size, chunk)
        # mapped while no other build can move it
        self.index = StoredIndex(inverted, self.words, self.config, self.identity)
        return list(self.main.keys)

    def _merge(self, keys: Sequence[str]) -> None:
        """Append the parts' images that the forward store lacks to it (their bytes checked
        first): those of ``keys`` in ``keys`` order (as one process appends them), then any other
        in part order; commit, then delete the parts (renamed away first: a kill leaves them whole or
        gone)."""
        assert self.main is not None
        root = self.folder / "forward" / PARTS
        if not root.exists():
            return
        parts = self._parts()
        try:
            where = _locate(parts)
            for part in parts:
                part.verify()
            arrays = [part.arrays() for part in parts]
            starts = [np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]) for _, _, counts in arrays]
            merged = 0
            for key in [*dict.fromkeys(k for k in keys if k in where), *where]:
                if key in self.main.key_set:
                    continue
                p, i = where[key]
                words, codes, _ = arrays[p]
                s, e = starts[p][i], starts[p][i + 1]
                self.main.append(key, codes[s:e], words[s:e])
                merged += 1
                if merged % self.commit_every == 0:
                    self.main.commit()
            self.main.commit()
        finally:
            for part in parts:
                part.close()
        gone = root.with_name(f".{PARTS}.old")
        root.rename(gone)
        fsync_folder(root.parent)
        shutil.rmtree(gone)

    def close(self) -> None:
        """Close the forward store and this process's part (uncommitted images are dropped by the
        next build) and release the lock."""
        try:
            for store in {id(s): s for s in (self.store, self.main) if s is not None}.values():
                store.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> IndexBuild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def part_folder(folder: str | Path, rank: int, size: int) -> Path:
    """The part of the forward store that process ``rank`` of ``size`` appends to:
    <folder>/forward/parts/<rank>-of-<size>/."""
    return Path(folder) / "forward" / PARTS / f"{rank}-of-{size}"


def part_hint(part: Path) -> str:
    """How to go on from a damaged part: its images are aggregated again without it."""
    return f"delete {part} to aggregate its images again"


def _locate(parts: Sequence[ForwardStore]) -> dict[str, tuple[int, int]]:
    """Each key of the ``parts``: (its part, its place there); AsmkIndexError naming both parts'
    keys.txt when one is in two."""
    where: dict[str, tuple[int, int]] = {}
    for p, part in enumerate(parts):
        for i, key in enumerate(part.keys):
            if key in where:
                other = parts[where[key][0]].folder
                raise AsmkIndexError(f"{part.folder / 'keys.txt'}: image {key!r} is also in {other / 'keys.txt'} "
                                     f"(an image is stored once); {part_hint(part.folder)}")
            where[key] = (p, i)
    return where


def update_index(folder: str | Path, words: VisualWords, config: AsmkConfig, keys: Sequence[str],
                 descriptors: Callable[[Sequence[str]], Iterable[np.ndarray]],
                 features: Mapping[str, Any] | None = None, commit_every: int = 1000,
                 chunk: int = CHUNK_ENTRIES, share: WorkShare | None = None
                 ) -> tuple[StoredIndex, list[str], BuildReport]:
    """The stored index of the database images ``keys`` in ``folder``: the images it lacks are
    aggregated (``descriptors(missing keys)`` yields their (n, D) descriptors in that order; under
    torchrun, ``share``: each process's share of them) and appended, committed every
    ``commit_every`` images; then the inverted file is (re)made when the forward store grew.
    Returns the index, its image order (the stored keys, then the new ones in ``keys`` order,
    each once: image i of the scores is key i) and a report. Refused (AsmkIndexError) as
    :class:`IndexBuild`, and when the index holds images not in ``keys``."""
    with IndexBuild(folder, words, config, features, commit_every, share) as build:
        build.check(keys)
        build.append_share(keys, descriptors)
        return build.finish(keys, chunk)
