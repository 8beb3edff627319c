"""DelfExtractor: selection, NMS/top-k invariants, descriptors, odd inputs."""
from __future__ import annotations

import copy
import logging
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.overrides import TorchFunctionMode

import extract.extraction.delf_extractor as extractor_module
import extract.extraction.images as images_module
from extract.config import ExtractionConfig
from extract.extraction.delf_extractor import (
    FP16_SAFE_WEIGHT,
    DelfExtractor,
    cell_boxes,
    fit_size,
    fold_batchnorm,
    gather_rows,
    largest_weight,
    nms_top_k,
    too_small,
)
from extract.extraction.images import ImageDataset, resize_tf1, shrink
from extract.extraction.pca import fit_pca
from tests.utils import photo
from train.delf import Delf, ReceptiveField

SCALES = (0.5, 1.0, 1.4142)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(photo("coffee", 160))


@pytest.mark.parametrize("arch, target_layer", [("resnet18", "layer3"), ("resnet50", "layer4")])
def test_fold_batchnorm_keeps_outputs(arch: str, target_layer: str):
    torch.manual_seed(0)
    net = Delf(3, arch=arch, stage="inference", target_layer=target_layer).eval()
    for bn in net.modules():  # non-trivial statistics
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) > 0, "the original is untouched"
    x = torch.rand(1, 3, 96, 128)
    with torch.inference_mode():
        (f0, a0), (f1, a1) = net.extract(x), folded.extract(x)
    torch.testing.assert_close(f1, f0, rtol=1e-4, atol=1e-4 * f0.abs().max().item())
    torch.testing.assert_close(a1, a0, rtol=1e-4, atol=1e-5)


def test_nms_top_k_equals_full_nms_prefix():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3000, 2, generator=g) * 200
    size = 20 + torch.rand(3000, 1, generator=g) * 60
    boxes = torch.cat([xy, xy + size], 1)
    scores = torch.rand(3000, generator=g)
    for iou in (0.3, 0.7, 0.95):
        full = torchvision.ops.nms(boxes, scores, iou)
        for k in (1, 10, 200, 5000):
            assert torch.equal(nms_top_k(boxes, scores, iou, k), full[:k])


def test_selection_invariants(model: Delf, image: Image.Image):
    ex = DelfExtractor(model, ExtractionConfig(scale_list=SCALES, attn_thres=0.5, iou_thres=0.6, top_k=40))
    f = ex(image)
    n = len(f["scores"])
    assert 0 < n <= 40
    assert np.all(np.diff(f["scores"]) <= 0), "scores descending"
    assert np.all(f["scores"] >= 0.5)
    pairs = {(float(x), float(y), float(s)) for (x, y), s in zip(f["keypoints"], f["scales"], strict=True)}
    assert len(pairs) == n, "no duplicate features"
    assert set(np.unique(f["scales"])) <= {np.float32(s) for s in SCALES}
    w, h = image.size
    assert np.all((f["keypoints"] > -1) & (f["keypoints"] < [w, h])), "cell centres lie in the image"
    assert [a.shape for a in f["attention"]] == [(4, 5), (7, 10), (10, 15)]


def test_no_padding_when_fewer_cells_than_top_k(model: Delf, image: Image.Image):
    ex = DelfExtractor(model, ExtractionConfig(scale_list=(0.5,), attn_thres=0.0, iou_thres=1.0, top_k=1000))
    f = ex(image)
    assert len(f["scores"]) == f["attention"][0].size  # every cell once, not padded to top_k


