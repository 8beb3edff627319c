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

from .checkpoint import CheckpointError, describe_file, load_backbone, load_file, pretrained_state
from .config import TrainConfig
from .dataloader import ImageFolder, check_ncls, default_workers, image_folders, loaders, train_transform, val_transform
from .delf import Delf, Pretrained, PretrainedUnavailable
from .delg import Delg, LossWeights
from .gldv2 import Gldv2Images, read_gldv2
from .objective import Classification, DelgObjective, Objective
from .outputs import OutputInUse, OutputLock, file_sha256
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
    Raises ValueError (inconsistent options), RunRefused (the folder holds another run, or
    another process trains there), DataError, CheckpointError, PretrainedUnavailable,
    TrainingDiverged, OutputWriteError (in both, the last good checkpoint stays in ``ckpt/``).

    Rank 0 holds an exclusive lock on the folder (:class:`train.outputs.OutputLock`, beside it
    as ``<stage>.lock``) for the whole run; the OS releases it when the process ends, however.
    A folder whose ``ckpt/last.pth.tar`` exists is only used with ``resume`` (continue it) or
    ``overwrite`` (delete its checkpoints and logs once the data and model are ready, then
    start afresh).
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


class RunRefused(RuntimeError):
    """The output folder holds a run that neither --resume nor --overwrite was given for, or
    another process is training there; ``str(e)`` is the one-line reason."""


def _train(cfg: TrainConfig, rt: Runtime) -> None:
    lock = _claim_output(cfg, rt)
    try:
        _train_locked(cfg, rt)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: TrainConfig, rt: Runtime) -> None:
    out_dir = cfg.output_dir()
    last = out_dir / "ckpt" / "last.pth.tar"
    resume = _resume_checkpoint(last) if cfg.resume else None
    seed = _seed(cfg, resume, rt)
    seed_everything(seed)

    train_set, val_set = datasets(cfg)
    ncls = check_ncls(cfg.ncls, train_set)
    if resume is not None:
        _check_resumable(resume, cfg, ncls, last)
    model = _rank0_first(rt, lambda: build_model(cfg, ncls, resuming=resume is not None))
    config = cfg.as_dict(ncls=ncls, manualSeed=seed, world_size=rt.world_size,
                         classes=list(train_set.classes), **_provenance(cfg, resume))
    solver = Solver(model, Settings.from_config(cfg, seed), rt, out_dir, config, objective(cfg))
    if resume is not None:
        solver.load_state(resume, last)
    workers = cfg.workers if cfg.workers is not None else default_workers(rt.local_world_size)
    train_loader, val_loader = loaders(train_set, val_set, cfg.train_batch_size, cfg.val_batch_size,
                                       workers, seed, rt.rank, rt.world_size, pin_memory=rt.device.type == "cuda")
    if rt.is_main:
        log.info("%s stage: %s %s, %d classes, %d train / %d val images, %s x %d process(es), "
                 "epochs %d..%d -> %s", cfg.stage, cfg.arch, cfg.target_layer, ncls, len(train_set),
                 len(val_set), rt.device, rt.world_size, solver.start_epoch + 1, cfg.epochs, out_dir)
    if cfg.overwrite and rt.is_main:
        _remove_run(out_dir)
    solver.fit(train_loader, val_loader, cfg.epochs)
    if rt.is_main:
        log.info("done: best val top-1 %.2f%%, checkpoints in %s", solver.best_acc, out_dir / "ckpt")


def _claim_output(cfg: TrainConfig, rt: Runtime) -> OutputLock | None:
    """Rank 0 locks the stage folder for the run and checks that it may start there (see
    :func:`train`); every process stops with :class:`RunRefused` when it may not."""
    lock, problem = None, None
    if rt.is_main:
        try:
            lock = OutputLock(cfg.output_dir(), hint="choose another --expr")
            problem = _existing_run(cfg)
        except OutputInUse as e:
            problem = str(e)
        except OSError as e:  # e.g. a read-only repo folder
            problem = f"{cfg.output_dir()}: cannot lock the output folder ({e.strerror or e})"
        if problem is not None and lock is not None:
            lock.release()
            lock = None
        elif lock is not None:  # the lock is ours: temp files in ckpt/ are a killed run's leftovers
            for tmp in (cfg.output_dir() / "ckpt").glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
    if rt.distributed:
        refused = torch.tensor(int(problem is not None), device=rt.device)  # nccl: on the GPU
        dist.broadcast(refused, src=0)
        if refused.item() and not rt.is_main:
            problem = f"rank {rt.rank}: not starting, rank 0 refused (see its message)"
    if problem is not None:
        raise RunRefused(problem)
    return lock


