"""The trainer's options: :class:`TrainConfig` (each default defined once, here) and its parser.

Flags are the seed repo's (same names, same defaults) plus a few new ones; each field of
:class:`TrainConfig` is one flag ``--<field>``. ``config.json`` and a checkpoint's ``config`` hold
``dataclasses.asdict(config)`` plus the run's facts (ncls, manualSeed, world_size, classes, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Callable, Sequence

from .cli import (
    ScriptParser,
    add_config_args,
    add_config_file_arg,
    config_from_args,
    non_negative_int,
    number,
    parse_args_given,
    positive_int,
)

# The values the options take. They are defined here, where the parser needs them, because this
# module imports no torch (a script's --help stays light); the model (train/delf.py, train/layers.py)
# and the data loader (train/dataloader.py) take them from here.
STAGES = ("finetune", "keypoint", "delg")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# "torchvision": torchvision's ResNet (v1.5); "slim": TF-slim's resnet_v1, the official DELF models' (train/slim.py)
LAYOUTS = ("torchvision", "slim")
TARGET_LAYERS = ("layer3", "layer4")
ATTENTION_POOLS = ("sum", "mean")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (mean, std) per channel of RGB in [0, 1] for each input normalisation: "imagenet" (torchvision's
# models), "tf" ((pixel - 128) / 128 on [0, 255] pixels: the official DELF models)
INPUT_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "tf": ((128 / 255,) * 3, (128 / 255,) * 3)}
MAX_WORKERS = 20  # the seed's --workers


def _positive_float(value: str | float) -> float:
    x = number(value, float)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return x


def _non_negative_float(value: str | float) -> float:
    x = number(value, float)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return x


def _fraction(value: str | float) -> float:
    x = number(value, float)
    if not 0 <= x < 0.5:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.5), got {value}")
    return x


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def _lower(value: str) -> str:
    return value.lower()


def _opt(default: Any, help: str, group: str, type: Callable[[Any], Any] | None = None,
         choices: Sequence[str] | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A field of :class:`TrainConfig`: its default, and how its flag looks (help, help group,
    parsing/validating ``type``, ``choices``, extra flag names)."""
    return field(default=default, metadata={"help": help, "group": group, "type": type, "choices": choices,
                                            "aliases": aliases})


