"""The feature file: one HDF5 group per image, written image by image, resumable.

Layout: group ``<name>`` ('/' in a name makes nested groups) with datasets ``keypoints`` (N, 2)
float32 x, y; ``descriptors`` (N, D) float32, or float16 when the root attribute
``descriptor_dtype`` says so (readers return float32); ``scores`` (N,) float32; ``scales`` (N,) float32;
``image_size`` int32 [w, h]; optional ``attention`` float16 (h, w) at scale 1.0; with a DELG
model, ``global_descriptor`` (D,) float32, unit length (zero for an image too small). Root attributes:
``format`` and the extraction parameters (extract/extraction/extract_features.py, ``feature_attrs``: the
ExtractionConfig fields, the model, the checkpoint's and PCA file's sha256). Keypoints are in
pixels of the original image (half-pixel mapping, see extract/extraction/delf_extractor.py).

A group is built under ``/__incomplete__`` and moved to its name only when complete, then the
file is flushed; so a killed run leaves whole groups only, and a rerun skips them.

A write that would fill the disk is refused before HDF5 starts it (:func:`check_room`). A file
that another process has open for writing is locked by HDF5: it is reported as in use
(never as unreadable, and ``overwrite`` does not remove it).
"""
from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import h5py
import numpy as np

from extract.config import DESCRIPTOR_DTYPES
from extract.errors import OptionError

FEATURE_KEYS = ("keypoints", "descriptors", "scores", "scales", "image_size")
DTYPES = {"keypoints": np.float32, "descriptors": np.float32, "scores": np.float32, "scales": np.float32,
          "image_size": np.int32}
GLOBAL_KEY = "global_descriptor"  # DELG only
INCOMPLETE = "__incomplete__"
FORMAT = "delf-pytorch features 1"
# Free space kept beyond twice the data of a write: HDF5 cannot recover from a full disk in the
# middle of a write (its objects fail to close, the process may crash), so writes stop short of it.
RESERVE_BYTES = 1 << 20


def check_room(path: str | Path, nbytes: int) -> None:
    """Raise OSError(ENOSPC) unless the disk of ``path`` has room for ``nbytes`` of data with a
    margin (twice the data plus :data:`RESERVE_BYTES`)."""
    folder = Path(path).absolute().parent
    while not folder.exists():  # not made yet: its disk is the nearest existing folder's
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < 2 * nbytes + RESERVE_BYTES:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (writing {nbytes} bytes would leave less than "
                      f"{RESERVE_BYTES >> 20} MiB free)", str(path))


class FeatureFileError(RuntimeError):
    """A feature file is unreadable, lacks an image, or was made with other parameters."""


def in_use(error: OSError) -> bool:
    """Whether h5py failed to open a file because another process holds HDF5's lock on it."""
    return "unable to lock file" in str(error)


def in_use_message(path: str | Path) -> str:
    return f"{path}: in use by another process (HDF5 file lock); wait for it or choose another --output_path"


def _open_h5(path: str | Path, mode: str) -> h5py.File:
    """``path`` opened by h5py in ``mode``. A file that another process holds HDF5's lock on raises
    FeatureFileError (in use); any other failure, h5py's OSError."""
    try:
        return h5py.File(path, mode)
    except OSError as e:
        if in_use(e):
            raise FeatureFileError(in_use_message(path)) from None
        raise


