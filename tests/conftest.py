"""Shared fixtures: outputs in a temporary DELF_REPO_DIR, small ImageFolders, fresh experiment names."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.utils import make_gldv2, make_image_folder, make_uniform_image_folder, save_keypoint_checkpoint
from train.delf import Delf
from train.runtime import PROJECT_ROOT, REPO_DIR_ENV, limit_threads

_REPO_BEFORE = pytest.StashKey[dict]()


@pytest.fixture(scope="session", autouse=True)
def temporary_repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every output of the session (and of the scripts it starts) goes to a temporary
    DELF_REPO_DIR: the project's own repo/ is never written by the tests."""
    root = tmp_path_factory.mktemp("repo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(REPO_DIR_ENV, str(root))
        yield root


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests not marked ``cuda`` run on the CPU on every machine, as they expect (bit-exact
    resumes, bf16 autocast, several processes on one machine): device "auto" sees no CUDA, in
    this process and in the scripts they start (CUDA_VISIBLE_DEVICES empty; this process's CUDA
    runtime started at collection, with the machine's GPUs, so ``cuda`` tests keep them)."""
    if request.node.get_closest_marker("cuda") is not None:
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def image_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, val) ImageFolders: 3 classes, 4 + 2 JPEGs of 80 px per class."""
    root = tmp_path_factory.mktemp("images")
    return (make_image_folder(root / "train", classes=3, per_class=4, size=80, seed=0),
            make_image_folder(root / "val", classes=3, per_class=2, size=80, seed=1))


@pytest.fixture(scope="session")
def uniform_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, val) ImageFolders of one symmetric 64 px photo (see :func:`make_uniform_image_folder`):
    3 classes of 6, 4, 2 training and 3, 2, 1 validation images."""
    root = tmp_path_factory.mktemp("uniform")
    return (make_uniform_image_folder(root / "train", (6, 4, 2)),
            make_uniform_image_folder(root / "val", (3, 2, 1)))


@pytest.fixture(scope="session")
def gld(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Google Landmarks v2 tree (see :func:`make_gldv2`): 3 landmarks (10, 20, 30) x 5 JPEGs
    of 72 px, train.csv and train_clean.csv."""
    return make_gldv2(tmp_path_factory.mktemp("gldv2"), classes=3, per_class=5, size=72)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init resnet18 keypoint-stage checkpoint (3 classes), this project's format."""
    return save_keypoint_checkpoint(tmp_path_factory.mktemp("ckpt") / "fix.pth.tar")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 2 classes x 2 JPEGs of 96 px (folder name ``imgs``)."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs", classes=2, per_class=2, size=96)


@pytest.fixture
def expr(request: pytest.FixtureRequest) -> str:
    """A fresh experiment name (outputs under the session's temporary DELF_REPO_DIR)."""
    return f"pytest-{request.node.originalname}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch and BLAS on one thread: on shared cores a 2-thread pool can be many times slower."""
    with limit_threads(1):
        yield


@pytest.fixture(scope="module")
def model() -> Delf:
    """A random-init resnet18 inference model (3 classes)."""
    torch.manual_seed(0)
    return Delf(3, arch="resnet18", stage="inference").eval()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} \
        if root.is_dir() else {}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_REPO_BEFORE] = _snapshot(PROJECT_ROOT / "repo")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any test wrote into the project's own repo/ (tests use DELF_REPO_DIR)."""
    before = session.config.stash.get(_REPO_BEFORE, None)
    if before is None:
        return
    after = _snapshot(PROJECT_ROOT / "repo")
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        print(f"\nerror: the tests changed the project's repo/: {', '.join(changed[:10])}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
