"""--amp on a CPU: bf16 weights without autocast where the CPU computes bf16 natively, fp32 (said in
one line) where it would emulate it; and the features stay fp32's.

The decision is a function of the CPU's flags (train.runtime.cpu_flags, monkeypatched here), so
both branches are tested on any CPU; the agreement with fp32 needs native bf16 and is skipped,
saying so, where bf16 would be emulated. The agreement is measured on the official network
converted from TensorFlow (tests/official/tf_reference.py gives it random weights, as
tests/test_official.py does) and on a DELG model with random weights drawn the same way, over
scikit-image's photos.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

import train.runtime
from extract.config import ExtractionConfig, with_recorded
from extract.extraction.delf_extractor import Cast, DelfExtractor
from extract.extraction.pca import load_pca
from tests.utils import PHOTOS, photo, script_env
from train.checkpoint import load_model
from train.delf import Delf
from train.delg import Delg
from train.runtime import PROJECT_ROOT, cpu_flags, native_bf16, repo_dir

OFFICIAL_PYTHON = Path(os.environ.get("DELF_OFFICIAL_PYTHON", PROJECT_ROOT / ".venv-official" / "bin" / "python"))
needs_native_bf16 = pytest.mark.skipif(not native_bf16(), reason=(
    "this CPU has no native bf16 (avx512_bf16/amx_bf16): bf16 would be emulated and --amp runs fp32"))
FALLBACK = "--amp: this CPU has no native bf16 (avx512_bf16/amx_bf16), where bf16 would be slower than fp32: " \
           "extracting in fp32"


def flags(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make this CPU look as if /proc/cpuinfo listed ``names``."""
    monkeypatch.setattr(train.runtime, "cpu_flags", lambda: frozenset(names))


def image(name: str = "astronaut", size: int = 96) -> Image.Image:
    return Image.fromarray(photo(name, size))


