"""Checkpoints: the format, safe (weights_only) reads, and models rebuilt from them (atomic writes:
train/outputs.py).

Two formats load:
- this project's: a dict with ``state_dict`` (the whole model), ``arch``, ``target_layer``,
  ``ncls``, ``stage``, ``attention_pool``, ``layout``, ``input_norm``, ``epoch``, ``best_acc``,
  ``optimizer``, ``lr_scheduler``, ``config`` (files written before ``attention_pool``,
  ``layout`` or ``input_norm`` existed mean "sum", "torchvision" and "imagenet"), for a
  delg-stage model ``block3_strides`` (files written before it existed were trained at stride
  16: False); a converted official model also has ``source`` (where it came from) and
  ``extraction`` (its official extraction settings: extract/official/convert.py);
- the seed repo's: per-module state dicts under ``base``, ``layer4``, ``attn``, ``pool``,
  ``logits`` (its attention head has no BatchNorm; the model is built in that shape).
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from train.config import ARCHS, ATTENTION_POOLS, INPUT_NORMS, LAYOUTS, STAGES, TARGET_LAYERS
from train.delf import Delf, feature_dim
from train.delg import CLASSIFIERS, Delg
from train.outputs import atomic_path

SEED_MODULES = ("base", "layer4", "attn", "pool", "logits")


# The settings a checkpoint of this project's format records, and the values a model can be built with.
RECORDED = {"arch": ARCHS, "target_layer": TARGET_LAYERS, "stage": STAGES,
            "attention_pool": ATTENTION_POOLS, "layout": LAYOUTS, "input_norm": tuple(INPUT_NORMS)}


_SEED_ARCHS = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50",
               (True, 23): "resnet101", (True, 36): "resnet152"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model asked for."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save that never leaves a partial file at ``path`` (see :func:`atomic_path`). Write
    errors (disk full, I/O) raise the OSError itself, not the RuntimeError torch.save turns it into."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # the zip writer's "unexpected pos" after the failed write
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def checkpoint_dict(model: Delf | Delg, **extra: Any) -> dict[str, Any]:
    """This project's checkpoint format for ``model``; ``extra`` adds epoch, optimizer, ...."""
    ckpt = {"state_dict": model.state_dict(), "arch": model.arch, "target_layer": model.target_layer,
            "ncls": model.ncls, "stage": model.stage, "attention_pool": model.attention_pool,
            "layout": getattr(model, "layout", "torchvision"), "input_norm": getattr(model, "input_norm", "imagenet"),
            "epoch": 0,
            "best_acc": 0.0, "optimizer": {}, "lr_scheduler": {}, "config": {}}
    if isinstance(model, Delg):
        ckpt["block3_strides"] = model.block3_strides
    ckpt.update(extra)
    return ckpt


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(weights_only=True) on CPU, with one-line errors that name the file. Files that
    would run Python code when unpickled (pickled objects other than tensors and plain
    containers) are refused, never loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weights-only unpickler's protocol chatter
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or _starts_like_a_pickle(path):
            raise CheckpointError(f"refusing to load {path}: it holds Python objects other than tensors (only "
                                  "checkpoints written by this project or the seed load)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (not a PyTorch file)") from None
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first_line})") from None


def _starts_like_a_pickle(path: Path) -> bool:
    """A pickle of protocol 2 or later begins with the PROTO opcode (0x80)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def pretrained_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state_dict file (bare, or under ``state_dict``) for ``--pretrained PATH``."""
    state = load_file(path)
    return state.get("state_dict", state)


