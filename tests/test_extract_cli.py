"""extractor.py end to end: paths and messages, the report, resume, SIGKILL, torchrun, the seed README."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import extract.extraction.extract_features as extraction_module
from extract.config import DEFAULT_SCALES, EvalConfig, ExtractionConfig, MatchConfig
from extract.evaluate import build_parser as evaluate_parser
from extract.extraction.extract_features import default_workers, extract_features
from extract.extraction.feature_file import feature_names, file_attrs, read_features
from extract.extraction.pca import fit_pca, save_pca
from extract.extraction.pca_fitting import fit_pca_file
from extract.extraction.report import Report
from extract.extractor import build_parser as extractor_parser
from extract.extractor import main
from extract.matcher import parse_args as matcher_args
from tests.utils import (
    assert_same_features,
    make_image_folder,
    script_env,
    wait_for_groups,
    write_bad_images,
    write_odd_images,
)
from train.cli import config_from_args
from train.outputs import file_sha256
from train.runtime import PROJECT_ROOT, repo_dir

EXTRACTOR = PROJECT_ROOT / "extract" / "extractor.py"
FAST = ["--scale_list", "0.5", "1.0", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_delf_without_pca_then_resume_and_parameter_change(tmp_path: Path, ckpt: Path, images: Path, capsys):
    out = tmp_path / "f.h5"
    base = ["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out), "--use_pca", "false"]
    assert main(base + FAST) == 0
    assert feature_names(out) == ["astronaut/000.jpg", "astronaut/001.jpg", "coffee/000.jpg", "coffee/001.jpg"]
    f = read_features(out, "coffee/001.jpg")
    assert f["descriptors"].shape[1] == 256 and f["image_size"].tolist() == [96, 96]
    attrs = file_attrs(out)
    assert attrs["use_pca"] is False and attrs["pca_sha256"] == "" and len(attrs["checkpoint_sha256"]) == 64
    assert attrs["scale_list"] == [0.5, 1.0] and attrs["attn_thres"] == 0.31 and attrs["top_k"] == 1000
    capsys.readouterr()

    assert main(base + FAST) == 0  # resumes: nothing left to do
    assert "0 images extracted, 4 already there" in capsys.readouterr().out
    assert main(base + FAST + ["--attn_thres", "0.5"]) == 1
    assert "attn_thres: 0.31 in the file, 0.5 now" in capsys.readouterr().err
    assert main(base + FAST + ["--attn_thres", "0.5", "--overwrite"]) == 0
    assert (tmp_path / "f.report.txt").read_text().startswith(f"{out}: 4 images extracted")


def test_bad_inputs_are_reported_and_skipped(tmp_path: Path, ckpt: Path, capsys):
    folder = tmp_path / "mixed"
    bad = write_bad_images(folder)
    odd = write_odd_images(folder)
    Image.new("RGB", (200, 20)).save(folder / "tiny.png")
    out = tmp_path / "f.h5"
    rc = main(["--load_from", str(ckpt), "--input_path", str(folder), "--output_path", str(out),
               "--use_pca", "false"] + FAST)
    captured = capsys.readouterr()
    assert rc == 0 and "Traceback" not in captured.err
    report = (tmp_path / "f.report.txt").read_text()
    for name, words in bad.items():
        assert f"{folder / name}: " in report and words in report.split(f"{folder / name}: ")[1].splitlines()[0]
    assert f"{folder / 'tiny.png'}: too small: 200x20 px" in report
    assert report in captured.out
    assert feature_names(out) == sorted([*odd, "tiny.png"])
    assert read_features(out, "tiny.png")["keypoints"].shape == (0, 2)
    assert read_features(out, "rotated.jpg")["image_size"].tolist() == [64, 96]

    only_bad = tmp_path / "bad"
    write_bad_images(only_bad)
    assert main(["--load_from", str(ckpt), "--input_path", str(only_bad), "--output_path", str(tmp_path / "g.h5"),
                 "--use_pca", "false"] + FAST) == 1


def test_missing_fix_checkpoint_names_the_cp_command(images: Path, expr: str, capsys):
    assert main(["--load_expr", expr, "--mode", "pca", "--input_path", str(images)]) == 1
    err = capsys.readouterr().err
    ckpt_dir = repo_dir() / expr / "keypoint" / "ckpt"
    assert f"{ckpt_dir / 'fix.pth.tar'} not found" in err
    assert f"cp {ckpt_dir / 'bestshot.pth.tar'} {ckpt_dir / 'fix.pth.tar'}" in err
    assert "Traceback" not in err


def test_unknown_flag_is_an_error(capsys):
    assert main(["--input_path", "x", "--no_such_flag", "1"]) == 2
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--top_k", "-5", "argument --top_k: expected a positive integer, got -5"),
    ("--max_image_size", "20", "argument --max_image_size: expected 0 (no limit) or at least 32, got 20"),
    ("--mode", "fit", "argument --mode: invalid choice: 'fit' (choose from 'pca', 'delf')"),
])
def test_a_bad_flag_value_is_one_line_and_the_way_to_help(flag: str, value: str, message: str,
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The line that matters and where the flags are listed, not argparse's whole usage block."""
    monkeypatch.setattr(sys, "argv", ["extractor.py"])
    assert main(["--input_path", "x", flag, value]) == 2
    assert capsys.readouterr().err == f"extractor.py: error: {message}\nextractor.py --help lists the flags\n"


