"""The demo's presets: dataset size and training length (no heavy imports: demo.py's --help lists them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """Dataset size and training length of a demo run."""

    classes: int
    train_per_class: int
    val_per_class: int
    size: int  # training images, px
    query_size: int
    finetune_epochs: int
    keypoint_epochs: int


PRESETS = {
    "full": Preset(6, 24, 6, 112, 320, finetune_epochs=6, keypoint_epochs=20),
    "smoke": Preset(3, 4, 1, 64, 160, finetune_epochs=1, keypoint_epochs=1),
}
