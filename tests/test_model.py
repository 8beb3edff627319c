"""The DeLF model: shapes per stage, receptive field, normalisation, checkpoint formats."""
from __future__ import annotations

import copy
import math
import urllib.error
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torchvision

from tests.utils import save_keypoint_checkpoint
from train.checkpoint import CheckpointError, checkpoint_dict, describe, load_backbone, load_file, load_model
from train.config import IMAGENET_MEAN, IMAGENET_STD
from train.delf import Delf, PretrainedUnavailable, feature_dim
from train.delg import Delg
from train.layers import SpatialAttention2d, WeightedSum2d

NCLS = 5


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_output_shapes_per_stage(arch: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 3, 96, 64)
    for layer, stride in (("layer3", 16), ("layer4", 32)):
        for stage in ("finetune", "keypoint", "inference"):
            model = Delf(NCLS, arch=arch, stage=stage, target_layer=layer).eval()
            with torch.no_grad():
                assert model(x).shape == (1, NCLS)
                if stage == "finetune":
                    continue
                features, attention = model.extract(x)
            assert features.shape == (1, feature_dim(arch, layer), 96 // stride, 64 // stride)
            assert attention.shape == (1, 1, 96 // stride, 64 // stride)
            trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
            assert trainable == {"attn", "logits"}


def test_attention_scores_are_softplus_of_the_head() -> None:
    """Hand-made head: conv1 = identity, ReLU, conv2 = h0 - h1 - 1, so the pre-activation z is
    negative for most cells; the score must be softplus(z) = log(1 + e^z) (> 0, unlike a ReLU),
    and z itself above softplus's threshold 20."""
    head = SpatialAttention2d(2, hidden=2, batchnorm=False).eval()
    with torch.no_grad():
        head.conv1.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        head.conv1.bias.zero_()
        head.conv2.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
        head.conv2.bias.fill_(-1.0)
    cells = torch.tensor([[0.0, 2.0], [1.0, 1.0], [-4.0, 0.0], [1.5, 0.0], [25.0, 0.0]])  # (x0, x1) per cell
    z = [max(a, 0) - max(b, 0) - 1 for a, b in cells.tolist()]  # -3, -1, -1, 0.5, 24
    expected = [math.log1p(math.exp(v)) if v <= 20 else v for v in z]
    with torch.no_grad():
        scores = head(cells.T.reshape(1, 2, 1, 5)).flatten()
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert scores[0] == pytest.approx(0.04858735, abs=1e-7)  # log(1 + e^-3)


def test_pretrained_state_dict_initialises_a_finetune_model() -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    model = Delf(NCLS, arch="resnet18", stage="finetune", pretrained=resnet.state_dict())
    _assert_same(model.base[4], resnet.layer1.state_dict())
    _assert_same(model.layer4, resnet.layer4.state_dict())
    with pytest.raises(PretrainedUnavailable, match="not a torchvision resnet18 state_dict"):
        Delf(NCLS, arch="resnet18", stage="finetune", pretrained=torchvision.models.resnet34().state_dict())


def _linearised(modules: list[nn.Module]) -> nn.Sequential:
    """A copy with positive constant conv weights, no BN, no ReLU, and max-pools turned into
    average pools of the same geometry: a linear map whose input gradient is strictly positive
    exactly on each output cell's receptive field."""
    net = copy.deepcopy(nn.Sequential(*modules)).float()
    for name, m in list(net.named_modules()):
        parent, _, attr = name.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0 / m.weight[0].numel())
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.ReLU)):
            setattr(owner, attr, nn.Identity())
        elif isinstance(m, nn.MaxPool2d):
            setattr(owner, attr, nn.AvgPool2d(m.kernel_size, m.stride, m.padding))
    return net.requires_grad_(False)


def _support(grad: torch.Tensor) -> tuple[int, int, int, int]:
    """(first row, last row, first col, last col) where ``grad`` (3, H, W) is non-zero."""
    rows = grad.abs().sum(dim=(0, 2)).nonzero().flatten()
    cols = grad.abs().sum(dim=(0, 1)).nonzero().flatten()
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


