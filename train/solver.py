"""The training loop: one step, one epoch, validation, checkpoints and logs.

Shaped like pytorch/examples' ImageNet trainer: ``train_epoch`` and ``validate`` over loaders,
metrics accumulated per epoch (and summed across torchrun processes), checkpoints and logs
written by rank 0 only.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data as data
from tqdm import tqdm

from .checkpoint import CheckpointError, atomic_save, checkpoint_dict
from .config import TrainConfig
from .delf import Delf
from .delg import Delg
from .objective import Classification, Objective, StepOutput
from .outputs import OutputWriteError
from .runtime import Runtime, amp_dtype, autocast, cudnn_benchmark, epoch_seed, seed_everything, warn_if_slow_amp

log = logging.getLogger("delf")

TOPK = (1, 3, 5)
LOG_COLUMNS = ("epoch", "lr", "loss", "top1", "top3", "top5")
CHECK_EVERY = 50  # training steps between host syncs (progress bar, non-finite-loss check)
MAX_SKIPPED = 20  # fp16 with GradScaler: this many non-finite losses in a row mean divergence
MIN_SCALE = 1.0  # fp16 with GradScaler: a loss scale below this means divergence
RANK_STRIDE = 1009  # epoch_seed stride of the per-process epoch seeds (> any process count)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (without a GradScaler), or kept being so (with one)."""


class LossWatch:
    """Non-finite training losses of one epoch, recorded on the device with no host sync per
    step: the longest run of consecutive ones, the first step that had one, and whether that
    one was NaN. :meth:`read` syncs once and agrees across processes (one all-reduce)."""

    def __init__(self, device: torch.device) -> None:
        self.run = torch.zeros((), dtype=torch.float64, device=device)
        # max-reduced across processes: longest run, -(first bad step), first bad one was NaN
        self.state = torch.tensor([0.0, -math.inf, 0.0], dtype=torch.float64, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach()
        bad = ~torch.isfinite(loss)
        self.run = (self.run + 1) * bad
        first = bad & (self.state[1] == -math.inf)
        self.state = torch.stack([torch.maximum(self.state[0], self.run),
                                  torch.where(first, -float(step), self.state[1]),
                                  torch.where(first, torch.isnan(loss).double(), self.state[2])])

    def read(self, distributed: bool) -> tuple[int, int | None, bool]:
        """(longest run of non-finite losses, first such step or None, whether it was NaN) over
        all processes."""
        state = self.state.clone()
        if distributed:
            dist.all_reduce(state, op=dist.ReduceOp.MAX)
        longest, neg_first, nan = state.tolist()
        return int(longest), None if neg_first == -math.inf else int(-neg_first), bool(nan)


@dataclass(frozen=True)
class Settings:
    """Optimisation settings of :class:`Solver`; defaults are the trainer's (:class:`TrainConfig`)."""

    optim: str = TrainConfig.optim
    lr: float = TrainConfig.lr
    momentum: float = TrainConfig.momentum
    weight_decay: float = TrainConfig.weight_decay
    lr_stepsize: int = TrainConfig.lr_stepsize
    lr_gamma: float = TrainConfig.lr_gamma
    amp: bool = TrainConfig.amp
    clip_grad_norm: float = 0.0  # clip the gradients' global L2 norm to this; 0: off
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig, seed: int) -> Settings:
        """The optimisation options of ``cfg``, with the run's ``seed`` (gradient clipping in the
        delg stage only)."""
        clip = cfg.clip_grad_norm if cfg.stage == "delg" else 0.0
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls) if f.name not in ("seed", "clip_grad_norm")},
                   clip_grad_norm=clip, seed=seed)