def is_seed_format(ckpt: dict[str, Any]) -> bool:
    return "state_dict" not in ckpt and "base" in ckpt


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The flat model state_dict of either format."""
    if not is_seed_format(ckpt):
        return ckpt["state_dict"]
    return {f"{m}.{k}": v for m in SEED_MODULES for k, v in ckpt.get(m, {}).items()}


def describe(ckpt: dict[str, Any]) -> dict[str, Any]:
    """arch, target_layer, ncls, stage, attn_batchnorm, attention_pool, layout and input_norm of a
    checkpoint of either format ("sum", "torchvision", "imagenet" where the file does not say: the
    seed's and this project's older files); for a delg-stage one also global_dim and autoencoder_dim
    (read from the weights' shapes) and block3_strides (False where the file does not say: it
    predates the option, stride 16)."""
    state = model_state(ckpt)
    has_attn = any(k.startswith("attn.") for k in state)
    info = {"attn_batchnorm": any(k.startswith("attn.bn.") for k in state),
            "attention_pool": ckpt.get("attention_pool", "sum"), "layout": ckpt.get("layout", "torchvision"),
            "input_norm": ckpt.get("input_norm", "imagenet")}
    if not is_seed_format(ckpt):
        missing = [k for k in ("arch", "target_layer", "ncls", "stage") if k not in ckpt]
        if missing:
            raise CheckpointError(f"records no {', '.join(missing)} (not a checkpoint of this project)")
        info.update({k: ckpt[k] for k in ("arch", "target_layer", "ncls", "stage")})
        for key, allowed in RECORDED.items():
            if info[key] not in allowed:
                raise CheckpointError(f"{key} is {info[key]!r}: expected one of {', '.join(allowed)}")
        if info["stage"] == "delg":
            encoder = state.get("autoencoder.encoder.weight")
            strides = ckpt.get("block3_strides", False)
            if not isinstance(strides, bool):
                raise CheckpointError(f"block3_strides is {strides!r}: expected true or false")
            info.update(global_dim=state["whiten.weight"].shape[0],
                        autoencoder_dim=0 if encoder is None else encoder.shape[0], block3_strides=strides)
        return info
    blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("base.6."))
    arch = _SEED_ARCHS.get(("base.6.0.conv3.weight" in state, blocks))
    if arch is None:
        raise CheckpointError("seed-format checkpoint with an unknown ResNet layout")
    target = "layer3"
    if has_attn and state["attn.conv1.weight"].shape[1] == feature_dim(arch, "layer4"):
        target = "layer4"
    return {**info, "arch": arch, "target_layer": target, "ncls": state["logits.0.weight"].shape[0],
            "stage": "keypoint" if has_attn else "finetune"}


def describe_file(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """:func:`describe` of the checkpoint read from ``path``; its errors name the file."""
    try:
        return describe(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_model(path: str | os.PathLike, stage: str = "inference") -> tuple[Delf | Delg, dict[str, Any]]:
    """A keypoint-stage checkpoint as a model in ``stage`` ('inference' or 'keypoint'), on CPU; a
    delg-stage checkpoint as a :class:`Delg` without its classifiers (for extraction)."""
    ckpt = load_file(path)
    info = describe_file(ckpt, path)
    if info["stage"] == "delg":
        model = Delg(info["ncls"], arch=info["arch"], global_dim=info["global_dim"],
                     autoencoder_dim=info["autoencoder_dim"], attn_batchnorm=info["attn_batchnorm"],
                     attention_pool=info["attention_pool"], classifiers=False,
                     block3_strides=info["block3_strides"])
        classifiers = tuple(f"{m}." for m in CLASSIFIERS)
        _load(model, {k: v for k, v in model_state(ckpt).items() if not k.startswith(classifiers)}, path)
        return model, ckpt
    if info["stage"] == "finetune":
        raise CheckpointError(
            f"{path}: a finetune-stage checkpoint has no attention network; "
            "train the keypoint stage (--stage keypoint --load_from this file) and use its checkpoint"
        )
    model = Delf(info["ncls"], arch=info["arch"], stage=stage, target_layer=info["target_layer"],
                 attn_batchnorm=info["attn_batchnorm"], attention_pool=info["attention_pool"],
                 layout=info["layout"], input_norm=info["input_norm"])
    _load(model, model_state(ckpt), path)
    return model, ckpt


def load_backbone(model: Delf, path: str | os.PathLike) -> dict[str, Any]:
    """Load the frozen backbone (base, and layer4 for layer4 features) from a finetune
    checkpoint of either format into a keypoint-stage ``model``."""
    ckpt = load_file(path)
    info = describe_file(ckpt, path)
    for key in ("arch", "layout", "input_norm"):
        if info[key] != getattr(model, key):
            raise CheckpointError(f"{path}: checkpoint's {key} is {info[key]}, but --{key} is {getattr(model, key)}")
    prefixes = tuple(f"{m}." for m in ("base", "layer4")[: len(model.backbone())])
    state = {k: v for k, v in model_state(ckpt).items() if k.startswith(prefixes)}
    if model.target_layer == "layer4" and not any(k.startswith("layer4.") for k in state):
        raise CheckpointError(f"{path}: has no layer4 weights, needed for --target_layer layer4")
    for module, prefix in zip(model.backbone(), prefixes, strict=True):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        _load(module, sub, path)
    return ckpt


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model: {e}") from None
