"""extract/reproduce.py end to end without the internet: the datasets (and, where TensorFlow and
the reference environment exist, a tiny official release: the network tests/official builds) are
served by a local HTTP server; the table's figures are those evaluate_dataset gives on the same
data; a second run downloads, converts and extracts nothing."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import extract.reproduce as reproduce_module
import extract.reproduction.pipeline as pipeline_module
import extract.retrieval.asmk.codebook as codebook_module
from extract import evaluate
from extract.config import EvalConfig, ExtractionConfig, MatchConfig
from extract.evaluation.evaluate_dataset import evaluate_dataset
from extract.evaluation.revisitop import load_dataset
from extract.extraction.delf_extractor import DelfExtractor
from extract.extraction.pca import fit_pca, save_pca
from extract.reproduce import main
from extract.reproduction.pipeline import evaluation_args
from extract.reproduction.setups import SETUPS, Published, Setup
from tests.http_server import FileServer
from tests.test_download import Served, revisitop_files
from tests.test_official import HAVE_TF, OFFICIAL_PYTHON
from tests.utils import photo, save_keypoint_checkpoint
from train.checkpoint import load_file
from train.cli import config_from_args, parse_args_given
from train.outputs import file_sha256
from train.runtime import PROJECT_ROOT, limit_threads, repo_dir

SCALES = [0.7071, 1.0]
PUBLISHED = Published("Someone et al., 2030", "ASMK*+SP, tiny", {"medium": 50.0, "hard": 30.0})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return revisitop_files(tmp_path_factory.mktemp("served"))


def tiny_config(path: Path, expr: str, extra: str = "") -> Path:
    """A setup's config as the published ones, sized for the tiny datasets (32 visual words)."""
    path.write_text(f'dataset = "roxford5k"\nload_expr = "{expr}"\nmethod = "asmk"\ncodebook_size = 32\nrerank = 100\n'
                    f"attn_thres = 0.0\nscale_list = {SCALES}\n{extra}")
    return path


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, list[str]]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, [line for line in err.splitlines() if line.startswith("error:")]


def same_as_evaluate_dataset(table: dict, root: Path, checkpoint: Path, pca: Path, extraction: ExtractionConfig,
                             scratch: Path) -> None:
    """The table's figures are evaluate_dataset's on the same data, computed apart (its own
    feature cache and codebook)."""
    result = evaluate_dataset(load_dataset(root, "roxford5k"), checkpoint, scratch / "features" / "roxford5k",
                              pca_path=pca, extraction=extraction, conf=EvalConfig(codebook_size=32),
                              codebook_images=root / "rparis6k" / "jpg", codebook_dir=scratch / "asmk")
    for protocol, published in PUBLISHED.mAP.items():
        ours = result.final[protocol]["mAP"]
        assert table["this_run"]["mAP"][protocol] == pytest.approx(ours, abs=1e-4)
        assert table["difference"][protocol] == pytest.approx(ours - published, abs=1e-4)
        assert table["published"]["mAP"][protocol] == published
    assert table["scores"]["initial"]["medium"]["mAP"] == pytest.approx(result.initial["medium"]["mAP"], abs=1e-4)


