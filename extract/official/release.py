"""An official DELF release folder (tensorflow/models research/delf): what it holds, read without
running a TensorFlow op, and which release it is.

A release folder (as unpacked from the official download) holds ``model/`` (a TF1 SavedModel:
``saved_model.pb``, ``variables/variables.{index,data-00000-of-00001}``) and ``pca/``
(``mean.datum``, ``pca_proj_mat.datum``, ``pca_vars.datum``: extract/official/datum.py).

Which release it is: the two releases hold the same network (the same variable names and shapes)
and PCA files of the same shapes (all 1024 components of 1024-D: the 40-D of ``delf_v1_20171026``
and the 128-D of ``delf_gld_20190411`` are set by the official configs, delf_config_example.pbtxt
and detect_to_retrieve/delf_gld_config.pbtxt, not by the files), so no file names the release; its
name does: the folder's, or ``release`` (which may not contradict a folder named after the other
release). The one dated fact the files hold is checked against that name: the TensorFlow version
that wrote ``saved_model.pb`` (its MetaGraphDef's ``tensorflow_version``) cannot be newer than the
TensorFlow of the release's date. :func:`identify` refuses a name that this contradicts while the
other release fits, and says when a graph postdates both (a re-export: the name alone decides).
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.errors import UserError
from extract.official.datum import DatumError, read_datum

FEATURE_DIM = 1024  # block3
PCA_FILES = {"mean.datum": (FEATURE_DIM,), "pca_proj_mat.datum": (FEATURE_DIM, FEATURE_DIM),
             "pca_vars.datum": (FEATURE_DIM,)}
DATA_FILE = "variables.data-00000-of-00001"


class ConversionError(UserError):
    """The source is not a convertible release, or the output may not be written; the message is
    one line naming the file and the reason."""


@dataclass(frozen=True)
class Release:
    """A known official release: its PCA dimension (from its official config), what it is, its
    date, and the newest TensorFlow (major, minor) that could have written its graph then: the
    newest release or release candidate of that date, or the development version of the time."""

    pca_dims: int
    about: str
    published: str
    newest_tf: tuple[int, int]


RELEASES = {
    # 2017-10-26: TensorFlow 1.4.0-rc1 out, nightlies 1.5.0-dev
    "delf_v1_20171026": Release(40, "DELF, ICCV 2017 (Google-Landmarks-clean)", "2017-10-26", (1, 5)),
    # 2019-04-11: TensorFlow 1.13.1 and 2.0.0-alpha0 out, nightlies 1.14 / 2.0
    "delf_gld_20190411": Release(128, "DELF trained on Google Landmarks v1 (Detect-to-Retrieve, CVPR 2019)",
                                 "2019-04-11", (2, 0)),
}


def tensorflow() -> Any:
    """The ``tensorflow`` module; ConversionError saying what to install when it is missing."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no start-up chatter: errors are one line
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # no TensorFlow op runs here; its notice is chatter too
    try:
        import tensorflow as tf
    except ImportError:
        raise ConversionError("reading a TensorFlow release needs TensorFlow: "
                              "pip install -r requirements-convert.txt") from None
    return tf


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def variables_prefix(source: str | Path) -> Path:
    """``<source>/model/variables/variables``, the checkpoint prefix of a release; ConversionError
    when ``source`` does not look like one."""
    source = Path(source)
    prefix = source / "model" / "variables" / "variables"
    for needed in (source / "model" / "saved_model.pb", prefix.with_name("variables.index")):
        if not needed.is_file():
            raise ConversionError(f"{source}: not an official DELF release (no {needed.relative_to(source)}; "
                                  "expected model/saved_model.pb, model/variables/ and pca/)")
    return prefix


def open_variables(source: str | Path) -> Any:
    """TensorFlow's checkpoint reader of a release's variables."""
    prefix = variables_prefix(source)
    tf = tensorflow()
    try:
        return tf.train.load_checkpoint(str(prefix))
    except Exception as e:  # tf.errors.* (DataLossError, NotFoundError, ...)
        raise ConversionError(f"{prefix}.index: unreadable TensorFlow checkpoint ({first_line(e)})") from None


def variable_shapes(reader: Any) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every variable a checkpoint reader holds."""
    return {name: tuple(int(d) for d in shape) for name, shape in reader.get_variable_to_shape_map().items()}


def list_variables(source: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every variable of a release's checkpoint."""
    return variable_shapes(open_variables(source))


