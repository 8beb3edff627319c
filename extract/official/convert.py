"""Converting the official DELF releases (tensorflow/models research/delf) into this project's files.

What a release folder holds, and which release it is: extract/official/release.py. The network is
TF-slim's ``resnet_v1_50`` up to block3 and DELF's attention block
(``attention_block/attention/compute/{conv1 (1x1, BatchNorm, ReLU), conv2 (1x1, bias)}``, then
softplus); it becomes a :class:`train.delf.Delf` with ``layout="slim"``, ``input_norm="tf"``.

:func:`convert_release` writes ``<repo>/<expr>/keypoint/ckpt/fix.pth.tar`` (an ordinary checkpoint
of this project, with ``source`` and ``extraction``: the official extraction settings, which
extraction then uses unless a flag says otherwise) and ``<repo>/<expr>/pca/pca.h5``. TensorFlow
is needed only to read the release (``pip install -r requirements-convert.txt``); no TensorFlow op
is run.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.extraction.pca import save_pca
from extract.official.release import (
    DATA_FILE,
    RELEASES,
    ConversionError,
    GraphFacts,
    Identity,
    first_line,
    identify,
    open_variables,
    read_graph,
    read_pca,
    release_name,
    variable_shapes,
    variables_prefix,
)
from train.checkpoint import checkpoint_dict
from train.delf import Delf
from train.outputs import atomic_path, file_sha256
from train.runtime import repo_dir

SLIM_SCOPE = "resnet_v1_50"
ATTENTION_SCOPE = "attention_block/attention/compute"
# the official configs' (delf_config_example.pbtxt, detect_to_retrieve/delf_gld_config.pbtxt)
# extraction settings; pca_dims per release. No image-size limit: the configs set none.
OFFICIAL_EXTRACTION = {"scale_list": (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0), "attn_thres": 100.0,
                       "iou_thres": 1.0, "top_k": 1000, "max_image_size": 0, "use_pca": True,
                       "use_whitening": False, "resize": "tf1", "boxes": "official"}
TF_BATCHNORM_EPS = 1e-5  # slim's resnet_arg_scope default, and PyTorch's


class UnknownModel(ConversionError):
    """The release's variables are not DELF v1's; ``variables`` (name -> shape) lists them."""

    def __init__(self, message: str, variables: dict[str, tuple[int, ...]]) -> None:
        super().__init__(message)
        self.variables = variables


@dataclass(frozen=True)
class Converted:
    """What :func:`convert_release` wrote, the release's variables it left out, and which release
    it converted, with the evidence."""

    checkpoint: Path
    pca: Path
    unused: list[str]
    identity: Identity


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


def convert_variables(source: str | Path) -> tuple[dict[str, torch.Tensor], list[str], int | None]:
    """The :func:`new_model` state_dict from a release's variables, the release's variables that
    it does not use (global_step, optimiser slots, the training classifier), and the release's
    global_step (None without one). A variable the model needs and the release lacks is a
    ConversionError listing them."""
    reader = open_variables(source)
    shapes = variable_shapes(reader)
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
    data = variables_prefix(source).with_name(DATA_FILE)

    def tensor(name: str) -> np.ndarray:
        try:
            return reader.get_tensor(name)
        except Exception as e:  # a truncated or corrupt data file
            raise ConversionError(f"{data}: cannot read {name} ({first_line(e)})") from None

    converted: dict[str, torch.Tensor] = {}
    for key, like in state.items():
        name = wanted[key]
        if name is None:
            converted[key] = torch.zeros_like(like)  # step counters, the attention conv1 bias, the classifier
            continue
        converted[key] = _as_torch(name, tensor(name), like)
    used = {name for name in wanted.values() if name is not None}
    step = int(tensor("global_step")) if shapes.get("global_step") == () else None
    return converted, sorted(set(shapes) - used), step


def batchnorm_scopes() -> set[str]:
    """The variable scopes of the BatchNorms of :func:`new_model` (44: the base's and the attention's)."""
    return {name.rpartition("/")[0] for key in new_model().state_dict() if key.endswith(".running_var")
            for name in [tf_name(key)] if name is not None}


def check_graph(graph: GraphFacts, batchnorms: set[str]) -> dict[str, Any]:
    """What the graph says about the two settings the variables cannot, checked against what this
    project computes, as plain types: every BatchNorm of ``batchnorms`` uses epsilon 1e-5 (a
    BatchNorm whose epsilon the graph does not give is refused: it is not guessed), and every
    ResizeBilinear is TF1's (no align_corners, no half-pixel centres). ConversionError otherwise."""
    unknown = sorted(batchnorms - set(graph.epsilons))
    if unknown:
        raise ConversionError(
            f"{graph.path}: no BatchNorm epsilon for {len(unknown)} of the model's {len(batchnorms)} BatchNorms "
            f"(e.g. {unknown[0]}): the graph has no FusedBatchNorm node nor batchnorm/add/y constant of theirs, "
            "and the epsilon is not guessed")
    found = sorted({eps for scope in batchnorms for eps in graph.epsilons[scope]})
    if any(abs(eps - TF_BATCHNORM_EPS) > 1e-9 for eps in found):
        wrong = sorted(scope for scope in batchnorms
                       if any(abs(eps - TF_BATCHNORM_EPS) > 1e-9 for eps in graph.epsilons[scope]))
        raise ConversionError(f"{graph.path}: BatchNorm epsilon {found} ({len(wrong)} BatchNorms, e.g. {wrong[0]}), "
                              f"only {TF_BATCHNORM_EPS} is supported")
    if any(attrs != (False, False) for attrs in graph.resize):
        raise ConversionError(f"{graph.path}: ResizeBilinear with (align_corners, half_pixel_centers) "
                              f"{list(graph.resize)}; only TF1's default (False, False) is reproduced (--resize tf1)")
    return {"batchnorm_epsilon": found[0], "batchnorms_checked": len(batchnorms), "written_by": graph.writer,
            "resize_bilinear": [{"align_corners": a, "half_pixel_centers": h} for a, h in graph.resize]}


