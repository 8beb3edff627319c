"""Local-feature matching and geometric verification of two images' DeLF features.

As the official match_images.py: each image-2 descriptor's nearest image-1 descriptor (L2) is a
putative match when closer than ``max_distance``; RANSAC then fits an affine model and the score
is the inlier count. The transform maps image-1 (x, y) to image-2. Every default is in
:class:`extract.config.MatchConfig` (where they come from is stated there). Two changes make the
count a count of real correspondences:

- **One-to-one before RANSAC** (:func:`one_to_one`). The 1-NN of each image-2 descriptor lets many
  of them pick the same image-1 keypoint (a "hub"); with keypoints on a dense grid and a 20 px
  residual, every image-2 point near a hub's projection then counts as an inlier. Keeping, per
  image-1 keypoint, only its closest match makes every keypoint of either image appear at most
  once. It is done before RANSAC rather than after so that RANSAC fits and scores distinct
  correspondences: a hub can neither vote several times for a model nor pull the fit towards it.
- **Degenerate fits count 0** (:func:`degenerate`). A model that mirrors the image, or that
  squeezes or stretches some direction by more than ``max_scale_change`` (a singular value of its
  local linear map outside [1/``max_scale_change``, ``max_scale_change``]), is not a viewpoint
  change the image pyramid can explain. An affine's local linear map is its linear part; a
  homography's varies over the image (its projective row can squeeze one part of it while its
  linear part looks harmless), so it is checked at every inlier.

RANSAC is OpenCV's USAC (``cv2.USAC_ACCURATE``: RANSAC with local optimisation), run with a
confidence high enough that ``max_iters`` governs. Classic ``cv2.RANSAC`` with 1000 iterations
finds a model at a 10 % inlier ratio far less often than the official 1000-trial
``skimage.measure.ransac``; USAC finds at least as many inliers as skimage at 10, 30 and 60 %
(tests/test_matcher.py measures it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import cv2
import numpy as np

from extract.config import MODELS, MatchConfig
from extract.errors import InputMismatch, OptionError
from train.runtime import limit_threads

MIN_SAMPLES = {"affine": 3, "homography": 4}


@dataclass
class MatchResult:
    """One-to-one putative matches (M, 2) as (index in image 1, index in image 2), their RANSAC
    inlier mask, and the fitted transform (2x3 affine / 3x3 homography mapping image 1 to image 2,
    or None)."""

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
        raise InputMismatch(f"descriptor shapes do not match: {d1.shape} vs {d2.shape}")
    sq1 = np.einsum("ij,ij->i", d1, d1)
    sq2 = np.einsum("ij,ij->i", d2, d2)
    # [d2, 1] . [-2 d1, |d1|^2] = |d1_i - d2_j|^2 - |d2_j|^2: one product, no extra pass
    a = np.concatenate([d2, np.ones((len(d2), 1), np.float32)], axis=1)
    b = np.concatenate([-2.0 * d1, sq1[:, None]], axis=1)
    # One pair is a small product: a single BLAS thread does it at once, while a BLAS thread pool
    # on a busy machine waits for its cores (timings: docs/benchmarks.md).
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


def one_to_one(matches: np.ndarray, d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """Of (M, 2) matches (i, j) in which each j appears once (as :func:`match_descriptors` gives),
    keep for every image-1 index i only the match of smallest descriptor distance (ties: smaller
    j), in the input order: then each i and each j is used once."""
    if len(matches) == 0:
        return matches
    diff = np.asarray(d1, np.float32)[matches[:, 0]] - np.asarray(d2, np.float32)[matches[:, 1]]
    order = np.lexsort((matches[:, 1], np.einsum("ij,ij->i", diff, diff)))  # best first
    _, first = np.unique(matches[order, 0], return_index=True)
    return matches[np.sort(order[first])]


def local_linear_maps(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The local linear map (Jacobian d(x', y') / d(x, y)) (n, 2, 2) of a 2x3 affine or 3x3
    homography at image-1 points (n, 2) (x, y); for an affine its linear part (1, 2, 2), the same
    everywhere. For H = [[A, t], [g^T, c]] at p: (A - p' g^T) / w, where w = g.p + c and
    p' = (A p + t) / w is the mapped point (any scaling of H gives the same maps)."""
    t = np.asarray(transform, dtype=np.float64)
    if t.shape == (2, 3):
        return t[None, :, :2]
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = p @ t[2, :2] + t[2, 2]
        mapped = (p @ t[:2, :2].T + t[:2, 2]) / w[:, None]
        return (t[None, :2, :2] - mapped[:, :, None] * t[2, :2][None, None, :]) / w[:, None, None]


def degenerate(transform: np.ndarray, max_scale_change: float, points: np.ndarray) -> bool:
    """Whether a fitted 2x3 affine or 3x3 homography is no viewpoint change: at some of
    ``points`` (n, 2), the image-1 inliers, its local linear map (:func:`local_linear_maps`)
    mirrors (determinant <= 0), sends the point to infinity, or has a singular value outside
    [1/max_scale_change, max_scale_change]."""
    jac = local_linear_maps(transform, points)
    if not np.isfinite(jac).all():
        return True
    s = np.linalg.svd(jac, compute_uv=False)
    return bool((np.linalg.det(jac) <= 0).any() or s.min(initial=np.inf) < 1.0 / max_scale_change
                or s.max(initial=0.0) > max_scale_change)


def verify(kp1: np.ndarray, kp2: np.ndarray, matches: np.ndarray,
           conf: MatchConfig | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """RANSAC (``conf.model``, ``residual``, ``max_iters``, ``confidence``) on matched (x, y)
    keypoints: (inlier mask (M,), transform or None).

    Fewer matches than the model's minimal sample (3 affine, 4 homography), or a degenerate fit
    (:func:`degenerate`), gives no inliers (and None).
    """
    conf = conf or MatchConfig()
    if conf.model not in MODELS:
        raise OptionError(f"unknown model {conf.model!r}: expected one of {MODELS}")
    inliers = np.zeros(len(matches), dtype=bool)
    if len(matches) < MIN_SAMPLES[conf.model]:
        return inliers, None
    p1 = np.ascontiguousarray(np.asarray(kp1, dtype=np.float32)[matches[:, 0]])
    p2 = np.ascontiguousarray(np.asarray(kp2, dtype=np.float32)[matches[:, 1]])
    if conf.model == "affine":
        transform, mask = cv2.estimateAffine2D(p1, p2, method=cv2.USAC_ACCURATE,
                                               ransacReprojThreshold=conf.residual,
                                               maxIters=conf.max_iters, confidence=conf.confidence)
    else:
        transform, mask = cv2.findHomography(p1, p2, cv2.USAC_ACCURATE, conf.residual,
                                             maxIters=conf.max_iters, confidence=conf.confidence)
    if transform is None or mask is None:
        return inliers, None
    mask = mask.ravel().astype(bool)
    if degenerate(transform, conf.max_scale_change, p1[mask]):
        return inliers, None
    return mask, transform


def match_features(f1: Mapping[str, Any], f2: Mapping[str, Any], conf: MatchConfig | None = None) -> MatchResult:
    """Match two feature dicts (``keypoints`` (N, 2) x, y and ``descriptors`` (N, D)), make the
    matches one-to-one and verify: ``num_inliers`` counts each keypoint of either image at most once."""
    matches = one_to_one(match_descriptors(f1["descriptors"], f2["descriptors"], conf),
                         f1["descriptors"], f2["descriptors"])
    inliers, transform = verify(f1["keypoints"], f2["keypoints"], matches, conf)
    return MatchResult(matches, inliers, transform)