def format_variables(shapes: dict[str, tuple[int, ...]]) -> str:
    """One line per variable: name and shape, sorted by name."""
    return "\n".join(f"{name}  {list(shape)}" for name, shape in sorted(shapes.items()))


@dataclass(frozen=True)
class GraphFacts:
    """What ``model/saved_model.pb`` says that the variables cannot: the TensorFlow version that
    wrote it ("" when it does not say), each BatchNorm's epsilons (by the BatchNorm's variable scope,
    e.g. ``resnet_v1_50/conv1/BatchNorm``: a FusedBatchNorm node's ``epsilon``, or the constant that
    TF's unfused batch_normalization adds to the variance, ``.../BatchNorm/batchnorm/add/y``), and
    the ResizeBilinear nodes' (align_corners, half_pixel_centers)."""

    path: Path
    writer: str
    epsilons: dict[str, tuple[float, ...]]
    resize: tuple[tuple[bool, bool], ...]


_UNFUSED_EPSILON = re.compile(r"/BatchNorm/batchnorm(?:_\d+)?/add/y$")
_MODEL_SCOPE = re.compile(r"(?:^|/)(resnet_v1_50|attention_block)(?:_\d+)?(/.*)$")


def batchnorm_scope(node_name: str) -> str | None:
    """The variable scope of the BatchNorm a graph node belongs to (the name up to its last
    ``/BatchNorm``, without outer scopes such as ``while/`` and a re-entry suffix ``_1``), or None."""
    cut = node_name.rfind("/BatchNorm/")
    match = _MODEL_SCOPE.search(node_name[:cut + len("/BatchNorm")]) if cut >= 0 else None
    return None if match is None else match[1] + match[2]


def read_graph(source: str | Path) -> GraphFacts:
    """The :class:`GraphFacts` of a release's ``model/saved_model.pb`` (nodes of every meta graph
    and of their function libraries)."""
    path = Path(source) / "model" / "saved_model.pb"
    tf = tensorflow()
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(path.read_bytes())
    except Exception as e:
        raise ConversionError(f"{path}: not a SavedModel ({first_line(e)})") from None
    nodes = [node for meta in saved.meta_graphs for node in meta.graph_def.node]
    nodes += [node for meta in saved.meta_graphs for fn in meta.graph_def.library.function for node in fn.node_def]
    epsilons: dict[str, set[float]] = {}
    for node in nodes:
        if node.op.startswith("FusedBatchNorm") and not node.op.startswith("FusedBatchNormGrad"):
            value = float(node.attr["epsilon"].f)
        elif node.op == "Const" and _UNFUSED_EPSILON.search(node.name):
            value = float(np.asarray(tf.make_ndarray(node.attr["value"].tensor)).reshape(-1)[0])
        else:
            continue
        scope = batchnorm_scope(node.name)
        if scope is not None:
            epsilons.setdefault(scope, set()).add(round(value, 9))
    resize = sorted({(node.attr["align_corners"].b, node.attr["half_pixel_centers"].b)
                     for node in nodes if node.op == "ResizeBilinear"})
    writers = sorted({meta.meta_info_def.tensorflow_version for meta in saved.meta_graphs})
    return GraphFacts(path, ", ".join(w for w in writers if w), {k: tuple(sorted(v)) for k, v in epsilons.items()},
                      tuple(resize))


def read_pca(source: str | Path) -> dict[str, np.ndarray]:
    """The release's PCA as this project's PCA parameters: ``pca_matrix`` (1024, 1024; rows are
    components), ``pca_mean`` (1024,), ``pca_vars`` (1024,; ones when the release has no
    pca_vars.datum, which only whitening would use)."""
    folder = Path(source) / "pca"
    arrays = {}
    for name, shape in PCA_FILES.items():
        path = folder / name
        if name == "pca_vars.datum" and not path.exists():
            arrays[name] = np.ones(FEATURE_DIM, np.float32)
            continue
        try:
            value = read_datum(path)
        except DatumError as e:
            raise ConversionError(str(e)) from None
        squeezed = value.reshape(shape) if value.size == np.prod(shape) and len(shape) == 1 else value
        if squeezed.shape != shape or not np.isfinite(squeezed).all():
            raise ConversionError(f"{path}: shape {list(value.shape)}, expected {list(shape)} of finite values")
        arrays[name] = squeezed
    return {"pca_matrix": arrays["pca_proj_mat.datum"], "pca_mean": arrays["mean.datum"],
            "pca_vars": arrays["pca_vars.datum"]}


