"""`make demo` as a library call (:func:`run_demo`): the whole DeLF pipeline on embedded data.

Builds a landmark dataset from scikit-image's bundled photos (extract/make_demo/landmarks.py),
trains the finetune and keypoint stages from scratch with the project's own CLI, copies
bestshot.pth.tar to fix.pth.tar, fits PCA, extracts query features to HDF5, then matches every
pair of query images and reports the inlier counts of same-landmark and different-landmark pairs
(:class:`Separation`). Steps whose outputs exist are skipped (`make demo-clean` starts over).
"""
from __future__ import annotations

import dataclasses
import itertools
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np

from extract.config import ExtractionConfig, MatchConfig
from extract.extraction.feature_file import iter_features
from extract.extraction.images import load_image
from extract.make_demo.landmarks import DemoDataset, build_dataset
from extract.make_demo.presets import PRESETS, Preset
from extract.matching.drawing import draw_matches
from extract.matching.verification import MatchResult, match_features
from train.runtime import PROJECT_ROOT, repo_dir

# The official verification's RANSAC residual is for images of this longest side (the extractor's default).
OFFICIAL_IMAGE_SIZE = ExtractionConfig().max_image_size


def match_config(preset: Preset) -> MatchConfig:
    """Verification suited to the demo's query images: the official residual (20 px at 1024 px)
    scaled to their size, and a fit that scales by more than 2 along some direction counts 0 inliers
    (two query views of a landmark differ far less: extract/make_demo/landmarks.py)."""
    default = MatchConfig()
    return dataclasses.replace(default, residual=default.residual * preset.query_size / OFFICIAL_IMAGE_SIZE,
                               max_scale_change=2.0)


def run(*args: str | Path) -> None:
    """Run one of the project's scripts with this interpreter, from the project root."""
    cmd = [sys.executable, *map(str, args)]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=PROJECT_ROOT)


