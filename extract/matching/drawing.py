"""Figures of matches. matplotlib is imported at the first drawing, so that a script can pick
its backend (``matplotlib.use("Agg")``) first."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from extract.matching.verification import MatchResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _rgb_uint8(img: Any) -> np.ndarray:
    """A PIL image or (H, W[, C]) array (uint8, or float in [0, 1]) as uint8 RGB."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return arr[..., :3]


def draw_matches(img1: Any, img2: Any, kp1: np.ndarray, kp2: np.ndarray, res: MatchResult,
                 show_keypoints: bool = False) -> Figure:
    """A pyplot Figure (close it when done): the two images side by side, one line per inlier."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    a, b = _rgb_uint8(img1), _rgb_uint8(img2)
    height = max(a.shape[0], b.shape[0])
    canvas = np.full((height, a.shape[1] + b.shape[1], 3), 255, dtype=np.uint8)
    canvas[:a.shape[0], :a.shape[1]] = a
    canvas[:b.shape[0], a.shape[1]:] = b
    kp1 = np.asarray(kp1, dtype=np.float64).reshape(-1, 2)
    kp2 = np.asarray(kp2, dtype=np.float64).reshape(-1, 2) + [a.shape[1], 0]

    fig, ax = plt.subplots(figsize=(12, 12 * height / canvas.shape[1] + 0.6))
    ax.imshow(canvas)
    if show_keypoints:
        ax.scatter(*np.concatenate([kp1, kp2]).T, s=2, c="yellow", linewidths=0)
    pairs = res.matches[res.inliers]
    segments = np.stack([kp1[pairs[:, 0]], kp2[pairs[:, 1]]], axis=1)
    ax.add_collection(LineCollection(segments, colors="lime", linewidths=0.8))
    ax.set_title(f"{res.num_inliers} inliers / {len(res.matches)} putative matches")
    ax.set_axis_off()
    fig.tight_layout()
    return fig
