"""Retrieval (index, votes, re-ranking) and the evaluation command: --ranks scoring, errors, and
DeLF end to end on a tiny Revisited-Oxford-layout dataset made from real photos."""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

import cv2
import faiss
import numpy as np
import pytest
import torch
from PIL import Image

import extract.evaluate as evaluate_module
import extract.evaluation.figures as figures_module
import extract.extraction.extract_features as extract_features_module
import extract.retrieval.asmk.codebook as codebook_module
import extract.retrieval.asmk.stored_index as stored_index_module
import train.outputs as outputs_module
from extract.config import AsmkConfig, EvalConfig, ExtractionConfig, MatchConfig
from extract.errors import InputMismatch
from extract.evaluate import build_parser, main
from extract.evaluation.asmk_database import asmk_config
from extract.evaluation.evaluate_dataset import Evaluation, evaluate_dataset
from extract.evaluation.feature_cache import FeatureStore, cache_features, read_all, set_name
from extract.evaluation.figures import write_figures
from extract.evaluation.metrics import PROTOCOLS, evaluate
from extract.evaluation.revisitop import Dataset, EvalError, load_dataset
from extract.extraction.delf_extractor import DelfExtractor
from extract.extraction.extract_features import LazyExtractor, feature_attrs, load_extractor
from extract.extraction.feature_file import FeatureWriter, feature_names, file_attrs, iter_features
from extract.extraction.images import list_images
from extract.extraction.pca import fit_pca, save_pca
from extract.extraction.workshare import WorkShare
from extract.retrieval.asmk.codebook import load_codebook
from extract.retrieval.asmk.memory_index import AsmkIndex
from extract.retrieval.asmk.stored_index import AsmkIndexError, IndexBuild, StoredIndex
from extract.retrieval.rerank import Verifier, rerank
from extract.retrieval.vote import Database, DescriptorIndex, rank, vote_scores
from tests.utils import held_bytes, photo, save_delg_checkpoint, save_keypoint_checkpoint, script_env, unit
from train.cli import config_from_args
from train.delf import Delf
from train.outputs import OutputLock, file_sha256
from train.runtime import limit_threads, repo_dir

ROOT = Path(__file__).resolve().parents[1]
LANDMARKS = ("astronaut", "coffee", "chelsea")
DISTRACTORS = ("rocket", "camera", "brick", "coins", "immunohistochemistry", "colorwheel")
SCALES = ["0.7071", "1.0"]


# --- index and ranking -------------------------------------------------------------------------
def brute_force(db: list[np.ndarray], q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate(db)
    owner = np.repeat(np.arange(len(db)), [len(d) for d in db])
    sims = q @ x.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, top, 1), owner[top]


def test_index_memory() -> None:
    """nbytes is what the index holds: n float32 descriptors, their images (int64), the image
    offsets, and the faiss structure: nothing for exact search (it searches the descriptors in
    place), the inverted lists (a copy of each descriptor and its int64 id) and the centroids
    for IVF."""
    rng = np.random.default_rng(3)
    db = [unit(rng.normal(size=(n, 16))) for n in (30, 0, 5)]
    exact = DescriptorIndex(db)
    assert np.shares_memory(exact.knn.x, exact.x)
    assert exact.nbytes == 35 * 16 * 4 + 35 * 8 + 4 * 8 == held_bytes(exact)
    ivf = DescriptorIndex([unit(rng.normal(size=(400, 16))) for _ in range(5)], nlist=16)
    assert ivf.nlist == 16
    held = held_bytes(ivf)
    assert held == 2000 * 16 * 4 + 2000 * 8 + 6 * 8
    # plus the faiss index, as faiss serialises it less a header and each cell's list length
    assert 0 <= len(faiss.serialize_index(ivf.knn.index)) - (ivf.nbytes - held) <= 256 + 8 * 16


def test_exact_search_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    db = [unit(rng.normal(size=(n, 16))) for n in (30, 0, 5, 50, 1, 40)]
    q = unit(rng.normal(size=(25, 16)))
    index = DescriptorIndex(db)
    assert index.nlist == 1 and index.num_images == 6
    sims, images = index.search(q, 5)
    ref_sims, ref_images = brute_force(db, q, 5)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    np.testing.assert_array_equal(images, ref_images)
    for i, d in enumerate(db):
        np.testing.assert_array_equal(index.image_descriptors(i), d.reshape(-1, 16))
    sims, images = index.search(q[:2], 200)  # more neighbours than descriptors: padded
    assert (images[:, 126:] == -1).all() and (images[:, :126] >= 0).all()
    assert index.search(np.zeros((0, 16)), 5)[1].shape == (0, 5)
    with pytest.raises(InputMismatch, match="16-d"):
        index.search(q[:, :8], 5)
    with pytest.raises(InputMismatch, match="different dimensions"):
        DescriptorIndex([db[0], db[2][:, :8]])


def test_ivf_search() -> None:
    """Clustered descriptors: IVF keeps images' descriptors, finds the true nearest neighbour
    for nearly every query descriptor, and is exact when every cell is probed."""
    rng = np.random.default_rng(1)
    centres = unit(rng.normal(size=(40, 32)))
    db = [unit(centres[rng.integers(0, 40, 300)] + 0.3 * rng.normal(size=(300, 32)))
          for _ in range(100)]
    q = unit(np.concatenate(db[:3])[::10] + 0.05 * rng.normal(size=(90, 32)))
    index = DescriptorIndex(db, nlist=64)
    assert index.nlist == 64 and index.knn.kind == "ivf"
    np.testing.assert_array_equal(index.image_descriptors(7), db[7])
    ref_sims, ref_images = brute_force(db, q, 3)
    sims, images = index.search(q, 3, nprobe=8)
    assert np.mean(np.isclose(sims[:, 0], ref_sims[:, 0], atol=1e-5)) > 0.9
    sims, images = index.search(q, 3, nprobe=index.nlist)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


def test_vote_scores_and_rank() -> None:
    sims = np.array([[0.9, 0.8, 0.7], [0.5, -0.2, 0.4]], np.float32)
    images = np.array([[1, 1, 2], [2, 0, -1]])
    # descriptor 0 votes 0.9 for image 1 (once) and 0.7 for image 2; descriptor 1 votes 0.5 for
    # image 2 and nothing (negative similarity) for image 0
    np.testing.assert_allclose(vote_scores(sims, images, 4), [0.0, 0.9, 1.2, 0.0], atol=1e-6)
    np.testing.assert_array_equal(rank(np.array([1.0, 2.0, 2.0, 0.0, 2.0])), [1, 2, 4, 0, 3])


def test_rerank_order_junk_and_top() -> None:
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    order = rank(scores)
    inliers = {0: 4, 1: 30, 2: 0, 3: 30, 4: 99, 5: 99}
    asked: list[int] = []

    def count(i: int) -> int:
        asked.append(i)
        return inliers[i]

    # top 4 non-junk images of [0, 1, 2, 3, 4, 5] without junk 1: 0, 2, 3, 4
    final = rerank(order, scores, count, top=4, junk=[1])
    assert asked == [0, 2, 3, 4]
    # by inliers (4: 99, 3: 30, 0: 4), then the rest by initial score; 5 was not verified
    np.testing.assert_array_equal(final, [4, 3, 0, 1, 2, 5])
    np.testing.assert_array_equal(rerank(order, scores, count, top=0), order)