def train(expr: str, data: DemoDataset, arch: str, preset: Preset, seed: int) -> Path:
    """Both training stages (skipped when their bestshot exists); returns fix.pth.tar."""
    size, ft_epochs, kp_epochs = preset.size, preset.finetune_epochs, preset.keypoint_epochs
    root = repo_dir() / expr
    common = ["--expr", expr, "--arch", arch, "--optim", "sgd", "--lr", "0.01", "--train_batch_size", "16",
              "--val_batch_size", "16", "--workers", "0", "--manualSeed", str(seed), "--device", "cpu"]
    finetune = root / "finetune" / "ckpt" / "bestshot.pth.tar"
    if not finetune.exists():
        run("train/main.py", "--stage", "finetune", "--pretrained", "none", *common,
            "--finetune_train_path", data.train, "--finetune_val_path", data.val,
            "--finetune_sample_size", size + size // 8, "--finetune_crop_size", size,
            "--finetune_epoch", ft_epochs, "--lr_stepsize", max(1, ft_epochs // 2))
    keypoint = root / "keypoint" / "ckpt" / "bestshot.pth.tar"
    if not keypoint.exists():
        run("train/main.py", "--stage", "keypoint", *common, "--load_from", finetune,
            "--use_random_gamma_scaling", "true",
            "--keypoint_train_path", data.train, "--keypoint_val_path", data.val,
            "--keypoint_sample_size", size + size // 8, "--keypoint_crop_size", size,
            "--keypoint_epoch", kp_epochs, "--lr_stepsize", max(1, kp_epochs // 2))
    fix = keypoint.with_name("fix.pth.tar")
    if not fix.exists():
        print(f"$ cp {keypoint} {fix}")
        shutil.copyfile(keypoint, fix)
    return fix


# The demo's model keeps the 1000 most attended cells of each image, without the seed's absolute
# threshold (0.31): trained for a minute on six classes, its attention is not calibrated, and one
# class's attention can stay below 0.31 everywhere (no keypoints at all on that landmark).
ATTN_THRES = 0.0


def extract(expr: str, data: DemoDataset) -> Path:
    """PCA on the training images, then DeLF features of the query images."""
    pca = repo_dir() / expr / "pca" / "pca.h5"
    if not pca.exists():
        run("extract/extractor.py", "--load_expr", expr, "--mode", "pca", "--stage", "inference",
            "--input_path", data.train, "--output_path", pca, "--attn_thres", ATTN_THRES)
    features = repo_dir() / expr / "features" / "query.h5"
    run("extract/extractor.py", "--load_expr", expr, "--mode", "delf", "--stage", "inference",
        "--input_path", data.query, "--pca_parameters_path", pca, "--output_path", features,
        "--save_attention", "true", "--attn_thres", ATTN_THRES)
    return features


Pair = tuple[str, str, int]  # image names, RANSAC inliers


Features = Mapping[str, Mapping[str, np.ndarray]]  # image name -> its features


@dataclass(frozen=True)
class Separation:
    """RANSAC inlier counts of every pair of query images: pairs of the same landmark, and pairs
    of different landmarks (name pairs, counts)."""

    same: tuple[Pair, ...]
    different: tuple[Pair, ...]

    @property
    def worst_same(self) -> Pair:
        """The (first) same-landmark pair with the fewest inliers."""
        return min(self.same, key=lambda p: p[2])

    @property
    def worst_different(self) -> Pair:
        """The (first) different-landmark pair with the most inliers."""
        return max(self.different, key=lambda p: p[2])

    @property
    def separated(self) -> bool:
        """The demo's claim: every same-landmark pair has more inliers than any different pair."""
        return self.worst_same[2] > self.worst_different[2]

    def summary(self) -> str:
        def line(label: str, pairs: tuple[Pair, ...], worst: Pair) -> str:
            counts = [n for *_, n in pairs]
            a, b, n = worst
            return (f"{label} {len(counts)} pairs, inliers median {int(np.median(counts))}, "
                    f"min {min(counts)}, max {max(counts)} (worst: {a} <-> {b}, {n})")

        return "\n".join([line("same landmark:     ", self.same, self.worst_same),
                          line("different landmark:", self.different, self.worst_different),
                          f"separated (smallest same {self.worst_same[2]} > largest different "
                          f"{self.worst_different[2]}): {'yes' if self.separated else 'no'}"])


def all_pairs(feats: Features,
              conf: MatchConfig | None = None) -> tuple[Separation, dict[tuple[str, str], MatchResult]]:
    """Match every pair (a, b), a < b, of the images; the landmark is a name's first folder.
    Returns the inlier counts and the matches of each pair."""
    matches = {(a, b): match_features(feats[a], feats[b], conf) for a, b in itertools.combinations(sorted(feats), 2)}
    same, different = [], []
    for (a, b), res in matches.items():
        (same if a.split("/")[0] == b.split("/")[0] else different).append((a, b, res.num_inliers))
    return Separation(tuple(same), tuple(different)), matches


def match_figure(data: DemoDataset, feats: Features, a: str, b: str, res: MatchResult, path: Path) -> None:
    """The inliers ``res`` of query images ``a`` and ``b`` drawn side by side."""
    fig = draw_matches(load_image(data.query / a), load_image(data.query / b), feats[a]["keypoints"],
                       feats[b]["keypoints"], res)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def attention_figure(data: DemoDataset, feats: Features, names: list[str], path: Path) -> None:
    """Query images beside their attention maps (scale 1.0) and selected keypoints."""
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.2), squeeze=False)
    for col, name in enumerate(names):
        f = feats[name]
        axes[0, col].imshow(load_image(data.query / name))
        kp = f["keypoints"]
        axes[0, col].scatter(kp[:, 0], kp[:, 1], s=3, c="yellow")
        axes[0, col].set_title(f"{name}\n{len(kp)} keypoints", fontsize=7)
        axes[1, col].imshow(f["attention"].astype("float32"), cmap="inferno")
        axes[1, col].set_title("attention (scale 1.0)", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(expr: str = "demo", preset_name: str = "full", arch: str = "resnet18", seed: int = 0) -> Separation:
    """Every step of the demo (outputs in repo/<expr>/); returns the inlier counts of all query pairs."""
    preset = PRESETS[preset_name]
    root = repo_dir() / expr
    data = build_dataset(root / "data", classes=preset.classes, train_per_class=preset.train_per_class,
                         val_per_class=preset.val_per_class, size=preset.size, query_size=preset.query_size,
                         seed=seed)
    print(f"dataset: {preset.classes} landmarks from scikit-image photos in {data.root}")
    train(expr, data, arch, preset, seed)
    feats = dict(iter_features(extract(expr, data)))
    separation, matches = all_pairs(feats, match_config(preset))
    same = (f"{data.classes[0]}/000.jpg", f"{data.classes[0]}/001.jpg")
    different = separation.worst_different[:2]
    match_figure(data, feats, *same, matches[same], root / "match.png")
    match_figure(data, feats, *different, matches[different], root / "match_different.png")
    attention_figure(data, feats, [f"{c}/000.jpg" for c in data.classes[:4]], root / "attention.png")
    print(f"figures: {root / 'match.png'}, {root / 'match_different.png'} (the different pair with most "
          f"inliers), {root / 'attention.png'}")
    print(f"\n{separation.summary()}")
    return separation