def test_a_run_failing_at_its_start_leaves_no_folder(tmp_path: Path, ckpt: Path, images: Path, capsys) -> None:
    """No folder, no lock file from a run that wrote nothing; a folder that was there stays."""
    bad = tmp_path / "bad"
    write_bad_images(bad)
    pca = tmp_path / "new" / "pca" / "pca.h5"
    assert main(["--load_from", str(ckpt), "--mode", "pca", "--input_path", str(bad), "--output_path", str(pca)]
                + FAST) == 1
    assert "PCA needs at least as many descriptors" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    features = tmp_path / "kept" / "sub" / "f.h5"
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(features),
                 "--pca_parameters_path", str(tmp_path / "none.h5")] + FAST) == 1
    assert "none.h5: no such PCA file" in capsys.readouterr().err
    assert list((tmp_path / "kept").iterdir()) == []


def test_the_report_counts_in_words() -> None:
    one = Report(Path("f.h5"), 1, 2)
    assert one.text() == "f.h5: 1 image extracted, 2 already there, 0 skipped or without features\n"
    assert Report(Path("f.h5"), 2).text().startswith("f.h5: 2 images extracted, 0 already there")


def test_pca_of_another_checkpoint_is_refused(tmp_path: Path, ckpt: Path, images: Path, capsys):
    pca = tmp_path / "pca.h5"
    params = fit_pca(np.random.default_rng(0).standard_normal((300, 256)).astype(np.float32))
    save_pca(pca, params, {"checkpoint_sha256": "0" * 64})
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--pca_parameters_path", str(pca),
                 "--output_path", str(tmp_path / "f.h5")] + FAST) == 1
    assert "fitted on a different checkpoint" in capsys.readouterr().err


def test_pca_needs_enough_descriptors(tmp_path: Path, ckpt: Path, images: Path, capsys):
    assert main(["--load_from", str(ckpt), "--mode", "pca", "--input_path", str(images),
                 "--output_path", str(tmp_path / "pca.h5"), "--top_k", "10"] + FAST) == 1
    assert "at least as many descriptors as dimensions: got 40 descriptors of dimension 256" in capsys.readouterr().err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path: Path, ckpt: Path, images: Path,
                                                                monkeypatch: pytest.MonkeyPatch, capsys):
    base = ["--load_from", str(ckpt), "--input_path", str(images), "--use_pca", "false", "--workers", "0"]
    assert main(base + ["--output_path", str(tmp_path / "a.h5"), "--scale_list", "0.5", "-1"]) == 1
    assert capsys.readouterr().err == "error: scales must be positive, got [0.5, -1.0]\n"
    assert main(base + ["--output_path", str(tmp_path / "b.h5"), "--scale_list", "0.5", "--save_attention"]) == 1
    assert capsys.readouterr().err == ("error: --save_attention stores the attention map at scale 1.0: add 1.0 "
                                       "to --scale_list\n")
    # a ValueError of numpy's (here: a bug placed in the attributes of the feature file) is no user error
    monkeypatch.setattr(extraction_module, "feature_attrs", lambda *a, **k: np.arange(3).reshape(2, 2))
    with pytest.raises(ValueError, match="cannot reshape array of size 3"):
        main(base + ["--output_path", str(tmp_path / "c.h5"), "--scale_list", "1.0"])