@pytest.mark.parametrize("build, size, stride, padding, input_size", [
    pytest.param(lambda: Delf(NCLS, arch="resnet50", stage="inference"), 267, 16, 133, 288, id="resnet50-layer3"),
    pytest.param(lambda: Delf(NCLS, arch="resnet50", stage="inference", target_layer="layer4"), 427, 32, 213, 448,
                 id="resnet50-layer4"),
    pytest.param(lambda: Delf(NCLS, arch="resnet18", stage="inference"), 211, 16, 105, 224, id="resnet18-layer3"),
    # DELG's block3_strides: layer3 subsampled by 2 doubles the stride only (the official export's
    # 291/32/145 are its own ResNet's, whose stride-2 blocks stride a 1x1 conv, not the 3x3)
    pytest.param(lambda: Delg(NCLS, arch="resnet50", global_dim=8, autoencoder_dim=0, classifiers=False),
                 267, 32, 133, 320, id="resnet50-delg-block3_strides"),
])
def test_receptive_field_matches_input_gradients(build: Callable[[], Delf | Delg], size: int, stride: int,
                                                 padding: int, input_size: int) -> None:
    model = build()
    rf = model.receptive_field()
    assert (rf.size, rf.stride, rf.padding) == (size, stride, padding)

    net = _linearised(model.backbone())
    x = torch.zeros(2, 3, input_size, input_size, requires_grad=True)
    out = net(x)
    i = -(-padding // stride)  # first cell whose field starts inside the image
    assert stride * i - padding + size <= input_size, "input too small for an interior cell"
    (out[0, :, i, i].sum() + out[1, :, 0, 0].sum()).backward()
    start = stride * i - padding
    assert _support(x.grad[0]) == (start, start + size - 1) * 2          # interior cell
    assert _support(x.grad[1]) == (0, size - 1 - padding) * 2            # corner cell: clipped
    assert torch.equal(rf.boxes(1, 1), torch.tensor([[-padding, -padding, size - 1 - padding,
                                                      size - 1 - padding]], dtype=torch.float32))


def test_model_normalises_its_input() -> None:
    model = Delf(NCLS, arch="resnet18", stage="finetune").eval()
    seen = []
    model.base[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (x - mean) / std)


def _seed_checkpoint(model: Delf, modules: tuple[str, ...]) -> dict:
    """A checkpoint as the seed repo's Solver wrote it: per-module state dicts + epoch/acc/optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"epoch": 3, "acc": 12.5, "optimizer": optimizer.state_dict()}
    for name in modules:
        state[name] = getattr(model, name).state_dict() if name != "pool" else {}
    return state


def _assert_same(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = module.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_seed_format_finetune_checkpoint_gives_keypoint_backbone(tmp_path: Path, layer: str) -> None:
    torch.manual_seed(0)
    finetuned = Delf(7, arch="resnet18", stage="finetune")
    for m in finetuned.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "seed_finetune.pth.tar"
    torch.save(_seed_checkpoint(finetuned, ("base", "layer4", "pool", "logits")), path)

    info = describe(load_file(path))
    assert (info["arch"], info["stage"], info["ncls"]) == ("resnet18", "finetune", 7)
    keypoint = Delf(3, arch="resnet18", stage="keypoint", target_layer=layer)
    load_backbone(keypoint, path)
    _assert_same(keypoint.base, finetuned.base.state_dict())
    if layer == "layer4":
        _assert_same(keypoint.layer4, finetuned.layer4.state_dict())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_seed_format_keypoint_checkpoint_loads(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    seed_model = Delf(4, arch=arch, stage="keypoint", attn_batchnorm=False)
    ckpt = _seed_checkpoint(seed_model, ("base", "attn", "pool", "logits"))
    assert set(ckpt["attn"]) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    assert set(ckpt["logits"]) == {"0.weight", "0.bias"}
    path = tmp_path / "seed_keypoint.pth.tar"
    torch.save(ckpt, path)

    model, raw = load_model(path)
    assert (model.arch, model.target_layer, model.ncls, model.stage) == (arch, "layer3", 4, "inference")
    assert raw["epoch"] == 3
    for name in ("base", "attn", "logits"):
        _assert_same(getattr(model, name), ckpt[name])


def test_project_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    path = save_keypoint_checkpoint(tmp_path / "kp.pth.tar", target_layer="layer4", ncls=3)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    model, _ = load_model(path)
    assert (model.target_layer, model.ncls) == ("layer4", 3)
    for key, value in raw["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_imagenet_download_failure_names_the_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(PretrainedUnavailable) as err:
        Delf(NCLS, arch="resnet18", stage="finetune", pretrained="imagenet")
    assert "--pretrained none" in str(err.value) and "--pretrained PATH" in str(err.value)
    Delf(NCLS, arch="resnet18", stage="keypoint", pretrained="imagenet")  # never downloads


def test_attention_pool_sum_and_mean_hand_computed() -> None:
    """Every cell holds (3, 4) -> unit (0.6, 0.8), attention 2 on a 2x3 map: the sum is
    6 * 2 * (0.6, 0.8); the mean divides by the 6 cells. The sum scales with the map's area."""
    features = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1).expand(1, 2, 2, 3)
    attention = torch.full((1, 1, 2, 3), 2.0)
    total = WeightedSum2d("sum")(features, attention)
    mean = WeightedSum2d("mean")(features, attention)
    assert total.shape == mean.shape == (1, 2, 1, 1)
    torch.testing.assert_close(total.flatten(), torch.tensor([7.2, 9.6]))
    torch.testing.assert_close(mean.flatten(), torch.tensor([1.2, 1.6]))
    big = WeightedSum2d("sum")(features[..., :1, :1].expand(1, 2, 6, 6), attention[..., :1, :1].expand(1, 1, 6, 6))
    torch.testing.assert_close(big / total, torch.full_like(total, 6.0))  # 36 cells vs 6
    with pytest.raises(ValueError, match="unknown attention pooling 'max'"):
        WeightedSum2d("max")


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_attention_pool_is_stored_and_honoured(tmp_path: Path, pool: str) -> None:
    torch.manual_seed(0)
    trained = Delf(3, arch="resnet18", stage="keypoint", attention_pool=pool).eval()
    path = tmp_path / "kp.pth.tar"
    torch.save(checkpoint_dict(trained), path)
    assert load_file(path)["attention_pool"] == pool
    model, _ = load_model(path)
    assert model.attention_pool == model.pool.mode == pool
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), trained(x))


