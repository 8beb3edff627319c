"""Test data made on the spot: real CC0 photos bundled with scikit-image, tiny checkpoints."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from extract.demo_data import LANDMARKS, landmark_photo
from train.checkpoint import atomic_save, checkpoint_dict
from train.delf import Delf

# scikit-image's bundled photographs (CC0); distinct scenes, one class each.
PHOTOS = LANDMARKS


def photo(name: str, size: int | None = None) -> np.ndarray:
    """A bundled photo as RGB uint8 (H, W, 3), its longest side resized to ``size``."""
    return landmark_photo(name, size)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 96,
                      seed: int = 0) -> Path:
    """An ImageFolder: class k = random crops/flips of photo k, JPEG files."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(PHOTOS[:classes]):
        img = photo(name, size=int(size * 1.5))
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            y = rng.integers(0, img.shape[0] - size + 1) if img.shape[0] > size else 0
            x = rng.integers(0, img.shape[1] - size + 1) if img.shape[1] > size else 0
            crop = img[y:y + size, x:x + size]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


def save_keypoint_checkpoint(path: Path, arch: str = "resnet18", target_layer: str = "layer3",
                             ncls: int = 3, seed: int = 0) -> Path:
    """A randomly initialised keypoint-stage model in this project's checkpoint format."""
    torch.manual_seed(seed)
    model = Delf(ncls, arch=arch, stage="keypoint", target_layer=target_layer)
    atomic_save(checkpoint_dict(model), path)
    return path
