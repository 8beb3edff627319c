"""The trainer on GPUs and under torchrun, checked on CPU where possible: collectives on the run's
device, one GPU per process, fp16 loss scaling, host syncs, data-loader defaults, determinism.
Tests marked ``cuda`` run where a GPU is present."""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.utils.data as data

import extract.extractor as extractor_cli
import train.main as train_cli
import train.run as train_run
import train.runtime as runtime
import train.solver as solver_module
from extract.errors import UserError
from extract.extraction.workshare import WorkShare
from tests.utils import assert_same_training, run_trainer
from train.checkpoint import load_file
from train.config import TrainConfig, parse_args
from train.dataloader import default_workers, image_folders, loaders
from train.delf import Delf
from train.objective import Classification, StepOutput
from train.run import _claim_output, _rank0_first, _seed
from train.runtime import Runtime, amp_dtype, autocast, deterministic_mode, repo_dir, setup_runtime
from train.solver import EpochMeter, LossWatch, Settings, Solver, TrainingDiverged

META = torch.device("meta")


class Collective(Exception):
    """Raised by the fake collectives once they have recorded their tensor."""


@pytest.fixture
def fake_collectives(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.device]]:
    """dist.broadcast / all_reduce replaced: they record (name, tensor device) and raise Collective."""
    calls: list[tuple[str, torch.device]] = []

    def fake(name: str):
        def collective(tensor: torch.Tensor, *args: object, **kwargs: object) -> None:
            calls.append((name, tensor.device))
            raise Collective(name)
        return collective

    monkeypatch.setattr(dist, "broadcast", fake("broadcast"))
    monkeypatch.setattr(dist, "all_reduce", fake("all_reduce"))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    return calls


# --- collectives use tensors on the run's device (NCCL has no CPU tensors) --------------------
def test_seed_broadcast_tensor_lives_on_the_runs_device(fake_collectives: list) -> None:
    with pytest.raises(Collective):
        _seed(TrainConfig(), None, Runtime(META, rank=0, world_size=2))
    assert fake_collectives == [("broadcast", META)]


def test_metric_and_loss_reductions_live_on_the_runs_device(fake_collectives: list) -> None:
    with pytest.raises(Collective):
        EpochMeter(META).all_reduce()
    with pytest.raises(Collective):
        LossWatch(META).read(distributed=True)
    assert fake_collectives == [("all_reduce", META), ("all_reduce", META)]


def test_rank0_builds_first_behind_a_long_gloo_barrier(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(dist, "new_group", lambda backend, timeout: events.append(f"group {backend} {timeout}")
                        or "gloo-group")
    monkeypatch.setattr(dist, "barrier", lambda group: events.append(f"barrier {group}"))
    for local_rank in (0, 1):
        _rank0_first(Runtime(torch.device("cpu"), local_rank, 2, local_rank, 2), lambda: events.append("build"))
    assert events == ["group gloo 2:00:00", "build", "barrier gloo-group",
                      "group gloo 2:00:00", "barrier gloo-group", "build"]


# --- one GPU per process ----------------------------------------------------------------------
def _fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int, local_rank: int, local_world: int) -> list:
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(("set_device", dev)))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # whatever tests ran before on a GPU
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    for key, value in {"RANK": local_rank, "WORLD_SIZE": local_world, "LOCAL_RANK": local_rank,
                       "LOCAL_WORLD_SIZE": local_world}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return calls


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_gpus(monkeypatch, count=1, local_rank=1, local_world=2)
    with pytest.raises(SystemExit) as exit_:
        setup_runtime("auto", gpu_id="6")
    assert str(exit_.value) == ("error: 2 processes per node (--nproc_per_node) but --gpu_id 6 shows 1 GPU(s): "
                                "start at most 1 per node, or give --gpu_id one GPU per process (e.g. --gpu_id 0,1)")
    with pytest.raises(SystemExit, match="puts all 2 processes of this node on one GPU"):
        setup_runtime("cuda:0")
    assert calls == []  # refused before touching a GPU or the process group


