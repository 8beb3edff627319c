"""The two-stage trainer: options, the keypoint stage's frozen backbone, the CLI end to end,
--resume, corrupt images, user errors, NaN losses and torchrun."""
from __future__ import annotations

import copy
import csv
import dataclasses
import fcntl
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as transforms
from PIL import Image

from tests.utils import (
    assert_resume_is_exact,
    assert_same_training,
    run_trainer,
    save_keypoint_checkpoint,
    training_conv_dtypes,
)
from train.checkpoint import CheckpointError, atomic_save, checkpoint_dict, load_file, load_model
from train.config import TrainConfig, parse_args
from train.delf import Delf, PretrainedUnavailable
from train.main import main
from train.objective import StepOutput
from train.outputs import OutputLock, lock_file_for, removed_if_failed
from train.run import _check_resumable, build_model, train
from train.runtime import PROJECT_ROOT, repo_dir
from train.solver import Settings, Solver, build_optimizer, correct_topk

T = TypeVar("T")
PYTHON = sys.executable
TINY = ["--arch", "resnet18", "--pretrained", "none", "--finetune_sample_size", "72",
        "--finetune_crop_size", "64", "--keypoint_sample_size", "80", "--keypoint_crop_size", "64",
        "--train_batch_size", "4", "--val_batch_size", "4", "--manualSeed", "7"]


def finetune_argv(expr: str, data: tuple[Path, Path], *extra: str) -> list[str]:
    return ["--stage", "finetune", "--expr", expr, "--finetune_train_path", str(data[0]),
            "--finetune_val_path", str(data[1]), "--finetune_epoch", "1", "--workers", "0", *TINY, *extra]


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


# --- options ---------------------------------------------------------------------------------
def test_seed_readme_flags_parse() -> None:
    args = parse_args(["--stage", "keypoint", "--gpu_id", "6", "--ncls", "586", "--optim", "sgd",
                       "--use_random_gamma_scaling", "true", "--expr", "landmark", "--load_from", "m.pth.tar",
                       "--keypoint_train_path", "t", "--keypoint_val_path", "v"])
    assert (args.stage, args.gpu_id, args.ncls, args.optim, args.expr) == ("keypoint", "6", 586, "sgd", "landmark")
    assert args.use_random_gamma_rescale is True
    assert (args.lr, args.lr_gamma, args.lr_stepsize, args.weight_decay, args.momentum) == (0.008, 0.5, 10, 1e-4, 0.9)
    assert (args.train_batch_size, args.keypoint_epoch, args.keypoint_sample_size, args.keypoint_crop_size) == (
        8, 30, 900, 720)
    assert (args.arch, args.target_layer, args.pretrained, args.device, args.amp, args.resume) == (
        "resnet50", "layer3", "imagenet", "auto", False, False)


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("false", False), ("0", False)])
def test_boolean_flags(text: str, value: bool) -> None:
    base = ["--finetune_train_path", "t", "--finetune_val_path", "v"]
    args = parse_args([*base, "--use_random_gamma_rescale", text, "--amp", text])
    assert args.use_random_gamma_rescale is value and args.amp is value
    assert parse_args([*base, "--amp", "--resume"]).amp is True


