"""Extraction with a DELG checkpoint: the global descriptor (multi-scale GeM, unit length, sharing
the pyramid's forward passes), the autoencoder's code as local descriptor, keypoints on the stride-32
grid (block3_strides; stride 16 for checkpoints older than the option), the feature file."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from extract.config import ExtractionConfig
from extract.extraction.delf_extractor import DelfExtractor
from extract.extraction.feature_file import file_attrs, iter_features
from extract.extractor import main
from tests.utils import photo, save_delg_checkpoint
from train.checkpoint import CheckpointError, load_file, load_model
from train.delg import GLOBAL_SCALES
from train.runtime import deterministic_mode

pytestmark = pytest.mark.usefixtures("one_thread")
NO_PCA = ExtractionConfig(use_pca=False, scale_list=(0.5, 0.7071, 1.0, 1.4142))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_delg_checkpoint(tmp_path_factory.mktemp("delg") / "delg.pth.tar")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(photo("astronaut", 120))


def reference_global(ckpt: Path, image: Image.Image) -> np.ndarray:
    """The multi-scale global descriptor computed by hand with the unfolded model."""
    model, _ = load_model(ckpt)
    model.eval()
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    descs = []
    with torch.no_grad():
        for s in GLOBAL_SCALES:
            h, w = round(x.shape[2] * s), round(x.shape[3] * s)
            xs = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=s < 1)
            descs.append(F.normalize(model.global_descriptor(model.features(xs)), dim=1)[0])
    mean = torch.stack(descs).mean(0)
    return (mean / mean.norm()).numpy()


@pytest.mark.parametrize("scales", [(0.5, 0.7071, 1.0, 1.4142), (0.5, 1.0), (0.25,)])
def test_global_descriptor_matches_hand_computation(ckpt: Path, image: Image.Image, scales: tuple) -> None:
    ex = DelfExtractor.from_checkpoint(ckpt, conf=ExtractionConfig(use_pca=False, scale_list=scales))
    passes = []
    ex.model.base.register_forward_hook(lambda *_: passes.append(1))
    feats = ex(image)
    g = feats["global_descriptor"]
    assert g.shape == (32,) and g.dtype == np.float32
    assert np.linalg.norm(g) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(g, reference_global(ckpt, image), atol=2e-4)  # BN folded: float rounding
    # one pass per pyramid scale, plus one per global scale the pyramid lacks
    shared = sum(any(abs(s - t) < 1e-3 for t in scales) for s in GLOBAL_SCALES)
    assert len(passes) == len(scales) + len(GLOBAL_SCALES) - shared
    # local descriptors: the autoencoder's 16-d code, unit length
    assert feats["descriptors"].shape[1] == 16 == ex.descriptor_dim
    np.testing.assert_allclose(np.linalg.norm(feats["descriptors"], axis=1), 1.0, atol=1e-5)


def test_global_descriptor_can_be_left_out_and_tiny_images(ckpt: Path, image: Image.Image) -> None:
    model, _ = load_model(ckpt)
    assert "global_descriptor" not in DelfExtractor(model, NO_PCA, global_descriptor=False)(image)
    tiny = DelfExtractor(model, NO_PCA)(Image.fromarray(photo("astronaut", 20)))
    assert tiny["global_descriptor"].shape == (32,) and not tiny["global_descriptor"].any()
    assert tiny["descriptors"].shape == (0, 16)


def test_extractor_cli_writes_unit_global_descriptors(ckpt: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out),
                 "--use_pca", "false", "--scale_list", "0.7071", "1.0", "--workers", "0"]) == 0
    feats = dict(iter_features(out))
    assert len(feats) == 4
    for f in feats.values():
        g = f["global_descriptor"]
        assert g.dtype == np.float32 and g.shape == (32,)
        assert np.linalg.norm(g) == pytest.approx(1.0, abs=1e-5)
        assert f["descriptors"].shape[1] == 16
    attrs = file_attrs(out)
    assert attrs["receptive_field"] == [211, 32, 105]  # resnet18 layer3 (211/16/105) subsampled by 2
    assert attrs["global_dim"] == 32 and attrs["global_scales"] == pytest.approx(list(GLOBAL_SCALES))
    assert attrs["descriptor_dim"] == 16
    # the same landmark's crops are closer than another landmark's
    g = {name: f["global_descriptor"] for name, f in feats.items()}
    assert g["astronaut/000.jpg"] @ g["astronaut/001.jpg"] > g["astronaut/000.jpg"] @ g["coffee/000.jpg"]


def test_keypoints_on_the_stride_32_grid_and_old_checkpoints_at_16(ckpt: Path, tmp_path: Path) -> None:
    """Every cell kept (no threshold, no suppression) at scale 1: the keypoints are the centres of
    the cells' receptive boxes, (32 j, 32 i); a checkpoint written before block3_strides existed
    loads at stride 16, (16 j, 16 i), and its even cells are the same features."""
    old = load_file(ckpt)
    del old["block3_strides"]
    torch.save(old, tmp_path / "old.pth.tar")
    conf = ExtractionConfig(use_pca=False, scale_list=(1.0,), attn_thres=0.0, iou_thres=1.0)
    image = torch.rand(3, 128, 160)  # layer3: 8 x 10 cells
    feats = {}
    for name, path in (("new", ckpt), ("old", tmp_path / "old.pth.tar")):
        model, _ = load_model(path)
        feats[name] = DelfExtractor(model, conf, global_descriptor=False)(image)
    grid = {name: {tuple(k): d for k, d in zip(f["keypoints"].tolist(), f["descriptors"])}
            for name, f in feats.items()}
    assert set(grid["new"]) == {(32.0 * j, 32.0 * i) for i in range(4) for j in range(5)}
    assert set(grid["old"]) == {(16.0 * j, 16.0 * i) for i in range(8) for j in range(10)}
    assert feats["new"]["attention"][0].shape == (4, 5) and feats["old"]["attention"][0].shape == (8, 10)
    for k, d in grid["new"].items():
        np.testing.assert_allclose(d, grid["old"][k], atol=1e-5)
    np.testing.assert_allclose(feats["new"]["attention"][0], feats["old"]["attention"][0][::2, ::2], rtol=1e-5)


def test_bad_block3_strides_is_a_one_line_error(ckpt: Path, tmp_path: Path) -> None:
    bad = load_file(ckpt)
    bad["block3_strides"] = "yes"
    torch.save(bad, tmp_path / "bad.pth.tar")
    message = f"{tmp_path / 'bad.pth.tar'}: block3_strides is 'yes': expected true or false"
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
        load_model(tmp_path / "bad.pth.tar")


@pytest.mark.cuda
def test_delg_extraction_on_the_gpu_equals_the_cpu(ckpt: Path, image: Image.Image, tmp_path: Path) -> None:
    """A DELG checkpoint on the GPU (deterministic, TF32 off): the CPU's keypoints, local and global
    descriptors within 1e-3; the extractor CLI writes unit global descriptors from the GPU too."""
    conf = ExtractionConfig(use_pca=False, scale_list=(0.5, 0.7071, 1.0), attn_thres=0.0, top_k=200)
    with deterministic_mode():
        cpu = DelfExtractor.from_checkpoint(ckpt, conf=conf)(image)
        gpu = DelfExtractor.from_checkpoint(ckpt, conf=conf, device="cuda")(image)
    np.testing.assert_allclose(gpu["global_descriptor"], cpu["global_descriptor"], atol=1e-3)
    np.testing.assert_allclose(gpu["global_descriptor"], reference_global(ckpt, image), atol=1e-3)
    a = np.lexsort((cpu["keypoints"][:, 0], cpu["keypoints"][:, 1], cpu["scales"]))
    b = np.lexsort((gpu["keypoints"][:, 0], gpu["keypoints"][:, 1], gpu["scales"]))
    np.testing.assert_array_equal(gpu["keypoints"][b], cpu["keypoints"][a])
    np.testing.assert_allclose(gpu["descriptors"][b], cpu["descriptors"][a], atol=1e-3)
    out = tmp_path / "f.h5"
    images = tmp_path / "imgs"
    images.mkdir()
    image.save(images / "a.png")
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out), "--use_pca",
                 "false", "--scale_list", "0.7071", "1.0", "--device", "cuda", "--amp"]) == 0
    g = dict(iter_features(out))["a.png"]["global_descriptor"]
    assert g.shape == (32,) and np.linalg.norm(g) == pytest.approx(1.0, abs=1e-5)
    assert file_attrs(out)["device_type"] == "cuda"
