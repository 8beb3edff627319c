"""What one training step optimises: the loss of a batch, the logits scored for accuracy, and
per-sample values of the loss and its parts (for the logs).

- :class:`Classification`: cross-entropy on ``net(images)`` (the finetune and keypoint stages);
- :class:`DelgObjective`: ArcFace CE + weighted attention CE + weighted reconstruction MSE
  (``net(images, labels)``: the ArcFace margin is on in training, off in validation); accuracy
  is the global (ArcFace) classifier's.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn as nn

from .delg import LossWeights, delg_loss


class StepOutput(NamedTuple):
    loss: torch.Tensor                # () batch mean, differentiable: what the step minimises
    logits: torch.Tensor              # (B, ncls), scored for top-k accuracy
    losses: torch.Tensor              # (B,) each sample's loss (its mean is ``loss``)
    parts: dict[str, torch.Tensor]    # name -> (B,) each sample's loss term (empty for one-term losses)

    def detach(self) -> StepOutput:
        return StepOutput(self.loss.detach(), self.logits.detach(), self.losses.detach(),
                          {k: v.detach() for k, v in self.parts.items()})


class Objective(Protocol):
    parts: tuple[str, ...]

    def __call__(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, training: bool) -> StepOutput:
        ...


class Classification:
    """Cross-entropy on the logits ``net(images)``."""

    parts: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.criterion = nn.CrossEntropyLoss(reduction="none")

    def __call__(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, training: bool) -> StepOutput:
        logits = net(images)
        losses = self.criterion(logits, labels)
        return StepOutput(losses.mean(), logits, losses, {})


class DelgObjective:
    """The DELG loss (:func:`train.delg.delg_loss`) with ``weights`` (default: the official ones)."""

    parts: tuple[str, ...] = ("global", "attention", "reconstruction")

    def __init__(self, weights: LossWeights | None = None) -> None:
        self.weights = weights or LossWeights()

    def __call__(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, training: bool) -> StepOutput:
        out = net(images, labels if training else None)
        losses, parts = delg_loss(out, labels, self.weights)
        return StepOutput(losses.mean(), out.global_logits, losses, parts)
