"""Retrieval evaluation on Revisited Oxford / Paris (SPEC §6): mAP and mP@1/5/10, Easy / Medium /
Hard, exactly as revisitop computes them.

Score a ranking made by any method (revisitop's convention: (database size, queries), 0-based,
best first):

    python extract/evaluate.py --dataset roxford5k --data_root R --ranks ranks.npy --output res.json

or run DeLF end to end: database and cropped-query features (cached in HDF5, resumable), initial
ranking by k-NN descriptor votes, re-ranking of the top --rerank images by RANSAC inliers (each
protocol's junk removed first), then the scores:

    python extract/evaluate.py --dataset roxford5k --data_root R --load_expr delf --output res.json

R holds <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/<name>.jpg, as revisitop distributes them.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import math
import pickle
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from extract.extractor import INFORMATIONAL, add_extraction_args, build_extractor, feature_attrs
from extract.features import FeatureFileError, FeatureWriter, iter_features
from extract.images import BadImage, load_image
from extract.matcher import add_verification_args
from extract.metrics import PROTOCOLS, check_ranks, evaluate, format_table, protocol_gnd
from extract.pca import PcaError
from extract.retrieval import Database, DescriptorIndex, Verifier, rank, rerank
from train.checkpoint import CheckpointError
from train.runtime import repo_dir

DATASETS = ("roxford5k", "rparis6k")
log = logging.getLogger("delf")


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


def load_dataset(data_root: Path, name: str) -> Dataset:
    """Read <data_root>/<name>/gnd_<name>.pkl and check it (indices in range, a bbx per query)."""
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


def load_ranks(path: Path, ds: Dataset) -> np.ndarray:
    try:
        ranks = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: cannot read a .npy ranking ({e})") from None
    try:
        return check_ranks(ranks, len(ds.imlist), len(ds.qimlist))
    except ValueError as e:
        raise EvalError(f"{path}: {e}") from None


# --- features ----------------------------------------------------------------------------------
def extract_features(ds: Dataset, args: argparse.Namespace, features_dir: Path) -> tuple[Path, Path]:
    """Database features and features of the queries cropped to their bbx (keypoints in the
    crop's frame), in <features_dir>/db.h5 and query.h5; images already there are skipped."""
    extractor, pca_file = build_extractor(args)
    args.input_path = str(ds.images)
    attrs = feature_attrs(args, extractor, pca_file)
    jobs = {"db": [(n, ds.path(n), None) for n in ds.imlist],
            "query": [(n, ds.path(n), g["bbx"]) for n, g in zip(ds.qimlist, ds.gnd)]}
    paths = {}
    for part, items in jobs.items():
        paths[part] = features_dir / f"{part}.h5"
        try:
            writer = FeatureWriter(paths[part], {**attrs, "crop_to_bbx": part == "query"},
                                   overwrite=args.overwrite, informational=INFORMATIONAL)
        except FeatureFileError as e:
            raise EvalError(f"{e}\n(here: --overwrite extracts again, --features_dir picks another "
                            "cache folder)") from None
        with writer:
            todo = [item for item in items if not writer.has(item[0])]
            for name, path, bbx in tqdm(todo, desc=f"{ds.name} {part} features", unit="img",
                                        dynamic_ncols=True):
                try:
                    image = load_image(path)
                except BadImage as e:
                    raise EvalError(f"{path}: {e}") from None
                if bbx is not None:
                    image = image.crop(tuple(float(v) for v in np.asarray(bbx).ravel()))
                writer.write(name, extractor(image))
    return paths["db"], paths["query"]


def read_all(path: Path, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Features of ``names``, in that order, from one pass over the file."""
    wanted = set(names)
    found = {name: f for name, f in iter_features(path) if name in wanted}
    missing = [n for n in names if n not in found]
    if missing:
        raise EvalError(f"{path}: no features for {len(missing)} images (e.g. {missing[0]!r})")
    return [found[n] for n in names]


# --- retrieval ---------------------------------------------------------------------------------
def retrieve(ds: Dataset, db_path: Path, query_path: Path,
             args: argparse.Namespace) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Initial ranks, and re-ranked ranks per protocol, each (database size, queries)."""
    db_feats = read_all(db_path, ds.imlist)
    queries = read_all(query_path, ds.qimlist)
    t = time.perf_counter()
    index = DescriptorIndex([f["descriptors"] for f in db_feats], nlist=args.nlist)
    db = Database([f["keypoints"] for f in db_feats], index)
    del db_feats
    log.info("index of %d descriptors (%d cells, %.2f GiB) built in %.1f s", len(index.x),
             index.nlist, index.nbytes / 2**30, time.perf_counter() - t)
    scores = db.initial_scores([q["descriptors"] for q in queries], args.knn, args.nprobe)
    initial = np.stack([rank(s) for s in scores], axis=1)
    final = {p: initial.copy() for p in PROTOCOLS}
    if args.rerank > 0:
        gnds = {p: protocol_gnd(ds.gnd, p) for p in PROTOCOLS}
        for qi in tqdm(range(len(queries)), desc="re-ranking", unit="query", dynamic_ncols=True):
            inliers = Verifier(queries[qi], db.features, max_distance=args.max_distance,
                               residual=args.residual, max_iters=args.max_iters)
            for p in PROTOCOLS:
                final[p][:, qi] = rerank(initial[:, qi], scores[qi], inliers, args.rerank,
                                         gnds[p][qi]["junk"])
    return initial, final


# --- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Revisited Oxford/Paris evaluation (mAP, mP@k; E/M/H).")
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--data_root", type=Path, required=True,
                   help="folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/")
    p.add_argument("--ranks", type=Path, help="score this ranking (.npy, database x queries, 0-based)"
                   " instead of running DeLF")
    p.add_argument("--output", type=Path, help="write the scores (percent) as JSON here")
    p.add_argument("--features_dir", type=Path,
                   help="feature cache (default repo/<load_expr>/features/<dataset>)")
    p.add_argument("--overwrite", action="store_true",
                   help="extract again, replacing cached features made with other parameters")
    r = p.add_argument_group("ranking and re-ranking")
    r.add_argument("--knn", type=int, default=10, help="neighbours of each query descriptor that vote")
    r.add_argument("--nlist", type=int, default=0,
                   help="IVF cells (0: exact search up to 262144 descriptors, else ~1 per 1000)")
    r.add_argument("--nprobe", type=int, default=16, help="IVF cells scanned per query descriptor")
    r.add_argument("--rerank", type=int, default=100, help="images re-ranked by RANSAC (0: none)")
    add_verification_args(r)
    add_extraction_args(p.add_argument_group("extraction (as extract/extractor.py)"))
    p.set_defaults(batch_size=1, save_attention=False, workers=0)  # recorded by feature_attrs
    return p


def write_json(results: dict[str, dict[str, float]], path: Path) -> None:
    """Scores as JSON; NaN (no query with positives) becomes null."""
    clean = {p: {k: (None if math.isnan(v) else round(v, 4)) for k, v in row.items()}
             for p, row in results.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    ds = load_dataset(args.data_root, args.dataset)
    if args.ranks is not None:
        results = evaluate(load_ranks(args.ranks, ds), ds.gnd)
    else:
        check_images(ds)
        features_dir = args.features_dir or repo_dir() / args.load_expr / "features" / ds.name
        db_path, query_path = extract_features(ds, args, features_dir)
        initial, final = retrieve(ds, db_path, query_path, args)
        if args.rerank > 0:
            print(f"{ds.name}: initial ranking (k-NN votes)\n{format_table(evaluate(initial, ds.gnd))}")
        results = evaluate(final, ds.gnd)
    title = "given ranking" if args.ranks is not None else \
        f"DeLF, re-ranking top {args.rerank}" if args.rerank > 0 else "DeLF, no re-ranking"
    print(f"{ds.name}: {title}\n{format_table(results)}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate; returns the exit status (1 on an error, printed without a traceback)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        results = run(args)
    except (EvalError, FeatureFileError, CheckpointError, PcaError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.output is not None:
        write_json(results, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
