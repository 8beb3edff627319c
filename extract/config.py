"""Typed configurations of extraction, PCA fitting, matching, evaluation and downloads: each default is written
here once; and the default paths of the models and outputs under repo/.

The CLIs turn these fields into flags of the same name (``train.cli.add_config_args``, help from
the field's metadata) and build the config back (``train.cli.config_from_args``); library code
takes the config. :class:`ExtractionConfig`'s field names are also the feature file's root
attribute names (written with ``dataclasses.asdict``), so what is stored is what was used.

Matching defaults follow the official DeLF ``match_images.py``: putative matches closer than 0.8
(L2, unit descriptors), RANSAC with a 20 px residual and 1000 iterations. The official
``image_reranking.py`` uses 0.9 and 10 px: both are flags. Two choices are this project's (see
extract/matching/verification.py): matches are made one-to-one before RANSAC, and a fitted model that mirrors
the image or scales some direction by more than ``max_scale_change`` (at any of its inliers)
counts 0 inliers.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping

from extract.errors import OptionError
from train.cli import number, positive_int

DEFAULT_SCALES = (0.25, 0.3535, 0.5, 0.7071, 1.0, 1.4142, 2.0)
MODELS = ("affine", "homography")
RESIZES = ("antialias", "tf1")
BOX_CONVENTIONS = ("half_pixel", "official")
DESCRIPTOR_DTYPES = ("float32", "float16")
MIN_IMAGE_SIDE = 32  # px: the shorter side an image needs for features, and the least --max_image_size


def image_side_limit(value: str | int) -> int:
    """argparse type of --max_image_size: 0 (no limit) or at least :data:`MIN_IMAGE_SIDE`."""
    n = number(value, int)
    if n != 0 and n < MIN_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(f"expected 0 (no limit) or at least {MIN_IMAGE_SIDE}, got {value}")
    return n


@dataclass(frozen=True)
class ExtractionConfig:
    """Multi-scale DeLF extraction of one image (see extract/extraction/delf_extractor.py for the conventions)."""

    scale_list: tuple[float, ...] = field(default=DEFAULT_SCALES, metadata={"help": "image pyramid scales"})
    attn_thres: float = field(default=0.31, metadata={"help": "keep cells with attention >= this"})
    iou_thres: float = field(default=0.92, metadata={"help": (
        "NMS IoU threshold on receptive boxes. Neighbouring cells of one scale overlap with IoU (R-S)/(R+S) "
        "for receptive field R and stride S: 0.887 for torchvision's resnet50 layer3 (267, 16), 0.80 for the "
        "official slim layout's block3 (291, 32), 0.79 for DELG's strided layer3 (267, 32); cells of adjacent "
        "scales at most 0.5. So 0.92 removes nothing; 0.85 removes direct neighbours at stride 16 only")})
    top_k: int = field(default=1000, metadata={"help": "features kept per image", "type": positive_int})
    max_image_size: int = field(default=1024, metadata={
        "help": "larger images are first shrunk to this longest side (0: no limit)", "type": image_side_limit})
    resize: str = field(default="antialias", metadata={"choices": RESIZES, "help": (
        "pyramid resize: antialias (bilinear with half-pixel centres, antialiased when shrinking) or tf1 (TF1 "
        "resize_bilinear, the official DELF extractor's: no half-pixel centres, no antialiasing, level sizes "
        "round(side * scale) in float32)")})
    boxes: str = field(default="half_pixel", metadata={"choices": BOX_CONVENTIONS, "help": (
        "receptive boxes and keypoints in original pixels: half_pixel maps them with each level's actual "
        "per-axis size ratio r, x -> (x + 0.5) / r - 0.5; official divides them by the nominal scale (the official "
        "extractor: the centre of cell (i, j) is stride * (i, j) / scale)")})
    use_pca: bool = field(default=True, metadata={"help": "delf: reduce descriptors with the PCA file"})
    pca_dims: int = field(default=40, metadata={"help": "delf: descriptor dimension after PCA"})
    use_whitening: bool = field(default=False, metadata={
        "help": "delf: divide the PCA projections by sqrt(variance) before the final L2 (official DeLF: false)"})
    amp: bool = field(default=False,
                      metadata={"help": "CPU with avx512_bf16/AMX: the network in bf16 (fp32 elsewhere, with a "
                                "warning); GPU: bf16 autocast on Ampere+, fp16 on older GPUs"})
    descriptor_dtype: str = field(default="float32", metadata={"choices": DESCRIPTOR_DTYPES, "help": (
        "how the feature file stores descriptors: float16 halves them (e.g. 1M distractors kept for spatial "
        "verification); readers return float32 either way")})


def with_recorded(conf: ExtractionConfig, recorded: Mapping[str, Any], given: Collection[str] = ()
                  ) -> ExtractionConfig:
    """``conf`` with the extraction settings a checkpoint records (a converted official model's:
    its checkpoint's ``extraction``) in place of the fields not in ``given`` (the flags set on
    the command line, which win)."""
    names = {f.name for f in dataclasses.fields(ExtractionConfig)}
    unknown = sorted(set(recorded) - names)
    if unknown:
        raise OptionError(f"the checkpoint records unknown extraction settings: {', '.join(unknown)}")
    values = {k: tuple(v) if k == "scale_list" else v for k, v in recorded.items() if k not in given}
    return dataclasses.replace(conf, **values)


@dataclass(frozen=True)
class PcaFitConfig:
    """The descriptor sample the PCA is fitted on (field names = flags = PCA file attributes)."""

    pca_max_features: int = field(
        default=100_000, metadata={"help": "pca: uniform random sample of at most this many descriptors is fitted"})
    seed: int = field(default=0, metadata={"help": "pca: seed of the descriptor sampling"})


@dataclass(frozen=True)
class MatchConfig:
    """Putative matching of two feature sets and their RANSAC verification (extract/matching/verification.py)."""

    max_distance: float = field(default=0.8, metadata={"help": "descriptor L2 bound of a putative match"})
    mutual: bool = field(default=False, metadata={"help": "keep mutual nearest neighbours only"})
    ratio: float | None = field(default=None, metadata={"help": "Lowe ratio test threshold (default: none)"})
    model: str = field(default="affine", metadata={"help": "RANSAC model", "choices": MODELS})
    residual: float = field(default=20.0, metadata={"help": "RANSAC residual (px)"})
    max_iters: int = field(default=1000, metadata={"help": "RANSAC iterations"})
    confidence: float = field(default=0.999999, metadata={
        "help": "RANSAC confidence; the default is high enough that --max_iters decides when it stops"})
    max_scale_change: float = field(default=8.0, metadata={
        "help": "a fitted model whose local linear map at some inlier has a singular value outside [1/x, x] "
                "counts 0 inliers, as does a mirroring one (8: the pyramid's 0.25..2.0 range)"})


INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq")
METHODS = ("asmk", "vote", "global", "global+sp")
ASSIGNMENTS = ("auto", "hnsw", "exact")
HAMMING_NORMS = ("asmk", "dim")
# assignment auto: HNSW from HNSW_MIN_WORDS words for descriptors of at most HNSW_MAX_DIM dimensions
# on the CPU, else exact: on large low-dimensional codebooks HNSW is much faster than exact search and
# finds nearly all the nearest words; at 128-D it is neither (figures: docs/benchmarks.md)
HNSW_MIN_WORDS = 8192
HNSW_MAX_DIM = 64


@dataclass(frozen=True)
class IndexConfig:
    """A faiss k-NN index (extract/retrieval/faiss_search.py): how it is built and searched."""

    kind: str = "auto"        # auto: flat up to exact_max rows, else ivf
    nlist: int = 0            # IVF cells; 0: about one per 1000 rows
    nprobe: int = 64          # IVF cells scanned per query (its recall: docs/benchmarks.md)
    pq_m: int = 8             # IVF-PQ: sub-quantisers (bytes per row); must divide the dimension
    exact_max: int = 1 << 18  # auto: exact search up to this many rows
    train_per_cell: int = 64  # IVF training sample: rows per cell
    train_iters: int = 10     # IVF training: k-means iterations
    seed: int = 0


@dataclass(frozen=True)
class AsmkConfig:
    """ASMK* (extract/retrieval/asmk/); the defaults are the reference parameters of the published
    DELF-ASMK*, HOW and FIRe setups: binary residuals, alpha 3, similarity threshold 0, one visual
    word per database descriptor and five per query descriptor, no IDF."""

    codebook_size: int = 65536
    kmeans_iters: int = 10         # as asmk's own codebook training
    seed: int = 0
    alpha: float = 3.0
    similarity_threshold: float = 0.0
    db_assignments: int = 1        # visual words per database descriptor
    query_assignments: int = 5     # visual words per query descriptor
    # word assignment: exact (extract/retrieval/asmk/assignment.py) or approximate (HNSW graph over
    # the centroids, built in memory on one thread: deterministic); auto: see HNSW_MIN_WORDS
    assignment: str = "auto"
    # HNSW: graph links per word (faiss's M), candidate lists when building and per query
    # descriptor (at least m); tuned on tests/bench/bench_retrieval.py (figures: docs/benchmarks.md)
    hnsw_neighbors: int = 48
    hnsw_ef_construction: int = 160
    hnsw_ef_search: int = 32
    # the Hamming similarity s = 1 - 2 h / B of binary residuals: asmk (as the asmk package)
    # divides by B = D rounded up to a multiple of 32 bits; dim by B = D, as the ASMK paper writes
    # it. The same for D = 128 (the published setups), not at 40-D (extract/retrieval/asmk/codebook.py)
    hamming_norm: str = "asmk"


@dataclass(frozen=True)
class EvalConfig:
    """Retrieval on Revisited Oxford / Paris: initial ranking (ASMK*, k-NN votes or DELG global
    descriptors), then RANSAC re-ranking of the shortlist (not for ``global``)."""

    method: str = field(default="asmk", metadata={
        "help": "initial ranking: asmk (ASMK*, needs --codebook_images), vote (k-NN descriptor votes), "
                "global (DELG global descriptors, no re-ranking) or global+sp (global, then re-ranking)",
        "choices": METHODS})
    codebook_size: int = field(default=AsmkConfig.codebook_size,
                               metadata={"help": "asmk: visual words of the codebook"})
    assignment: str = field(default=AsmkConfig.assignment, metadata={
        "help": f"asmk: nearest-word search: exact, hnsw (approximate, faster on large low-dimensional "
                f"codebooks) or auto (hnsw from {HNSW_MIN_WORDS} words of at most {HNSW_MAX_DIM}-D on a CPU, "
                f"else exact)", "choices": ASSIGNMENTS})
    hnsw_ef_search: int = field(default=AsmkConfig.hnsw_ef_search, metadata={
        "help": "asmk: HNSW candidates per descriptor (higher: closer to exact, slower)"})
    hamming_norm: str = field(default=AsmkConfig.hamming_norm, metadata={
        "help": "asmk: Hamming similarity 1 - 2 h / B, B the descriptor dimension rounded up to a multiple of "
                "32 (asmk, as the asmk package) or the dimension (dim, as the ASMK paper); the same at 128-D "
                "(the published setups), at 40-D asmk keeps word pairs up to h = 32, dim up to h = 20",
        "choices": HAMMING_NORMS})
    knn: int = field(default=10, metadata={"help": "vote: neighbours of each query descriptor that vote"})
    nlist: int = field(default=0, metadata={"help": "vote: IVF cells (0: exact search up to 262144 "
                                                    "descriptors, else ~1 per 1000)"})
    nprobe: int = field(default=IndexConfig.nprobe,
                        metadata={"help": "vote: IVF cells scanned per query descriptor"})
    rerank: int = field(default=100, metadata={"help": "images re-ranked by RANSAC (0: none)"})

    @property
    def reranks(self) -> bool:
        """Whether the initial ranking's top is re-ranked (``--method global`` never is)."""
        return self.rerank > 0 and self.method != "global"


