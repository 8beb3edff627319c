"""Keypoint geometry (the half-pixel mapping of extract/extraction/delf_extractor.py): stored keypoints are the
centres of the features' input-gradient support in the ORIGINAL image, at every pyramid scale,
through the resizes and the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from extract.config import DEFAULT_SCALES, ExtractionConfig
from extract.extraction.delf_extractor import DelfExtractor, box_centres, cell_boxes, to_original
from tests.utils import photo
from train.delf import Delf

pytestmark = pytest.mark.usefixtures("one_thread")


def test_half_pixel_mapping():
    # a 2x downscale: scaled pixel 0 covers original pixels 0..1, centre 0.5; pixel 1 -> 2.5
    boxes = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    assert to_original(boxes, (0.5, 0.5)).tolist() == [[0.5, 2.5, 0.5, 2.5]]
    # per-axis ratios; identity at ratio 1
    assert to_original(boxes, (1.0, 0.25)).tolist() == [[0.0, 5.5, 0.0, 5.5]]


def _support_centre(grad: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(grad.abs().sum(0), as_tuple=True)
    assert xs.min() > 0 and ys.min() > 0 and xs.max() < grad.shape[2] - 1 and ys.max() < grad.shape[1] - 1, \
        "support clipped by the image border"
    return (xs.min() + xs.max()).item() / 2, (ys.min() + ys.max()).item() / 2


@pytest.mark.parametrize("scale", DEFAULT_SCALES)
def test_keypoint_is_centre_of_gradient_support(model: Delf, scale: float):
    # Original size chosen so the pyramid level is ~280x250 px (cheap; an inner cell is unclipped)
    # and the actual ratio differs from the nominal scale. At 0.25 the image exceeds
    # max_image_size, so the shrink-then-scale composition is covered too.
    width, height = round(283 / scale) + 1, round(251 / scale) + 3
    pixels = np.asarray(Image.fromarray(photo("astronaut")).resize((width, height), Image.Resampling.BILINEAR))
    image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255).requires_grad_(True)
    ex = DelfExtractor(model, ExtractionConfig(scale_list=(scale,), attn_thres=0.0, iou_thres=1.0, top_k=10**6,
                                             max_image_size=1024))

    base, size = ex.prepare(image)
    x, ratio = ex.scale_image(base, scale, size)
    fmap, _ = ex.model.extract(x[None])
    h, w = fmap.shape[-2:]
    i, j = h // 2, w // 2
    fmap[0, :, i, j].sum().backward()
    gx, gy = _support_centre(image.grad)

    kx, ky = box_centres(cell_boxes(ex.receptive_field, h, w, ratio))[i * w + j].tolist()
    assert abs(gx - kx) <= 0.5 and abs(gy - ky) <= 0.5, (scale, (gx, gy), (kx, ky))

    feats = ex(image.detach())  # the stored keypoints use this same mapping
    assert len(feats["keypoints"]) == h * w and np.all(feats["scales"] == np.float32(scale))
    assert np.abs(feats["keypoints"] - np.float32([kx, ky])).sum(1).min() < 1e-3
    assert feats["image_size"].tolist() == [width, height]
