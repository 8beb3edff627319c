"""DELG: GeM and ArcFace against hand-computed values, the loss, the gradient stop into the
backbone, the autoencoder, where the attention reads and what it pools, the stride-32 local grid
(block3_strides), shapes and unit global descriptors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from train.delf import Delf, ReceptiveField
from train.delg import CLASSIFIERS, ArcFace, Delg, DelgOutput, GeM, LossWeights, delg_loss, gem, pool_scales

NCLS = 4


# --- GeM ---------------------------------------------------------------------------------------
def test_gem_hand_computed() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, -1.0], [2.0, 2.0]]]])  # (1, 2, 2, 2)
    expected = torch.tensor([[(100 / 4) ** (1 / 3), ((8 + 8 + 2e-18) / 4) ** (1 / 3)]])
    assert torch.allclose(gem(x), expected, rtol=1e-6)
    assert torch.allclose(GeM()(x), expected, rtol=1e-6)
    # p = 1 is the average pool of the clamped map, and the result is float32 for half input
    assert torch.allclose(gem(x, p=1.0), torch.tensor([[2.5, 1.0]]), rtol=1e-6)
    assert gem(x.half()).dtype == torch.float32
    # eps floor: an all-negative channel pools to eps, not NaN
    assert torch.allclose(gem(-torch.ones(1, 1, 3, 3)), torch.tensor([[1e-6]]), rtol=1e-4)


# --- ArcFace -----------------------------------------------------------------------------------
def _arcface(margin: float = 0.1) -> ArcFace:
    head = ArcFace(2, 3, margin=margin, scale=10.0)
    with torch.no_grad():  # class k's weight at angle 0, 60 and 180 degrees (non-unit: normalised inside)
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.5, 0.5 * math.sqrt(3)], [-3.0, 0.0]]))
    return head


def test_arcface_hand_computed() -> None:
    head = _arcface()
    emb = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0]])
    cos = torch.tensor([1.0, 0.5, -1.0])
    assert torch.allclose(head(emb), 10 * cos.expand(3, 3), atol=1e-5)  # no labels: no margin
    logits = head(emb, torch.tensor([0, 1, 2]))
    # label 0 (theta 0): cos(0.1); label 1 (theta pi/3): cos(pi/3 + 0.1); label 2 (theta = pi > pi - 0.1): unchanged
    assert logits[0, 0].item() == pytest.approx(10 * math.cos(0.1), abs=1e-4)
    assert logits[1, 1].item() == pytest.approx(10 * math.cos(math.pi / 3 + 0.1), abs=1e-5)
    assert logits[2, 2].item() == pytest.approx(-10.0, abs=1e-4)
    off = ~torch.eye(3, dtype=torch.bool)  # other classes keep the plain cosine
    assert torch.allclose(logits[off], (10 * cos.expand(3, 3))[off], atol=1e-5)
    assert ArcFace(2048, 5).scale == pytest.approx(45.2548, abs=1e-4)  # sqrt(2048)


def test_arcface_gradient_is_finite_at_zero_angle() -> None:
    head = _arcface()
    emb = torch.tensor([[3.0, 0.0]], requires_grad=True)  # exactly on class 0: cos = 1
    F.cross_entropy(head(emb, torch.tensor([0])), torch.tensor([0])).backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


# --- loss --------------------------------------------------------------------------------------
def test_loss_is_the_weighted_sum() -> None:
    labels = torch.tensor([1, 0])
    out = DelgOutput(torch.tensor([[0.0, 2.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 0.0]]),
                     torch.tensor([0.25, 0.5]))
    g = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))]  # per-sample ArcFace CE
    a = [math.log(2), math.log(1 + math.exp(-3))]                  # per-sample attention CE
    total, parts = delg_loss(out, labels, LossWeights(attention=2.0, reconstruction=4.0))
    assert total.tolist() == pytest.approx([g[0] + 2 * a[0] + 4 * 0.25, g[1] + 2 * a[1] + 4 * 0.5], rel=1e-6)
    assert parts["global"].tolist() == pytest.approx(g, rel=1e-6)
    assert parts["attention"].tolist() == pytest.approx(a, rel=1e-6)
    assert parts["reconstruction"].tolist() == [0.25, 0.5]
    assert LossWeights() == LossWeights(attention=1.0, reconstruction=10.0)


# --- the model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("autoencoder_dim", [0, 16])
def test_shapes_and_unit_global_descriptor(autoencoder_dim: int) -> None:
    torch.manual_seed(0)
    model = Delg(NCLS, arch="resnet18", global_dim=32, autoencoder_dim=autoencoder_dim).eval()
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        local, attention, glob = model.extract_with_global(x)
        local2, attention2 = model.extract(x)
        out = model(x)
    dim = autoencoder_dim or 256
    # layer3 is 6x4 (stride 16); block3_strides (the default) subsamples it to 3x2
    assert model.feature_dim == dim and local.shape == (2, dim, 3, 2) and attention.shape == (2, 1, 3, 2)
    assert torch.equal(local, local2) and torch.equal(attention, attention2)
    assert glob.shape == (2, 32) and glob.dtype == torch.float32
    assert torch.allclose(glob.norm(dim=1), torch.ones(2), atol=1e-5)
    assert out.global_logits.shape == out.attention_logits.shape == (2, NCLS)
    assert out.reconstruction.shape == (2,) and bool((out.reconstruction > 0).all()) == bool(autoencoder_dim)


def test_block3_strides_subsamples_the_local_grid() -> None:
    """The stride-32 grid is every other cell of the stride-16 one (odd sizes round up), with
    DeLF's layer3 receptive field at twice the stride; the global branch is the same."""
    torch.manual_seed(0)
    strided = Delg(NCLS, arch="resnet18", global_dim=32, autoencoder_dim=16).eval()
    plain = Delg(NCLS, arch="resnet18", global_dim=32, autoencoder_dim=16, block3_strides=False).eval()
    plain.load_state_dict(strided.state_dict())  # strict: the option adds no weights
    assert (strided.block3_strides, plain.block3_strides) == (True, False)
    x = torch.rand(1, 3, 112, 80)  # layer3: 7x5
    with torch.no_grad():
        local, attention, glob = strided.extract_with_global(x)
        local16, attention16, glob16 = plain.extract_with_global(x)
    assert local16.shape == (1, 16, 7, 5) and local.shape == (1, 16, 4, 3) and attention.shape == (1, 1, 4, 3)
    # equal up to float rounding (the convs run on maps of another size)
    torch.testing.assert_close(local, local16[:, :, ::2, ::2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention, attention16[:, :, ::2, ::2], rtol=1e-5, atol=1e-6)
    assert torch.equal(glob, glob16)
    delf = Delf(NCLS, arch="resnet18", stage="inference").receptive_field()  # 211/16/105
    assert plain.receptive_field() == delf
    assert strided.receptive_field() == ReceptiveField(delf.size, 32, delf.padding)


def test_attention_reads_layer3_and_pools_the_reconstruction() -> None:
    """The paper's wiring (tensorflow/models#9906): changing the autoencoder leaves the attention
    map as it is and changes the attention classifier's logits (it pools the reconstruction)."""
    torch.manual_seed(0)
    model = Delg(NCLS, arch="resnet18", global_dim=32, autoencoder_dim=16).eval()
    x = torch.rand(2, 3, 128, 96)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.autoencoder.decoder.weight.add_(0.5 * torch.randn_like(perturbed.autoencoder.decoder.weight))
        local, attention = model.extract(x)
        local_p, attention_p = perturbed.extract(x)
        logits, logits_p = model(x).attention_logits, perturbed(x).attention_logits
        # the attention is the head applied to the subsampled layer3 features
        f3 = model.features(x)[:, :, ::2, ::2]
        assert torch.equal(attention, model.attn(f3))
        # the logits: classifier of the mean over cells of attention x unit reconstruction
        rec = F.relu(model.autoencoder.decoder(model.autoencoder.encoder(f3)))
        pooled = (attention * rec / rec.norm(dim=1, keepdim=True).clamp(min=1e-12)).mean(dim=(2, 3))
        expected = pooled @ model.logits[0].weight[:, :, 0, 0].T + model.logits[0].bias
    assert torch.equal(attention_p, attention) and torch.equal(local_p, local)  # the decoder reads nothing here
    assert (logits_p - logits).abs().max() > 1e-3
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_global_dim_and_defaults() -> None:
    model = Delg(NCLS, arch="resnet18")
    assert (model.global_dim, model.autoencoder_dim, model.arcface.margin) == (2048, 128, 0.1)
    assert model.whiten.in_features == 512 and model.whiten.bias is not None
    assert model.arcface.scale == pytest.approx(math.sqrt(2048))
    assert model.autoencoder.encoder.weight.shape == (128, 256, 1, 1)
    assert not hasattr(Delg(NCLS, arch="resnet18", autoencoder_dim=0), "autoencoder")


def _sgd_step(model: Delg, loss_of: str) -> dict[str, torch.Tensor]:
    """Parameters after one SGD step on one loss term; returns the parameters before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.tensor([0, 1])
    out = model(torch.rand(2, 3, 64, 64), labels)
    loss = {"attention": F.cross_entropy(out.attention_logits, labels), "reconstruction": out.reconstruction.mean(),
            "global": F.cross_entropy(out.global_logits, labels)}[loss_of]
    opt.zero_grad()
    loss.backward()
    opt.step()
    return before


def _changed(model: Delg, before: dict[str, torch.Tensor]) -> set[str]:
    return {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_local_losses_do_not_reach_the_backbone() -> None:
    torch.manual_seed(0)
    model = Delg(NCLS, arch="resnet18", global_dim=32, autoencoder_dim=16)
    # the attention classifier pools the autoencoder's reconstruction, so its loss trains the autoencoder too
    assert _changed(model, _sgd_step(model, "attention")) == {"attn", "logits", "autoencoder"}
    assert _changed(model, _sgd_step(model, "reconstruction")) == {"autoencoder"}
    # the global loss trains the backbone, the whitening and the ArcFace weights, nothing local
    assert _changed(model, _sgd_step(model, "global")) == {"base", "layer4", "whiten", "arcface"}


def test_without_autoencoder_attention_reads_layer3() -> None:
    torch.manual_seed(0)
    model = Delg(NCLS, arch="resnet18", global_dim=32, autoencoder_dim=0)
    assert _changed(model, _sgd_step(model, "attention")) == {"attn", "logits"}


def test_pretrained_state_dict_is_loaded() -> None:
    import torchvision

    torch.manual_seed(1)
    resnet = torchvision.models.resnet18()
    model = Delg(NCLS, arch="resnet18", pretrained=resnet.state_dict())
    assert torch.equal(model.base[0].weight, resnet.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)


def test_pool_scales_hand_computed() -> None:
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]])  # unit: (0.6, 0.8) and (0, 1)
    expected = torch.tensor([[0.3, 0.9]]) / math.hypot(0.3, 0.9)
    assert torch.allclose(pool_scales([a, b]), expected, atol=1e-6)
    assert torch.allclose(pool_scales([b]), torch.tensor([[0.0, 1.0]]))


def test_inference_model_without_classifiers() -> None:
    torch.manual_seed(0)
    full = Delg(NCLS, arch="resnet18", global_dim=32, autoencoder_dim=16).eval()
    light = Delg(NCLS, arch="resnet18", global_dim=32, autoencoder_dim=16, classifiers=False).eval()
    state = {k: v for k, v in full.state_dict().items() if not k.startswith(tuple(f"{m}." for m in CLASSIFIERS))}
    light.load_state_dict(state)  # strict: exactly the non-classifier weights
    assert not hasattr(light, "arcface") and not hasattr(light, "logits")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for u, v in zip(full.extract_with_global(x), light.extract_with_global(x)):
            assert torch.equal(u, v)
