"""Benchmark: the trainer's training step vs a bare forward + backward + optimiser step of the
same model and batch, on CPU, fp32 and --amp (bf16). ResNet50, 586 classes, finetune and
keypoint stages. Goal: ratio <= 1.1.

Steps alternate (ours, bare, ours, ...) and each side reports its median, so load from other
processes hits both alike. Gamma rescaling is off so both sides see the same input size.
On a CPU without native bf16 (no AVX512-BF16/AMX) bf16 is emulated and very slow: the --amp
cases then run on a smaller batch (--amp_size, --amp_batch).

    .venv/bin/python tests/bench/bench_train.py [--size 224] [--batch 8] [--reps 3]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse

import torch

from tests.bench.common import compare, machine_report
from train.delf import Delf
from train.runtime import autocast, native_bf16
from train.solver import EpochMeter, LossWatch, Settings, Solver

NCLS = 586


def bare_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, criterion: torch.nn.Module,
              images: torch.Tensor, labels: torch.Tensor, amp: bool) -> None:
    """What a training step needs at the least."""
    with autocast(torch.device("cpu"), amp):
        loss = criterion(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def trainer_step(solver: Solver, meter: EpochMeter, watch: LossWatch, images: torch.Tensor,
                 labels: torch.Tensor) -> None:
    """The trainer's step as train_epoch runs it: train_step + metric and loss-watch accumulation
    (on the device, no host sync)."""
    out = solver.train_step(images, labels)
    meter.update(out.losses, out.logits, labels, out.parts)
    watch.update(out.loss, 0)


def bench(stage: str, amp: bool, size: int, batch: int, reps: int) -> None:
    torch.manual_seed(0)
    model = Delf(NCLS, arch="resnet50", stage=stage, use_random_gamma_rescale=False)
    solver = Solver(model, Settings(amp=amp))
    solver.net.train()
    meter, watch = EpochMeter(solver.device), LossWatch(solver.device)
    images, labels = torch.rand(batch, 3, size, size), torch.randint(0, NCLS, (batch,))

    t = compare({"ours": lambda: trainer_step(solver, meter, watch, images, labels),
                 "bare": lambda: bare_step(model, solver.optimizer, torch.nn.CrossEntropyLoss(), images, labels, amp)},
                reps)  # one warm-up each: allocator, oneDNN primitives
    ours_s, bare_s = t["ours"], t["bare"]
    print(f"{stage:9s} {'bf16' if amp else 'fp32':5s} {size:4d}px x{batch:<3d} "
          f"trainer {ours_s * 1000:8.0f} ms ({batch / ours_s:6.2f} img/s)  "
          f"bare {bare_s * 1000:8.0f} ms ({batch / bare_s:6.2f} img/s)  ratio {ours_s / bare_s:.3f}",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--amp_size", type=int, default=None, help="default: --size, or 96 without native bf16")
    p.add_argument("--amp_batch", type=int, default=None, help="default: --batch, or 2 without native bf16")
    args = p.parse_args()
    native = native_bf16()
    amp_size = args.amp_size or (args.size if native else 96)
    amp_batch = args.amp_batch or (args.batch if native else 2)
    print(machine_report())
    print(f"{torch.get_num_threads()} threads, ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {native}; resnet50, {NCLS} classes, SGD momentum; median of {args.reps}")
    for amp in (False, True):
        for stage in ("finetune", "keypoint"):
            bench(stage, amp, amp_size if amp else args.size, amp_batch if amp else args.batch, args.reps)


if __name__ == "__main__":
    main()
