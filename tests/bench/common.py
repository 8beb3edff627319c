"""Shared by the benchmarks: the machine they ran on (printed beside their figures) and an
interleaved timer."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def machine_report() -> str:
    """One line: CPU model, cores, which of FLAGS the CPU has, 1-minute load average, torch."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    present = [f for f in FLAGS if f in flags]
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"CPU {model}, {os.cpu_count()} cores, flags: {', '.join(present) or 'none of ' + '/'.join(FLAGS)}, "
            f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}{gpu}")


def compare(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function: one warm-up each, then ``repeats`` rounds that
    interleave them (so that load from other processes hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
