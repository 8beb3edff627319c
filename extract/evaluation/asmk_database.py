"""The ASMK* side of an evaluation: the codebook trained on an image set, and the stored index of
the dataset's images and the distractors, which are aggregated into it as they are extracted.

Database keys are "<feature file stem>\t<image name>"; the dataset's images come first and keep
their places, the distractors follow in list order.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from extract.config import AsmkConfig, EvalConfig
from extract.evaluation.feature_cache import (
    FeatureStore,
    cache_image_set,
    hold_cache,
    set_name,
)
from extract.evaluation.revisitop import Dataset
from extract.extraction.delf_extractor import DelfExtractor
from extract.extraction.extract_features import INFORMATIONAL
from extract.extraction.feature_file import file_attrs
from extract.extraction.workshare import WorkShare
from extract.retrieval.asmk.codebook import VisualWords, codebook
from extract.retrieval.asmk.kernel import hamming_bits
from extract.retrieval.asmk.stored_index import AsmkIndexError, IndexBuild, StoredIndex, fix_hint
from extract.retrieval.faiss_search import faiss_gpu

log = logging.getLogger("delf")

# codebook attributes that codebooks made before they existed lack, and the value they had
CODEBOOK_LEGACY = {"features.descriptor_dtype": "float32", "descriptor_rounding": "none"}


def asmk_config(conf: EvalConfig, codebook_size: int | None = None) -> AsmkConfig:
    """The ASMK* parameters that ``conf``'s flags set (``codebook_size`` when given, e.g. a stored
    codebook's); the others at their reference values."""
    return AsmkConfig(codebook_size=codebook_size or conf.codebook_size, assignment=conf.assignment,
                      hnsw_ef_search=conf.hnsw_ef_search, hamming_norm=conf.hamming_norm)


def asmk_codebook(codebook_images: str | Path, features_root: str | Path, codebook_dir: str | Path, conf: AsmkConfig,
                  ex: DelfExtractor, checkpoint: str | Path, pca_path: str | Path | None,
                  overwrite: bool = False) -> tuple[Path, np.ndarray]:
    """(file, centroids) of the codebook: <codebook_dir>/codebook_<size>_<set name>.h5 when it
    exists and was made from these features, else k-means of every descriptor of
    ``codebook_images`` (extracted by ``ex`` into <features_root>/<set name>.h5, cached; k-means on
    ``ex``'s GPU with faiss-gpu), stored there."""
    features, names = cache_image_set(codebook_images, features_root, ex, checkpoint, pca_path, overwrite)
    attrs = {f"features.{k}": v for k, v in feature_identity(features).items()}
    path = Path(codebook_dir) / f"codebook_{conf.codebook_size}_{set_name(codebook_images)}.h5"

    def descriptors() -> np.ndarray:
        with FeatureStore([(features, names)]) as store:
            x = list(store.descriptors())
        log.info("training a %d-word codebook on %d descriptors of %s", conf.codebook_size,
                 sum(len(d) for d in x), codebook_images)
        return np.concatenate(x)

    # one process trains and writes a codebook
    with hold_cache(path, hint="choose another --load_expr (codebooks are stored under repo/<expr>/asmk/)"):
        return path, codebook(path, descriptors, conf, attrs, CODEBOOK_LEGACY, gpu=faiss_gpu(ex.device))


def feature_identity(path: Path) -> dict[str, Any]:
    """The attributes of a feature file compared on reuse (those that say how, and from which
    images, its features were made)."""
    return {k: v for k, v in file_attrs(path).items() if k not in (*INFORMATIONAL, "format")}


Reader = Callable[[Sequence[str]], Iterator[np.ndarray]]   # database keys -> their descriptors, in order


