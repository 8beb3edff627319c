"""Shared fixtures: small ImageFolders, and experiment names whose outputs are removed after."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.utils import make_image_folder
from train.delf import Delf
from train.runtime import REPO_DIR


@pytest.fixture(scope="session")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, val) ImageFolders: 3 classes, 4 + 2 JPEGs of 80 px per class."""
    root = tmp_path_factory.mktemp("images")
    return (make_image_folder(root / "train", classes=3, per_class=4, size=80, seed=0),
            make_image_folder(root / "val", classes=3, per_class=2, size=80, seed=1))


@pytest.fixture
def expr(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh experiment name; its outputs under repo/ are deleted after the test."""
    name = f"pytest-{request.node.originalname}-{uuid.uuid4().hex[:8]}"
    yield name
    shutil.rmtree(REPO_DIR / name, ignore_errors=True)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread: on shared cores a 2-thread pool can be many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> Delf:
    """A random-init resnet18 inference model (3 classes)."""
    torch.manual_seed(0)
    return Delf(3, arch="resnet18", stage="inference").eval()
