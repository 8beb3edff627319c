"""PCA of DeLF descriptors: bounded-memory sampling, fitting, the HDF5 file, and its application.

The file holds the seed's datasets ``pca_matrix`` (D, D; rows = components, by decreasing
variance), ``pca_mean`` (D,), ``pca_vars`` (D,), and attributes ``checkpoint_sha256`` (the model
whose descriptors were fitted) and ``num_features``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from extract.extraction.feature_file import check_room
from train.outputs import atomic_path

PCA_KEYS = ("pca_matrix", "pca_mean", "pca_vars")


class PcaError(RuntimeError):
    """A PCA file is missing, malformed, or does not fit the model or the request."""


class Reservoir:
    """A uniform random sample of at most ``capacity`` rows of a stream (Vitter's algorithm R,
    vectorised per batch): memory stays at ``capacity`` rows however long the stream."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity, self.seen = capacity, 0
        self._rng = np.random.default_rng(seed)
        self._rows: list[np.ndarray] = []
        self._sample: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        if self._sample is None:
            room = self.capacity - self.seen
            self._rows.append(rows[:room])
            self.seen += len(rows[:room])
            rows = rows[room:]
            if self.seen < self.capacity:
                return
            self._sample, self._rows = np.concatenate(self._rows), []
        if len(rows):
            slots = self._rng.integers(0, self.seen + 1 + np.arange(len(rows)))
            hit = slots < self.capacity
            self._sample[slots[hit]] = rows[hit]  # duplicate slots: the later row wins, as in algorithm R
            self.seen += len(rows)

    @property
    def sample(self) -> np.ndarray:
        if self._sample is not None:
            return self._sample
        return np.concatenate(self._rows) if self._rows else np.zeros((0, 0), np.float32)


def merge_samples(samples: list[np.ndarray], seen: list[int], capacity: int, seed: int = 0) -> np.ndarray:
    """One uniform sample of at most ``capacity`` rows of the union of several streams, from
    each stream's uniform sample (``samples[r]``) and length (``seen[r]``)."""
    rng = np.random.default_rng(seed)
    total = min(capacity, sum(seen))
    counts = rng.multivariate_hypergeometric(np.asarray(seen, dtype=np.int64), total)
    parts = [s[rng.choice(len(s), k, replace=False)] for s, k in zip(samples, counts, strict=True) if k]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def fit_pca(descriptors: np.ndarray) -> dict[str, np.ndarray]:
    """Full PCA (all D components) of (N, D) descriptors with sklearn; needs N >= D.

    The covariance solver keeps memory at one copy of the data plus D x D (a full SVD of
    100k x 1024 descriptors would need gigabytes)."""
    from sklearn.decomposition import PCA

    n, dim = descriptors.shape if descriptors.ndim == 2 else (0, 0)
    if n < max(dim, 2):
        raise PcaError(f"PCA needs at least as many descriptors as dimensions: got {n} descriptors of "
                       f"dimension {dim}; use more images or a lower --attn_thres")
    pca = PCA(n_components=dim, svd_solver="covariance_eigh").fit(np.asarray(descriptors, dtype=np.float32))
    return {"pca_matrix": pca.components_.astype(np.float32), "pca_mean": pca.mean_.astype(np.float32),
            "pca_vars": pca.explained_variance_.astype(np.float32)}


def save_pca(path: str | Path, params: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Write the PCA file atomically (temp file in the same folder, then rename); OSError(ENOSPC)
    before anything is written when the disk lacks room (see extract.extraction.feature_file.check_room)."""
    check_room(path, sum(np.asarray(params[key]).nbytes for key in PCA_KEYS))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key in PCA_KEYS:
            f.create_dataset(key, data=params[key])
        f.attrs.update(attrs)


def load_pca(path: str | Path, checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """PCA parameters (numpy) plus the file's attributes under ``attrs``.

    With ``checkpoint_sha256``, a file fitted on another checkpoint is refused; a file without
    that attribute (e.g. the seed's) is accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise PcaError(f"{path}: no such PCA file; fit one first with --mode pca (or pass --use_pca false)")
    try:
        with h5py.File(path, "r") as f:
            params: dict[str, Any] = {k: np.asarray(f[k], dtype=np.float32) for k in PCA_KEYS}
            params["attrs"] = dict(f.attrs)
    except KeyError as e:
        raise PcaError(f"{path}: not a PCA file (missing dataset {e})") from None
    except OSError as e:
        raise PcaError(f"{path}: not a readable HDF5 file ({e})") from None
    fitted = params["attrs"].get("checkpoint_sha256")
    if checkpoint_sha256 and fitted and fitted != checkpoint_sha256:
        raise PcaError(f"{path} was fitted on a different checkpoint (sha256 {fitted[:12]}…, this model "
                       f"is {checkpoint_sha256[:12]}…): refit it with --mode pca on this checkpoint")
    return params


def apply_pca(descriptors: torch.Tensor, params: dict[str, Any], dims: int, whiten: bool = False) -> torch.Tensor:
    """(N, D) unit descriptors -> (N, dims): subtract the mean, project on the first ``dims``
    components, divide by sqrt(variance) when ``whiten``, L2-normalise."""
    matrix = torch.as_tensor(params["pca_matrix"][:dims], device=descriptors.device)
    mean = torch.as_tensor(params["pca_mean"], device=descriptors.device)
    out = (descriptors - mean) @ matrix.T
    if whiten:
        variance = torch.as_tensor(params["pca_vars"][:dims], device=descriptors.device)
        out = out / variance.clamp_min(1e-12).sqrt()
    return torch.nn.functional.normalize(out, dim=1)
