"""PCA: sklearn equivalence, bounded uniform sampling, the file and its checkpoint guard."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from extract.config import ExtractionConfig
from extract.extraction.delf_extractor import DelfExtractor
from extract.extraction.pca import PcaError, Reservoir, apply_pca, fit_pca, load_pca, merge_samples, save_pca
from tests.utils import save_keypoint_checkpoint
from train.outputs import file_sha256


def _data(n: int = 2000, dim: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)) * np.linspace(3, 0.1, dim)  # distinct variances
    x = x @ np.linalg.qr(rng.standard_normal((dim, dim)))[0] + rng.standard_normal(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_projection_and_whitening_equal_sklearn():
    x = _data()
    params = fit_pca(x)
    assert params["pca_matrix"].shape == (64, 64) and params["pca_mean"].shape == params["pca_vars"].shape == (64,)
    dims = 16
    for whiten in (False, True):
        ours = apply_pca(torch.from_numpy(x), params, dims, whiten=whiten).numpy()
        theirs = PCA(n_components=dims, whiten=whiten).fit(x.astype(np.float64)).transform(x.astype(np.float64))
        theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
        np.testing.assert_allclose(ours, theirs, atol=2e-4)
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_fewer_features_than_dimensions_is_an_error():
    with pytest.raises(PcaError,
                       match="at least as many descriptors as dimensions: got 10 descriptors of dimension 64"):
        fit_pca(_data(10))


def test_reservoir_is_bounded_and_uniform():
    counts = np.zeros(1000)
    for seed in range(200):
        r = Reservoir(100, seed=seed)
        for start in range(0, 1000, 37):  # uneven batches
            r.add(np.arange(start, min(start + 37, 1000), dtype=np.float32)[:, None])
        sample = r.sample[:, 0].astype(int)
        assert r.seen == 1000 and len(sample) == 100 and len(set(sample)) == 100
        counts[sample] += 1
    # each row kept with probability 0.1: 20 expected per row over 200 runs
    assert abs(counts[:500].mean() - counts[500:].mean()) < 2 and counts.min() > 3


def test_reservoir_keeps_everything_below_capacity():
    r = Reservoir(100)
    r.add(np.ones((30, 4)))
    r.add(np.zeros((20, 4)))
    assert r.sample.shape == (50, 4) and r.seen == 50


def test_merge_samples():
    a, b = np.zeros((10, 2), np.float32), np.ones((40, 2), np.float32)
    everything = merge_samples([a, b], [10, 40], capacity=100)
    assert len(everything) == 50 and everything.sum() == 80
    part = merge_samples([a, b], [10, 1000], capacity=40)
    assert len(part) == 40 and part[:, 0].sum() >= 35  # almost all from the long stream


def test_file_round_trip_and_checkpoint_guard(tmp_path: Path):
    params = fit_pca(_data())
    save_pca(tmp_path / "pca.h5", params, {"checkpoint_sha256": "a" * 64, "num_features": 2000})
    loaded = load_pca(tmp_path / "pca.h5", checkpoint_sha256="a" * 64)
    for key in ("pca_matrix", "pca_mean", "pca_vars"):
        np.testing.assert_array_equal(loaded[key], params[key])
    assert loaded["attrs"]["num_features"] == 2000
    with pytest.raises(PcaError, match="fitted on a different checkpoint"):
        load_pca(tmp_path / "pca.h5", checkpoint_sha256="b" * 64)
    with pytest.raises(PcaError, match="no such PCA file"):
        load_pca(tmp_path / "missing.h5")


def test_extractor_refuses_pca_of_another_checkpoint(tmp_path: Path):
    ckpt = save_keypoint_checkpoint(tmp_path / "fix.pth.tar")
    other = save_keypoint_checkpoint(tmp_path / "other.pth.tar", seed=1)
    params = fit_pca(np.random.default_rng(0).standard_normal((300, 256)).astype(np.float32))
    save_pca(tmp_path / "pca.h5", params, {"checkpoint_sha256": file_sha256(other)})
    with pytest.raises(PcaError, match="different checkpoint"):
        DelfExtractor.from_checkpoint(ckpt, tmp_path / "pca.h5")
    save_pca(tmp_path / "pca.h5", params, {"checkpoint_sha256": file_sha256(ckpt)})
    ex = DelfExtractor.from_checkpoint(ckpt, tmp_path / "pca.h5", ExtractionConfig(pca_dims=8))
    assert ex.descriptor_dim == 8
    with pytest.raises(PcaError, match="pca_dims 300 is outside 1..256"):
        DelfExtractor.from_checkpoint(ckpt, tmp_path / "pca.h5", ExtractionConfig(pca_dims=300))