def test_descriptors_unit_norm_with_and_without_pca(model: Delf, image: Image.Image):
    raw = DelfExtractor(model, ExtractionConfig(scale_list=SCALES, attn_thres=0.0, top_k=200))(image)
    assert raw["descriptors"].shape == (200, 256)
    np.testing.assert_allclose(np.linalg.norm(raw["descriptors"], axis=1), 1, atol=1e-5)
    pca = fit_pca(np.random.default_rng(0).standard_normal((600, 256)).astype(np.float32))
    conf = ExtractionConfig(pca_dims=40, scale_list=SCALES, attn_thres=0.0, top_k=200)
    f = DelfExtractor(model, conf, pca=pca)(image)
    assert f["descriptors"].shape == (200, 40) and f["descriptors"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f["descriptors"], axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(f["keypoints"], raw["keypoints"])


def test_zero_features_is_valid(model: Delf, image: Image.Image):
    f = DelfExtractor(model, ExtractionConfig(scale_list=SCALES, attn_thres=1e9))(image)
    assert f["keypoints"].shape == (0, 2) and f["descriptors"].shape == (0, 256)
    assert f["scores"].shape == f["scales"].shape == (0,)
    assert f["image_size"].tolist() == [160, 107]


def test_tiny_image_gives_zero_features(model: Delf):
    ex = DelfExtractor(model, ExtractionConfig(scale_list=SCALES))
    f = ex(Image.new("RGB", (200, 20)))
    assert f["keypoints"].shape == (0, 2) and f["image_size"].tolist() == [200, 20]
    assert "too small" in too_small(200, 20, 1024)
    assert too_small(4000, 100, 1024) is not None  # 1024x26 after the shrink
    assert too_small(32, 32, 1024) is None
    assert fit_size(2000, 1000, 1024) == (1024, 512) and fit_size(500, 400, 1024) == (500, 400)


def test_input_types_agree(model: Delf, image: Image.Image):
    ex = DelfExtractor(model, ExtractionConfig(scale_list=SCALES, attn_thres=0.0, top_k=200))
    from_pil = ex(image)
    u8 = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    for other in (ex(u8), ex(u8.float() / 255), ex(image.convert("RGBA"))):
        np.testing.assert_allclose(other["keypoints"], from_pil["keypoints"])
        np.testing.assert_allclose(other["descriptors"], from_pil["descriptors"], atol=1e-5)


def test_large_image_is_shrunk_but_keypoints_are_original_pixels(model: Delf):
    big = Image.fromarray(photo("coffee", 300))  # 300x200
    f = DelfExtractor(model, ExtractionConfig(scale_list=(1.0,), attn_thres=0.0, top_k=10**6, max_image_size=150))(big)
    assert f["attention"][0].shape == (7, 10)  # from the 150x100 image
    assert f["image_size"].tolist() == [300, 200]
    # cell (0, 0) of the 150x100 image is at (0, 0) there, i.e. (0.5 / 0.5 - 0.5) = 0.5 here
    assert [0.5, 0.5] in f["keypoints"].tolist()


def test_amp_agrees_with_fp32(model: Delf, image: Image.Image):
    small = image.resize((96, 72))
    ref = DelfExtractor(model, ExtractionConfig(scale_list=(1.0,), attn_thres=0.0, top_k=1000))(small)
    amp = DelfExtractor(model, ExtractionConfig(scale_list=(1.0,), attn_thres=0.0, top_k=1000, amp=True))(small)
    assert amp["descriptors"].dtype == np.float32
    ref_kp = {tuple(k) for k in ref["keypoints"].tolist()}
    assert ref_kp == {tuple(k) for k in amp["keypoints"].tolist()}
    order = {tuple(k): i for i, k in enumerate(amp["keypoints"].tolist())}
    idx = [order[tuple(k)] for k in ref["keypoints"].tolist()]
    cos = (ref["descriptors"] * amp["descriptors"][idx]).sum(1)
    assert cos.mean() > 0.99


def test_gather_rows_equals_gathering_the_concatenation():
    rows = [torch.randn(10, 4), torch.randn(1, 4), torch.randn(5, 4).bfloat16()]
    order = torch.tensor([12, 0, 10, 3, 15, 11, 9])
    expected = torch.cat([r.float() for r in rows])[order]
    assert torch.equal(gather_rows(rows, order), expected)
    assert gather_rows(rows, order[:0]).shape == (0, 4)


def test_nms_threshold_arithmetic_at_layer3():
    """resnet50 layer3 (receptive field 267, stride 16, as the model derives it): the boxes of
    neighbouring cells of one scale overlap with IoU (266-16)/(266+16) = 0.887 (torchvision
    measures inclusive boxes as x2 - x1 = 266 wide), diagonal neighbours 0.791, cells two apart
    0.785; boxes of scales sqrt(2) apart at most 0.5. So 0.92 keeps every cell of a scale, and
    0.85 removes direct neighbours but keeps cells two apart."""
    rf = ReceptiveField(267, 16, 133)
    boxes = cell_boxes(rf, 6, 8, (1.0, 1.0))
    iou = torchvision.ops.box_iou(boxes, boxes)
    assert iou[0, 1].item() == pytest.approx(250 / 282) == pytest.approx(0.887, abs=1e-3)  # right neighbour
    assert iou[0, 8].item() == pytest.approx(250 / 282)  # the neighbour below
    assert iou[0, 9].item() == pytest.approx(0.791, abs=1e-3) and iou[0, 2].item() == pytest.approx(0.785, abs=1e-3)
    other_scale = cell_boxes(rf, 4, 6, (2 ** -0.5, 2 ** -0.5))  # the next scale down
    assert torchvision.ops.box_iou(other_scale, boxes).max().item() <= 0.5 + 1e-6

    scores = torch.linspace(1, 0.5, len(boxes))
    assert len(nms_top_k(boxes, scores, 0.92, 1000)) == len(boxes), "0.92 removes nothing within a scale"
    row = boxes[:3]  # cells (0, 0), (0, 1), (0, 2) of one row, best first
    assert nms_top_k(row, torch.tensor([3.0, 2.0, 1.0]), 0.85, 10).tolist() == [0, 2]
    assert nms_top_k(row, torch.tensor([3.0, 2.0, 1.0]), 0.92, 10).tolist() == [0, 1, 2]
    kept = nms_top_k(boxes, scores, 0.85, 1000)
    assert len(kept) < len(boxes) and not (torchvision.ops.box_iou(boxes[kept], boxes[kept]).fill_diagonal_(0)
                                           > 0.85).any()


def test_whitening_is_off_by_default(model: Delf, image: Image.Image):
    """Without whitening (the default, as the official DeLF): L2 -> subtract the PCA mean ->
    project -> L2. With --use_whitening: divided by sqrt(variance) before the final L2."""
    conf = ExtractionConfig(scale_list=SCALES, attn_thres=0.0, top_k=50, pca_dims=16)
    raw = DelfExtractor(model, replace(conf, use_pca=False))(image)["descriptors"]
    sample = np.random.default_rng(0).standard_normal((600, 256)) * 2.0 ** -(np.arange(256) / 8)
    pca = fit_pca(sample.astype(np.float32))  # variances spread over 2 orders of magnitude
    projected = (raw - pca["pca_mean"]) @ pca["pca_matrix"][:16].T

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    default = DelfExtractor(model, conf, pca=pca)
    assert default.conf.use_whitening is False
    np.testing.assert_allclose(default(image)["descriptors"], unit(projected), atol=1e-5)
    whitened = DelfExtractor(model, replace(conf, use_whitening=True), pca=pca)(image)["descriptors"]
    np.testing.assert_allclose(whitened, unit(projected / np.sqrt(pca["pca_vars"][:16])), atol=1e-5)
    assert np.abs(whitened - unit(projected)).max() > 0.1
    # without a PCA file there is nothing to whiten: the configuration in effect says so
    assert DelfExtractor(model, replace(conf, use_whitening=True)).conf.use_whitening is False


def test_shrink_converts_uint8_before_antialiasing_off_the_cpu(monkeypatch: pytest.MonkeyPatch):
    """PyTorch has antialiased uint8 resizing on the CPU only: a uint8 image on another device
    (here the meta device, standing in for CUDA) is converted to float first; on the CPU uint8
    stays uint8 and agrees with the float path to rounding."""
    calls = []

    def checked(x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append((x.dtype, x.device.type))
        assert not (x.dtype == torch.uint8 and x.device.type != "cpu"), "antialiased uint8 off the CPU"
        return F.interpolate(x, **kwargs)

    monkeypatch.setattr(images_module, "F", SimpleNamespace(interpolate=checked))
    off_cpu = shrink(torch.zeros(3, 200, 160, dtype=torch.uint8, device="meta"), 100)
    assert off_cpu.dtype == torch.float32 and off_cpu.shape == (3, 100, 80)
    u8 = torch.from_numpy(np.ascontiguousarray(photo("coffee", 300).transpose(2, 0, 1)))  # (3, 200, 300)
    small = shrink(u8, 120)
    assert small.dtype == torch.uint8 and small.shape == (3, 80, 120)
    assert calls == [(torch.float32, "meta"), (torch.uint8, "cpu")]
    as_float = shrink(u8.float() / 255, 120)
    assert (small.float() / 255 - as_float).abs().max() <= 1 / 255  # rounding, fixed-point weights
    assert shrink(u8, 300) is u8  # small enough: untouched


def test_images_shrunk_by_the_decoding_workers_give_the_same_features(model: Delf, tmp_path):
    """What the DataLoader workers hand over (the image shrunk to max_image_size, and its original
    size) gives exactly the features of the full image given to the extractor."""
    Image.fromarray(photo("coffee", 300)).save(tmp_path / "big.png")
    conf = ExtractionConfig(scale_list=(0.5, 1.0), attn_thres=0.0, top_k=100, max_image_size=150)
    ex = DelfExtractor(model, conf)
    name, _, small, size, reason = ImageDataset([("big.png", tmp_path / "big.png")], conf.max_image_size)[0]
    assert (name, tuple(small.shape), size, reason) == ("big.png", (3, 100, 150), (300, 200), None)
    from_worker, direct = ex(small, original_size=size), ex(Image.open(tmp_path / "big.png"))
    for key in ("keypoints", "descriptors", "scores", "scales", "image_size"):
        np.testing.assert_array_equal(from_worker[key], direct[key], err_msg=key)
    with pytest.raises(ValueError, match="not a 400x200 one shrunk to max_image_size 150"):
        ex(small, original_size=(400, 200))


class OutputDevices(TorchFunctionMode):
    """Records the device of every tensor a torch function returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                self.devices.add(t.device.type)
        return out


def test_resize_tf1_makes_its_tables_on_the_images_device():
    """The official resize's interpolation tables are made where the image is (here the meta
    device, standing in for CUDA): nothing is made on the CPU and copied over, which would make
    the host wait for a GPU at every pyramid level."""
    image = torch.rand(3, 37, 53, device="meta")
    with OutputDevices() as seen:
        out = resize_tf1(image, (19, 75))
    assert out.shape == (3, 19, 75) and out.device.type == "meta"
    assert seen.devices == {"meta"}


def test_fp16_amp_checks_the_folded_weights(model: Delf, image: Image.Image, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture):
    """--amp on a GPU without bf16 runs fp16 (here on the CPU, as if): a model whose folded
    weights fp16 cannot hold safely (a BatchNorm channel of tiny variance and large scale) is
    extracted in float32 instead, with a warning, and the file's config says amp false. bf16
    (float32's range) needs no check."""
    monkeypatch.setattr(extractor_module, "amp_dtype", lambda device: torch.float16)
    conf = ExtractionConfig(scale_list=(1.0,), attn_thres=0.0, top_k=100, amp=True)
    small = image.resize((96, 72))
    fp16 = DelfExtractor(model, conf)
    assert fp16.conf.amp is True and largest_weight(fp16.model)[0] < FP16_SAFE_WEIGHT and not caplog.records
    dtypes = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: dtypes.add(output.dtype) if isinstance(module, torch.nn.Conv2d) else None)
    try:
        fp16(small)
    finally:
        hook.remove()
    assert dtypes == {torch.float16}

    wide = copy.deepcopy(model)
    bn = wide.base[1]  # bn1, folded into conv1
    with torch.no_grad():
        bn.running_var[5], bn.weight[5] = 0.0, 500.0  # 500 / sqrt(1e-5): 158 114 times conv1's weights
    ex = DelfExtractor(wide, conf)
    value, name = largest_weight(ex.model)
    assert name == "base.0.weight" and value > FP16_SAFE_WEIGHT
    assert ex.conf.amp is False
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, (
        f"--amp: this GPU has no bf16 and fp16 cannot hold the model safely (|base.0.weight| reaches {value:.3g} "
        "with BatchNorm folded, above 2048): extracting in float32"))]
    fp32 = DelfExtractor(wide, replace(conf, amp=False))(small)
    for key, expected in fp32.items():
        if key != "attention":
            np.testing.assert_array_equal(ex(small)[key], expected, err_msg=key)
    monkeypatch.undo()  # bf16: no check
    assert DelfExtractor(wide, conf).conf.amp is True
