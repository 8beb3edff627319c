"""Extraction on a CUDA GPU: agreement with the CPU, the uint8 path, no per-scale host syncs (either
resize), the official resize, --amp, the feature file's device attributes, a real device failure,
two GPUs under torchrun. Skipped without a GPU (marked ``cuda``)."""
from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from extract.config import DEFAULT_SCALES, ExtractionConfig
from extract.extraction.delf_extractor import DelfExtractor
from extract.extraction.extract_features import extract_features
from extract.extraction.feature_file import FeatureFileError, feature_names, file_attrs, iter_features
from extract.extraction.images import resize_tf1
from extract.extraction.pca import fit_pca
from extract.extractor import main
from tests.utils import assert_same_features, make_image_folder, photo, script_env
from train.delf import Delf
from train.runtime import PROJECT_ROOT, amp_dtype, deterministic_mode

pytestmark = pytest.mark.cuda


@pytest.fixture
def deterministic() -> Iterator[None]:
    with deterministic_mode():
        yield


def by_position(f: dict) -> np.ndarray:
    """Row order of the features sorted by (scale, y, x)."""
    return np.lexsort((f["keypoints"][:, 0], f["keypoints"][:, 1], f["scales"]))


def test_cuda_equals_cpu(model: Delf, deterministic: None):
    """Same keypoints (and scales), descriptors within 1e-3, with and without PCA."""
    image = Image.fromarray(photo("coffee", 400))
    pca = fit_pca(np.random.default_rng(0).standard_normal((600, 256)).astype(np.float32))
    for params in (None, pca):
        conf = ExtractionConfig(scale_list=DEFAULT_SCALES, attn_thres=0.0, top_k=500, pca_dims=40)
        cpu = DelfExtractor(model, conf, pca=params)(image)
        gpu = DelfExtractor(model, conf, pca=params, device="cuda")(image)
        a, b = by_position(cpu), by_position(gpu)
        np.testing.assert_array_equal(gpu["keypoints"][b], cpu["keypoints"][a])
        np.testing.assert_array_equal(gpu["scales"][b], cpu["scales"][a])
        np.testing.assert_allclose(gpu["scores"][b], cpu["scores"][a], atol=1e-4)
        np.testing.assert_allclose(gpu["descriptors"][b], cpu["descriptors"][a], atol=1e-3)
        for ga, ca in zip(gpu["attention"], cpu["attention"], strict=True):
            np.testing.assert_allclose(ga, ca, atol=1e-4)


def test_uint8_image_on_the_gpu_is_shrunk_as_float(model: Delf):
    """A uint8 CUDA tensor larger than max_image_size (PyTorch has no antialiased uint8 kernel on
    CUDA) gives the features of the same image as float."""
    u8 = torch.from_numpy(np.ascontiguousarray(photo("chelsea", 400).transpose(2, 0, 1))).cuda()
    ex = DelfExtractor(model, ExtractionConfig(scale_list=(0.5, 1.0), max_image_size=200, attn_thres=0.0),
                       device="cuda")
    a, b = ex(u8), ex(u8.float() / 255)
    np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
    np.testing.assert_allclose(a["descriptors"], b["descriptors"], atol=1e-5)


@pytest.mark.parametrize("resize", ["antialias", "tf1"])
def test_no_host_sync_per_scale(model: Delf, resize: str):
    """The host waits for the GPU a few times per image (count the cells, NMS, the result's
    copy), not once per pyramid scale; the official resize (tf1) makes its tables on the GPU."""
    image = torch.from_numpy(np.ascontiguousarray(photo("astronaut", 512).transpose(2, 0, 1))).pin_memory()
    ex = DelfExtractor(model, ExtractionConfig(scale_list=DEFAULT_SCALES, attn_thres=0.0, resize=resize),
                       device="cuda")
    ex(image)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ex(image)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert 1 <= len(syncs) < len(DEFAULT_SCALES), [str(w.message) for w in syncs]


