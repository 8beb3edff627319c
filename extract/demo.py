"""`make demo`: the whole DeLF pipeline on embedded data, on a CPU, in minutes.

Builds a landmark dataset from scikit-image's bundled photos (extract/demo_data.py), trains the
finetune and keypoint stages from scratch with the project's own CLI, copies bestshot.pth.tar to
fix.pth.tar, fits PCA, extracts query features to HDF5, then matches a same-landmark pair and a
different-landmark pair. Steps whose outputs exist are skipped (`make demo-clean` starts over).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from extract.demo_data import DemoDataset, build_dataset
from extract.drawing import draw_matches
from extract.features import read_features
from extract.images import load_image
from extract.matching import MatchResult, match_features
from train.runtime import PROJECT_ROOT, repo_dir


@dataclass(frozen=True)
class Preset:
    """Dataset size and training length of a demo run."""

    classes: int
    train_per_class: int
    val_per_class: int
    size: int  # training images, px
    query_size: int
    finetune_epochs: int
    keypoint_epochs: int


PRESETS = {
    "full": Preset(6, 24, 6, 112, 320, finetune_epochs=6, keypoint_epochs=4),
    "smoke": Preset(3, 4, 1, 64, 160, finetune_epochs=1, keypoint_epochs=1),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expr", default="demo", help="experiment name: outputs in repo/<expr>/")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full",
                        help="'smoke' is a seconds-long run of the same steps (used by the tests)")
    parser.add_argument("--arch", default="resnet18", help="backbone (default resnet18: fast on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


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


def extract(expr: str, data: DemoDataset) -> Path:
    """PCA on the training images, then DeLF features of the query images."""
    pca = repo_dir() / expr / "pca" / "pca.h5"
    if not pca.exists():
        run("extract/extractor.py", "--load_expr", expr, "--mode", "pca", "--stage", "inference",
            "--input_path", data.train, "--output_path", pca)
    features = repo_dir() / expr / "features" / "query.h5"
    run("extract/extractor.py", "--load_expr", expr, "--mode", "delf", "--stage", "inference",
        "--input_path", data.query, "--pca_parameters_path", pca, "--output_path", features,
        "--save_attention", "true")
    return features


def match_pair(features: Path, data: DemoDataset, a: tuple[str, int], b: tuple[str, int],
               figure: Path | None = None) -> MatchResult:
    names = [f"{cls}/{i:03d}.jpg" for cls, i in (a, b)]
    f1, f2 = (read_features(features, n) for n in names)
    result = match_features(f1, f2)
    print(f"{names[0]} <-> {names[1]}: {len(result.matches)} putative matches, {result.num_inliers} inliers")
    if figure is not None:
        images = [load_image(data.query_image(*x)) for x in (a, b)]
        fig = draw_matches(images[0], images[1], f1["keypoints"], f2["keypoints"], result)
        fig.savefig(figure, dpi=100, bbox_inches="tight")
        plt.close(fig)
    return result


def attention_figure(features: Path, data: DemoDataset, names: list[str], path: Path) -> None:
    """Query images beside their attention maps (scale 1.0) and selected keypoints."""
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.2), squeeze=False)
    for col, name in enumerate(names):
        f = read_features(features, name)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    root = repo_dir() / args.expr
    data = build_dataset(root / "data", classes=preset.classes, train_per_class=preset.train_per_class,
                         val_per_class=preset.val_per_class, size=preset.size, query_size=preset.query_size,
                         seed=args.seed)
    print(f"dataset: {preset.classes} landmarks from scikit-image photos in {data.root}")
    train(args.expr, data, args.arch, preset, args.seed)
    features = extract(args.expr, data)

    same, other = data.classes[0], data.classes[1]
    match_png, attention_png = root / "match.png", root / "attention.png"
    same_pair = match_pair(features, data, (same, 0), (same, 1), figure=match_png)
    diff_pair = match_pair(features, data, (same, 0), (other, 1), figure=root / "match_different.png")
    attention_figure(features, data, [f"{c}/000.jpg" for c in data.classes[:4]], attention_png)
    print(f"\nsame landmark:      {same_pair.num_inliers} inliers")
    print(f"different landmark: {diff_pair.num_inliers} inliers")
    print(f"figures: {match_png}, {attention_png}")
    if same_pair.num_inliers <= diff_pair.num_inliers:
        print("warning: the same-landmark pair did not get more inliers than the different pair")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
