"""Command-line options of the trainer: the seed repo's flags and defaults, plus a few new ones."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import PurePath
from typing import Any, Sequence

from .delf import ARCHS, TARGET_LAYERS
from .cli import str2bool

STAGES = ("finetune", "keypoint")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
SEED_WORKERS = 20


def _positive_int(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def _non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return n


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return x


def _non_negative_float(value: str) -> float:
    x = float(value)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return x


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def _flag(parser: argparse._ActionsContainer, *names: str, default: bool, help: str) -> None:
    """A boolean option: ``--x`` alone means true; ``--x true|false|1|0`` also works."""
    parser.add_argument(*names, type=str2bool, nargs="?", const=True, default=default,
                        metavar="BOOL", help=help)


def build_parser() -> argparse.ArgumentParser:
    """The trainer's argument parser (seed flags with seed defaults, unless noted)."""
    p = argparse.ArgumentParser(
        prog="main.py", description="Train DeLF in two stages: finetune, then keypoint (attention).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("experiment")
    g.add_argument("--stage", default="finetune", choices=STAGES, help="training stage")
    g.add_argument("--expr", default="devel",
                   help="experiment name: outputs go to <project root>/repo/<expr>/<stage>/")
    g.add_argument("--load_from", default=None,
                   help="keypoint stage: finetune checkpoint (this project's or the seed repo's format)")
    _flag(g, "--resume", default=False,
          help="continue from repo/<expr>/<stage>/ckpt/last.pth.tar")
    g.add_argument("--manualSeed", type=int, default=None, help="random seed; when omitted: the resumed run's, else drawn at random")

    g = p.add_argument_group("data")
    for stage in STAGES:
        for split in ("train", "val"):
            g.add_argument(f"--{stage}_{split}_path", default=None,
                           help=f"ImageFolder with the {stage} stage's {split} images")
    g.add_argument("--finetune_sample_size", type=_positive_int, default=256, help="finetune resize")
    g.add_argument("--finetune_crop_size", type=_positive_int, default=224, help="finetune crop")
    g.add_argument("--keypoint_sample_size", type=_positive_int, default=900, help="keypoint resize")
    g.add_argument("--keypoint_crop_size", type=_positive_int, default=720, help="keypoint crop")
    g.add_argument("--workers", type=_non_negative_int, default=min(SEED_WORKERS, os.cpu_count() or 1),
                   help=f"data-loading processes per training process (seed: {SEED_WORKERS})")
    g.add_argument("--ncls", type=_positive_int, default=None,
                   help="number of classes; when omitted: the training folder's")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=ARCHS, help="ResNet backbone")
    g.add_argument("--target_layer", default="layer3", choices=TARGET_LAYERS,
                   help="layer the local features come from")
    g.add_argument("--pretrained", default="imagenet",
                   help="finetune stage backbone init: imagenet | none | PATH to a torchvision state_dict")
    _flag(g, "--use_random_gamma_rescale", "--use_random_gamma_scaling", default=True,
          help="keypoint stage: resize each training batch by a random factor in [0.3535, 1]")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optim", default="sgd", type=str.lower, choices=OPTIMIZERS, help="optimiser")
    g.add_argument("--lr", type=_positive_float, default=0.008, help="initial learning rate")
    g.add_argument("--momentum", type=_non_negative_float, default=0.9,
                   help="SGD momentum (the seed had none)")
    g.add_argument("--weight_decay", type=_non_negative_float, default=1e-4, help="L2 penalty")
    g.add_argument("--lr_gamma", type=_positive_float, default=0.5, help="learning-rate decay factor")
    g.add_argument("--lr_stepsize", type=_positive_int, default=10, help="decay every N epochs")
    g.add_argument("--finetune_epoch", type=_non_negative_int, default=30, help="finetune stage epochs")
    g.add_argument("--keypoint_epoch", type=_non_negative_int, default=30, help="keypoint stage epochs")
    g.add_argument("--train_batch_size", type=_positive_int, default=8, help="batch size per process")
    g.add_argument("--val_batch_size", type=_positive_int, default=8, help="batch size per process")

    g = p.add_argument_group("device")
    g.add_argument("--gpu_id", default=None,
                   help="CUDA_VISIBLE_DEVICES, set before CUDA starts; when omitted: left alone")
    g.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N")
    _flag(g, "--amp", default=False,
          help="mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA) and channels_last")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the trainer's command line; errors exit with argparse's message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check(args)
    if problem:
        parser.error(problem)
    return args


def _check(args: argparse.Namespace) -> str | None:
    """The first inconsistency between options, or None."""
    expr = PurePath(args.expr)
    if not args.expr or expr.is_absolute() or ".." in expr.parts:
        return f"--expr {args.expr!r}: give a plain name; outputs go to repo/<expr>/"
    for split in ("train", "val"):
        if getattr(args, f"{args.stage}_{split}_path") is None:
            return f"--{args.stage}_{split}_path is required for --stage {args.stage}"
    if sample_size(args) < crop_size(args):
        return (f"--{args.stage}_sample_size {sample_size(args)} is smaller than "
                f"--{args.stage}_crop_size {crop_size(args)}")
    if args.stage == "keypoint" and args.load_from is None and not args.resume:
        return "--stage keypoint needs --load_from <finetune checkpoint> (or --resume)"
    return None


def sample_size(args: argparse.Namespace) -> int:
    return getattr(args, f"{args.stage}_sample_size")


def crop_size(args: argparse.Namespace) -> int:
    return getattr(args, f"{args.stage}_crop_size")


def epochs(args: argparse.Namespace) -> int:
    return getattr(args, f"{args.stage}_epoch")


def data_paths(args: argparse.Namespace) -> tuple[str, str]:
    """(train, val) folders of the chosen stage."""
    return getattr(args, f"{args.stage}_train_path"), getattr(args, f"{args.stage}_val_path")


def config_dict(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The options as plain types (for config.json and checkpoints loaded with weights_only)."""
    return {**vars(args), **extra}
