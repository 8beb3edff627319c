"""Where the extraction's inputs and outputs live by default, under ``train.runtime.repo_dir()``
(``$DELF_REPO_DIR``, else ``<project root>/repo``), read at each call.

    repo/<expr>/keypoint/ckpt/fix.pth.tar    the model (a deliberate copy of bestshot.pth.tar)
    repo/<expr>/pca/pca.h5                   the PCA file
    repo/<expr>/features/<input name>.h5     the features of an image folder or list
    repo/<expr>/features/<dataset>/          evaluate.py's cache (db.h5, query.h5)
"""
from __future__ import annotations

from pathlib import Path

from train.checkpoint import CheckpointError
from train.runtime import repo_dir


def checkpoint_path(load_expr: str, load_from: str | Path | None = None) -> Path:
    """``load_from``, else fix.pth.tar of ``load_expr``, which must exist (the error names the cp
    command that makes it)."""
    if load_from:
        return Path(load_from)
    fix = repo_dir() / load_expr / "keypoint" / "ckpt" / "fix.pth.tar"
    if not fix.is_file():
        best = fix.with_name("bestshot.pth.tar")
        missing = "" if best.is_file() else f"\n({best} does not exist yet either: train the keypoint stage first.)"
        raise CheckpointError(
            f"{fix} not found.\nExtraction uses fix.pth.tar, a deliberate copy of the keypoint-stage checkpoint, "
            f"so that the model cannot change after the PCA was fitted. Make it with:\n  cp {best} {fix}{missing}")
    return fix


def pca_path(load_expr: str, pca_parameters_path: str | Path | None = None) -> Path:
    """``pca_parameters_path``, else repo/<load_expr>/pca/pca.h5."""
    return Path(pca_parameters_path) if pca_parameters_path else repo_dir() / load_expr / "pca" / "pca.h5"


def features_path(load_expr: str, input_path: str | Path, output_path: str | Path | None = None) -> Path:
    """``output_path``, else repo/<load_expr>/features/<input folder name, or list file stem>.h5."""
    if output_path:
        return Path(output_path)
    source = Path(input_path).resolve()
    return repo_dir() / load_expr / "features" / f"{source.stem if source.is_file() else source.name}.h5"


def dataset_features_dir(load_expr: str, dataset: str) -> Path:
    """evaluate.py's feature cache of a dataset: repo/<load_expr>/features/<dataset>."""
    return repo_dir() / load_expr / "features" / dataset


def part_path(output: Path, rank: int, world_size: int, suffix: str = "") -> Path:
    """The file process ``rank`` of ``world_size`` fills under torchrun, merged into ``output``."""
    return output.with_name(f"{output.name}.part{rank}of{world_size}{suffix}")