def test_checkpoint_without_attention_pool_means_sum(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = checkpoint_dict(Delf(3, arch="resnet18", stage="keypoint", attention_pool="mean"))
    del ckpt["attention_pool"]  # a file written before the option existed
    torch.save(ckpt, tmp_path / "old.pth.tar")
    assert describe(ckpt)["attention_pool"] == "sum"
    assert load_model(tmp_path / "old.pth.tar")[0].pool.mode == "sum"


@pytest.mark.parametrize("key, value, message", [
    ("arch", "resnet999", "arch is 'resnet999': expected one of resnet18, resnet34, resnet50, resnet101, resnet152"),
    ("layout", "keras", "layout is 'keras': expected one of torchvision, slim"),
    ("stage", "inference", "stage is 'inference': expected one of finetune, keypoint, delg"),
    ("target_layer", None, "records no target_layer (not a checkpoint of this project)"),
])
def test_checkpoint_with_bad_settings_is_one_line_naming_it(tmp_path: Path, key: str, value: str | None,
                                                            message: str) -> None:
    ckpt = checkpoint_dict(Delf(3, arch="resnet18", stage="keypoint"))
    if value is None:
        del ckpt[key]
    else:
        ckpt[key] = value
    path = tmp_path / "bad.pth.tar"
    torch.save(ckpt, path)
    for load in (load_model, lambda p: load_backbone(Delf(3, arch="resnet18", stage="keypoint"), p)):
        with pytest.raises(CheckpointError) as err:
            load(path)
        assert str(err.value) == f"{path}: {message}"
