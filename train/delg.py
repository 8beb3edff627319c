"""DELG (Cao, Araujo, Sim; ECCV 2020): a global descriptor and the DeLF local head on one ResNet.

- Global branch on layer4: GeM pooling (p = 3, fixed) -> fully connected "whitening" layer
  (C4 -> ``global_dim``, with bias) -> L2 normalisation. Trained through an ArcFace cosine
  classifier (margin 0.1, scale sqrt(global_dim)).
- Local branch on layer3, with the gradient stopped into the backbone (the features are
  detached), subsampled by 2 with ``block3_strides`` (the official trainer's default: a max-pool
  of size 1, stride 2, i.e. ``x[:, :, ::2, ::2]``, so the local grid has stride 32; layer4 still
  reads the full layer3 map). On it: the attention head, an optional autoencoder (conv1x1
  C3 -> ``autoencoder_dim`` encoder, conv1x1 back to C3 + ReLU decoder, trained by the
  reconstruction MSE), and an attention classifier on the attention-weighted mean of the
  L2-normalised reconstruction (of the layer3 features without autoencoder). As the paper and the
  official code since tensorflow/models#9906: the attention reads layer3, the pooling reads the
  reconstruction. The local descriptor is the autoencoder's code (no PCA needed), else the layer3
  feature.

As in the official TensorFlow model, the three losses are summed with weights
(ArcFace CE + 1.0 x attention CE + 10 x reconstruction MSE) and trained in one step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .delf import BASE_ORDER, Pretrained, ReceptiveField, build_resnet, feature_dim, receptive_field
from .layers import ImageNormalize, SpatialAttention2d, WeightedSum2d

GEM_POWER = 3.0
GEM_EPS = 1e-6
GLOBAL_SCALES = (0.7071, 1.0, 1.4142)  # the official extractor's global-descriptor scales
CLASSIFIERS = ("arcface", "logits")  # training-only modules


def gem(x: torch.Tensor, p: float = GEM_POWER, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalised-mean pooling of (B, C, H, W) to (B, C): (mean_hw max(x, eps)^p)^(1/p).

    Computed in float32 (x^3 of large activations overflows float16)."""
    return x.float().clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def pool_scales(descriptors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Multi-scale global descriptor from per-scale ones (..., D): each L2-normalised, averaged,
    L2-normalised (the official extractor), in float32."""
    unit = [F.normalize(d.float(), dim=-1) for d in descriptors]
    return F.normalize(torch.stack(unit).mean(dim=0), dim=-1)


class GeM(nn.Module):
    """:func:`gem` with a fixed power ``p`` (not learned, as in DELG)."""

    def __init__(self, p: float = GEM_POWER, eps: float = GEM_EPS) -> None:
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"


class ArcFace(nn.Module):
    """Cosine classifier with an additive angular margin (ArcFace, Deng et al. CVPR 2019).

    logits = scale * cos(theta_k), where theta_k is the angle between the L2-normalised embedding
    and the L2-normalised class weight k; with ``labels`` (training), the true class's angle
    becomes theta + margin, except where theta > pi - margin (there the margin would raise the
    cosine). ``weight`` is (ncls, dim), Glorot-uniform initialised. ``scale`` is a constant.
    """

    def __init__(self, dim: int, ncls: int, margin: float = 0.1, scale: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ncls, dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin = margin
        self.scale = math.sqrt(dim) if scale is None else scale

    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        """cos(theta) (B, ncls) between embeddings (B, dim) and the class weights, in float32 (also
        under autocast, which would run the product in fp16/bf16: near cos = 1 their steps of
        ~5e-4 / 4e-3 round small angles to 0)."""
        with torch.autocast(embedding.device.type, enabled=False):
            return F.linear(F.normalize(embedding.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, ncls), float32 (autocast disabled here); the margin applies only when
        ``labels`` (B,) are given."""
        with torch.autocast(embedding.device.type, enabled=False):
            cos = self.cosine(embedding)
            if labels is not None and self.margin > 0:
                # cos(theta + m) = cos cos m - sin sin m, theta in [0, pi]; no acos (its derivative
                # is infinite at +-1); the clamp also zeroes the gradient of sin where cos = +-1.
                sin = (1 - cos * cos).clamp(min=1e-12).sqrt()
                with_margin = cos * math.cos(self.margin) - sin * math.sin(self.margin)
                # theta <= pi - m  <=>  cos >= -cos(m)
                target = F.one_hot(labels, cos.shape[1]).bool() & (cos >= -math.cos(self.margin))
                cos = torch.where(target, with_margin, cos)
            return self.scale * cos

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, ncls={self.weight.shape[0]}, margin={self.margin}, scale={self.scale:.4g}"


class Autoencoder(nn.Module):
    """conv1x1 (C -> dim) encoder; conv1x1 (dim -> C) + ReLU decoder (the official layout)."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(channels, dim, 1)
        self.decoder = nn.Conv2d(dim, channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(code (B, dim, h, w), reconstruction (B, C, h, w))."""
        code = self.encoder(x)
        return code, F.relu(self.decoder(code))


class DelgOutput(NamedTuple):
    """One training forward pass: ArcFace logits (with margin when labels were given), attention
    classifier logits (B, ncls) each, and each sample's reconstruction MSE (B,) (zeros without
    autoencoder)."""

    global_logits: torch.Tensor
    attention_logits: torch.Tensor
    reconstruction: torch.Tensor


@dataclass(frozen=True)
class LossWeights:
    """Weights of the DELG loss terms (the official values)."""

    attention: float = 1.0
    reconstruction: float = 10.0


def delg_loss(out: DelgOutput, labels: torch.Tensor, weights: LossWeights = LossWeights()
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each sample's ArcFace CE + w_att x attention CE + w_rec x reconstruction MSE (B,), float32
    (its mean is the batch loss), and the three terms (B,) under 'global', 'attention',
    'reconstruction'."""
    parts = {"global": F.cross_entropy(out.global_logits.float(), labels, reduction="none"),
             "attention": F.cross_entropy(out.attention_logits.float(), labels, reduction="none"),
             "reconstruction": out.reconstruction.float()}
    total = parts["global"] + weights.attention * parts["attention"] + weights.reconstruction * parts["reconstruction"]
    return total, parts


class Delg(nn.Module):
    """DELG on a torchvision ResNet. Input: RGB in [0, 1], (B, 3, H, W).

    Modules: ``normalize``, ``base`` (conv1 ... layer3, the layout of :class:`~train.delf.Delf`),
    ``subsample`` (layer3 -> the local grid: MaxPool2d(1, stride 2) with ``block3_strides``, else
    Identity), ``layer4``, ``gem``, ``whiten`` (Linear C4 -> global_dim), ``arcface``,
    ``autoencoder`` (absent when ``autoencoder_dim`` is 0), ``attn``, ``pool``, ``logits``
    (attention classifier; ``attn``/``pool``/``logits`` are named as in Delf's keypoint stage).

    ``pretrained`` initialises the ResNet ('imagenet', 'none' or a state_dict, as for Delf).
    ``attention_pool``: the attention classifier sees the mean of a * normalize(R) over the map, R
    the reconstruction (layer3 without autoencoder), as the official model (the keypoint stage's
    default is the seed's sum).
    ``classifiers=False`` leaves out ``arcface`` and ``logits`` (81 313 x 2048 and 81 313 x 1024
    weights for GLDv2's landmarks), which extraction does not need; see :data:`CLASSIFIERS`.
    ``block3_strides`` (the official default): local features at stride 32 instead of layer3's 16.
    """

    stage = "delg"
    target_layer = "layer3"

    def __init__(self, ncls: int, arch: str = "resnet50", global_dim: int = 2048, autoencoder_dim: int = 128,
                 arcface_margin: float = 0.1, arcface_scale: float | None = None, attn_batchnorm: bool = True,
                 attention_pool: str = "mean", pretrained: Pretrained = "none", classifiers: bool = True,
                 block3_strides: bool = True) -> None:
        super().__init__()
        if global_dim < 1 or autoencoder_dim < 0:
            raise ValueError(f"need global_dim >= 1 and autoencoder_dim >= 0, got {global_dim}, {autoencoder_dim}")
        self.arch, self.ncls, self.attention_pool = arch, ncls, attention_pool
        self.global_dim, self.autoencoder_dim = global_dim, autoencoder_dim
        self.block3_strides = block3_strides
        resnet = build_resnet(arch, pretrained)
        channels = feature_dim(arch, "layer3")
        self.normalize = ImageNormalize()
        self.base = nn.Sequential(*(getattr(resnet, name) for name in BASE_ORDER))
        # the official subsampling layer; a module with a stride, so receptive_field() counts it
        self.subsample = nn.MaxPool2d(kernel_size=1, stride=2) if block3_strides else nn.Identity()
        self.layer4 = resnet.layer4
        self.gem = GeM()
        self.whiten = nn.Linear(feature_dim(arch, "layer4"), global_dim)
        if classifiers:
            self.arcface = ArcFace(global_dim, ncls, margin=arcface_margin, scale=arcface_scale)
        if autoencoder_dim:
            self.autoencoder = Autoencoder(channels, autoencoder_dim)
        self.attn = SpatialAttention2d(channels, batchnorm=attn_batchnorm)
        self.pool = WeightedSum2d(attention_pool)
        if classifiers:
            self.logits = nn.Sequential(nn.Conv2d(channels, ncls, 1), nn.Flatten())

    # --- structure (the interface the extractor shares with Delf) ---------------------------
    def backbone(self) -> list[nn.Module]:
        """The modules that produce the local feature map (layer3, subsampled or not), in order."""
        return [self.base, self.subsample]

    def receptive_field(self) -> ReceptiveField:
        """Receptive field, stride and padding of the local grid (stride 32 with ``block3_strides``)."""
        return receptive_field(self.backbone())

    @property
    def feature_dim(self) -> int:
        """Dimension of the local descriptors: the autoencoder's code, else layer3's channels."""
        return self.autoencoder_dim or feature_dim(self.arch, "layer3")

    # --- forward -----------------------------------------------------------------------------
    def local_head(self, f3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local descriptor map (B, D, h, w), attention (B, 1, h, w) >= 0) of layer3 features
        (B, C3, H, W); (h, w) = (ceil(H/2), ceil(W/2)) with ``block3_strides``, else (H, W). The
        attention reads the (subsampled) layer3 features, never the autoencoder."""
        local = self.subsample(f3)
        descriptors = self.autoencoder.encoder(local) if self.autoencoder_dim else local
        return descriptors, self.attn(local)

    def global_embedding(self, f3: torch.Tensor) -> torch.Tensor:
        """Whitened GeM of layer4 (B, global_dim), not normalised (ArcFace normalises it)."""
        return self.whiten(self.gem(self.layer4(f3)))

    def global_descriptor(self, f3: torch.Tensor) -> torch.Tensor:
        """Unit-length global descriptor (B, global_dim), float32, from layer3 features."""
        return F.normalize(self.global_embedding(f3).float(), dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """layer3 feature map (B, C3, h, w) of RGB [0, 1] input."""
        return self.base(self.normalize(x))

    def extract(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local descriptor map (B, D, h, w) and attention (B, 1, h, w), as Delf.extract."""
        return self.local_head(self.features(x))

    def extract_with_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`extract` plus the unit global descriptor (B, global_dim), from one pass."""
        f3 = self.features(x)
        local, attention = self.local_head(f3)
        return local, attention, self.global_descriptor(f3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> DelgOutput:
        """Training/validation pass. The local branch sees detached layer3 features: its losses
        never reach the backbone. The attention classifier pools the attention (from the layer3
        features) times the normalised reconstruction (the features without autoencoder), so its
        loss trains the autoencoder too. ArcFace's margin applies when ``labels`` are given."""
        f3 = self.features(x)
        global_logits = self.arcface(self.global_embedding(f3), labels)
        local = self.subsample(f3.detach())
        attention = self.attn(local)
        if self.autoencoder_dim:
            _, pooled = self.autoencoder(local)
            reconstruction = F.mse_loss(pooled.float(), local.float(), reduction="none").mean(dim=(1, 2, 3))
        else:
            pooled, reconstruction = local, local.new_zeros(len(local), dtype=torch.float32)
        attention_logits = self.logits(self.pool(pooled, attention))
        return DelgOutput(global_logits, attention_logits, reconstruction)
