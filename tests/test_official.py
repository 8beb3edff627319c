"""The official DELF models: TF-slim's ResNet layout, the official extraction conventions, the
.datum reader, and the converter proven against the official network built in TensorFlow.

The TensorFlow side runs in its own environment (tests/official/requirements.txt, built by
``make official-env``), as a subprocess: tests/official/tf_reference.py builds the official
network with tf_slim, gives it random weights, saves it as a release and extracts features the
official way. The converter itself needs TensorFlow in this environment
(requirements-convert.txt). Tests that need either are skipped, saying so, where it is missing.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from extract.config import ExtractionConfig, with_recorded
from extract.extraction.delf_extractor import to_original
from extract.extraction.feature_file import file_attrs, read_features
from extract.extraction.images import resize_tf1
from extract.official.convert import OFFICIAL_EXTRACTION, batchnorm_scopes, check_graph, convert_release, tf_name
from extract.official.datum import DatumError, parse_datum, read_datum
from extract.official.release import (
    ConversionError,
    GraphFacts,
    Identity,
    batchnorm_scope,
    identify,
    read_graph,
    release_name,
)
from tests.official.datum_proto import datum_bytes
from tests.utils import photo, script_env
from train.checkpoint import load_file, load_model
from train.delf import Delf
from train.outputs import file_sha256
from train.runtime import PROJECT_ROOT, repo_dir
from train.slim import SamePadMaxPool2d, Subsample

OFFICIAL_PYTHON = Path(os.environ.get("DELF_OFFICIAL_PYTHON", PROJECT_ROOT / ".venv-official" / "bin" / "python"))
HAVE_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAVE_TF, reason="TensorFlow is not in this environment: "
                              "pip install -r requirements-convert.txt (or make official-env)")
needs_reference = pytest.mark.skipif(not (HAVE_TF and OFFICIAL_PYTHON.exists()), reason=(
    f"the official TensorFlow reference environment ({OFFICIAL_PYTHON}) or TensorFlow here is missing: "
    "make official-env"))
MAX_FEATURES = 60  # fewer than the cells above the threshold: the top-k selection is compared too
# (name, (width, height)): an even-sized and an odd-sized photo (pool1's TF 'SAME' padding differs)
PHOTOS = (("astronaut", (288, 224)), ("chelsea", (301, 197)))


# --- the slim layout and the official conventions (no TensorFlow needed) ------------------------
def test_slim_receptive_field_is_the_official_constants() -> None:
    """block3 of slim resnet_v1_50: the official extractor's 291 / 32 / 145 (feature_extractor.py);
    torchvision's layer3 stays 267 / 16 / 133."""
    slim = Delf(1, stage="inference", layout="slim", input_norm="tf").receptive_field()
    assert (slim.size, slim.stride, slim.padding) == (291, 32, 145)
    tv = Delf(1, stage="inference").receptive_field()
    assert (tv.size, tv.stride, tv.padding) == (267, 16, 133)


def test_slim_units_put_the_stride_last_with_subsampling_shortcuts() -> None:
    slim = Delf(1, stage="inference", layout="slim")
    layer2 = slim.base[5]  # block2: 4 units
    assert [unit.conv2.stride for unit in layer2] == [(1, 1)] * 3 + [(2, 2)]
    assert isinstance(layer2[0].downsample, torch.nn.Sequential) and layer2[0].downsample[0].stride == (1, 1)
    assert isinstance(layer2[3].downsample, Subsample)
    assert all(m.bias is None for m in slim.base.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.arange(2 * 4 * 6 * 7, dtype=torch.float32).view(2, 4, 6, 7)
    assert torch.equal(Subsample(2)(x), x[:, :, [0, 2, 4]][:, :, :, [0, 2, 4, 6]])


def test_same_pad_max_pool_pads_like_tensorflow() -> None:
    """TF 'SAME', 3x3/2: an even side gets 0 cells before and 1 after, an odd side 1 and 1."""
    even = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)  # x[i, j] = 4i + j
    assert SamePadMaxPool2d()(even)[0, 0].tolist() == [[10, 11], [14, 15]]
    assert torch.nn.MaxPool2d(3, 2, 1)(even)[0, 0].tolist() == [[5, 7], [13, 15]]  # torchvision's differs
    odd = torch.arange(25, dtype=torch.float32).view(1, 1, 5, 5)  # x[i, j] = 5i + j
    assert SamePadMaxPool2d()(odd)[0, 0].tolist() == [[6, 8, 9], [16, 18, 19], [21, 23, 24]]
    negative = -torch.ones(1, 1, 4, 4)
    assert SamePadMaxPool2d()(negative).eq(-1).all()  # padding never wins


