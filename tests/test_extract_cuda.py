"""Extraction on a CUDA GPU: agreement with the CPU, the uint8 path, no per-scale host syncs, the
feature file's device attributes. Skipped without a GPU (marked ``cuda``)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from extract.config import DEFAULT_SCALES, ExtractionConfig
from extract.extraction.delf_extractor import DelfExtractor
from extract.extraction.extract_features import extract_features
from extract.extraction.feature_file import FeatureFileError, file_attrs, iter_features
from extract.extraction.pca import fit_pca
from extract.extractor import main
from tests.utils import photo
from train.delf import Delf
from train.runtime import deterministic_mode

pytestmark = pytest.mark.cuda


@pytest.fixture
def deterministic() -> Iterator[None]:
    with deterministic_mode():
        yield


def by_position(f: dict) -> np.ndarray:
    """Row order of the features sorted by (scale, y, x)."""
    return np.lexsort((f["keypoints"][:, 0], f["keypoints"][:, 1], f["scales"]))


def test_cuda_equals_cpu(model: Delf, deterministic: None):
    """Same keypoints (and scales), descriptors within 1e-3, with and without PCA."""
    image = Image.fromarray(photo("coffee", 400))
    pca = fit_pca(np.random.default_rng(0).standard_normal((600, 256)).astype(np.float32))
    for params in (None, pca):
        conf = ExtractionConfig(scale_list=DEFAULT_SCALES, attn_thres=0.0, top_k=500, pca_dims=40)
        cpu = DelfExtractor(model, conf, pca=params)(image)
        gpu = DelfExtractor(model, conf, pca=params, device="cuda")(image)
        a, b = by_position(cpu), by_position(gpu)
        np.testing.assert_array_equal(gpu["keypoints"][b], cpu["keypoints"][a])
        np.testing.assert_array_equal(gpu["scales"][b], cpu["scales"][a])
        np.testing.assert_allclose(gpu["scores"][b], cpu["scores"][a], atol=1e-4)
        np.testing.assert_allclose(gpu["descriptors"][b], cpu["descriptors"][a], atol=1e-3)
        for ga, ca in zip(gpu["attention"], cpu["attention"], strict=True):
            np.testing.assert_allclose(ga, ca, atol=1e-4)


def test_uint8_image_on_the_gpu_is_shrunk_as_float(model: Delf):
    """A uint8 CUDA tensor larger than max_image_size (PyTorch has no antialiased uint8 kernel on
    CUDA) gives the features of the same image as float."""
    u8 = torch.from_numpy(np.ascontiguousarray(photo("chelsea", 400).transpose(2, 0, 1))).cuda()
    ex = DelfExtractor(model, ExtractionConfig(scale_list=(0.5, 1.0), max_image_size=200, attn_thres=0.0),
                       device="cuda")
    a, b = ex(u8), ex(u8.float() / 255)
    np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
    np.testing.assert_allclose(a["descriptors"], b["descriptors"], atol=1e-5)


def test_no_host_sync_per_scale(model: Delf):
    """The host waits for the GPU a few times per image (count the cells, NMS, the result's
    copy), not once per pyramid scale."""
    image = torch.from_numpy(np.ascontiguousarray(photo("astronaut", 512).transpose(2, 0, 1))).pin_memory()
    ex = DelfExtractor(model, ExtractionConfig(scale_list=DEFAULT_SCALES, attn_thres=0.0), device="cuda")
    ex(image)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ex(image)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert 1 <= len(syncs) < len(DEFAULT_SCALES), [str(w.message) for w in syncs]


def test_feature_file_records_the_device(tmp_path: Path, ckpt: Path, images: Path):
    """A file extracted on the GPU (decoding workers, pinned memory) says so, and a CPU run does
    not resume it."""
    conf = ExtractionConfig(scale_list=(0.5, 1.0), use_pca=False)
    report = extract_features(conf, ckpt, images, tmp_path / "f.h5", workers=2, device="cuda")
    assert report.processed == 4 and len(dict(iter_features(report.output))) == 4
    attrs = file_attrs(report.output)
    assert attrs["device_type"] == "cuda" and attrs["device"].startswith("cuda")
    assert attrs["tf32"] == (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    with pytest.raises(FeatureFileError, match="device_type: 'cuda' in the file, 'cpu' now"):
        extract_features(conf, ckpt, images, tmp_path / "f.h5", workers=0, device="cpu")
    # --deterministic: TF32 off, recorded; a default (TF32) run does not resume that file
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(tmp_path / "d.h5"),
                 "--use_pca", "false", "--scale_list", "0.5", "1.0", "--device", "cuda", "--deterministic"]) == 0
    assert file_attrs(tmp_path / "d.h5")["tf32"] is False
    if torch.backends.cudnn.allow_tf32:
        with pytest.raises(FeatureFileError, match="tf32: False in the file, True now"):
            extract_features(conf, ckpt, images, tmp_path / "d.h5", workers=0, device="cuda")
