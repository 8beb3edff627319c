"""`make demo`: the whole DeLF pipeline on embedded data, on a CPU, in minutes.

Builds a landmark dataset from scikit-image's bundled photos (extract/make_demo/landmarks.py), trains the
finetune and keypoint stages from scratch with the project's own CLI, copies bestshot.pth.tar to
fix.pth.tar, fits PCA, extracts query features to HDF5, then matches every pair of query images
and prints the inlier counts of same-landmark and different-landmark pairs (median, worst case),
ending with whether every same-landmark pair has more inliers than every different-landmark pair.
Steps whose outputs exist are skipped (`make demo-clean` starts over).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

from extract.make_demo.presets import PRESETS
from train.cli import ScriptParser
from train.config import ARCHS


def build_parser() -> argparse.ArgumentParser:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expr", default="demo", help="experiment name: outputs in repo/<expr>/")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full",
                        help="'smoke' is a seconds-long run of the same steps (used by the tests)")
    parser.add_argument("--arch", default="resnet18", choices=ARCHS, help="backbone (default resnet18: fast on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit status 0 (the separation is printed, not judged: see docs/matching.md)."""
    args = parse_args(argv)
    import matplotlib  # the flags first, then the heavy stack: --help needs none of it

    matplotlib.use("Agg")
    from extract.make_demo.run import run_demo

    run_demo(args.expr, args.preset, args.arch, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