def test_each_process_gets_its_gpu_and_nccl_its_device_id(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_gpus(monkeypatch, count=2, local_rank=1, local_world=2)
    rt = setup_runtime("auto")
    assert (rt.device, rt.rank, rt.world_size, rt.local_rank, rt.local_world_size) == (
        torch.device("cuda", 1), 1, 2, 1, 2)
    assert calls == [("set_device", torch.device("cuda", 1)), ("nccl", {"device_id": torch.device("cuda", 1)})]


def test_bad_device_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda:7 on a 1-GPU machine, on a CPU machine, or an unknown device: one line each,
    before any GPU or process group is touched."""
    with pytest.raises(SystemExit) as exit_:
        setup_runtime("cuda:7")  # this machine (the tests hide CUDA): no CUDA
    assert str(exit_.value) == "error: --device cuda:7 asked for, but CUDA is not available"
    with pytest.raises(SystemExit) as exit_:
        setup_runtime("gpu")
    assert str(exit_.value) == "error: --device gpu: expected auto, cpu, cuda or cuda:N"
    calls = _fake_gpus(monkeypatch, count=1, local_rank=0, local_world=1)
    with pytest.raises(SystemExit) as exit_:
        setup_runtime("cuda:7")
    assert str(exit_.value) == "error: --device cuda:7: no such GPU; this machine has 1 GPU(s): use cuda:0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(SystemExit) as exit_:
        setup_runtime("cuda:4", gpu_id="0,1,2,3")
    assert str(exit_.value) == ("error: --device cuda:4: no such GPU; --gpu_id 0,1,2,3 shows 4 GPU(s): "
                                "use cuda:0 to cuda:3")
    assert calls == []
    assert setup_runtime("cuda:3").device == torch.device("cuda", 3)
    assert calls == [("set_device", torch.device("cuda", 3))]


def test_the_clis_print_a_bad_device_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                 tmp_path: Path) -> None:
    _fake_gpus(monkeypatch, count=1, local_rank=0, local_world=1)
    assert extractor_cli.main(["--input_path", str(tmp_path), "--device", "cuda:7"]) == 1
    assert capsys.readouterr().err == "error: --device cuda:7: no such GPU; this machine has 1 GPU(s): use cuda:0\n"
    with pytest.raises(SystemExit) as exit_:  # the interpreter prints a string exit code as it is
        train_cli.main(["--finetune_train_path", "t", "--finetune_val_path", "v", "--device", "cuda:7"])
    assert exit_.value.code == "error: --device cuda:7: no such GPU; this machine has 1 GPU(s): use cuda:0"


def test_gpu_id_on_a_cpu_machine_is_the_same_warning_from_both_clis(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture,
                                                                    tmp_path: Path) -> None:
    """--gpu_id 4 without CUDA: trainer and extractor both say it falls back, as a warning (the
    extractor sets up logging after the device: an info line was lost there; Python prints a
    warning without any logging set up)."""
    monkeypatch.setattr(train_run, "train", lambda cfg, rt: tmp_path)   # main() imports it after parsing
    train_cli.main(["--finetune_train_path", "t", "--finetune_val_path", "v", "--gpu_id", "4"])
    assert extractor_cli.main(["--input_path", str(tmp_path / "none"), "--gpu_id", "4",
                               "--load_from", str(tmp_path / "none.pth.tar")]) == 1
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "CUDA" in r.getMessage()]
    assert said == [(logging.WARNING, "CUDA is not available (--gpu_id 4 shows no GPU): running on CPU")] * 2


def test_gpu_id_set_after_cuda_started_is_reported(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """CUDA reads CUDA_VISIBLE_DEVICES when it starts: --gpu_id set later changes nothing, and
    says so, whether torch had started CUDA (a notebook's second run) or only the driver (it then
    sees more GPUs than --gpu_id lists); not when it took effect."""
    _fake_gpus(monkeypatch, count=1, local_rank=0, local_world=1)
    warned = "--gpu_id 1 is ignored: CUDA had already started in this process (CUDA_VISIBLE_DEVICES={}); start a " \
             "new process, or pick the GPU with --device cuda:N"
    assert setup_runtime("auto", gpu_id="1").device == torch.device("cuda", 0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and not caplog.records  # took effect
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    setup_runtime("auto", gpu_id="1")
    assert not caplog.records  # started with this very setting
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    setup_runtime("auto", gpu_id="1")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the driver started first: every GPU shows
    setup_runtime("auto", gpu_id="1")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, warned.format("0")),
                                                                     (logging.WARNING, warned.format("unset"))]


def test_extraction_starts_no_nccl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Sharded extraction's collectives are all on the CPU (gloo): its default group is gloo
    even on GPUs; the trainer's is NCCL."""
    calls = _fake_gpus(monkeypatch, count=2, local_rank=1, local_world=2)
    devices = []

    def run(args: object, device: torch.device, share: object) -> None:
        devices.append(device)
        raise UserError("stop here")

    monkeypatch.setattr(extractor_cli, "run", run)
    monkeypatch.setattr(WorkShare, "join", lambda rt: None)
    assert extractor_cli.main(["--input_path", str(tmp_path)]) == 1
    assert devices == [torch.device("cuda", 1)]
    assert calls == [("set_device", torch.device("cuda", 1)), ("gloo", {})]


# --- fp16: GradScaler skips overflowing steps; repeated ones stop the run ---------------------
def _scaled_solver(init_scale: float = 2.0**16) -> Solver:
    """A CPU solver with a GradScaler, as fp16 training on CUDA has (CPU's scaler works alike)."""
    torch.manual_seed(0)
    solver = Solver(Delf(3, arch="resnet18", stage="finetune"), Settings(lr=0.1))
    solver.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return solver


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(2, 3, 32, 32, generator=g), torch.tensor([0, 1])) for _ in range(n)]


