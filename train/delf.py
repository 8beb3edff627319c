"""The DeLF model: a torchvision ResNet base, a finetune head and an attention (keypoint) head."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .config import ARCHS, ATTENTION_POOLS, INPUT_NORMS, LAYOUTS, TARGET_LAYERS
from .layers import GlobalAvgPool2d, ImageNormalize, SpatialAttention2d, WeightedSum2d
from .slim import SLIM_UNITS, SlimResNet

STAGES = ("finetune", "keypoint", "inference")
BASE_ORDER = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
GAMMA_RANGE = (0.3535, 1.0)


@dataclass(frozen=True)
class ReceptiveField:
    """Geometry of one feature-map cell: cell (i, j) sees input rows/cols
    [stride*i - padding, stride*i - padding + size - 1] (and the same for columns)."""

    size: int
    stride: int
    padding: int

    def boxes(self, height: int, width: int) -> torch.Tensor:
        """Receptive boxes of an (height, width) feature map, row-major, as (h*w, 4)
        [x1, y1, x2, y2] in pixels of the network input (inclusive pixel indices)."""
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        x1 = xs.reshape(-1).float() * self.stride - self.padding
        y1 = ys.reshape(-1).float() * self.stride - self.padding
        return torch.stack([x1, y1, x1 + self.size - 1, y1 + self.size - 1], dim=1)


def receptive_field(modules: Iterable[nn.Module]) -> ReceptiveField:
    """Receptive field of a chain of modules, derived from their convs and pools in order.

    Residual shortcuts (``downsample``) are skipped: the main path of each block dominates and
    shares its centre alignment.
    """
    size, jump, start = 1.0, 1.0, 0.0
    for module in modules:
        for name, m in module.named_modules():
            if "downsample" in name.split("."):
                continue
            if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                continue
            k, s, p, d = (_first(getattr(m, a, 1)) for a in ("kernel_size", "stride", "padding", "dilation"))
            size += (k - 1) * d * jump
            start += ((k - 1) * d / 2 - p) * jump
            jump *= s
    return ReceptiveField(int(size), int(jump), int((size - 1) / 2 - start))


def _first(v: int | tuple) -> int:
    return v[0] if isinstance(v, tuple) else v


def feature_dim(arch: str, target_layer: str) -> int:
    """Channels of ``target_layer`` for ``arch``."""
    wide = 1 if arch in ("resnet18", "resnet34") else 4
    return (256 if target_layer == "layer3" else 512) * wide


Pretrained = str | Mapping[str, torch.Tensor]
"""Backbone initialisation: 'imagenet' (torchvision's weights, downloaded once), 'none', or a
ResNet state_dict of the model's layout (the caller reads the file; a slim one may lack layer4 and
the classifier, which then stay randomly initialised)."""


def build_resnet(arch: str, pretrained: Pretrained = "none", layout: str = "torchvision"
                 ) -> torchvision.models.ResNet | SlimResNet:
    """A ResNet of ``layout`` initialised as ``pretrained`` says (see :data:`Pretrained`; ImageNet
    weights exist for the torchvision layout only). ``layout`` "slim" has bottleneck archs only."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose from {', '.join(ARCHS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    if layout == "slim" and arch not in SLIM_UNITS:
        raise ValueError(f"--layout slim: TF-slim's resnet_v1 has bottleneck archs only "
                         f"({', '.join(SLIM_UNITS)}), not {arch}")
    net = SlimResNet(arch) if layout == "slim" else torchvision.models.get_model(arch, weights=None)
    if isinstance(pretrained, str):
        if pretrained == "imagenet":
            if layout == "slim":
                raise PretrainedUnavailable("--layout slim: there are no ImageNet weights of TF-slim's layout here; "
                                            "give --pretrained none, or PATH to a slim state_dict (e.g. the "
                                            "state_dict of a model converted by extract/convert_official.py)")
            net.load_state_dict(_imagenet_state(arch))
        elif pretrained != "none":
            raise ValueError(f"pretrained {pretrained!r}: give 'imagenet', 'none' or a state_dict")
        return net
    try:
        missing, unexpected = net.load_state_dict(pretrained, strict=False)
    except RuntimeError as e:
        raise PretrainedUnavailable(f"not a {layout} {arch} state_dict: {e}") from None
    optional = ("layer4.",) if layout == "slim" else ()  # official DELF releases end at block3
    missing = [k for k in missing if not k.startswith(optional)]
    if missing or unexpected:
        raise PretrainedUnavailable(f"not a {layout} {arch} state_dict: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}")
    return net


class PretrainedUnavailable(RuntimeError):
    """ImageNet weights could not be downloaded, or the given state_dict does not fit."""


