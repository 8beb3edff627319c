"""The machine a benchmark ran on, printed beside its figures: CPU model, cores, bf16/AMX flags,
load, torch version."""
from __future__ import annotations

import os
import platform
from pathlib import Path

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