def build_optimizer(params: Iterable[nn.Parameter], s: Settings) -> torch.optim.Optimizer:
    """sgd (with ``momentum``) | adam | rmsprop (as the seed: no momentum) over ``params``."""
    params = list(params)
    if s.optim == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optim == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optim == "rmsprop":
        return torch.optim.RMSprop(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimiser {s.optim!r}: choose sgd, adam or rmsprop")


def correct_topk(outputs: torch.Tensor, labels: torch.Tensor, topk: Iterable[int] = TOPK) -> torch.Tensor:
    """Number of samples whose label is among the k best scores, for each k (k clamped to the
    number of classes)."""
    ks = [min(k, outputs.shape[1]) for k in topk]
    best = outputs.topk(max(ks), dim=1).indices
    hits = best.eq(labels.view(-1, 1)).cumsum(dim=1)
    return torch.stack([hits[:, k - 1].sum() for k in ks]).float()


class EpochMeter:
    """Sums of loss, top-k hits and the loss's ``parts`` over an epoch, kept on the device, and
    the sample count (a Python int). With ``limit``, only the first ``limit`` samples count: a
    DistributedSampler pads the last batches with repeats so that every process gets as many
    batches, and those repeats are trained on but must not count twice in the metrics (see
    :func:`real_samples`)."""

    def __init__(self, device: torch.device, limit: int | None = None, parts: tuple[str, ...] = ()) -> None:
        self.device, self.limit, self.parts = device, limit, parts
        self.sums = torch.zeros(1 + len(TOPK) + len(parts), dtype=torch.float64, device=device)
        self.count = 0

    def update(self, loss: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor,
               parts: dict[str, torch.Tensor] | None = None) -> None:
        """Add a batch: ``loss`` the per-sample losses (B,), ``outputs`` (B, ncls) logits,
        ``parts`` the per-sample (B,) values of each of ``self.parts``."""
        n = labels.shape[0]
        if self.limit is not None and self.count + n > self.limit:
            n = max(self.limit - self.count, 0)
            if n == 0:
                return
            outputs, labels = outputs[:n], labels[:n]
        loss_sum = loss.detach().double()[:n].sum()
        part_sums = [parts[p].detach().double()[:n].sum() for p in self.parts] if parts else []
        self.sums += torch.cat([loss_sum.view(1), correct_topk(outputs, labels).double(),
                                torch.stack(part_sums) if part_sums else self.sums.new_zeros(0)])
        self.count += n

    def all_reduce(self) -> None:
        """Sum over torchrun's processes (one collective, on the run's device)."""
        if dist.is_initialized():
            totals = torch.cat([self.sums, torch.tensor([float(self.count)], dtype=torch.float64,
                                                        device=self.device)])
            dist.all_reduce(totals)
            self.sums, self.count = totals[:-1], int(totals[-1].item())

    def averages(self) -> dict[str, float]:
        """loss (mean), top1/top3/top5 (percent), loss_<part> (mean) for each part and the number of
        samples counted."""
        loss_sum, *rest = self.sums.tolist()
        hits, parts = rest[:len(TOPK)], rest[len(TOPK):]
        n = max(self.count, 1)
        return {"loss": loss_sum / n, **{f"top{k}": 100.0 * h / n for k, h in zip(TOPK, hits, strict=True)},
                **{f"loss_{p}": v / n for p, v in zip(self.parts, parts, strict=True)}, "samples": self.count}


def real_samples(sampler: data.Sampler | None) -> int | None:
    """How many of the indices ``sampler`` gives this process are distinct samples: a
    DistributedSampler without drop_last pads the shuffled list to a multiple of the process
    count with its first indices, and the padding lands at the end of each process's share.
    None (count all) for other samplers."""
    if not isinstance(sampler, data.DistributedSampler) or sampler.drop_last:
        return None
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))