def test_verifier_needs_four_matches_and_caches() -> None:
    rng = np.random.default_rng(2)
    kp = rng.uniform(0, 200, (50, 2)).astype(np.float32)
    d = unit(rng.normal(size=(50, 40)))
    db = {0: {"keypoints": kp, "descriptors": d},                     # same features: verified
          1: {"keypoints": kp[:3], "descriptors": d[:3]},             # 3 matches: 0 by rule
          2: {"keypoints": kp, "descriptors": unit(rng.normal(size=(50, 40)))}}
    calls: list[int] = []

    def fetch(i: int) -> dict:
        calls.append(i)
        return db[i]

    v = Verifier({"keypoints": kp + 10, "descriptors": d}, fetch)
    assert v(0) == 50 and v(1) == 0 and v(2) == 0
    assert v(0) == 50 and calls == [0, 1, 2]
    index = DescriptorIndex([db[i]["descriptors"] for i in range(3)])
    database = Database([db[i]["keypoints"] for i in range(3)], index)
    np.testing.assert_array_equal(database.features(1)["descriptors"], d[:3])
    scores = database.initial_scores([d, d[:0]], k=2, nprobe=1)
    assert scores.shape == (2, 3) and rank(scores[0])[0] == 0 and not scores[1].any()


# --- the command: --ranks and errors -----------------------------------------------------------
def write_gnd(root: Path, imlist: list[str], qimlist: list[str], gnd: list[dict],
              dataset: str = "roxford5k") -> Path:
    folder = root / dataset
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    with open(folder / f"gnd_{dataset}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return root


def small_gnd(tmp_path: Path) -> Path:
    gnd = [{"bbx": [0, 0, 10, 10], "easy": np.array([0, 3]), "hard": np.array([5]),
            "junk": np.array([1])},
           {"bbx": [0, 0, 10, 10], "easy": np.array([], np.int64), "hard": np.array([2]),
            "junk": np.array([4])}]
    return write_gnd(tmp_path, [f"db{i}" for i in range(6)], ["q0", "q1"], gnd)


def test_ranks_mode_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = small_gnd(tmp_path)
    ranks = np.stack([np.array([1, 0, 2, 3, 4, 5]), np.array([5, 4, 3, 2, 1, 0])], axis=1)
    np.save(tmp_path / "ranks.npy", ranks)
    out = tmp_path / "out" / "res.json"
    assert main(["--dataset", "roxford5k", "--data_root", str(root), "--ranks",
                 str(tmp_path / "ranks.npy"), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"easy", "medium", "hard", "config"}
    assert res["config"] == {"dataset": "roxford5k", "data_root": str(root), "ranks": str(tmp_path / "ranks.npy")}
    assert all(set(res[p]) == {"mAP", "mP@1", "mP@5", "mP@10"} for p in PROTOCOLS)
    with open(root / "roxford5k" / "gnd_roxford5k.pkl", "rb") as f:
        expected = evaluate(ranks, pickle.load(f)["gnd"])
    for protocol, row in expected.items():
        for key, value in row.items():
            assert res[protocol][key] == pytest.approx(value, abs=1e-4)
    # query 0, easy: junk 1 and hard 5 dropped -> positives 0, 3 at ranks 0, 2
    assert res["easy"]["mAP"] == pytest.approx(100 * (1 + (1 / 2 + 2 / 3) / 2) / 2, abs=1e-4)
    assert "medium" in capsys.readouterr().out


@pytest.mark.parametrize("case,message", [
    ("no_pkl", "gnd_roxford5k.pkl: no such file"),
    ("bad_shape", "shape (2, 6), expected"),
    ("no_npy", "cannot read a .npy ranking"),
    ("no_images", "8 of 8 images missing under"),
    ("no_codebook", "--method asmk needs --codebook_images DIR"),
    ("bad_pkl", "not a revisitop ground-truth file"),
])
def test_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture, case: str,
                          message: str) -> None:
    root = small_gnd(tmp_path)
    args = ["--dataset", "roxford5k", "--data_root", str(root)]
    if case == "no_pkl":
        args[-1] = str(tmp_path / "elsewhere")
    if case == "bad_shape":
        np.save(tmp_path / "r.npy", np.zeros((2, 6), np.int64))
        args += ["--ranks", str(tmp_path / "r.npy")]
    if case == "no_npy":
        args += ["--ranks", str(tmp_path / "missing.npy")]
    if case == "bad_pkl":
        (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(b"not a pickle")
    if case == "no_images":
        args += ["--method", "vote"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    if case == "no_images":
        assert "roxford5k/jpg/db0.jpg" in err


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError that is no user error (here numpy's, from a bug placed in the scoring) is not
    printed as one: it propagates with its traceback."""
    root = small_gnd(tmp_path)
    np.save(tmp_path / "ranks.npy", np.stack([np.arange(6)] * 2, axis=1))
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a: np.arange(3).reshape(2, 2))
    with pytest.raises(ValueError, match="cannot reshape array of size 3"):
        main(["--dataset", "roxford5k", "--data_root", str(root), "--ranks", str(tmp_path / "ranks.npy")])


@pytest.mark.slow
def test_script_error_without_traceback(tmp_path: Path) -> None:
    """Run as a script from extract/ (the bootstrap line), an error is one line, no traceback."""
    proc = subprocess.run([sys.executable, "evaluate.py", "--dataset", "rparis6k",
                           "--data_root", str(tmp_path), "--ranks", "r.npy"],
                          cwd=ROOT / "extract", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "rparis6k/gnd_rparis6k.pkl: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--codebook_images", "--distractors"])
def test_a_missing_image_set_is_refused_before_any_extraction(tmp_path: Path, flag: str, expr: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    root = small_gnd(tmp_path)
    argv = ["--dataset", "roxford5k", "--data_root", str(root), "--load_expr", expr, "--codebook_images",
            str(tmp_path), flag, str(tmp_path / "none")]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"error: {flag} {tmp_path / 'none'}: no such folder or image list\n"
    assert not (repo_dir() / expr).exists()


# --- end to end --------------------------------------------------------------------------------
def view(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A random perspective view of ``img`` (corners moved by up to ``strength`` of the size)
    with a brightness change."""
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = (src + rng.uniform(-strength, strength, (4, 2)) * [w, h]).astype(np.float32)
    out = cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h),
                              borderMode=cv2.BORDER_REFLECT)
    return np.clip(out * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)


def make_dataset(root: Path, size: int = 160, seed: int = 0) -> Path:
    """Revisited-Oxford layout from real photos. Per landmark: a query (the photo, cropped by
    its bbx), two easy views (mild warps), a hard view (strong warp) and a junk image (another
    photo with a small copy of the landmark in a corner); plus two views of each distractor."""
    rng = np.random.default_rng(seed)
    jpg = root / "roxford5k" / "jpg"
    jpg.mkdir(parents=True)
    imlist: list[str] = []

    def add(name: str, arr: np.ndarray) -> int:
        Image.fromarray(arr).save(jpg / f"{name}.jpg", quality=92)
        imlist.append(name)
        return len(imlist) - 1

    gnd = []
    for k, name in enumerate(LANDMARKS):
        img = photo(name, size)
        easy = [add(f"{name}_easy{i}", view(img, rng, 0.05)) for i in range(2)]
        hard = [add(f"{name}_hard", view(img, rng, 0.15))]
        junk_img = photo(DISTRACTORS[k], size).copy()
        h, w = junk_img.shape[:2]
        junk_img[:h // 3, :w // 3] = cv2.resize(img, (w // 3, h // 3))
        junk = [add(f"{name}_junk", junk_img)]
        Image.fromarray(img).save(jpg / f"q_{name}.jpg", quality=92)
        m = size // 10
        gnd.append({"bbx": [m, m, img.shape[1] - m, img.shape[0] - m], "easy": np.array(easy),
                    "hard": np.array(hard), "junk": np.array(junk)})
    for name in DISTRACTORS:
        img = photo(name, size)
        add(f"{name}_0", img)
        add(f"{name}_1", view(img, rng, 0.08))
    return write_gnd(root, imlist, [f"q_{n}" for n in LANDMARKS], gnd)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The dataset, a random-init resnet18 keypoint checkpoint, and a PCA (whitening) fitted on
    its database descriptors, as the extractor's --mode pca would."""
    tmp = tmp_path_factory.mktemp("revisited")
    root = make_dataset(tmp / "data")
    ckpt = save_keypoint_checkpoint(tmp / "ckpt.pth.tar")
    ex = DelfExtractor.from_checkpoint(
        ckpt, conf=ExtractionConfig(use_pca=False, scale_list=tuple(float(s) for s in SCALES), attn_thres=0.0))
    with limit_threads(1):
        desc = np.concatenate([ex(Image.open(p).convert("RGB"))["descriptors"]
                               for p in sorted((root / "roxford5k" / "jpg").glob("*_*.jpg"))])
    pca = tmp / "pca.h5"
    save_pca(pca, fit_pca(desc), {"checkpoint_sha256": file_sha256(ckpt)})
    return {"root": root, "ckpt": ckpt, "pca": pca, "tmp": tmp}


@pytest.mark.slow
def test_end_to_end(tiny: dict[str, Path], one_thread: None, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture) -> None:
    feats, out = tiny["tmp"] / "features", tiny["tmp"] / "res.json"
    args = ["--dataset", "roxford5k", "--data_root", str(tiny["root"]), "--load_from",
            str(tiny["ckpt"]), "--pca_parameters_path", str(tiny["pca"]), "--attn_thres", "0",
            "--scale_list", *SCALES, "--device", "cpu", "--features_dir", str(feats), "--method", "vote"]
    drawn: dict[str, np.ndarray] = {}

    def spy(ds: Dataset, rankings: dict[str, np.ndarray], *a: object) -> list[Path]:
        drawn.update(rankings)
        return write_figures(ds, rankings, *a)

    monkeypatch.setattr(figures_module, "write_figures", spy)
    figures = tiny["tmp"] / "figures"
    assert main(args + ["--output", str(out), "--figures", str(figures)]) == 0
    reranked = json.loads(out.read_text())
    assert set(reranked) == {"easy", "medium", "hard", "initial", "config"}
    # figures of the initial ranking and of the re-ranked one (Medium protocol's), one per query
    assert sorted(p.name for p in figures.iterdir()) == ["000_q_astronaut.png", "001_q_coffee.png",
                                                         "002_q_chelsea.png", "ap_medium.png"]
    assert list(drawn) == ["k-NN votes", "k-NN votes+SP"]
    gnd = load_dataset(tiny["root"], "roxford5k").gnd
    assert evaluate(drawn["k-NN votes"], gnd)["medium"]["mAP"] == pytest.approx(
        reranked["initial"]["medium"]["mAP"], abs=1e-4)
    assert evaluate(drawn["k-NN votes+SP"], gnd)["medium"]["mAP"] == pytest.approx(
        reranked["medium"]["mAP"], abs=1e-4)
    # the settings that made the scores, as resolved
    assert {k: reranked["config"][k] for k in ("dataset", "checkpoint", "pca", "features_dir")} == {
        "dataset": "roxford5k", "checkpoint": str(tiny["ckpt"]), "pca": str(tiny["pca"]), "features_dir": str(feats)}
    assert reranked["config"]["evaluation"] == asdict(EvalConfig(method="vote"))
    assert reranked["config"]["matching"] == asdict(MatchConfig())
    assert reranked["config"]["extraction"] == json.loads(json.dumps(asdict(ExtractionConfig(
        attn_thres=0.0, scale_list=tuple(map(float, SCALES))))))
    assert all(0 <= v <= 100 for table in (reranked, reranked["initial"]) for p in PROTOCOLS
               for v in table[p].values())
    printed = capsys.readouterr().out
    assert "k-NN votes (initial ranking)" in printed and "k-NN votes+SP" in printed

    # features: every database image and every cropped query, in the crop's frame
    with open(tiny["root"] / "roxford5k" / "gnd_roxford5k.pkl", "rb") as f:
        cfg = pickle.load(f)
    db = dict(iter_features(feats / "db.h5"))
    queries = dict(iter_features(feats / "query.h5"))
    assert sorted(db) == sorted(cfg["imlist"]) and sorted(queries) == sorted(cfg["qimlist"])
    for name, g in zip(cfg["qimlist"], cfg["gnd"], strict=True):
        x1, y1, x2, y2 = g["bbx"]
        np.testing.assert_array_equal(queries[name]["image_size"], [x2 - x1, y2 - y1])
        assert len(queries[name]["keypoints"]) > 20
        assert (queries[name]["keypoints"] < [x2 - x1, y2 - y1]).all()

    # RANSAC separates the landmark's views from unrelated photos
    names = cfg["imlist"]
    database = Database([db[n]["keypoints"] for n in names],
                        DescriptorIndex([db[n]["descriptors"] for n in names]))
    for name, g in zip(cfg["qimlist"], cfg["gnd"], strict=True):
        inliers = Verifier(queries[name], database.features)
        distractors = [i for i, n in enumerate(names) if n.endswith(("_0", "_1"))]
        assert min(inliers(i) for i in g["easy"]) > max(inliers(i) for i in distractors)

    # cached: a second run extracts nothing; without re-ranking, Medium mAP is not higher
    def no_extraction(*_: object) -> None:
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(DelfExtractor, "__call__", no_extraction)
    assert main(args + ["--rerank", "0", "--output", str(out)]) == 0
    initial = json.loads(out.read_text())
    assert reranked["medium"]["mAP"] >= initial["medium"]["mAP"]
    # the same evaluation from Python, without argparse: the CLI's cache is accepted as is
    result = evaluate_dataset(load_dataset(tiny["root"], "roxford5k"), tiny["ckpt"], feats, pca_path=tiny["pca"],
                              extraction=ExtractionConfig(attn_thres=0.0, scale_list=tuple(map(float, SCALES))),
                              conf=EvalConfig(method="vote", rerank=100))
    assert result.final["medium"]["mAP"] == pytest.approx(reranked["medium"]["mAP"], abs=1e-4)
    assert result.initial["medium"]["mAP"] == pytest.approx(initial["medium"]["mAP"], abs=1e-4)
    assert initial["initial"] == {p: initial[p] for p in PROTOCOLS}    # nothing re-ranked
    assert reranked["medium"]["mAP"] > 80.0
    # other extraction parameters: the cache is refused, with the way out
    assert main(args + ["--pca_dims", "16"]) == 1
    err = capsys.readouterr().err
    assert "pca_dims: 40 in the file, 16 now" in err and "--overwrite extracts again" in err


def image_set(root: Path, names: tuple[str, ...], views: int, seed: int, size: int = 160) -> Path:
    """A folder of ``views`` random views of each named photo."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for name in names:
        img = photo(name, size)
        for v in range(views):
            Image.fromarray(view(img, rng, 0.1)).save(root / f"{name}_{v}.jpg", quality=92)
    return root


def test_asmk_flags_round_trip(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    base = ["--dataset", "roxford5k", "--data_root", "R"]
    default = asmk_config(config_from_args(EvalConfig, parser.parse_args(base)))
    assert default == AsmkConfig() and default.hamming_norm == "asmk"
    args = parser.parse_args(base + ["--assignment", "hnsw", "--hnsw_ef_search", "128", "--codebook_size", "1024",
                                     "--hamming_norm", "dim"])
    conf = config_from_args(EvalConfig, args)
    assert asmk_config(conf) == AsmkConfig(codebook_size=1024, assignment="hnsw", hnsw_ef_search=128,
                                           hamming_norm="dim")
    assert asmk_config(conf, 32) == AsmkConfig(codebook_size=32, assignment="hnsw", hnsw_ef_search=128,
                                               hamming_norm="dim")
    for flag, value in (("--assignment", "fast"), ("--hamming_norm", "bits")):
        with pytest.raises(SystemExit):
            parser.parse_args(base + [flag, value])
        assert f"{flag}: invalid choice: '{value}'" in capsys.readouterr().err


@pytest.mark.slow
def test_asmk_end_to_end(tiny: dict[str, Path], one_thread: None, expr: str, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture) -> None:
    """ASMK* with a 32-word codebook trained on other photos (as ROxf's on RParis): scores and
    tables, the stored codebook (reused, the same again from the same seed), copies of a query
    ranked first, distractors added to the database."""
    tmp = tiny["tmp"] / expr
    codebook_images = image_set(tmp / "codebook" / "jpg", ("hubble_deep_field", "rocket", "camera", "coins"), 3, 1)
    feats, out = tmp / "features" / "roxford5k", tmp / "res.json"
    args = ["--dataset", "roxford5k", "--data_root", str(tiny["root"]), "--load_expr", expr, "--load_from",
            str(tiny["ckpt"]), "--pca_parameters_path", str(tiny["pca"]), "--attn_thres", "0",
            "--scale_list", *SCALES, "--device", "cpu", "--features_dir", str(feats),
            "--codebook_size", "32", "--codebook_images", str(codebook_images)]
    loads: list[object] = []
    load = DelfExtractor.from_checkpoint
    monkeypatch.setattr(DelfExtractor, "from_checkpoint", lambda *a, **k: loads.append(a) or load(*a, **k))
    assert main(args + ["--output", str(out)]) == 0
    assert len(loads) == 1   # one model for the dataset and the codebook's images
    monkeypatch.undo()
    res = json.loads(out.read_text())
    assert set(res) == {"easy", "medium", "hard", "initial", "config"}
    assert res["config"]["evaluation"]["codebook_size"] == 32
    assert all(0 <= v <= 100 for table in (res, res["initial"]) for p in PROTOCOLS for v in table[p].values())
    assert res["medium"]["mAP"] > 80.0 and res["medium"]["mAP"] >= res["initial"]["medium"]["mAP"]
    printed = capsys.readouterr().out
    assert "ASMK* (initial ranking)" in printed and "ASMK*+SP (spatial verification of the top 100)" in printed
    assert "kB per database image" in printed and "M mP@10" in printed

    # the codebook: plain arrays under repo/<expr>/asmk, trained on the codebook images' features
    stored = repo_dir() / expr / "asmk" / f"codebook_32_{set_name(codebook_images)}.h5"
    centroids, attrs = load_codebook(stored)
    assert centroids.shape == (32, 40) and attrs["codebook_size"] == 32
    assert attrs["features.pca_dims"] == 40 and attrs["features.attn_thres"] == 0.0
    cb_feats = feats.parent / f"{set_name(codebook_images)}.h5"
    assert len(feature_names(cb_feats)) == 12 and attrs["num_descriptors"] == sum(
        len(f["descriptors"]) for _, f in iter_features(cb_feats))

    # the index: plain arrays beside the codebook
    index_dir = stored.parent / f"index_{stored.stem}_roxford5k"
    assert sorted(p.name for p in (index_dir / "inverted").iterdir()) == [
        "block_crc.npy", "codes.npy", "counts.npy", "id_offsets.npy", "ids.npy", "keys.txt", "meta.json", "offsets.npy"]
    num_db = len(load_dataset(tiny["root"], "roxford5k").imlist)
    assert np.load(index_dir / "inverted" / "counts.npy").shape == (num_db,)

    # reused as stored; with --rerank 0 the database's features are never opened
    monkeypatch.setattr(codebook_module, "train_codebook", lambda *a: pytest.fail("codebook retrained"))
    monkeypatch.setattr(stored_index_module, "build_inverted", lambda *a: pytest.fail("index rebuilt"))
    assert main(args + ["--output", str(out)]) == 0
    assert json.loads(out.read_text()) == res
    monkeypatch.setattr(FeatureStore, "__init__", lambda *a: pytest.fail("database features opened"))
    assert main(args + ["--rerank", "0", "--output", str(out)]) == 0
    initial_only = json.loads(out.read_text())
    assert initial_only.pop("config")["evaluation"]["rerank"] == 0
    assert initial_only == {**res["initial"], "initial": res["initial"]}
    monkeypatch.undo()

    # a corrupt index: one line naming the file; --overwrite rebuilds it
    (index_dir / "inverted" / "codes.npy").write_bytes(b"garbage")
    capsys.readouterr()
    assert main(args) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith(f"error: {index_dir / 'inverted' / 'codes.npy'}: damaged (7 bytes")
    assert main(args + ["--overwrite", "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == res

    # deleted, the same seed trains the same codebook and ranks the same
    stored.unlink()
    assert main(args + ["--output", str(out)]) == 0
    assert json.loads(out.read_text()) == res
    np.testing.assert_array_equal(load_codebook(stored)[0], centroids)

    # another process building the same codebook or index, or extracting the same image set: refused at once
    for held, advice in ((stored, "wait for it or choose another --load_expr"), (cb_feats, "wait for it"),
                         (index_dir, "wait for it or choose another --load_expr")):
        with OutputLock(held):
            capsys.readouterr()
            assert main(args) == 1
        error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and f"{held}: in use by another process (pid {os.getpid()}" in error[0]
        assert error[0].endswith(advice) or advice + " (" in error[0]

    # --assignment hnsw: the index of exact words is refused; rebuilt, on 32 words the graph finds the exact words
    assert main(args + ["--assignment", "hnsw"]) == 1
    assert "(assignment: 'exact' in the index, 'hnsw' now" in capsys.readouterr().err
    shutil.rmtree(index_dir)
    kinds: list[str] = []

    def spy(*a: object, **k: object) -> StoredIndex:
        index = StoredIndex(*a, **k)
        kinds.append(index.words.kind)
        return index

    monkeypatch.setattr(stored_index_module, "StoredIndex", spy)
    assert main(args + ["--assignment", "hnsw", "--output", str(out)]) == 0
    hnsw = json.loads(out.read_text())
    assert kinds == ["hnsw"] and hnsw["config"]["evaluation"]["assignment"] == "hnsw"
    assert {k: v for k, v in hnsw.items() if k != "config"} == {k: v for k, v in res.items() if k != "config"}
    monkeypatch.undo()
    shutil.rmtree(index_dir)

    # an identical copy of each query ranks first among the database images
    with open(tiny["root"] / "roxford5k" / "gnd_roxford5k.pkl", "rb") as f:
        cfg = pickle.load(f)
    db = dict(iter_features(feats / "db.h5"))
    queries = [f["descriptors"] for _, f in sorted(iter_features(feats / "query.h5"))]
    index = AsmkIndex(centroids, [db[n]["descriptors"] for n in cfg["imlist"]] + queries, AsmkConfig(codebook_size=32))
    scores = index.scores(queries)
    n = len(cfg["imlist"])
    assert [int(np.argmax(s)) for s in scores] == [n + i for i in range(len(queries))]

    # distractors join the database; their features are cached next to the dataset's
    distractors = image_set(tmp / "distractors", ("hubble_deep_field", "camera"), 2, 2)
    capsys.readouterr()
    images: list[Path] = []

    def spy(ds: Dataset, rankings: dict[str, np.ndarray], out_dir: Path, database_image: Callable) -> list[Path]:
        images.extend(database_image(i) for i in range(len(next(iter(rankings.values())))))
        return write_figures(ds, rankings, out_dir, database_image)

    monkeypatch.setattr(figures_module, "write_figures", spy)
    assert main(args + ["--distractors", str(distractors), "--output", str(out), "--figures", str(tmp / "fig")]) == 0
    monkeypatch.undo()
    # the figures find every database image, the distractors' in their folder
    assert images[-4:] == [path for _, path in list_images(distractors)] and all(p.is_file() for p in images)
    assert len(list((tmp / "fig").glob("*.png"))) == 4
    assert "roxford5k + 4 distractors: ASMK* index" in capsys.readouterr().out
    assert len(feature_names(feats.parent / f"{set_name(distractors)}.h5")) == 4
    grown = stored.parent / f"index_{stored.stem}_roxford5k_{set_name(distractors)}"
    assert np.load(grown / "inverted" / "counts.npy").shape == (len(cfg["imlist"]) + 4,)
    assert json.loads(out.read_text())["medium"]["mAP"] > 80.0
    assert main(args + ["--distractors", str(tmp / "nowhere")]) == 1
    assert f"{tmp / 'nowhere'}: no such folder or image list" in capsys.readouterr().err


def asmk_with_distractors(tiny: dict[str, Path], root: Path, dtype: str = "float32",
                          share: WorkShare | None = None) -> Evaluation | None:
    """ASMK* (32 words, no re-ranking) on the tiny dataset plus distractors, descriptors stored as
    ``dtype``, outputs under ``root``; the codebook images and distractors are those of
    :func:`distractor_sets`; ``share``: under torchrun."""
    codebook_images, distractors = distractor_sets(tiny)
    extraction = ExtractionConfig(attn_thres=0.0, scale_list=tuple(map(float, SCALES)), descriptor_dtype=dtype)
    return evaluate_dataset(load_dataset(tiny["root"], "roxford5k"), tiny["ckpt"], root / "features" / "roxford5k",
                            pca_path=tiny["pca"], extraction=extraction, conf=EvalConfig(codebook_size=32, rerank=0),
                            codebook_images=codebook_images, distractors=distractors, codebook_dir=root / "asmk",
                            share=share)


def distractor_sets(tiny: dict[str, Path]) -> tuple[Path, Path]:
    """(codebook images, 6 distractors), made once per module."""
    folder = tiny["tmp"] / "streamed_sets"
    if not folder.exists():
        image_set(folder / "codebook" / "jpg", ("hubble_deep_field", "rocket"), 2, 1)
        image_set(folder / "distractors" / "jpg", ("camera", "coins", "brick"), 2, 2)
    return folder / "codebook" / "jpg", folder / "distractors" / "jpg"


def opened_files(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, list[str]]]:
    """(feature file, image names) of every FeatureStore opened from now on."""
    opened: list[tuple[Path, list[str]]] = []
    init = FeatureStore.__init__

    def spy(self: FeatureStore, parts: Sequence[tuple[Path, Sequence[str]]]) -> None:
        opened.extend((Path(path), list(names)) for path, names in parts)
        init(self, parts)

    monkeypatch.setattr(FeatureStore, "__init__", spy)
    return opened


def read_back_reference(tiny: dict[str, Path], extracted: Path, root: Path, monkeypatch: pytest.MonkeyPatch,
                        dtype: str = "float32") -> tuple[Evaluation, list[tuple[Path, list[str]]]]:
    """The index built the other way, from the complete feature files (and codebook) of the run
    under ``extracted`` copied under ``root`` (as distractors extracted by extractor.py): nothing
    is extracted, every distractor is read back. Returns the evaluation and the files read."""
    shutil.copytree(extracted / "features", root / "features")
    (root / "asmk").mkdir()
    for codebook in (extracted / "asmk").glob("codebook_*.h5"):
        shutil.copy(codebook, root / "asmk")
    with monkeypatch.context() as m:
        m.setattr(DelfExtractor, "__call__", lambda *_: pytest.fail("features should come from the files"))
        opened = opened_files(m)
        return asmk_with_distractors(tiny, root, dtype), opened


def index_folder(root: Path) -> Path:
    """The one ASMK* index folder under ``root``."""
    (folder,) = [p for p in (root / "asmk").glob("index_*") if p.is_dir()]
    return folder


def index_files(root: Path) -> dict[str, bytes]:
    """Every file of the one ASMK* index under ``root``, by path in its folder."""
    folder = index_folder(root)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def distractor_file(root: Path, tiny: dict[str, Path]) -> Path:
    return root / "features" / f"{set_name(distractor_sets(tiny)[1])}.h5"


@pytest.mark.slow
def test_asmk_distractors_aggregated_as_extracted_equal_read_back(tiny: dict[str, Path], tmp_path: Path,
                                                                  one_thread: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Distractors extracted by the evaluation (with the dataset and the codebook images, by one
    model) go into the index as they are extracted: their feature file is never read for it, and
    the index's files and scores equal those of an index built from the finished feature files
    (read back once, as distractors extracted beforehand)."""
    loads: list[object] = []
    load = DelfExtractor.from_checkpoint
    with monkeypatch.context() as m:
        opened = opened_files(m)
        m.setattr(DelfExtractor, "from_checkpoint", lambda *a, **k: loads.append(a) or load(*a, **k))
        streamed = asmk_with_distractors(tiny, tmp_path / "streamed")
    assert len(loads) == 1   # one model for the dataset, the codebook's images and the distractors
    distractors = distractor_file(tmp_path / "streamed", tiny)
    assert len(feature_names(distractors)) == 6 and streamed.distractors == 6
    assert opened and all(path != distractors for path, _ in opened)   # the dataset's are read back
    reference, opened = read_back_reference(tiny, tmp_path / "streamed", tmp_path / "read", monkeypatch)
    copy = distractor_file(tmp_path / "read", tiny)
    assert [names for path, names in opened if path == copy] == [feature_names(copy)]   # once, all of them
    assert index_files(tmp_path / "streamed") == index_files(tmp_path / "read")
    assert list(streamed.distractor_names) == list(reference.distractor_names) == feature_names(copy)
    np.testing.assert_array_equal(streamed.initial_ranks, reference.initial_ranks)
    assert streamed.initial == reference.initial


@pytest.mark.slow
def test_a_cached_evaluation_does_not_load_the_model(tiny: dict[str, Path], tmp_path: Path, one_thread: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Rerun on its cache (database, queries, codebook images, distractors, codebook, index), an
    evaluation never builds the extractor, and scores and ranks as the first run did."""
    first = asmk_with_distractors(tiny, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(extract_features_module, "load_extractor", lambda *_: pytest.fail("the model was loaded"))
        m.setattr(DelfExtractor, "from_checkpoint", lambda *_, **__: pytest.fail("the model was loaded"))
        again = asmk_with_distractors(tiny, tmp_path)
    assert again.initial == first.initial and again.final == first.final
    np.testing.assert_array_equal(again.initial_ranks, first.initial_ranks)
    assert list(again.distractor_names) == list(first.distractor_names) and again.distractors == 6


def test_lazy_extractor_reads_the_network_from_a_matching_file(tiny: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A feature file of the same checkpoint, PCA file and settings tells what the network would
    (its attributes, with the model never built); any difference, or a file without them, builds it."""
    conf = ExtractionConfig(attn_thres=0.0, scale_list=tuple(map(float, SCALES)))
    real = feature_attrs(load_extractor(conf, tiny["ckpt"], tiny["pca"]), tiny["ckpt"], tiny["pca"], tmp_path)
    with FeatureWriter(tmp_path / "f.h5", real) as w:
        w.write("x.jpg", {"keypoints": np.zeros((0, 2)), "descriptors": np.zeros((0, 40)), "scores": np.zeros(0),
                          "scales": np.zeros(0), "image_size": [10, 10]})
    recorded = file_attrs(tmp_path / "f.h5")
    builds: list[object] = []
    load = extract_features_module.load_extractor
    monkeypatch.setattr(extract_features_module, "load_extractor", lambda *a: builds.append(a) or load(*a))
    lazy = LazyExtractor(conf, tiny["ckpt"], tiny["pca"], "cpu", recorded)
    assert feature_attrs(lazy, tiny["ckpt"], tiny["pca"], tmp_path) == real and builds == []
    assert lazy.conf.pca_dims == 40 and lazy.scales == (0.7071, 1.0) and builds == []
    assert lazy.receptive_field.size > 0 and len(builds) == 1    # anything else builds it, once
    assert feature_attrs(lazy, tiny["ckpt"], tiny["pca"], tmp_path) == real and len(builds) == 1
    # descriptors: the PCA's 40 or 16 dimensions, or the network's 256 (resnet18's layer3) without it
    for changed, attrs, dim in (({"pca_dims": 16}, recorded, 16), ({"use_pca": False}, recorded, 256),
                                ({}, {**recorded, "checkpoint_sha256": "0" * 64}, 40),   # another checkpoint's
                                ({}, {k: v for k, v in recorded.items() if k != "arch"}, 40)):
        builds.clear()
        lazy = LazyExtractor(replace(conf, **changed), tiny["ckpt"], tiny["pca"], "cpu", attrs)
        assert builds == []
        assert lazy.network_attrs()["descriptor_dim"] == dim and len(builds) == 1, changed


@pytest.mark.slow
def test_asmk_index_behind_the_distractors_file_is_completed(tiny: dict[str, Path], tmp_path: Path,
                                                            one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed while it extracts distractors leaves their file one image ahead of the
    index's committed forward store: the rerun reads that image back, extracts the others into
    both, and the index equals one built from the finished feature files (float16 descriptors:
    those aggregated as extracted are those the file gives back)."""
    label = distractor_file(tmp_path, tiny).stem
    append = IndexBuild.append
    appended: list[str] = []

    def interrupted(self: IndexBuild, key: str, descriptors: np.ndarray) -> None:
        if key.startswith(f"{label}\t"):
            if len(appended) == 2:
                raise KeyboardInterrupt   # the third distractor is in the file, not in the index
            appended.append(key)
        append(self, key, descriptors)
        self.store.commit()

    with monkeypatch.context() as m:
        m.setattr(IndexBuild, "append", interrupted)
        with pytest.raises(KeyboardInterrupt):
            asmk_with_distractors(tiny, tmp_path / "killed", "float16")
    distractors = distractor_file(tmp_path / "killed", tiny)
    in_file = feature_names(distractors)
    folder = index_folder(tmp_path / "killed")
    stored = (folder / "forward" / "keys.txt").read_text().splitlines()
    num_db = len(load_dataset(tiny["root"], "roxford5k").imlist)
    assert len(in_file) == 3 and stored[num_db:] == [f"{label}\t{n}" for n in in_file[:2]]
    assert not (folder / "inverted").exists()

    calls: list[object] = []
    call = DelfExtractor.__call__
    aggregated: dict[str, np.ndarray] = {}

    def spy(self: IndexBuild, key: str, descriptors: np.ndarray) -> None:
        aggregated[key.split("\t")[1]] = descriptors
        append(self, key, descriptors)

    with monkeypatch.context() as m:
        m.setattr(DelfExtractor, "__call__", lambda *a, **k: calls.append(a) or call(*a, **k))
        m.setattr(IndexBuild, "append", spy)
        opened = opened_files(m)
        resumed = asmk_with_distractors(tiny, tmp_path / "killed", "float16")
    assert [names for path, names in opened if path == distractors] == [in_file[2:]]   # the one behind
    assert len(calls) == 3 and len(feature_names(distractors)) == 6   # the others extracted now
    # what was aggregated is what the file gives back
    names = feature_names(distractors)[2:]
    assert sorted(aggregated) == names
    for name, features in zip(names, read_all(distractors, names), strict=True):
        np.testing.assert_array_equal(aggregated[name], features["descriptors"])
    reference, _ = read_back_reference(tiny, tmp_path / "killed", tmp_path / "read", monkeypatch, "float16")
    assert index_files(tmp_path / "killed") == index_files(tmp_path / "read")
    np.testing.assert_array_equal(resumed.initial_ranks, reference.initial_ranks)
    assert list(resumed.distractor_names) == list(reference.distractor_names)


@pytest.mark.slow
def test_asmk_distractors_extracted_again_are_not_appended_again(tiny: dict[str, Path], tmp_path: Path,
                                                                 one_thread: None, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """An evaluation with distractors builds the index; the distractors' feature file is deleted
    (an initial ranking reads none of it) and the same evaluation runs again: every distractor is
    extracted again (for re-ranking), none is appended again: the index's files and the metrics
    are the first run's. Then one byte of a list in ids.npy lowered by one, or its top bit set:
    the evaluation is refused in one line naming the file."""
    first = asmk_with_distractors(tiny, tmp_path)
    before = index_files(tmp_path)
    distractors = distractor_file(tmp_path, tiny)
    distractors.unlink()
    calls: list[object] = []
    call = DelfExtractor.__call__
    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="delf"):
        m.setattr(DelfExtractor, "__call__", lambda *a, **k: calls.append(a) or call(*a, **k))
        again = asmk_with_distractors(tiny, tmp_path)
    assert len(calls) == 6 and len(feature_names(distractors)) == 6   # extracted again, into a new file
    assert again.database_size == first.database_size and again.distractors == first.distractors == 6
    assert again.initial == first.initial and again.final == first.final
    np.testing.assert_array_equal(again.initial_ranks, first.initial_ranks)
    assert list(again.distractor_names) == list(first.distractor_names)
    assert index_files(tmp_path) == before
    assert "6 images extracted again were in it already: their stored entries are kept" in caplog.text

    inverted = index_folder(tmp_path) / "inverted"
    ids, id_offsets = inverted / "ids.npy", np.load(inverted / "id_offsets.npy")
    pristine = ids.read_bytes()
    w = int(np.argmax(np.diff(id_offsets)))   # the longest list: read by the queries
    at = len(pristine) - int(id_offsets[-1]) + int(id_offsets[w]) + 1
    for change in (lambda b: b - 1 if b else 1, lambda b: b | 0x80):
        data = bytearray(pristine)
        data[at] = change(data[at])
        ids.write_bytes(bytes(data))
        with pytest.raises(AsmkIndexError) as e:
            asmk_with_distractors(tiny, tmp_path)
        assert re.match(rf"{ids}: damaged \(the lists of visual words \d+..\d+ do not match their crc32", str(e.value))
        assert "\n" not in str(e.value)
    ids.write_bytes(pristine)
    assert asmk_with_distractors(tiny, tmp_path).initial == first.initial


def test_a_filesystem_without_flock_is_refused_in_one_line(tiny: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(outputs_module.fcntl, "flock", no_flock)
    feats = tmp_path / "features"
    assert main(["--dataset", "roxford5k", "--data_root", str(tiny["root"]), "--load_from", str(tiny["ckpt"]),
                 "--pca_parameters_path", str(tiny["pca"]), "--device", "cpu", "--features_dir", str(feats),
                 "--method", "vote"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {feats}.lock: cannot lock it ({os.strerror(errno.ENOLCK)}): this filesystem gives no flock, so two "
        "runs could write one output; put the output on a local filesystem")


def test_set_name_and_feature_store(tmp_path: Path) -> None:
    """Image sets are named by their last two folders (revisitop's are all called jpg); the store
    numbers images across files in order and names a file that lacks one."""
    assert set_name("/data/rparis6k/jpg") == "rparis6k_jpg" and set_name("/d/my list.txt") == "d_my-list.txt"
    feats = {"keypoints": np.zeros((2, 2), np.float32), "descriptors": np.eye(2, dtype=np.float32),
             "scores": np.ones(2, np.float32), "scales": np.ones(2, np.float32),
             "image_size": np.array([4, 4], np.int32)}
    for name, images in (("a.h5", ["x", "y"]), ("b.h5", ["z"])):
        with FeatureWriter(tmp_path / name, {"pca_dims": 2}) as w:
            for i, image in enumerate(images):
                w.write(image, {**feats, "descriptors": feats["descriptors"] * (i + 1)})
    with FeatureStore([(tmp_path / "a.h5", ["y", "x"]), (tmp_path / "b.h5", ["z"])]) as store:
        assert len(store) == 3
        np.testing.assert_array_equal(store.features(0)["descriptors"], 2 * np.eye(2))
        assert [d[0, 0] for d in store.descriptors()] == [2.0, 1.0, 1.0]
    with pytest.raises(EvalError, match=r"b.h5: no features for 1 images \(e.g. 'w'\)"):
        FeatureStore([(tmp_path / "a.h5", ["x"]), (tmp_path / "b.h5", ["w"])])


def test_feature_cache_crops_exif_rotated_queries_in_stored_pixels(tmp_path: Path, one_thread: None) -> None:
    """A query stored with EXIF orientation 6: revisitop's bbx is in stored pixels, so the cache
    holds the features of the stored crop turned upright (what a viewer of the crop sees)."""
    jpg = tmp_path / "jpg"
    jpg.mkdir()
    stored = np.ascontiguousarray(photo("astronaut", 160)[:, :120])  # 120 wide, 160 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(jpg / "q.jpg", exif=exif, quality=95)
    Image.fromarray(photo("coffee", 96)).save(jpg / "db.jpg", quality=95)
    bbx = [10, 20, 110, 100]  # x1, y1, x2, y2 in stored pixels: 100 wide, 80 high
    ds = Dataset("roxford5k", ["db"], ["q"], [{"bbx": bbx, "easy": [0], "hard": [], "junk": []}], jpg)
    torch.manual_seed(0)
    ex = DelfExtractor(Delf(3, arch="resnet18", stage="inference"),
                       ExtractionConfig(scale_list=(1.0,), attn_thres=0.0, use_pca=False))
    _, query_path = cache_features(ds, ex, tmp_path / "ckpt", None, tmp_path / "cache")
    got = dict(iter_features(query_path))["q"]
    with Image.open(jpg / "q.jpg") as img:  # the stored pixels, cropped, then turned clockwise
        upright = img.convert("RGB").crop(bbx).transpose(Image.Transpose.ROTATE_270)
    assert got["image_size"].tolist() == [80, 100] == list(upright.size)
    expected = ex(upright)
    np.testing.assert_array_equal(got["keypoints"], expected["keypoints"])
    np.testing.assert_allclose(got["descriptors"], expected["descriptors"], atol=1e-6)


def test_feature_cache_held_by_another_evaluation_is_refused(tiny: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """One evaluation at a time writes a feature cache: another one exits at once with one line
    naming the holder, and the cache folder is not touched."""
    feats = tmp_path / "features"
    code = (f"import sys\nfrom train.outputs import OutputLock\nlock = OutputLock({str(feats)!r})\n"
            "print('ready', flush=True)\nsys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        assert main(["--dataset", "roxford5k", "--data_root", str(tiny["root"]), "--load_from", str(tiny["ckpt"]),
                     "--pca_parameters_path", str(tiny["pca"]), "--device", "cpu", "--features_dir", str(feats),
                     "--method", "vote"]) == 1
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.strip() == (f"error: {feats}: in use by another process (pid {holder.pid}, since "
                           f"{err.split('since ')[1].split(')')[0]}); wait for it or choose another --features_dir")
    assert not feats.exists()
@pytest.mark.slow
def test_delg_global_and_global_sp_end_to_end(tiny: dict[str, Path], one_thread: None, expr: str,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A DELG checkpoint (random init, no autoencoder: 256-d layer3 local features): --method
    global ranks by the global descriptors; global+sp re-ranks that ranking's top with RANSAC on
    the same cached features; DeLF features give a clear error."""
    tmp = tiny["tmp"] / expr
    # stride 16: the tiny dataset's images give the stride-32 grid too few features for RANSAC
    ckpt = save_delg_checkpoint(tmp / "delg.pth.tar", autoencoder_dim=0, block3_strides=False)
    feats, out = tmp / "features", tmp / "res.json"
    args = ["--dataset", "roxford5k", "--data_root", str(tiny["root"]), "--load_from", str(ckpt), "--use_pca", "false",
            "--attn_thres", "0", "--scale_list", *SCALES, "--device", "cpu", "--features_dir", str(feats)]
    assert main(args + ["--method", "global", "--output", str(out)]) == 0
    glob = json.loads(out.read_text())
    assert set(glob) == {"easy", "medium", "hard", "initial", "config"}
    assert glob["initial"] == {p: glob[p] for p in PROTOCOLS}  # --method global re-ranks nothing
    assert all(0 <= v <= 100 for p in PROTOCOLS for v in glob[p].values())
    printed = capsys.readouterr().out
    assert "DELG global (initial ranking)" in printed and "+SP" not in printed
    for _, f in iter_features(feats / "db.h5"):
        assert f["global_descriptor"].shape == (32,)
        assert np.linalg.norm(f["global_descriptor"]) == pytest.approx(1.0, abs=1e-5)

    # the global scores are the descriptors' inner products
    with open(tiny["root"] / "roxford5k" / "gnd_roxford5k.pkl", "rb") as f:
        cfg = pickle.load(f)
    db = dict(iter_features(feats / "db.h5"))
    queries = dict(iter_features(feats / "query.h5"))
    sims = np.stack([queries[q]["global_descriptor"] for q in cfg["qimlist"]]) @ np.stack(
        [db[n]["global_descriptor"] for n in cfg["imlist"]]).T
    expected = evaluate(np.argsort(-sims, axis=1, kind="stable").T, cfg["gnd"])
    assert glob["medium"]["mAP"] == pytest.approx(expected["medium"]["mAP"], abs=1e-3)

    # global+sp from the cache: the same initial ranking, then RANSAC on the top 100
    monkeypatch.setattr(DelfExtractor, "__call__", lambda *_: pytest.fail("features should come from the cache"))
    assert main(args + ["--method", "global+sp", "--output", str(out)]) == 0
    sp = json.loads(out.read_text())
    assert sp["initial"] == glob["initial"]
    # random weights: the global ranking is weak, RANSAC on the local features lifts it
    assert sp["medium"]["mAP"] > glob["medium"]["mAP"] + 5 and sp["hard"]["mAP"] > glob["hard"]["mAP"] + 5
    assert "DELG global+SP (spatial verification of the top 100)" in capsys.readouterr().out
    monkeypatch.undo()

    # features of a DeLF checkpoint have no global descriptor
    delf = ["--dataset", "roxford5k", "--data_root", str(tiny["root"]), "--load_from", str(tiny["ckpt"]),
            "--use_pca", "false", "--attn_thres", "0", "--scale_list", *SCALES, "--device", "cpu",
            "--features_dir", str(tmp / "delf"), "--method", "global"]
    assert main(delf) == 1
    assert "features have no global_descriptor: extract them with a DELG" in capsys.readouterr().err


@pytest.mark.slow
def test_float16_features_verify_and_rank_as_float32(tiny: dict[str, Path], tmp_path: Path, one_thread: None) -> None:
    """The tiny dataset extracted with --descriptor_dtype float16 and float32: the float16 files
    hold the float32 descriptors rounded; RANSAC inliers of all (query, database image) pairs
    agree within 1 % (a pair by one inlier at most); the ASMK* codebook and scores and the k-NN
    vote rankings are the same, and so are the evaluation's codebook, stored index and ASMK*
    ranking with distractors."""
    ds = load_dataset(tiny["root"], "roxford5k")
    conf = ExtractionConfig(attn_thres=0.0, scale_list=tuple(map(float, SCALES)))
    paths = {}
    for dtype in ("float32", "float16"):
        ex = DelfExtractor.from_checkpoint(tiny["ckpt"], tiny["pca"], replace(conf, descriptor_dtype=dtype))
        paths[dtype] = cache_features(ds, ex, tiny["ckpt"], tiny["pca"], tmp_path / dtype)
    db = {}
    for dtype, (db_path, _) in paths.items():
        with FeatureStore([(db_path, ds.imlist)]) as store:
            db[dtype] = [store.features(i) for i in range(len(store))]
    queries = {dtype: read_all(paths[dtype][1], ds.qimlist) for dtype in paths}
    for a, b in zip(db["float32"] + queries["float32"], db["float16"] + queries["float16"], strict=True):
        assert b["descriptors"].dtype == np.float32
        np.testing.assert_array_equal(b["descriptors"], a["descriptors"].astype(np.float16))
    inliers = {dtype: np.array([[Verifier(q, db[dtype].__getitem__)(i) for i in range(len(ds.imlist))]
                                for q in queries[dtype]]) for dtype in paths}
    assert inliers["float32"].max() > 20
    # a putative match at the distance bound may flip: one inlier of a pair at most, 1 % of all
    diff = np.abs(inliers["float16"] - inliers["float32"])
    assert (diff <= np.maximum(1, 0.01 * inliers["float32"])).all()
    assert diff.sum() <= 0.01 * inliers["float32"].sum()
    # rankings: k-NN votes the same; ASMK* (descriptors rounded to float16 first) the same codebook and scores
    centroids = {dtype: codebook_module.train_codebook(np.concatenate([f["descriptors"] for f in db[dtype]]),
                                                  AsmkConfig(codebook_size=32)) for dtype in paths}
    np.testing.assert_array_equal(centroids["float16"], centroids["float32"])
    asmk, votes = {}, {}
    for dtype in paths:
        index = AsmkIndex(centroids[dtype], [f["descriptors"] for f in db[dtype]], AsmkConfig(codebook_size=32))
        asmk[dtype] = index.scores(q["descriptors"] for q in queries[dtype])
        knn = Database([f["keypoints"] for f in db[dtype]], DescriptorIndex([f["descriptors"] for f in db[dtype]]))
        votes[dtype] = np.stack([rank(s) for s in knn.initial_scores([q["descriptors"] for q in queries[dtype]],
                                                                     10, 64)], axis=1)
    np.testing.assert_array_equal(votes["float16"], votes["float32"])
    np.testing.assert_array_equal(asmk["float16"], asmk["float32"])
    assert len(np.unique(asmk["float32"])) > asmk["float32"].size / 2   # not all ties
    # the evaluation (codebook images, stored index, distractors): the same codebook, index entries and ranking
    runs = {dtype: asmk_with_distractors(tiny, tmp_path / f"run_{dtype}", dtype) for dtype in paths}
    codebooks = {dtype: load_codebook(next((tmp_path / f"run_{dtype}" / "asmk").glob("codebook_*.h5")))[0]
                 for dtype in paths}
    np.testing.assert_array_equal(codebooks["float16"], codebooks["float32"])
    files = {dtype: index_files(tmp_path / f"run_{dtype}") for dtype in paths}
    assert files["float16"].keys() == files["float32"].keys()
    for name in ("inverted/codes.npy", "inverted/ids.npy", "inverted/counts.npy", "forward/words.bin"):
        assert files["float16"][name] == files["float32"][name], name
    np.testing.assert_array_equal(runs["float16"].initial_ranks, runs["float32"].initial_ranks)
    assert runs["float16"].initial == runs["float32"].initial and runs["float32"].distractors == 6


# evaluate_dataset under torchrun: argv the tiny fixture's paths (JSON), the output folder
SHARED_EVALUATION = """
import json, sys
from pathlib import Path
from extract.extraction.workshare import WorkShare
from tests.test_evaluate import asmk_with_distractors
from train.runtime import setup_runtime, teardown_runtime

share = WorkShare.join(setup_runtime("cpu", backend="gloo"))
result = asmk_with_distractors({k: Path(v) for k, v in json.loads(sys.argv[1]).items()}, Path(sys.argv[2]),
                               share=share)
print(json.dumps({"rank": share.rank, "distractors": result and result.distractors,
                  "initial": result and result.initial}))
teardown_runtime()
"""


@pytest.mark.slow
def test_asmk_evaluation_shared_by_torchrun(tiny: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes (torchrun, gloo, CPU) share the distractors' extraction and the index build:
    process 0 scores, the other returns None; the index's files (forward store and inverted file)
    are those one process builds from the same feature files, with the same scores."""
    distractor_sets(tiny)   # made before the processes start
    script = tmp_path / "shared.py"
    script.write_text(SHARED_EVALUATION)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def shared() -> list[dict]:
        done = subprocess.run([*torchrun, str(script), json.dumps({k: str(v) for k, v in tiny.items()}),
                               str(tmp_path / "two")], capture_output=True, text=True, timeout=900,
                              env=script_env(str(ROOT)))
        assert done.returncode == 0, done.stderr[-3000:]
        return sorted((json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")),
                      key=lambda r: r["rank"])

    results = shared()
    assert [(r["rank"], r["distractors"]) for r in results] == [(0, 6), (1, None)]
    assert not (index_folder(tmp_path / "two") / "forward" / "parts").exists()
    reference, _ = read_back_reference(tiny, tmp_path / "two", tmp_path / "one", monkeypatch)
    assert index_files(tmp_path / "two") == index_files(tmp_path / "one")
    assert results[0]["initial"] == json.loads(json.dumps(reference.initial))
    # the distractors extracted beforehand (+1M's step 1): the processes share reading them back
    shutil.rmtree(index_folder(tmp_path / "two"))
    again = shared()
    assert index_files(tmp_path / "two") == index_files(tmp_path / "one") and again == results
