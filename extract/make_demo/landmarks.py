"""A small landmark dataset from real photographs that ship with scikit-image (CC0).

Each class is one photo ("landmark"); its images are synthetic viewpoint changes of it: a random
perspective warp, rotation, scale and crop, and colour jitter. Used by ``make demo`` and the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# The demo's landmarks: structured scenes among scikit-image's bundled photos (no download), the
# first ``classes`` of them in a demo run; grey ones are used as RGB.
LANDMARKS = ("astronaut", "coffee", "chelsea", "motorcycle", "camera", "moon")


def landmark_photo(name: str, long_side: int | None = None) -> np.ndarray:
    """A bundled photo (any ``skimage.data`` image, or ``motorcycle``: the left view of
    ``stereo_motorcycle``) as RGB uint8 (H, W, 3), its longest side resized to ``long_side``."""
    import skimage.data

    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    if long_side is None:
        return img
    scale = long_side / max(img.shape[:2])
    size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def random_view(photo: np.ndarray, size: int, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A (size, size) view of ``photo`` under a random perspective, rotation, scale, crop and
    colour change; ``strength`` scales the geometric jitter (0 = a plain centred resize)."""
    h, w = photo.shape[:2]
    # Where the output corners land in the photo: a centred square of random scale and
    # rotation, each corner then jittered independently (perspective).
    side = min(h, w) * rng.uniform(1 - 0.35 * strength, 1.0)
    angle = np.deg2rad(rng.uniform(-15, 15) * strength)
    centre = np.array([w / 2, h / 2]) + rng.uniform(-0.1, 0.1, 2) * strength * np.array([w, h])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    corners = centre + (unit * side) @ rot.T + rng.uniform(-0.08, 0.08, (4, 2)) * side * strength
    target = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], np.float32)
    warp = cv2.getPerspectiveTransform(corners.astype(np.float32), target)
    view = cv2.warpPerspective(photo, warp, (size, size), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT_101).astype(np.float32)
    gain = rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength, 3)  # per-channel colour
    bias = rng.uniform(-20, 20) * strength
    return np.clip(view * gain + bias, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class DemoDataset:
    """Where :func:`build_dataset` put things."""

    root: Path
    classes: tuple[str, ...]

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def val(self) -> Path:
        return self.root / "val"

    @property
    def query(self) -> Path:
        return self.root / "query"


def build_dataset(root: Path, classes: int = 6, train_per_class: int = 40, val_per_class: int = 8,
                  query_per_class: int = 2, size: int = 128, query_size: int = 320, seed: int = 0,
                  query_strength: float = 0.3) -> DemoDataset:
    """Write ImageFolder train/val/query splits under ``root``; files already there are kept.

    Training and validation views get the full jitter of :func:`random_view` (augmentation); query
    views ``query_strength`` of it: two photos of a landmark from nearby viewpoints."""
    if not 1 <= classes <= len(LANDMARKS):
        raise ValueError(f"classes must be in 1..{len(LANDMARKS)}")
    rng = np.random.default_rng(seed)
    names = LANDMARKS[:classes]
    splits = (("train", train_per_class, size, 1.0), ("val", val_per_class, size, 1.0),
              ("query", query_per_class, query_size, query_strength))
    for name in names:
        photo = landmark_photo(name, long_side=2 * query_size)
        for split, count, side, strength in splits:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                view = random_view(photo, side, rng, strength)  # drawn even when the file exists: same data
                path = folder / f"{i:03d}.jpg"
                if not path.exists():
                    Image.fromarray(view).save(path, quality=92)
    return DemoDataset(root, names)