def test_input_normalisation_tf_is_pixel_minus_128_over_128() -> None:
    model = Delf(1, stage="inference", layout="slim", input_norm="tf")
    pixels = torch.tensor([0.0, 128.0, 255.0]).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(pixels / 255), (pixels - 128) / 128, atol=1e-6)


def test_resize_tf1_by_hand() -> None:
    """TF1 resize_bilinear (no half-pixel centres): output i samples input i * in / out."""
    row = torch.tensor([0.0, 10.0, 20.0, 30.0]).view(1, 1, 4)
    np.testing.assert_allclose(resize_tf1(row, (1, 3))[0, 0].numpy(), [0, 40 / 3, 80 / 3], rtol=1e-6)
    up = torch.tensor([0.0, 10.0]).view(1, 1, 2)
    assert resize_tf1(up, (1, 4))[0, 0].tolist() == [0, 5, 10, 10]  # the last input is repeated
    column = torch.tensor([0.0, 8.0]).view(1, 2, 1)
    assert resize_tf1(column, (4, 1))[0, :, 0].tolist() == [0, 4, 8, 8]


def test_official_boxes_divide_by_the_nominal_scale() -> None:
    box = torch.tensor([[-145.0, -145.0, 145.0, 145.0]]) + 32  # cell (1, 1)
    np.testing.assert_allclose(to_original(box.clone(), (0.5, 0.5), half_pixel=False).numpy(),
                               [[-226, -226, 354, 354]])
    np.testing.assert_allclose(to_original(box.clone(), (0.5, 0.5)).numpy(), [[-225.5, -225.5, 354.5, 354.5]])


