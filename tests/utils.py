"""Test data made on the spot: real CC0 photos bundled with scikit-image, tiny checkpoints."""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from extract.extraction.feature_file import feature_names, iter_features
from extract.make_demo.landmarks import landmark_photo
from train.checkpoint import atomic_save, checkpoint_dict, load_file
from train.delf import Delf
from train.delg import Delg
from train.runtime import PROJECT_ROOT, repo_dir

# scikit-image's bundled photographs (CC0); distinct scenes, one class each (the demo's are its own:
# extract/make_demo/landmarks.py LANDMARKS).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "colorwheel", "camera", "brick", "coins")


def photo(name: str, size: int | None = None) -> np.ndarray:
    """A bundled photo as RGB uint8 (H, W, 3), its longest side resized to ``size``."""
    return landmark_photo(name, size)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 96,
                      seed: int = 0) -> Path:
    """An ImageFolder: class k = random crops/flips of photo k, JPEG files."""
    rng = np.random.default_rng(seed)
    for name in PHOTOS[:classes]:
        img = photo(name, size=int(size * 1.5))
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            y = rng.integers(0, img.shape[0] - size + 1) if img.shape[0] > size else 0
            x = rng.integers(0, img.shape[1] - size + 1) if img.shape[1] > size else 0
            crop = img[y:y + size, x:x + size]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


def make_uniform_image_folder(root: Path, counts: Sequence[int], size: int = 64) -> Path:
    """An ImageFolder of ``counts[k]`` copies of one left-right symmetric image (PNG, ``size`` px
    square) in class k's folder. Trained at sample and crop size ``size``, the augmentation
    (random crop, flip) leaves every image as it is, so BatchNorm's batch statistics do not
    depend on how the batch is split between processes: a torchrun run of B per process trains
    as one process with the whole batch, up to rounding (the labels still differ per sample).
    The image is random noise: the statistics of identical images are over positions only, and a
    smooth photo leaves channels of the 2x2 last feature map nearly constant, whose
    normalisation magnifies rounding."""
    half = np.random.default_rng(0).integers(0, 256, (size, size // 2, 3), dtype=np.uint8)
    img = np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1))
    for name, n in zip(PHOTOS, counts):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


def save_keypoint_checkpoint(path: Path, arch: str = "resnet18", target_layer: str = "layer3",
                             ncls: int = 3, seed: int = 0) -> Path:
    """A randomly initialised keypoint-stage model in this project's checkpoint format."""
    torch.manual_seed(seed)
    model = Delf(ncls, arch=arch, stage="keypoint", target_layer=target_layer)
    atomic_save(checkpoint_dict(model), path)
    return path


def write_bad_images(folder: Path) -> dict[str, str]:
    """One file per kind of unusable image; returns name -> expected words of the reason."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    Image.fromarray(photo("chelsea", 120)).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(_png_header(30000, 30000))
    (folder / "dangling.jpg").symlink_to(folder / "does-not-exist.jpg")
    return {"empty.jpg": "empty file", "truncated.jpg": "unreadable image data", "text.png": "not an image",
            "bomb.png": "decompression bomb", "dangling.jpg": "dangling symbolic link"}


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG file claiming a huge image (Pillow refuses it on open, before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Valid images in unusual modes; returns name -> displayed (w, h)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(photo("astronaut", 96))
    rgb.convert("L").save(folder / "gray.png")
    Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)).save(folder / "sixteen.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.gif")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees for display
    rgb.resize((96, 64)).save(folder / "rotated.jpg", exif=exif)
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    return {"gray.png": (96, 96), "sixteen.png": (96, 96), "rgba.png": (96, 96), "palette.gif": (96, 96),
            "cmyk.jpg": (96, 96), "rotated.jpg": (64, 96), "animated.gif": (64, 64)}


def make_gldv2(root: Path, classes: int = 3, per_class: int = 5, size: int = 80, seed: int = 0) -> Path:
    """A tiny Google Landmarks v2 tree: images at ``root/train/a/b/c/abc….jpg`` (landmark
    10 * (k + 1) = random crops of photo k), ``root/train.csv`` (id,url,landmark_id) and
    ``root/train_clean.csv`` (landmark_id,images). Returns ``root``."""
    folder = make_image_folder(root / "_folder", classes=classes, per_class=per_class, size=size, seed=seed)
    rows, clean = [], []
    for k, name in enumerate(PHOTOS[:classes]):
        ids = []
        for i, src in enumerate(sorted((folder / name).iterdir())):
            image_id = hashlib.sha1(f"{name}-{i}".encode()).hexdigest()[:16]
            dst = root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
            rows.append(f"{image_id},http://example.com/{image_id}.jpg,{10 * (k + 1)}")
            ids.append(image_id)
        clean.append(f"{10 * (k + 1)},{' '.join(ids)}")
    shutil.rmtree(folder)
    (root / "train.csv").write_text("id,url,landmark_id\n" + "\n".join(rows) + "\n")
    (root / "train_clean.csv").write_text("landmark_id,images\n" + "\n".join(clean) + "\n")
    return root


def save_delg_checkpoint(path: Path, arch: str = "resnet18", global_dim: int = 32, autoencoder_dim: int = 16,
                         ncls: int = 3, seed: int = 0, block3_strides: bool = True) -> Path:
    """A randomly initialised delg-stage model in this project's checkpoint format."""
    torch.manual_seed(seed)
    model = Delg(ncls, arch=arch, global_dim=global_dim, autoencoder_dim=autoencoder_dim,
                 block3_strides=block3_strides)
    atomic_save(checkpoint_dict(model), path)
    return path


