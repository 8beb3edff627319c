"""What one training step optimises: the loss of a batch, the logits scored for accuracy, and
the loss's parts (for the logs).

- :class:`Classification`: cross-entropy on ``net(images)`` (the finetune and keypoint stages);
- :class:`DelgObjective`: ArcFace CE + weighted attention CE + weighted reconstruction MSE
  (``net(images, labels)``, the ArcFace margin on in training, off in validation); accuracy is
  the global (ArcFace) classifier's.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .delg import LossWeights, delg_loss


class StepOutput(NamedTuple):
    loss: torch.Tensor                # scalar, differentiable
    logits: torch.Tensor              # (B, ncls), scored for top-k accuracy
    parts: dict[str, torch.Tensor]    # named loss terms, detached scalars (empty for one-term losses)


class Objective(Protocol):
    parts: tuple[str, ...]

    def __call__(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, training: bool) -> StepOutput:
        ...


class Classification:
    """Cross-entropy on the logits ``net(images)``."""

    parts: tuple[str, ...] = ()

    def __call__(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, training: bool) -> StepOutput:
        logits = net(images)
        return StepOutput(F.cross_entropy(logits, labels), logits, {})


class DelgObjective:
    """The DELG loss (:func:`train.delg.delg_loss`) with ``weights``."""

    parts: tuple[str, ...] = ("global", "attention", "reconstruction")

    def __init__(self, weights: LossWeights | None = None) -> None:
        self.weights = weights or LossWeights()

    def __call__(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, training: bool) -> StepOutput:
        out = net(images, labels if training else None)
        loss, parts = delg_loss(out, labels, self.weights)
        return StepOutput(loss, out.global_logits, parts)