@pytest.mark.slow
def test_reproduce_end_to_end_equals_evaluate_dataset(served: Served, tmp_path: Path, expr: str, one_thread: None,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A setup whose model is this project's (an experiment, no release): the datasets come from
    the server; the printed and written tables hold evaluate_dataset's figures; the rerun
    downloads, extracts and trains nothing, and gives the same table."""
    checkpoint = save_keypoint_checkpoint(repo_dir() / expr / "keypoint" / "ckpt" / "fix.pth.tar")
    extraction = ExtractionConfig(attn_thres=0.0, scale_list=tuple(SCALES))
    ex = DelfExtractor.from_checkpoint(checkpoint, conf=ExtractionConfig(use_pca=False, attn_thres=0.0,
                                                                         scale_list=tuple(SCALES)))
    with limit_threads(1):
        descriptors = np.concatenate([ex(Image.open(p).convert("RGB"))["descriptors"]
                                      for p in sorted((served.source / "rparis6k" / "jpg").iterdir())])
    pca = repo_dir() / expr / "pca" / "pca.h5"
    save_pca(pca, fit_pca(descriptors), {"checkpoint_sha256": file_sha256(checkpoint)})
    setup = Setup("tiny_roxf", tiny_config(tmp_path / "tiny.toml", expr), "rparis6k", None, PUBLISHED, "a note")
    monkeypatch.setitem(SETUPS, setup.name, setup)
    root, out_dir = tmp_path / "R", tmp_path / "tables"
    with FileServer(served.files) as server:
        argv = ("tiny_roxf", "--data_root", str(root), "--base_url", server.url, "--output_dir", str(out_dir),
                "--progress", "false", "--device", "cpu")
        status, out, errors = run(capsys, *argv)
        assert status == 0 and errors == []
        assert sorted(server.requests) == sorted(served.files)
        table = json.loads((out_dir / "tiny_roxf" / "table.json").read_text())
        same_as_evaluate_dataset(table, root, checkpoint, pca, extraction, tmp_path / "apart")
        medium, hard = (table["this_run"]["mAP"][p] for p in ("medium", "hard"))
        assert "| setup | mAP | published | this run | difference |" in out
        assert f"| tiny_roxf | Medium | 50.0 | {medium:.2f} | {medium - 50:+.2f} |" in out
        assert f"| tiny_roxf | Hard | 30.0 | {hard:.2f} | {hard - 30:+.2f} |" in out
        assert "tiny_roxf: a note." in out
        # what made it: the command, the equivalent evaluate.py command, the config, the settings
        command = "python extract/reproduce.py " + " ".join(argv)
        evaluate_command = (f"python extract/evaluate.py --config {tmp_path / 'tiny.toml'} --data_root {root} "
                            f"--codebook_images {root / 'rparis6k' / 'jpg'} --device cpu")
        assert (table["command"], table["evaluate_command"]) == (command, evaluate_command)
        assert table["settings"]["checkpoint"] == str(checkpoint) and table["settings"]["evaluation"]["rerank"] == 100
        markdown = (out_dir / "tiny_roxf" / "table.md").read_text()
        assert command in markdown and evaluate_command in markdown and "codebook_size = 32" in markdown
        assert f"| tiny_roxf | Medium | 50.0 | {medium:.2f} |" in markdown
        evaluation = json.loads((out_dir / "tiny_roxf" / "evaluation.json").read_text())
        assert evaluation["medium"]["mAP"] == table["this_run"]["mAP"]["medium"]

        # the equivalent evaluate.py command gives the same figures from the same cache
        result = tmp_path / "evaluate.json"
        assert evaluate.main([*evaluate_command.split()[2:], "--output", str(result)]) == 0
        assert json.loads(result.read_text())["medium"] == evaluation["medium"]

        # the rerun: nothing downloaded, extracted or trained; the same table
        server.requests.clear()
        monkeypatch.setattr(DelfExtractor, "__call__", lambda *a: pytest.fail("features extracted again"))
        monkeypatch.setattr(codebook_module, "train_codebook", lambda *a: pytest.fail("codebook trained again"))
        assert run(capsys, *argv)[0] == 0
        assert server.requests == []
        assert json.loads((out_dir / "tiny_roxf" / "table.json").read_text())["this_run"] == table["this_run"]


def test_conversion_without_tensorflow_names_make_install_convert(served: Served, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """The published setup, its model missing: the datasets and the release are downloaded, then
    one line says how to install the converter's TensorFlow."""
    release = tar_release_bytes({"model/saved_model.pb": b"graph", "pca/mean.datum": b"mean"})
    files = {**served.files, "/delf_v1_20171026/delf_v1_20171026.tar.gz": release}
    monkeypatch.setitem(sys.modules, "tensorflow", None)   # importlib.util.find_spec -> None
    with FileServer(files) as server:
        status, _, errors = run(capsys, "delf_v1_roxf_asmk_sp", "--data_root", str(tmp_path / "R"), "--parameters_dir",
                                str(tmp_path / "parameters"), "--base_url", server.url, "--progress", "false")
        assert sorted(server.requests) == sorted(files)
    folder = tmp_path / "parameters" / "delf_v1_20171026"
    assert status == 1 and errors == [
        f"error: converting {folder} needs TensorFlow, which is not installed here: make install-convert (or pip "
        "install -r requirements-convert.txt), then rerun"]
    assert (folder / "model" / "saved_model.pb").read_bytes() == b"graph"


def test_a_model_of_another_source_is_not_replaced(served: Served, tmp_path: Path, expr: str,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    checkpoint = save_keypoint_checkpoint(repo_dir() / expr / "keypoint" / "ckpt" / "fix.pth.tar")
    (repo_dir() / expr / "pca").mkdir(parents=True)
    (repo_dir() / expr / "pca" / "pca.h5").write_bytes(b"")
    before = checkpoint.read_bytes()
    setup = Setup("tiny_release", tiny_config(tmp_path / "t.toml", expr), "rparis6k", "delf_v1_20171026", PUBLISHED)
    monkeypatch.setitem(SETUPS, setup.name, setup)
    with FileServer(served.files) as server:
        status, _, errors = run(capsys, "tiny_release", "--data_root", str(tmp_path / "R"), "--base_url", server.url,
                                "--progress", "false")
    assert status == 1 and errors == [
        f"error: {checkpoint}: holds a model of this project, not delf_v1_20171026: move {repo_dir() / expr} away (or "
        "evaluate it with extract/evaluate.py), then rerun"]
    assert checkpoint.read_bytes() == before


# --- the official release: built in TensorFlow, served, downloaded, converted ----------------------
def tar_release_bytes(files: dict[str, bytes], name: str = "delf_v1_20171026") -> bytes:
    """A release archive as the official ones: <name>/model/..., <name>/pca/..."""
    from tests.test_download import tar_bytes

    return tar_bytes({f"{name}/{k}": v for k, v in files.items()}, folders=(name,))


@pytest.fixture(scope="module")
def release_archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The official network with random weights (tests/official/tf_reference.py), packed as the
    delf_v1_20171026 release is."""
    if not (HAVE_TF and OFFICIAL_PYTHON.exists()):
        pytest.skip("needs TensorFlow here and the official reference environment: make official-env")
    root = tmp_path_factory.mktemp("release")
    np.save(root / "image.npy", photo("astronaut", 64))
    release = root / "delf_v1_20171026"
    result = subprocess.run([str(OFFICIAL_PYTHON), str(PROJECT_ROOT / "tests" / "official" / "tf_reference.py"),
                             "--release", str(release), "--images", str(root / "image.npy"), "--out",
                             str(root / "ref.npz")], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    with tarfile.open(root / "release.tar.gz", "w:gz") as tar:
        tar.add(release, arcname="delf_v1_20171026")
    return (root / "release.tar.gz").read_bytes()


@pytest.mark.slow
def test_reproduce_downloads_and_converts_the_release(served: Served, release_archive: bytes, tmp_path: Path,
                                                      expr: str, one_thread: None, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """A setup of the delf_v1_20171026 release (the reference network, random weights): downloaded,
    converted into repo/<load_expr>, evaluated as evaluate_dataset does; the rerun downloads and
    converts nothing."""
    config = tiny_config(tmp_path / "release.toml", expr, "pca_dims = 40\n")
    setup = Setup("tiny_release", config, "rparis6k", "delf_v1_20171026", PUBLISHED)
    monkeypatch.setitem(SETUPS, setup.name, setup)
    files = {**served.files, "/delf_v1_20171026/delf_v1_20171026.tar.gz": release_archive}
    root, out_dir = tmp_path / "R", tmp_path / "tables"
    with FileServer(files) as server:
        argv = ("tiny_release", "--data_root", str(root), "--parameters_dir", str(tmp_path / "parameters"),
                "--base_url", server.url, "--output_dir", str(out_dir), "--progress", "false", "--device", "cpu")
        status, out, errors = run(capsys, *argv)
        assert status == 0 and errors == []
        assert sorted(server.requests) == sorted(files)
        checkpoint = repo_dir() / expr / "keypoint" / "ckpt" / "fix.pth.tar"
        assert load_file(checkpoint)["source"]["release"] == "delf_v1_20171026"
        table = json.loads((out_dir / "tiny_release" / "table.json").read_text())
        # the converted model's recorded settings, but for the config's keys
        extraction = ExtractionConfig(attn_thres=0.0, scale_list=tuple(SCALES), iou_thres=1.0, max_image_size=0,
                                      resize="tf1", boxes="official", pca_dims=40)
        assert table["settings"]["extraction"] == json.loads(json.dumps(extraction.__dict__))
        same_as_evaluate_dataset(table, root, checkpoint, repo_dir() / expr / "pca" / "pca.h5", extraction,
                                 tmp_path / "apart")
        assert re.search(r"\| tiny_release \| Medium \| 50\.0 \| \d+\.\d\d \| [+-]\d+\.\d\d \|", out)

        server.requests.clear()
        monkeypatch.setattr(pipeline_module, "convert_release", lambda *a: pytest.fail("converted again"))
        monkeypatch.setattr(DelfExtractor, "__call__", lambda *a: pytest.fail("features extracted again"))
        assert run(capsys, *argv)[0] == 0
        assert server.requests == []


# --- the setups --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SETUPS))
def test_setup_configs_parse_as_evaluate_parses_them(name: str) -> None:
    """Each setup's config: evaluate.py's parser and reproduce's read the same settings; the codebook is
    the other dataset's; the model is its release's experiment."""
    setup = SETUPS[name]
    ours = evaluation_args(setup.config)
    theirs = parse_args_given(evaluate.build_parser(), ["--config", str(setup.config), "--data_root", "R"])
    assert ours.given_flags == theirs.given_flags - {"config", "data_root"}
    for cls in (EvalConfig, MatchConfig, ExtractionConfig):
        assert config_from_args(cls, ours) == config_from_args(cls, theirs)
    assert (ours.dataset, ours.load_expr) == (theirs.dataset, theirs.load_expr)
    assert {ours.dataset, setup.codebook} == {"roxford5k", "rparis6k"}
    assert config_from_args(ExtractionConfig, ours).pca_dims == 128
    assert {"delf_v1": "delf_v1_20171026", "delf_gld": "delf_gld_20190411"}[ours.load_expr] == setup.release


def test_readme_table_names_each_setup_with_its_figures() -> None:
    """The README's results table: each published row gives the reproduce command of its setups,
    and its figures are theirs."""
    rows = [line for line in (PROJECT_ROOT / "README.md").read_text().splitlines() if line.startswith("| ")]
    for release in ("delf_v1", "delf_gld"):
        roxf, rpar = SETUPS[f"{release}_roxf_asmk_sp"], SETUPS[f"{release}_rpar_asmk_sp"]
        row = next(r for r in rows if f"python extract/reproduce.py {roxf.name} {rpar.name}" in r)
        figures = [" / ".join(f"{v:.1f}" for v in s.published.mAP.values()) for s in (roxf, rpar)]
        assert f"| {figures[0]} | {figures[1]} |" in row, row


def test_unknown_setup_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["nothing_of_the_kind"])
    assert "unknown setup 'nothing_of_the_kind' (choose from delf_v1_roxf_asmk_sp" in capsys.readouterr().err
    assert reproduce_module.main(["--list"]) == 0
    assert "delf_gld_rpar_asmk_sp: R-ASMK*+SP, 128-D (Teichmann et al., CVPR 2019), mAP medium/hard 80.2 / 58.6" in \
        capsys.readouterr().out