class FeatureWriter:
    """Appends image groups to ``path``; a context manager.

    A new file gets ``attrs`` as root attributes. An existing one is resumed when its attributes
    equal ``attrs`` (keys in ``informational`` are stored but not compared), else refused;
    ``overwrite`` starts afresh. ``legacy`` gives, for attributes that files written before they
    existed lack, the value such a file had (a function of its stored attributes).
    """

    def __init__(self, path: str | Path, attrs: Mapping[str, Any], overwrite: bool = False,
                 informational: Iterable[str] = (),
                 legacy: Mapping[str, Callable[[Mapping[str, Any]], Any]] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and self.path.exists():
            with contextlib.suppress(OSError):  # never remove a file that another process is writing
                _open_h5(self.path, "r").close()
            self.path.unlink()
        try:
            self._file = _open_h5(self.path, "a")
        except OSError as e:
            raise FeatureFileError(f"{self.path}: not a readable HDF5 file ({first_line(e)}); "
                                   "delete it or pass --overwrite") from None
        self._inode = _inode(self.path)
        self._descriptor_dtype = descriptor_dtype(attrs)
        try:
            self._check_or_set_attrs({"format": FORMAT, **attrs}, set(informational), legacy or {})
        except BaseException:
            self._file.close()
            raise
        if INCOMPLETE in self._file:
            del self._file[INCOMPLETE]
        self._file.flush()

    def _check_or_set_attrs(self, attrs: dict[str, Any], informational: set[str],
                            legacy: Mapping[str, Callable[[Mapping[str, Any]], Any]]) -> None:
        stored = {k: plain_attr(v) for k, v in self._file.attrs.items()}
        if not stored and not len(self._file):
            self._file.attrs.update({k: storable_attr(v) for k, v in attrs.items()})
            return
        if stored.get("format") != FORMAT:
            raise FeatureFileError(f"{self.path}: exists and is not a DeLF feature file of this project; "
                                   "choose another --output_path or pass --overwrite")
        diffs = []
        for k, v in attrs.items():
            old, note = stored.get(k), ""
            if k not in stored and k in legacy:
                old, note = legacy[k](stored), f" (not recorded: the value of files written before {k} was)"
            if k not in informational and old != plain_attr(storable_attr(v)):
                diffs.append(f"{k}: {old!r} in the file{note}, {plain_attr(storable_attr(v))!r} now")
        if diffs:
            raise FeatureFileError(f"{self.path}: holds features made with other parameters ("
                                   + "; ".join(diffs) + "): pass the file's values to resume it, --overwrite "
                                   "to replace it, or choose another --output_path")

    def has(self, name: str) -> bool:
        """Whether a complete group for ``name`` is in the file."""
        obj = self._file.get(name)
        return isinstance(obj, h5py.Group) and isinstance(obj.get("keypoints"), h5py.Dataset)

    def write(self, name: str, feats: Mapping[str, Any], save_attention: bool = False) -> dict[str, np.ndarray]:
        """Write one image's features as group ``name`` (replacing an existing one) and flush;
        returns the arrays written as a reader gets them back (:func:`as_read`).

        With ``save_attention``, ``feats["attention"]`` is stored as float16: either one (h, w) map
        or the per-scale list, of which the map at scale 1.0 (``feats["attention_scales"]``) is kept.
        """
        self._check_in_place()
        arrays = {key: np.asarray(feats[key], dtype=DTYPES[key]) for key in FEATURE_KEYS}
        arrays["descriptors"] = arrays["descriptors"].astype(self._descriptor_dtype)
        if GLOBAL_KEY in feats:
            arrays[GLOBAL_KEY] = np.asarray(feats[GLOBAL_KEY], dtype=np.float32)
        if save_attention:
            arrays["attention"] = _attention_at_scale_1(feats).astype(np.float16)
        check_room(self.path, sum(a.nbytes for a in arrays.values()))
        tmp = self._file.require_group(INCOMPLETE).create_group(uuid.uuid4().hex)
        for key, data in arrays.items():
            tmp.create_dataset(key, data=data)
        if name in self._file:
            del self._file[name]
        parent = posixpath.dirname(name)
        if parent:
            self._file.require_group(parent)
        self._file.move(tmp.name, "/" + name)
        self._file.flush()
        return {key: as_read(key, data) for key, data in arrays.items()}

    def close(self) -> None:
        """Drop an unfinished group and close. After a failed write (e.g. a full disk) closing is
        best effort: the file holds what the last complete write flushed."""
        if self._file.id.valid:
            try:
                if INCOMPLETE in self._file:
                    del self._file[INCOMPLETE]
            finally:
                self._file.close()
            self._check_in_place()

    def _check_in_place(self) -> None:
        """Raise FileNotFoundError when the file was removed or replaced since it was opened
        (writes would go to a file nobody can open any more)."""
        if _inode(self.path) != self._inode:
            raise FileNotFoundError(errno.ENOENT, "removed while it was written (its folder deleted?)", str(self.path))

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            self.close()
        except OSError:
            if exc_type is None:
                raise  # otherwise the original error is the one to report


def _attention_at_scale_1(feats: Mapping[str, Any]) -> np.ndarray:
    attention = feats["attention"]
    if isinstance(attention, np.ndarray) and attention.ndim == 2:
        return attention
    scales = [float(s) for s in feats.get("attention_scales", [])]
    if 1.0 not in scales:
        raise OptionError("save_attention needs the attention map at scale 1.0; add 1.0 to the scales")
    return np.asarray(attention[scales.index(1.0)])


def storable_attr(value: Any) -> Any:
    """An HDF5 attribute value for ``value`` (None -> '', sequences -> float64 arrays)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return np.asarray(value, dtype=np.float64)
    return value


def plain_attr(value: Any) -> Any:
    """Comparable Python value of an attribute as stored or read back."""
    if isinstance(value, np.ndarray):
        return [float(v) for v in value.ravel()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def descriptor_dtype(attrs: Mapping[str, Any]) -> np.dtype:
    """The dtype a feature file with root attributes ``attrs`` stores descriptors in (its
    ``descriptor_dtype``; files without it: float32)."""
    name = plain_attr(attrs.get("descriptor_dtype", "float32"))
    if name not in DESCRIPTOR_DTYPES:
        raise OptionError(f"descriptor dtype {name!r}: expected one of {', '.join(DESCRIPTOR_DTYPES)}")
    return np.dtype(name)


def as_read(key: str, data: np.ndarray) -> np.ndarray:
    """Stored array ``key`` as readers return it: descriptors as float32 whatever their stored dtype."""
    return data.astype(np.float32, copy=False) if key == "descriptors" else data


def read_array(group: h5py.Group, key: str) -> np.ndarray:
    """Array ``key`` of an image group (:func:`as_read`)."""
    return as_read(key, group[key][()])


def _read_group(group: h5py.Group) -> dict[str, np.ndarray]:
    return {key: read_array(group, key) for key in (*FEATURE_KEYS, "attention", GLOBAL_KEY) if key in group}


def read_features(path: str | Path, name: str) -> dict[str, np.ndarray]:
    """The features of image ``name`` in ``path`` as numpy arrays (+ ``attention`` if stored)."""
    with open_features(path) as f:
        group = f.get(name)
        if not isinstance(group, h5py.Group) or "keypoints" not in group:
            raise FeatureFileError(f"{path}: no features for image {name!r}")
        return _read_group(group)


def feature_names(path: str | Path) -> list[str]:
    """Names of all images in ``path``, sorted."""
    with open_features(path) as f:
        return sorted(name for name, _ in _walk(f))


def iter_features(path: str | Path) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(name, features) of every image in ``path``, sorted by name, with the file opened once."""
    with open_features(path) as f:
        for name, group in sorted(_walk(f), key=lambda item: item[0]):
            yield name, _read_group(group)


def file_attrs(path: str | Path) -> dict[str, Any]:
    """The root attributes of ``path`` as plain Python values."""
    with open_features(path) as f:
        return {k: plain_attr(v) for k, v in f.attrs.items()}


def _walk(f: h5py.File) -> list[tuple[str, h5py.Group]]:
    found: list[tuple[str, h5py.Group]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and isinstance(obj.get("keypoints"), h5py.Dataset) \
                and not name.startswith(INCOMPLETE):
            found.append((name, obj))

    f.visititems(visit)
    return found


def open_features(path: str | Path) -> h5py.File:
    """``path`` opened for reading; a file another process writes is reported as in use."""
    try:
        return _open_h5(path, "r")
    except FileNotFoundError:
        raise FeatureFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FeatureFileError(f"{path}: a folder, not a feature file") from None
    except OSError as e:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({first_line(e)})") from None


def first_line(error: OSError) -> str:
    """HDF5's error text without its multi-line details."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
