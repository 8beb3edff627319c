"""TF-slim's ResNet v1 (``tf_slim.nets.resnet_v1``), the backbone of the official DELF models, as
PyTorch modules laid out like torchvision's ResNet (``conv1, bn1, relu, maxpool, layer1..4``,
bottlenecks with ``conv1..3``, ``bn1..3``, ``downsample``), so that the rest of this project
(BatchNorm folding, the receptive field, checkpoints) treats both layouts alike.

Where slim differs from torchvision, and loading one's weights into the other would run without an
error and compute another network:

- each block's stride 2 sits in its *last* unit (torchvision: the first), on the 3x3 conv, padded
  symmetrically by 1 (slim's ``conv2d_same``: explicit padding, then a VALID conv);
- that strided unit's shortcut, where the depth does not change, is a 1x1 max-pool subsample
  ``x[:, :, ::2, ::2]`` (no conv); projection shortcuts (1x1 conv + BN) only where the depth changes,
  i.e. in each block's first unit, with stride 1;
- pool1 is a 3x3/2 max-pool with TF 'SAME' padding: nothing before and one cell after an even side,
  one on each side of an odd one (torchvision: one on each side, always);
- block4 has stride 1 (slim's ``resnet_v1_50``), so layer3 and layer4 both have output stride 32.

conv1 (7x7/2, ``conv2d_same``: 3 on each side) is torchvision's. BatchNorm epsilon is slim's
default, 1e-5 (PyTorch's too); convs followed by BatchNorm have no bias.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# units per block (layer1..layer4) of slim's resnet_v1_{50,101,152}
SLIM_UNITS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
# the stride of each block's last unit
SLIM_STRIDES = (2, 2, 2, 1)


class SamePadMaxPool2d(nn.MaxPool2d):
    """3x3/2 max-pool with TensorFlow's 'SAME' padding: output side ceil(n / 2); an even side is
    padded by 0 cells before and 1 after, an odd side by 1 and 1. Padded cells never win.

    ``padding`` (the attribute) is the symmetric value k // 2, what receptive-field arithmetic
    sees: exact for an odd side with k=3, s=2; for an even side TF pads 0 before, and cell
    centres shift by 1 px of this layer's input (the official DELF constants ignore this too)."""

    def __init__(self) -> None:
        super().__init__(3, 2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        if (k, s) != (3, 2):
            raise NotImplementedError("TF 'SAME' max-pool is implemented for 3x3/2 (slim's pool1) only")
        # an odd side: one -inf cell on each side; an even side: none before, and the window that
        # would need the one after is kept by ceil_mode (out-of-range cells are ignored). No copy,
        # so channels_last input stays channels_last.
        return F.max_pool2d(x, k, s, padding=(x.shape[-2] % 2, x.shape[-1] % 2), ceil_mode=True)


class Subsample(nn.Module):
    """``x[:, :, ::s, ::s]``: slim's ``subsample`` (a 1x1 max-pool of stride s), the shortcut of a
    strided unit whose depth does not change."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride]

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class SlimBottleneck(nn.Module):
    """slim's ``bottleneck`` (v1): relu(shortcut(x) + bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))),
    the stride on conv2 (3x3)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        if in_channels != out:
            self.downsample: nn.Module = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False),
                                                       nn.BatchNorm2d(out))
        elif stride > 1:
            self.downsample = Subsample(stride)
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.downsample(x))


class SlimResNet(nn.Module):
    """slim's ``resnet_v1_{50,101,152}`` under torchvision's attribute names (no classifier)."""

    def __init__(self, arch: str = "resnet50") -> None:
        super().__init__()
        if arch not in SLIM_UNITS:
            raise ValueError(f"the slim layout has bottleneck ResNets only ({', '.join(SLIM_UNITS)}), not {arch!r}")
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = SamePadMaxPool2d()
        channels = 64
        for index, (units, stride) in enumerate(zip(SLIM_UNITS[arch], SLIM_STRIDES, strict=True)):
            width = 64 * 2 ** index
            layer = []
            for unit in range(units):
                layer.append(SlimBottleneck(channels, width, stride if unit == units - 1 else 1))
                channels = width * SlimBottleneck.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
