"""DeLF retrieval on Revisited Oxford / Paris as a library call: :func:`evaluate_dataset` (features,
initial ranking, re-ranking, scores) and :func:`score_ranking` (a ranking made by any method).

    from extract.evaluation.revisitop import load_dataset
    from extract.evaluation.evaluate_dataset import evaluate_dataset
    result = evaluate_dataset(load_dataset("data", "roxford5k"), "fix.pth.tar", "features/roxford5k",
                              pca_path="pca.h5", codebook_images="data/rparis6k/jpg")
    print(result.final["medium"]["mAP"])

Scores are revisitop's (extract/evaluation/metrics.py), in percent; rankings follow revisitop's
convention: (database size, queries), 0-based, best first. evaluate.py is the command line.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from extract.config import EvalConfig, ExtractionConfig, MatchConfig
from extract.evaluation.asmk_database import DistractorSet, asmk_codebook, asmk_config, asmk_database
from extract.evaluation.feature_cache import (
    FeatureStore,
    cache_features,
    cache_image_set,
    hold_cache,
    image_set_file,
    read_all,
)
from extract.evaluation.metrics import PROTOCOLS, evaluate, protocol_gnd
from extract.evaluation.revisitop import Dataset, EvalError, check_images, load_ranks
from extract.extraction.extract_features import LazyExtractor
from extract.extraction.feature_file import GLOBAL_KEY, FeatureFileError, file_attrs
from extract.extraction.workshare import WorkShare
from extract.retrieval.asmk.memory_index import AsmkIndex
from extract.retrieval.asmk.stored_index import StoredIndex
from extract.retrieval.faiss_search import faiss_gpu
from extract.retrieval.global_ranking import global_matrix, global_scores
from extract.retrieval.rerank import Verifier, rerank
from extract.retrieval.vote import Database, DescriptorIndex, rank

log = logging.getLogger("delf")

Scores = dict[str, dict[str, float]]  # protocol -> {"mAP", "mP@1", "mP@5", "mP@10"}, percent


# as the papers' tables name them ("+SP" is added to the re-ranked row)
METHOD_NAMES = {"asmk": "ASMK*", "vote": "k-NN votes", "global": "DELG global", "global+sp": "DELG global"}


@dataclass
class Evaluation:
    """Scores of the initial ranking and of the final (re-ranked) one (equal when nothing is
    re-ranked), the size of what was searched, and the rankings: ``initial_ranks`` (database
    size, queries) and ``final_ranks`` per protocol; database image i >= len(imlist) is
    distractor ``distractor_names[i - len(imlist)]`` (names as extract.extraction.images.list_images)."""

    initial: Scores
    final: Scores
    database_size: int = 0
    distractors: int = 0
    index_bytes: int = 0
    initial_ranks: np.ndarray | None = None
    final_ranks: dict[str, np.ndarray] = field(default_factory=dict)
    distractor_names: Sequence[str] = ()


def require_codebook_images(conf: EvalConfig, codebook_images: str | Path | None) -> None:
    """ASMK* needs images to train its codebook on; say so before any work is done."""
    if conf.method == "asmk" and codebook_images is None:
        raise EvalError("--method asmk needs --codebook_images DIR (a folder or list of images to train the "
                        "visual-word codebook on; the published setups use RParis6k's images for ROxford5k and "
                        "vice versa), or use --method vote")


def retrieve(ds: Dataset, store: FeatureStore | None, queries: Sequence[dict[str, np.ndarray]],
             conf: EvalConfig | None = None, matching: MatchConfig | None = None,
             asmk: StoredIndex | AsmkIndex | None = None) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Initial ranks, re-ranked ranks per protocol (each (database size, queries)), and the
    initial ranking's index size (bytes). Database image i is ``store``'s image i (the dataset's
    images first, then distractors); ASMK* ranks with the ``asmk`` index (its images in
    ``store``'s order) and needs ``store`` only to re-rank."""
    conf = conf or EvalConfig()
    t = time.perf_counter()
    database = store.features if store is not None else None  # what re-ranking verifies against
    if conf.method == "asmk":
        if asmk is None:
            raise ValueError("ASMK* ranking needs its index")
        nbytes = asmk.nbytes
        scores = asmk.scores(q["descriptors"] for q in tqdm(queries, desc="ASMK* queries", unit="query",
                                                            dynamic_ncols=True))
    elif store is None:
        raise ValueError(f"--method {conf.method} needs the database's features")
    elif conf.method in ("global", "global+sp"):
        db_global = global_matrix(list(store.global_descriptors()))
        scores = global_scores(db_global, global_matrix([q.get(GLOBAL_KEY) for q in queries], "query"))
        nbytes = db_global.nbytes
        log.info("global descriptors of %d images (%d-d) ranked in %.1f s", len(db_global), db_global.shape[1],
                 time.perf_counter() - t)
    else:
        index = DescriptorIndex(list(store.descriptors()), nlist=conf.nlist)
        db = Database(list(store.arrays("keypoints")), index)
        database = db.features  # the same arrays, already in memory
        nbytes = index.nbytes
        log.info("index of %d descriptors (%d cells) built in %.1f s", len(index.x), index.nlist,
                 time.perf_counter() - t)
        scores = db.initial_scores([q["descriptors"] for q in queries], conf.knn, conf.nprobe)
    initial = np.stack([rank(s) for s in scores], axis=1)
    final = {p: initial.copy() for p in PROTOCOLS}
    if conf.reranks:
        if database is None:
            raise ValueError("re-ranking needs the database's features")
        gnds = {p: protocol_gnd(ds.gnd, p) for p in PROTOCOLS}
        for qi in tqdm(range(len(queries)), desc="re-ranking", unit="query", dynamic_ncols=True):
            inliers = Verifier(queries[qi], database, matching)
            for p in PROTOCOLS:
                final[p][:, qi] = rerank(initial[:, qi], scores[qi], inliers, conf.rerank, gnds[p][qi]["junk"])
    return initial, final, nbytes


