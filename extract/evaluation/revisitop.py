"""Revisited Oxford / Paris as revisitop distributes them: the ground-truth pickle, the image
folder and rankings to score.

    <data_root>/<dataset>/gnd_<dataset>.pkl    imlist, qimlist, gnd (per query: bbx, easy, hard, junk)
    <data_root>/<dataset>/jpg/<name>.jpg

A ranking is revisitop's (database size, queries) array of 0-based database indices, best first.
The pickle is revisitop's own file format; pass only the official files (or ones you made).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.errors import InputMismatch
from extract.evaluation.metrics import check_ranks

DATASETS = ("roxford5k", "rparis6k")


class EvalError(RuntimeError):
    """Missing or malformed dataset files, rankings or features; the message says which."""


@dataclass
class Dataset:
    """A revisitop dataset: database and query names, per-query ground truth, image folder."""

    name: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]
    images: Path

    def path(self, name: str) -> Path:
        return self.images / f"{name}.jpg"


def load_dataset(data_root: str | Path, name: str) -> Dataset:
    """Read <data_root>/<name>/gnd_<name>.pkl and check it (indices in range, a bbx per query)."""
    data_root = Path(data_root)
    pkl = data_root / name / f"gnd_{name}.pkl"
    layout = f"expected the revisitop layout: {data_root}/{name}/gnd_{name}.pkl and {name}/jpg/"
    if not pkl.is_file():
        raise EvalError(f"{pkl}: no such file ({layout})")
    try:
        with open(pkl, "rb") as f:
            cfg = pickle.load(f)
        imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    except Exception as e:
        raise EvalError(f"{pkl}: not a revisitop ground-truth file ({type(e).__name__}: {e})") from None
    if len(gnd) != len(qimlist):
        raise EvalError(f"{pkl}: {len(gnd)} ground-truth entries for {len(qimlist)} queries")
    for i, g in enumerate(gnd):
        missing = {"bbx", "easy", "hard", "junk"} - set(g)
        if missing:
            raise EvalError(f"{pkl}: query {i} lacks {sorted(missing)}")
        ids = np.concatenate([np.asarray(g[k], dtype=np.int64).ravel() for k in ("easy", "hard", "junk")])
        if ids.size and (ids.min() < 0 or ids.max() >= len(imlist)):
            raise EvalError(f"{pkl}: query {i} has database indices outside 0..{len(imlist) - 1}")
        if np.asarray(g["bbx"]).size != 4:
            raise EvalError(f"{pkl}: query {i} bbx is not [x1, y1, x2, y2]")
    return Dataset(name, imlist, qimlist, gnd, data_root / name / "jpg")


def check_images(ds: Dataset) -> None:
    """Every database and query image must exist; name the missing ones."""
    names = list(dict.fromkeys(ds.imlist + ds.qimlist))
    missing = [n for n in names if not ds.path(n).is_file()]
    if missing:
        shown = ", ".join(str(ds.path(n)) for n in missing[:3])
        raise EvalError(f"{len(missing)} of {len(names)} images missing under {ds.images} "
                        f"(e.g. {shown}{', ...' if len(missing) > 3 else ''})")


def load_ranks(path: str | Path, ds: Dataset) -> np.ndarray:
    """A ranking of ``ds`` from a .npy file, checked (shape, indices in range)."""
    try:
        ranks = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: cannot read a .npy ranking ({e})") from None
    try:
        return check_ranks(ranks, len(ds.imlist), len(ds.qimlist))
    except InputMismatch as e:
        raise EvalError(f"{path}: {e}") from None