@dataclass
class DistractorSet:
    """Distractor images: their feature file, and ``extract`` that completes it and returns (the
    file, the names it holds in list order), with ``existing`` and ``written`` called as
    :func:`extract.evaluation.feature_cache.cache_image_set` does."""

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
    the index keeps the list's order; under torchrun (``build.share``) each process extracts and
    appends its share, and those already in the file are read back once the extraction is done,
    shared among the processes (the parts are merged in list order). Images already in the index
    keep their entries: extracted again (their feature file deleted), they are not appended
    again. Returns the file and its images in list order."""
    label = distractors.path.stem

    def existing(names: list[str]) -> None:
        build.append_missing(database_keys(label, names), read)

    def written(name: str, arrays: dict[str, np.ndarray]) -> None:
        build.append(*database_keys(label, [name]), arrays["descriptors"])

    if not build.share.distributed:
        return distractors.extract(existing=existing, written=written)
    # a process's images already in the file are in its part of the file, not in the file until
    # the extraction merges the parts
    path, names = distractors.extract(written=written, share=build.share)
    build.sync()
    build.append_share(database_keys(label, names), read)
    return path, names


def remove_index(folder: Path) -> None:
    """Delete the index ``folder``, if any, unless another run holds it (EvalError)."""
    if folder.exists():
        with hold_cache(folder, hint="choose another --load_expr"):
            shutil.rmtree(folder)


def asmk_database(ds: Dataset, db_path: Path, centroids: np.ndarray, codebook_path: Path, conf: AsmkConfig,
                  distractors: DistractorSet | None = None, overwrite: bool = False, gpu: int | None = None,
                  share: WorkShare | None = None) -> tuple[StoredIndex, list[tuple[Path, list[str]]]]:
    """The stored ASMK* index of the dataset's images (feature file ``db_path``), then the
    ``distractors``, in <codebook's folder>/index_<codebook name>_<database name>/: built when
    missing, completed when a build was killed, grown by new images, else loaded as stored (then
    the database's descriptors are not read); ``overwrite`` builds it afresh; words assigned on
    faiss's GPU ``gpu`` (the run's, :func:`~extract.retrieval.faiss_search.faiss_gpu`). The distractors are
    extracted here, each aggregated as it is extracted (:func:`stream_distractors`); those already
    in their file are read back once. Under torchrun (``share``: every process calls it) the
    processes share the images (:class:`~extract.retrieval.asmk.stored_index.IndexBuild`), process 0
    writes the inverted file, and every process gets the index. Returns the index and the
    database's parts (feature file, image names) in its image order."""
    paths = {db_path.stem: db_path, **({distractors.path.stem: distractors.path} if distractors else {})}
    folder = codebook_path.parent / ("index_" + "_".join([codebook_path.stem, ds.name, *list(paths)[1:]]))
    share = share or WorkShare()
    if overwrite:
        share.from_main(lambda: remove_index(folder))
    read = feature_reader(paths)
    parts: list[tuple[Path, Sequence[str]]] = [(db_path, ds.imlist)]
    t = time.perf_counter()
    # the dataset's and the distractors' features are made alike (compared apart when extracted)
    with IndexBuild(folder, VisualWords(centroids, conf, gpu), conf, feature_identity(db_path), share=share) as build:
        build.append_share(database_keys(db_path.stem, ds.imlist), read)   # first: they keep their places
        if distractors is not None:
            parts.append(stream_distractors(build, distractors, read))
        keys = [k for path, names in parts for k in database_keys(path.stem, names)]
        index, order, report = build.finish(keys)
    if order[:len(ds.imlist)] != keys[:len(ds.imlist)]:
        raise AsmkIndexError(f"{folder}: holds the images of {ds.name} in another order; {fix_hint(folder)}")
    if report.repeated:
        log.info("ASMK* index %s: %d images extracted again were in it already: their stored entries are kept",
                 folder, report.repeated)
    log.info("ASMK* index %s: %d images (%d aggregated now, %d stored), %.1f words each on average, %.1f s; "
             "Hamming distances of %d-bit residuals divided by %d (--hamming_norm %s)", folder, index.num_images,
             report.added, report.reused, index.num_entries / max(index.num_images, 1), time.perf_counter() - t,
             index.dim, hamming_bits(index.dim, conf.hamming_norm), conf.hamming_norm)
    return index, names_by_file(order, paths)