def _inf_loss_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    forward, calls = torch.nn.CrossEntropyLoss.forward, {"n": 0}

    def loss(self: torch.nn.Module, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        value = forward(self, outputs, labels)
        return value * float("inf") if calls["n"] - 1 in steps else value

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", loss)


def test_fp16_overflow_skips_the_step_and_training_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    solver = _scaled_solver()
    weights: list[torch.Tensor] = []
    step = solver.train_step

    def recording(*args: torch.Tensor) -> tuple:
        out = step(*args)
        weights.append(solver.model.logits[0].weight.detach().clone())
        return out

    solver.train_step = recording
    _inf_loss_at(monkeypatch, {1})
    metrics = solver.train_epoch(_batches(3), 0, 1)
    assert torch.equal(weights[1], weights[0])  # step 2 (inf loss) skipped
    assert not torch.equal(weights[2], weights[1])  # step 3 trained
    assert solver.scaler.get_scale() == 2.0**15
    assert metrics["samples"] == 6
    assert any("non-finite loss were skipped" in r.getMessage() and "step 2" in r.getMessage()
               for r in caplog.records)


def test_fp16_repeated_overflows_or_a_collapsed_scale_stop_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(solver_module, "MAX_SKIPPED", 3)
    _inf_loss_at(monkeypatch, {1, 2, 3})
    with pytest.raises(TrainingDiverged, match=r"3 non-finite losses in a row \(first at epoch 1, step 2\)"):
        _scaled_solver().train_epoch(_batches(5), 0, 1)
    monkeypatch.undo()
    with pytest.raises(TrainingDiverged, match=r"loss scale 0.25"):
        _scaled_solver(init_scale=0.25).train_epoch(_batches(1), 0, 1)


def test_without_scaler_a_non_finite_loss_stops_at_the_next_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(solver_module, "CHECK_EVERY", 2)
    _inf_loss_at(monkeypatch, {2})
    solver = _scaled_solver()
    solver.scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen = []
    step = solver.train_step
    solver.train_step = lambda *args: seen.append(1) or step(*args)
    with pytest.raises(TrainingDiverged, match="loss is inf at epoch 1, step 3"):
        solver.train_epoch(_batches(10), 0, 1)
    assert len(seen) == 4  # stopped at the check after step 4, not at the end of the epoch


def test_keypoint_pooling_and_classifier_stay_fp32_under_autocast() -> None:
    """A pooled sum beyond fp16's range (65504) stays finite: pooling and logits run in fp32."""
    torch.manual_seed(0)
    model = Delf(3, arch="resnet18", stage="keypoint").eval()
    with torch.no_grad():
        model.attn.conv2.bias.fill_(1000.0)  # attention ~1000 on each of 8x8 cells
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(torch.rand(1, 3, 128, 128))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_amp_is_bf16_on_cpu_and_ampere_gpus_fp16_on_older_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    for capability, dtype in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert amp_dtype(cuda) == dtype
    assert amp_dtype(torch.device("cpu")) == torch.bfloat16
    with autocast(torch.device("cpu"), True):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


class BenchmarkSeen(Classification):
    """Cross-entropy, recording cudnn.benchmark at each training step and validation batch."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, bool]] = []

    def __call__(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, training: bool) -> StepOutput:
        self.seen.append(("train" if training else "val", torch.backends.cudnn.benchmark))
        return super().__call__(net, images, labels, training)


def _fit_recording_cudnn_benchmark(before: bool) -> list[tuple[str, bool]]:
    """Set cudnn.benchmark to ``before``, fit a solver one epoch; the flag at each training step
    and validation batch."""
    batches = data.TensorDataset(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                                 torch.tensor([0, 1, 2, 0]))
    torch.manual_seed(0)
    objective = BenchmarkSeen()
    solver = Solver(Delf(3, arch="resnet18", stage="finetune"), Settings(lr=0.01), objective=objective)
    torch.backends.cudnn.benchmark = before
    solver.fit(data.DataLoader(batches, batch_size=2), data.DataLoader(batches, batch_size=4), epochs=1)
    return objective.seen


def test_fit_restores_cudnn_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training autotunes cuDNN where it pays (Solver.autotune) and leaves the flag as it found it:
    a notebook that then extracts does not autotune every pyramid shape."""
    monkeypatch.setattr(Solver, "autotune", lambda self, training: training)  # on in training, off in validation
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored at the end
    for before in (False, True):
        assert _fit_recording_cudnn_benchmark(before) == [("train", True), ("train", True), ("val", False)]
        assert torch.backends.cudnn.benchmark is before


# --- host syncs -------------------------------------------------------------------------------
def test_training_steps_do_not_wait_for_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host reads device values (item/tolist) a fixed number of times per epoch, not per step."""
    monkeypatch.setattr(solver_module, "CHECK_EVERY", 1000)
    counts = {}
    reads: list[int] = []
    for steps in (2, 6):
        reads.clear()
        for name in ("item", "tolist"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda t, original=original: reads.append(1) or original(t))
        solver = _scaled_solver()
        solver.scaler = torch.amp.GradScaler("cpu", enabled=False)
        solver.train_epoch(_batches(steps), 0, 1)
        monkeypatch.undo()
        monkeypatch.setattr(solver_module, "CHECK_EVERY", 1000)
        counts[steps] = len(reads)
    assert counts[2] == counts[6] <= 3


# --- data loading -----------------------------------------------------------------------------
def test_worker_default_shares_the_cpus_among_local_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert [default_workers(n) for n in (1, 4, 8, 64, 128)] == [20, 16, 8, 1, 1]
    assert parse_args(["--finetune_train_path", "t", "--finetune_val_path", "v"]).workers is None
    assert parse_args(["--finetune_train_path", "t", "--finetune_val_path", "v", "--workers", "3"]).workers == 3


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
def test_loaders_persist_workers_pin_memory_and_augment_alike_with_any_worker_count(
        image_data: tuple[Path, Path]) -> None:
    train_set, val_set = image_folders(*image_data, 72, 64)
    batches = {}
    for workers in (0, 2):
        train_loader, val_loader = loaders(train_set, val_set, 4, 4, workers, seed=3, pin_memory=workers > 0)
        assert train_loader.persistent_workers is val_loader.persistent_workers is (workers > 0)
        assert train_loader.pin_memory is (workers > 0)
        train_loader.sampler.set_epoch(1)
        batches[workers] = [images for images, _ in train_loader]
    for a, b in zip(batches[0], batches[2], strict=True):
        assert torch.equal(a, b)


# --- determinism ------------------------------------------------------------------------------
def test_deterministic_mode_sets_and_restores_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    with deterministic_mode(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32) == (
            False, True, False, False)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == runtime.CUBLAS_WORKSPACE_CONFIG
        solver = Solver(Delf(3, arch="resnet18", stage="finetune"), Settings())
        monkeypatch.setattr(solver, "device", torch.device("cuda"))
        assert solver.autotune(training=False) is False
    assert not torch.are_deterministic_algorithms_enabled()
    assert (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert parse_args(["--finetune_train_path", "t", "--finetune_val_path", "v", "--deterministic"]).deterministic


def test_deterministic_flag_trains_under_deterministic_algorithms(image_data: tuple[Path, Path], expr: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_train import finetune_argv
    from train.main import main

    seen = []
    fit = Solver.fit
    monkeypatch.setattr(Solver, "fit", lambda self, *a: seen.append(torch.are_deterministic_algorithms_enabled())
                        or fit(self, *a))
    main(finetune_argv(expr, image_data, "--deterministic"))
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()
    assert load_file(repo_dir() / expr / "finetune" / "ckpt" / "last.pth.tar")["config"]["deterministic"] is True


# --- on a GPU -----------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_seed_readme_commands_under_torchrun_with_amp(image_data: tuple[Path, Path], expr: str) -> None:
    """The README's two training commands (no --manualSeed: the seed is broadcast over NCCL)
    under torchrun, --amp (bf16, or fp16 with GradScaler on GPUs without bf16), on a tiny ImageFolder."""
    tiny = ["--arch", "resnet18", "--pretrained", "none", "--finetune_sample_size", "72", "--finetune_crop_size",
            "64", "--keypoint_sample_size", "160", "--keypoint_crop_size", "128", "--train_batch_size", "4",
            "--val_batch_size", "4", "--amp"]
    train_dir, val_dir = (str(p) for p in image_data)
    run_trainer(["--stage", "finetune", "--optim", "sgd", "--expr", expr, "--ncls", "3",
                 "--finetune_train_path", train_dir, "--finetune_val_path", val_dir, "--finetune_epoch", "2", *tiny],
                nproc=1, timeout=900)
    finetune = repo_dir() / expr / "finetune" / "ckpt"
    run_trainer(["--stage", "keypoint", "--ncls", "3", "--optim", "sgd", "--use_random_gamma_scaling", "true",
                 "--expr", expr, "--load_from", str(finetune / "bestshot.pth.tar"), "--keypoint_train_path", train_dir,
                 "--keypoint_val_path", val_dir, "--keypoint_epoch", "2", *tiny], nproc=1, timeout=900)
    for stage in ("finetune", "keypoint"):
        ckpt = load_file(repo_dir() / expr / stage / "ckpt" / "last.pth.tar")
        assert ckpt["epoch"] == 2 and ckpt["config"]["world_size"] == 1
        assert ("scaler" in ckpt) == (amp_dtype(torch.device("cuda", 0)) == torch.float16)
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.cuda
def test_cuda_deterministic_runs_repeat_bit_for_bit(image_data: tuple[Path, Path]) -> None:
    results = []
    for _ in range(2):
        with deterministic_mode(True):
            torch.manual_seed(0)
            solver = Solver(Delf(3, arch="resnet18", stage="finetune"), Settings(amp=True),
                            Runtime(torch.device("cuda", 0)))
            for images, labels in _batches(3):
                solver.train_step(images, labels)
            results.append(copy.deepcopy(solver.model.state_dict()))
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key


@pytest.mark.cuda
def test_cuda_data_loader_pins_memory(image_data: tuple[Path, Path]) -> None:
    train_set, val_set = image_folders(*image_data, 72, 64)
    train_loader, _ = loaders(train_set, val_set, 4, 4, 1, seed=0, pin_memory=True)
    images, _ = next(iter(train_loader))
    assert images.is_pinned()


@pytest.mark.cuda
def test_cuda_every_collective_runs_over_nccl(tmp_path: Path, expr: str) -> None:
    """A one-process NCCL group: the trainer's collectives (seed, refusal flag, loss watch,
    metrics, the download barrier) run with it; a CPU tensor would fail with "No backend type
    associated with device type cpu"."""
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=dev)
    try:
        rt = Runtime(dev, rank=0, world_size=2)  # "distributed": every collective is taken
        assert 0 <= _seed(TrainConfig(), None, rt) < 2**31
        lock = _claim_output(TrainConfig(expr=expr), rt)
        assert lock is not None
        lock.release()
        watch = LossWatch(dev)
        watch.update(torch.tensor(float("nan"), device=dev), 4)
        assert watch.read(distributed=True) == (1, 4, True)
        meter = EpochMeter(dev)
        meter.update(torch.ones(3, device=dev), torch.eye(3, device=dev), torch.arange(3, device=dev))
        meter.all_reduce()
        assert meter.averages()["samples"] == 3 and meter.averages()["top1"] == 100.0
        assert _rank0_first(rt, lambda: "built") == "built"
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
def test_cuda_amp_scales_losses_only_in_fp16() -> None:
    """--amp on this GPU: bf16 without a GradScaler where it computes bf16 (Ampere and later),
    fp16 with one elsewhere; either way the steps train and stay finite."""
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    solver = Solver(Delf(3, arch="resnet18", stage="finetune"), Settings(amp=True), Runtime(dev))
    assert solver.scaler.is_enabled() == (amp_dtype(dev) == torch.float16)
    assert amp_dtype(dev) == (torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False)
                              else torch.float16)
    for images, labels in _batches(3):
        out = solver.train_step(images, labels)
    assert torch.isfinite(out.loss).item()
    assert all(torch.isfinite(p).all() for p in solver.model.parameters())


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_torchrun_two_gpus_equal_one(uniform_data: tuple[Path, Path], expr: str) -> None:
    """Two processes on two GPUs (NCCL: the seed's broadcast, DDP's gradient averaging, the
    metrics' sums) of 4 images per step train as one process of 8, deterministic on both sides
    (TF32 off). Skipped with fewer than 2 GPUs."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from tests.test_train import finetune_argv

    def argv(name: str, batch: str) -> list[str]:
        return finetune_argv(name, uniform_data, "--finetune_sample_size", "64", "--finetune_crop_size", "64",
                             "--train_batch_size", batch, "--device", "cuda", "--deterministic")

    run_trainer(argv(expr + "-one", "8"), timeout=900)
    result = run_trainer(argv(expr, "4"), nproc=2, timeout=900)
    assert_same_training(repo_dir() / (expr + "-one") / "finetune", repo_dir() / expr / "finetune")
    ckpt = load_file(repo_dir() / expr / "finetune" / "ckpt" / "last.pth.tar")
    assert ckpt["config"]["world_size"] == 2 and ckpt["epoch"] == 1
    assert result.stderr.count("epoch 1/1") == 1  # rank 0 logs
    # no --manualSeed: rank 0 draws the seed and broadcasts it over NCCL
    unseeded = argv(expr + "-seed", "4")
    del unseeded[unseeded.index("--manualSeed"):unseeded.index("--manualSeed") + 2]
    run_trainer(unseeded, nproc=2, timeout=900)
    assert load_file(repo_dir() / (expr + "-seed") / "finetune" / "ckpt" / "last.pth.tar")["config"]["world_size"] == 2