@dataclass(frozen=True)
class DownloadConfig:
    """How extract/download.py and extract/reproduce.py fetch the datasets and the official
    releases (extract/downloads/)."""

    keep_archives: bool = field(default=False, metadata={
        "help": "keep each archive after unpacking it (default: deleted once its files are in place and recorded "
                "in the manifest, which is what a rerun checks)"})
    verify: bool = field(default=False, metadata={
        "help": "also check the sha256 of every file the manifest records (sizes are always checked): reads "
                "everything again, hours for revisitop1m"})
    retries: int = field(default=2, metadata={
        "help": "attempts after the first when a connection fails or is cut (an HTTP error or a wrong hash is "
                "not retried)"})
    progress: bool = field(default=True, metadata={"help": "progress bars on stderr (bytes, rate, time left)"})
    base_url: str | None = field(default=None, metadata={
        "help": "fetch every file from <base_url>/<name>/<file name> (a mirror) instead of its authors' servers "
                "(default: $DELF_DOWNLOAD_URL when set)"})


# --- default paths ---------------------------------------------------------------------------------
# Under ``train.runtime.repo_dir()`` ($DELF_REPO_DIR, else <project root>/repo), read at each call:
#     repo/<expr>/keypoint/ckpt/fix.pth.tar    the model (a deliberate copy of bestshot.pth.tar)
#     repo/<expr>/pca/pca.h5                   the PCA file
#     repo/<expr>/features/<input name>.h5     the features of an image folder or list
#     repo/<expr>/features/<dataset>/          evaluate.py's cache (db.h5, query.h5)
#     repo/data/<dataset>/, repo/parameters/<release>/   what download.py fetches
#     repo/reproduce/<setup>/                  reproduce.py's tables
# train/ (torch) is imported inside the functions, so that a script's --help stays light.


