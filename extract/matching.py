"""Local-feature matching and geometric verification of two images' DeLF features.

As the official match_images.py: each image-2 descriptor's nearest image-1 descriptor (L2) is a
putative match when closer than ``max_distance``; RANSAC then fits an affine model (OpenCV
instead of skimage: two to three orders of magnitude faster, same inliers); the score is the
inlier count. The transform maps image-1 (x, y) to image-2. Every default is in
:class:`extract.config.MatchConfig` (where they come from is stated there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import cv2
import numpy as np

from extract.config import MODELS, MatchConfig
from train.runtime import limit_threads

MIN_SAMPLES = {"affine": 3, "homography": 4}


@dataclass
class MatchResult:
    """Putative matches (M, 2) as (index in image 1, index in image 2), their RANSAC inlier mask,
    and the fitted transform (2x3 affine / 3x3 homography mapping image 1 to image 2, or None)."""

    matches: np.ndarray
    inliers: np.ndarray
    transform: np.ndarray | None

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())


def match_descriptors(d1: np.ndarray, d2: np.ndarray, conf: MatchConfig | None = None) -> np.ndarray:
    """1-NN of each image-2 descriptor among image-1 descriptors (exact L2, one BLAS product).

    Keeps pairs with distance < ``conf.max_distance``; ``conf.mutual`` also requires j to be the
    1-NN of i; ``conf.ratio`` applies Lowe's test (best / second-best distance < ratio). Returns
    (M, 2) int64 rows (i, j), sorted by j.
    """
    conf = conf or MatchConfig()
    d1 = np.asarray(d1, dtype=np.float32)
    d2 = np.asarray(d2, dtype=np.float32)
    if len(d1) == 0 or len(d2) == 0:
        return np.empty((0, 2), dtype=np.int64)
    if d1.ndim != 2 or d2.ndim != 2 or d1.shape[1] != d2.shape[1]:
        raise ValueError(f"descriptor shapes do not match: {d1.shape} vs {d2.shape}")
    sq1 = np.einsum("ij,ij->i", d1, d1)
    sq2 = np.einsum("ij,ij->i", d2, d2)
    # [d2, 1] . [-2 d1, |d1|^2] = |d1_i - d2_j|^2 - |d2_j|^2: one product, no extra pass
    a = np.concatenate([d2, np.ones((len(d2), 1), np.float32)], axis=1)
    b = np.concatenate([-2.0 * d1, sq1[:, None]], axis=1)
    # One pair is ~40 MFLOP: a single BLAS thread does it in ~1 ms, while OpenBLAS's thread pool
    # on a busy 2-core machine takes 10-20 ms.
    with limit_threads(1):
        dist = a @ b.T
    rows = np.arange(len(d2))
    nn = dist.argmin(axis=1)
    best = dist[rows, nn] + sq2
    keep = best < conf.max_distance ** 2
    if conf.mutual:
        keep &= (dist + (sq2[:, None] - sq1[None, :])).argmin(axis=0)[nn] == rows
    if conf.ratio is not None and len(d1) > 1:
        dist[rows, nn] = np.inf
        second = dist.min(axis=1) + sq2
        keep &= np.maximum(best, 0.0) < conf.ratio ** 2 * np.maximum(second, 0.0)
    return np.stack([nn[keep], rows[keep]], axis=1).astype(np.int64)


def verify(kp1: np.ndarray, kp2: np.ndarray, matches: np.ndarray,
           conf: MatchConfig | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """RANSAC (``conf.model``, ``residual``, ``max_iters``, ``confidence``) on matched (x, y)
    keypoints: (inlier mask (M,), transform or None).

    Fewer matches than the model's minimal sample (3 affine, 4 homography) gives no inliers.
    """
    conf = conf or MatchConfig()
    if conf.model not in MODELS:
        raise ValueError(f"unknown model {conf.model!r}: expected one of {MODELS}")
    inliers = np.zeros(len(matches), dtype=bool)
    if len(matches) < MIN_SAMPLES[conf.model]:
        return inliers, None
    p1 = np.ascontiguousarray(np.asarray(kp1, dtype=np.float32)[matches[:, 0]])
    p2 = np.ascontiguousarray(np.asarray(kp2, dtype=np.float32)[matches[:, 1]])
    if conf.model == "affine":
        transform, mask = cv2.estimateAffine2D(p1, p2, method=cv2.RANSAC, ransacReprojThreshold=conf.residual,
                                               maxIters=conf.max_iters, confidence=conf.confidence)
    else:
        transform, mask = cv2.findHomography(p1, p2, cv2.RANSAC, conf.residual, maxIters=conf.max_iters,
                                             confidence=conf.confidence)
    if transform is None or mask is None:
        return inliers, None
    return mask.ravel().astype(bool), transform


def match_features(f1: Mapping[str, Any], f2: Mapping[str, Any], conf: MatchConfig | None = None) -> MatchResult:
    """Match two feature dicts (``keypoints`` (N, 2) x, y and ``descriptors`` (N, D)) and verify."""
    matches = match_descriptors(f1["descriptors"], f2["descriptors"], conf)
    inliers, transform = verify(f1["keypoints"], f2["keypoints"], matches, conf)
    return MatchResult(matches, inliers, transform)