@pytest.mark.slow
def test_seed_readme_commands(tmp_path: Path, ckpt: Path, images: Path, expr: str):
    """The seed README's two commands, run from extract/ with real paths, defaults elsewhere (the PCA
    file and the features land under DELF_REPO_DIR)."""
    fix = repo_dir() / expr / "keypoint" / "ckpt" / "fix.pth.tar"
    fix.parent.mkdir(parents=True)
    shutil.copy(ckpt, fix)
    common = ["--gpu_id", "4", "--load_expr", expr, "--stage", "inference", "--batch_size", "1"]
    run = subprocess.run([sys.executable, "extractor.py", *common, "--mode", "pca", "--input_path", str(images)],
                         cwd=EXTRACTOR.parent, env=script_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert file_attrs(repo_dir() / expr / "pca" / "pca.h5")["num_features"] > 256
    run = subprocess.run([sys.executable, "extractor.py", *common, "--mode", "delf", "--attn_thres", "0.31",
                          "--iou_thres", "0.92", "--top_k", "1000", "--use_pca", "True", "--pca_dims", "40",
                          "--input_path", str(images)],
                         cwd=EXTRACTOR.parent, env=script_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = repo_dir() / expr / "features" / "imgs.h5"  # default: features/<input folder name>.h5
    assert len(feature_names(out)) == 4
    f = read_features(out, "astronaut/000.jpg")
    assert f["descriptors"].shape[1] == 40 and len(f["scores"]) > 0
    np.testing.assert_allclose(np.linalg.norm(f["descriptors"], axis=1), 1, atol=1e-5)
    assert set(np.unique(f["scales"])) == {np.float32(s) for s in DEFAULT_SCALES}


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path: Path, ckpt: Path):
    folder = make_image_folder(tmp_path / "imgs", classes=3, per_class=8, size=160)
    cmd = [sys.executable, str(EXTRACTOR), "--load_from", str(ckpt), "--input_path", str(folder), "--use_pca",
           "false", "--save_attention", "--scale_list", "0.5", "1.0", "2.0", "--output_path"]
    ref = subprocess.run(cmd + [str(tmp_path / "ref.h5")], env=script_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "out.h5"
    proc = subprocess.Popen(cmd + [str(out)], env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_groups(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(feature_names(out))
    assert 3 <= done < 24, f"the kill should land mid-run ({done} of 24 written)"

    rerun = subprocess.run(cmd + [str(out)], env=script_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{24 - done} images extracted, {done} already there" in rerun.stdout
    assert_same_features(out, tmp_path / "ref.h5")


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path: Path, ckpt: Path):
    folder = make_image_folder(tmp_path / "imgs", classes=3, per_class=3, size=96)
    args = [str(EXTRACTOR), "--load_from", str(ckpt), "--input_path", str(folder), "--scale_list", "0.5", "1.0",
            "2.0", "--pca_parameters_path", str(tmp_path / "pca.h5")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for launcher, tag in (([sys.executable], "one"), (torchrun, "two")):
        pca = subprocess.run(launcher + args + ["--mode", "pca", "--output_path", str(tmp_path / f"pca_{tag}.h5")],
                             env=script_env(), capture_output=True, text=True)
        assert pca.returncode == 0, pca.stderr
    one, two = (file_attrs(tmp_path / f"pca_{t}.h5") for t in ("one", "two"))
    assert one["num_features"] == two["num_features"] and one["num_images"] == two["num_images"] == 9
    with h5py.File(tmp_path / "pca_one.h5") as a, h5py.File(tmp_path / "pca_two.h5") as b:
        np.testing.assert_allclose(a["pca_vars"][:40], b["pca_vars"][:40], rtol=1e-3)
        np.testing.assert_allclose(np.abs(a["pca_matrix"][:5]), np.abs(b["pca_matrix"][:5]), atol=1e-3)

    shutil.copy(tmp_path / "pca_one.h5", tmp_path / "pca.h5")
    for launcher, tag in (([sys.executable], "one"), (torchrun, "two")):
        run = subprocess.run(launcher + args + ["--output_path", str(tmp_path / f"{tag}.h5")],
                             env=script_env(), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    assert "9 images extracted" in run.stdout
    assert_same_features(tmp_path / "one.h5", tmp_path / "two.h5")
    assert file_attrs(tmp_path / "one.h5") == file_attrs(tmp_path / "two.h5")
    # part files merged and removed; the lock's side file stays (process 0 held it for the run)
    assert sorted(p.name for p in tmp_path.glob("two.h5*")) == ["two.h5", "two.h5.lock"]


def test_library_entry_points_without_argparse(tmp_path: Path, ckpt: Path, images: Path):
    """fit_pca_file and extract_features from Python: the report names the file, and the feature
    file's attributes are the config in effect (dataclasses.asdict), as the CLI writes them."""
    conf = ExtractionConfig(scale_list=(1.0, 2.0), attn_thres=0.0, pca_dims=16)
    pca = fit_pca_file(conf, ckpt, images, tmp_path / "pca.h5", workers=0)
    assert pca.output == tmp_path / "pca.h5" and pca.processed == 4 and file_attrs(pca.output)["num_images"] == 4
    report = extract_features(conf, ckpt, images, tmp_path / "f.h5", pca_path=pca.output, workers=0)
    assert report.output == tmp_path / "f.h5" and (report.processed, report.existing) == (4, 0)
    assert read_features(report.output, "coffee/000.jpg")["descriptors"].shape[1] == 16
    attrs = file_attrs(report.output)
    stored = {name: attrs[name] for name in asdict(conf)}
    assert stored == {**asdict(conf), "scale_list": [1.0, 2.0]}
    # the CLI with the same flags resumes the same file: identical compared attributes
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(report.output),
                 "--pca_parameters_path", str(pca.output), "--scale_list", "1.0", "2.0", "--attn_thres", "0",
                 "--pca_dims", "16", "--workers", "0"]) == 0
    # without a PCA file the stored config says so
    plain = extract_features(conf, ckpt, images, tmp_path / "g.h5", workers=0)
    assert (file_attrs(plain.output)["use_pca"], file_attrs(plain.output)["pca_dims"]) == (False, 0)


@pytest.mark.parametrize("parse", [
    lambda a: extractor_parser().parse_args(["--input_path", "x", *a]),
    lambda a: matcher_args(["a.jpg", "b.jpg", *a]),
    lambda a: evaluate_parser().parse_args(["--dataset", "roxford5k", "--data_root", "R", *a]),
], ids=["extractor", "matcher", "evaluate"])
def test_flags_map_onto_configs(parse):
    """Every CLI: the defaults are the configs' own; booleans take --x, --x true, --x false."""
    args = parse([])
    assert config_from_args(ExtractionConfig, args) == ExtractionConfig()
    for flags, value in (([], False), (["--amp"], True), (["--amp", "true"], True), (["--amp", "false"], False)):
        assert parse(flags).amp is value
    assert parse(["--use_pca", "false"]).use_pca is False
    if hasattr(args, "overwrite"):
        assert [parse(f).overwrite for f in ([], ["--overwrite"], ["--overwrite", "true"],
                                             ["--overwrite", "false"])] == [False, True, True, False]
    if hasattr(args, "max_distance"):
        assert config_from_args(MatchConfig, args) == MatchConfig()
        assert parse(["--mutual", "false"]).mutual is False and parse(["--mutual"]).mutual is True
    if hasattr(args, "knn"):
        assert config_from_args(EvalConfig, args) == EvalConfig()


def test_use_whitening_is_stored_and_compared_on_resume(tmp_path: Path, ckpt: Path, images: Path, capsys):
    """--use_whitening (default false) is a compared attribute; a file written before it existed
    was whitened: refused with the default, resumed with --use_whitening true."""
    pca = tmp_path / "pca.h5"
    save_pca(pca, fit_pca(np.random.default_rng(0).standard_normal((300, 256)).astype(np.float32)),
             {"checkpoint_sha256": file_sha256(ckpt)})
    out = tmp_path / "f.h5"
    base = ["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out),
            "--pca_parameters_path", str(pca)] + FAST
    assert main(base) == 0 and file_attrs(out)["use_whitening"] is False
    capsys.readouterr()
    assert main(base + ["--use_whitening", "true"]) == 1
    assert "use_whitening: False in the file, True now" in capsys.readouterr().err

    with h5py.File(out, "a") as f:  # what the extractor wrote before use_whitening existed
        del f.attrs["use_whitening"]
    assert main(base) == 1
    err = capsys.readouterr().err
    assert "use_whitening: True in the file (not recorded: the value of files written before use_whitening " \
           "was), False now" in err and "pass the file's values to resume it" in err
    assert main(base + ["--use_whitening", "true"]) == 0
    assert "0 images extracted, 4 already there" in capsys.readouterr().out


def test_device_type_and_tf32_are_compared_on_resume(tmp_path: Path, ckpt: Path, images: Path, capsys):
    """A file made on a GPU is not resumed on the CPU (features differ in the last bits); files
    written before these attributes existed count as what their informational "device" says."""
    out = tmp_path / "f.h5"
    base = ["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out),
            "--use_pca", "false"] + FAST
    assert main(base) == 0
    attrs = file_attrs(out)
    assert (attrs["device_type"], attrs["tf32"], attrs["device"]) == ("cpu", False, "cpu")
    with h5py.File(out, "a") as f:  # as a GPU run would have written it
        f.attrs.update({"device_type": "cuda", "tf32": True, "device": "cuda:0"})
    capsys.readouterr()
    assert main(base) == 1
    assert "device_type: 'cuda' in the file, 'cpu' now; tf32: True in the file, False now" in capsys.readouterr().err
    with h5py.File(out, "a") as f:  # an older file, written on the CPU
        del f.attrs["device_type"], f.attrs["tf32"]
        f.attrs["device"] = "cpu"
    assert main(base) == 0
    assert "0 images extracted, 4 already there" in capsys.readouterr().out
    # --deterministic changes nothing on the CPU (no TF32 there) and is undone after the run
    det = tmp_path / "det.h5"
    assert main(base[:5] + [str(det)] + base[6:] + ["--deterministic"]) == 0
    assert file_attrs(det)["tf32"] is False and not torch.are_deterministic_algorithms_enabled()
    assert_same_features(det, out)


def test_decoding_workers_give_the_same_file(tmp_path: Path, ckpt: Path, images: Path, monkeypatch):
    """Two decoding processes (which also shrink the images) write what decoding in-process does."""
    conf = ExtractionConfig(scale_list=(0.5, 1.0), max_image_size=64, use_pca=False)
    extract_features(conf, ckpt, images, tmp_path / "zero.h5", workers=0)
    extract_features(conf, ckpt, images, tmp_path / "two.h5", workers=2)
    assert_same_features(tmp_path / "zero.h5", tmp_path / "two.h5")
    assert read_features(tmp_path / "two.h5", "coffee/000.jpg")["image_size"].tolist() == [96, 96]
    # defaults: 1 on the CPU; on CUDA the CPUs of this process's share less one, at most 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert default_workers("cpu") == 1 and default_workers("cuda") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers("cuda:1") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_workers("cuda") == 1
