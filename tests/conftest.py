"""Shared fixtures: small ImageFolders, and experiment names whose outputs are removed after."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.utils import make_image_folder
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
