"""Match two images from the command line: DeLF features, putative matches, RANSAC inliers.

    python extract/matcher.py IMG1 IMG2 --load_expr E [--output match.png]
    python extract/matcher.py --features FILE.h5 NAME1 NAME2 [--images_root R --output match.png]
    python extract/matcher.py --config configs/match_demo.toml ...   # flag values from a TOML file

Matching and verification are extract/matching/verification.py (defaults in extract/config.py, MatchConfig);
the figure is extract/matching/drawing.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
from typing import Any, Sequence

from extract.config import MatchConfig
from extract.errors import OptionError, UserError
from extract.flags import add_extraction_args, add_match_args, extractor_from_args
from train.cli import ScriptParser, add_bool_flag, add_config_file_arg, config_from_args, parse_args_given


def build_parser() -> argparse.ArgumentParser:
    p = ScriptParser(description="Match two images with DeLF features and RANSAC.")
    p.add_argument("images", nargs=2, metavar="IMG", help="two image paths, or two feature names "
                   "with --features")
    p.add_argument("--features", type=Path, help="HDF5 feature file: IMG1 IMG2 are names in it")
    p.add_argument("--images_root", type=Path,
                   help="with --features: folder the names are relative to (for --output)")
    p.add_argument("--output", type=Path, help="write the match figure (PNG) here")
    add_bool_flag(p, "--show_keypoints", default=False, help="draw all keypoints too")
    add_match_args(p)
    add_extraction_args(p.add_argument_group("extraction (as extract/extractor.py)"))
    add_config_file_arg(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_args_given(build_parser(), argv)


def _load(args: argparse.Namespace) -> tuple[list[dict], list[Any] | None]:
    """Features of the two images, and the images themselves when a figure is asked for."""
    from extract.extraction.feature_file import read_features
    from extract.extraction.images import BadImage, load_image

    if args.features is not None:
        feats = [read_features(args.features, name) for name in args.images]
        if args.output is None:
            return feats, None
        if args.images_root is None:
            raise OptionError("--output with --features needs --images_root (to draw the images)")
        paths = [args.images_root / name for name in args.images]
    else:
        paths = [Path(p) for p in args.images]
    images = []
    for path in paths:
        try:
            images.append(load_image(path))
        except BadImage as e:
            raise UserError(f"{path}: {e}") from None
    if args.features is None:
        extractor = extractor_from_args(args)
        feats = [extractor(img) for img in images]
    return feats, images


def main(argv: Sequence[str] | None = None) -> int:
    """Match two images (or two entries of a feature file); print the inlier count. Returns the
    exit status; expected errors are printed without a traceback."""
    args = parse_args(argv)
    # the flags first, then torch: --help and a bad flag need no torch
    from extract.extraction.feature_file import FeatureFileError
    from extract.extraction.pca import PcaError
    from extract.matching.verification import match_features
    from train.checkpoint import CheckpointError

    try:
        feats, images = _load(args)
    except (FeatureFileError, CheckpointError, PcaError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    res = match_features(feats[0], feats[1], config_from_args(MatchConfig, args))
    for name, f in zip(args.images, feats, strict=True):
        print(f"{name}: {len(f['keypoints'])} features")
    print(f"putative matches: {len(res.matches)}")
    print(f"inliers: {res.num_inliers}")
    if args.output is not None:
        import matplotlib.pyplot as plt

        from extract.matching.drawing import draw_matches

        fig = draw_matches(images[0], images[1], feats[0]["keypoints"], feats[1]["keypoints"], res,
                           show_keypoints=args.show_keypoints)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.output, dpi=100)
        plt.close(fig)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    os.environ["MPLBACKEND"] = "Agg"  # figures go to files (as matplotlib.use("Agg"), without importing it)
    sys.exit(main())