@pytest.mark.parametrize("argv, message", [
    (["--finetune_train_path", "t", "--finetune_val_path", "v", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--finetune_train_path", "t", "--finetune_val_path", "v", "--amp", "maybe"], "expected true/false"),
    (["--finetune_val_path", "v"], "--finetune_train_path is required"),
    (["--stage", "keypoint", "--keypoint_train_path", "t", "--keypoint_val_path", "v"], "needs --load_from"),
    (["--finetune_train_path", "t", "--finetune_val_path", "v", "--finetune_sample_size", "100"], "smaller than"),
    (["--finetune_train_path", "t", "--finetune_val_path", "v", "--optim", "lbfgs"], "invalid choice"),
    (["--finetune_train_path", "t", "--finetune_val_path", "v", "--expr", "../x"], "plain name"),
    (["--stage", "delg", "--delg_val_path", "v"], "--delg_train_path is required"),
    (["--stage", "delg", "--delg_train_path", "t"], "--delg_val_path is required for --stage delg (or --train_csv)"),
    (["--stage", "delg", "--delg_train_path", "t", "--delg_val_path", "v", "--target_layer", "layer4"],
     "the local branch is on layer3"),
    (["--stage", "delg", "--delg_train_path", "t", "--delg_val_path", "v", "--train_csv", "c"],
     "with a CSV the val images are split off it"),
    (["--stage", "delg", "--delg_train_path", "t", "--train_csv", "c", "--val_fraction", "0.5"],
     "expected a number in [0, 0.5)"),
])
def test_bad_options_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bad_flag_value_is_one_line_and_the_way_to_help(capsys: pytest.CaptureFixture) -> None:
    """The line that matters and where the flags are listed, not the 37 lines of usage before it."""
    with pytest.raises(SystemExit) as exit_:
        main(["--arch", "resnet99"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "main.py: error: argument --arch: invalid choice: 'resnet99' (choose from 'resnet18', 'resnet34', "
        "'resnet50', 'resnet101', 'resnet152')\nmain.py --help lists the flags\n")
    with pytest.raises(SystemExit):  # a problem between flags: the same two lines
        main(["--finetune_val_path", "v"])
    assert capsys.readouterr().err == ("main.py: error: --finetune_train_path is required for --stage finetune\n"
                                       "main.py --help lists the flags\n")


def test_flags_map_onto_the_config_and_its_defaults() -> None:
    paths = {"finetune_train_path": "t", "finetune_val_path": "v"}
    assert parse_args(["--finetune_train_path", "t", "--finetune_val_path", "v"]) == TrainConfig(**paths)
    cfg = parse_args(["--finetune_train_path", "t", "--finetune_val_path", "v", "--lr", "0.1", "--optim", "ADAM",
                      "--use_random_gamma_scaling", "false", "--manualSeed", "3"])
    assert cfg == TrainConfig(**paths, lr=0.1, optim="adam", use_random_gamma_rescale=False, manualSeed=3)
    assert (cfg.sample_size, cfg.crop_size, cfg.epochs, cfg.data_paths) == (256, 224, 30, ("t", "v"))
    keypoint = dataclasses.replace(cfg, stage="keypoint")
    assert (keypoint.sample_size, keypoint.crop_size, keypoint.data_paths) == (900, 720, (None, None))
    assert cfg.output_dir() == repo_dir() / "devel" / "finetune"
    assert Settings.from_config(cfg, seed=5) == Settings(optim="adam", lr=0.1, seed=5)


@pytest.mark.parametrize("changes, message", [
    ({"stage": "keypoint", "keypoint_train_path": "t", "keypoint_val_path": "v"}, "needs --load_from"),
    ({"finetune_sample_size": 100}, "--finetune_sample_size 100 is smaller than --finetune_crop_size 224"),
    ({"lr": -1.0}, "--lr: expected a number > 0, got -1.0"),
    ({"optim": "lbfgs"}, "--optim: invalid choice: 'lbfgs'"),
    ({"expr": "/abs"}, "give a plain name"),
])
def test_library_call_checks_the_config(changes: dict, message: str) -> None:
    cfg = TrainConfig(finetune_train_path="t", finetune_val_path="v", **changes)
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert message in str(err.value)


# --- solver pieces ---------------------------------------------------------------------------
def test_optimisers_and_topk() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(params, Settings(optim="sgd")), torch.optim.SGD)
    assert build_optimizer(params, Settings(optim="sgd")).param_groups[0]["momentum"] == 0.9
    assert isinstance(build_optimizer(params, Settings(optim="adam")), torch.optim.Adam)
    assert isinstance(build_optimizer(params, Settings(optim="rmsprop")), torch.optim.RMSprop)
    outputs = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert correct_topk(outputs, torch.tensor([1, 1, 0])).tolist() == [1, 3, 3]  # k clamped to 2 classes


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_keypoint_step_keeps_backbone_frozen(layer: str) -> None:
    torch.manual_seed(0)
    model = Delf(3, arch="resnet18", stage="keypoint", target_layer=layer, use_random_gamma_rescale=True)
    backbone = {f"{i}.{k}": v.clone() for i, m in enumerate(model.backbone()) for k, v in m.state_dict().items()}
    attn_before = model.attn.conv1.weight.clone()
    solver = Solver(model, Settings(lr=0.1))
    optimised = {id(p) for group in solver.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in [*model.attn.parameters(), *model.logits.parameters()]}

    solver.net.train()
    solver.train_step(torch.rand(4, 3, 96, 96), torch.tensor([0, 1, 2, 0]))
    after = {f"{i}.{k}": v for i, m in enumerate(model.backbone()) for k, v in m.state_dict().items()}
    assert after.keys() == backbone.keys()
    for key, value in backbone.items():  # weights AND BatchNorm statistics
        assert torch.equal(after[key], value), key
    assert not torch.equal(model.attn.conv1.weight, attn_before)
    assert int(model.attn.bn.num_batches_tracked) == 1


# --- end to end ------------------------------------------------------------------------------
def _check_outputs(stage_dir: Path, epochs: int) -> None:
    for name in ("ckpt/bestshot.pth.tar", "ckpt/last.pth.tar", "log/config.json"):
        assert (stage_dir / name).is_file(), name
    assert list((stage_dir / "log").glob("events.out.tfevents.*"))
    for split in ("train", "val"):
        rows = read_csv(stage_dir / "log" / f"{split}.log")
        assert rows[0] == ["epoch", "lr", "loss", "top1", "top3", "top5"]
        assert [r[0] for r in rows[1:]] == [str(e + 1) for e in range(epochs)]
    ckpt = torch.load(stage_dir / "ckpt" / "last.pth.tar", map_location="cpu", weights_only=True)
    assert {"state_dict", "arch", "target_layer", "ncls", "stage", "epoch", "best_acc", "optimizer",
            "lr_scheduler", "config"} <= ckpt.keys()
    assert ckpt["epoch"] == epochs


@pytest.mark.slow
def test_seed_readme_commands_train_both_stages(image_data: tuple[Path, Path], expr: str) -> None:
    train_dir, val_dir = image_data
    run_trainer(["--stage", "finetune", "--optim", "sgd", "--gpu_id", "6", "--expr", expr,
                 "--ncls", "3", "--finetune_train_path", str(train_dir), "--finetune_val_path", str(val_dir),
                 *TINY, "--finetune_epoch", "2"], cwd=PROJECT_ROOT / "train")
    finetune = repo_dir() / expr / "finetune"
    _check_outputs(finetune, epochs=2)

    result = run_trainer(["--stage", "keypoint", "--gpu_id", "6", "--ncls", "3", "--optim", "sgd",
                          "--use_random_gamma_scaling", "true", "--expr", expr,
                          "--load_from", str(finetune / "ckpt" / "bestshot.pth.tar"),
                          "--keypoint_train_path", str(train_dir), "--keypoint_val_path", str(val_dir),
                          *TINY, "--keypoint_epoch", "1"], cwd=PROJECT_ROOT / "train")
    # --gpu_id 6 shows the machine's GPU 6 (it overrides the tests' empty CUDA_VISIBLE_DEVICES): CPU
    # where there is none
    probe = subprocess.run([PYTHON, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                           text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "6"}, check=True)
    on_cpu = "CUDA is not available (--gpu_id 6 shows no GPU): running on CPU" in result.stderr
    assert on_cpu == (probe.stdout.strip() == "False")
    keypoint = repo_dir() / expr / "keypoint"
    _check_outputs(keypoint, epochs=1)
    model, ckpt = load_model(keypoint / "ckpt" / "bestshot.pth.tar")
    assert (model.arch, model.target_layer, model.ncls) == ("resnet18", "layer3", 3)
    assert ckpt["config"]["use_random_gamma_rescale"] is True
    base = load_file(finetune / "ckpt" / "bestshot.pth.tar")["state_dict"]
    for key, value in model.base.state_dict().items():  # frozen: identical to the finetune stage
        assert torch.equal(value, base[f"base.{key}"]), key


def test_resume_matches_uninterrupted_run(image_data: tuple[Path, Path], expr: str) -> None:
    assert_resume_is_exact(lambda name, *flags: main(finetune_argv(name, image_data, *flags)), expr, "finetune")


def test_library_call_trains_without_argparse(image_data: tuple[Path, Path], expr: str) -> None:
    cfg = TrainConfig(expr=expr, finetune_train_path=str(image_data[0]), finetune_val_path=str(image_data[1]),
                      arch="resnet18", pretrained="none", finetune_sample_size=72, finetune_crop_size=64,
                      finetune_epoch=1, train_batch_size=4, val_batch_size=4, workers=0, manualSeed=7)
    out = train(cfg)
    assert out == repo_dir() / expr / "finetune"
    _check_outputs(out, epochs=1)
    config = json.loads((out / "log" / "config.json").read_text())
    extras = {"ncls": 3, "manualSeed": 7, "world_size": 1, "classes": sorted(p.name for p in image_data[0].iterdir())}
    assert config == {**dataclasses.asdict(cfg), **extras}
    assert load_file(out / "ckpt" / "last.pth.tar")["config"] == config


def test_pretrained_path_initialises_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    atomic_save({"state_dict": resnet.state_dict()}, tmp_path / "r18.pth")
    cfg = TrainConfig(arch="resnet18", pretrained=str(tmp_path / "r18.pth"))
    model = build_model(cfg, ncls=3, resuming=False)
    torch.testing.assert_close(model.base[0].weight, resnet.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight, rtol=0, atol=0)

    atomic_save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(PretrainedUnavailable, match=r"r34.pth is not a torchvision resnet18 state_dict"):
        build_model(dataclasses.replace(cfg, pretrained=str(tmp_path / "r34.pth")), ncls=3, resuming=False)


def test_corrupt_training_image_is_skipped(image_data: tuple[Path, Path], tmp_path: Path, expr: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    train_dir = shutil.copytree(image_data[0], tmp_path / "train")
    (train_dir / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = (train_dir / "coffee" / "000.jpg").read_bytes()[:300]
    (train_dir / "coffee" / "truncated.jpg").write_bytes(truncated)
    main(finetune_argv(expr, (train_dir, image_data[1])))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("corrupt image" in m and "broken.jpg" in m for m in warned)
    assert any("corrupt image" in m and "truncated.jpg" in m for m in warned)
    assert (repo_dir() / expr / "finetune" / "ckpt" / "last.pth.tar").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--ncls", "5"], "--ncls 5 does not match"),
    (["--resume"], "--resume:"),
    (["--pretrained", "imagenet"], "--pretrained none"),
])
def test_user_errors_exit_with_a_message(image_data: tuple[Path, Path], expr: str, extra: list[str],
                                         message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(SystemExit) as exit_:
        main(finetune_argv(expr, image_data, *extra))
    assert str(exit_.value.code).startswith("error: ") and message in str(exit_.value.code)


def test_missing_data_folder(image_data: tuple[Path, Path], tmp_path: Path, expr: str) -> None:
    with pytest.raises(SystemExit, match="no such data folder"):
        main(finetune_argv(expr, (tmp_path / "nowhere", image_data[1])))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(image_data: tuple[Path, Path], expr: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    forward = torch.nn.CrossEntropyLoss.forward
    calls = {"train": 0}

    def nan_in_second_epoch(self: torch.nn.Module, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = forward(self, outputs, labels)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] > 3:  # 3 training steps per epoch
                return loss * float("nan")
        return loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", nan_in_second_epoch)
    with pytest.raises(SystemExit, match=r"error: loss is nan at epoch 2, step 1.*last good checkpoint"):
        main(finetune_argv(expr, image_data, "--finetune_epoch", "2"))
    last = load_file(repo_dir() / expr / "finetune" / "ckpt" / "last.pth.tar")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def _call_recording_dtypes(modules: list[torch.nn.Module], fn: Callable[..., T], *args: object
                           ) -> tuple[T, list[torch.dtype]]:
    """``fn(*args)``, and the dtypes of the outputs of ``modules`` during that call, in call order."""
    dtypes: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for m in modules]
    try:
        return fn(*args), dtypes
    finally:
        for h in hooks:
            h.remove()


def test_amp_step_runs_in_bf16_with_fp32_weights() -> None:
    """--amp on CPU: the forward really computes in bf16 (activations are bf16, the loss differs
    from fp32 by bf16 rounding only) while weights and their updates stay fp32."""
    torch.manual_seed(0)
    model = Delf(3, arch="resnet18", stage="finetune")
    images, labels = torch.rand(2, 3, 64, 64), torch.tensor([0, 2])
    losses, dtypes, solvers = {}, {}, {}
    for amp in (False, True):
        solver = solvers[amp] = Solver(copy.deepcopy(model), Settings(amp=amp, lr=0.1))
        solver.net.train()
        watched = [solver.model.base[0], solver.model.layer4, solver.model.logits[0]]
        (losses[amp], *_), dtypes[amp] = _call_recording_dtypes(watched, solver.train_step, images, labels)
    assert dtypes[False] == [torch.float32] * 3
    assert dtypes[True] == [torch.bfloat16] * 3
    loss32, loss16 = float(losses[False]), float(losses[True])
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.05 * abs(loss32)
    amp_model = solvers[True].model
    assert all(p.dtype == torch.float32 for p in amp_model.parameters())
    moved = [not torch.equal(p, q) for p, q in zip(amp_model.parameters(), model.parameters(), strict=True)]
    assert all(moved)  # every weight was updated


def test_amp_flag_trains_in_bf16(image_data: tuple[Path, Path], expr: str) -> None:
    with training_conv_dtypes() as dtypes:
        main(finetune_argv(expr, image_data, "--amp", "true", "--optim", "adam"))
    assert dtypes == {torch.bfloat16}
    ckpt = load_file(repo_dir() / expr / "finetune" / "ckpt" / "last.pth.tar")
    assert ckpt["config"]["amp"] is True


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one(uniform_data: tuple[Path, Path], expr: str) -> None:
    """Two processes of 4 images per step train as one process of 8 (the sampler's shares, DDP's
    gradient averaging, the metrics' sums over processes); a second run on that folder is then
    refused by every process."""
    def argv(name: str, batch: str) -> list[str]:
        return finetune_argv(name, uniform_data, "--finetune_sample_size", "64", "--finetune_crop_size", "64",
                             "--train_batch_size", batch)

    run_trainer(argv(expr + "-one", "8"))  # a process of its own, one thread as the two below
    result = run_trainer(argv(expr, "4"), nproc=2)
    stage_dir = repo_dir() / expr / "finetune"
    assert_same_training(repo_dir() / (expr + "-one") / "finetune", stage_dir)
    _check_outputs(stage_dir, epochs=1)
    assert sorted(p.name for p in (stage_dir / "ckpt").iterdir()) == ["bestshot.pth.tar", "last.pth.tar"]
    assert load_file(stage_dir / "ckpt" / "last.pth.tar")["config"]["world_size"] == 2
    assert result.stderr.count("epoch 1/1") == 1  # rank 0 logs

    again = run_trainer(argv(expr, "4"), nproc=2, check=False)
    assert again.returncode != 0  # every process stops: rank 0 refuses, the others follow
    assert again.stderr.count("holds a run (epoch 1") == 1 and "rank 1: not starting, rank 0 refused" in again.stderr


def test_attention_pool_flag_reaches_the_model_and_guards_resume(tmp_path: Path) -> None:
    base = ["--stage", "keypoint", "--keypoint_train_path", "t", "--keypoint_val_path", "v", "--load_from", "m"]
    assert parse_args(base).attention_pool == "sum"
    cfg = parse_args([*base, "--attention_pool", "mean", "--arch", "resnet18"])
    assert cfg.attention_pool == "mean"
    cfg = dataclasses.replace(cfg, load_from=str(save_keypoint_checkpoint(tmp_path / "kp.pth.tar")))
    model = build_model(cfg, ncls=3, resuming=False)
    assert model.pool.mode == "mean"
    ckpt = checkpoint_dict(model)
    _check_resumable(ckpt, cfg, 3, tmp_path / "last.pth.tar")
    with pytest.raises(CheckpointError, match=r"cannot resume, the checkpoint has attention_pool mean \(now sum\)"):
        _check_resumable(ckpt, dataclasses.replace(cfg, attention_pool="sum"), 3, tmp_path / "last.pth.tar")


def test_training_loader_applies_exif_orientation(tmp_path: Path) -> None:
    """A JPEG stored 40 wide x 20 high with Orientation 6 (rotate 90 degrees clockwise to display)
    loads 20 wide x 40 high, its pixels the stored ones turned clockwise - as extraction loads it."""
    from extract.extraction.images import load_image
    from train.dataloader import ImageFolder, val_transform

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red, right half blue
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(stored).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)

    raw = np.asarray(Image.open(folder / "rotated.jpg").convert("RGB"))
    upright = np.rot90(raw, k=-1)  # clockwise
    tensor, _ = ImageFolder(tmp_path / "data", val_transform(20, 20))[0]
    loaded = ImageFolder(tmp_path / "data", transforms.PILToTensor())[0][0]
    assert loaded.shape == (3, 40, 20)
    assert torch.equal(loaded, torch.from_numpy(upright.copy()).permute(2, 0, 1))
    assert loaded[0, :5].float().mean() > 200 and loaded[2, -5:].float().mean() > 200  # red on top, blue below
    assert np.array_equal(np.asarray(load_image(folder / "rotated.jpg")), upright)
    assert tensor.shape == (3, 20, 20)


def test_padded_samples_count_once(image_data: tuple[Path, Path]) -> None:
    """7 images on 2 processes: DistributedSampler gives each 4 (one repeat); the metrics count
    4 + 3 distinct samples, and their loss/top-k are those of exactly these samples."""
    from train.dataloader import image_folders, loaders
    from train.solver import EpochMeter, real_samples

    train_set, val_set = image_folders(*image_data, 72, 64)
    train_set.samples = train_set.samples[:7]
    counted: list[int] = []
    for rank in (0, 1):
        loader, _ = loaders(train_set, val_set, 3, 3, 0, seed=1, rank=rank, world_size=2)
        order = [index for _, _, index in loader.sampler]
        assert len(order) == 4 and real_samples(loader.sampler) == 4 - rank
        counted += order[:real_samples(loader.sampler)]
        torch.manual_seed(rank)
        solver = Solver(Delf(3, arch="resnet18", stage="finetune"), Settings(lr=0.01))
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        step = solver.train_step

        def recording(images: torch.Tensor, labels: torch.Tensor, step=step, seen=seen) -> StepOutput:
            out = step(images, labels)
            seen.append((out.logits, labels))
            return out

        solver.train_step = recording
        metrics = solver.train_epoch(loader, 0, 1)
        outputs, labels = (torch.cat(t)[:4 - rank] for t in zip(*seen))
        assert metrics["samples"] == 4 - rank
        expected = torch.nn.functional.cross_entropy(outputs, labels).item()
        assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
        assert metrics["top1"] == pytest.approx(100 * (outputs.argmax(1) == labels).float().mean().item())
    assert sorted(counted) == list(range(7))

    meter = EpochMeter(torch.device("cpu"), limit=5)
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
    meter.update(torch.full((3,), 9.0), logits, torch.tensor([0, 1, 2]))  # 9 * 3
    labels = torch.tensor([2, 1, 0])
    meter.update(torch.nn.functional.cross_entropy(logits, labels, reduction="none"), logits, labels)  # only 2 count
    first_two = torch.nn.functional.cross_entropy(logits[:2], torch.tensor([2, 1]), reduction="sum").item()
    avg = meter.averages()
    assert avg["samples"] == 5 and avg["loss"] == pytest.approx((27 + first_two) / 5)
    assert avg["top1"] == pytest.approx(100 * 3 / 5)  # hits: 0, 1 | 1


@pytest.mark.parametrize("stage, gamma, training, expected", [
    ("finetune", False, True, True), ("keypoint", True, True, False), ("keypoint", True, False, True),
    ("keypoint", False, True, True)])
def test_cudnn_autotuning_only_for_fixed_input_sizes(stage: str, gamma: bool, training: bool, expected: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = Delf(3, arch="resnet18", stage=stage, use_random_gamma_rescale=gamma)
    solver = Solver(model, Settings())
    assert solver.autotune(training) is False  # CPU: never
    monkeypatch.setattr(solver, "device", torch.device("cuda"))
    assert solver.autotune(training) is expected


# --- never lose earlier work -----------------------------------------------------------------
def test_an_existing_run_needs_resume_or_overwrite(image_data: tuple[Path, Path], expr: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    main(finetune_argv(expr, image_data))
    stage = repo_dir() / expr / "finetune"
    before = {p: p.read_bytes() for p in stage.rglob("*") if p.is_file()}
    best = load_file(stage / "ckpt" / "last.pth.tar")["best_acc"]
    with pytest.raises(SystemExit) as exit_:
        main(finetune_argv(expr, image_data))
    assert str(exit_.value) == (f"error: {stage / 'ckpt' / 'last.pth.tar'} holds a run (epoch 1, best val top-1 "
                                f"{best:.2f}%): pass --resume to continue it or --overwrite to start afresh, "
                                "replacing it")
    assert {p: p.read_bytes() for p in stage.rglob("*") if p.is_file()} == before  # untouched

    (stage / "ckpt" / "last.pth.tar").rename(stage / "ckpt" / "moved.pth.tar")  # a best checkpoint alone
    with pytest.raises(SystemExit, match=r"bestshot.pth.tar holds a run \(epoch 1, .*no last.pth.tar: pass --overwr"):
        main(finetune_argv(expr, image_data))
    (stage / "ckpt" / "moved.pth.tar").rename(stage / "ckpt" / "last.pth.tar")

    old_events = {p.read_bytes() for p in (stage / "log").glob("events.out.tfevents.*")}
    main(finetune_argv(expr, image_data, "--overwrite", "--lr", "0.02"))
    assert load_file(stage / "ckpt" / "last.pth.tar")["config"]["lr"] == 0.02
    # one run's logs only (compared by content: the file name has a one-second timestamp)
    events = [p.read_bytes() for p in (stage / "log").glob("events.out.tfevents.*")]
    assert len(events) == 1 and events[0] not in old_events
    assert [r[0] for r in read_csv(stage / "log" / "train.log")] == ["epoch", "1"]
    with pytest.raises(SystemExit):
        main(finetune_argv(expr, image_data, "--overwrite", "--resume"))
    assert "--resume continues a run and --overwrite replaces it: give one of them" in capsys.readouterr().err


def test_disk_full_while_saving_ends_with_one_line(image_data: tuple[Path, Path], expr: str,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    import errno

    import train.solver as solver_module

    saves = []
    real_save = solver_module.atomic_save

    def failing_in_epoch_2(obj: dict, path: Path) -> None:
        saves.append(Path(path).name)
        if obj["epoch"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(obj, path)

    monkeypatch.setattr(solver_module, "atomic_save", failing_in_epoch_2)
    with pytest.raises(SystemExit) as exit_:
        main(finetune_argv(expr, image_data, "--finetune_epoch", "3"))
    ckpt = repo_dir() / expr / "finetune" / "ckpt"
    message = str(exit_.value)
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err
    assert message.startswith(f"error: could not write {ckpt}/") and "(No space left on device)" in message
    assert message.endswith(f"{ckpt / 'last.pth.tar'} (epoch 1) is kept: --resume continues from it")
    assert load_file(ckpt / "last.pth.tar")["epoch"] == 1
    assert not list(ckpt.glob(".*.tmp"))

    monkeypatch.setattr(solver_module, "atomic_save", real_save)
    main(finetune_argv(expr, image_data, "--finetune_epoch", "3", "--resume"))
    assert load_file(ckpt / "last.pth.tar")["epoch"] == 3

    fresh = expr + "-fresh"
    def broken_log(*args: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(solver_module.RunLog, "write", broken_log)
    with pytest.raises(SystemExit, match=r"could not write .*/log \(I/O error\); .*\(epoch 1\) is kept"):
        main(finetune_argv(fresh, image_data))


def test_a_checkpoint_holding_python_objects_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": Path("/etc/passwd")}, path)  # a pickled Python object
    with pytest.raises(CheckpointError) as err:
        load_file(path)
    assert str(err.value) == (f"refusing to load {path}: it holds Python objects other than tensors (only "
                              "checkpoints written by this project or the seed load)")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(Path("/x")))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_file(tmp_path / "plain.pkl")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as err:
        load_file(tmp_path / "junk.pth")
    assert "\n" not in str(err.value) and "not a readable checkpoint" in str(err.value)


def _hold_lock(stage: Path) -> subprocess.Popen:
    """Another process holding the trainer's lock on ``stage``, as a running trainer does."""
    code = ("import sys, time; from train.outputs import OutputLock; "
            "lock = OutputLock(sys.argv[1]); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([PYTHON, "-c", code, str(stage)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_refused_start_leaves_no_folder(tmp_path: Path, expr: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(finetune_argv(expr, (tmp_path / "none", tmp_path / "none")))
    assert str(exit_.value) == f"error: {tmp_path / 'none'}: no such data folder"
    assert not (repo_dir() / expr).exists()


def test_removed_if_failed_removes_only_what_holds_no_work(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out.h5"
    with pytest.raises(RuntimeError), removed_if_failed(out):
        OutputLock(out).release()
        raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), removed_if_failed(out):  # work is kept, and its folders
        out.parent.mkdir(parents=True)
        out.write_text("work")
        raise RuntimeError("failed")
    assert out.read_text() == "work"
    other = tmp_path / "c" / "out"
    with pytest.raises(RuntimeError), removed_if_failed(other):  # a lock another holder has stays
        held = OutputLock(other)
        raise RuntimeError("failed")
    assert lock_file_for(other).is_file()
    held.release()
    with removed_if_failed(tmp_path / "d" / "out"):  # success: nothing removed
        OutputLock(tmp_path / "d" / "out").release()
    assert lock_file_for(tmp_path / "d" / "out").is_file()


def test_a_lock_file_removed_before_it_is_locked_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that opened the lock file just before a failed run's clean-up removed it locks
    the file that is then at the path, never the removed one (two writers would each hold one)."""
    out = tmp_path / "out"
    flock, calls = fcntl.flock, []

    def flock_after_removal(fd: int, operation: int) -> None:
        if not calls:
            lock_file_for(out).unlink()
        calls.append(operation)
        flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_removal)
    with OutputLock(out) as lock:
        assert os.path.samestat(os.fstat(lock._file.fileno()), os.stat(lock_file_for(out)))
    assert len(calls) == 3  # the removed file, the new one, the release


def test_killed_holders_lock_does_not_block_the_rerun(image_data: tuple[Path, Path], expr: str) -> None:
    stage = repo_dir() / expr / "finetune"
    holder = _hold_lock(stage)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(finetune_argv(expr, image_data))
        assert str(exit_.value).startswith(f"error: {stage}: in use by another process (pid {holder.pid}, since ")
        assert str(exit_.value).endswith("wait for it or choose another --expr")
        assert not stage.exists()  # nothing written
    finally:
        holder.kill()  # SIGKILL: no clean-up runs
        holder.wait()
    main(finetune_argv(expr, image_data))
    assert load_file(stage / "ckpt" / "last.pth.tar")["epoch"] == 1


@pytest.mark.slow
def test_second_trainer_is_refused_while_the_first_finishes_intact(image_data: tuple[Path, Path], expr: str) -> None:
    first = subprocess.Popen([PYTHON, "train/main.py", *finetune_argv(expr, image_data, "--finetune_epoch", "6")],
                             cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    lock = repo_dir() / expr / "finetune.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and f"pid {first.pid}" in lock.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, "the first trainer did not start"
        time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_:  # the second trainer, in this process
        main(finetune_argv(expr, image_data, "--overwrite"))
    assert time.monotonic() - started < 5
    assert first.poll() is None, "the first trainer should still be running"
    assert str(exit_.value).startswith(f"error: {repo_dir() / expr / 'finetune'}: in use by another process "
                                       f"(pid {first.pid}")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    _check_outputs(repo_dir() / expr / "finetune", epochs=6)


def test_add_config_args_honours_type_aliases_and_groups(capsys: pytest.CaptureFixture) -> None:
    """One mechanism for every config: metadata type (validator), aliases, group, choices."""
    import argparse
    from dataclasses import dataclass, field

    from train.cli import add_config_args, config_from_args

    def even(value: str) -> int:
        if int(value) % 2:
            raise argparse.ArgumentTypeError(f"expected an even number, got {value}")
        return int(value)

    @dataclass(frozen=True)
    class Demo:
        size: int = field(default=4, metadata={"help": "an even size", "type": even, "group": "shape"})
        mode: str = field(default="a", metadata={"help": "mode", "choices": ("a", "b"), "group": "shape"})
        flip: bool = field(default=False, metadata={"help": "flip", "aliases": ("--mirror",)})
        scales: tuple[float, ...] = (1.0,)

    parser = argparse.ArgumentParser(prog="demo")
    add_config_args(parser, Demo)
    cfg = config_from_args(Demo, parser.parse_args(["--size", "6", "--mirror", "--scales", "0.5", "1"]))
    assert cfg == Demo(size=6, flip=True, scales=(0.5, 1.0))
    assert [g.title for g in parser._action_groups][-1] == "shape"
    assert {a.dest for a in parser._action_groups[-1]._group_actions} == {"size", "mode"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--size", "3"])
    assert "argument --size: expected an even number, got 3" in capsys.readouterr().err


def _can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a small tmpfs (needs unshare -rm)")
def test_really_full_disk_keeps_the_last_checkpoint(image_data: tuple[Path, Path], tmp_path: Path) -> None:
    """A 250 MB tmpfs holds epoch 1's two resnet18 checkpoints (~90 MB each), not epoch 2's."""
    repo = tmp_path / "small-disk"
    repo.mkdir()
    last = repo / "full" / "finetune" / "ckpt" / "last.pth.tar"
    check = (f"import glob, torch; print('kept epoch', torch.load({str(last)!r}, weights_only=True)['epoch'], "
             f"'temp files', len(glob.glob({str(last.parent)!r} + '/.*.tmp')))")
    argv = " ".join(f"'{a}'" for a in finetune_argv("full", image_data, "--finetune_epoch", "3"))
    script = (f"mount -t tmpfs -o size=250m tmpfs {repo} && {{ {PYTHON} train/main.py {argv}; echo rc=$?; "
              f"{PYTHON} -c \"{check}\"; }}")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "DELF_REPO_DIR": str(repo)})
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "rc=1" in result.stdout and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(error) == 1 and "(No space left on device)" in error[0]
    assert error[0].endswith(f"{last} (epoch 1) is kept: --resume continues from it")
    assert "kept epoch 1 temp files 0" in result.stdout


@pytest.mark.slow
def test_slim_layout_trains_the_keypoint_stage_of_an_official_model(image_data: tuple[Path, Path], tmp_path: Path,
                                                                     expr: str) -> None:
    """--layout slim: the keypoint stage starts from an official-layout checkpoint (as
    extract/convert_official.py writes it), keeps its backbone frozen, and records the layout and
    the (pixel - 128) / 128 input normalisation; a torchvision-layout run refuses that checkpoint,
    and a slim finetune run asks for weights instead of ImageNet's."""
    from extract.official.convert import new_model

    torch.manual_seed(0)
    official = tmp_path / "fix.pth.tar"
    atomic_save(checkpoint_dict(new_model()), official)
    argv = ["--stage", "keypoint", "--expr", expr, "--arch", "resnet50", "--load_from", str(official),
            "--keypoint_train_path", str(image_data[0]), "--keypoint_val_path", str(image_data[1]),
            "--keypoint_sample_size", "72", "--keypoint_crop_size", "64", "--train_batch_size", "4",
            "--val_batch_size", "4", "--keypoint_epoch", "1", "--workers", "0", "--manualSeed", "7"]
    refused = run_trainer(argv, check=False)
    assert refused.returncode == 1
    assert f"{official}: checkpoint's layout is slim, but --layout is torchvision" in refused.stderr
    run_trainer([*argv, "--layout", "slim"])
    model, ckpt = load_model(repo_dir() / expr / "keypoint" / "ckpt" / "bestshot.pth.tar")
    assert (ckpt["layout"], ckpt["input_norm"], model.receptive_field().stride) == ("slim", "tf", 32)
    base = load_file(official)["state_dict"]
    for key, value in model.base.state_dict().items():
        assert torch.equal(value, base[f"base.{key}"]), key
    finetune = run_trainer(finetune_argv(expr + "-ft", image_data, "--layout", "slim", "--arch", "resnet50",
                                         "--pretrained", "imagenet"), check=False)
    assert finetune.returncode == 1 and "--layout slim: there are no ImageNet weights" in finetune.stderr