# --- the decision ------------------------------------------------------------------------------
def test_native_bf16_is_avx512_bf16_or_amx_bf16(tmp_path: Path) -> None:
    assert native_bf16(frozenset({"avx512f", "avx512_bf16"}))
    assert native_bf16(frozenset({"amx_tile", "amx_bf16"}))
    assert not native_bf16(frozenset({"avx512f", "avx512bw", "avx512vl", "avx2"}))  # AVX512 alone emulates bf16
    assert not native_bf16(frozenset())  # flags unreadable: counted as emulating
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512_bf16 amx_tile\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_amp_without_native_bf16_runs_fp32_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The same features as without --amp, bit for bit; the configuration in effect (the feature
    file's attributes) says amp False; one warning line."""
    torch.manual_seed(0)
    model = Delf(3, arch="resnet18", stage="inference")
    conf = ExtractionConfig(scale_list=(0.7071, 1.0), attn_thres=0.0, top_k=50)
    flags(monkeypatch, "avx512f", "avx512bw", "avx2")
    with caplog.at_level(logging.WARNING, logger="delf"):
        amp = DelfExtractor(model, replace(conf, amp=True))
    assert [r.getMessage() for r in caplog.records] == [FALLBACK]
    assert not amp.bf16 and amp.conf.amp is False and amp.conf == DelfExtractor(model, conf).conf
    assert {p.dtype for p in amp.model.parameters()} == {torch.float32}
    got, want = amp(image()), DelfExtractor(model, conf)(image())
    for key in ("keypoints", "descriptors", "scores", "scales"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@contextmanager
def output_dtypes(model: torch.nn.Module) -> Iterator[tuple[dict[str, set[torch.dtype]], list[bool]]]:
    """Inside the block: each named submodule's output dtypes (name -> set), and for every output
    whether CPU autocast was on."""
    seen: dict[str, set[torch.dtype]] = {}
    autocast: list[bool] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen.setdefault(name, set()).add(output.dtype)
            autocast.append(torch.is_autocast_enabled("cpu"))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        yield seen, autocast
    finally:
        for handle in handles:
            handle.remove()


def test_amp_with_native_bf16_holds_bf16_weights_and_float32_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backbone and the attention's first convolution in bf16, the scores' convolution and
    softplus in float32, no autocast; the outputs float32 and unit length."""
    torch.manual_seed(0)
    flags(monkeypatch, "amx_tile", "amx_bf16")
    ex = DelfExtractor(Delf(3, arch="resnet18", stage="inference"),
                       ExtractionConfig(scale_list=(1.0,), attn_thres=0.0, top_k=30, amp=True))
    assert ex.bf16 and ex.conf.amp is True
    model = ex.model
    assert {p.dtype for p in model.base.parameters()} == {torch.bfloat16}
    assert model.attn.conv1.weight.dtype == torch.bfloat16
    assert isinstance(model.attn.conv2[0], Cast) and model.attn.conv2[1].weight.dtype == torch.float32
    with output_dtypes(model) as (seen, autocast):
        out = ex(image())
    assert seen["normalize.0"] == {torch.float32} and seen["normalize.1"] == {torch.bfloat16}
    assert seen["base"] == seen["attn.conv1"] == {torch.bfloat16}
    assert seen["attn.conv2"] == seen["attn.softplus"] == {torch.float32}
    assert autocast and not any(autocast)
    assert out["descriptors"].dtype == out["scores"].dtype == np.float32 and len(out["scores"]) == 30
    np.testing.assert_allclose(np.linalg.norm(out["descriptors"], axis=1), 1, atol=1e-5)


def test_delg_amp_with_native_bf16_keeps_the_global_head_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """DELG: layer4 and the autoencoder's encoder in bf16; GeM, the whitening layer and the
    global descriptor float32."""
    torch.manual_seed(0)
    flags(monkeypatch, "avx512_bf16")
    ex = DelfExtractor(Delg(3, arch="resnet18", global_dim=32, autoencoder_dim=16, classifiers=False),
                       ExtractionConfig(scale_list=(0.5, 1.0), attn_thres=0.0, top_k=20, amp=True))
    model = ex.model
    assert ex.bf16 and {p.dtype for p in model.layer4.parameters()} == {torch.bfloat16}
    assert model.autoencoder.encoder.weight.dtype == torch.bfloat16 and model.whiten.weight.dtype == torch.float32
    with output_dtypes(model) as (seen, autocast):
        out = ex(image(size=160))  # 5 x 5 + 3 x 3 cells at stride 32
    assert seen["layer4"] == seen["autoencoder.encoder"] == {torch.bfloat16}
    assert seen["gem"] == seen["whiten"] == {torch.float32} and not any(autocast)
    assert out["global_descriptor"].dtype == np.float32 and out["descriptors"].shape == (20, 16)
    assert np.linalg.norm(out["global_descriptor"]) == pytest.approx(1, abs=1e-5)


# --- the features stay fp32's ------------------------------------------------------------------
def compare(ref: dict, other: dict) -> tuple[int, int, np.ndarray]:
    """(fp32's keypoints also in ``other`` at the same place and scale, fp32's keypoints, the
    descriptor cosines of those pairs)."""
    index = {(x, y, s): i for i, ((x, y), s) in enumerate(zip(other["keypoints"].tolist(), other["scales"].tolist()))}
    pairs = [(i, index[(x, y, s)]) for i, ((x, y), s) in enumerate(zip(ref["keypoints"].tolist(),
                                                                        ref["scales"].tolist())) if (x, y, s) in index]
    mine, theirs = (np.array(p, dtype=int) for p in zip(*pairs)) if pairs else (np.zeros(0, int),) * 2
    return len(pairs), len(ref["scores"]), (ref["descriptors"][mine] * other["descriptors"][theirs]).sum(1)


def assert_agreement(model: Delf | Delg, conf: ExtractionConfig, size: int, pca: dict | None = None) -> None:
    """fp32 and --amp (pure bf16) on PHOTOS at ``size`` px: >= 97 % of fp32's keypoints (over the
    photos) at the same place and scale, descriptor cosine >= 0.999 on each of those, counts within
    1 % on each photo; with DELG, global descriptor cosine >= 0.999."""
    fp32, bf16 = DelfExtractor(model, conf, pca=pca), DelfExtractor(model, replace(conf, amp=True), pca=pca)
    assert bf16.bf16
    found = total = 0
    for name in PHOTOS:
        picture = image(name, size)
        ref, out = fp32(picture), bf16(picture)
        common, n, cosine = compare(ref, out)
        found, total = found + common, total + n
        assert abs(len(out["scores"]) - n) <= 0.01 * n, f"{name}: {len(out['scores'])} features, fp32 {n}"
        assert cosine.min() >= 0.999, f"{name}: lowest descriptor cosine {cosine.min():.5f}"
        if "global_descriptor" in ref:
            assert ref["global_descriptor"] @ out["global_descriptor"] >= 0.999, name
    assert found / total >= 0.97, f"{found} of fp32's {total} keypoints found"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official network (TF-slim resnet_v1_50 + attention, random weights) saved as a release
    by tests/official/tf_reference.py and converted by extract/convert_official.py: its checkpoint."""
    if not OFFICIAL_PYTHON.exists():
        pytest.skip(f"needs the official TensorFlow reference environment ({OFFICIAL_PYTHON}): make official-env")
    root = tmp_path_factory.mktemp("official")
    np.save(root / "tiny.npy", photo("coffee", 64))  # the script extracts an image too; not used here
    made = subprocess.run([str(OFFICIAL_PYTHON), str(PROJECT_ROOT / "tests" / "official" / "tf_reference.py"),
                           "--release", str(root / "delf_v1_20171026"), "--images", str(root / "tiny.npy"),
                           "--out", str(root / "ref.npz")], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(PROJECT_ROOT)})
    assert made.returncode == 0, made.stderr[-3000:]
    expr = f"bf16-official-{root.name}"
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "extract" / "convert_official.py"), "--source",
                           str(root / "delf_v1_20171026"), "--expr", expr], capture_output=True, text=True,
                          timeout=600, env=script_env())
    if done.returncode != 0 and "needs TensorFlow" in done.stderr:
        pytest.skip("the converter needs TensorFlow: pip install -r requirements-convert.txt")
    assert done.returncode == 0, done.stderr[-3000:]
    return repo_dir() / expr


