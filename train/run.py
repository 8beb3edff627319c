"""One training stage as a library call, without argparse::

    from train.config import TrainConfig
    from train.run import train
    out = train(TrainConfig(stage="finetune", finetune_train_path="T", finetune_val_path="V"))
    # out == repo_dir() / "devel" / "finetune", holding ckpt/{bestshot,last}.pth.tar and log/
"""
from __future__ import annotations

import logging
import random
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, describe, file_sha256, load_backbone, load_file, pretrained_state
from .config import TrainConfig
from .dataloader import check_ncls, default_workers, image_folders, loaders
from .delf import Delf, Pretrained, PretrainedUnavailable
from .runtime import Runtime, deterministic_mode, seed_everything, setup_runtime, teardown_runtime
from .solver import Settings, Solver

log = logging.getLogger("delf")
T = TypeVar("T")
DOWNLOAD_TIMEOUT = timedelta(hours=2)


def train(cfg: TrainConfig, runtime: Runtime | None = None) -> Path:
    """Train ``cfg.stage`` and return its output folder ``cfg.output_dir()``
    (``repo_dir()/<expr>/<stage>``: ``ckpt/bestshot.pth.tar``, ``ckpt/last.pth.tar``, ``log/``).

    ``runtime``: device and place among torchrun's processes; by default
    ``setup_runtime(cfg.device, cfg.gpu_id)``, whose process group (if it made one) is left at the end.
    Raises ValueError (inconsistent options), DataError, CheckpointError, PretrainedUnavailable,
    TrainingDiverged (the last good checkpoint stays in ``ckpt/``).
    """
    cfg.check()
    own_group = runtime is None and not dist.is_initialized()
    rt = runtime or setup_runtime(cfg.device, cfg.gpu_id)
    try:
        with deterministic_mode(cfg.deterministic):
            _train(cfg, rt)
    finally:
        if own_group:
            teardown_runtime()
    return cfg.output_dir()


def _train(cfg: TrainConfig, rt: Runtime) -> None:
    out_dir = cfg.output_dir()
    last = out_dir / "ckpt" / "last.pth.tar"
    resume = _resume_checkpoint(last) if cfg.resume else None
    if resume is None and last.is_file() and rt.is_main:
        log.warning("%s exists and will be overwritten (pass --resume to continue that run)", last)
    seed = _seed(cfg, resume, rt)
    seed_everything(seed)

    train_set, val_set = image_folders(*cfg.data_paths, cfg.sample_size, cfg.crop_size)
    ncls = check_ncls(cfg.ncls, train_set)
    if resume is not None:
        _check_resumable(resume, cfg, ncls, last)
    model = _rank0_first(rt, lambda: build_model(cfg, ncls, resuming=resume is not None))
    config = cfg.as_dict(ncls=ncls, manualSeed=seed, world_size=rt.world_size,
                         classes=list(train_set.classes), **_provenance(cfg, resume))
    solver = Solver(model, Settings.from_config(cfg, seed), rt, out_dir, config)
    if resume is not None:
        solver.load_state(resume, last)
    workers = cfg.workers if cfg.workers is not None else default_workers(rt.local_world_size)
    train_loader, val_loader = loaders(train_set, val_set, cfg.train_batch_size, cfg.val_batch_size,
                                       workers, seed, rt.rank, rt.world_size, pin_memory=rt.device.type == "cuda")
    if rt.is_main:
        log.info("%s stage: %s %s, %d classes, %d train / %d val images, %s x %d process(es), "
                 "epochs %d..%d -> %s", cfg.stage, cfg.arch, cfg.target_layer, ncls, len(train_set),
                 len(val_set), rt.device, rt.world_size, solver.start_epoch + 1, cfg.epochs, out_dir)
    solver.fit(train_loader, val_loader, cfg.epochs)
    if rt.is_main:
        log.info("done: best val top-1 %.2f%%, checkpoints in %s", solver.best_acc, out_dir / "ckpt")


def build_model(cfg: TrainConfig, ncls: int, resuming: bool) -> Delf:
    """The stage's model: ImageNet (or ``--pretrained PATH``) init for a new finetune run; for a
    new keypoint run, the frozen backbone of ``--load_from``. A resumed run gets its weights later."""
    pretrained: Pretrained = "none"
    if cfg.stage == "finetune" and not resuming:
        pretrained = cfg.pretrained
        if pretrained not in ("imagenet", "none"):
            pretrained = pretrained_state(cfg.pretrained)
    try:
        model = Delf(ncls, arch=cfg.arch, stage=cfg.stage, target_layer=cfg.target_layer, pretrained=pretrained,
                     use_random_gamma_rescale=cfg.use_random_gamma_rescale, attention_pool=cfg.attention_pool)
    except PretrainedUnavailable as e:
        if isinstance(pretrained, str):
            raise
        raise PretrainedUnavailable(f"{cfg.pretrained} is {e}") from None
    if cfg.stage == "keypoint" and not resuming:
        load_backbone(model, cfg.load_from)
    return model


def _resume_checkpoint(last: Path) -> dict[str, Any]:
    try:
        return load_file(last)
    except CheckpointError as e:
        raise CheckpointError(f"--resume: {e}") from None


def _check_resumable(ckpt: dict[str, Any], cfg: TrainConfig, ncls: int, path: Path) -> None:
    info = describe(ckpt)
    wanted = {"stage": cfg.stage, "arch": cfg.arch, "target_layer": cfg.target_layer, "ncls": ncls}
    if cfg.stage == "keypoint":
        wanted["attention_pool"] = cfg.attention_pool
    diff = [f"{k} {info[k]} (now {v})" for k, v in wanted.items() if info[k] != v]
    if diff:
        raise CheckpointError(f"{path}: cannot resume, the checkpoint has {', '.join(diff)}")


def _seed(cfg: TrainConfig, resume: dict[str, Any] | None, rt: Runtime) -> int:
    """--manualSeed, else the resumed run's seed, else a random one (the same on every process)."""
    if cfg.manualSeed is not None:
        return cfg.manualSeed
    if resume is not None and resume.get("config", {}).get("manualSeed") is not None:
        return int(resume["config"]["manualSeed"])
    seed = torch.tensor(random.SystemRandom().randrange(2**31), device=rt.device)  # nccl: on the GPU
    if rt.distributed:
        dist.broadcast(seed, src=0)
    return int(seed.item())


def _provenance(cfg: TrainConfig, resume: dict[str, Any] | None) -> dict[str, Any]:
    """sha256 of the finetune checkpoint a keypoint run started from."""
    if cfg.stage != "keypoint":
        return {}
    if resume is not None:
        return {"load_from_sha256": resume.get("config", {}).get("load_from_sha256")}
    return {"load_from_sha256": file_sha256(cfg.load_from)}


def _rank0_first(rt: Runtime, build: Callable[[], T]) -> T:
    """Run ``build`` on each node's first process first (it may download ImageNet weights into
    the node's cache), then on the others. They wait at a barrier of a gloo group with a
    :data:`DOWNLOAD_TIMEOUT`: the default group's (NCCL: 10 minutes) could end a slow download."""
    if not rt.distributed:
        return build()
    group = dist.new_group(backend="gloo", timeout=DOWNLOAD_TIMEOUT)
    first = rt.local_rank == 0
    try:
        if not first:
            dist.barrier(group=group)
        return build()
    finally:
        if first:
            dist.barrier(group=group)