def test_recorded_settings_apply_unless_a_flag_is_given() -> None:
    recorded = {**OFFICIAL_EXTRACTION, "scale_list": list(OFFICIAL_EXTRACTION["scale_list"]), "pca_dims": 40}
    conf = with_recorded(ExtractionConfig(), recorded)
    assert (conf.attn_thres, conf.iou_thres, conf.resize, conf.boxes, conf.max_image_size, conf.pca_dims) == (
        100.0, 1.0, "tf1", "official", 0, 40)
    assert conf.scale_list == (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
    given = with_recorded(ExtractionConfig(attn_thres=5.0, resize="antialias"), recorded, {"attn_thres", "resize"})
    assert (given.attn_thres, given.resize, given.boxes) == (5.0, "antialias", "official")
    with pytest.raises(ValueError, match="unknown extraction settings: nms"):
        with_recorded(ExtractionConfig(), {"nms": 1})


def test_every_slim_parameter_has_its_official_variable() -> None:
    """Spot checks of the name map, and no two parameters share a variable."""
    state = Delf(1, stage="inference", layout="slim", input_norm="tf").state_dict()
    names = {key: tf_name(key) for key in state}
    assert names["base.0.weight"] == "resnet_v1_50/conv1/weights"
    assert names["base.1.running_var"] == "resnet_v1_50/conv1/BatchNorm/moving_variance"
    assert names["base.6.5.bn3.weight"] == "resnet_v1_50/block3/unit_6/bottleneck_v1/conv3/BatchNorm/gamma"
    assert names["base.4.0.downsample.0.weight"] == "resnet_v1_50/block1/unit_1/bottleneck_v1/shortcut/weights"
    assert names["base.5.0.downsample.1.bias"] == "resnet_v1_50/block2/unit_1/bottleneck_v1/shortcut/BatchNorm/beta"
    assert names["attn.bn.running_mean"] == "attention_block/attention/compute/conv1/BatchNorm/moving_mean"
    assert names["attn.conv2.bias"] == "attention_block/attention/compute/conv2/biases"
    assert names["attn.conv1.bias"] is None and names["logits.0.weight"] is None
    mapped = [n for n in names.values() if n is not None]
    assert len(mapped) == len(set(mapped)) == 222  # 45 conv kernels, 44 BatchNorms x 4, conv2's bias


# --- the .datum reader ------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [True, False])
def test_datum_reads_protobuf_bytes(packed: bool) -> None:
    array = np.arange(6, dtype=np.float32).reshape(3, 2) * 1.5
    out = parse_datum(datum_bytes(array, packed=packed))
    assert out.dtype == np.float32 and out.shape == (3, 2)
    np.testing.assert_array_equal(out, array)


def test_datum_errors_name_the_file(tmp_path: Path) -> None:
    wrong = tmp_path / "mean.datum"
    wrong.write_bytes(datum_bytes(np.zeros(6, np.float32), shape=(2, 2)))
    with pytest.raises(DatumError, match=r"mean.datum: not a DatumProto file \(shape \[2, 2\] needs 4 values"):
        read_datum(wrong)
    cut = tmp_path / "cut.datum"
    cut.write_bytes(datum_bytes(np.zeros(8, np.float32))[:-5])
    with pytest.raises(DatumError, match="cut.datum: not a DatumProto file .*truncated"):
        read_datum(cut)
    with pytest.raises(DatumError, match="absent.datum"):
        read_datum(tmp_path / "absent.datum")


# --- which release, and the graph's checks (no TensorFlow needed) ------------------------------
def graph(folder: Path, writer: str = "", epsilons: dict | None = None, resize: tuple = ((False, False),)
          ) -> GraphFacts:
    """GraphFacts of a release in ``folder``, by hand: every BatchNorm of the model at 1e-5 unless
    ``epsilons`` says otherwise."""
    eps = {scope: (1e-5,) for scope in batchnorm_scopes()} if epsilons is None else epsilons
    return GraphFacts(folder / "model" / "saved_model.pb", writer, eps, resize)


def identify_as(folder: Path, writer: str, release: str | None = None) -> Identity:
    shapes = {"mean.datum": [1024], "pca_proj_mat.datum": [1024, 1024]}
    return identify(folder, release, graph(folder, writer), shapes, 7, "ab" * 32)


def test_batchnorm_scopes_of_graph_nodes() -> None:
    """A graph node's BatchNorm, as its variables name it: outer scopes (a while loop) and a
    re-entered model scope's suffix dropped; fused op or the unfused epsilon constant."""
    assert batchnorm_scope("resnet_v1_50/conv1/BatchNorm/FusedBatchNormV3") == "resnet_v1_50/conv1/BatchNorm"
    assert batchnorm_scope("while/resnet_v1_50_1/block3/unit_2/bottleneck_v1/conv2/BatchNorm/FusedBatchNorm") == (
        "resnet_v1_50/block3/unit_2/bottleneck_v1/conv2/BatchNorm")
    assert batchnorm_scope("attention_block/attention/compute/conv1/BatchNorm/batchnorm_1/add/y") == (
        "attention_block/attention/compute/conv1/BatchNorm")
    assert batchnorm_scope("resnet_v1_50/conv1/Conv2D") is None
    assert batchnorm_scope("other_net/conv1/BatchNorm/FusedBatchNorm") is None
    scopes = batchnorm_scopes()
    assert len(scopes) == 44 and "attention_block/attention/compute/conv1/BatchNorm" in scopes


def test_check_graph_refuses_a_batchnorm_epsilon_it_cannot_read(tmp_path: Path) -> None:
    """No FusedBatchNorm node nor epsilon constant: refused, not passed; one BatchNorm without one
    is named; a wrong epsilon is refused; all 44 at 1e-5 pass and are recorded."""
    scopes = batchnorm_scopes()
    with pytest.raises(ConversionError, match=r"saved_model.pb: no BatchNorm epsilon for 44 of the model's 44 "
                                              r"BatchNorms \(e.g. attention_block/attention/compute/conv1/BatchNorm\)"):
        check_graph(graph(tmp_path, epsilons={}), scopes)
    some = {scope: (1e-5,) for scope in scopes if scope != "resnet_v1_50/conv1/BatchNorm"}
    with pytest.raises(ConversionError, match=r"1 of the model's 44 BatchNorms \(e.g. resnet_v1_50/conv1/BatchNorm\)"):
        check_graph(graph(tmp_path, epsilons=some), scopes)
    wrong = {**some, "resnet_v1_50/conv1/BatchNorm": (0.001,)}
    with pytest.raises(ConversionError, match=r"BatchNorm epsilon \[1e-05, 0.001\] \(1 BatchNorms, e.g. "
                                              r"resnet_v1_50/conv1/BatchNorm\), only 1e-05 is supported"):
        check_graph(graph(tmp_path, epsilons=wrong), scopes)
    with pytest.raises(ConversionError, match=r"ResizeBilinear with \(align_corners, half_pixel_centers\) "
                                              r"\[\(False, True\)\]"):
        check_graph(graph(tmp_path, resize=((False, True),)), scopes)
    record = check_graph(graph(tmp_path, writer="1.3.0"), scopes)
    assert record == {"batchnorm_epsilon": 1e-5, "batchnorms_checked": 44, "written_by": "1.3.0",
                      "resize_bilinear": [{"align_corners": False, "half_pixel_centers": False}]}


def test_a_release_is_its_name_checked_against_the_tensorflow_that_wrote_it(tmp_path: Path) -> None:
    """The files of the two releases have the same shapes; the graph's TensorFlow version is dated:
    a graph no TensorFlow of delf_v1_20171026's date could write, in a folder named so, is refused
    (delf_gld_20190411 unpacked there would extract at 40-D); the same graph named delf_gld_20190411
    is confirmed; a graph older than both fits either; one newer than both is a warned re-export."""
    v1, gld = tmp_path / "delf_v1_20171026", tmp_path / "delf_gld_20190411"
    with pytest.raises(ConversionError, match=r"delf_v1_20171026/model/saved_model.pb: written by TensorFlow 1.13.1, "
                                              r"newer than any TensorFlow of delf_v1_20171026's date \(2017-10-26: 1.5 "
                                              r"at most\), so not delf_v1_20171026; it fits delf_gld_20190411"):
        identify_as(v1, "1.13.1")
    with pytest.raises(ConversionError, match="so not delf_v1_20171026"):  # a renamed folder, named by --release
        identify_as(tmp_path / "mine", "1.13.1", "delf_v1_20171026")
    confirmed = identify_as(gld, "1.13.1")
    assert (confirmed.release, confirmed.pca_dims, confirmed.named_by, confirmed.warning) == (
        "delf_gld_20190411", 128, "the folder's name", None)
    assert confirmed.verdict.endswith("which fits delf_gld_20190411 (2019-04-11) and postdates delf_v1_20171026: "
                                      "confirmed")
    old = identify_as(v1, "1.3.0")
    assert (old.release, old.pca_dims, old.warning) == ("delf_v1_20171026", 40, None)
    assert "fits delf_gld_20190411 as well" in old.verdict and old.verdict.endswith("identified by its name")
    new = identify_as(tmp_path / "mine", "2.12.1", "delf_gld_20190411")
    assert (new.release, new.named_by) == ("delf_gld_20190411", "--release")
    assert new.warning == (f"{tmp_path}/mine/model/saved_model.pb: written by TensorFlow 2.12.1, after "
                           "delf_gld_20190411 was published (2019-04-11): the PCA dimension (128) rests on the name "
                           "alone")
    silent = identify_as(v1, "")
    assert silent.warning is None and silent.verdict.endswith("identified by its name only")
    assert identify_as(v1, "1.3.0", "delf_v1_20171026").named_by == "--release and the folder's name"
    lines = old.lines()
    assert lines[0] == ("release delf_v1_20171026 (DELF, ICCV 2017 (Google-Landmarks-clean)), named by the folder's "
                        "name: extraction keeps 40 of the PCA's 1024 components")
    assert lines[2] == ("evidence: graph written by TensorFlow 1.3.0; PCA mean.datum [1024], pca_proj_mat.datum "
                        f"[1024, 1024]; global_step 7; variables sha256 {'ab' * 32}")


def test_a_release_option_that_contradicts_the_folder_is_refused(tmp_path: Path, expr: str) -> None:
    """--release naming the other release than the folder is refused in one line, before anything
    is read (no TensorFlow needed); an unknown folder name needs --release."""
    folder = tmp_path / "delf_v1_20171026"
    folder.mkdir()
    result = convert("--source", str(folder), "--expr", expr, "--release", "delf_gld_20190411")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {folder}: --release delf_gld_20190411 contradicts the folder's name delf_v1_20171026; rename the "
        "folder to the release it holds"]
    assert not (repo_dir() / expr).exists()
    with pytest.raises(ConversionError, match=r"unknown release 'mine': name it with --release \(delf_v1_20171026, "
                                              r"delf_gld_20190411\)"):
        release_name(tmp_path / "mine")