@pytest.mark.slow
@needs_native_bf16
def test_bf16_features_agree_with_fp32_on_the_converted_official_model(converted: Path) -> None:
    """The official extraction settings the checkpoint records (TF1 resize, official boxes, IoU 1,
    PCA to 40-D from the release) with top_k binding: every cell a candidate (random weights do
    not score on the trained models' scale, which the official threshold 100 is for)."""
    model, ckpt = load_model(converted / "keypoint" / "ckpt" / "fix.pth.tar")
    pca = load_pca(converted / "pca" / "pca.h5")
    conf = replace(with_recorded(ExtractionConfig(), ckpt["extraction"]), attn_thres=0.0, top_k=1000,
                   max_image_size=512)
    assert_agreement(model, conf, 512, pca)


def official_like_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with the random weights tests/official/tf_reference.py gives the official network:
    He-normal kernels, BatchNorm scales U(0.5, 1.5), offsets and moving means N(0, 0.1), moving
    variances U(0.5, 2), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.normal_(0, math.sqrt(2 / m.weight[0].numel()), generator=g)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
    return model.eval()


@pytest.mark.slow
@needs_native_bf16
def test_bf16_delg_features_agree_with_fp32() -> None:
    """DELG (resnet50, autoencoder 128, global 2048), this project's settings, top_k binding."""
    model = official_like_weights(Delg(1, arch="resnet50", classifiers=False))
    assert_agreement(model, ExtractionConfig(attn_thres=0.0, top_k=1000, max_image_size=512), 512)