def checkpoint_path(load_expr: str, load_from: str | Path | None = None) -> Path:
    """``load_from``, else fix.pth.tar of ``load_expr``, which must exist (the error names the cp
    command that makes it)."""
    from train.checkpoint import CheckpointError  # torch: not imported for --help
    from train.runtime import repo_dir

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
    from train.runtime import repo_dir

    return Path(pca_parameters_path) if pca_parameters_path else repo_dir() / load_expr / "pca" / "pca.h5"


def features_path(load_expr: str, input_path: str | Path, output_path: str | Path | None = None) -> Path:
    """``output_path``, else repo/<load_expr>/features/<input folder name, or list file stem>.h5."""
    from train.runtime import repo_dir

    if output_path:
        return Path(output_path)
    source = Path(input_path).resolve()
    return repo_dir() / load_expr / "features" / f"{source.stem if source.is_file() else source.name}.h5"


def dataset_features_dir(load_expr: str, dataset: str) -> Path:
    """evaluate.py's feature cache of a dataset: repo/<load_expr>/features/<dataset>."""
    from train.runtime import repo_dir

    return repo_dir() / load_expr / "features" / dataset


def part_path(output: Path, rank: int, world_size: int, suffix: str = "") -> Path:
    """The file process ``rank`` of ``world_size`` fills under torchrun, merged into ``output``."""
    return output.with_name(f"{output.name}.part{rank}of{world_size}{suffix}")


def data_root() -> Path:
    """Where download.py puts the datasets by default: repo/data (<dataset>/jpg/, gnd_<dataset>.pkl)."""
    from train.runtime import repo_dir

    return repo_dir() / "data"


def parameters_dir() -> Path:
    """Where download.py puts the official releases by default: repo/parameters/<release>/."""
    from train.runtime import repo_dir

    return repo_dir() / "parameters"


def reproduce_dir() -> Path:
    """Where reproduce.py writes its tables by default: repo/reproduce/<setup>/."""
    from train.runtime import repo_dir

    return repo_dir() / "reproduce"
