"""Google Landmarks v2 as training data: the CSV index, a deterministic train/val split, datasets.

Two CSV formats are read (the header tells which):
- ``train.csv``: ``id,url,landmark_id`` (one image per row);
- ``train_clean.csv``: ``landmark_id,images`` (one landmark per row, ``images`` = space-separated ids).
Image ``abcdef…`` lives at ``<image_root>/a/b/c/abcdef….jpg`` (the layout of the GLDv2 download).

Rows that cannot be used are skipped, each with a one-line warning naming ``file:line`` and the
reason (the first few), and counted; landmarks with fewer than ``min_images_per_class`` usable images
are dropped. Labels are the kept landmark ids in increasing numeric order, mapped to 0..K-1.

The split is deterministic and independent of row order: within each landmark the images are
ordered by sha1 of their id and the first ``floor(n * val_fraction)`` go to validation, so every
landmark keeps at least one training image (for ``val_fraction`` < 0.5 and n >= 2).
"""
from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torchvision.transforms as T

from .dataloader import DataError, ImageFolder

log = logging.getLogger("delf")

TRAIN_HEADER = ("id", "url", "landmark_id")
CLEAN_HEADER = ("landmark_id", "images")
IMAGE_ID = re.compile(r"[0-9a-f]{3,}")  # GLDv2 ids: 16 hex digits; 3 at least for the a/b/c folders
WARN_ROWS = 5  # rows named individually; the rest only counted


def image_path(image_root: str | Path, image_id: str) -> Path:
    """``<image_root>/a/b/c/abc….jpg`` for id ``abc…``."""
    return Path(image_root, image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")


@dataclass(frozen=True)
class Gldv2Index:
    """Usable (path, label) samples of a GLDv2 CSV, split into train and val.

    ``classes``: the kept landmark ids (str), label k = classes[k]. ``skipped``: counts of rows or
    images left out, by reason ('malformed', 'missing image', 'small class').
    """

    csv_path: Path
    image_root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    val: tuple[tuple[str, int], ...]
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items() if n) or "none"
        return (f"{self.csv_path}: {len(self.classes)} landmarks, {len(self.train)} train / {len(self.val)} val "
                f"images; skipped: {skipped}")


def read_gldv2(csv_path: str | Path, image_root: str | Path, min_images_per_class: int = 2,
               val_fraction: float = 0.2) -> Gldv2Index:
    """Index a GLDv2 ``train.csv`` or ``train_clean.csv`` whose images are under ``image_root``.

    Raises :class:`~train.dataloader.DataError` (naming the file) when the CSV is missing or has
    another header, or when no landmark is left.
    """
    csv_path, image_root = Path(csv_path), Path(image_root)
    if not 0 <= val_fraction < 0.5:
        raise DataError(f"val_fraction {val_fraction}: give a value in [0, 0.5)")
    if min_images_per_class < 1:
        raise DataError(f"min_images_per_class {min_images_per_class}: give a value >= 1")
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such CSV file")
    if not image_root.is_dir():
        raise DataError(f"{image_root}: no such image folder (the GLDv2 root holding 0/ ... f/)")
    by_landmark, skipped = _read_rows(csv_path, image_root)
    small = {k: v for k, v in by_landmark.items() if len(v) < min_images_per_class}
    skipped["small class"] = sum(len(v) for v in small.values())
    classes = sorted((k for k in by_landmark if k not in small), key=int)
    if not classes:
        raise DataError(f"{csv_path}: no landmark has {min_images_per_class} or more usable images "
                        f"(skipped: {skipped})")
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    for label, landmark in enumerate(classes):
        ids = sorted(set(by_landmark[landmark]), key=lambda i: (hashlib.sha1(i.encode()).hexdigest(), i))
        n_val = math.floor(len(ids) * val_fraction)
        val += [(str(image_path(image_root, i)), label) for i in sorted(ids[:n_val])]
        train += [(str(image_path(image_root, i)), label) for i in sorted(ids[n_val:])]
    index = Gldv2Index(csv_path, image_root, tuple(classes), tuple(train), tuple(val), skipped)
    log.info("%s", index.summary())
    return index


def _read_rows(csv_path: Path, image_root: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    """{landmark id: image ids} of the usable rows, and the counts of skipped rows by reason."""
    skipped = {"malformed": 0, "missing image": 0}
    by_landmark: dict[str, list[str]] = defaultdict(list)

    def skip(reason: str, line: int, detail: str) -> None:
        skipped[reason] += 1
        if skipped["malformed"] + skipped["missing image"] <= WARN_ROWS:
            log.warning("%s:%d: skipped (%s: %s)", csv_path, line, reason, detail)

    with csv_path.open(newline="") as f:
        reader = csv.reader(f)
        header = tuple(h.strip() for h in next(reader, ()))
        if header not in (TRAIN_HEADER, CLEAN_HEADER):
            raise DataError(f"{csv_path}: header {','.join(header)!r} is neither "
                            f"{','.join(TRAIN_HEADER)!r} (train.csv) nor {','.join(CLEAN_HEADER)!r} (train_clean.csv)")
        clean = header == CLEAN_HEADER
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                skip("malformed", line, f"{len(row)} fields, expected {len(header)}")
                continue
            landmark = (row[0] if clean else row[2]).strip()
            ids = row[1].split() if clean else [row[0].strip()]
            if not landmark.isdigit():
                skip("malformed", line, f"landmark_id {landmark!r} is not a non-negative integer")
                continue
            bad = next((i for i in ids if not IMAGE_ID.fullmatch(i)), None)
            if bad is not None or not ids:
                skip("malformed", line, f"image id {bad!r} is not a GLDv2 id (hex digits)")
                continue
            for image_id in ids:
                path = image_path(image_root, image_id)
                if os.path.isfile(path):
                    by_landmark[str(int(landmark))].append(image_id)
                else:
                    skip("missing image", line, f"{path} does not exist")
    reported = skipped["malformed"] + skipped["missing image"]
    if reported > WARN_ROWS:
        log.warning("%s: %d more skipped rows/images not shown", csv_path, reported - WARN_ROWS)
    return by_landmark, skipped


class Gldv2Images(ImageFolder):
    """One split of a :class:`Gldv2Index` as the trainer's ImageFolder (same loader, same
    skipping of corrupt files): ``classes`` are the landmark ids, ``root`` the image root."""

    def __init__(self, index: Gldv2Index, split: str, transform: T.Compose) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split is 'train' or 'val', got {split!r}")
        self.index, self.split = index, split
        super().__init__(index.image_root, transform)
        if not self.samples:
            raise DataError(f"{index.csv_path}: the {split} split is empty ({index.summary()})")

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = list(self.index.classes)
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory: str | Path, class_to_idx: dict[str, int], extensions: object = None,
                     is_valid_file: object = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        return list(getattr(self.index, self.split))
