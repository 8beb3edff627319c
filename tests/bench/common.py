"""Shared by the benchmarks: the machine they ran on (printed beside their figures), timers
(interleaved medians, one-shot wall + CPU time) and test inputs."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from PIL import Image

from tests.utils import photo

T = TypeVar("T")

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


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float, float]:
    """One call of ``fn(*args, **kwargs)``: its result, wall seconds and process CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of (N, D) ``x`` scaled to unit L2 norm, float32."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32, copy=False)


def test_image(width: int, height: int, name: str = "astronaut") -> Image.Image:
    """Bundled photo ``name`` resized (bicubic) to ``width`` x ``height``."""
    return Image.fromarray(photo(name)).resize((width, height), Image.Resampling.BICUBIC)
