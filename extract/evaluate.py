"""Retrieval evaluation on Revisited Oxford / Paris: mAP and mP@1/5/10, Easy / Medium / Hard,
exactly as revisitop computes them (extract/metrics.py).

Score a ranking made by any method (revisitop's convention: (database size, queries), 0-based,
best first):

    python extract/evaluate.py --dataset roxford5k --data_root R --ranks ranks.npy --output res.json

or run DeLF end to end: database and cropped-query features (cached in HDF5, resumable), initial
ranking by k-NN descriptor votes, re-ranking of the top --rerank images by RANSAC inliers (each
protocol's junk removed first), then the scores:

    python extract/evaluate.py --dataset roxford5k --data_root R --load_expr delf --output res.json

R holds <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/<name>.jpg, as revisitop distributes them
(extract/revisitop.py). From Python: :func:`evaluate_dataset`, :func:`score_ranking`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from extract.config import EvalConfig, ExtractionConfig, MatchConfig
from extract.extraction import load_extractor
from extract.extractor import add_extraction_args, extraction_from_args
from extract.feature_cache import cache_features, read_all
from extract.features import FeatureFileError
from extract.matcher import add_match_args
from extract.metrics import PROTOCOLS, evaluate, format_table, protocol_gnd
from extract.paths import dataset_features_dir
from extract.pca import PcaError
from extract.retrieval import Database, DescriptorIndex, Verifier, rank, rerank
from extract.revisitop import DATASETS, Dataset, EvalError, check_images, load_dataset, load_ranks
from train.checkpoint import CheckpointError
from train.cli import add_bool_flag, add_config_args, config_from_args

log = logging.getLogger("delf")
Scores = dict[str, dict[str, float]]  # protocol -> {"mAP", "mP@1", "mP@5", "mP@10"}, percent


@dataclass
class Evaluation:
    """Scores of the initial (k-NN vote) ranking and of the final (re-ranked) one; equal when
    nothing is re-ranked."""

    initial: Scores
    final: Scores


def retrieve(ds: Dataset, db_path: Path, query_path: Path, conf: EvalConfig | None = None,
             matching: MatchConfig | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Initial ranks, and re-ranked ranks per protocol, each (database size, queries)."""
    conf = conf or EvalConfig()
    db_feats = read_all(db_path, ds.imlist)
    queries = read_all(query_path, ds.qimlist)
    t = time.perf_counter()
    index = DescriptorIndex([f["descriptors"] for f in db_feats], nlist=conf.nlist)
    db = Database([f["keypoints"] for f in db_feats], index)
    del db_feats
    log.info("index of %d descriptors (%d cells, %.2f GiB) built in %.1f s", len(index.x),
             index.nlist, index.nbytes / 2**30, time.perf_counter() - t)
    scores = db.initial_scores([q["descriptors"] for q in queries], conf.knn, conf.nprobe)
    initial = np.stack([rank(s) for s in scores], axis=1)
    final = {p: initial.copy() for p in PROTOCOLS}
    if conf.rerank > 0:
        gnds = {p: protocol_gnd(ds.gnd, p) for p in PROTOCOLS}
        for qi in tqdm(range(len(queries)), desc="re-ranking", unit="query", dynamic_ncols=True):
            inliers = Verifier(queries[qi], db.features, matching)
            for p in PROTOCOLS:
                final[p][:, qi] = rerank(initial[:, qi], scores[qi], inliers, conf.rerank, gnds[p][qi]["junk"])
    return initial, final


def evaluate_dataset(ds: Dataset, checkpoint: str | Path, features_dir: str | Path, *,
                     pca_path: str | Path | None = None, extraction: ExtractionConfig | None = None,
                     matching: MatchConfig | None = None, conf: EvalConfig | None = None,
                     overwrite: bool = False, device: str | torch.device = "cpu") -> Evaluation:
    """DeLF end to end on ``ds`` (from :func:`extract.revisitop.load_dataset`): features cached
    in ``features_dir`` (extracted with ``checkpoint`` and, when ``extraction.use_pca``, the PCA
    file), k-NN vote ranking, RANSAC re-ranking, revisitop scores."""
    extraction = extraction or ExtractionConfig()
    check_images(ds)
    ex = load_extractor(extraction, checkpoint, pca_path, device)
    db_path, query_path = cache_features(ds, ex, checkpoint, pca_path, features_dir, overwrite)
    initial, final = retrieve(ds, db_path, query_path, conf, matching)
    return Evaluation(evaluate(initial, ds.gnd), evaluate(final, ds.gnd))


def score_ranking(ds: Dataset, ranks_path: str | Path) -> Scores:
    """revisitop scores of a ranking (.npy, database size x queries, 0-based, best first)."""
    return evaluate(load_ranks(ranks_path, ds), ds.gnd)


def write_json(results: Scores, path: Path) -> None:
    """Scores as JSON; NaN (no query with positives) becomes null."""
    clean = {p: {k: (None if math.isnan(v) else round(v, 4)) for k, v in row.items()}
             for p, row in results.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=2) + "\n")


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
    add_bool_flag(p, "--overwrite", default=False,
                  help="extract again, replacing cached features made with other parameters")
    r = p.add_argument_group("ranking and re-ranking")
    add_config_args(r, EvalConfig)
    add_match_args(r)
    add_extraction_args(p.add_argument_group("extraction (as extract/extractor.py)"))
    return p


def run(args: argparse.Namespace) -> Scores:
    """The evaluation the flags describe; prints the score tables, returns the final scores."""
    ds = load_dataset(args.data_root, args.dataset)
    if args.ranks is not None:
        results = score_ranking(ds, args.ranks)
        title = "given ranking"
    else:
        check_images(ds)
        conf = config_from_args(EvalConfig, args)
        extraction, checkpoint, pca_file, device = extraction_from_args(args)
        result = evaluate_dataset(
            ds, checkpoint, args.features_dir or dataset_features_dir(args.load_expr, ds.name), pca_path=pca_file,
            extraction=extraction, matching=config_from_args(MatchConfig, args), conf=conf,
            overwrite=args.overwrite, device=device)
        if conf.rerank > 0:
            print(f"{ds.name}: initial ranking (k-NN votes)\n{format_table(result.initial)}")
        results = result.final
        title = f"DeLF, re-ranking top {conf.rerank}" if conf.rerank > 0 else "DeLF, no re-ranking"
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