def assert_resume_is_exact(train: Callable[..., object], expr: str, stage: str) -> None:
    """``train(expr, *flags)`` (the stage's training command) for 2 epochs straight, and for 1 epoch
    then ``--resume`` to 2: the two stage folders (repo/<expr>/<stage>) end identically — the last
    checkpoints' epoch, LR schedule, best accuracy, weights and momentum buffers, and val.log."""
    epochs = f"--{stage}_epoch"
    train(expr + "-a", epochs, "2", "--lr_stepsize", "1")
    train(expr, epochs, "1", "--lr_stepsize", "1")
    train(expr, epochs, "2", "--lr_stepsize", "1", "--resume")
    straight, resumed = repo_dir() / (expr + "-a") / stage, repo_dir() / expr / stage
    a, b = (load_file(d / "ckpt" / "last.pth.tar") for d in (straight, resumed))
    assert b["epoch"] == 2
    assert (b["epoch"], b["lr_scheduler"], b["best_acc"]) == (a["epoch"], a["lr_scheduler"], a["best_acc"])
    for key, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][key], value), key
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(b["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"])
    with (straight / "log" / "val.log").open(newline="") as f, (resumed / "log" / "val.log").open(newline="") as g:
        assert list(csv.reader(f)) == list(csv.reader(g))


def assert_same_training(one: Path, two: Path) -> None:
    """Two stage folders (repo/<expr>/<stage>) of runs that trained alike (see
    :func:`make_uniform_image_folder`): the last checkpoints' weights and the logged training
    metrics equal to rounding, the validation accuracies equal. BatchNorm's running variances,
    and the validation losses they enter, within a few per cent: a running variance is the
    unbiased one, n/(n-1) times the batch's, with n the cells of a process's batch (n = 16 for 4
    images at layer4 of a 64 px input), which halves when two processes share the batch."""
    a, b = (load_file(d / "ckpt" / "last.pth.tar") for d in (one, two))
    assert a["epoch"] == b["epoch"] and a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        tol = {"rtol": 0.1, "atol": 0.0} if key.endswith("running_var") else {"rtol": 1e-4, "atol": 5e-5}
        torch.testing.assert_close(b["state_dict"][key], value, **tol, msg=lambda m, key=key: f"{key}: {m}")
    for split in ("train", "val"):
        with (one / "log" / f"{split}.log").open(newline="") as f, (two / "log" / f"{split}.log").open(newline="") as g:
            rows_a, rows_b = list(csv.DictReader(f)), list(csv.DictReader(g))
        assert len(rows_a) == len(rows_b) > 0
        for ra, rb in zip(rows_a, rows_b, strict=True):
            for column, value in ra.items():
                rel = 0.02 if split == "val" and column.startswith("loss") else 1e-5
                assert float(rb[column]) == pytest.approx(float(value), rel=rel), (split, column)


# --- training runs ---
def run_trainer(args: Sequence[str], nproc: int | None = None, cwd: Path = PROJECT_ROOT, timeout: float = 600,
                check: bool = True) -> subprocess.CompletedProcess:
    """train/main.py ``args`` in a subprocess run from ``cwd`` (OMP_NUM_THREADS=1), under
    torchrun with ``nproc`` processes if given; output captured as text. With ``check``, a
    non-zero exit fails the test showing the end of stderr."""
    script = os.path.relpath(PROJECT_ROOT / "train" / "main.py", cwd)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    result = subprocess.run([sys.executable, *launcher, script, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@contextmanager
def training_conv_dtypes() -> Iterator[set[torch.dtype]]:
    """The dtypes of the Conv2d outputs computed with gradients enabled (training steps, not
    validation) inside the block, in this process."""
    dtypes: set[torch.dtype] = set()

    def record(module: torch.nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(module, torch.nn.Conv2d) and torch.is_grad_enabled():
            dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        yield dtypes
    finally:
        handle.remove()


# --- extraction scripts and feature files ---
def script_env(pythonpath: str = "") -> dict[str, str]:
    """The environment of a script a test starts: this one's, one thread, ``pythonpath`` as PYTHONPATH."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}


def assert_same_features(a: Path, b: Path) -> None:
    """The feature files ``a`` and ``b`` hold the same images, with the same features (to float rounding)."""
    assert feature_names(a) == feature_names(b)
    for (name, fa), (_, fb) in zip(iter_features(a), iter_features(b), strict=True):
        for key in fa:
            np.testing.assert_allclose(fa[key], fb[key], rtol=1e-5, atol=1e-6, err_msg=f"{name}/{key}")


def wait_for_groups(path: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Return once the feature file ``path`` holds ``n`` complete images, ``proc`` (which writes
    it) has ended, or ``timeout`` seconds have passed."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            with h5py.File(path, "r", locking=False) as f:
                if sum(1 for g in f.values() if g.name != "/__incomplete__" for _ in g.values()) >= n:
                    return
        except (OSError, KeyError, RuntimeError):
            pass
        time.sleep(0.02)


# --- descriptors ---
def unit(x: np.ndarray) -> np.ndarray:
    """The rows (last axis) of ``x`` scaled to unit length, as float32."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# --- memory ---
def held_bytes(obj: object) -> int:
    """Bytes of every numpy array and torch tensor an object holds (directly or in lists)."""
    total = 0
    for value in vars(obj).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, np.ndarray):
                total += item.nbytes
            elif isinstance(item, torch.Tensor):
                total += item.numel() * item.element_size()
    return total
