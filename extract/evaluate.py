"""Retrieval evaluation on Revisited Oxford / Paris: mAP and mP@1/5/10, Easy / Medium / Hard,
exactly as revisitop computes them (extract/metrics.py).

Score a ranking made by any method (revisitop's convention: (database size, queries), 0-based,
best first):

    python extract/evaluate.py --dataset roxford5k --data_root R --ranks ranks.npy --output res.json

or run DeLF end to end: database and cropped-query features (cached in HDF5, resumable), initial
ranking by ASMK* (codebook trained on --codebook_images, e.g. the other dataset's images) or by
k-NN descriptor votes (--method vote), re-ranking of the top --rerank images by RANSAC inliers
(each protocol's junk removed first), then the scores; --distractors adds images to the database.
The ASMK* index is stored beside the codebook (extract/asmk_store.py), built once and reused;
distractors that the evaluation extracts are aggregated into it as they are extracted:

    python extract/evaluate.py --dataset roxford5k --data_root R --load_expr delf \
        --codebook_images R/rparis6k/jpg --output res.json

With a DELG checkpoint, --method global ranks by the global descriptors' inner products and
--method global+sp re-ranks the top of that ranking with the local features:

    python extract/evaluate.py --dataset roxford5k --data_root R --load_from DELG.pth.tar \
        --use_pca false --method global+sp --output res.json

R holds <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/<name>.jpg, as revisitop distributes them
(extract/revisitop.py). --output's JSON holds the scores and the resolved settings ("config");
--figures DIR draws each query's top 10 and the per-query AP (extract/figures.py); --config FILE
reads flags from a TOML file (configs/ holds the published setups). From Python:
:func:`evaluate_dataset`, :func:`score_ranking`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from extract.asmk_index import AsmkIndex, CodebookError, VisualWords, codebook, hamming_bits
from extract.asmk_store import AsmkIndexError, IndexBuild, StoredIndex, fix_hint
from extract.config import AsmkConfig, EvalConfig, ExtractionConfig, MatchConfig
from extract.errors import UserError
from extract.extraction import INFORMATIONAL, load_extractor
from extract.extractor import add_extraction_args, extraction_from_args
from extract.feature_cache import (
    FeatureStore,
    cache_features,
    cache_image_set,
    hold_cache,
    image_set_file,
    read_all,
    set_name,
)
from extract.features import GLOBAL_KEY, FeatureFileError, file_attrs
from extract.figures import make_folder, write_figures
from extract.global_retrieval import global_matrix, global_scores
from extract.images import image_path
from extract.matcher import add_match_args
from extract.metrics import PROTOCOLS, evaluate, format_rows, format_table, protocol_gnd
from extract.paths import dataset_features_dir
from extract.pca import PcaError
from extract.pipeline import DelfExtractor
from extract.retrieval import Database, DescriptorIndex, Verifier, rank, rerank
from extract.revisitop import DATASETS, Dataset, EvalError, check_images, load_dataset, load_ranks
from train.checkpoint import CheckpointError
from train.cli import add_bool_flag, add_config_args, add_config_file_arg, config_from_args, parse_args_given
from train.runtime import repo_dir

log = logging.getLogger("delf")
Scores = dict[str, dict[str, float]]  # protocol -> {"mAP", "mP@1", "mP@5", "mP@10"}, percent


# codebook attributes that codebooks made before they existed lack, and the value they had
CODEBOOK_LEGACY = {"features.descriptor_dtype": "float32", "descriptor_rounding": "none"}
# as the papers' tables name them ("+SP" is added to the re-ranked row)
METHOD_NAMES = {"asmk": "ASMK*", "vote": "k-NN votes", "global": "DELG global", "global+sp": "DELG global"}


@dataclass
class Evaluation:
    """Scores of the initial ranking and of the final (re-ranked) one (equal when nothing is
    re-ranked), the size of what was searched, and the rankings: ``initial_ranks`` (database
    size, queries) and ``final_ranks`` per protocol; database image i >= len(imlist) is
    distractor ``distractor_names[i - len(imlist)]`` (names as extract.images.list_images)."""

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


def asmk_config(conf: EvalConfig, codebook_size: int | None = None) -> AsmkConfig:
    """The ASMK* parameters that ``conf``'s flags set (``codebook_size`` when given, e.g. a stored
    codebook's); the others at their reference values."""
    return AsmkConfig(codebook_size=codebook_size or conf.codebook_size, assignment=conf.assignment,
                      hnsw_ef_search=conf.hnsw_ef_search, hamming_norm=conf.hamming_norm)


