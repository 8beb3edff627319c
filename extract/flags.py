"""Flag groups shared by the scripts: the model and extraction flags (extractor.py, matcher.py,
evaluate.py) and the matching flags (matcher.py, evaluate.py), with their resolution into configs,
files and a device. Same names and defaults in every script. Adding the flags imports no torch (a
script's --help stays light); resolving them does."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from extract.config import ExtractionConfig, MatchConfig, checkpoint_path, pca_path, with_recorded
from train.cli import add_config_args, config_from_args

if TYPE_CHECKING:
    import torch

    from extract.extraction.delf_extractor import DelfExtractor


def add_extraction_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The model and feature flags, shared with matcher.py and evaluate.py (same names, defaults)."""
    p.add_argument("--load_expr", default="delf", help="experiment under repo/ whose fix.pth.tar is used")
    p.add_argument("--load_from", help="checkpoint to use instead of repo/<load_expr>/keypoint/ckpt/fix.pth.tar")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--pca_parameters_path", help="the PCA file (default repo/<load_expr>/pca/pca.h5)")
    add_config_args(p, ExtractionConfig)


def model_files(args: argparse.Namespace) -> tuple[ExtractionConfig, Path, Path | None]:
    """(config, checkpoint, PCA file or None when not ``use_pca``) of add_extraction_args' flags
    (fix.pth.tar rule). The settings a checkpoint records (a converted official model's) replace
    the defaults of the flags not given (``args.given_flags``, see train.cli.parse_args_given)."""
    from train.checkpoint import load_file

    checkpoint = checkpoint_path(args.load_expr, args.load_from)
    recorded = load_file(checkpoint).get("extraction") or {}
    conf = with_recorded(config_from_args(ExtractionConfig, args), recorded, getattr(args, "given_flags", ()))
    return conf, checkpoint, pca_path(args.load_expr, args.pca_parameters_path) if conf.use_pca else None


def extraction_from_args(args: argparse.Namespace) -> tuple[ExtractionConfig, Path, Path | None, torch.device]:
    """(config, checkpoint, PCA file or None, device) that add_extraction_args' flags describe,
    resolved as extractor.py resolves them (fix.pth.tar rule); for matcher.py and evaluate.py."""
    from train.runtime import setup_runtime

    return *model_files(args), setup_runtime(args.device).device


def extractor_from_args(args: argparse.Namespace) -> DelfExtractor:
    """The extractor of :func:`extraction_from_args` (PCA/checkpoint sha256 checked)."""
    from extract.extraction.extract_features import load_extractor

    return load_extractor(*extraction_from_args(args))


def add_match_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Putative-match and RANSAC flags (MatchConfig's fields), shared with evaluate.py."""
    add_config_args(p, MatchConfig)
