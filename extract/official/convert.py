"""Converting the official DELF releases (tensorflow/models research/delf) into this project's files.

A release folder (as unpacked from the official download) holds ``model/`` (a TF1 SavedModel:
``saved_model.pb``, ``variables/variables.{index,data-00000-of-00001}``) and ``pca/``
(``mean.datum``, ``pca_proj_mat.datum``, ``pca_vars.datum``: extract/official/datum.py). The network is
TF-slim's ``resnet_v1_50`` up to block3 and DELF's attention block
(``attention_block/attention/compute/{conv1 (1x1, BatchNorm, ReLU), conv2 (1x1, bias)}``, then
softplus); it becomes a :class:`train.delf.Delf` with ``layout="slim"``, ``input_norm="tf"``.

:func:`convert_release` writes ``<repo>/<expr>/keypoint/ckpt/fix.pth.tar`` (an ordinary checkpoint
of this project, with ``source`` and ``extraction``: the official extraction settings, which
extraction then uses unless a flag says otherwise) and ``<repo>/<expr>/pca/pca.h5``. TensorFlow
is needed only here, to read the variables (``pip install -r requirements-convert.txt``); no
TensorFlow op is run.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.errors import UserError
from extract.extraction.pca import save_pca
from extract.official.datum import DatumError, read_datum
from train.checkpoint import checkpoint_dict
from train.delf import Delf
from train.outputs import atomic_path, file_sha256
from train.runtime import repo_dir

SLIM_SCOPE = "resnet_v1_50"
ATTENTION_SCOPE = "attention_block/attention/compute"
FEATURE_DIM = 1024  # block3
# the official configs' (delf_config_example.pbtxt, detect_to_retrieve/delf_gld_config.pbtxt)
# extraction settings; pca_dims per release. No image-size limit: the configs set none.
OFFICIAL_EXTRACTION = {"scale_list": (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0), "attn_thres": 100.0,
                       "iou_thres": 1.0, "top_k": 1000, "max_image_size": 0, "use_pca": True,
                       "use_whitening": False, "resize": "tf1", "boxes": "official"}
TF_BATCHNORM_EPS = 1e-5  # slim's resnet_arg_scope default, and PyTorch's


@dataclass(frozen=True)
class Release:
    """A known official release: its PCA dimension and what it is."""

    pca_dims: int
    about: str


RELEASES = {
    "delf_v1_20171026": Release(40, "DELF, ICCV 2017 (Google-Landmarks-clean)"),
    "delf_gld_20190411": Release(128, "DELF trained on Google Landmarks v1 (Detect-to-Retrieve, CVPR 2019)"),
}


class ConversionError(UserError):
    """The source is not a convertible release, or the output may not be written; the message is
    one line naming the file and the reason."""


class UnknownModel(ConversionError):
    """The release's variables are not DELF v1's; ``variables`` (name -> shape) lists them."""

    def __init__(self, message: str, variables: dict[str, tuple[int, ...]]) -> None:
        super().__init__(message)
        self.variables = variables


@dataclass(frozen=True)
class Converted:
    """What :func:`convert_release` wrote, and the release's variables it left out."""

    checkpoint: Path
    pca: Path
    unused: list[str]


def _tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no start-up chatter: errors are one line
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # no TensorFlow op runs here; its notice is chatter too
    try:
        import tensorflow as tf
    except ImportError:
        raise ConversionError("reading a TensorFlow release needs TensorFlow: "
                              "pip install -r requirements-convert.txt") from None
    return tf


def _first_line(error: Exception) -> str:
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


def _reader(source: str | Path) -> Any:
    """TensorFlow's checkpoint reader of a release's variables."""
    prefix = variables_prefix(source)
    tf = _tensorflow()
    try:
        return tf.train.load_checkpoint(str(prefix))
    except Exception as e:  # tf.errors.* (DataLossError, NotFoundError, ...)
        raise ConversionError(f"{prefix}.index: unreadable TensorFlow checkpoint ({_first_line(e)})") from None


def _shapes(reader: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(d) for d in shape) for name, shape in reader.get_variable_to_shape_map().items()}