def recorded_attrs(path: Path) -> dict[str, Any] | None:
    """The root attributes of the feature file ``path``; None without one (or an unreadable one:
    the cache's own checks then say why)."""
    try:
        return file_attrs(path) if path.is_file() else None
    except FeatureFileError:
        return None


def evaluate_dataset(ds: Dataset, checkpoint: str | Path, features_dir: str | Path, *,
                     pca_path: str | Path | None = None, extraction: ExtractionConfig | None = None,
                     matching: MatchConfig | None = None, conf: EvalConfig | None = None,
                     codebook_images: str | Path | None = None, distractors: str | Path | None = None,
                     codebook_dir: str | Path | None = None, overwrite: bool = False,
                     device: str | torch.device = "cpu", share: WorkShare | None = None) -> Evaluation | None:
    """DeLF end to end on ``ds`` (from :func:`extract.evaluation.revisitop.load_dataset`): features cached
    in ``features_dir`` (extracted with ``checkpoint`` and, when ``extraction.use_pca``, the PCA
    file), initial ranking (``conf.method``), RANSAC re-ranking, revisitop scores.

    ASMK* trains its codebook on ``codebook_images`` (a folder or image list) and keeps it in
    ``codebook_dir`` (default: <features_dir>/../../asmk, i.e. repo/<expr>/asmk). ``distractors``
    (a folder or image list) are added to the database; with ASMK*, each distractor extracted now
    is aggregated into the index as soon as it is extracted. The features of both image sets are
    cached next to ``features_dir`` (<features_dir>/../<set name>.h5), shared by both datasets.
    The model is loaded only when some image has no cached features.

    Under torchrun (``share``: every process calls it, each with its own ``device``) the
    distractors' extraction and the ASMK* index build are shared among the processes; process 0
    alone extracts the dataset's images and the codebook's, trains the codebook, ranks and scores,
    and returns the evaluation; the other processes return None."""
    extraction, conf, share = extraction or ExtractionConfig(), conf or EvalConfig(), share or WorkShare()
    require_codebook_images(conf, codebook_images)
    check_images(ds)
    features_dir = Path(features_dir)
    with hold_cache(features_dir, share=share):  # one evaluation at a time writes (and reads) this cache
        # one extractor for every image set, its model loaded only if one of them has an image to extract
        recorded = share.from_main(lambda: recorded_attrs(features_dir / "db.h5"))   # before process 0 writes it
        ex = LazyExtractor(extraction, checkpoint, pca_path, device, recorded)
        db_path, query_path = share.from_main(
            lambda: cache_features(ds, ex, checkpoint, pca_path, features_dir, overwrite))
        queries = read_all(query_path, ds.qimlist) if share.is_main else []
        extra = None
        if distractors is not None:
            root = features_dir.parent
            extra = DistractorSet(image_set_file(distractors, root),
                                  partial(cache_image_set, distractors, root, ex, checkpoint, pca_path, overwrite))
        parts: list[tuple[Path, Sequence[str]]] = [(db_path, ds.imlist)]
        asmk = None
        if conf.method == "asmk":   # the codebook first: the distractors are aggregated as they are extracted
            assert codebook_images is not None
            folder = Path(codebook_dir) if codebook_dir else features_dir.parent.parent / "asmk"
            path, centroids = share.from_main(lambda: asmk_codebook(
                codebook_images, features_dir.parent, folder, asmk_config(conf), ex, checkpoint, pca_path, overwrite))
            asmk, parts = asmk_database(ds, db_path, centroids, path, asmk_config(conf), extra, overwrite,
                                        gpu=faiss_gpu(ex.device), share=share)
            size = asmk.num_images
        elif extra is not None:
            parts.append(extra.extract(share=share))
        if not share.is_main:
            return None
        distractor_names: Sequence[str] = parts[1][1] if len(parts) > 1 else ()  # in the database's order
        if conf.method == "asmk" and not conf.reranks:   # the database's features are not opened
            initial, final, nbytes = retrieve(ds, None, queries, conf, matching, asmk)
        else:
            with FeatureStore(parts) as store:
                initial, final, nbytes = retrieve(ds, store, queries, conf, matching, asmk)
                size = len(store)
    return Evaluation(evaluate(initial, ds.gnd), evaluate(final, ds.gnd), size, size - len(ds.imlist), nbytes,
                      initial, final, distractor_names)


def score_ranking(ds: Dataset, ranks_path: str | Path) -> Scores:
    """revisitop scores of a ranking (.npy, database size x queries, 0-based, best first)."""
    return evaluate(load_ranks(ranks_path, ds), ds.gnd)


def write_json(results: Scores, path: Path, initial: Scores | None = None,
               config: dict[str, Any] | None = None) -> None:
    """Scores as JSON (the initial ranking's under "initial", the settings that made them under
    "config"); NaN (no query with positives) becomes null."""
    def clean(scores: Scores) -> dict[str, Any]:
        return {p: {k: (None if math.isnan(v) else round(v, 4)) for k, v in row.items()}
                for p, row in scores.items()}

    out = clean(results)
    if initial is not None:
        out["initial"] = clean(initial)
    if config is not None:
        out["config"] = config
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