def asmk_codebook(codebook_images: str | Path, features_root: Path, codebook_dir: Path, conf: AsmkConfig,
                  ex: DelfExtractor, checkpoint: str | Path, pca_path: str | Path | None,
                  overwrite: bool = False) -> tuple[Path, np.ndarray]:
    """(file, centroids) of the codebook: <codebook_dir>/codebook_<size>_<set name>.h5 when it
    exists and was made from these features, else k-means of every descriptor of
    ``codebook_images`` (extracted by ``ex`` into <features_root>/<set name>.h5, cached), stored
    there."""
    features, names = cache_image_set(codebook_images, features_root, ex, checkpoint, pca_path, overwrite)
    attrs = {f"features.{k}": v for k, v in feature_identity(features).items()}
    path = codebook_dir / f"codebook_{conf.codebook_size}_{set_name(codebook_images)}.h5"

    def descriptors() -> np.ndarray:
        with FeatureStore([(features, names)]) as store:
            x = list(store.descriptors())
        log.info("training a %d-word codebook on %d descriptors of %s", conf.codebook_size,
                 sum(len(d) for d in x), codebook_images)
        return np.concatenate(x)

    # one process trains and writes a codebook
    with hold_cache(path, hint="choose another --load_expr (codebooks are stored under repo/<expr>/asmk/)"):
        return path, codebook(path, descriptors, conf, attrs, CODEBOOK_LEGACY)


def feature_identity(path: Path) -> dict[str, Any]:
    """The attributes of a feature file compared on reuse (those that say how, and from which
    images, its features were made)."""
    return {k: v for k, v in file_attrs(path).items() if k not in (*INFORMATIONAL, "format")}


Reader = Callable[[Sequence[str]], Iterator[np.ndarray]]   # database keys -> their descriptors, in order


@dataclass
class DistractorSet:
    """Distractor images: their feature file, and ``extract`` that completes it and returns (the
    file, the names it holds in list order), with ``existing`` and ``written`` called as
    :func:`extract.feature_cache.cache_image_set` does."""

    path: Path
    extract: Callable[..., tuple[Path, list[str]]]


def database_keys(label: str, names: Sequence[str]) -> list[str]:
    """The index's keys of images ``names`` of the feature file labelled ``label`` (its stem):
    "<label>\t<name>" each."""
    return [f"{label}\t{name}" for name in names]


def names_by_file(keys: Sequence[str], paths: Mapping[str, Path]) -> list[tuple[Path, list[str]]]:
    """The database keys (:func:`database_keys`) grouped by feature file: (file, image names in
    ``keys`` order) per label of ``paths`` (label -> feature file), in ``paths`` order."""
    split = [key.split("\t", 1) for key in keys]
    return [(path, [name for lb, name in split if lb == label]) for label, path in paths.items()]


def feature_reader(paths: Mapping[str, Path]) -> Reader:
    """The reader of the descriptors of database keys (:func:`database_keys`; ``paths``: label ->
    feature file), in the keys' order (those of each label together, labels in ``paths`` order)."""
    def descriptors(todo: Sequence[str]) -> Iterator[np.ndarray]:
        with FeatureStore([(path, names) for path, names in names_by_file(todo, paths) if names]) as store:
            yield from tqdm(store.descriptors(), total=len(store), desc="ASMK* index", unit="img",
                            dynamic_ncols=True)

    return descriptors


def stream_distractors(build: IndexBuild, distractors: DistractorSet, read: Reader) -> tuple[Path, list[str]]:
    """Extract the distractors, each image appended to ``build`` once its features are in the
    file. Those already in the file and not in the index (extracted by another command, or by a
    run killed before its index caught up) are read back (``read``) first, in list order, so that
    the index keeps the list's order. Returns the file and its images in list order."""
    label = distractors.path.stem

    def existing(names: list[str]) -> None:
        build.append_missing(database_keys(label, names), read)

    def written(name: str, arrays: dict[str, np.ndarray]) -> None:
        build.append(*database_keys(label, [name]), arrays["descriptors"])

    return distractors.extract(existing=existing, written=written)