@dataclass(frozen=True)
class TrainConfig:
    """Every option of one training stage (seed defaults unless the help says otherwise).

    Outputs go to ``repo_dir()/<expr>/<stage>/{ckpt,log}`` (see :meth:`output_dir`).
    """

    # experiment
    stage: str = _opt("finetune", "training stage", "experiment", choices=STAGES)
    expr: str = _opt("devel", "experiment name: outputs go to <repo>/<expr>/<stage>/ (<repo>: $DELF_REPO_DIR, "
                     "else <project root>/repo)", "experiment")
    load_from: str | None = _opt(None, "keypoint stage: finetune checkpoint (this project's or the seed repo's "
                                 "format)", "experiment")
    resume: bool = _opt(False, "continue from <repo>/<expr>/<stage>/ckpt/last.pth.tar", "experiment")
    overwrite: bool = _opt(False, "start afresh where <repo>/<expr>/<stage>/ holds a run, replacing its "
                           "checkpoints and logs (without it, or --resume, the trainer refuses to start)",
                           "experiment")
    manualSeed: int | None = _opt(None, "random seed; when omitted: the resumed run's, else drawn at random",
                                  "experiment", type=int)
    # data
    finetune_train_path: str | None = _opt(None, "ImageFolder with the finetune stage's train images", "data")
    finetune_val_path: str | None = _opt(None, "ImageFolder with the finetune stage's val images", "data")
    keypoint_train_path: str | None = _opt(None, "ImageFolder with the keypoint stage's train images", "data")
    keypoint_val_path: str | None = _opt(None, "ImageFolder with the keypoint stage's val images", "data")
    delg_train_path: str | None = _opt(None, "ImageFolder with the delg stage's train images (with --train_csv: "
                                       "the GLDv2 image root)", "data")
    delg_val_path: str | None = _opt(None, "ImageFolder with the delg stage's val images", "data")
    finetune_sample_size: int = _opt(256, "finetune resize", "data", type=positive_int)
    finetune_crop_size: int = _opt(224, "finetune crop", "data", type=positive_int)
    keypoint_sample_size: int = _opt(900, "keypoint resize", "data", type=positive_int)
    keypoint_crop_size: int = _opt(720, "keypoint crop", "data", type=positive_int)
    delg_sample_size: int = _opt(576, "delg resize", "data", type=positive_int)
    delg_crop_size: int = _opt(512, "delg crop", "data", type=positive_int)
    train_csv: str | None = _opt(None, "Google Landmarks v2 train.csv (id,url,landmark_id) or train_clean.csv "
                                 "(landmark_id,images), any stage: --<stage>_train_path is then the image root "
                                 "(<root>/a/b/c/abc....jpg) and the val images are split off the CSV", "data")
    min_images_per_class: int = _opt(2, "--train_csv: landmarks with fewer usable images are left out", "data",
                                     type=positive_int)
    val_fraction: float = _opt(0.2, "--train_csv: fraction of each landmark's images held out for validation "
                               "(deterministic: by sha1 of the image id)", "data", type=_fraction)
    workers: int | None = _opt(None, f"data-loading processes per training process; when omitted: the CPUs "
                               f"shared among this node's training processes, at most {MAX_WORKERS} (the seed's "
                               "value)", "data", type=non_negative_int)
    ncls: int | None = _opt(None, "number of classes; when omitted: the training folder's", "data",
                            type=positive_int)
    # model
    arch: str = _opt("resnet50", "ResNet backbone", "model", choices=ARCHS)
    target_layer: str = _opt("layer3", "layer the local features come from", "model", choices=TARGET_LAYERS)
    layout: str = _opt("torchvision", "ResNet layout: torchvision's, or TF-slim's resnet_v1 (the official DELF "
                        "models': stride in each block's last unit, layer3 stride 32; to fine-tune converted "
                        "official weights)", "model", choices=LAYOUTS)
    input_norm: str | None = _opt(None, "input normalisation: imagenet (mean/std) or tf ((pixel - 128) / 128, the "
                                  "official DELF models'); when omitted: tf for --layout slim, else imagenet",
                                  "model", choices=tuple(INPUT_NORMS))
    pretrained: str = _opt("imagenet", "finetune and delg stages backbone init: imagenet | none | PATH to a "
                           "torchvision state_dict", "model")
    attention_pool: str = _opt("sum", "keypoint stage: pool the attention-weighted features by their sum (the "
                               "paper's Eq. 1, the seed) or mean (the official TF2 trainer); the sum grows "
                               "with the feature map, whose area gamma rescaling varies up to 8x", "model",
                               choices=ATTENTION_POOLS)
    use_random_gamma_rescale: bool = _opt(True, "keypoint stage: resize each training batch by a random factor "
                                          "in [0.3535, 1]", "model", aliases=("--use_random_gamma_scaling",))
    global_dim: int = _opt(2048, "delg stage: global descriptor dimension (whitening layer output)", "model",
                           type=positive_int)
    autoencoder_dim: int = _opt(128, "delg stage: local descriptor dimension (autoencoder code; 0: no autoencoder, "
                                "the layer3 features)", "model", type=non_negative_int)
    delg_block3_strides: bool = _opt(True, "delg stage: subsample layer3 by 2 for the local branch (local grid "
                                     "stride 32, as the official trainer's block3_strides); false: stride 16. "
                                     "The global branch is unchanged", "model")
    arcface_margin: float = _opt(0.1, "delg stage: ArcFace angular margin", "model", type=_non_negative_float)
    arcface_scale: float | None = _opt(None, "delg stage: ArcFace logit scale; when omitted: sqrt(global_dim)",
                                       "model", type=_positive_float)
    # optimisation
    optim: str = _opt("sgd", "optimiser", "optimisation", type=_lower, choices=OPTIMIZERS)
    lr: float = _opt(0.008, "initial learning rate", "optimisation", type=_positive_float)
    momentum: float = _opt(0.9, "SGD momentum (the seed had none)", "optimisation", type=_non_negative_float)
    weight_decay: float = _opt(1e-4, "L2 penalty", "optimisation", type=_non_negative_float)
    lr_gamma: float = _opt(0.5, "learning-rate decay factor", "optimisation", type=_positive_float)
    lr_stepsize: int = _opt(10, "decay every N epochs", "optimisation", type=positive_int)
    finetune_epoch: int = _opt(30, "finetune stage epochs", "optimisation", type=non_negative_int)
    keypoint_epoch: int = _opt(30, "keypoint stage epochs", "optimisation", type=non_negative_int)
    delg_epoch: int = _opt(30, "delg stage epochs", "optimisation", type=non_negative_int)
    attention_loss_weight: float = _opt(1.0, "delg stage: weight of the attention classifier's loss", "optimisation",
                                        type=_non_negative_float)
    reconstruction_loss_weight: float = _opt(10.0, "delg stage: weight of the autoencoder's reconstruction loss",
                                             "optimisation", type=_non_negative_float)
    clip_grad_norm: float = _opt(10.0, "delg stage: clip the gradients' global L2 norm to this (0: off)",
                                 "optimisation", type=_non_negative_float)
    train_batch_size: int = _opt(8, "batch size per process", "optimisation", type=positive_int)
    val_batch_size: int = _opt(8, "batch size per process", "optimisation", type=positive_int)
    # device
    gpu_id: str | None = _opt(None, "CUDA_VISIBLE_DEVICES, set before CUDA starts; when omitted: left alone",
                              "device")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N", "device", type=_device)
    amp: bool = _opt(False, "mixed precision (bf16 on CPU and Ampere+ GPUs, fp16 + GradScaler on older GPUs) and "
                     "channels_last", "device")
    deterministic: bool = _opt(False, "deterministic algorithms only, no cuDNN autotuning, no TF32: a run "
                               "repeats bit for bit on the same GPU model, software and process count "
                               "(slower; CPU runs repeat without it)", "device")

    # --- the chosen stage's values -------------------------------------------------------------
    @property
    def sample_size(self) -> int:
        """Shorter side images are resized to, before cropping."""
        return getattr(self, f"{self.stage}_sample_size")

    @property
    def crop_size(self) -> int:
        return getattr(self, f"{self.stage}_crop_size")

    @property
    def normalisation(self) -> str:
        """The input normalisation in effect (``input_norm``, else the layout's)."""
        return self.input_norm or ("tf" if self.layout == "slim" else "imagenet")

    @property
    def epochs(self) -> int:
        return getattr(self, f"{self.stage}_epoch")

    @property
    def data_paths(self) -> tuple[str | None, str | None]:
        """(train, val) folders of the chosen stage (with --train_csv: the image root, None)."""
        return getattr(self, f"{self.stage}_train_path"), getattr(self, f"{self.stage}_val_path")

    def output_dir(self) -> Path:
        """``repo_dir()/<expr>/<stage>``: receives ``ckpt/`` and ``log/``."""
        from .runtime import repo_dir  # torch: not imported to parse the flags

        return repo_dir() / self.expr / self.stage

    # --- checks --------------------------------------------------------------------------------
    def problem(self) -> str | None:
        """The first invalid value or inconsistency between options (a one-line message naming
        the flags), or None."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            if meta["choices"] is not None and value not in meta["choices"]:
                return f"--{f.name}: invalid choice: {value!r} (choose from {', '.join(meta['choices'])})"
            if meta["type"] is not None:
                try:
                    meta["type"](value)
                except (argparse.ArgumentTypeError, ValueError) as e:
                    return f"--{f.name}: {e}"
        expr = PurePath(self.expr)
        if not self.expr or expr.is_absolute() or ".." in expr.parts:
            from .runtime import repo_dir

            return f"--expr {self.expr!r}: give a plain name; outputs go to {repo_dir()}/<expr>/"
        train_path, val_path = self.data_paths
        if train_path is None:
            return f"--{self.stage}_train_path is required for --stage {self.stage}"
        if self.train_csv is None and val_path is None:
            return f"--{self.stage}_val_path is required for --stage {self.stage} (or --train_csv)"
        if self.train_csv is not None and val_path is not None:
            return (f"--{self.stage}_val_path and --train_csv: with a CSV the val images are split off it "
                    "(--val_fraction); leave out one of them")
        if self.stage == "delg" and self.layout != "torchvision":
            return "--stage delg: the slim layout is for DELF (--stage finetune / keypoint)"
        if self.stage == "delg" and self.target_layer != "layer3":
            return "--stage delg: the local branch is on layer3 (--target_layer layer3)"
        if self.sample_size < self.crop_size:
            return (f"--{self.stage}_sample_size {self.sample_size} is smaller than "
                    f"--{self.stage}_crop_size {self.crop_size}")
        if self.resume and self.overwrite:
            return "--resume continues a run and --overwrite replaces it: give one of them"
        if self.stage == "keypoint" and self.load_from is None and not self.resume:
            return "--stage keypoint needs --load_from <finetune checkpoint> (or --resume)"
        return None

    def check(self) -> None:
        """Raise ValueError with :meth:`problem`'s message when there is one."""
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def as_dict(self, **extra: Any) -> dict[str, Any]:
        """The options as plain types, plus ``extra`` (for config.json and checkpoints, which are
        loaded with weights_only)."""
        return {**dataclasses.asdict(self), **extra}


def build_parser() -> argparse.ArgumentParser:
    """The trainer's argument parser: one flag per :class:`TrainConfig` field, grouped."""
    p = ScriptParser(
        prog="main.py", description="Train DeLF in two stages (finetune, then keypoint: attention), or DELG in "
                                    "one (--stage delg: global descriptor + attention).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_file_arg(p)
    add_config_args(p, TrainConfig)
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """The trainer's command line (and its ``--config`` file) as a checked :class:`TrainConfig`;
    errors exit with argparse's message (exit code 2)."""
    parser = build_parser()
    cfg = config_from_args(TrainConfig, parse_args_given(parser, argv))
    problem = cfg.problem()
    if problem:
        parser.error(problem)
    return cfg