def list_variables(source: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every variable of a release's checkpoint."""
    return _shapes(_reader(source))


def format_variables(shapes: dict[str, tuple[int, ...]]) -> str:
    """One line per variable: name and shape, sorted by name."""
    return "\n".join(f"{name}  {list(shape)}" for name, shape in sorted(shapes.items()))


def tf_name(key: str) -> str | None:
    """The release's variable for a :class:`Delf` (slim layout, block3) state_dict key, or None
    for keys with no TF counterpart (BatchNorm's step counter, the classifier, the attention
    conv1's bias, which slim does not have before a BatchNorm)."""
    module, _, param = key.rpartition(".")
    parts = module.split(".")
    if param == "num_batches_tracked" or parts[0] == "logits":
        return None
    bn = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
    conv = {"weight": "weights", "bias": "biases"}
    if parts[0] == "attn":
        names = {"conv1": ("conv1", conv), "bn": ("conv1/BatchNorm", bn), "conv2": ("conv2", conv)}
        scope, table = names[parts[1]]
        if key == "attn.conv1.bias":
            return None
        return f"{ATTENTION_SCOPE}/{scope}/{table[param]}"
    if parts[0] != "base":
        return None
    index = int(parts[1])
    if index in (0, 1):  # conv1, bn1
        return f"{SLIM_SCOPE}/conv1/" + (conv[param] if index == 0 else f"BatchNorm/{bn[param]}")
    block, unit = index - 3, int(parts[2]) + 1  # base.4 = layer1 = block1
    scope = f"{SLIM_SCOPE}/block{block}/unit_{unit}/bottleneck_v1"
    if parts[3] == "downsample":
        return f"{scope}/shortcut/" + (conv[param] if parts[4] == "0" else f"BatchNorm/{bn[param]}")
    layer = parts[3]
    if layer.startswith("conv"):
        return f"{scope}/{layer}/{conv[param]}"
    return f"{scope}/conv{layer[2:]}/BatchNorm/{bn[param]}"


def _as_torch(name: str, value: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A TF variable as the PyTorch parameter ``like``: conv kernels HWIO -> OIHW."""
    tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if tensor.ndim == 4:
        tensor = tensor.permute(3, 2, 0, 1).contiguous()
    if tensor.shape != like.shape:
        raise ConversionError(f"variable {name} has shape {list(value.shape)}, expected one that gives "
                              f"{list(like.shape)}")
    return tensor


def new_model() -> Delf:
    """The network of the official releases: slim resnet_v1_50 to block3 + DELF's attention,
    with the official attention pooling (mean); the classifier is a placeholder (1 class)."""
    return Delf(1, arch="resnet50", stage="keypoint", target_layer="layer3", layout="slim", input_norm="tf",
                attention_pool="mean").eval()


def convert_variables(source: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The :func:`new_model` state_dict from a release's variables, and the release's variables
    that it does not use (global_step, optimiser slots, the training classifier). A variable the
    model needs and the release lacks is a ConversionError listing them."""
    reader = _reader(source)
    shapes = _shapes(reader)
    model = new_model()
    state = model.state_dict()
    wanted = {key: tf_name(key) for key in state}
    missing = sorted(name for name in wanted.values() if name is not None and name not in shapes)
    if missing:
        known = any(name.startswith(f"{SLIM_SCOPE}/") for name in shapes)
        what = ("is missing variables" if known else
                "is not a DELF v1 release (TF-slim resnet_v1_50 + attention_block): DELG and other TF2 models are "
                "not supported")
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        message = f"{variables_prefix(source)}: {what} ({len(missing)} missing: {shown})"
        if known:
            raise ConversionError(message)
        raise UnknownModel(message, shapes)
    prefix = variables_prefix(source)
    converted: dict[str, torch.Tensor] = {}
    for key, like in state.items():
        name = wanted[key]
        if name is None:
            converted[key] = torch.zeros_like(like)  # step counters, the attention conv1 bias, the classifier
            continue
        try:
            value = reader.get_tensor(name)
        except Exception as e:  # a truncated or corrupt data file
            raise ConversionError(f"{prefix}.data-00000-of-00001: cannot read {name} ({_first_line(e)})") from None
        converted[key] = _as_torch(name, value, like)
    used = {name for name in wanted.values() if name is not None}
    return converted, sorted(set(shapes) - used)


def graph_facts(source: str | Path) -> dict[str, Any]:
    """What the release's graph (``model/saved_model.pb``) says about the two settings the
    variables cannot: the BatchNorm epsilons and the pyramid's ``ResizeBilinear`` attributes.
    ConversionError when they differ from what this project computes."""
    path = Path(source) / "model" / "saved_model.pb"
    _tensorflow()
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(path.read_bytes())
    except Exception as e:
        raise ConversionError(f"{path}: not a SavedModel ({_first_line(e)})") from None
    nodes = [node for meta in saved.meta_graphs for node in meta.graph_def.node]
    nodes += [node for meta in saved.meta_graphs for fn in meta.graph_def.library.function for node in fn.node_def]
    eps = sorted({round(float(n.attr["epsilon"].f), 9) for n in nodes if n.op.startswith("FusedBatchNorm")})
    resize = sorted({(n.attr["align_corners"].b, n.attr["half_pixel_centers"].b)
                     for n in nodes if n.op == "ResizeBilinear"})
    if any(abs(e - TF_BATCHNORM_EPS) > 1e-9 for e in eps):
        raise ConversionError(f"{path}: BatchNorm epsilon {eps}, only {TF_BATCHNORM_EPS} is supported")
    if any(resize_attrs != (False, False) for resize_attrs in resize):
        raise ConversionError(f"{path}: ResizeBilinear with (align_corners, half_pixel_centers) {resize}; only "
                              "TF1's default (False, False) is reproduced (--resize tf1)")
    return {"batchnorm_epsilon": eps[0] if eps else None,
            "resize_bilinear": [{"align_corners": a, "half_pixel_centers": h} for a, h in resize]}


def read_pca(source: str | Path) -> dict[str, np.ndarray]:
    """The release's PCA as this project's PCA parameters: ``pca_matrix`` (1024, 1024; rows are
    components), ``pca_mean`` (1024,), ``pca_vars`` (1024,; ones when the release has no
    pca_vars.datum, which only whitening would use)."""
    folder = Path(source) / "pca"
    expected = {"mean.datum": (FEATURE_DIM,), "pca_proj_mat.datum": (FEATURE_DIM, FEATURE_DIM),
                "pca_vars.datum": (FEATURE_DIM,)}
    arrays = {}
    for name, shape in expected.items():
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


def release_name(source: str | Path, release: str | None = None) -> str:
    """``release`` if given, else the source folder's name; either must be a known release."""
    name = release or Path(source).resolve().name
    if name not in RELEASES:
        raise ConversionError(f"{source}: unknown release {name!r}: name it with --release "
                              f"({', '.join(RELEASES)})")
    return name


def output_paths(expr: str) -> tuple[Path, Path]:
    """(checkpoint, PCA file) a conversion to ``expr`` writes."""
    root = repo_dir() / expr
    return root / "keypoint" / "ckpt" / "fix.pth.tar", root / "pca" / "pca.h5"


def convert_release(source: str | Path, expr: str, release: str | None = None, overwrite: bool = False
                    ) -> Converted:
    """Convert the release in ``source`` to ``<repo>/<expr>`` (see the module docstring). A model
    that is not DELF v1's raises :class:`UnknownModel`. Everything is read and checked before anything is written;
    both files are written atomically; an existing model is refused unless ``overwrite``."""
    source = Path(source)
    name = release_name(source, release)
    ckpt_path, pca_file = output_paths(expr)
    if not overwrite and (ckpt_path.exists() or pca_file.exists()):
        raise ConversionError(f"{repo_dir() / expr}: holds a model already ({ckpt_path.name} or {pca_file.name}); "
                              "pass --overwrite to replace it")
    state, unused = convert_variables(source)
    facts = graph_facts(source)
    pca = read_pca(source)
    model = new_model()
    model.load_state_dict(state)
    extraction = {**OFFICIAL_EXTRACTION, "pca_dims": RELEASES[name].pca_dims}
    ckpt = checkpoint_dict(model, extraction={k: list(v) if isinstance(v, tuple) else v for k, v in extraction.items()},
                           source={"release": name, "about": RELEASES[name].about, "path": str(source.resolve()),
                                   "unused_variables": unused, "graph": facts,
                                   "variables_sha256": file_sha256(variables_prefix(source).with_name(
                                       "variables.data-00000-of-00001"))})
    created = _first_missing(ckpt_path.parent, pca_file.parent)
    try:
        with atomic_path(ckpt_path) as tmp:
            torch.save(ckpt, tmp)
            save_pca(pca_file, pca, {"checkpoint_sha256": file_sha256(tmp), "source": f"{name} ({source.resolve()})",
                                     "num_features": 0})
    except BaseException:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return Converted(ckpt_path, pca_file, unused)


def _first_missing(*folders: Path) -> list[Path]:
    """For each folder, its outermost ancestor that does not exist yet (what writing creates)."""
    out = []
    for folder in folders:
        missing = None
        for parent in (folder, *folder.parents):
            if parent.exists():
                break
            missing = parent
        if missing is not None and missing not in out:
            out.append(missing)
    return out
