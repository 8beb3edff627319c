"""The delg stage through the trainer's CLI: losses, checkpoints, logs, resume, gradient clipping,
Google Landmarks v2 CSVs for any stage, options and their errors."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.utils import assert_resume_is_exact, assert_same_training, run_trainer, training_conv_dtypes
from train.checkpoint import describe, load_file, load_model
from train.config import TrainConfig, parse_args
from train.delg import ArcFace, Delg
from train.main import main
from train.objective import DelgObjective
from train.run import build_model
from train.runtime import amp_dtype, repo_dir
from train.solver import EpochMeter, Settings, Solver

TINY = ["--arch", "resnet18", "--pretrained", "none", "--delg_sample_size", "72", "--delg_crop_size", "64",
        "--global_dim", "32", "--autoencoder_dim", "16", "--train_batch_size", "4", "--val_batch_size", "4",
        "--workers", "0", "--manualSeed", "7", "--lr", "0.01"]


def delg_argv(expr: str, data: tuple[Path, Path], *extra: str) -> list[str]:
    return ["--stage", "delg", "--expr", expr, "--delg_train_path", str(data[0]), "--delg_val_path", str(data[1]),
            "--delg_epoch", "1", *TINY, *extra]


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_delg_flags_and_defaults() -> None:
    cfg = parse_args(["--stage", "delg", "--delg_train_path", "t", "--delg_val_path", "v"])
    assert (cfg.global_dim, cfg.autoencoder_dim, cfg.arcface_margin, cfg.arcface_scale) == (2048, 128, 0.1, None)
    assert (cfg.attention_loss_weight, cfg.reconstruction_loss_weight, cfg.clip_grad_norm) == (1.0, 10.0, 10.0)
    assert (cfg.momentum, cfg.optim, cfg.pretrained, cfg.delg_epoch) == (0.9, "sgd", "imagenet", 30)
    assert Settings.from_config(cfg, 0).clip_grad_norm == 10.0
    finetune = parse_args(["--finetune_train_path", "t", "--finetune_val_path", "v"])
    assert Settings.from_config(finetune, 0).clip_grad_norm == 0.0  # other stages: unchanged


def test_block3_strides_flag_reaches_the_model() -> None:
    """--delg_block3_strides (default true, as the official trainer): the local grid's stride."""
    def cfg(*flags: str) -> TrainConfig:
        return parse_args(["--stage", "delg", "--delg_train_path", "t", "--delg_val_path", "v", *TINY, *flags])

    assert cfg().delg_block3_strides is True and cfg("--delg_block3_strides").delg_block3_strides is True
    assert cfg("--delg_block3_strides", "false").delg_block3_strides is False
    for flags, stride in (((), 32), (("--delg_block3_strides", "false"), 16)):
        model = build_model(cfg(*flags), ncls=3, resuming=True)
        assert isinstance(model, Delg) and model.receptive_field().stride == stride


def test_delg_stage_trains_and_checkpoints(image_data: tuple[Path, Path], expr: str) -> None:
    out = main(delg_argv(expr, image_data, "--delg_epoch", "2"))
    assert out == repo_dir() / expr / "delg"
    ckpt = load_file(out / "ckpt" / "last.pth.tar")
    assert (ckpt["stage"], ckpt["epoch"], ckpt["arch"]) == ("delg", 2, "resnet18")
    assert (out / "ckpt" / "bestshot.pth.tar").is_file()
    assert describe(ckpt) == {"attn_batchnorm": True, "arch": "resnet18", "target_layer": "layer3", "ncls": 3,
                              "stage": "delg", "global_dim": 32, "autoencoder_dim": 16, "attention_pool": "mean",
                              "block3_strides": True, "layout": "torchvision", "input_norm": "imagenet"}
    train_log = rows(out / "log" / "train.log")
    assert [r["epoch"] for r in train_log] == ["1", "2"]
    for r in train_log + rows(out / "log" / "val.log"):
        parts = [float(r[f"loss_{p}"]) for p in ("global", "attention", "reconstruction")]
        assert all(math.isfinite(v) and v >= 0 for v in parts)
        # the logged loss is the weighted sum of the logged parts
        assert float(r["loss"]) == pytest.approx(parts[0] + 1.0 * parts[1] + 10.0 * parts[2], rel=1e-4)
    # the extraction side: a classifier-free Delg with the trained weights
    model, _ = load_model(out / "ckpt" / "bestshot.pth.tar")
    assert isinstance(model, Delg) and not hasattr(model, "arcface")
    assert (model.global_dim, model.feature_dim, model.receptive_field().stride) == (32, 16, 32)