def asmk_database(ds: Dataset, db_path: Path, centroids: np.ndarray, codebook_path: Path, conf: AsmkConfig,
                  distractors: DistractorSet | None = None, overwrite: bool = False
                  ) -> tuple[StoredIndex, list[tuple[Path, list[str]]]]:
    """The stored ASMK* index of the dataset's images (feature file ``db_path``), then the
    ``distractors``, in <codebook's folder>/index_<codebook name>_<database name>/: built when
    missing, completed when a build was killed, grown by new images, else loaded as stored (then
    the database's descriptors are not read); ``overwrite`` builds it afresh. The distractors are
    extracted here, each aggregated as it is extracted (:func:`stream_distractors`); those already
    in their file are read back once. Returns the index and the database's parts (feature file,
    image names) in its image order."""
    paths = {db_path.stem: db_path, **({distractors.path.stem: distractors.path} if distractors else {})}
    folder = codebook_path.parent / ("index_" + "_".join([codebook_path.stem, ds.name, *list(paths)[1:]]))
    if overwrite and folder.exists():
        with hold_cache(folder, hint="choose another --load_expr"):
            shutil.rmtree(folder)
    read = feature_reader(paths)
    parts: list[tuple[Path, Sequence[str]]] = [(db_path, ds.imlist)]
    t = time.perf_counter()
    # the dataset's and the distractors' features are made alike (compared apart when extracted)
    with IndexBuild(folder, VisualWords(centroids, conf), conf, feature_identity(db_path)) as build:
        build.append_missing(database_keys(db_path.stem, ds.imlist), read)   # first: they keep their places
        if distractors is not None:
            parts.append(stream_distractors(build, distractors, read))
        keys = [k for path, names in parts for k in database_keys(path.stem, names)]
        index, order, report = build.finish(keys)
    if order[:len(ds.imlist)] != keys[:len(ds.imlist)]:
        raise AsmkIndexError(f"{folder}: holds the images of {ds.name} in another order; {fix_hint(folder)}")
    log.info("ASMK* index %s: %d images (%d aggregated now, %d stored), %.1f words each on average, %.1f s; "
             "Hamming distances of %d-bit residuals divided by %d (--hamming_norm %s)", folder, index.num_images,
             report.added, report.reused, index.num_entries / max(index.num_images, 1), time.perf_counter() - t,
             index.dim, hamming_bits(index.dim, conf.hamming_norm), conf.hamming_norm)
    return index, names_by_file(order, paths)


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


def evaluate_dataset(ds: Dataset, checkpoint: str | Path, features_dir: str | Path, *,
                     pca_path: str | Path | None = None, extraction: ExtractionConfig | None = None,
                     matching: MatchConfig | None = None, conf: EvalConfig | None = None,
                     codebook_images: str | Path | None = None, distractors: str | Path | None = None,
                     codebook_dir: str | Path | None = None, overwrite: bool = False,
                     device: str | torch.device = "cpu") -> Evaluation:
    """DeLF end to end on ``ds`` (from :func:`extract.revisitop.load_dataset`): features cached
    in ``features_dir`` (extracted with ``checkpoint`` and, when ``extraction.use_pca``, the PCA
    file), initial ranking (``conf.method``), RANSAC re-ranking, revisitop scores.

    ASMK* trains its codebook on ``codebook_images`` (a folder or image list) and keeps it in
    ``codebook_dir`` (default: <features_dir>/../../asmk, i.e. repo/<expr>/asmk). ``distractors``
    (a folder or image list) are added to the database; with ASMK*, each distractor extracted now
    is aggregated into the index as soon as it is extracted. The features of both image sets are
    cached next to ``features_dir`` (<features_dir>/../<set name>.h5), shared by both datasets."""
    extraction, conf = extraction or ExtractionConfig(), conf or EvalConfig()
    require_codebook_images(conf, codebook_images)
    check_images(ds)
    features_dir = Path(features_dir)
    ex = load_extractor(extraction, checkpoint, pca_path, device)   # once, for every image set
    with hold_cache(features_dir):  # one evaluation at a time writes (and reads) this cache
        db_path, query_path = cache_features(ds, ex, checkpoint, pca_path, features_dir, overwrite)
        queries = read_all(query_path, ds.qimlist)
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
            path, centroids = asmk_codebook(codebook_images, features_dir.parent, folder, asmk_config(conf), ex,
                                            checkpoint, pca_path, overwrite)
            asmk, parts = asmk_database(ds, db_path, centroids, path, asmk_config(conf), extra, overwrite)
            size = asmk.num_images
        elif extra is not None:
            parts.append(extra.extract())
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


# --- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Revisited Oxford/Paris evaluation (mAP, mP@k; E/M/H).")
    add_config_file_arg(p)
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--data_root", type=Path, required=True,
                   help="folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/")
    p.add_argument("--ranks", type=Path, help="score this ranking (.npy, database x queries, 0-based)"
                   " instead of running DeLF")
    p.add_argument("--output", type=Path, help="write the scores (percent) and the settings as JSON here")
    p.add_argument("--figures", type=Path, metavar="DIR",
                   help="draw each query's crop and top 10 before and after spatial verification (frames: green "
                        "positive, red negative, grey junk; Medium protocol) and a chart of per-query AP into DIR")
    p.add_argument("--features_dir", type=Path,
                   help="feature cache (default repo/<load_expr>/features/<dataset>)")
    add_bool_flag(p, "--overwrite", default=False,
                  help="extract again, replacing cached features made with other parameters, and rebuild the "
                       "ASMK* index (e.g. a corrupt one)")
    r = p.add_argument_group("ranking and re-ranking")
    add_config_args(r, EvalConfig)
    r.add_argument("--codebook_images", type=Path,
                   help="asmk: image folder or list to train the codebook on (e.g. R/rparis6k/jpg for "
                        "roxford5k); the codebook is kept in repo/<load_expr>/asmk/")
    r.add_argument("--distractors", type=Path,
                   help="image folder or list added to the database (e.g. revisitop's 1M distractors)")
    add_match_args(r)
    add_extraction_args(p.add_argument_group("extraction (as extract/extractor.py)"))
    return p