# --- the converter ----------------------------------------------------------------------------
def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "extract" / "convert_official.py"), *args],
                          capture_output=True, text=True, timeout=600, env=script_env())


@needs_tf
def test_convert_refuses_a_folder_that_is_not_a_release(tmp_path: Path, expr: str) -> None:
    result = convert("--source", str(tmp_path), "--expr", expr, "--release", "delf_v1_20171026")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}: not an official DELF release (no model/saved_model.pb; expected model/saved_model.pb, "
        "model/variables/ and pca/)"]
    assert not (repo_dir() / expr).exists()


def test_convert_without_tensorflow_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.official.release import list_variables

    (tmp_path / "model" / "variables").mkdir(parents=True)
    (tmp_path / "model" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "model" / "variables" / "variables.index").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    with pytest.raises(ConversionError, match=r"needs TensorFlow: pip install -r requirements-convert.txt"):
        list_variables(tmp_path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The official network (random weights) saved as a release, its outputs on two photos, and
    a release of another model; all made by tests/official/tf_reference.py."""
    if not (HAVE_TF and OFFICIAL_PYTHON.exists()):
        pytest.skip("needs the official TensorFlow reference environment: make official-env")
    root = tmp_path_factory.mktemp("official")
    (root / "images").mkdir()
    arrays = []
    for name, size in PHOTOS:
        pixels = np.asarray(Image.fromarray(photo(name)).resize(size, Image.Resampling.BILINEAR))
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
        np.save(root / f"{name}.npy", pixels)
        arrays.append(str(root / f"{name}.npy"))
    release, other, unfused = root / "delf_v1_20171026", root / "delg_like", root / "unfused" / "delf_v1_20171026"
    result = subprocess.run([str(OFFICIAL_PYTHON), str(PROJECT_ROOT / "tests" / "official" / "tf_reference.py"),
                             "--release", str(release), "--images", *arrays, "--out", str(root / "ref.npz"),
                             "--max_feature_num", str(MAX_FEATURES), "--unknown_release", str(other),
                             "--unfused_release", str(unfused)],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return {"release": release, "other": other, "unfused": unfused, "images": root / "images",
            "outputs": dict(np.load(root / "ref.npz"))}


@pytest.fixture(scope="module")
def conversion(reference: dict) -> subprocess.CompletedProcess:
    """The reference release converted through the CLI, as experiment ``official``: the run."""
    result = convert("--source", str(reference["release"]), "--expr", "official")
    assert result.returncode == 0, result.stderr
    assert "ignored (not part of the extraction model): attention_block/logits/biases, attention_block/logits/" \
           "weights, global_step" in result.stdout
    return result


@pytest.fixture(scope="module")
def converted(conversion: subprocess.CompletedProcess) -> str:
    """The experiment the reference release was converted to."""
    return "official"


@needs_reference
def test_converted_checkpoint_records_the_model_and_the_official_settings(reference: dict, converted: str) -> None:
    ckpt = load_file(repo_dir() / converted / "keypoint" / "ckpt" / "fix.pth.tar")  # weights_only
    assert (ckpt["layout"], ckpt["input_norm"], ckpt["arch"], ckpt["target_layer"], ckpt["stage"]) == (
        "slim", "tf", "resnet50", "layer3", "keypoint")
    assert ckpt["extraction"]["pca_dims"] == 40 and ckpt["extraction"]["attn_thres"] == 100.0
    assert ckpt["source"]["release"] == "delf_v1_20171026"
    assert ckpt["source"]["unused_variables"] == ["attention_block/logits/biases", "attention_block/logits/weights",
                                                  "global_step"]
    assert ckpt["source"]["graph"]["batchnorm_epsilon"] == pytest.approx(1e-5)
    with h5py.File(repo_dir() / converted / "pca" / "pca.h5", "r") as f:
        pca = reference["release"] / "pca"
        np.testing.assert_array_equal(f["pca_mean"][()], read_datum(pca / "mean.datum"))
        np.testing.assert_array_equal(f["pca_matrix"][()], read_datum(pca / "pca_proj_mat.datum"))


@needs_reference
def test_block3_and_attention_equal_tensorflow(reference: dict, converted: str) -> None:
    model, _ = load_model(repo_dir() / converted / "keypoint" / "ckpt" / "fix.pth.tar")
    pixels = np.array(Image.open(reference["images"] / "astronaut.png"))
    with torch.no_grad():
        features, attention = model.eval().extract(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
    want_f, want_a = reference["outputs"]["block3"], reference["outputs"]["attention"]
    assert features.shape[2:] == want_a.shape == (7, 9)  # 224 x 288 at stride 32
    spread_f, spread_a = np.ptp(want_f), np.ptp(want_a)
    assert spread_f > 1 and spread_a > 1  # non-trivial outputs
    assert np.abs(features[0].permute(1, 2, 0).numpy() - want_f).max() <= 1e-4 * spread_f
    assert np.abs(attention[0, 0].numpy() - want_a).max() <= 1e-4 * spread_a


@needs_reference
def test_extraction_equals_the_official_extractor(reference: dict, converted: str) -> None:
    """extractor.py with the converted model (the official settings from its checkpoint; the
    threshold and feature count of the reference given as flags) against the official pipeline:
    >= 99 % of the official keypoints at the same place and scale, descriptor cosine >= 0.999."""
    threshold = float(reference["outputs"]["threshold"])
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "extract" / "extractor.py"), "--load_expr", converted,
                             "--mode", "delf", "--input_path", str(reference["images"]), "--attn_thres",
                             repr(threshold), "--top_k", str(MAX_FEATURES)],
                            capture_output=True, text=True, timeout=600, env=script_env())
    assert result.returncode == 0, result.stderr[-3000:]
    path = repo_dir() / converted / "features" / "images.h5"
    attrs = file_attrs(path)
    assert (attrs["resize"], attrs["boxes"], attrs["iou_thres"], attrs["pca_dims"], attrs["max_image_size"]) == (
        "tf1", "official", 1.0, 40, 0)
    for index, (name, _) in enumerate(PHOTOS):
        ours = read_features(path, f"{name}.png")
        want_xy = reference["outputs"][f"locations{index}"][:, ::-1]
        want_scale = 1 / reference["outputs"][f"scales{index}"]
        want_desc = reference["outputs"][f"descriptors{index}"]
        assert reference["outputs"][f"candidates{index}"] > MAX_FEATURES  # the top-k cut is part of the test
        assert len(want_xy) == len(ours["keypoints"]) == MAX_FEATURES
        # pair each official feature with ours at the same place and scale
        dist = np.abs(want_xy[:, None] - ours["keypoints"][None]).max(-1)
        same = (dist <= 1) & (np.abs(want_scale[:, None] - ours["scales"][None]) < 1e-3)
        found = same.any(1)
        assert found.mean() >= 0.99, f"{name}: {found.mean():.3f} of the official keypoints found"
        cosine = np.array([max(want_desc[i] @ ours["descriptors"][j] for j in np.flatnonzero(same[i]))
                           for i in np.flatnonzero(found)])
        assert cosine.min() >= 0.999, f"{name}: lowest descriptor cosine {cosine.min():.5f}"


@needs_reference
def test_convert_refuses_bad_releases_with_one_line(reference: dict, tmp_path: Path, expr: str) -> None:
    release = reference["release"]

    def broken(name: str, change) -> Path:
        copy = tmp_path / name / "delf_v1_20171026"
        shutil.copytree(release, copy)
        change(copy)
        return copy

    def truncate(folder: Path) -> None:
        data = folder / "model" / "variables" / "variables.data-00000-of-00001"
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])

    def wrong_mean(folder: Path) -> None:
        (folder / "pca" / "mean.datum").write_bytes(datum_bytes(np.zeros(512, np.float32)))

    cases = {"truncated": (truncate, "variables.data-00000-of-00001: cannot read"),
             "mean": (wrong_mean, "mean.datum: shape [512], expected [1024]"),
             "delg": (None, "is not a DELF v1 release (TF-slim resnet_v1_50 + attention_block): DELG")}
    for name, (change, message) in cases.items():
        source = reference["other"] if change is None else broken(name, change)
        result = convert("--source", str(source), "--expr", expr, "--release", "delf_v1_20171026")
        assert result.returncode == 1, name
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (name, result.stderr)
        assert not (repo_dir() / expr).exists(), name
        if change is None:  # a model it does not know: its variables are listed before the error
            assert "model/attention/conv1/kernel  [1, 1, 1024, 512]" in result.stdout.splitlines()
    listing = convert("--source", str(reference["other"]), "--list")
    assert listing.returncode == 0
    assert "model/backbone/conv1/kernel  [7, 7, 3, 64]" in listing.stdout.splitlines()


@needs_reference
def test_convert_refuses_an_existing_model_without_overwrite(reference: dict, converted: str) -> None:
    ckpt = repo_dir() / converted / "keypoint" / "ckpt" / "fix.pth.tar"
    before = ckpt.stat().st_mtime_ns
    refused = convert("--source", str(reference["release"]), "--expr", converted)
    assert refused.returncode == 1 and "holds a model already" in refused.stderr and "--overwrite" in refused.stderr
    assert ckpt.stat().st_mtime_ns == before
    replaced = convert("--source", str(reference["release"]), "--expr", converted, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert load_file(ckpt)["source"]["release"] == "delf_v1_20171026"


def edited_release(release: Path, folder: Path, edit: Callable[[Any], None]) -> Path:
    """``folder``: the release ``release`` (its variables and PCA linked) with its saved_model.pb
    edited by ``edit`` (given the parsed SavedModel)."""
    from tensorflow.core.protobuf import saved_model_pb2

    (folder / "model").mkdir(parents=True)
    (folder / "model" / "variables").symlink_to(release / "model" / "variables")
    (folder / "pca").symlink_to(release / "pca")
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((release / "model" / "saved_model.pb").read_bytes())
    edit(saved)
    (folder / "model" / "saved_model.pb").write_bytes(saved.SerializeToString())
    return folder


def written_by(version: str) -> Callable[[Any], None]:
    def edit(saved: Any) -> None:
        for meta in saved.meta_graphs:
            meta.meta_info_def.tensorflow_version = version
    return edit


@needs_reference
def test_converter_prints_the_release_and_its_evidence(reference: dict, conversion: subprocess.CompletedProcess,
                                                       converted: str) -> None:
    """What it identified and why, on stdout; the test's release was written by a TensorFlow newer than
    both releases, which is said as a warning; all of it is recorded in the checkpoint."""
    data = reference["release"] / "model" / "variables" / "variables.data-00000-of-00001"
    lines = conversion.stdout.splitlines()
    assert lines[0] == ("release delf_v1_20171026 (DELF, ICCV 2017 (Google-Landmarks-clean)), named by the folder's "
                        "name: extraction keeps 40 of the PCA's 1024 components")
    assert lines[1].startswith("why: saved_model.pb was written by TensorFlow 2.")
    assert lines[1].endswith("after every known release was published: not an original download (a re-export, or a "
                             "test's release): identified by its name only")
    assert lines[2].endswith("PCA mean.datum [1024], pca_proj_mat.datum [1024, 1024], pca_vars.datum [1024]; "
                             f"global_step 0; variables sha256 {file_sha256(data)}")
    warnings = [line for line in conversion.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].endswith(
        "after delf_v1_20171026 was published (2017-10-26): the PCA dimension (40) rests on the name alone")
    identity = load_file(repo_dir() / converted / "keypoint" / "ckpt" / "fix.pth.tar")["source"]["identity"]
    assert (identity["release"], identity["pca_dims"], identity["global_step"], identity["variables_sha256"]) == (
        "delf_v1_20171026", 40, 0, file_sha256(data))
    assert identity["verdict"] == lines[1][len("why: "):]


@needs_reference
def test_a_renamed_release_is_told_by_its_graph(reference: dict, tmp_path: Path, expr: str) -> None:
    """delf_gld_20190411's graph (written in 2019: here the reference's, saying TensorFlow 1.13.1)
    unpacked into a folder named delf_v1_20171026 is refused, nothing written; under its own name it
    converts at 128-D, confirmed."""
    graph_2019 = written_by("1.13.1")
    wrong = edited_release(reference["release"], tmp_path / "a" / "delf_v1_20171026", graph_2019)
    with pytest.raises(ConversionError, match=r"written by TensorFlow 1.13.1, newer than any TensorFlow of "
                                              r"delf_v1_20171026's date .* it fits delf_gld_20190411"):
        convert_release(wrong, expr)
    assert not (repo_dir() / expr).exists()
    right = edited_release(reference["release"], tmp_path / "b" / "delf_gld_20190411", graph_2019)
    done = convert_release(right, expr)
    assert (done.identity.release, done.identity.warning) == ("delf_gld_20190411", None)
    assert done.identity.verdict.endswith("postdates delf_v1_20171026: confirmed")
    ckpt = load_file(done.checkpoint)
    assert ckpt["extraction"]["pca_dims"] == 128 and ckpt["source"]["identity"]["writer"] == "1.13.1"


@needs_reference
def test_batchnorm_epsilon_without_a_fused_batchnorm_node(reference: dict, tmp_path: Path, expr: str) -> None:
    """tf_slim's unfused BatchNorm (no FusedBatchNorm node): the epsilon is read from its
    batchnorm/add/y constants, all 44, and a changed one is refused; a graph whose BatchNorms have
    neither is refused, not passed."""
    facts = read_graph(reference["unfused"])
    assert set(facts.epsilons) == batchnorm_scopes() and set(facts.epsilons.values()) == {(1e-5,)}
    done = convert_release(reference["unfused"], expr)
    assert load_file(done.checkpoint)["source"]["graph"]["batchnorms_checked"] == 44

    def epsilon_1e3(saved: Any) -> None:
        import tensorflow as tf

        node = next(n for n in saved.meta_graphs[0].graph_def.node
                    if n.name.startswith("resnet_v1_50/block2/unit_3/bottleneck_v1/conv1/BatchNorm/batchnorm")
                    and n.name.endswith("/add/y"))
        node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.float32(1e-3)))

    changed = edited_release(reference["unfused"], tmp_path / "changed" / "delf_v1_20171026", epsilon_1e3)
    with pytest.raises(ConversionError, match=r"BatchNorm epsilon \[1e-05, 0.001\] \(1 BatchNorms, e.g. "
                                              r"resnet_v1_50/block2/unit_3/bottleneck_v1/conv1/BatchNorm\)"):
        check_graph(read_graph(changed), batchnorm_scopes())

    def no_fused_batchnorm(saved: Any) -> None:  # the BatchNorms computed by ops that do not say their epsilon
        for node in saved.meta_graphs[0].graph_def.node:
            if node.op.startswith("FusedBatchNorm"):
                node.op = "Identity"
                del node.attr["epsilon"]

    opaque = edited_release(reference["release"], tmp_path / "opaque" / "delf_v1_20171026", no_fused_batchnorm)
    assert read_graph(opaque).epsilons == {}
    with pytest.raises(ConversionError, match=r"no BatchNorm epsilon for 44 of the model's 44 BatchNorms"):
        convert_release(opaque, f"{expr}-opaque")
    assert not (repo_dir() / f"{expr}-opaque").exists()