def test_feature_file_records_the_device(tmp_path: Path, ckpt: Path, images: Path):
    """A file extracted on the GPU (decoding workers, pinned memory) says so, and a CPU run does
    not resume it."""
    conf = ExtractionConfig(scale_list=(0.5, 1.0), use_pca=False)
    report = extract_features(conf, ckpt, images, tmp_path / "f.h5", workers=2, device="cuda")
    assert report.processed == 4 and len(dict(iter_features(report.output))) == 4
    attrs = file_attrs(report.output)
    assert attrs["device_type"] == "cuda" and attrs["device"].startswith("cuda")
    assert attrs["tf32"] == (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    with pytest.raises(FeatureFileError, match="device_type: 'cuda' in the file, 'cpu' now"):
        extract_features(conf, ckpt, images, tmp_path / "f.h5", workers=0, device="cpu")
    # --deterministic: TF32 off, recorded; a default (TF32) run does not resume that file
    assert main(["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(tmp_path / "d.h5"),
                 "--use_pca", "false", "--scale_list", "0.5", "1.0", "--device", "cuda", "--deterministic"]) == 0
    assert file_attrs(tmp_path / "d.h5")["tf32"] is False
    if torch.backends.cudnn.allow_tf32:
        with pytest.raises(FeatureFileError, match="tf32: False in the file, True now"):
            extract_features(conf, ckpt, images, tmp_path / "d.h5", workers=0, device="cuda")


def test_tf1_resize_on_the_gpu_equals_the_cpu():
    g = torch.Generator().manual_seed(0)
    for h, w in ((97, 131), (512, 384)):
        x = torch.rand(3, h, w, generator=g)
        for scale in DEFAULT_SCALES:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            gpu = resize_tf1(x.cuda(), size)
            assert gpu.device.type == "cuda" and gpu.shape == (3, *size)
            torch.testing.assert_close(gpu.cpu(), resize_tf1(x, size), rtol=0, atol=1e-6)


def test_official_conventions_on_the_gpu_equal_the_cpu(model: Delf, deterministic: None):
    """resize tf1 and official boxes (converted official models' defaults): the same keypoints as
    on the CPU, descriptors within 1e-3."""
    image = Image.fromarray(photo("coffee", 400))
    conf = ExtractionConfig(scale_list=DEFAULT_SCALES, attn_thres=0.0, top_k=500, use_pca=False, resize="tf1",
                            boxes="official")
    cpu, gpu = DelfExtractor(model, conf)(image), DelfExtractor(model, conf, device="cuda")(image)
    a, b = by_position(cpu), by_position(gpu)
    np.testing.assert_array_equal(gpu["keypoints"][b], cpu["keypoints"][a])
    np.testing.assert_allclose(gpu["descriptors"][b], cpu["descriptors"][a], atol=1e-3)


def test_amp_on_the_gpu(model: Delf):
    """--amp: convolutions in bf16 (fp16 on GPUs without bf16), float32 features close to the
    float32 extraction's."""
    image = Image.fromarray(photo("coffee", 160)).resize((96, 72))  # as the CPU's test_amp_agrees_with_fp32
    conf = ExtractionConfig(scale_list=(1.0,), attn_thres=0.0, top_k=1000, use_pca=False)
    ref = DelfExtractor(model, conf, device="cuda")(image)
    amp = DelfExtractor(model, replace(conf, amp=True), device="cuda")
    assert amp.conf.amp is True  # a random-init model's folded weights fit fp16 too
    dtypes = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: dtypes.add(output.dtype) if isinstance(module, torch.nn.Conv2d) else None)
    try:
        got = amp(image)
    finally:
        hook.remove()
    assert dtypes == {amp_dtype(torch.device("cuda"))} and got["descriptors"].dtype == np.float32
    common = {tuple(k) for k in ref["keypoints"].tolist()} & {tuple(k) for k in got["keypoints"].tolist()}
    assert len(common) >= 0.9 * len(ref["keypoints"])
    at = {tuple(k): i for i, k in enumerate(got["keypoints"].tolist())}
    pairs = [(i, at[tuple(k)]) for i, k in enumerate(ref["keypoints"].tolist()) if tuple(k) in at]
    cos = [float(ref["descriptors"][i] @ got["descriptors"][j]) for i, j in pairs]
    assert np.mean(cos) > 0.99


# a device-side assert at the 2nd image: CUDA's error is sticky, so it runs in a process of its own
FAILING_EXTRACTOR = """
import sys
import torch
from extract.extraction.delf_extractor import DelfExtractor
from extract.extractor import main

real_call, calls = DelfExtractor.__call__, []


def call(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # an index out of bounds in a CUDA kernel
        torch.zeros(4, device="cuda")[torch.tensor([9], device="cuda")].sum().item()
    return real_call(self, *args, **kwargs)


DelfExtractor.__call__ = call
sys.exit(main(sys.argv[1:]))
"""


def test_a_real_device_failure_stops_the_run_and_the_rerun_resumes(tmp_path: Path, ckpt: Path, images: Path):
    out = tmp_path / "f.h5"
    args = ["--load_from", str(ckpt), "--input_path", str(images), "--output_path", str(out), "--scale_list", "0.5",
            "1.0", "--use_pca", "false", "--workers", "0", "--device", "cuda"]
    failed = subprocess.run([sys.executable, "-c", FAILING_EXTRACTOR, *args], capture_output=True, text=True,
                            env=script_env(str(PROJECT_ROOT)), timeout=600)
    assert failed.returncode == 1, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "the device failed" in errors[0] and "device-side assert" in errors[0]
    assert errors[0].endswith("the file keeps 1 complete images: rerun the same command to resume")
    assert len(feature_names(out)) == 1
    assert main(args) == 0
    assert len(feature_names(out)) == 4


@pytest.mark.slow
def test_torchrun_on_two_gpus_equals_one(tmp_path: Path, ckpt: Path):
    """Two processes, one GPU each (the default group gloo: extraction starts no NCCL), give the
    file of one process (deterministic: the same kernels for each image). Skipped with fewer than
    2 GPUs."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    folder = make_image_folder(tmp_path / "imgs", classes=3, per_class=3, size=96)
    args = [str(PROJECT_ROOT / "extract" / "extractor.py"), "--load_from", str(ckpt), "--input_path", str(folder),
            "--scale_list", "0.5", "1.0", "2.0", "--use_pca", "false", "--device", "cuda", "--deterministic"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for launcher, tag in (([sys.executable], "one"), (torchrun, "two")):
        run = subprocess.run(launcher + args + ["--output_path", str(tmp_path / f"{tag}.h5")], env=script_env(),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
    assert "9 images extracted" in run.stdout
    assert_same_features(tmp_path / "one.h5", tmp_path / "two.h5")
    assert file_attrs(tmp_path / "two.h5")["device_type"] == "cuda"
