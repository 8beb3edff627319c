"""Process set-up shared by the trainer and the extractor: devices, torchrun, seeds, flags."""
from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from threadpoolctl import ThreadpoolController

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REPO_DIR_ENV = "DELF_REPO_DIR"
log = logging.getLogger("delf")
_pools: ThreadpoolController | None = None  # made once: it scans the loaded libraries


def repo_dir() -> Path:
    """Root of every output (``repo/<expr>/...``): ``$DELF_REPO_DIR`` when set, else
    ``<project root>/repo``. Read at each call, so a test or a notebook may change it."""
    return Path(os.environ.get(REPO_DIR_ENV) or PROJECT_ROOT / "repo")


@contextmanager
def limit_threads(n: int = 1) -> Iterator[None]:
    """At most ``n`` threads for torch's intra-op pool and the BLAS/OpenMP pools (threadpoolctl)
    inside the block. Small matrix products on a busy machine run faster on one thread than on a
    pool whose workers wait for a core."""
    global _pools
    if _pools is None:
        _pools = ThreadpoolController()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with _pools.limit(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device and its place among torchrun's processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(device: str = "auto", gpu_id: str | None = None, backend: str | None = None) -> Runtime:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the default process group:
    ``backend``, by default nccl on CUDA (the trainer's collectives run on the device) and gloo on
    CPU; extraction, whose few collectives are all on the CPU, passes "gloo" and starts no NCCL.

    ``gpu_id`` sets CUDA_VISIBLE_DEVICES as the seed did; it must happen before CUDA initialises,
    which is why it lives here (once CUDA has started in this process, it is ignored, with a
    warning). ``device``: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'. With CUDA, each of
    torchrun's processes on a node takes its own GPU (cuda:LOCAL_RANK); more processes than
    visible GPUs, one ``cuda:N`` for several processes, a GPU that is not there, or an unknown
    device is a one-line error (SystemExit; NCCL fails obscurely when two processes share a GPU).
    """
    gpu_id = str(gpu_id) if gpu_id else None
    visible_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    started_before = torch.cuda.is_initialized()
    if gpu_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device == "auto":
        if torch.cuda.is_available():
            dev = _local_gpu(local_rank, local_world_size, gpu_id)
        else:
            if rank == 0:
                if gpu_id:  # asked for a GPU: a warning, which both CLIs print however logging is set up
                    log.warning("CUDA is not available (--gpu_id %s shows no GPU): running on CPU", gpu_id)
                else:
                    log.info("CUDA is not available: running on CPU")
            dev = torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise SystemExit(f"error: --device {device}: expected auto, cpu, cuda or cuda:N") from None
        if dev.type not in ("cpu", "cuda"):
            raise SystemExit(f"error: --device {device}: expected auto, cpu, cuda or cuda:N")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit(f"error: --device {device} asked for, but CUDA is not available")
            if dev.index is None:
                dev = _local_gpu(local_rank, local_world_size, gpu_id)
            elif local_world_size > 1:
                raise SystemExit(f"error: --device {device} puts all {local_world_size} processes of this node "
                                 "on one GPU; use --device cuda (one GPU per process) or --gpu_id")
            elif dev.index >= (count := torch.cuda.device_count()):
                choices = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
                raise SystemExit(f"error: --device {device}: no such GPU; {_shown(gpu_id)} {count} GPU(s): "
                                 f"use {choices}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # CUDA reads the variable when it starts: set later, it changed nothing (the runtime then
        # sees more GPUs than --gpu_id lists)
        if gpu_id is not None and ((started_before and visible_before != gpu_id)
                                   or torch.cuda.device_count() > len(gpu_id.split(","))):
            log.warning("--gpu_id %s is ignored: CUDA had already started in this process (CUDA_VISIBLE_DEVICES=%s); "
                        "start a new process, or pick the GPU with --device cuda:N", gpu_id,
                        "unset" if visible_before is None else visible_before or "''")
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if backend == "nccl":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group(backend)
    return Runtime(dev, rank, world_size, local_rank, local_world_size)


def _shown(gpu_id: str | None) -> str:
    """Who decided which GPUs this process sees, for messages: "--gpu_id 6 shows", ..."""
    if gpu_id:
        return f"--gpu_id {gpu_id} shows"
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} shows"
    return "this machine has"


def _local_gpu(local_rank: int, local_world_size: int, gpu_id: str | None) -> torch.device:
    """cuda:LOCAL_RANK, after checking that every process of this node gets a GPU of its own."""
    count = torch.cuda.device_count()
    if local_world_size > count:
        raise SystemExit(f"error: {local_world_size} processes per node (--nproc_per_node) but {_shown(gpu_id)} "
                         f"{count} GPU(s): start at most {count} per node, or give --gpu_id one GPU per process "
                         "(e.g. --gpu_id 0,1)")
    return torch.device("cuda", local_rank)


CUBLAS_WORKSPACE_CONFIG = ":4096:8"


@contextmanager
def deterministic_mode(enabled: bool = True) -> Iterator[None]:
    """Inside the block (when ``enabled``): deterministic algorithms only (an op that has none
    raises), cuDNN deterministic and not autotuning, TF32 off for matmuls and convolutions, and
    ``CUBLAS_WORKSPACE_CONFIG`` set as deterministic cuBLAS needs (read when cuBLAS starts: enter
    the block before the first CUDA matmul). The previous settings come back afterwards.

    Then a run repeats bit for bit on the same device model, software versions and process
    count; CPU and CUDA results still differ by rounding.
    """
    if not enabled:
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark,
              cudnn.allow_tf32, matmul.allow_tf32, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = True, False, False, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = before[1:5]
        if before[5] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def teardown_runtime() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, index: int, stride: int) -> int:
    """The seed of item ``index`` (a sample, a process; ``0 <= index < stride``) in ``epoch`` of a run
    seeded ``seed``: it depends on these alone, so a resumed run draws the same numbers as an
    uninterrupted one."""
    return ((seed * 1_000_003 + epoch) * stride + index) % 2**63


def setup_logging(is_main: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo's names of native bf16 arithmetic


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """This CPU's feature flags as the first ``flags`` line of ``cpuinfo`` lists them; empty where
    there is none (not Linux, or not x86)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether a CPU with ``flags`` (this one's by default: :func:`cpu_flags`) computes bf16
    natively: avx512_bf16 or amx_bf16. Elsewhere oneDNN emulates bf16, several times slower than
    fp32 (an AVX512 CPU without these included); a CPU whose flags cannot be read counts as
    emulating."""
    return not BF16_CPU_FLAGS.isdisjoint(cpu_flags() if flags is None else flags)


def warn_if_slow_amp(device: torch.device, enabled: bool) -> None:
    """--amp on a CPU without native bf16 emulates it: many times slower than fp32. Say so."""
    if enabled and device.type == "cpu" and not native_bf16():
        log.warning("--amp: this CPU has no native bf16 (avx512_bf16/AMX); bf16 is emulated and much "
                    "slower than fp32 (leave --amp out on this machine)")


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` (cuDNN autotuning: worth it only where input sizes
    repeat) set to ``enabled`` inside the block, and the previous value back afterwards: a
    notebook that trains and then extracts does not autotune every new pyramid shape."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def amp_dtype(device: torch.device) -> torch.dtype:
    """The dtype of ``--amp`` on ``device``: bf16 on CPU and on GPUs that compute it natively
    (compute capability 8.0, Ampere, and later: as torch.cuda.is_bf16_supported(including_emulation
    =False) for that GPU); fp16 (with a GradScaler in training) on older GPUs. bf16 has float32's
    range: no loss scaling, and BatchNorm folded into the convolutions cannot overflow it."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype | None = None) -> torch.autocast:
    """Autocast to ``dtype``, by default :func:`amp_dtype` (bf16 on CPU and recent GPUs, fp16 on older GPUs)."""
    dtype = dtype or amp_dtype(device)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)