@dataclass
class Outcome:
    """What one command computed: the final scores, the initial ranking's (None for a given
    ranking), the resolved settings, and the rankings to draw (label -> (database size, queries);
    after re-ranking, the Medium protocol's); database image i >= len(imlist) is distractor
    ``distractor_names[i - len(imlist)]``."""

    final: Scores
    initial: Scores | None
    settings: dict[str, Any]
    rankings: dict[str, np.ndarray]
    distractor_names: Sequence[str] = ()


def run(args: argparse.Namespace) -> None:
    """The evaluation the flags describe: prints the score tables, writes --output (scores and
    the resolved settings) and --figures."""
    ds = load_dataset(args.data_root, args.dataset)
    if args.figures is not None:  # before the work, not after it
        check_images(ds)
        make_folder(args.figures)
    out = score_given(args, ds) if args.ranks is not None else run_delf(args, ds)
    if args.output is not None:
        write_json(out.final, args.output, out.initial, out.settings)
        print(f"wrote {args.output}")
    if args.figures is not None:
        n = len(ds.imlist)

        def database_image(i: int) -> Path:
            return ds.path(ds.imlist[i]) if i < n else image_path(args.distractors, out.distractor_names[i - n])

        written = write_figures(ds, out.rankings, args.figures, database_image)
        print(f"wrote {len(written)} figures to {args.figures}")


def score_given(args: argparse.Namespace, ds: Dataset) -> Outcome:
    """The scores of the --ranks ranking; prints the table."""
    ranks = load_ranks(args.ranks, ds)
    results = evaluate(ranks, ds.gnd)
    print(f"{ds.name}: given ranking\n{format_table(results)}")
    return Outcome(results, None, {"dataset": ds.name, "data_root": args.data_root, "ranks": args.ranks},
                   {"given ranking": ranks})


def run_delf(args: argparse.Namespace, ds: Dataset) -> Outcome:
    """DeLF end to end as the flags describe; prints the tables."""
    conf = config_from_args(EvalConfig, args)
    require_codebook_images(conf, args.codebook_images)
    check_images(ds)
    extraction, checkpoint, pca_file, device = extraction_from_args(args)
    matching = config_from_args(MatchConfig, args)
    features_dir = args.features_dir or dataset_features_dir(args.load_expr, ds.name)
    settings = {"dataset": ds.name, "data_root": args.data_root, "checkpoint": checkpoint, "pca": pca_file,
                "features_dir": features_dir, "codebook_images": args.codebook_images,
                "distractors": args.distractors, "evaluation": asdict(conf), "matching": asdict(matching),
                "extraction": asdict(extraction)}
    result = evaluate_dataset(
        ds, checkpoint, features_dir, pca_path=pca_file, extraction=extraction, matching=matching, conf=conf,
        codebook_images=args.codebook_images, distractors=args.distractors,
        codebook_dir=repo_dir() / args.load_expr / "asmk", overwrite=args.overwrite, device=device)
    assert result.initial_ranks is not None
    name = METHOD_NAMES[conf.method]
    where = ds.name + (f" + {result.distractors} distractors" if result.distractors else "")
    print(f"{where}: {name} index {result.index_bytes / 2**20:.1f} MiB, "
          f"{result.index_bytes / max(result.database_size, 1) / 1e3:.1f} kB per database image")
    rows = {name: result.initial}
    rankings = {name: result.initial_ranks}
    print(f"{where}: {name} (initial ranking)\n{format_table(result.initial)}")
    if conf.reranks:
        rows[f"{name}+SP"] = result.final
        rankings[f"{name}+SP"] = result.final_ranks["medium"]
        print(f"{where}: {name}+SP (spatial verification of the top {conf.rerank})\n"
              f"{format_table(result.final)}")
    print(f"{where}, as the papers' tables (mAP, mP@10):\n{format_rows(rows)}")
    return Outcome(result.final, result.initial, settings, rankings, result.distractor_names)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate; returns the exit status (1 on an error, printed without a traceback)."""
    args = parse_args_given(build_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        run(args)
    except (EvalError, FeatureFileError, CheckpointError, PcaError, CodebookError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