def _existing_run(cfg: TrainConfig) -> str | None:
    """Why a run without --resume/--overwrite may not start in the stage folder, or None."""
    ckpt_dir = cfg.output_dir() / "ckpt"
    last, best = ckpt_dir / "last.pth.tar", ckpt_dir / "bestshot.pth.tar"
    if cfg.resume or cfg.overwrite or not (last.is_file() or best.is_file()):
        return None
    found = last if last.is_file() else best
    try:
        ckpt = load_file(found)
        what = f"epoch {int(ckpt['epoch'])}, best val top-1 {float(ckpt['best_acc']):.2f}%"
    except (CheckpointError, KeyError, TypeError, ValueError):
        what = "unreadable"
    if found == best:
        return (f"{best} holds a run ({what}) but there is no last.pth.tar: pass --overwrite to start afresh, "
                "replacing it")
    return (f"{last} holds a run ({what}): pass --resume to continue it or --overwrite to start afresh, "
            "replacing it")


def _remove_run(out_dir: Path) -> None:
    """--overwrite: remove the previous run's checkpoints and logs (the folder is ours: locked)."""
    patterns = {"ckpt": ("*.pth.tar",), "log": ("train.log", "val.log", "config.json", "events.out.tfevents.*")}
    for sub, globs in patterns.items():
        for pattern in globs:
            for path in (out_dir / sub).glob(pattern):
                path.unlink(missing_ok=True)
    log.info("--overwrite: removed the previous run's checkpoints and logs in %s", out_dir)


def datasets(cfg: TrainConfig) -> tuple[ImageFolder, ImageFolder]:
    """The stage's (train, val) datasets: two ImageFolders, or with ``--train_csv`` the GLDv2
    images under the stage's train path, split into train and val."""
    if cfg.train_csv is None:
        return image_folders(*cfg.data_paths, cfg.sample_size, cfg.crop_size)
    index = read_gldv2(cfg.train_csv, cfg.data_paths[0], cfg.min_images_per_class, cfg.val_fraction)
    return (Gldv2Images(index, "train", train_transform(cfg.sample_size, cfg.crop_size)),
            Gldv2Images(index, "val", val_transform(cfg.sample_size, cfg.crop_size)))


def objective(cfg: TrainConfig) -> Objective:
    """What the stage optimises: the DELG loss, or cross-entropy on the model's logits."""
    if cfg.stage == "delg":
        return DelgObjective(LossWeights(cfg.attention_loss_weight, cfg.reconstruction_loss_weight))
    return Classification()


def build_model(cfg: TrainConfig, ncls: int, resuming: bool) -> Delf | Delg:
    """The stage's model: ImageNet (or ``--pretrained PATH``) init for a new finetune or delg run;
    for a new keypoint run, the frozen backbone of ``--load_from``. A resumed run gets its
    weights later."""
    pretrained: Pretrained = "none"
    if cfg.stage in ("finetune", "delg") and not resuming:
        pretrained = cfg.pretrained
        if pretrained not in ("imagenet", "none"):
            pretrained = pretrained_state(cfg.pretrained)
    try:
        if cfg.stage == "delg":
            return Delg(ncls, arch=cfg.arch, global_dim=cfg.global_dim, autoencoder_dim=cfg.autoencoder_dim,
                        arcface_margin=cfg.arcface_margin, arcface_scale=cfg.arcface_scale, pretrained=pretrained,
                        block3_strides=cfg.delg_block3_strides)
        model = Delf(ncls, arch=cfg.arch, stage=cfg.stage, target_layer=cfg.target_layer, pretrained=pretrained,
                     use_random_gamma_rescale=cfg.use_random_gamma_rescale, attention_pool=cfg.attention_pool,
                     layout=cfg.layout, input_norm=cfg.normalisation)
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
    info = describe_file(ckpt, path)
    wanted = {"stage": cfg.stage, "arch": cfg.arch, "target_layer": cfg.target_layer, "ncls": ncls,
              "layout": cfg.layout, "input_norm": cfg.normalisation}
    if cfg.stage == "keypoint":
        wanted["attention_pool"] = cfg.attention_pool
    if cfg.stage == "delg":
        wanted.update(global_dim=cfg.global_dim, autoencoder_dim=cfg.autoencoder_dim,
                      block3_strides=cfg.delg_block3_strides)
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
