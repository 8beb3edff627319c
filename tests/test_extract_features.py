"""The feature file: schema, nested names, zero features, resume rules, complete groups."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from extract.extraction.extract_features import feature_writer
from extract.extraction.feature_file import (
    INCOMPLETE,
    FeatureFileError,
    FeatureWriter,
    feature_names,
    file_attrs,
    iter_features,
    read_features,
)

ATTRS = {"attn_thres": 0.31, "top_k": 1000, "scale_list": [0.5, 1.0], "checkpoint_sha256": "ab" * 32,
         "pca_sha256": "", "device": "cpu"}


def feats(n: int, dim: int = 40, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"keypoints": rng.random((n, 2)) * 100, "descriptors": rng.random((n, dim)),
            "scores": np.sort(rng.random(n))[::-1], "scales": np.full(n, 0.5), "image_size": [120, 90],
            "attention": [rng.random((4, 5)), rng.random((8, 10))], "attention_scales": np.float32([0.5, 1.0])}


def test_schema_with_plain_h5py(tmp_path: Path):
    path = tmp_path / "f.h5"
    with FeatureWriter(path, ATTRS) as w:
        w.write("a/b/x.jpg", feats(7), save_attention=True)
        w.write("y.png", feats(0))
    with h5py.File(path, "r") as f:
        g = f["a"]["b"]["x.jpg"]
        assert {k: (g[k].dtype, g[k].shape) for k in g} == {
            "keypoints": (np.float32, (7, 2)), "descriptors": (np.float32, (7, 40)), "scores": (np.float32, (7,)),
            "scales": (np.float32, (7,)), "image_size": (np.int32, (2,)), "attention": (np.float16, (8, 10))}
        assert f["y.png"]["descriptors"].shape == (0, 40) and f["y.png"]["keypoints"].shape == (0, 2)
        assert f.attrs["checkpoint_sha256"] == "ab" * 32 and list(f.attrs["scale_list"]) == [0.5, 1.0]
        assert INCOMPLETE not in f
    assert feature_names(path) == ["a/b/x.jpg", "y.png"]
    got = read_features(path, "a/b/x.jpg")
    np.testing.assert_allclose(got["keypoints"], feats(7)["keypoints"], rtol=1e-6)
    assert got["image_size"].tolist() == [120, 90]
    assert [name for name, _ in iter_features(path)] == ["a/b/x.jpg", "y.png"]
    assert file_attrs(path)["top_k"] == 1000
    with pytest.raises(FeatureFileError, match="no features for image 'a/b'"):
        read_features(path, "a/b")


def test_resume_rules(tmp_path: Path):
    path = tmp_path / "f.h5"
    with FeatureWriter(path, ATTRS) as w:
        w.write("x.jpg", feats(3))
    with FeatureWriter(path, {**ATTRS, "device": "cuda:0"}, informational=("device",)) as w:
        assert w.has("x.jpg") and not w.has("z.jpg")
    with pytest.raises(FeatureFileError, match=r"attn_thres: 0.31 in the file, 0.5 now.*--overwrite"):
        FeatureWriter(path, {**ATTRS, "attn_thres": 0.5})
    with pytest.raises(FeatureFileError, match="scale_list"):
        FeatureWriter(path, {**ATTRS, "scale_list": [1.0]})
    with FeatureWriter(path, {**ATTRS, "attn_thres": 0.5}, overwrite=True) as w:
        assert not w.has("x.jpg")
    assert file_attrs(path)["attn_thres"] == 0.5


def test_incomplete_groups_are_dropped(tmp_path: Path):
    path = tmp_path / "f.h5"
    with FeatureWriter(path, ATTRS) as w:
        w.write("x.jpg", feats(3))
    with h5py.File(path, "a") as f:  # what a run killed in the middle of a write leaves
        f.require_group(INCOMPLETE).create_group("0").create_dataset("keypoints", data=np.zeros((2, 2)))
    assert feature_names(path) == ["x.jpg"]
    with FeatureWriter(path, ATTRS):
        pass
    with h5py.File(path, "r") as f:
        assert INCOMPLETE not in f


def test_refuses_foreign_files(tmp_path: Path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("data", data=[1, 2])
    with pytest.raises(FeatureFileError, match="not a DeLF feature file"):
        FeatureWriter(tmp_path / "other.h5", ATTRS)
    (tmp_path / "junk.h5").write_text("junk")
    with pytest.raises(FeatureFileError, match="not a readable HDF5 file"):
        FeatureWriter(tmp_path / "junk.h5", ATTRS)


def test_legacy_attributes_of_older_files(tmp_path: Path):
    """An attribute that older files lack is compared as the value such files had."""
    path = tmp_path / "f.h5"
    with FeatureWriter(path, {**ATTRS, "use_pca": True}) as w:
        w.write("x.jpg", feats(3))
    legacy = {"use_whitening": lambda stored: bool(stored["use_pca"])}
    with pytest.raises(FeatureFileError, match=r"use_whitening: True in the file \(not recorded.*\), False now"):
        FeatureWriter(path, {**ATTRS, "use_pca": True, "use_whitening": False}, legacy=legacy)
    with FeatureWriter(path, {**ATTRS, "use_pca": True, "use_whitening": True}, legacy=legacy) as w:
        assert w.has("x.jpg")
    with pytest.raises(FeatureFileError, match=r"use_whitening: None in the file, True now"):
        FeatureWriter(path, {**ATTRS, "use_pca": True, "use_whitening": True})  # no legacy rule: missing differs


def test_float16_descriptors_halve_the_file_and_read_as_float32(tmp_path: Path):
    """``descriptor_dtype`` float16: descriptors stored as float16 (the rest as float32), read back
    as float32 equal to the rounded values; the attribute is compared on resume, and a file
    without it holds float32."""
    wide, narrow = tmp_path / "f32.h5", tmp_path / "f16.h5"
    images = {f"i{k}": feats(500, 128, seed=k) for k in range(4)}
    for path, dtype in ((wide, "float32"), (narrow, "float16")):
        with feature_writer(path, {**ATTRS, "descriptor_dtype": dtype}) as w:
            for name, f in images.items():
                w.write(name, f)
    with h5py.File(narrow, "r") as f:
        assert f["i0"]["descriptors"].dtype == np.float16 and f["i0"]["keypoints"].dtype == np.float32
        assert f.attrs["descriptor_dtype"] == "float16"
    got = read_features(narrow, "i2")["descriptors"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.float32(images["i2"]["descriptors"]).astype(np.float16))
    assert np.abs(got - images["i2"]["descriptors"]).max() < 1e-3
    assert all(f["descriptors"].dtype == np.float32 for _, f in iter_features(narrow))
    # 128-d descriptors are most of the file: float16 takes a little over half the bytes
    assert 0.5 < narrow.stat().st_size / wide.stat().st_size < 0.6
    with pytest.raises(FeatureFileError, match="descriptor_dtype: 'float16' in the file, 'float32' now"):
        feature_writer(narrow, {**ATTRS, "descriptor_dtype": "float32"})
    legacy = tmp_path / "legacy.h5"
    with FeatureWriter(legacy, ATTRS) as w:
        w.write("x", feats(3))
    assert read_features(legacy, "x")["descriptors"].dtype == np.float32
    feature_writer(legacy, {**ATTRS, "descriptor_dtype": "float32"}).close()   # files without it: float32
    with pytest.raises(FeatureFileError, match=r"descriptor_dtype: 'float32' in the file \(not recorded: the value "
                                               r"of files written before descriptor_dtype was\), 'float16' now"):
        feature_writer(legacy, {**ATTRS, "descriptor_dtype": "float16"})
