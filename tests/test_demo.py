"""The demo's data, a smoke run of the demo's full code path, and the notebook executed headless."""
from __future__ import annotations

import dataclasses
import re
import uuid
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from extract import demo
from extract.extraction.feature_file import read_features
from extract.make_demo import run as demo_run
from extract.make_demo.landmarks import LANDMARKS, build_dataset, landmark_photo, random_view
from train.runtime import PROJECT_ROOT, repo_dir


def test_dataset_layout_and_determinism(tmp_path: Path) -> None:
    a = build_dataset(tmp_path / "a", classes=2, train_per_class=3, val_per_class=1, query_per_class=2,
                      size=48, query_size=64)
    b = build_dataset(tmp_path / "b", classes=2, train_per_class=3, val_per_class=1, query_per_class=2,
                      size=48, query_size=64)
    assert a.classes == ("astronaut", "coffee")
    for split, count, side in (("train", 3, 48), ("val", 1, 48), ("query", 2, 64)):
        files = sorted((a.root / split).rglob("*.jpg"))
        assert len(files) == 2 * count
        assert all(Image.open(f).size == (side, side) for f in files)
    pa, pb = a.query / "coffee" / "001.jpg", b.query / "coffee" / "001.jpg"
    assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))


def test_query_views_get_their_own_jitter(tmp_path: Path) -> None:
    # query_strength 0: both query views are the same plain resize; training views stay jittered
    data = build_dataset(tmp_path, classes=1, train_per_class=2, val_per_class=1, query_per_class=2,
                         size=48, query_size=64, query_strength=0.0)
    q0, q1 = (np.asarray(Image.open(data.query / "astronaut" / f"{i:03d}.jpg"), int) for i in (0, 1))
    t0, t1 = (np.asarray(Image.open(data.train / "astronaut" / f"{i:03d}.jpg"), int) for i in (0, 1))
    assert np.abs(q0 - q1).mean() < 1 and np.abs(t0 - t1).mean() > 10


