"""Train DeLF, stage by stage (see README):

    python train/main.py --stage finetune --finetune_train_path T --finetune_val_path V ...
    python train/main.py --stage keypoint --load_from FINETUNE.pth.tar --keypoint_train_path T ...

Also ``cd train && python main.py ...`` and ``torchrun --nproc_per_node=N train/main.py ...``.
Outputs: ``<project root>/repo/<expr>/<stage>/{ckpt,log}``.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from train.checkpoint import CheckpointError, describe, file_sha256, load_backbone, load_file  # noqa: E402
from train.config import config_dict, crop_size, data_paths, epochs, parse_args, sample_size  # noqa: E402
from train.dataloader import DataError, check_ncls, image_folders, loaders  # noqa: E402
from train.delf import Delf, PretrainedUnavailable  # noqa: E402
from train.runtime import (repo_dir, Runtime, seed_everything, setup_logging, setup_runtime,  # noqa: E402
                           teardown_runtime)
from train.solver import Settings, Solver, TrainingDiverged  # noqa: E402

log = logging.getLogger("delf")
T = TypeVar("T")


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: sys.argv[1:]) and train one stage. User errors exit with a
    one-line ``error: ...`` message (SystemExit), never a traceback."""
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", 0)) == 0)
    runtime = setup_runtime(args.device, args.gpu_id)
    out_dir = repo_dir() / args.expr / args.stage
    try:
        train(args, runtime, out_dir)
    except (DataError, CheckpointError, PretrainedUnavailable) as e:
        raise SystemExit(f"error: {e}") from None
    except TrainingDiverged as e:
        last = out_dir / "ckpt" / "last.pth.tar"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
        raise SystemExit(f"error: {e} ({kept}); try a lower --lr") from None
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted; continue with --resume (checkpoints in {out_dir / 'ckpt'})") from None
    finally:
        teardown_runtime()


def train(args: argparse.Namespace, rt: Runtime, out_dir: Path) -> Solver:
    """Build data, model and solver from ``args`` and train; returns the solver."""
    last = out_dir / "ckpt" / "last.pth.tar"
    resume = _resume_checkpoint(last) if args.resume else None
    if resume is None and last.is_file() and rt.is_main:
        log.warning("%s exists and will be overwritten (pass --resume to continue that run)", last)
    seed = _seed(args, resume, rt)
    seed_everything(seed)

    train_set, val_set = image_folders(*data_paths(args), sample_size(args), crop_size(args))
    ncls = check_ncls(args.ncls, train_set)
    if resume is not None:
        _check_resumable(resume, args, ncls, last)
    model = _rank0_first(rt, lambda: build_model(args, ncls, resuming=resume is not None))
    config = config_dict(args, ncls=ncls, manualSeed=seed, world_size=rt.world_size,
                         classes=list(train_set.classes), **_provenance(args, resume))
    settings = Settings(optim=args.optim, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                        lr_stepsize=args.lr_stepsize, lr_gamma=args.lr_gamma, amp=args.amp, seed=seed)
    solver = Solver(model, settings, rt, out_dir, config)
    if resume is not None:
        solver.load_state(resume, last)
    train_loader, val_loader = loaders(train_set, val_set, args.train_batch_size, args.val_batch_size,
                                       args.workers, seed, rt.rank, rt.world_size,
                                       pin_memory=rt.device.type == "cuda")
    if rt.is_main:
        log.info("%s stage: %s %s, %d classes, %d train / %d val images, %s x %d process(es), "
                 "epochs %d..%d -> %s", args.stage, args.arch, args.target_layer, ncls, len(train_set),
                 len(val_set), rt.device, rt.world_size, solver.start_epoch + 1, epochs(args), out_dir)
    solver.fit(train_loader, val_loader, epochs(args))
    if rt.is_main:
        log.info("done: best val top-1 %.2f%%, checkpoints in %s", solver.best_acc, out_dir / "ckpt")
    return solver


def build_model(args: argparse.Namespace, ncls: int, resuming: bool) -> Delf:
    """The stage's model: ImageNet (or --pretrained) init for a new finetune run; for a new
    keypoint run, the frozen backbone of --load_from. A resumed run gets its weights later."""
    model = Delf(ncls, arch=args.arch, stage=args.stage, target_layer=args.target_layer,
                 pretrained="none" if resuming else args.pretrained,
                 use_random_gamma_rescale=args.use_random_gamma_rescale)
    if args.stage == "keypoint" and not resuming:
        load_backbone(model, args.load_from)
    return model


def _resume_checkpoint(last: Path) -> dict[str, Any]:
    try:
        return load_file(last)
    except CheckpointError as e:
        raise CheckpointError(f"--resume: {e}") from None


def _check_resumable(ckpt: dict[str, Any], args: argparse.Namespace, ncls: int, path: Path) -> None:
    info = describe(ckpt)
    wanted = {"stage": args.stage, "arch": args.arch, "target_layer": args.target_layer, "ncls": ncls}
    diff = [f"{k} {info[k]} (now {v})" for k, v in wanted.items() if info[k] != v]
    if diff:
        raise CheckpointError(f"{path}: cannot resume, the checkpoint has {', '.join(diff)}")


def _seed(args: argparse.Namespace, resume: dict[str, Any] | None, rt: Runtime) -> int:
    """--manualSeed, else the resumed run's seed, else a random one (the same on every process)."""
    if args.manualSeed is not None:
        return args.manualSeed
    if resume is not None and resume.get("config", {}).get("manualSeed") is not None:
        return int(resume["config"]["manualSeed"])
    seed = torch.tensor(random.SystemRandom().randrange(2**31))
    if rt.distributed:
        dist.broadcast(seed, src=0)
    return int(seed)


def _provenance(args: argparse.Namespace, resume: dict[str, Any] | None) -> dict[str, Any]:
    """sha256 of the finetune checkpoint a keypoint run started from."""
    if args.stage != "keypoint":
        return {}
    if resume is not None:
        return {"load_from_sha256": resume.get("config", {}).get("load_from_sha256")}
    return {"load_from_sha256": file_sha256(args.load_from)}


def _rank0_first(rt: Runtime, build: Callable[[], T]) -> T:
    """Run ``build`` on rank 0 first (it may download ImageNet weights), then on the others."""
    if rt.distributed and not rt.is_main:
        dist.barrier()
    try:
        return build()
    finally:
        if rt.distributed and rt.is_main:
            dist.barrier()


if __name__ == "__main__":
    main()