def test_delg_resume_matches_uninterrupted_run(image_data: tuple[Path, Path], expr: str) -> None:
    assert_resume_is_exact(lambda name, *flags: main(delg_argv(name, image_data, *flags)), expr, "delg")
    # another architecture of the head cannot resume that run
    with pytest.raises(SystemExit, match="global_dim 32 \\(now 64\\)"):
        main(delg_argv(expr, image_data, "--delg_epoch", "3", "--resume", "--global_dim", "64"))
    with pytest.raises(SystemExit, match="block3_strides True \\(now False\\)"):
        main(delg_argv(expr, image_data, "--delg_epoch", "3", "--resume", "--delg_block3_strides", "false"))


def test_gradient_clipping_bounds_the_update() -> None:
    """With clip c and plain SGD (lr 1, no momentum or decay), the step's global norm is <= c;
    without clipping it is the (larger) gradient norm."""
    def step_norm(clip: float) -> float:
        torch.manual_seed(0)
        model = Delg(3, arch="resnet18", global_dim=16, autoencoder_dim=8)
        before = [p.detach().double() for p in model.parameters()]
        solver = Solver(model, Settings(lr=1.0, momentum=0.0, weight_decay=0.0, clip_grad_norm=clip),
                        objective=DelgObjective())
        solver.train_step(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0]))
        steps = [(p.detach().double() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
        return torch.cat(steps).norm().item()  # in float64: float32 differences of ~1e-4 lose digits

    unclipped = step_norm(0.0)
    assert unclipped > 0.5
    assert step_norm(0.5) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize("stage", ["finetune", "delg"])
def test_gldv2_csv_for_any_stage(gld: Path, expr: str, stage: str) -> None:
    common = ["--stage", stage, "--expr", expr, f"--{stage}_train_path", str(gld / "train"),
              "--train_csv", str(gld / "train.csv"), f"--{stage}_epoch", "1", "--arch", "resnet18",
              "--pretrained", "none", f"--{stage}_sample_size", "72", f"--{stage}_crop_size", "64",
              "--train_batch_size", "4", "--val_batch_size", "4", "--workers", "0", "--manualSeed", "7"]
    if stage == "delg":
        common += ["--global_dim", "32", "--autoencoder_dim", "0"]
    out = main(common)
    ckpt = load_file(out / "ckpt" / "last.pth.tar")
    assert ckpt["ncls"] == 3 and ckpt["config"]["classes"] == ["10", "20", "30"]
    assert ckpt["config"]["train_csv"] == str(gld / "train.csv")


def test_gldv2_errors_are_one_line(gld: Path, expr: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--stage", "delg", "--expr", expr, "--delg_train_path", str(gld / "train"), "--train_csv", str(bad),
              *TINY])
    assert f"{bad}: header 'image,label' is neither" in str(exit_.value.code)


def test_delg_amp_bf16_on_cpu(image_data: tuple[Path, Path], expr: str) -> None:
    with training_conv_dtypes() as dtypes:
        out = main(delg_argv(expr, image_data, "--amp"))
    assert dtypes == {torch.bfloat16}   # backbone, autoencoder and attention convolutions
    for r in rows(out / "log" / "train.log"):
        assert math.isfinite(float(r["loss"]))
    assert load_file(out / "ckpt" / "last.pth.tar")["config"]["amp"] is True


@pytest.mark.slow
def test_delg_torchrun_two_cpu_processes_equal_one(uniform_data: tuple[Path, Path], expr: str) -> None:
    """Two processes of 4 images per step train as one process of 8 (the ArcFace, attention and
    reconstruction losses, the clipped gradients, the logged loss parts)."""
    def argv(name: str, batch: str) -> list[str]:
        return delg_argv(name, uniform_data, "--delg_sample_size", "64", "--train_batch_size", batch)

    run_trainer(argv(expr + "-one", "8"))  # a process of its own, one thread as the two below
    result = run_trainer(argv(expr, "4"), nproc=2)
    assert_same_training(repo_dir() / (expr + "-one") / "delg", repo_dir() / expr / "delg")
    ckpt = load_file(repo_dir() / expr / "delg" / "ckpt" / "last.pth.tar")
    assert ckpt["config"]["world_size"] == 2 and ckpt["stage"] == "delg"
    assert result.stderr.count("epoch 1/1") == 1  # rank 0 logs


def test_epoch_meter_counts_parts_of_real_samples_only() -> None:
    """Per-sample losses and parts: a padded tail (limit) is left out exactly."""
    meter = EpochMeter(torch.device("cpu"), limit=3, parts=("a", "b"))
    logits = torch.eye(2)
    meter.update(torch.tensor([1.0, 3.0]), logits, torch.tensor([0, 1]),
                 {"a": torch.tensor([0.5, 1.5]), "b": torch.tensor([2.0, 4.0])})
    meter.update(torch.tensor([5.0, 100.0]), logits, torch.tensor([1, 1]),
                 {"a": torch.tensor([2.5, 100.0]), "b": torch.tensor([6.0, 100.0])})  # 2nd sample: padding
    avg = meter.averages()
    assert avg["samples"] == 3
    assert (avg["loss"], avg["loss_a"], avg["loss_b"]) == pytest.approx((3.0, 1.5, 4.0))
    assert avg["top1"] == pytest.approx(100 * 2 / 3)


def _arcface_under_autocast(device: str, dtype: torch.dtype) -> None:
    """ArcFace's logits under ``dtype`` autocast on ``device``: float32 and equal to those without
    autocast; an embedding 0.01 rad from class 0's weight gets scale * cos(0.01 + margin) for it
    with its label, scale * cos(0.01) without (fp16 or bf16 would round cos(0.01) = 0.99995 to 1)."""
    torch.manual_seed(0)
    head = ArcFace(16, 3).to(device)
    w = F.normalize(head.weight[0].detach(), dim=0)
    side = torch.randn(16, device=device)
    side = F.normalize(side - (side @ w) * w, dim=0)  # a unit vector orthogonal to w
    emb = torch.randn(4, 16, device=device)
    emb[0] = 5 * (math.cos(0.01) * w + math.sin(0.01) * side)
    labels = torch.tensor([0, 1, 2, 0], device=device)
    with torch.no_grad():
        reference = head(emb, labels), head(emb)
        with torch.autocast(device, dtype=dtype):
            got = head(emb, labels), head(emb)
    for logits, expected in zip(got, reference, strict=True):
        assert logits.dtype == torch.float32 and torch.equal(logits, expected)
    assert got[0][0, 0].item() == pytest.approx(head.scale * math.cos(0.01 + head.margin), abs=1e-5)
    assert got[1][0, 0].item() == pytest.approx(head.scale * math.cos(0.01), abs=1e-5)


def test_arcface_logits_are_float32_under_autocast() -> None:
    _arcface_under_autocast("cpu", torch.bfloat16)


@pytest.mark.cuda
def test_cuda_arcface_logits_are_float32_under_fp16_autocast() -> None:
    _arcface_under_autocast("cuda", torch.float16)


@pytest.mark.cuda
def test_cuda_delg_amp_trains(image_data: tuple[Path, Path], expr: str) -> None:
    """DELG with --amp on the GPU: the convolutions in its amp dtype (bf16, or fp16 on GPUs without
    bf16), the ArcFace logits float32, finite losses; a GradScaler only with fp16."""
    dtype = amp_dtype(torch.device("cuda", 0))
    arcface: set[torch.dtype] = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: arcface.add(output.dtype) if isinstance(module, ArcFace) else None)
    try:
        with training_conv_dtypes() as dtypes:
            out = main(delg_argv(expr, image_data, "--amp", "--device", "cuda", "--delg_epoch", "2"))
    finally:
        hook.remove()
    assert dtypes == {dtype} and arcface == {torch.float32}
    for r in rows(out / "log" / "train.log") + rows(out / "log" / "val.log"):
        assert math.isfinite(float(r["loss"])) and math.isfinite(float(r["loss_global"]))
    ckpt = load_file(out / "ckpt" / "last.pth.tar")
    assert ckpt["config"]["amp"] is True and ckpt["epoch"] == 2
    assert ("scaler" in ckpt) == (dtype == torch.float16)