def test_views_differ_but_strength_zero_is_the_photo() -> None:
    photo = landmark_photo("chelsea", 96)
    rng = np.random.default_rng(0)
    v1, v2 = random_view(photo, 64, rng), random_view(photo, 64, rng)
    assert v1.shape == (64, 64, 3) and np.abs(v1.astype(int) - v2).mean() > 10
    flat = random_view(photo, 64, np.random.default_rng(1), strength=0.0)
    side = min(photo.shape[:2])
    x0 = (photo.shape[1] - side) // 2
    ref = np.asarray(Image.fromarray(photo[:, x0:x0 + side]).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(flat.astype(int) - ref).mean() < 12


def test_every_landmark_loads_offline() -> None:
    # "motorcycle" is the left view of skimage's stereo pair, the others are skimage.data functions
    shapes = {name: landmark_photo(name, 96).shape for name in LANDMARKS}
    assert shapes["motorcycle"] == (65, 96, 3)
    assert all(max(s[:2]) == 96 and s[2] == 3 for s in shapes.values())


def test_demo_verification_rejects_squeezed_fits() -> None:
    # One keypoint layout and its descriptors seen three ways: shifted and rotated (a real view
    # change), squeezed 3x along x (a fit no pair of demo views needs), and unrelated.
    rng = np.random.default_rng(0)
    kp = rng.uniform(0, 320, (200, 2))
    desc = rng.normal(size=(200, 40)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    c, s = np.cos(0.1), np.sin(0.1)
    moved = (kp - 160) @ np.array([[c, -s], [s, c]]).T + 170 + rng.normal(0, 1.0, kp.shape)
    feats = {"a/000.jpg": {"keypoints": kp, "descriptors": desc},
             "a/001.jpg": {"keypoints": moved, "descriptors": desc},
             "b/000.jpg": {"keypoints": kp * [1 / 3, 1], "descriptors": desc},
             "c/000.jpg": {"keypoints": rng.uniform(0, 320, (200, 2)), "descriptors": desc[::-1].copy()}}
    conf = demo_run.match_config(demo_run.PRESETS["full"])
    assert conf.residual == pytest.approx(20 * 320 / 1024)
    separation, _ = demo_run.all_pairs(feats, conf)
    counts = {(a[0], b[0]): n for a, b, n in separation.same + separation.different}
    assert counts[("a", "a")] > 190 and counts[("a", "b")] == 0 and counts[("a", "c")] < 10
    assert separation.separated
    squeezed, _ = demo_run.all_pairs(feats, dataclasses.replace(conf, max_scale_change=8.0))
    assert not squeezed.separated  # the default bound (8) counts the squeeze


@pytest.fixture(scope="module")
def smoke_demo() -> tuple[str, demo_run.Separation]:
    """The smoke preset at seed 0 (outputs in the session's temporary DELF_REPO_DIR)."""
    expr = f"test-demo-{uuid.uuid4().hex[:8]}"
    return expr, demo_run.run_demo(expr, "smoke", seed=0)


@pytest.mark.slow
def test_demo_smoke_runs_every_step(smoke_demo: tuple[str, demo_run.Separation]) -> None:
    expr, separation = smoke_demo
    root = repo_dir() / expr
    # 3 landmarks x 2 query images: 3 same-landmark pairs, 12 different-landmark pairs, and the
    # demo's claim at this preset and seed: every same pair has more inliers than any different pair
    assert len(separation.same) == 3 and len(separation.different) == 12
    assert all(a.split("/")[0] == b.split("/")[0] for a, b, _ in separation.same)
    assert separation.separated
    for path in ("finetune/ckpt/bestshot.pth.tar", "keypoint/ckpt/bestshot.pth.tar",
                 "keypoint/ckpt/fix.pth.tar", "pca/pca.h5", "features/query.h5",
                 "match.png", "match_different.png", "attention.png"):
        assert (root / path).is_file(), path
    f = read_features(root / "features" / "query.h5", "astronaut/000.jpg")
    assert f["descriptors"].shape[1] == 40
    assert Image.open(root / "match.png").size[0] > 200


@pytest.mark.slow
def test_default_preset_separates_with_a_margin(capsys: pytest.CaptureFixture) -> None:
    # The claim docs/matching.md makes for `make demo`: on the default preset every same-landmark
    # pair has more inliers than every different-landmark pair, and by a wide margin (at least
    # twice as many), so that another CPU's rounding does not flip it.
    expr = f"test-demo-full-{uuid.uuid4().hex[:8]}"
    assert demo.main(["--expr", expr]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    m = re.fullmatch(r"separated \(smallest same (\d+) > largest different (\d+)\): yes", last)
    assert m, last
    same, different = map(int, m.groups())
    assert same > 2 * different, last
    assert len(list((repo_dir() / expr / "data" / "query").glob("*/*.jpg"))) == 12


def test_separation_summary_and_claim() -> None:
    sep = demo_run.Separation(same=(("a/0", "a/1", 30), ("b/0", "b/1", 12)),
                          different=(("a/0", "b/0", 3), ("a/1", "b/1", 11), ("a/0", "b/1", 0), ("a/1", "b/0", 0)))
    assert sep.separated
    text = sep.summary()
    assert "2 pairs, inliers median 21, min 12, max 30 (worst: b/0 <-> b/1, 12)" in text
    assert "4 pairs, inliers median 1, min 0, max 11 (worst: a/1 <-> b/1, 11)" in text
    assert not demo_run.Separation(sep.same, sep.different + (("a/0", "b/0", 12),)).separated


@pytest.mark.slow
def test_demo_rerun_reuses_outputs(smoke_demo: tuple[str, demo_run.Separation], capsys: pytest.CaptureFixture) -> None:
    expr, _ = smoke_demo
    fix = repo_dir() / expr / "keypoint" / "ckpt" / "fix.pth.tar"
    before = fix.stat().st_mtime_ns
    demo.main(["--expr", expr, "--preset", "smoke"])
    out = capsys.readouterr().out
    assert "train/main.py" not in out and "--mode pca" not in out
    assert re.fullmatch(r"separated \(smallest same \d+ > largest different \d+\): (yes|no)", out.splitlines()[-1])
    assert fix.stat().st_mtime_ns == before


@pytest.mark.slow
def test_notebook_runs_headless(smoke_demo: tuple[str, demo_run.Separation]) -> None:
    expr, _ = smoke_demo
    nb = nbformat.read(PROJECT_ROOT / "visualize.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert 'EXPR = "demo"' in params.source
    params.source = params.source.replace('EXPR = "demo"', f"EXPR = {expr!r}")
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(PROJECT_ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 5  # images, attention x2, keypoints, matches
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "inliers: " in text and "features, descriptors 40-d" in text
