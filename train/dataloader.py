"""Training data: ImageFolder datasets with the seed's transforms, and their loaders.

Images come out as RGB float tensors in [0, 1]; the model normalises them itself.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.utils.data as data
import torchvision.datasets as datasets
import torchvision.transforms as T
from PIL import Image, ImageOps

from .config import MAX_WORKERS
from .runtime import epoch_seed

MAX_RETRIES = 100
SAMPLE_STRIDE = 2_000_003  # epoch_seed stride of the per-sample augmentation seeds (> any dataset length)
SampleKey = tuple[int, int, int]
"""(run seed, epoch, dataset index): what :class:`EpochSampler` hands the dataset."""
log = logging.getLogger("delf")


class DataError(RuntimeError):
    """A data folder is missing, empty or inconsistent."""


def train_transform(sample_size: int, crop_size: int) -> T.Compose:
    """Resize (shorter side) -> random crop -> horizontal flip -> [0, 1] tensor."""
    return T.Compose([T.Resize(sample_size), T.RandomCrop(crop_size), T.RandomHorizontalFlip(),
                      T.ToTensor()])


def val_transform(sample_size: int, crop_size: int) -> T.Compose:
    """Resize (shorter side) -> centre crop -> [0, 1] tensor."""
    return T.Compose([T.Resize(sample_size), T.CenterCrop(crop_size), T.ToTensor()])


def upright(img: Image.Image) -> Image.Image:
    """``img`` as displayed: its EXIF orientation applied (a camera's portrait photo is stored
    sideways with an Orientation tag); a broken EXIF block keeps the stored orientation.
    Training and extraction both use it, so they see images the same way up."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block: keep the stored orientation
        return img


def _load_rgb(path: str) -> Image.Image:
    """The image as displayed (:func:`upright`), in RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return upright(img).convert("RGB")


class ImageFolder(datasets.ImageFolder):
    """torchvision ImageFolder that skips unreadable images: a corrupt file is reported once per
    loading process (a warning naming it) and the next readable image takes its place, so
    batches keep their size and distributed processes stay in step."""

    def __init__(self, root: str | Path, transform: T.Compose) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such data folder")
        try:
            super().__init__(str(root), transform=transform, loader=_load_rgb)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"{root}: not an ImageFolder (one sub-folder of images per class): {e}") from None
        self.corrupt: set[int] = set()

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int]:
        """Sample ``key``: an index, or (seed, epoch, index) from :class:`EpochSampler`, whose
        random augmentation is then drawn from torch's generator seeded by that triple, so it
        does not depend on which worker process loads it (nor on --workers, nor on --resume)."""
        if isinstance(key, int):
            return self._get(key)
        seed, epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(seed, epoch, index, stride=SAMPLE_STRIDE))
            return self._get(index)

    def _get(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(min(MAX_RETRIES, len(self))):
            i = (index + attempt) % len(self)
            if i in self.corrupt:
                continue
            try:
                return super().__getitem__(i)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # bad files
                self.corrupt.add(i)
                log.warning("skipping corrupt image %s (%s)", self.samples[i][0], type(e).__name__)
        raise DataError(f"{self.root}: no readable image among {MAX_RETRIES} files from index {index}")


class EpochSampler(data.DistributedSampler):
    """DistributedSampler (shuffled by seed and epoch; call ``set_epoch``) that yields
    (seed, epoch, index) keys, so that each sample's augmentation is seeded by them
    (see :meth:`ImageFolder.__getitem__`): persistent workers keep their random state across
    epochs, which would otherwise make a resumed run differ from an uninterrupted one."""

    def __iter__(self) -> Iterator[SampleKey]:  # type: ignore[override]
        return ((self.seed, self.epoch, i) for i in super().__iter__())


def image_folders(train_path: str | Path, val_path: str | Path, sample_size: int,
                  crop_size: int) -> tuple[ImageFolder, ImageFolder]:
    """Training and validation ImageFolders; their class lists must be identical."""
    train = ImageFolder(train_path, train_transform(sample_size, crop_size))
    val = ImageFolder(val_path, val_transform(sample_size, crop_size))
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise DataError(
            f"{train_path} has {len(train.classes)} classes and {val_path} has {len(val.classes)}; "
            f"they must be the same class folders (differing, first ones: {', '.join(only) or 'order'})")
    return train, val


def check_ncls(ncls: int | None, dataset: ImageFolder) -> int:
    """``--ncls`` if it matches the folder's class count, else the folder's count when omitted."""
    found = len(dataset.classes)
    if ncls is not None and ncls != found:
        raise DataError(f"--ncls {ncls} does not match {dataset.root}, which has {found} class folders; "
                        f"pass --ncls {found} or leave it out")
    return found


class ShardSampler(data.Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, no padding: each sample is
    evaluated exactly once across processes."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def default_workers(local_processes: int = 1) -> int:
    """Data-loading processes per training process: the CPUs this process may use shared among
    the training processes of this node, at most :data:`MAX_WORKERS` and at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus // max(1, local_processes)))


def loaders(train: ImageFolder, val: ImageFolder, train_batch_size: int, val_batch_size: int,
            workers: int, seed: int, rank: int = 0, world_size: int = 1,
            pin_memory: bool = False) -> tuple[data.DataLoader, data.DataLoader]:
    """Shuffled training loader (an :class:`EpochSampler`, also for one process: its order and
    augmentation depend only on the seed and the epoch; call ``loader.sampler.set_epoch``) and
    an ordered validation loader sharded across processes. Worker processes persist across
    epochs (not re-forked from the training process each epoch); ``pin_memory`` for CUDA."""
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory,
                              "persistent_workers": workers > 0}
    train_sampler = EpochSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return (data.DataLoader(train, batch_size=train_batch_size, sampler=train_sampler, **common),
            data.DataLoader(val, batch_size=val_batch_size, sampler=ShardSampler(len(val), rank, world_size),
                            **common))