def output_paths(expr: str) -> tuple[Path, Path]:
    """(checkpoint, PCA file) a conversion to ``expr`` writes."""
    root = repo_dir() / expr
    return root / "keypoint" / "ckpt" / "fix.pth.tar", root / "pca" / "pca.h5"


def convert_release(source: str | Path, expr: str, release: str | None = None, overwrite: bool = False
                    ) -> Converted:
    """Convert the release in ``source`` to ``<repo>/<expr>`` (see the module docstring), as the
    release its name (the folder's, or ``release``) says, checked against its files
    (:func:`~extract.official.release.identify`). A model that is not DELF v1's raises
    :class:`UnknownModel`. Everything is read and checked before anything is written; both files
    are written atomically; an existing model is refused unless ``overwrite``."""
    source = Path(source)
    name, _ = release_name(source, release)
    ckpt_path, pca_file = output_paths(expr)
    if not overwrite and (ckpt_path.exists() or pca_file.exists()):
        raise ConversionError(f"{repo_dir() / expr}: holds a model already ({ckpt_path.name} or {pca_file.name}); "
                              "pass --overwrite to replace it")
    state, unused, step = convert_variables(source)
    graph = read_graph(source)
    facts = check_graph(graph, batchnorm_scopes())
    pca = read_pca(source)
    pca_shapes = {"mean.datum": list(pca["pca_mean"].shape), "pca_proj_mat.datum": list(pca["pca_matrix"].shape)}
    if (source / "pca" / "pca_vars.datum").exists():
        pca_shapes["pca_vars.datum"] = list(pca["pca_vars"].shape)
    identity = identify(source, release, graph, pca_shapes, step,
                        file_sha256(variables_prefix(source).with_name(DATA_FILE)))
    model = new_model()
    model.load_state_dict(state)
    extraction = {**OFFICIAL_EXTRACTION, "pca_dims": identity.pca_dims}
    ckpt = checkpoint_dict(model, extraction={k: list(v) if isinstance(v, tuple) else v for k, v in extraction.items()},
                           source={"release": name, "about": RELEASES[name].about, "path": str(source.resolve()),
                                   "unused_variables": unused, "graph": facts, "identity": identity.record()})
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
    return Converted(ckpt_path, pca_file, unused, identity)


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