class RunLog:
    """config.json, CSV train.log / val.log (``columns``: epoch, lr, loss, top1, top3, top5 and
    any loss parts) and tensorboardX events in ``log_dir``. On resume, rows after
    ``start_epoch`` are dropped."""

    def __init__(self, log_dir: Path, config: dict[str, Any], start_epoch: int = 0,
                 columns: tuple[str, ...] = LOG_COLUMNS) -> None:
        from tensorboardX import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.columns = columns
        self.csv = {split: log_dir / f"{split}.log" for split in ("train", "val")}
        for path in self.csv.values():
            _restart_csv(path, start_epoch, columns)
        self.writer = SummaryWriter(logdir=str(log_dir), purge_step=start_epoch + 1 if start_epoch else None)

    def write(self, split: str, epoch: int, lr: float, metrics: dict[str, float]) -> None:
        row = {"epoch": epoch, "lr": lr, **metrics}
        with self.csv[split].open("a", newline="") as f:
            csv.writer(f).writerow([row[c] for c in self.columns])
        for name in self.columns[1:]:
            self.writer.add_scalar(f"{split}/{name}", row[name], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _restart_csv(path: Path, start_epoch: int, columns: tuple[str, ...] = LOG_COLUMNS) -> None:
    """A CSV log holding the header and the rows of epochs <= ``start_epoch``."""
    rows: list[list[str]] = []
    if start_epoch and path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= start_epoch]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([list(columns), *rows])