def release_name(source: str | Path, release: str | None = None) -> tuple[str, str]:
    """(the release ``source`` is named as, what names it): ``release`` if given, else the source
    folder's name; ConversionError for an unknown release, or a ``release`` that contradicts a
    folder named after another release."""
    folder = Path(source).resolve().name
    if release is not None and folder in RELEASES and folder != release:
        raise ConversionError(f"{source}: --release {release} contradicts the folder's name {folder}; "
                              "rename the folder to the release it holds")
    name = release or folder
    if name not in RELEASES:
        raise ConversionError(f"{source}: unknown release {name!r}: name it with --release "
                              f"({', '.join(RELEASES)})")
    named_by = "the folder's name" if release is None else (
        "--release and the folder's name" if folder == release else "--release")
    return name, named_by


def _version(text: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text)
    return None if match is None else (int(match[1]), int(match[2]))


@dataclass(frozen=True)
class Identity:
    """Which release a folder is, why, and the evidence: ``verdict`` says what the files say
    about the name; ``warning`` is set when they cast doubt on it without deciding."""

    release: str
    named_by: str
    verdict: str
    warning: str | None
    pca_dims: int
    writer: str
    pca_shapes: dict[str, list[int]]
    global_step: int | None
    variables_sha256: str

    def record(self) -> dict[str, Any]:
        """The identity as plain types (for the checkpoint, loaded with weights_only)."""
        return asdict(self)

    def lines(self) -> list[str]:
        """What the converter prints: the release, why, the evidence."""
        shapes = ", ".join(f"{name} {shape}" for name, shape in self.pca_shapes.items())
        step = "no global_step" if self.global_step is None else f"global_step {self.global_step}"
        return [f"release {self.release} ({RELEASES[self.release].about}), named by {self.named_by}: extraction "
                f"keeps {self.pca_dims} of the PCA's {self.pca_shapes['pca_proj_mat.datum'][0]} components",
                f"why: {self.verdict}",
                f"evidence: graph written by TensorFlow {self.writer or '(not recorded)'}; PCA {shapes}; {step}; "
                f"variables sha256 {self.variables_sha256}"]


def identify(source: str | Path, release: str | None, graph: GraphFacts, pca_shapes: dict[str, list[int]],
             global_step: int | None, variables_sha256: str) -> Identity:
    """The release in ``source`` (see the module docstring): its name (:func:`release_name`)
    checked against the TensorFlow version that wrote its graph. ConversionError when that version
    postdates the named release and another release fits it."""
    name, named_by = release_name(source, release)
    known = RELEASES[name]
    writer = _version(graph.writer)
    warning = None
    if writer is None:
        verdict = (f"{graph.path.name} does not say which TensorFlow wrote it, and the two releases' files have "
                   "the same shapes: identified by its name only")
    elif writer > known.newest_tf:
        fits = [other for other, about in RELEASES.items() if writer <= about.newest_tf]
        if fits:
            raise ConversionError(
                f"{graph.path}: written by TensorFlow {graph.writer}, newer than any TensorFlow of {name}'s date "
                f"({known.published}: {known.newest_tf[0]}.{known.newest_tf[1]} at most), so not {name}; it fits "
                f"{fits[0]} ({RELEASES[fits[0]].published}): name the folder (or --release) after the release it "
                "holds")
        verdict = (f"{graph.path.name} was written by TensorFlow {graph.writer}, after every known release was "
                   "published: not an original download (a re-export, or a test's release): identified by its name "
                   "only")
        warning = (f"{graph.path}: written by TensorFlow {graph.writer}, after {name} was published "
                   f"({known.published}): the PCA dimension ({known.pca_dims}) rests on the name alone")
    else:
        ruled_out = [other for other, about in RELEASES.items() if other != name and writer > about.newest_tf]
        fitting = [other for other in RELEASES if other != name and other not in ruled_out]
        verdict = (f"{graph.path.name} was written by TensorFlow {graph.writer}, which fits {name} "
                   f"({known.published}) and " + (
                       f"postdates {', '.join(ruled_out)}: confirmed" if not fitting else
                       f"fits {', '.join(fitting)} as well (the releases' files have the same shapes): identified "
                       "by its name"))
    return Identity(name, named_by, verdict, warning, known.pca_dims, graph.writer, pca_shapes, global_step,
                    variables_sha256)