def _imagenet_state(arch: str) -> Mapping[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # network errors come in many types (URLError, OSError, ...)
        raise PretrainedUnavailable(
            f"could not download ImageNet weights for {arch} ({weights.url}): {e}.\n"
            f"Train from scratch with --pretrained none, or give a local torchvision {arch} "
            f"state_dict with --pretrained PATH."
        ) from None


class Delf(nn.Module):
    """DeLF on a ResNet. Input: RGB in [0, 1], (B, 3, H, W).

    - ``finetune``: base -> layer4 -> global average pool -> classifier; ``forward`` gives logits.
    - ``keypoint``: frozen base (+ frozen layer4 for layer4 features) -> attention -> attention-
      weighted sum (``attention_pool="sum"``, the paper's Eq. 1 and the seed) or mean ("mean",
      the official TF2 trainer) of L2-normalised features -> classifier; ``forward`` gives logits.
    - ``inference``: as keypoint; use :meth:`extract` for feature maps and attention.

    ``base`` is ``nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3)``, the seed
    repo's layout, so its checkpoints load module by module. ``pretrained`` initialises the
    ResNet of a finetune-stage model only (other stages get their weights from a checkpoint).

    ``layout`` is the ResNet's: "torchvision" (layer3 stride 16) or "slim" (TF-slim's resnet_v1,
    the official DELF models': layer3 stride 32, see train/slim.py). ``input_norm`` maps the
    [0, 1] input to the network's: "imagenet" (mean/std) or "tf" ((pixel - 128) / 128, the official).
    """

    def __init__(
        self,
        ncls: int,
        arch: str = "resnet50",
        stage: str = "finetune",
        target_layer: str = "layer3",
        pretrained: Pretrained = "none",
        attn_batchnorm: bool = True,
        use_random_gamma_rescale: bool = False,
        attention_pool: str = "sum",
        layout: str = "torchvision",
        input_norm: str = "imagenet",
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}: choose from {', '.join(STAGES)}")
        if target_layer not in TARGET_LAYERS:
            raise ValueError(f"unknown target_layer {target_layer!r}: choose from {', '.join(TARGET_LAYERS)}")
        self.arch, self.stage, self.target_layer, self.ncls = arch, stage, target_layer, ncls
        if attention_pool not in ATTENTION_POOLS:
            raise ValueError(f"unknown attention_pool {attention_pool!r}: choose from {', '.join(ATTENTION_POOLS)}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}: choose from {', '.join(INPUT_NORMS)}")
        self.use_random_gamma_rescale = use_random_gamma_rescale
        self.attention_pool = attention_pool
        self.layout, self.input_norm = layout, input_norm
        resnet = build_resnet(arch, pretrained if stage == "finetune" else "none", layout)

        self.normalize = ImageNormalize(input_norm)
        self.base = nn.Sequential(*(getattr(resnet, name) for name in BASE_ORDER))
        if stage == "finetune" or target_layer == "layer4":
            self.layer4 = resnet.layer4
        if stage == "finetune":
            channels = feature_dim(arch, "layer4")
            self.pool: nn.Module = GlobalAvgPool2d()
        else:
            channels = feature_dim(arch, target_layer)
            self.attn = SpatialAttention2d(channels, batchnorm=attn_batchnorm)
            self.pool = WeightedSum2d(attention_pool)
        self.logits = nn.Sequential(nn.Conv2d(channels, ncls, 1), nn.Flatten())
        if stage != "finetune":
            self.freeze_backbone()

    # --- structure -------------------------------------------------------------------------
    def backbone(self) -> list[nn.Module]:
        """The modules that produce the local feature map, in order."""
        return [self.base, self.layer4] if self.target_layer == "layer4" else [self.base]

    def frozen_modules(self) -> list[nn.Module]:
        return [] if self.stage == "finetune" else self.backbone()

    def freeze_backbone(self) -> None:
        for module in self.backbone():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> "Delf":
        """Frozen modules stay in eval mode, so their BatchNorm statistics never change."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def receptive_field(self) -> ReceptiveField:
        """Receptive field, stride and padding of the local-feature layer."""
        return receptive_field(self.backbone())

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.arch, self.target_layer)

    # --- forward ---------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Local feature map F (B, C, h, w) of RGB [0, 1] input."""
        x = self.normalize(x)
        for module in self.backbone():
            x = module(x)
        return x

    def extract(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map F (B, C, h, w) and attention scores a (B, 1, h, w) >= 0."""
        f = self.features(x)
        return f, self.attn(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, ncls)."""
        if self.stage == "finetune":
            return self.logits(self.pool(self.layer4(self.base(self.normalize(x)))))
        if self.training and self.use_random_gamma_rescale:
            x = gamma_rescale(x)
        with torch.no_grad():
            f = self.features(x)
        a = self.attn(f)
        # Pooling and classifier in fp32 even under autocast: the pooled sum over up to 45x45
        # cells can exceed fp16's range (65504) and would make the loss infinite.
        with torch.autocast(x.device.type, enabled=False):
            return self.logits(self.pool(f.float(), a.float()))


def gamma_rescale(x: torch.Tensor, low: float = GAMMA_RANGE[0], high: float = GAMMA_RANGE[1]) -> torch.Tensor:
    """Resize a batch by one factor drawn uniformly in [low, high] (bilinear, antialiased)."""
    gamma = random.uniform(low, high)
    h, w = x.shape[-2:]
    size = (max(1, round(h * gamma)), max(1, round(w * gamma)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