class Solver:
    """Trains ``model`` (a :class:`Delf` in the finetune or keypoint stage, a :class:`Delg`) on
    ``objective`` (default: cross-entropy on the model's logits).

    Only parameters that require gradients reach the optimiser: in the keypoint stage, the
    attention network and the classifier. ``out_dir`` (``repo_dir()/<expr>/<stage>``) receives
    ``ckpt/`` and ``log/``; None writes nothing.
    """

    def __init__(self, model: Delf | Delg, settings: Settings, runtime: Runtime | None = None,
                 out_dir: Path | None = None, config: dict[str, Any] | None = None,
                 objective: Objective | None = None) -> None:
        self.rt = runtime or Runtime(torch.device("cpu"))
        self.settings, self.out_dir, self.config = settings, out_dir, config or {}
        self.device = self.rt.device
        self.amp = settings.amp
        self.memory_format = torch.channels_last if self.amp else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.net: nn.Module = model
        if self.rt.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.objective: Objective = objective or Classification()
        self.optimizer = build_optimizer((p for p in model.parameters() if p.requires_grad), settings)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, settings.lr_stepsize, settings.lr_gamma)
        # fp16 (GPUs without bf16) needs loss scaling; bf16 has float32's range
        fp16 = self.amp and self.device.type == "cuda" and amp_dtype(self.device) == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.start_epoch = 0
        self.best_acc = 0.0
        self.saved_epoch: int | None = None  # epoch of the last.pth.tar this run wrote or resumed from
        warn_if_slow_amp(self.device, self.amp)

    def autotune(self, training: bool) -> bool:
        """Whether cuDNN may benchmark its convolution algorithms (``cudnn.benchmark``).

        Only where every batch has the same input size: benchmarking runs once per new size, so
        with random gamma rescaling (the keypoint stage's training batches take hundreds of
        sizes) it would re-benchmark nearly every batch, differently on each process, and the
        processes would wait for each other. The sizes are not rounded to a few buckets instead:
        that would change the seed's augmentation, and the keypoint stage's trainable part (the
        attention head and classifier) is small, so autotuning its frozen backbone's forward
        gains little. Validation crops are fixed, so it benchmarks there. Never under
        ``--deterministic`` (:func:`train.runtime.deterministic_mode`). Set for each epoch and
        validation only: the previous value comes back after them.
        """
        if self.device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
            return False
        gamma = self.model.stage == "keypoint" and self.model.use_random_gamma_rescale
        return not (training and gamma)

    # --- one step ------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """Forward, backward (gradients clipped to ``settings.clip_grad_norm`` when > 0) and
        optimiser step on one batch; returns the objective's (loss, logits, losses, parts),
        detached, without waiting for the device. A non-finite loss is not checked here (that
        would sync every step): with a GradScaler (fp16) the step is skipped and the scale
        lowered; without, :meth:`train_epoch` stops the run at its next check, before any
        checkpoint is written."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp):
            out = self.objective(self.net, images, labels, training=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        if self.settings.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op without fp16)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return out.detach()

    def check_losses(self, watch: LossWatch, epoch: int, end_of_epoch: bool) -> None:
        """Raise :class:`TrainingDiverged` when the run diverged: any non-finite loss without a
        GradScaler; with one (fp16), :data:`MAX_SKIPPED` non-finite losses in a row or a loss
        scale below :data:`MIN_SCALE` (isolated overflows are expected: the scaler skips them)."""
        longest, first, nan = watch.read(self.rt.distributed)
        where = f"at epoch {epoch + 1}, step {first + 1}" if first is not None else ""
        if not self.scaler.is_enabled():
            if first is not None:
                raise TrainingDiverged(f"loss is {'nan' if nan else 'inf'} {where}: training stopped")
            return
        scale = self.scaler.get_scale()
        if longest >= MAX_SKIPPED or scale < MIN_SCALE:
            raise TrainingDiverged(f"fp16 training diverged: {longest} non-finite losses in a row (first {where}), "
                                   f"loss scale {scale:g}: training stopped")
        if end_of_epoch and first is not None and self.rt.is_main:
            log.warning("fp16: steps with a non-finite loss were skipped this epoch (first %s); loss scale now %g",
                        where, scale)

    # --- epochs --------------------------------------------------------------------------------
    def train_epoch(self, loader: data.DataLoader, epoch: int, epochs: int) -> dict[str, float]:
        """One pass over ``loader``; metrics averaged over all processes, each sample counted once.
        The host waits for the device only every :data:`CHECK_EVERY` steps (progress bar and
        divergence check) and at the end."""
        self.net.train()
        with cudnn_benchmark(self.autotune(training=True)):
            return self._train_epoch(loader, epoch, epochs)

    def _train_epoch(self, loader: data.DataLoader, epoch: int, epochs: int) -> dict[str, float]:
        meter = EpochMeter(self.device, limit=real_samples(getattr(loader, "sampler", None)),
                           parts=self.objective.parts)
        watch = LossWatch(self.device)
        bar = tqdm(loader, desc=f"train {epoch + 1}/{epochs}", disable=not self.rt.is_main,
                   leave=False, dynamic_ncols=True)
        for step, (images, labels) in enumerate(bar):
            labels = labels.to(self.device, non_blocking=True)
            out = self.train_step(images, labels)
            meter.update(out.losses, out.logits, labels, out.parts)
            watch.update(out.loss, step)
            if (step + 1) % CHECK_EVERY == 0:
                self.check_losses(watch, epoch, end_of_epoch=False)
                if self.rt.is_main:
                    avg = meter.averages()
                    bar.set_postfix({k: f"{avg[k]:.3f}" for k in ("loss", "top1")})
        self.check_losses(watch, epoch, end_of_epoch=True)
        meter.all_reduce()
        return meter.averages()

    @torch.no_grad()
    def validate(self, loader: data.DataLoader, epoch: int, epochs: int) -> dict[str, float]:
        """Loss and accuracy on ``loader`` (each process its own shard, then summed)."""
        self.model.eval()
        with cudnn_benchmark(self.autotune(training=False)):
            return self._validate(loader, epoch, epochs)

    def _validate(self, loader: data.DataLoader, epoch: int, epochs: int) -> dict[str, float]:
        meter = EpochMeter(self.device, parts=self.objective.parts)
        bar = tqdm(loader, desc=f"val {epoch + 1}/{epochs}", disable=not self.rt.is_main,
                   leave=False, dynamic_ncols=True)
        for images, labels in bar:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            labels = labels.to(self.device, non_blocking=True)
            with autocast(self.device, self.amp):
                out = self.objective(self.model, images, labels, training=False)
            meter.update(out.losses, out.logits, labels, out.parts)
        meter.all_reduce()
        return meter.averages()

    def fit(self, train_loader: data.DataLoader, val_loader: data.DataLoader, epochs: int) -> None:
        """Train from ``start_epoch`` to ``epochs``: train, step the LR schedule, validate,
        save bestshot (best val top-1) and last checkpoints, log."""
        run_log = None
        if self.out_dir is not None and self.rt.is_main:
            try:
                columns = LOG_COLUMNS + tuple(f"loss_{p}" for p in self.objective.parts)
                run_log = RunLog(self.out_dir / "log", self.config, self.start_epoch, columns)
            except OSError as e:
                raise OutputWriteError(self._write_failure(self.out_dir / "log", e)) from None
        try:
            for epoch in range(self.start_epoch, epochs):
                self._run_epoch(train_loader, val_loader, epoch, epochs, run_log)
        finally:
            if run_log is not None:
                run_log.close()

    def _run_epoch(self, train_loader: data.DataLoader, val_loader: data.DataLoader, epoch: int,
                   epochs: int, run_log: RunLog | None) -> None:
        start = time.perf_counter()
        # augmentation and gamma rescaling depend only on (seed, epoch, rank)
        seed_everything(epoch_seed(self.settings.seed, epoch, self.rt.rank, stride=RANK_STRIDE))
        if isinstance(train_loader.sampler, data.DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        train = self.train_epoch(train_loader, epoch, epochs)
        self.scheduler.step()
        val = self.validate(val_loader, epoch, epochs)
        is_best = epoch == 0 or val["top1"] > self.best_acc
        if is_best:
            self.best_acc = val["top1"]
        if self.rt.is_main:
            self.save(epoch + 1, is_best)
            if run_log is not None:
                try:
                    run_log.write("train", epoch + 1, lr, train)
                    run_log.write("val", epoch + 1, lr, val)
                except OSError as e:
                    raise OutputWriteError(self._write_failure(run_log.csv["train"].parent, e)) from None
            parts = "".join(f"  {p} {train[f'loss_{p}']:.4f}/{val[f'loss_{p}']:.4f}" for p in self.objective.parts)
            log.info("epoch %d/%d  lr %.3g  train loss %.4f top1 %.2f  val loss %.4f top1 %.2f top5 %.2f"
                     "%s%s  (%.1f s)", epoch + 1, epochs, lr, train["loss"], train["top1"], val["loss"],
                     val["top1"], val["top5"], parts, "  *best*" if is_best else "", time.perf_counter() - start)

    # --- checkpoints ---------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "ckpt"

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        """This project's checkpoint format after ``epoch`` completed epochs."""
        extra = {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}
        return checkpoint_dict(self.model, epoch=epoch, best_acc=self.best_acc,
                               optimizer=self.optimizer.state_dict(),
                               lr_scheduler=self.scheduler.state_dict(), config=self.config, **extra)

    def save(self, epoch: int, is_best: bool) -> None:
        """Write bestshot.pth.tar (when ``is_best``) then last.pth.tar, each atomically."""
        if self.ckpt_dir is None:
            return
        ckpt = self.checkpoint(epoch)
        names = ("bestshot.pth.tar", "last.pth.tar") if is_best else ("last.pth.tar",)
        for name in names:
            try:
                atomic_save(ckpt, self.ckpt_dir / name)
            except OSError as e:
                raise OutputWriteError(self._write_failure(self.ckpt_dir / name, e)) from None
        self.saved_epoch = epoch

    def _write_failure(self, path: Path, error: OSError) -> str:
        """One line: what could not be written, why, and what is kept (writes are atomic: a
        failed one leaves the previous file whole)."""
        reason = error.strerror or str(error) or type(error).__name__
        if self.saved_epoch is not None and self.ckpt_dir is not None:
            kept = f"{self.ckpt_dir / 'last.pth.tar'} (epoch {self.saved_epoch}) is kept: --resume continues from it"
        else:
            kept = "no checkpoint was written: rerun the command to start again"
        return f"could not write {path} ({reason}); {kept}"

    def load_state(self, ckpt: dict[str, Any], source: str | Path) -> None:
        """Continue from a checkpoint of this trainer: weights, optimiser, LR schedule, AMP
        scaler, best accuracy and the epoch count."""
        try:
            self.model.load_state_dict(ckpt["state_dict"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["lr_scheduler"])
            if self.scaler.is_enabled() and "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{source}: cannot resume from it: {e}") from None
        self.start_epoch = self.saved_epoch = int(ckpt["epoch"])
        self.best_acc = float(ckpt["best_acc"])
